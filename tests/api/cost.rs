//! Cost: each call priced by `llm.prices` (cached prompt tokens at their own rate), summed
//! over re-asks on the job row, in the event and in `/metrics`; and a dollar budget per job.

use instructd::config::Price;
use instructd::contract::ErrorKind;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::MockServer;

use crate::helpers::*;

/// 100 prompt tokens (40 of them cached) and 20 completion tokens at these rates:
/// 60 × 2 + 40 × 1 + 20 × 8 = 320 millionths of a dollar a call.
fn price() -> Price {
    Price {
        model: "fake-model".into(),
        input_per_million: 2.0,
        output_per_million: 8.0,
        cached_input_per_million: Some(1.0),
    }
}

fn with_cached_tokens(mut completion: Value) -> Value {
    completion["usage"]["prompt_tokens_details"] = json!({"cached_tokens": 40});
    completion
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_calls_cost_is_summed_on_the_row_in_the_event_and_in_metrics() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.prices = vec![price()];
    let mut app = spawn_app_with(settings, llm).await;
    let invalid = tool_call_completion("Hero", r#"{"name": "No secret name"}"#);
    let valid = tool_call_completion("Hero", r#"{"name": "Deadpond", "secret_name": "Dive Wilson"}"#);
    answer_once(&app.llm, with_cached_tokens(invalid)).await;
    answer_always(&app.llm, with_cached_tokens(valid)).await;
    let request = request("hero", "Make a hero");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    let usage = received.event.usage;
    assert_eq!(received.event.attempts, 2);
    assert_eq!((usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens), (200, 80, 40));
    assert_eq!(usage.cost_usd, Some(0.00064), "two calls at $0.00032");
    let body: Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(body["usage"]["cost_usd"], json!(0.00064), "the event's JSON");
    let row = app.job(job_id).await;
    assert_eq!(row.usage.unwrap()["cost_usd"], json!(0.00064), "the job row");
    let (_, metrics) = app.get("/metrics").await;
    let labels = [("model", "fake-model"), ("entity", "hero")];
    assert_eq!(metric_sample(&metrics, "instructd_llm_cost_microdollars_total", &labels), Some(640.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_price_has_no_cost() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.event.usage.cost_usd, None);
    let body: Value = serde_json::from_slice(&received.body).unwrap();
    assert!(body["usage"].get("cost_usd").is_none(), "no cost rather than a cost of 0: {body}");
    let (_, metrics) = app.get("/metrics").await;
    let labels = [("model", "fake-model"), ("entity", "hero")];
    assert_eq!(metric_sample(&metrics, "instructd_llm_cost_microdollars_total", &labels), Some(0.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_dollar_budget_stops_re_asking_and_fails_the_job_with_kind_llm() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.prices = vec![price()];
    // $0.00032 a call: the second call spends it.
    settings.llm.job_cost_budget_usd = 0.0005;
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, with_cached_tokens(tool_call_completion("Hero", r#"{"name": "No secret name"}"#))).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(5);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.expect("a failed event has an error");
    assert_eq!(error.kind, ErrorKind::Llm);
    assert!(
        error
            .message
            .contains("dollar budget is spent ($0.00064 of llm.job_cost_budget_usd $0.0005) after 2 attempt(s)"),
        "{}",
        error.message
    );
    assert!(error.message.contains("secret_name: field required"), "the last validation error is kept");
    assert_eq!(app.llm_requests().await.len(), 2, "no call once the budget is spent, though re-asks were left");
    assert_eq!(received.event.usage.cost_usd, Some(0.00064));
    app.stop().await;
}
