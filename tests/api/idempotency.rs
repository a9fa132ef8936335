//! The same job delivered twice.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_delivered_twice_stores_one_row_and_announces_twice() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman", "secret_name": "Clark Kent"}"#)).await;
    let request = request("hero", "Make a new superhero");

    app.publish(&request).await;
    let first = app.next_event().await;
    app.publish(&request).await;
    let second = app.next_event().await;

    assert_eq!(first.routing_key, "job.succeeded.hero");
    assert_eq!(second.routing_key, "job.succeeded.hero");
    assert_eq!(second.event.job_id, first.event.job_id);
    assert_eq!(second.event.record, first.event.record, "the second event repeats the stored record");
    assert_ne!(second.event.event_id, first.event.event_id);
    assert_eq!(app.heroes().await.len(), 1);
    assert_eq!(app.llm_requests().await.len(), 1, "a finished job is not generated again");
    assert_eq!(app.count("SELECT count(*) FROM generation_job").await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_delivered_at_once_store_one_row() {
    let mut app = spawn_app().await;
    // A slow model keeps the first copy in flight while the second one arrives.
    let slow = wiremock::ResponseTemplate::new(200)
        .set_body_json(tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#))
        .set_delay(std::time::Duration::from_millis(700));
    respond_always(&app.llm, slow).await;
    let request = request("hero", "Make a new superhero");

    app.publish(&request).await;
    app.publish(&request).await;
    let first = app.next_event().await;
    let second = app.next_event().await;

    assert_eq!(first.event.job_id, second.event.job_id);
    assert_eq!(first.event.record, second.event.record);
    assert_eq!(app.heroes().await.len(), 1);
    assert_eq!(app.llm_requests().await.len(), 1, "the copy waits for the claim instead of calling the model");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_job_id_gets_no_contradicting_event_and_a_duplicate_is_answered_from_the_row() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    // One at a time, so that events come in the order the requests were published.
    settings.worker.concurrency = 1;
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman", "secret_name": "Clark Kent"}"#)).await;
    let original = request("hero", "Make a new superhero");
    let job_id = original["job_id"].clone();
    app.publish(&original).await;
    let first = app.next_event().await;
    assert_eq!(first.routing_key, "job.succeeded.hero");

    // A malformed message that carries the finished job's id: dead-lettered, and no
    // `job.failed` event contradicts the job's row.
    app.publish(&serde_json::json!({"job_id": job_id, "entity": "hero", "messages": []})).await;
    // A well-formed duplicate naming another entity: answered with the job's own event, its
    // payload and its routing key as they were announced.
    let mut duplicate = request("team", "Make a team");
    duplicate["job_id"] = job_id.clone();
    app.publish(&duplicate).await;
    let again = app.next_event().await;
    assert_eq!(again.routing_key, "job.succeeded.hero", "not the duplicate's entity, nor a failure");
    assert_eq!(again.event.job_id, first.event.job_id);
    assert_eq!(again.event.entity, "hero");
    assert_eq!(again.event.record, first.event.record);
    assert_ne!(again.event.event_id, first.event.event_id);
    // Then an unrelated job: had the malformed message been announced, its event would come
    // before this one.
    let next = request("hero", "Make another");
    app.publish(&next).await;
    assert_eq!(app.next_event().await.event.job_id.to_string(), next["job_id"].as_str().unwrap());

    let dead = app.next_dead_letter().await;
    let reason = instructd::broker::publisher::header_text(dead.delivery.properties.headers(), "x-instructd-error");
    assert!(reason.unwrap().contains("messages: must not be empty"));
    assert_eq!(app.job(first.event.job_id).await.status, "succeeded", "the row is untouched");
    let outboxed = format!("SELECT count(*) FROM event_outbox WHERE job_id = '{}'", first.event.job_id);
    assert_eq!(app.count(&outboxed).await, 1, "answering a duplicate adds no outbox row");
    app.stop().await;
}
