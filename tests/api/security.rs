//! What a request may spend and what a model may write: limits enforced before any call,
//! the per-job token budget, and server-owned fields that stay server-owned.

use instructd::broker::publisher::{ERROR_HEADER, header_text};
use instructd::contract::ErrorKind;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::MockServer;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_a_limit_or_naming_a_model_not_allowed_is_rejected_before_any_call() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.allowed_models = vec!["fake-model-large".into()];
    settings.limits.max_messages = 3;
    settings.limits.max_content_bytes = 100;
    settings.limits.max_metadata_bytes = 64;
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#)).await;

    let user = |content: &str| json!({"role": "user", "content": content});
    let with = |field: &str, value: Value| {
        let mut request = request("hero", "Make a hero");
        request[field] = value;
        request
    };
    let cases = [
        (
            with("model", json!("gpt-4-most-expensive")),
            "model: `gpt-4-most-expensive` is not one of llm.allowed_models",
        ),
        (
            with("messages", json!([user("a"), user("b"), user("c"), user("d")])),
            "4 messages, over limits.max_messages (3)",
        ),
        (with("messages", json!([user("short"), user(&"x".repeat(101))])), "messages[1].content: 101 bytes"),
        (with("metadata", json!({"blob": "y".repeat(80)})), "over limits.max_metadata_bytes (64)"),
    ];
    for (request, reason) in &cases {
        app.publish(request).await;
        let dead = app.next_dead_letter().await;
        let why = header_text(dead.delivery.properties.headers(), ERROR_HEADER).expect("the reason header is set");
        assert!(why.contains(reason), "expected {reason:?} in {why:?}");
        let failed = app.next_event().await;
        assert_eq!(failed.routing_key, "job.failed.hero");
        let error = failed.event.error.expect("a failed event has an error");
        assert_eq!(error.kind, ErrorKind::InvalidRequest);
        assert!(error.message.contains(reason), "{}", error.message);
        if reason.contains("metadata") {
            assert_eq!(failed.event.metadata, Value::Null, "metadata over the limit is not echoed back");
        }
    }
    // Metadata over the limit is not echoed, whatever else is wrong with the request.
    let mut unknown = with("metadata", json!({"blob": "z".repeat(80)}));
    unknown["entity"] = json!("no_such_entity");
    let mut crowded = with("metadata", json!({"blob": "z".repeat(80)}));
    crowded["messages"] = json!([user("a"), user("b"), user("c"), user("d")]);
    for request in [unknown, crowded] {
        app.publish(&request).await;
        app.next_dead_letter().await;
        let failed = app.next_event().await;
        assert_eq!(failed.event.error.unwrap().kind, ErrorKind::InvalidRequest);
        assert_eq!(failed.event.metadata, Value::Null);
    }
    // Within the limit, it is.
    let mut small = with("metadata", json!({"tag": "x"}));
    small["entity"] = json!("no_such_entity");
    app.publish(&small).await;
    app.next_dead_letter().await;
    assert_eq!(app.next_event().await.event.metadata, json!({"tag": "x"}));
    assert!(app.llm_requests().await.is_empty(), "nothing was spent on a rejected request");

    // The models that are allowed: the configured one and the listed one.
    for model in ["fake-model", "fake-model-large"] {
        app.publish(&with("model", json!(model))).await;
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    }
    let calls = app.llm_requests().await;
    assert_eq!(
        (calls[0]["model"].as_str(), calls[1]["model"].as_str()),
        (Some("fake-model"), Some("fake-model-large"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_budget_stops_re_asking_and_fails_the_job_with_kind_llm() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    // Every fake call costs 120 tokens: the third call spends the budget.
    settings.llm.job_token_budget = 300;
    settings.llm.max_tokens = 100;
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "No secret name"}"#)).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(5);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.expect("a failed event has an error");
    assert_eq!(error.kind, ErrorKind::Llm);
    assert!(error.message.contains("token budget is spent (360 of llm.job_token_budget 300"), "{}", error.message);
    assert!(
        error.message.contains("secret_name: field required"),
        "the last validation error is kept: {}",
        error.message
    );
    assert_eq!(received.event.attempts, 3, "no call once the budget is spent, though re-asks were left");
    assert_eq!(received.event.usage.total_tokens, 360);
    let caps: Vec<_> = app.llm_requests().await.iter().map(|call| call["max_completion_tokens"].as_u64()).collect();
    assert_eq!(caps, [Some(100), Some(100), Some(60)], "each call's cap is held to what is left");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_team_ids_and_unknown_fields_in_an_answer_never_reach_the_rows() {
    let mut app = spawn_app().await;
    let planted = Uuid::new_v4();
    let foreign_team = Uuid::new_v4();
    let hero = json!({
        "id": planted, "team_id": foreign_team, "name": "Mallory", "secret_name": "M", "age": 30,
        "is_admin": true, "salary": 1_000_000
    });
    answer_once(&app.llm, tool_call_completion("Hero", &hero.to_string())).await;

    app.publish(&request("hero", "Make a hero. Set its id to the one I give and make it an admin.")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    let record = received.event.record.expect("the hero");
    let keys: Vec<&str> = record.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "name", "secret_name", "age"], "nothing outside the table; team_id is not set");
    assert_ne!(record["id"], json!(planted), "the server's id, not the model's");
    let rows = app.heroes().await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].id.to_string(), rows[0].team_id), (record["id"].as_str().unwrap().to_owned(), None));
    assert_eq!(app.count(&format!("SELECT count(*) FROM hero WHERE id = '{planted}'")).await, 0);

    // Inside a team: every hero belongs to the team the server created, with the server's ids.
    let team = json!({
        "id": planted, "name": "Intruders", "headquarters": "Somewhere", "owner": "mallory",
        "heroes": [{"id": planted, "team_id": foreign_team, "name": "Eve", "secret_name": "E", "admin": true}]
    });
    answer_once(&app.llm, tool_call_completion("Team", &team.to_string())).await;
    app.publish(&request("team", "Make a team")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.team");
    let record = received.event.record.expect("the team");
    let team_id = record["id"].as_str().unwrap();
    assert_ne!(team_id, planted.to_string());
    assert!(record.get("owner").is_none() && record["heroes"][0].get("admin").is_none(), "{record}");
    assert_eq!(record["heroes"][0]["team_id"], team_id);
    assert_ne!(record["heroes"][0]["id"], json!(planted));
    assert_eq!(app.count(&format!("SELECT count(*) FROM hero WHERE team_id = '{team_id}'")).await, 1);
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM hero WHERE team_id = '{foreign_team}' OR id = '{planted}'")).await,
        0
    );
    assert_eq!(app.count(&format!("SELECT count(*) FROM team WHERE id = '{planted}'")).await, 0);
    app.stop().await;
}
