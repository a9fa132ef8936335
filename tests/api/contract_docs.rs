//! docs/asyncapi.yaml cannot drift from the daemon: its payload schemas (docs/schemas) are
//! checked against what the daemon really accepts and really sends.

use instructd::config::Settings;
use instructd::decode::decode;
use instructd::enqueue::{EnqueueArgs, conversation, request_body};
use lapin::BasicProperties;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

fn schema(file: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("the schema compiles")
}

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn the_documented_request_schema_accepts_exactly_what_the_daemon_accepts() {
    let validator = schema("request.json");
    let mut settings = Settings::load_from(None, Default::default()).unwrap();
    // Which models a request may name, like which entities exist, is configuration, not shape.
    settings.llm.allowed_models = vec!["*".into()];
    let app = instructd::heroes::app();
    let registry = app.registry();
    let user = json!([{"role": "user", "content": "Make a hero"}]);
    // Every body names a registered entity.
    let bodies = [
        json!({"entity": "hero", "messages": user}),
        json!({"job_id": Uuid::new_v4(), "entity": "hero", "messages": user, "model": "m", "max_retries": 3,
               "metadata": {"any": ["json"]}}),
        json!({"job_id": null, "entity": "hero", "messages": user, "model": null, "max_retries": null}),
        json!({"entity": "hero", "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
               {"role": "user", "content": "u"}]}),
        json!({"entity": "hero", "messages": user, "unknown_field": 1}),
        // A replay names the job it runs again, as a UUID.
        json!({"entity": "hero", "messages": user, "replay_of": Uuid::new_v4()}),
        json!({"entity": "hero", "messages": user, "replay_of": null}),
        json!({"entity": "hero", "messages": user, "replay_of": "not-a-uuid"}),
        json!({"entity": "hero", "messages": user, "replay_of": 7}),
        json!({"entity": "hero", "messages": []}),
        json!({"entity": "hero"}),
        json!({"messages": user}),
        json!({"entity": "hero", "messages": [{"role": "tool", "content": "x"}]}),
        json!({"entity": "hero", "messages": [{"role": "user"}]}),
        json!({"entity": "hero", "messages": "Make a hero"}),
        json!({"job_id": "not-a-uuid", "entity": "hero", "messages": user}),
        json!({"job_id": 7, "entity": "hero", "messages": user}),
        json!({"entity": "hero", "messages": user, "max_retries": -1}),
        json!({"entity": "hero", "messages": user, "max_retries": "2"}),
        json!({"entity": "hero", "messages": user, "model": ""}),
        // Model names up to 256 characters (not bytes).
        json!({"entity": "hero", "messages": user, "model": "é".repeat(256)}),
        json!({"entity": "hero", "messages": user, "model": "m".repeat(257)}),
        json!({"entity": 5, "messages": user}),
        json!({"entity": "hero", "messages": user, "mode": "json_schema"}),
        json!({"entity": "hero", "messages": user, "mode": null}),
        json!({"entity": "hero", "messages": user, "mode": "xml"}),
        json!(["not", "an", "object"]),
        // Content parts: text, and images in a user's message, inline or by https.
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Make a hero of this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/hero.png"}},
        ]}]}),
        json!({"entity": "hero", "messages": [{"role": "system", "content": [{"type": "text", "text": "s"}]},
               {"role": "user", "content": [{"type": "text", "text": "u"}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": []}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "ultra"}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "cache": true}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": 7}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [["text", "hi"]]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": ["https://example.com/a.png", "low"]}]}]}),
        json!({"entity": "hero", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a\nb.png", "detail": null}}]}]}),
    ];
    for body in bodies {
        let accepted =
            decode(&serde_json::to_vec(&body).unwrap(), &BasicProperties::default(), false, registry, &settings);
        let documented = errors(&validator, &body);
        assert_eq!(
            accepted.is_ok(),
            documented.is_empty(),
            "daemon {} but the schema {}: {body}",
            if accepted.is_ok() { "accepts" } else { "rejects" },
            if documented.is_empty() { "accepts".to_owned() } else { format!("rejects ({documented:?})") },
        );
    }

    // What `instructd enqueue` sends is a documented request.
    let args = EnqueueArgs {
        entity: "hero".into(),
        prompt: Some("Make a hero".into()),
        messages_file: None,
        image: Vec::new(),
        system: Some("Be brief".into()),
        model: Some("gpt-4o-mini".into()),
        max_retries: Some(2),
        mode: Some(instructd::contract::Mode::JsonSchema),
        job_id: None,
        metadata: Some(json!({"k": "v"})),
        count: 1,
        wait: false,
        timeout: 1,
    };
    let sent = request_body(&args, &conversation(&args).unwrap(), Uuid::new_v4());
    assert_eq!(errors(&validator, &sent), Vec::<String>::new(), "{sent}");
    // With --image: the picture as a data: URL in a part beside the prompt.
    let picture = std::env::temp_dir().join(format!("instructd-{}.png", Uuid::new_v4()));
    std::fs::write(&picture, b"\x89PNG\r\n\x1a\n").unwrap();
    let args = EnqueueArgs { image: vec![picture.clone()], ..args };
    let sent = request_body(&args, &conversation(&args).unwrap(), Uuid::new_v4());
    let _ = std::fs::remove_file(&picture);
    assert_eq!(errors(&validator, &sent), Vec::<String>::new(), "{sent}");
    let parts = &sent["messages"][1]["content"];
    assert_eq!(parts[0], json!({"type": "text", "text": "Make a hero"}));
    assert_eq!(parts[1]["image_url"]["url"], "data:image/png;base64,iVBORw0KGgo=");
    assert!(
        decode(&serde_json::to_vec(&sent).unwrap(), &BasicProperties::default(), false, registry, &settings).is_ok(),
        "the daemon accepts it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_event_the_daemon_sends_matches_the_documented_schema() {
    let validator = schema("event.json");
    let mut app = spawn_app().await;
    // One success, one validation failure, one invalid request, one unknown entity.
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "Ok", "secret_name": "Fine", "age": 3}"#)).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "No secret"}"#)).await;
    app.publish(&request("hero", "Make a hero")).await;
    let succeeded = app.next_event().await;
    let mut invalid = request("hero", "Make another");
    invalid["max_retries"] = json!(0);
    app.publish(&invalid).await;
    let failed = app.next_event().await;
    app.publish(&json!({"job_id": Uuid::new_v4(), "entity": "hero", "messages": []})).await;
    let rejected = app.next_event().await;
    app.publish(&request("no_such_entity", "Make something")).await;
    let unknown = app.next_event().await;

    let seen: Vec<&str> = [&succeeded, &failed, &rejected, &unknown].iter().map(|r| r.routing_key.as_str()).collect();
    assert_eq!(seen, ["job.succeeded.hero", "job.failed.hero", "job.failed.hero", "job.failed.unknown"]);
    for received in [&succeeded, &failed, &rejected, &unknown] {
        let body: Value = serde_json::from_slice(&received.body).unwrap();
        assert_eq!(errors(&validator, &body), Vec::<String>::new(), "{}: {body}", received.routing_key);
    }
    app.stop().await;
}
