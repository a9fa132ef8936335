//! Several providers, and fallback from one model to the next (`llm.fallback`): a model whose
//! provider rejects the call, stays unavailable, or whose re-asks run out hands the job, with
//! its conversation, to the next model. Two HTTP fakes: the default provider (`llm.base_url`)
//! serves `fake-model`, a second one (`[llm.providers.large]`) serves `large-model`.

use instructd::config::{ProviderSettings, Settings};
use instructd::contract::ErrorKind;
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{MockServer, ResponseTemplate};

use crate::helpers::*;

const LARGE_KEY: &str = "sk-large-provider-key-42";

/// The default provider's fake is `app.llm`; `large` is the second provider's.
async fn two_providers() -> (TestApp, MockServer) {
    let small = MockServer::start().await;
    let large = MockServer::start().await;
    let mut settings = test_settings(&small, &create_database().await).await;
    with_large_provider(&mut settings, &large);
    (spawn_app_with(settings, small).await, large)
}

fn with_large_provider(settings: &mut Settings, large: &MockServer) {
    settings.llm.providers.insert(
        "large".into(),
        ProviderSettings {
            base_url: format!("{}/v1", large.uri()),
            api_key: SecretString::from(LARGE_KEY),
            api_key_file: String::new(),
            models: vec!["large-model".into()],
            request_timeout_secs: None,
            max_concurrency: 0,
            ca_file: String::new(),
        },
    );
    settings.llm.fallback = vec!["fake-model".into(), "large-model".into()];
}

