//! Nested entities: one call, a graph of rows — a team and its heroes in one transaction.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

fn team_answer(heroes: usize) -> String {
    let heroes: Vec<Value> = (0..heroes)
        .map(|i| json!({"name": format!("Hero {i}"), "secret_name": format!("Secret {i}"), "age": 20 + i}))
        .collect();
    json!({"name": "Preventers", "headquarters": "Sharp Tower", "heroes": heroes}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_and_its_heroes_are_stored_together_with_server_ids() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Team", &team_answer(3))).await;
    let request = request("team", "Make a team of three heroes");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.team");
    let record = received.event.record.expect("the team");
    let team_id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["name"], "Preventers");
    let heroes = record["heroes"].as_array().unwrap();
    assert_eq!(heroes.len(), 3);
    assert!(heroes.iter().all(|h| h["team_id"] == team_id.as_str() && h["id"].is_string()));
    assert_eq!(app.count(&format!("SELECT count(*) FROM team WHERE id = '{team_id}'")).await, 1);
    assert_eq!(app.count(&format!("SELECT count(*) FROM hero WHERE team_id = '{team_id}'")).await, 3);
    assert_eq!(app.job(job_id).await.record_id.unwrap().to_string(), team_id);
    let tool = &app.llm_requests().await[0]["tools"][0]["function"];
    assert_eq!(tool["name"], "Team");
    assert_eq!(tool["parameters"]["$defs"]["Hero"]["title"], "Hero");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_with_eleven_heroes_is_re_asked() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, tool_call_completion("Team", &team_answer(11))).await;
    answer_always(&app.llm, tool_call_completion("Team", &team_answer(2))).await;

    app.publish(&request("team", "Make a big team")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.team");
    assert_eq!(received.event.attempts, 2);
    assert_eq!(received.event.usage.total_tokens, 240, "usage summed over the re-ask");
    let calls = app.llm_requests().await;
    let error = calls[1]["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(error.contains("heroes: must have at most 10 items, got 11"), "{error}");
    assert_eq!(app.count("SELECT count(*) FROM hero").await, 2, "nothing of the rejected answer is stored");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_constraint_of_a_team_is_listed_in_one_re_ask() {
    let mut app = spawn_app().await;
    // Four constraints of the schema the model was sent, broken at once.
    let broken = json!({"name": "", "headquarters": "HQ", "heroes": [
        {"name": "A", "secret_name": "B", "age": 151},
        {"name": "C", "age": -1},
    ]});
    answer_once(&app.llm, tool_call_completion("Team", &broken.to_string())).await;
    answer_always(&app.llm, tool_call_completion("Team", &team_answer(1))).await;

    app.publish(&request("team", "Make a team")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.team");
    assert_eq!(received.event.attempts, 2, "one re-ask for all four");
    let calls = app.llm_requests().await;
    let reask = calls[1]["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_owned();
    let listed = [
        "name: must not be empty",
        "heroes[0].age: must be at most 150, got 151",
        "heroes[1].secret_name: field required",
        "heroes[1].age: must be at least 0, got -1",
    ];
    for violation in listed {
        assert!(reask.lines().any(|line| line == violation), "{violation:?} is not a line of {reask}");
    }
    // The limits the answer broke are the ones the model was shown.
    let schema = &calls[0]["tools"][0]["function"]["parameters"];
    assert_eq!(schema["properties"]["name"]["minLength"], 1);
    assert_eq!(schema["$defs"]["Hero"]["properties"]["age"]["anyOf"][0]["maximum"], 150);
    assert_eq!(schema["properties"]["heroes"]["maxItems"], 10);
    app.stop().await;
}
