//! Transport retries (one policy, in `llm/retry.rs`) are separate from validation re-asks:
//! they are not counted as attempts, and the model never sees a transport error.

use std::time::Duration;

use instructd::contract::ErrorKind;
use serde_json::json;
use wiremock::ResponseTemplate;

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after_and_then_succeeds() {
    let mut app = spawn_app().await;
    let rate_limited = ResponseTemplate::new(429)
        .insert_header("retry-after", "1")
        .set_body_json(json!({"error": {"message": "Rate limit reached"}}));
    respond_once(&app.llm, rate_limited).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.attempts, 1, "a transport retry is not a re-ask");
    let requests = app.llm.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let calls = app.llm_requests().await;
    assert_eq!(calls[0], calls[1], "the same call is sent again, with no error shown to the model");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_provider_keeps_failing_while_it_is_up_fails_at_its_deadline_with_kind_llm() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    // A deadline of a few seconds, and a circuit that this one job cannot open: the provider
    // is taken to be up (serving others) and this job's calls to be what fails.
    settings.llm.request_timeout_secs = 1;
    settings.llm.job_timeout_secs = 3;
    settings.llm.circuit_failures = 1000;
    let mut app = spawn_app_with(settings, llm).await;
    respond_always(&app.llm, ResponseTemplate::new(503).set_body_string("upstream overloaded")).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, ErrorKind::Llm);
    assert!(error.message.contains("deadline passed"), "{}", error.message);
    assert!(error.message.contains("503") && error.message.contains("upstream overloaded"), "{}", error.message);
    let calls = app.llm_requests().await.len();
    assert!(calls >= 2, "retried until the deadline, not given up at once: {calls} call(s)");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_times_out_is_retried() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.request_timeout_secs = 1;
    let mut app = spawn_app_with(settings, llm).await;
    let too_slow =
        ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", GOOD)).set_delay(Duration::from_secs(5));
    respond_once(&app.llm, too_slow).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(app.llm_requests().await.len(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_fails_the_job_with_kind_refused_without_re_asking() {
    let mut app = spawn_app().await;
    let mut refusal = tool_call_completion("Hero", GOOD);
    refusal["choices"][0]["message"] =
        json!({"role": "assistant", "content": null, "refusal": "I can't help with that."});
    answer_always(&app.llm, refusal).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, ErrorKind::Refused);
    assert_eq!(error.message, "I can't help with that.");
    assert_eq!(app.llm_requests().await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_429s_lowers_the_concurrency_limit_and_successes_raise_it_again() {
    // Four jobs at once (worker.concurrency), every call rate limited.
    let mut app = spawn_app().await;
    let rate_limited = ResponseTemplate::new(429)
        .insert_header("retry-after", "0")
        .set_body_json(json!({"error": {"message": "Rate limit reached"}}));
    let storm = chat_completions(rate_limited).mount_as_scoped(&app.llm).await;
    let limit = |m: &str| metric_sample(m, "instructd_llm_concurrency_limit", &[]);
    assert_eq!(limit(&app.get("/metrics").await.1), Some(4.0), "the limit starts at worker.concurrency");
    for _ in 0..4 {
        app.publish(&request("hero", "Make a hero")).await;
    }
    // Rate limited, every call: the limit is halved round after round, down to one, and the
    // circuit opens. No job fails: a rate limit is the provider's state, not the job's fault.
    let throttled = wait_for(|| async {
        let (metrics, (_, ready)) = (app.get("/metrics").await.1, app.get("/readyz").await);
        limit(&metrics) == Some(1.0) && !ready.contains(r#""llm":"closed""#)
    })
    .await;
    assert!(throttled, "down to one call at a time, circuit open:\n{}", app.get("/metrics").await.1);
    assert!(app.try_next_event(Duration::from_secs(1)).await.is_none(), "no job failed");

    // The provider recovers: successes raise the limit one step at a time.
    drop(storm);
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    for _ in 0..8 {
        app.publish(&request("hero", "Make a hero")).await;
    }
    for _ in 0..12 {
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero", "the four paused jobs too");
    }
    let raised = limit(&app.get("/metrics").await.1).unwrap();
    assert!((2.0..=4.0).contains(&raised), "raised again: {raised}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_server_errors_in_a_row_do_not_fail_the_job() {
    let mut app = spawn_app().await;
    for status in [500, 502, 503, 504, 500, 429] {
        respond_once(&app.llm, ResponseTemplate::new(status).insert_header("retry-after", "0")).await;
    }
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    // (It used to fail after four attempts, in under three seconds.)
    assert_eq!(received.routing_key, "job.succeeded.hero", "{:?}", received.event.error);
    assert_eq!(received.event.attempts, 1, "transport retries are not re-asks");
    assert_eq!(app.llm_requests().await.len(), 7);
    app.stop().await;
}