fn valid_hero() -> Value {
    tool_call_completion("Hero", r#"{"name": "Deadpond", "secret_name": "Dive Wilson"}"#)
}

fn invalid_hero() -> Value {
    tool_call_completion("Hero", r#"{"name": "No secret name"}"#)
}

async fn bodies(llm: &MockServer) -> Vec<Value> {
    llm.received_requests().await.unwrap_or_default().iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

fn job_id(request: &Value) -> Uuid {
    request["job_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_its_provider_does_not_know_falls_back_to_the_next_provider() {
    let (mut app, large) = two_providers().await;
    let unknown =
        json!({"error": {"message": "The model `fake-model` does not exist", "type": "invalid_request_error"}});
    respond_always(&app.llm, ResponseTemplate::new(404).set_body_json(unknown)).await;
    answer_always(&large, valid_hero()).await;
    let request = request("hero", "Make a hero");

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.models, ["fake-model", "large-model"], "which models were tried");
    assert_eq!(received.event.model.as_deref(), Some("large-model"), "which one answered");
    assert_eq!(received.event.attempts, 2);
    assert_eq!(app.llm_requests().await.len(), 1, "a 404 is not retried on the same model");
    // The second provider got the job's conversation under its own model name and key.
    let sent = large.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    let authorization = sent[0].headers.get("authorization").unwrap().to_str().unwrap();
    assert_eq!(authorization, format!("Bearer {LARGE_KEY}"));
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["model"], "large-model");
    assert_eq!(body["messages"], app.llm_requests().await[0]["messages"], "the same conversation");
    // The job row: each call with its model, its provider and how it ended.
    let row = app.job(job_id(&request)).await;
    let calls = row.calls.as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0]["model"].as_str(), calls[0]["provider"].as_str()), (Some("fake-model"), Some("default")));
    assert_eq!(calls[0]["error"]["kind"], "llm");
    assert!(calls[0]["error"]["message"].as_str().unwrap().contains("does not exist"), "{}", calls[0]);
    assert_eq!((calls[1]["model"].as_str(), calls[1]["provider"].as_str()), (Some("large-model"), Some("large")));
    assert!(calls[1].get("error").is_none(), "the answer that was stored: {}", calls[1]);
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(metric_sample(&metrics, "instructd_llm_fallbacks_total", &[("entity", "hero")]), Some(1.0));
    for provider in ["default", "large"] {
        let labels = [("provider", provider)];
        assert_eq!(metric_sample(&metrics, "instructd_llm_circuit_open", &labels), Some(0.0), "{provider}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_re_asks_run_out_escalates_with_the_conversation_and_the_errors() {
    let (mut app, large) = two_providers().await;
    answer_always(&app.llm, invalid_hero()).await;
    answer_always(&large, valid_hero()).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(1);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(app.llm_requests().await.len(), 2, "the small model: its answer and one re-ask");
    assert_eq!(received.event.attempts, 3);
    assert_eq!(received.event.models, ["fake-model", "large-model"]);
    assert_eq!(received.event.model.as_deref(), Some("large-model"));
    assert_eq!(received.event.usage.total_tokens, 360, "every model's calls are counted");
    // The large model sees what the small one answered and what was wrong with it.
    let sent = bodies(&large).await;
    assert_eq!(sent.len(), 1);
    let conversation = sent[0]["messages"].to_string();
    assert!(conversation.contains("No secret name"), "the small model's last answer: {conversation}");
    assert!(conversation.contains("secret_name: field required"), "its validation error: {conversation}");
    let record = received.event.record.unwrap();
    assert_eq!(record["name"], "Deadpond");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_model_fails_one_failed_event_names_them_all() {
    let (mut app, large) = two_providers().await;
    respond_always(&app.llm, ResponseTemplate::new(404).set_body_string("no such model")).await;
    answer_always(&large, invalid_hero()).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(0);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.expect("a failed event has an error");
    assert_eq!(error.kind, ErrorKind::Validation, "the last model's kind");
    assert!(
        error.message.starts_with("every model failed: fake-model: the provider rejected the call"),
        "{}",
        error.message
    );
    assert!(error.message.contains("no such model"), "{}", error.message);
    assert!(error.message.contains("; large-model: no valid answer after 1 attempt(s)"), "{}", error.message);
    assert_eq!(received.event.models, ["fake-model", "large-model"]);
    assert_eq!(received.event.model, None);
    assert!(app.try_next_event(std::time::Duration::from_secs(1)).await.is_none(), "one event");
    assert_eq!(bodies(&large).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_unavailable_past_the_bound_hands_the_job_to_the_next_model() {
    let small = MockServer::start().await;
    let large = MockServer::start().await;
    let mut settings = test_settings(&small, &create_database().await).await;
    with_large_provider(&mut settings, &large);
    settings.llm.fallback_after_secs = 1;
    let mut app = spawn_app_with(settings, small).await;
    respond_always(&app.llm, ResponseTemplate::new(503).set_body_string("upstream overloaded")).await;
    answer_always(&large, valid_hero()).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.model.as_deref(), Some("large-model"));
    assert!(!app.llm_requests().await.is_empty(), "the first provider was tried");
    assert_eq!(app.queued_requests().await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_may_name_a_model_of_the_list_and_goes_on_from_there() {
    let (mut app, large) = two_providers().await;
    answer_always(&app.llm, valid_hero()).await;
    answer_always(&large, valid_hero()).await;
    let mut request = request("hero", "Make a hero");
    request["model"] = json!("large-model");

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.models, ["large-model"]);
    assert!(app.llm_requests().await.is_empty(), "the default provider was not called");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_not_cut_off_by_the_fallback_bound() {
    let small = MockServer::start().await;
    let large = MockServer::start().await;
    let mut settings = test_settings(&small, &create_database().await).await;
    with_large_provider(&mut settings, &large);
    // The bound is for waiting on an unavailable provider, not for a call under way.
    settings.llm.fallback_after_secs = 1;
    let mut app = spawn_app_with(settings, small).await;
    let slow = ResponseTemplate::new(200).set_body_json(valid_hero()).set_delay(std::time::Duration::from_secs(2));
    respond_always(&app.llm, slow).await;
    answer_always(&large, valid_hero()).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.model.as_deref(), Some("fake-model"));
    assert_eq!(received.event.models, ["fake-model"]);
    assert!(bodies(&large).await.is_empty());
    app.stop().await;
}
