//! Content parts: a message's content may be a list of OpenAI parts (text, and images in a
//! user's message), as Instructor accepts images. They reach the provider unchanged; an image
//! over a limit, of a scheme not allowed, or outside a user's message is dead-lettered with
//! its reason before any call.

use instructd::broker::publisher::{ERROR_HEADER, header_text};
use instructd::contract::ErrorKind;
use serde_json::{Value, json};
use wiremock::MockServer;

use crate::helpers::*;

fn request_with(messages: Value) -> Value {
    let mut request = request("hero", "unused");
    request["messages"] = messages;
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_image_parts_reach_the_provider_unchanged() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Pixel", "secret_name": "P. Xel"}"#)).await;
    let parts = json!([
        {"type": "text", "text": "Make the hero in this picture"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/hero.png"}},
    ]);
    let system = json!([{"type": "text", "text": "You draw heroes."}]);
    app.publish(&request_with(json!([{"role": "system", "content": system}, {"role": "user", "content": parts}])))
        .await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    let sent = &app.llm_requests().await[0]["messages"];
    assert_eq!(sent[0], json!({"role": "system", "content": system}), "{sent}");
    assert_eq!(sent[1], json!({"role": "user", "content": parts}), "{sent}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_a_limit_of_a_scheme_not_allowed_or_outside_a_users_message_are_dead_lettered() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.limits.max_image_bytes = 2048;
    settings.limits.max_content_parts = 3;
    let mut app = spawn_app_with(settings, llm).await;
    let image = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
    let text = json!({"type": "text", "text": "Look"});
    let user = |parts: Value| json!([{"role": "user", "content": parts}]);
    let big = format!("data:image/png;base64,{}", "A".repeat(3000));
    let cases = [
        (
            user(json!([text, image("file:///etc/passwd")])),
            "messages[0].content[1].image_url.url: scheme `file` is not allowed (limits.image_url_schemes: data, https)",
        ),
        (user(json!([text, image("http://example.com/a.png")])), "scheme `http` is not allowed"),
        (
            user(json!([text, image(&big)])),
            "messages[0].content[1].image_url.url: 3022 bytes, over limits.max_image_bytes (2048)",
        ),
        (
            user(json!([text, image("data:text/html;base64,PGI+")])),
            "a data URL must be data:image/<type>;base64,<data>",
        ),
        (user(json!([text, text, text, text])), "messages[0].content: 4 parts, over limits.max_content_parts (3)"),
        (
            json!([{"role": "system", "content": [image("https://example.com/a.png")]}, {"role": "user", "content": "Hi"}]),
            "messages[0].content[0]: an image is allowed in a user's message only",
        ),
    ];

    for (messages, reason) in cases {
        app.publish(&request_with(messages)).await;
        let dead = app.next_dead_letter().await;
        let why = header_text(dead.delivery.properties.headers(), ERROR_HEADER).expect("the reason header is set");
        assert!(why.contains(reason), "expected {reason:?} in {why:?}");
        let failed = app.next_event().await;
        assert_eq!(failed.event.error.expect("a failed event").kind, ErrorKind::InvalidRequest);
    }
    assert!(app.llm_requests().await.is_empty(), "nothing refused reached the provider");
    app.stop().await;
}
