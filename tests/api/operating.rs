//! What operators rely on: /healthz, /readyz and /metrics; events that no queue is bound
//! for; dashboards and alerts that query only what the daemon exports.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use wiremock::{MockServer, ResponseTemplate};

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_report_a_real_run() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    assert!(wait_for(|| async { app.get("/readyz").await.0 == 200 }).await, "the daemon becomes ready");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"ready":true,"broker":"up","database":"up","llm":"closed","providers":{"default":"closed"},"draining":false}"#
        )
    );
    assert_eq!(app.get("/healthz").await.0, 200);

    app.publish(&request("hero", "Make a hero")).await;
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");

    // Counters move after the ack and the confirm: poll until they have.
    let scrape = || async { app.get("/metrics").await.1 };
    assert!(
        wait_for(|| async {
            let m = scrape().await;
            metric_sample(&m, "instructd_events_published_total", &[]) == Some(1.0)
                && metric_sample(&m, "instructd_jobs_in_flight", &[]) == Some(0.0)
                && metric_sample(&m, "instructd_outbox_pending", &[]).is_some()
        })
        .await,
        "metrics settle:\n{}",
        scrape().await
    );
    let metrics = scrape().await;
    let hero_succeeded = [("entity", "hero"), ("outcome", "succeeded")];
    assert_eq!(metric_sample(&metrics, "instructd_jobs_total", &hero_succeeded), Some(1.0), "{metrics}");
    assert_eq!(metric_sample(&metrics, "instructd_jobs_total", &[("entity", "hero"), ("outcome", "llm")]), Some(0.0));
    assert_eq!(metric_sample(&metrics, "instructd_job_duration_seconds_count", &hero_succeeded), Some(1.0));
    assert_eq!(metric_sample(&metrics, "instructd_llm_calls_total", &[("outcome", "ok")]), Some(1.0));
    assert_eq!(metric_sample(&metrics, "instructd_llm_call_duration_seconds_count", &[]), Some(1.0));
    assert_eq!(metric_sample(&metrics, "instructd_llm_tokens_total", &[("kind", "prompt")]), Some(100.0));
    assert_eq!(metric_sample(&metrics, "instructd_llm_tokens_total", &[("kind", "completion")]), Some(20.0));
    assert_eq!(metric_sample(&metrics, "instructd_reasks_total", &[("entity", "hero")]), Some(0.0));
    assert_eq!(metric_sample(&metrics, "instructd_dead_letters_total", &[]), Some(0.0));
    assert_eq!(metric_sample(&metrics, "instructd_llm_concurrency_limit", &[]), Some(4.0));
    assert_eq!(metric_sample(&metrics, "instructd_broker_connected", &[]), Some(1.0));
    assert_eq!(metric_sample(&metrics, "instructd_ready", &[]), Some(1.0));
    for name in instructd::metrics::ALL {
        assert!(metrics.contains(&format!("# TYPE {name} ")), "{name} is exported:\n{metrics}");
        assert!(metrics.contains(&format!("# HELP {name} ")), "{name} has help text");
    }
    promtool_check_metrics(&metrics);
    app.stop().await;
}

/// `promtool check metrics` (Prometheus' own linter) on a real scrape. Required in CI,
/// where `scripts/check-observability.sh` installs it; skipped with a note elsewhere.
fn promtool_check_metrics(exposition: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({error}); scripts/check-observability.sh installs it");
            return;
        }
        Err(error) => panic!("promtool is required in CI: {error}"),
    };
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_draining_and_the_job_in_flight_still_finishes() {
    let llm = MockServer::start().await;
    let slow =
        ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", GOOD)).set_delay(Duration::from_secs(3));
    respond_always(&llm, slow).await;
    let settings = test_settings(&llm, &create_database().await).await;
    let mut app = spawn_app_with(settings, llm).await;
    assert!(wait_for(|| async { app.get("/readyz").await.0 == 200 }).await);
    app.publish(&request("hero", "Make a hero")).await;
    assert!(wait_for(|| async { !app.llm_requests().await.is_empty() }).await, "the job is in flight");

    app.begin_shutdown();

    assert!(wait_for(|| async { app.get("/readyz").await.0 == 503 }).await, "not ready while draining");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""draining":true"#), "{body}");
    assert_eq!(app.get("/healthz").await.0, 200, "draining is not dying");
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    app.stop().await;
}

