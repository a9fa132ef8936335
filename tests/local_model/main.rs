//! End to end against a real model: the local llama-cpp-python server that the README's
//! first command starts (SmolLM2-135M; `scripts/local-llm.sh`), through the real daemon,
//! RabbitMQ and Postgres. `scripts/test.sh` starts the server and sets
//! `INSTRUCTD_TEST_LOCAL_LLM_URL`; without it the test is skipped, except in CI.
//!
//! It asserts what tools mode's grammar guarantees (schema-valid JSON), never what the
//! model chooses to write: a hero always succeeds; a team succeeds unless it breaks a rule the
//! grammar cannot express, and then fails as a validation failure naming that rule.

use testkit as helpers;

use std::time::{Duration, Instant};

use helpers::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hero_and_team_jobs_against_the_local_model_are_stored_and_announced() {
    let Ok(base_url) = std::env::var("INSTRUCTD_TEST_LOCAL_LLM_URL") else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the real-model test (scripts/test.sh starts the model)");
        eprintln!("skipped: INSTRUCTD_TEST_LOCAL_LLM_URL is not set (scripts/test.sh sets it)");
        return;
    };
    let unused = wiremock::MockServer::start().await;
    let mut env = test_env(&unused, &create_database().await);
    env.insert("INSTRUCTD__LLM__BASE_URL".into(), base_url);
    env.insert("INSTRUCTD__LLM__TEMPERATURE".into(), "0".into());
    env.insert("INSTRUCTD__WORKER__CONCURRENCY".into(), "2".into());
    // The quickstart's settings for this server (scripts/up.sh uses the same file).
    let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/local-model.toml");
    let settings = instructd::config::Settings::load_from(Some(&quickstart), env).unwrap();
    let mut app = spawn_app_with(settings, unused).await;

    let started = Instant::now();
    let jobs = [
        ("hero", "Make a new superhero"),
        ("hero", "Make a hero who can fly"),
        ("hero", "Make a hero from the sea"),
        ("team", "Make a team of three heroes"),
        ("team", "Make a team of heroes that guards a city"),
    ];
    for (entity, prompt) in jobs {
        let mut request = request(entity, prompt);
        request["max_retries"] = json!(3);
        app.publish(&request).await;
    }
    let mut events = Vec::new();
    for _ in jobs {
        events.push(app.next_event_within(Duration::from_secs(300)).await);
    }
    let seconds = started.elapsed().as_secs_f64();

    let (mut calls, mut tokens) = (0, 0);
    for received in &events {
        let event = &received.event;
        calls += event.attempts;
        tokens += event.usage.total_tokens;
        eprintln!(
            "{} attempts={} tokens={} {:?}",
            received.routing_key, event.attempts, event.usage.total_tokens, event.error
        );
        match (event.entity.as_str(), &event.record) {
            ("hero", record) => {
                let record = record.as_ref().expect("a hero always succeeds: the grammar guarantees its schema");
                let id = record["id"].as_str().unwrap();
                assert_eq!(app.count(&format!("SELECT count(*) FROM hero WHERE id = '{id}'")).await, 1);
            }
            ("team", Some(record)) => {
                let id = record["id"].as_str().unwrap();
                let heroes = record["heroes"].as_array().unwrap().len() as i64;
                assert!((1..=10).contains(&heroes));
                assert_eq!(app.count(&format!("SELECT count(*) FROM team WHERE id = '{id}'")).await, 1);
                assert_eq!(app.count(&format!("SELECT count(*) FROM hero WHERE team_id = '{id}'")).await, heroes);
            }
            ("team", None) => {
                // Only what the grammar cannot express may fail it: an empty name or an age
                // out of range, re-asked until the budget ran out.
                let error = event.error.as_ref().unwrap();
                assert_eq!(error.kind, instructd::contract::ErrorKind::Validation, "{}", error.message);
                assert!(error.message.contains("name: must not be empty") || error.message.contains(".age: must be"));
            }
            (other, _) => panic!("unexpected entity {other}"),
        }
    }
    let succeeded = events.iter().filter(|r| r.event.record.is_some()).count();
    eprintln!(
        "local model: jobs={} succeeded={succeeded} calls={calls} tokens={tokens} seconds={seconds:.1}",
        jobs.len()
    );
    app.stop().await;
}
