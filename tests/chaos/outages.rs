//! Outages of what the daemon depends on, for real and for long, with a backlog queued: the
//! provider unreachable for 30 s, answering 503 for 3 minutes; the database read-only for
//! 10 s. Work pauses; no job fails, none is dead-lettered or doubled, and the calls made
//! during an outage are bounded.

use std::time::{Duration, Instant};

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{Proxy, tool_call_completion};
use crate::support::*;

const LONG: Duration = Duration::from_secs(300);
const FAILED: &str = "SELECT count(*) FROM generation_job WHERE status = 'failed'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_unreachable_for_30_seconds_fails_no_job() {
    let mut scenario =
        Scenario::new("provider-30s", Duration::from_millis(100), &[("INSTRUCTD__WORKER__CONCURRENCY", "16")]).await;
    // The provider is reached through a proxy that refuses (resets) every connection while cut.
    let provider = Proxy::start(*scenario.llm.address()).await;
    scenario.env.insert("INSTRUCTD__LLM__BASE_URL".into(), format!("http://{}/v1", provider.addr));
    let jobs = 600;
    let ids = scenario.enqueue(jobs).await;
    let mut daemon = scenario.start();
    scenario.wait_for_count(SUCCEEDED, 100, LONG).await;

    provider.cut();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let calls_during = provider.refused();
    let succeeded_during = scenario.count(SUCCEEDED).await.unwrap();
    provider.restore();

    scenario.wait_for_count(SUCCEEDED, jobs as i64, LONG).await;
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    let failed = scenario.count(FAILED).await.unwrap();
    let rows = scenario.count(ROWS).await.unwrap();
    eprintln!(
        "provider unreachable 30 s: jobs={jobs} failed={failed} rows={rows} calls_during_outage={calls_during} \
         succeeded_before_restore={succeeded_during}"
    );
    assert_eq!(failed, 0, "an outage fails no job");
    assert_eq!(rows, jobs as i64, "one row per job");
    assert_eq!(announced, jobs);
    // Open after 5 failures, then one probe per open period (1 s doubling to 30 s): about
    // ten in 30 s, whatever the backlog.
    assert!(calls_during <= 40, "{calls_during} calls during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_503_for_3_minutes_costs_a_bounded_number_of_calls_and_fails_no_job() {
    let overrides = [
        ("INSTRUCTD__WORKER__CONCURRENCY", "16"),
        // The defaults, not the tests' quick probing.
        ("INSTRUCTD__LLM__CIRCUIT_MAX_OPEN_SECS", "30"),
        ("INSTRUCTD__LLM__TRANSPORT_MIN_DELAY_MS", "500"),
        ("INSTRUCTD__LLM__TRANSPORT_MAX_DELAY_SECS", "20"),
    ];
    let mut scenario = Scenario::new("provider-3min", Duration::from_millis(100), &overrides).await;
    // A provider that answers 503 while `down` is set. (Not a scoped mock of higher priority:
    // wiremock 0.6 sorts its mocks in place, and the guard then removes the wrong one.)
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answer = tool_call_completion("Hero", r#"{"name": "Chaos", "secret_name": "Monkey"}"#);
    let provider = {
        let down = down.clone();
        move |_: &wiremock::Request| {
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                ResponseTemplate::new(503).set_body_string("upstream overloaded")
            } else {
                ResponseTemplate::new(200).set_body_json(answer.clone()).set_delay(Duration::from_millis(100))
            }
        }
    };
    scenario.llm.reset().await;
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(provider).mount(&scenario.llm).await;
    let jobs = 300;
    let ids = scenario.enqueue(jobs).await;
    let mut daemon = scenario.start();
    scenario.wait_for_count(SUCCEEDED, 50, LONG).await;

    let before = scenario.llm_calls().await;
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(180)).await;
    let calls_during = scenario.llm_calls().await - before;
    down.store(false, std::sync::atomic::Ordering::SeqCst);

    scenario.wait_for_count(SUCCEEDED, jobs as i64, LONG).await;
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    let failed = scenario.count(FAILED).await.unwrap();
    let rows = scenario.count(ROWS).await.unwrap();
    eprintln!("provider 503 for 180 s: jobs={jobs} failed={failed} rows={rows} calls_during_outage={calls_during}");
    assert_eq!(failed, 0);
    assert_eq!(rows, jobs as i64);
    assert_eq!(announced, jobs);
    // The calls in flight when it began, 5 to open the circuit, then a probe per 1, 2, 4, 8,
    // 16 and 30 s: about 16 in 3 minutes.
    assert!(calls_during <= 60, "{calls_during} calls during the outage");
}

/// `default_transaction_read_only` put back, even if the test fails.
struct Writable;

impl Drop for Writable {
    fn drop(&mut self) {
        set_read_only(false);
    }
}

fn set_read_only(on: bool) {
    let sql = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    for statement in [sql, "SELECT pg_reload_conf()"] {
        let status = std::process::Command::new("su")
            .args(["postgres", "-c", &format!("psql -qAtX -c \"{statement}\"")])
            .status()
            .expect("psql runs");
        assert!(status.success(), "{statement}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_read_only_for_10_seconds_mid_run_sends_nothing_to_the_dead_letter_queue() {
    let mut scenario =
        Scenario::new("read-only", Duration::from_millis(10), &[("INSTRUCTD__WORKER__CONCURRENCY", "16")]).await;
    let jobs = 1500;
    let ids = scenario.enqueue(jobs).await;
    let mut daemon = scenario.start();
    let addr = scenario.http_addr(1).await;
    scenario.wait_for_count(SUCCEEDED, 300, LONG).await;

    // A failover's standby: every session of the server read-only, then writable again.
    let _writable = Writable;
    let started = Instant::now();
    set_read_only(true);
    let readyz = format!("http://{addr}/readyz");
    let refusing = wait_until(Duration::from_secs(10), || async {
        crate::helpers::http_get(&readyz).await.is_ok_and(|(_, body)| body.contains("refusing writes"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    set_read_only(false);

    scenario.wait_for_count(SUCCEEDED, jobs as i64, LONG).await;
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    let dead_letters = rabbitmq_listing("list_queues", "name", "messages", &scenario.settings.broker.dead_letter_queue);
    let failed = scenario.count(FAILED).await.unwrap();
    let rows = scenario.count(ROWS).await.unwrap();
    let calls = scenario.llm_calls().await;
    eprintln!(
        "database read-only 10 s: jobs={jobs} dead_lettered={dead_letters:?} failed={failed} rows={rows} \
         model_calls={calls}"
    );
    assert!(refusing, "/readyz said the database refuses writes");
    assert_eq!(dead_letters.as_deref(), Some("0"), "nothing dead-lettered");
    assert_eq!(failed, 0);
    assert_eq!(rows, jobs as i64);
    assert_eq!(announced, jobs);
    assert_eq!(calls, jobs, "no job generated twice: they waited for the database, not for redelivery");
}