/// Past 128 jobs at once, requests are consumed on several channels (their prefetch split,
/// at most 256 unacked on each: `broker::consumer::channel_prefetches`): jobs delivered on
/// each are acked on their own, and a shutdown cancels every consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_concurrency_consumes_on_several_channels_and_a_shutdown_cancels_them_all() {
    let llm = MockServer::start().await;
    let slow =
        ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", GOOD)).set_delay(Duration::from_secs(4));
    respond_always(&llm, slow).await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.worker.concurrency = 300;
    let channels = instructd::broker::consumer::channel_prefetches(300).len() as u32;
    assert_eq!(channels, 2, "300 jobs at once hold 428 deliveries: two channels");
    let mut app = spawn_app_with(settings, llm).await;
    assert!(wait_for(|| async { app.request_consumers().await == channels }).await, "a consumer on each channel");

    let jobs = 40;
    for n in 0..jobs {
        app.publish(&request("hero", &format!("Make hero {n}"))).await;
    }
    for _ in 0..jobs {
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    }
    assert!(wait_for(|| async { app.queued_requests().await == 0 }).await);
    assert_eq!(app.count("SELECT count(*) FROM hero").await, jobs);

    // A job in flight: the shutdown cancels every consumer at once (not only one, the rest
    // going with the connection once the drain is over), then lets the job finish. (A
    // quorum queue counts a cancelled consumer until its unacked deliveries are settled:
    // the one holding the job may still be counted.)
    app.publish(&request("hero", "One more")).await;
    assert!(wait_for(|| async { app.llm_requests().await.len() > jobs as usize }).await, "the job is in flight");
    app.begin_shutdown();
    assert!(wait_for(|| async { app.request_consumers().await <= 1 }).await, "the consumers are cancelled");
    for n in 0..10 {
        app.publish(&request("hero", &format!("After the shutdown {n}"))).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.queued_requests().await, 10, "no channel takes new requests while the job drains");
    assert!(app.try_next_event(Duration::ZERO).await.is_none(), "the job was still in flight");
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_fails_when_the_broker_stays_unreachable() {
    let llm = MockServer::start().await;
    let mut env = test_env(&llm, &create_database().await);
    // Nothing listens on port 1: every connection attempt fails.
    env.insert("INSTRUCTD__BROKER__URL".into(), "amqp://guest:guest@127.0.0.1:1/%2f".into());
    env.insert("INSTRUCTD__BROKER__MAX_DISCONNECTED_SECS".into(), "1".into());
    env.insert("INSTRUCTD__BROKER__CONNECT_TIMEOUT_SECS".into(), "1".into());
    let settings = instructd::config::Settings::load_from(None, env).unwrap();
    let app = spawn_app_with(settings, llm).await;

    assert!(wait_for(|| async { app.get("/healthz").await.0 == 503 }).await, "liveness fails");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains(r#""broker":"down""#), "{body}");
    assert!(body.contains(r#""database":"up""#), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_queue_is_bound_for_stays_pending_until_one_is() {
    // The test's own event queue is bound to a key no event has: events are unroutable.
    let llm = MockServer::start().await;
    let settings = test_settings(&llm, &create_database().await).await;
    let app = spawn_app_listening(settings, llm, "nothing.is.routed.here").await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let reply_queue = app
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(reply_queue.as_str().into());

    app.publish_raw(&serde_json::to_vec(&request("hero", "Make a hero")).unwrap(), properties).await;

    // The requester has its reply at once; the exchange copy came back and stays pending.
    assert!(wait_for(|| async { app.message_count(&reply_queue).await == 1 }).await, "the reply arrives");
    let returned = "SELECT count(*) FROM event_outbox
                     WHERE published_at IS NULL AND reply_to IS NULL AND attempts >= 1 AND last_error LIKE '%NO_ROUTE%'";
    assert!(wait_for(|| async { app.count(returned).await == 1 }).await, "the returned event stays pending");
    assert_eq!(app.heroes().await.len(), 1);

    // Someone binds a queue: the relay delivers the event, once, without a second reply.
    let mut late = listen(&app.channel, &app.settings.broker.events_exchange, "job.#").await;
    let received = next_message_within(&mut late, Duration::from_secs(60)).await;
    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert!(
        wait_for(|| async { app.count("SELECT count(*) FROM event_outbox WHERE published_at IS NULL").await == 0 })
            .await
    );
    assert_eq!(app.message_count(&reply_queue).await, 1, "the reply copy is not sent again");
    app.stop().await;
}

#[test]
fn dashboards_and_alerts_query_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let exported: BTreeSet<&str> = instructd::metrics::ALL.iter().copied().collect();
    for file in ["deploy/grafana/instructd.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let queried = metric_names(&text);
        assert!(!queried.is_empty(), "{file} queries instructd metrics");
        for name in &queried {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| exported.contains(base)))
                .unwrap_or(name);
            assert!(exported.contains(base), "{file} queries {name}, which instructd does not export");
        }
    }
}

/// Every `instructd_…` identifier in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("instructd_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_and_unroutable_events_published_together_are_told_apart() {
    // Only succeeded events have a queue; failed ones come back. Many at once: each event's
    // own fate must decide its row. (lapin gives a returned message to whichever confirm
    // completes next on the channel, so the publisher keeps one publish in flight per
    // channel; this loopback broker rarely batches confirms, so the test guards the outcome
    // rather than reproducing that race.)
    let llm = MockServer::start().await;
    let mut env = test_env(&llm, &create_database().await);
    env.insert("INSTRUCTD__WORKER__CONCURRENCY".into(), "16".into());
    let settings = instructd::config::Settings::load_from(None, env).unwrap();
    let mut app = spawn_app_listening(settings, llm, "job.succeeded.#").await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let jobs = 40;
    for i in 0..jobs {
        if i % 2 == 0 {
            app.publish(&request("hero", "Make a hero")).await;
        } else {
            // Empty messages: dead-lettered, and a job.failed.hero event nobody is bound for.
            app.publish(&serde_json::json!({"job_id": uuid::Uuid::new_v4(), "entity": "hero", "messages": []})).await;
        }
    }
    for _ in 0..jobs / 2 {
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    }
    let settled = |sql: &'static str, n: i64| {
        let app = &app;
        async move { wait_for(|| async { app.count(sql).await == n }).await }
    };
    assert!(
        settled(
            "SELECT count(*) FROM event_outbox WHERE routing_key = 'job.succeeded.hero' AND published_at IS NOT NULL",
            20
        )
        .await
    );
    assert!(
        settled(
            "SELECT count(*) FROM event_outbox WHERE routing_key = 'job.failed.hero' AND published_at IS NULL \
                 AND last_error LIKE '%NO_ROUTE%'",
            20
        )
        .await,
        "every unroutable event stays pending"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM event_outbox WHERE routing_key = 'job.failed.hero' AND published_at IS NOT NULL"
        )
        .await,
        0
    );
    app.stop().await;
}
