//! The console's actions: replay (one job, or every job of a filter) and the dead letters'
//! listing, replay and purge; through the API, the console's forms and the command line.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use sea_orm::ConnectionTrait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::console::openapi;
use crate::helpers::*;

/// Whether `value` is `docs/openapi.json`'s `schema`.
fn documented(schema: &str, value: &Value) -> bool {
    let validator = openapi(schema);
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "not a {schema}: {errors:?}\n{value:#}");
    true
}

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent"}"#;
const TOKEN: &str = "console-actions-token-0123456789";

/// A daemon whose console has the admin token, answering `FAILME` prompts wrongly and the
/// others well.
async fn spawn_console() -> TestApp {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.http.admin_token = SecretString::from(TOKEN);
    settings.llm.allowed_models = vec!["other-model".into()];
    let app = spawn_app_with(settings, llm).await;
    Mock::given(method("POST"))
        .and(body_string_contains("FAILME"))
        .respond_with(ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", r#"{"name": "X"}"#)))
        .with_priority(2)
        .mount(&app.llm)
        .await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    app
}

/// POSTs `body` (JSON) to `path`, as the admin when `bearer`: the status and the JSON answer.
async fn post(app: &TestApp, path: &str, body: Value, bearer: bool) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().post(format!("http://{}{path}", app.http_addr)).json(&body);
    if bearer {
        request = request.header(AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let (status, body) = app.get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs a job that fails validation (no re-ask): its id.
async fn failed_job(app: &mut TestApp) -> Uuid {
    let mut request = request("hero", "FAILME then fix it");
    request["max_retries"] = json!(0);
    app.publish(&request).await;
    let received = app.next_event().await;
    assert_eq!(received.routing_key, "job.failed.hero");
    received.event.job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_job_runs_again_as_a_new_job_that_names_the_one_it_replays() {
    let mut app = spawn_console().await;
    let old = failed_job(&mut app).await;

    let (status, refused) = post(&app, &format!("/api/jobs/{old}/replay"), json!({}), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an action needs the token, on loopback too: {refused}");
    let (status, error) = post(&app, &format!("/api/jobs/{old}/replay"), json!({"model": "gpt-9"}), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error["error"].as_str().unwrap().starts_with("model: `gpt-9` is not"), "{error}");
    let (status, error) = post(&app, &format!("/api/jobs/{old}/replay"), json!({"max_retries": 99}), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(documented("Error", &error));
    let (status, _) = post(&app, &format!("/api/jobs/{}/replay", Uuid::new_v4()), json!({}), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The same prompt, with a model that answers well this time (the prompt is kept).
    Mock::given(method("POST"))
        .and(body_string_contains("other-model"))
        .respond_with(ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", GOOD)))
        .with_priority(1)
        .mount(&app.llm)
        .await;
    let (status, replayed) =
        post(&app, &format!("/api/jobs/{old}/replay"), json!({"model": "other-model", "max_retries": 1}), true).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert!(documented("Replayed", &replayed));
    assert_eq!(replayed["replay_of"], old.to_string());
    let new: Uuid = replayed["job_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new, old);
    let received = app.next_event().await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (new, "job.succeeded.hero"));

    let replay = get_json(&app, &format!("/api/jobs/{new}")).await;
    assert_eq!(replay["replay_of"], old.to_string());
    assert_eq!(replay["request"]["messages"][0]["content"], "FAILME then fix it");
    assert_eq!(
        (replay["request"]["model"].as_str(), replay["request"]["max_retries"].as_u64()),
        (Some("other-model"), Some(1))
    );
    let original = get_json(&app, &format!("/api/jobs/{old}")).await;
    assert_eq!(original["replays"][0]["job_id"], new.to_string());
    assert_eq!(original["status"], "failed", "the original keeps its outcome");
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(metric_sample(&metrics, "instructd_console_actions_total", &[("action", "replay")]), Some(1.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_job_of_a_filter_is_replayed_at_once() {
    let mut app = spawn_console().await;
    let failed = [failed_job(&mut app).await, failed_job(&mut app).await];
    app.publish(&request("hero", "Make a hero")).await;
    app.next_event().await;

    let (status, answer) = post(&app, "/api/jobs/replay?status=failed&limit=10", json!({}), true).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let mut replayed: Vec<String> =
        answer["replayed"].as_array().unwrap().iter().map(|r| r["replay_of"].as_str().unwrap().to_owned()).collect();
    replayed.sort();
    let mut expected: Vec<String> = failed.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(replayed, expected, "the failed jobs, not the one that succeeded");
    // They fail again (the same prompt), as new jobs.
    for _ in 0..2 {
        let received = app.next_event().await;
        assert!(!failed.contains(&received.event.job_id));
    }
    let (status, error) = post(&app, "/api/jobs/replay?status=failed&limit=5000", json!({}), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["error"].as_str().unwrap().starts_with("limit: must be a whole number from 1 to 1000"), "{error}");
    let (status, answer) = post(&app, "/api/jobs/replay?status=succeeded&limit=1000", json!({}), true).await;
    assert_eq!((status, answer["replayed"].as_array().map(Vec::len)), (StatusCode::ACCEPTED, Some(1)), "{answer}");
    app.next_event().await;
    app.stop().await;
}

/// Puts `body` in the DLQ as RabbitMQ would after too many deliveries.
async fn dead_letter(app: &TestApp, body: &[u8]) {
    let mut death = FieldTable::default();
    death.insert("queue".into(), AMQPValue::LongString(LongString::from(app.settings.broker.request_queue.as_str())));
    death.insert("reason".into(), AMQPValue::LongString(LongString::from("delivery_limit")));
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(20));
    let properties = BasicProperties::default().with_content_type("application/json".into()).with_headers(headers);
    app.channel
        .basic_publish(
            "".into(),
            app.settings.broker.dead_letter_queue.as_str().into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_with_their_reasons_moved_back_to_run_and_purged() {
    let mut app = spawn_console().await;
    let old = Uuid::new_v4();
    let valid = json!({"job_id": old, "entity": "hero", "messages": [{"role": "user", "content": "Make a hero"}]});
    dead_letter(&app, valid.to_string().as_bytes()).await;
    // One the daemon dead-letters itself, with its reason.
    app.publish_raw(b"<not json>", BasicProperties::default()).await;
    assert_eq!(app.next_event().await.routing_key, "job.failed.unknown", "the garbage's failure");
    assert!(wait_for(|| async { get_json(&app, "/api/dead-letters").await["total"] == 2 }).await);

    let listed = get_json(&app, "/api/dead-letters").await;
    assert!(documented("DeadLetters", &listed));
    let letters = listed["dead_letters"].as_array().unwrap();
    let by_job = letters.iter().find(|letter| letter["job_id"] == old.to_string()).expect("the valid request");
    assert_eq!(
        by_job["reason"],
        format!("dead-lettered by RabbitMQ from {}: delivery_limit", app.settings.broker.request_queue)
    );
    let garbage = letters.iter().find(|letter| letter["first_bytes"] == "<not json>").expect("the garbage");
    assert!(garbage["reason"].as_str().unwrap().starts_with("the body is not JSON: "), "{garbage}");
    assert_eq!(garbage["size"], 10);
    // Listing leaves them in the queue, and in their order, however often it is done (and never
    // hands one back unacknowledged, which a quorum queue would count as a failed delivery).
    for _ in 0..3 {
        let again = get_json(&app, "/api/dead-letters").await;
        assert_eq!(again["dead_letters"], listed["dead_letters"]);
    }

    let (status, _) = post(&app, "/api/dead-letters/purge", json!({"all": true}), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, error) = post(&app, "/api/dead-letters/replay", json!({}), true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    let (status, moved) = post(&app, "/api/dead-letters/replay", json!({"ids": [by_job["id"]]}), true).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let moved = &moved["replayed"][0];
    assert!(documented("Moved", moved));
    assert_eq!(moved["replay_of"], old.to_string());
    let new: Uuid = moved["job_id"].as_str().unwrap().parse().unwrap();
    let received = app.next_event().await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (new, "job.succeeded.hero"));
    assert_eq!(get_json(&app, &format!("/api/jobs/{new}")).await["replay_of"], old.to_string());

    let listed = get_json(&app, "/api/dead-letters").await;
    assert_eq!(listed["total"], 1, "{listed}");
    let (status, purged) = post(&app, "/api/dead-letters/purge", json!({"ids": [garbage["id"]]}), true).await;
    assert_eq!((status, purged), (StatusCode::OK, json!({"count": 1, "ids": [garbage["id"]]})));
    assert_eq!(app.message_count(&app.settings.broker.dead_letter_queue).await, 0);
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(
        metric_sample(&metrics, "instructd_console_actions_total", &[("action", "dead_letter_replay")]),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&metrics, "instructd_console_actions_total", &[("action", "dead_letter_purge")]),
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consoles_forms_act_for_a_signed_in_browser_and_only_with_their_csrf_token() {
    let mut app = spawn_console().await;
    let old = failed_job(&mut app).await;
    let base = format!("http://{}", app.http_addr);
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let form = |pairs: &[(&str, &str)]| {
        let mut body = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs {
            body.append_pair(name, value);
        }
        body.finish()
    };

    // On loopback, anyone may look, and is told how to act.
    let (_, page) = app.get(&format!("/jobs/{old}")).await;
    assert!(page.contains("Sign in") && !page.contains("name=\"csrf\""), "{page}");

    let signed_in = client
        .post(format!("{base}/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("token", TOKEN)]))
        .send()
        .await
        .unwrap();
    let session = signed_in.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page =
        client.get(format!("{base}/jobs/{old}")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
    let csrf =
        page.split("name=\"csrf\" value=\"").nth(1).and_then(|rest| rest.split('"').next()).expect("a csrf field");
    assert!(page.contains("Replay as a new job"), "{page}");

    let submit = async |session: Option<&str>, csrf: &str| {
        let mut request = client
            .post(format!("{base}/jobs/{old}/replay"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&[("csrf", csrf), ("model", ""), ("max_retries", "")]));
        if let Some(session) = session {
            request = request.header(COOKIE, session);
        }
        request.send().await.unwrap()
    };
    assert_eq!(submit(Some(&session), "forged").await.status(), StatusCode::FORBIDDEN, "a cross-site post");
    assert_eq!(submit(None, csrf).await.status(), StatusCode::FORBIDDEN, "no session");
    let replayed = submit(Some(&session), csrf).await;
    assert_eq!(replayed.status(), StatusCode::SEE_OTHER);
    let location = replayed.headers()[LOCATION].to_str().unwrap().to_owned();
    let new: Uuid = location.strip_prefix("/jobs/").unwrap().parse().unwrap();
    assert_eq!(app.next_event().await.event.job_id, new);
    app.stop().await;
}

/// Runs `instructd ARGS` against the test's broker and database: exit code, stdout, stderr.
async fn command(app: &TestApp, args: &[&str]) -> (Option<i32>, String, String) {
    let output = app
        .instructd_command()
        .env("INSTRUCTD__DATABASE__URL", app.settings.database.url.expose_secret())
        .args(args)
        .output()
        .await
        .expect("instructd runs");
    (output.status.code(), String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructd_jobs_replay_and_dlq_act_as_the_console_does() {
    let mut app = spawn_console().await;
    let old = failed_job(&mut app).await;

    let (code, stdout, stderr) = command(&app, &["jobs", "replay", &old.to_string()]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let new: Uuid = stdout.split('\t').next().unwrap().parse().unwrap();
    assert!(stdout.contains(&format!("replays {old}")), "{stdout}");
    assert_eq!(app.next_event().await.event.job_id, new);
    let (code, _, stderr) = command(&app, &["jobs", "replay", &old.to_string(), "--model", "gpt-9"]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("--model: `gpt-9` is not"), "{stderr}");

    dead_letter(&app, b"\x1b[2Jgarbage").await;
    let (code, stdout, stderr) = command(&app, &["dlq", "list"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("delivery_limit") && !stdout.contains('\u{1b}'), "{stdout:?}");
    assert!(stderr.contains("1 dead letter(s) in all"), "{stderr}");
    let (code, _, stderr) = command(&app, &["dlq", "purge", "--all"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("1 dead letter(s) purged"), "{stderr}");
    assert_eq!(app.message_count(&app.settings.broker.dead_letter_queue).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_abandons_its_model_call_and_ends_with_kind_cancelled() {
    let mut app = spawn_console().await;
    // A model that takes far longer than the test waits.
    let slow = ResponseTemplate::new(200)
        .set_body_json(tool_call_completion("Hero", GOOD))
        .set_delay(std::time::Duration::from_secs(50));
    Mock::given(method("POST"))
        .and(body_string_contains("SLOW"))
        .respond_with(slow)
        .with_priority(1)
        .mount(&app.llm)
        .await;
    let request = request("hero", "SLOW hero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();
    app.publish(&request).await;
    assert!(wait_for(|| async { !app.llm_requests().await.is_empty() }).await, "the model call is out");

    let (status, cancel) = post(&app, &format!("/api/jobs/{job_id}/cancel"), json!({}), true).await;
    assert_eq!((status, &cancel), (StatusCode::ACCEPTED, &json!({"outcome": "requested"})));
    assert!(documented("Cancel", &cancel));
    let received = app.next_event_within(std::time::Duration::from_secs(20)).await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (job_id, "job.failed.hero"));
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, instructd::contract::ErrorKind::Cancelled);
    assert!(error.message.contains("model call in flight was abandoned"), "{}", error.message);
    let job = get_json(&app, &format!("/api/jobs/{job_id}")).await;
    assert_eq!((job["status"].as_str(), job["error"]["kind"].as_str()), (Some("failed"), Some("cancelled")));
    assert!(job["cancel_requested_at"].is_string());
    assert!(app.heroes().await.is_empty());

    let (status, again) = post(&app, &format!("/api/jobs/{job_id}/cancel"), json!({}), true).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(again["error"].as_str().unwrap().contains("already finished (failed)"), "{again}");
    let (status, _) = post(&app, &format!("/api/jobs/{}/cancel", Uuid::new_v4()), json!({}), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(metric_sample(&metrics, "instructd_console_actions_total", &[("action", "cancel")]), Some(1.0));
    assert_eq!(
        metric_sample(&metrics, "instructd_jobs_total", &[("entity", "hero"), ("outcome", "cancelled")]),
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_delivery_cancelled_ends_at_once_and_its_delivery_is_answered_from_it() {
    let mut app = spawn_console().await;
    let request = request("hero", "Make a hero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();
    // As a job handed back (its provider was down) leaves its row: running, held by no worker.
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO generation_job (job_id, entity, status, attempts, request)
             VALUES ('{job_id}', 'hero', 'running', 0, '{}'::jsonb)",
            request.to_string().replace('\'', "''")
        ))
        .await
        .unwrap();

    let (status, cancel) = post(&app, &format!("/api/jobs/{job_id}/cancel"), json!({}), true).await;
    assert_eq!((status, cancel), (StatusCode::ACCEPTED, json!({"outcome": "cancelled"})));
    let received = app.next_event().await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (job_id, "job.failed.hero"));
    assert_eq!(received.event.error.as_ref().unwrap().kind, instructd::contract::ErrorKind::Cancelled);
    assert_eq!(received.event.metadata, request["metadata"]);

    // Its delivery, when it comes back, is answered from the row: no call, the same outcome
    // (under an event id of its own, as every answer to a duplicate).
    app.publish(&request).await;
    let again = app.next_event().await;
    assert_eq!((again.event.job_id, again.routing_key.as_str()), (job_id, "job.failed.hero"));
    assert_eq!(again.event.error, received.event.error);
    assert!(app.llm_requests().await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_its_worker_let_go_of_it_ends_when_claimed_again_without_a_call() {
    let mut app = spawn_console().await;
    let request = request("hero", "Make a hero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();
    // A cancel asked while a worker held it, which then deferred it (provider down): the mark
    // stays on a row no worker holds.
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO generation_job (job_id, entity, status, attempts, request, cancel_requested_at)
             VALUES ('{job_id}', 'hero', 'running', 0, '{}'::jsonb, now())",
            request.to_string().replace('\'', "''")
        ))
        .await
        .unwrap();

    app.publish(&request).await;
    let received = app.next_event().await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (job_id, "job.failed.hero"));
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, instructd::contract::ErrorKind::Cancelled);
    assert_eq!(error.message, "cancelled by an operator before its next model call");
    assert!(app.llm_requests().await.is_empty(), "no call once it was cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_in_the_queue_cancelled_by_its_job_id_ends_when_it_arrives_without_a_call() {
    let mut app = spawn_console().await;
    let request = request("hero", "Make a hero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();

    let (status, error) = post(&app, &format!("/api/jobs/{job_id}/cancel"), json!({}), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error["error"].as_str().unwrap().contains("queued=true"), "{error}");
    let (status, cancel) = post(&app, &format!("/api/jobs/{job_id}/cancel?queued=true"), json!({}), true).await;
    assert_eq!((status, cancel), (StatusCode::ACCEPTED, json!({"outcome": "queued"})));

    app.publish(&request).await;
    let received = app.next_event().await;
    assert_eq!((received.event.job_id, received.routing_key.as_str()), (job_id, "job.failed.hero"));
    assert_eq!(received.event.error.unwrap().kind, instructd::contract::ErrorKind::Cancelled);
    assert!(app.llm_requests().await.is_empty());
    let job = get_json(&app, &format!("/api/jobs/{job_id}")).await;
    assert_eq!((job["entity"].as_str(), job["status"].as_str()), (Some("hero"), Some("failed")));
    assert_eq!(job["request"], request, "the request, as it arrived");
    app.stop().await;
}
