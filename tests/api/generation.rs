//! The happy path and the re-ask loop.

use lapin::BasicProperties;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_becomes_one_hero_row_a_succeeded_job_and_an_event() {
    // Arrange: the model tries to set the server-owned id; it must be ignored.
    let mut app = spawn_app().await;
    let sneaky =
        r#"{"id": "00000000-0000-0000-0000-000000000001", "name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;
    answer_always(&app.llm, tool_call_completion("Hero", sneaky)).await;
    let request = request("hero", "Make a new superhero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();

    // Act
    app.publish(&request).await;
    let received = app.next_event().await;

    // Assert: the event
    assert_eq!(received.routing_key, "job.succeeded.hero");
    let event = received.event;
    assert_eq!(event.job_id, job_id);
    assert_eq!(event.entity, "hero");
    assert_eq!(event.attempts, 1);
    assert_eq!(event.usage.total_tokens, 120);
    assert_eq!(event.metadata, json!({"trace": "abc", "n": 1}));
    assert!(event.error.is_none());
    assert_eq!(received.properties.correlation_id().as_ref().unwrap().as_str(), job_id.to_string());
    let record = event.record.expect("a succeeded event carries the record");
    assert_eq!(record["name"], "Superman");
    assert_eq!(record["secret_name"], "Clark Kent");
    assert_eq!(record["age"], 30);

    // Assert: the row, with an id the worker generated
    let heroes = app.heroes().await;
    assert_eq!(heroes.len(), 1);
    assert_eq!(heroes[0].id.to_string(), record["id"].as_str().unwrap());
    assert_ne!(heroes[0].id.to_string(), "00000000-0000-0000-0000-000000000001");
    assert_eq!(heroes[0].name, "Superman");

    // Assert: the ledger, with the request as it was sent
    let job = app.job(job_id).await;
    assert_eq!(job.status, "succeeded");
    assert_eq!(job.request, request);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.record_id, Some(heroes[0].id));
    assert_eq!(job.usage.unwrap()["total_tokens"], 120);
    assert_eq!(job.responses.as_array().unwrap().len(), 1);
    assert_eq!(app.queued_requests().await, 0);

    // Assert: the call, in Instructor's tools mode
    let calls = app.llm_requests().await;
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call["model"], "fake-model");
    assert_eq!(call["tools"][0]["function"]["name"], "Hero");
    assert_eq!(
        call["tools"][0]["function"]["description"],
        "Correctly extracted `Hero` with all the required parameters with correct types"
    );
    let parameters = &call["tools"][0]["function"]["parameters"];
    assert!(parameters.get("title").is_none(), "the tool's parameters drop the top-level title");
    assert_eq!(parameters["required"], json!(["name", "secret_name"]));
    assert_eq!(call["tool_choice"], json!({"type": "function", "function": {"name": "Hero"}}));
    assert_eq!(call["messages"], json!([{"role": "user", "content": "Make a new superhero"}]));
    assert!(call.get("temperature").is_none(), "the provider's default temperature unless configured");
    let received = app.llm.received_requests().await.unwrap();
    let headers = &received[0].headers;
    assert_eq!(headers.get("authorization").unwrap(), "Bearer sk-test-key-0123456789");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
    assert_eq!(received[0].url.path(), "/v1/chat/completions");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_answer_is_re_asked_with_the_validation_error() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman"}"#)).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let request = request("hero", "Make a new superhero");

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.attempts, 2);
    assert_eq!(received.event.usage.total_tokens, 240, "usage is summed over both calls");
    assert_eq!(app.heroes().await.len(), 1);
    let job = app.job(received.event.job_id).await;
    assert_eq!(job.attempts, 2);
    assert_eq!(job.responses.as_array().unwrap().len(), 2);

    let calls = app.llm_requests().await;
    assert_eq!(calls.len(), 2);
    let first = &calls[0];
    let reask = &calls[1];
    assert_eq!(reask["tools"], first["tools"], "a re-ask resends the same tools");
    assert_eq!(reask["tool_choice"], first["tool_choice"]);
    let messages = reask["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    let assistant = &messages[1];
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["content"], "");
    let echoed = &assistant["tool_calls"][0];
    assert_eq!(echoed["function"]["arguments"], r#"{"name": "Superman"}"#, "the answer is echoed byte for byte");
    let tool = &messages[2];
    assert_eq!(tool["role"], "tool");
    assert_eq!(tool["tool_call_id"], echoed["id"]);
    assert_eq!(
        tool["content"],
        "Validation Error found:\nsecret_name: field required\nRecall the function correctly, fix the errors"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_re_asks_run_out_the_job_fails_with_kind_validation() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman", "age": "old"}"#)).await;
    let mut request = request("hero", "Make a new superhero");
    request["max_retries"] = json!(1);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let event = received.event;
    assert!(event.record.is_none());
    assert_eq!(event.attempts, 2, "one answer and one re-ask");
    let error = event.error.expect("a failed event carries the error");
    assert_eq!(error.kind, instructd::contract::ErrorKind::Validation);
    // Every violation at once, as the re-ask listed them.
    let (_, last) = error.message.split_once("last error: ").expect("the message quotes the last error");
    let mut lines: Vec<&str> = last.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, [r#"age: must be an integer, got "old""#, "secret_name: field required"], "{}", error.message);
    assert_eq!(app.llm_requests().await.len(), 2);
    assert!(app.heroes().await.is_empty());
    let job = app.job(event.job_id).await;
    assert_eq!(job.status, "failed");
    assert_eq!(job.error.unwrap()["kind"], "validation");
    assert_eq!(app.queued_requests().await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_and_reply_to_are_honoured() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let mut replies = listen(&app.channel, "amq.direct", &format!("unused-{}", Uuid::new_v4())).await;
    let reply_queue = replies.queue();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("corr-42".into())
        .with_reply_to(reply_queue.clone());

    app.publish_raw(&serde_json::to_vec(&request("hero", "Make a hero")).unwrap(), properties).await;
    let on_exchange = app.next_event().await;
    let on_reply_queue = next_message(&mut replies).await;

    assert_eq!(on_exchange.properties.correlation_id().as_ref().unwrap().as_str(), "corr-42");
    assert_eq!(on_reply_queue.properties.correlation_id().as_ref().unwrap().as_str(), "corr-42");
    assert_eq!(on_reply_queue.event.event_id, on_exchange.event.event_id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_fails_the_job_with_kind_llm_without_re_asking() {
    let mut app = spawn_app().await;
    let unauthorized = wiremock::ResponseTemplate::new(401)
        .set_body_json(json!({"error": {"message": "Incorrect API key provided: sk-test-key-0123456789"}}));
    respond_always(&app.llm, unauthorized).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, instructd::contract::ErrorKind::Llm);
    assert!(error.message.contains("401"), "{}", error.message);
    assert!(!error.message.contains("sk-test-key-0123456789"), "the key is scrubbed: {}", error.message);
    assert_eq!(app.llm_requests().await.len(), 1, "a 401 is not retried");
    app.stop().await;
}
