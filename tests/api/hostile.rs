//! Hostile input, through the real broker: oversized fields, forged broker headers, NUL
//! characters in properties and in model answers, an absurd `Retry-After`. None of it may
//! stall the daemon or other jobs; every text instructd passes on is bounded and clean; each
//! job reaches an outcome.

use std::time::Duration;

use instructd::broker::publisher::{ERROR_HEADER, HEADERS_DROPPED_HEADER, header_text};
use instructd::contract::ErrorKind;
use instructd::text::MAX_MESSAGE_BYTES;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::json;
use uuid::Uuid;
use wiremock::ResponseTemplate;

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

fn headers(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        table.insert(ShortString::from(name), value);
    }
    table
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_dead_lettered_with_bounded_reasons_and_stall_no_one() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let huge = "x".repeat(200_000);
    let message = |content: &str| json!([{"role": "user", "content": content}]);
    // Each one quotes a 200 KB value into its reason (a header over RabbitMQ's 128 KiB frame
    // used to close the publishing connection, over and over).
    let hostile = [
        json!({"job_id": huge, "entity": "hero", "messages": message("a")}),
        json!({"job_id": {"nested": huge}, "entity": "hero", "messages": message("a")}),
        json!({"entity": huge, "messages": message("a")}),
        json!({"entity": "hero", "messages": [{"role": huge, "content": "a"}]}),
        json!({"entity": "hero", "messages": message("a"), "model": huge}),
        json!({"entity": "hero", "messages": message("a"), "max_retries": huge}),
    ];
    let mut good = Vec::new();
    for (index, body) in hostile.iter().enumerate() {
        app.publish(body).await;
        for _ in 0..3 {
            let request = request("hero", &format!("Make hero {index}"));
            good.push(request["job_id"].as_str().unwrap().to_owned());
            app.publish(&request).await;
        }
    }
    // And headers that fill most of a frame on a message that is rejected: its copy must still
    // fit beside the reason.
    let crowded = headers(vec![("x-app-trace", long(&"t".repeat(100_000)))]);
    app.publish_raw(br#"{"entity": "hero"}"#, json_properties().with_headers(crowded)).await;

    let mut succeeded = 0;
    let mut failed = 0;
    for _ in 0..(good.len() + hostile.len() + 1) {
        let received = app.next_event().await;
        assert!(received.body.len() < 20_000, "an event is bounded: {} bytes", received.body.len());
        match received.event.error {
            None => {
                assert!(good.contains(&received.event.job_id.to_string()));
                succeeded += 1;
            }
            Some(error) => {
                assert_eq!(error.kind, ErrorKind::InvalidRequest);
                assert!(error.message.len() <= MAX_MESSAGE_BYTES, "{} bytes", error.message.len());
                failed += 1;
            }
        }
    }
    assert_eq!((succeeded, failed), (good.len(), hostile.len() + 1));
    for _ in 0..(hostile.len() + 1) {
        let dead = app.next_dead_letter().await;
        let headers = dead.delivery.properties.headers();
        let reason = header_text(headers, ERROR_HEADER).expect("a reason");
        assert!(reason.len() <= MAX_MESSAGE_BYTES, "the reason is bounded: {} bytes", reason.len());
        if let Some(note) = header_text(headers, HEADERS_DROPPED_HEADER) {
            assert!(note.contains("were not kept"), "{note}");
            assert!(header_text(headers, "x-app-trace").is_none());
        }
    }
    assert_eq!(app.message_count(&app.settings.broker.dead_letter_queue).await, 0, "each dead-lettered once");
    let metrics = app.get("/metrics").await.1;
    assert_eq!(metric_sample(&metrics, "instructd_dead_letters_total", &[]), Some(7.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delivery_count_is_ignored_and_copies_lose_the_brokers_headers() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    // A fresh request that claims 50 earlier deliveries: only the broker's own count, on a
    // redelivery, is believed.
    let forged = headers(vec![("x-delivery-count", AMQPValue::LongLongInt(50))]);
    let body = serde_json::to_vec(&request("hero", "Make a hero")).unwrap();
    app.publish_raw(&body, json_properties().with_headers(forged)).await;
    let received = app.next_event().await;
    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(app.llm_requests().await.len(), 1, "the model was asked");

    // A rejected message's copy keeps the publisher's headers, not the broker's: replayed
    // from the dead-letter queue, it starts afresh.
    let death = FieldArray::from(vec![AMQPValue::FieldTable(headers(vec![("count", AMQPValue::LongLongInt(3))]))]);
    let broker_made = headers(vec![
        ("x-delivery-count", AMQPValue::LongLongInt(7)),
        ("x-death", AMQPValue::FieldArray(death)),
        ("x-first-death-queue", long("somewhere")),
        ("x-last-death-reason", long("expired")),
        ("x-tenant", long("acme")),
    ]);
    app.publish_raw(br#"{"entity": "hero", "messages": []}"#, json_properties().with_headers(broker_made)).await;
    assert_eq!(app.next_event().await.routing_key, "job.failed.hero");
    // Consumed, not fetched: a quorum queue writes its own count on what `basic.get` returns,
    // but hands a consumer the headers as they were published.
    let mut dead_letters = app
        .channel
        .basic_consume(
            app.settings.broker.dead_letter_queue.as_str().into(),
            "test-dlq".into(),
            lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dead = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut dead_letters))
        .await
        .expect("a dead letter")
        .unwrap()
        .unwrap();
    let headers = dead.properties.headers().clone().unwrap_or_default();
    let names: Vec<&str> = headers.inner().keys().map(|name| name.as_str()).collect();
    assert_eq!(names, ["x-instructd-error", "x-tenant"], "only the publisher's headers, and the reason");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_correlation_id_or_reply_to_is_rejected_and_still_reaches_an_outcome() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let body = |job_id: Uuid| {
        serde_json::to_vec(&json!({"job_id": job_id, "entity": "hero", "messages": [{"role": "user", "content": "x"}]}))
            .unwrap()
    };

    let first = Uuid::new_v4();
    app.publish_raw(&body(first), json_properties().with_correlation_id("abc\0def".into())).await;
    let received = app.next_event().await;
    assert_eq!(received.event.job_id, first);
    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(error.message.contains("correlation_id contains a NUL character"), "{}", error.message);
    let correlation = received.properties.correlation_id().as_ref().map(|c| c.to_string());
    assert_eq!(correlation.as_deref(), Some("abc\u{FFFD}def"), "stored and sent without the NUL");
    assert_eq!(app.job(first).await.status, "failed");

    let second = Uuid::new_v4();
    app.publish_raw(&body(second), json_properties().with_reply_to("replies\0".into())).await;
    let received = app.next_event().await;
    assert_eq!(received.event.job_id, second);
    assert!(received.event.error.unwrap().message.contains("reply_to contains a NUL character"));
    assert_eq!(app.job(second).await.status, "failed");

    for _ in 0..2 {
        app.next_dead_letter().await;
    }
    assert!(app.llm_requests().await.is_empty(), "nothing was spent on them");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_a_nul_is_re_asked_and_kept_with_the_nul_written_out() {
    let mut app = spawn_app().await;
    // The arguments say `\u0000` (a NUL once parsed); the message's text holds a real one.
    let with_nul = r#"{"name": "Super\u0000man", "secret_name": "Clark Kent"}"#;
    let mut completion = tool_call_completion("Hero", with_nul);
    completion["choices"][0]["message"]["content"] = json!("thinking\u{0}aloud");
    answer_once(&app.llm, completion).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    let request = request("hero", "Make a hero");
    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.attempts, 2, "re-asked, not failed at the insert");
    let calls = app.llm_requests().await;
    let reask = calls[1]["messages"].to_string();
    assert!(reask.contains("name: must not contain the NUL character"), "{reask}");
    let job = app.job(received.event.job_id).await;
    let responses = job.responses.to_string();
    assert!(responses.contains(r"thinking\\u0000aloud"), "the raw answer is kept, its NUL written out: {responses}");
    assert_eq!(app.heroes().await[0].name, "Superman");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_after_is_clamped_and_panics_nothing() {
    let mut app = spawn_app().await;
    for retry_after in ["1e20", "NaN", "-5", "99999999999999999999"] {
        let limited = ResponseTemplate::new(429).insert_header("retry-after", retry_after);
        respond_once(&app.llm, limited).await;
    }
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event_within(Duration::from_secs(60)).await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(app.llm_requests().await.len(), 5);
    let metrics = app.get("/metrics").await.1;
    assert_eq!(metric_sample(&metrics, "instructd_job_panics_total", &[]), Some(0.0));
    app.stop().await;
}
