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
