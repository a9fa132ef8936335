//! Messages that can never succeed go to the dead-letter queue with their reason.

use instructd::broker::publisher::{ERROR_HEADER, header_text};
use lapin::BasicProperties;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_work_goes_on() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#)).await;
    let json_props = || BasicProperties::default().with_content_type("application/json".into());
    let message_id = Uuid::new_v4();
    let cases: Vec<(Vec<u8>, BasicProperties, &str, &str)> = vec![
        (
            b"this is not json".to_vec(),
            json_props().with_message_id(message_id.to_string().into()),
            "the body is not JSON",
            "job.failed.unknown",
        ),
        (
            serde_json::to_vec(&request("no_such_entity", "Make something")).unwrap(),
            json_props(),
            "unknown entity `no_such_entity` (known: hero, team)",
            "job.failed.unknown",
        ),
        (
            serde_json::to_vec(&json!({"job_id": Uuid::new_v4(), "entity": "hero", "messages": []})).unwrap(),
            json_props(),
            "messages: must not be empty",
            "job.failed.hero",
        ),
        (
            serde_json::to_vec(&json!({"entity": "hero", "messages": [{"role": "robot", "content": "x"}]})).unwrap(),
            json_props(),
            "not a generation request",
            "job.failed.hero",
        ),
        (
            serde_json::to_vec(&json!({"entity": "hero", "messages": [{"role": "user", "content": "a\u{0}b"}]}))
                .unwrap(),
            json_props(),
            "the request contains a NUL character (\\u0000), which Postgres cannot store",
            "job.failed.hero",
        ),
    ];

    for (body, properties, reason, routing_key) in &cases {
        app.publish_raw(body, properties.clone()).await;
        let dead = app.next_dead_letter().await;
        assert_eq!(&dead.delivery.data, body, "the dead letter is the original message");
        let why = header_text(dead.delivery.properties.headers(), ERROR_HEADER).expect("the reason header is set");
        assert!(why.contains(reason), "expected {reason:?} in {why:?}");
        let failed = app.next_event().await;
        assert_eq!(&failed.routing_key, routing_key);
        let error = failed.event.error.expect("a failed event has an error");
        assert_eq!(error.kind, instructd::contract::ErrorKind::InvalidRequest);
        assert!(error.message.contains(reason));
    }
    // The message id stood in for the missing job id.
    assert_eq!(app.job(message_id).await.status, "failed");

    // The daemon is still consuming.
    app.publish(&request("hero", "Make a hero")).await;
    let ok = app.next_event().await;
    assert_eq!(ok.routing_key, "job.succeeded.hero");
    assert_eq!(app.heroes().await.len(), 1);
    assert_eq!(app.queued_requests().await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_input_is_dead_lettered_while_good_requests_are_stored() {
    let app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#)).await;
    let props = || BasicProperties::default().with_content_type("application/json".into());
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random_bytes = |n: usize| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
    };
    let too_big = app.settings.broker.max_message_bytes + 1;
    let (mut bad, mut good) = (0, 0);
    for i in 0..250 {
        let body: Vec<u8> = match i % 6 {
            0 => random_bytes(64 + i),
            1 => br#"{"entity": "hero", "messages": [{"role": "user", "con"#.to_vec(),
            2 => serde_json::to_vec(&json!({"entity": 7, "messages": "many"})).unwrap(),
            3 => serde_json::to_vec(
                &json!({"entity": "hero", "messages": [{"role": "user", "content": "x".repeat(too_big)}]}),
            )
            .unwrap(),
            4 => serde_json::to_vec(&request(&format!("unknown-{i}"), "x")).unwrap(),
            _ => serde_json::to_vec(&request("hero", "Make a hero")).unwrap(),
        };
        if i % 6 == 5 {
            good += 1;
        } else {
            bad += 1;
        }
        app.publish_raw(&body, props()).await;
    }

    let heroes_stored = wait_for(|| async { app.heroes().await.len() == good }).await;
    assert!(heroes_stored, "every good request is stored");
    let dlq = &app.settings.broker.dead_letter_queue;
    let all_dead = wait_for(|| async { app.message_count(dlq).await == bad as u32 }).await;
    assert!(all_dead, "every bad message is in the DLQ: {} of {bad}", app.message_count(dlq).await);
    for _ in 0..bad {
        let dead = app.next_dead_letter().await;
        let reason = header_text(dead.delivery.properties.headers(), ERROR_HEADER);
        assert!(reason.is_some_and(|r| !r.is_empty()), "every dead letter says why");
    }
    assert_eq!(app.queued_requests().await, 0);
    app.stop().await;
}
