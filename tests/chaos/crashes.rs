//! What a crash and a shutdown cost: a killed daemon's jobs are taken over within seconds,
//! not after a lease; SIGTERM exits within the grace period, whatever the daemon waits on.

use std::time::{Duration, Instant};

use crate::helpers::{answer_always, tool_call_completion};
use crate::support::*;

const LONG: Duration = Duration::from_secs(300);

/// Runs 600 jobs at 100 ms a call through daemons killed with SIGKILL `kills` times (evenly
/// through the run, each restarted at once); returns the run's duration.
async fn run_with_kills(name: &'static str, kills: usize) -> Duration {
    let mut scenario =
        Scenario::new(name, Duration::from_millis(100), &[("INSTRUCTD__WORKER__CONCURRENCY", "16")]).await;
    let jobs = 600;
    let ids = scenario.enqueue(jobs).await;
    let started = Instant::now();
    let mut daemon = scenario.start();
    for kill in 1..=kills {
        scenario.wait_for_count(SUCCEEDED, (kill * jobs / (kills + 1)) as i64, LONG).await;
        daemon.start_kill().unwrap();
        daemon.wait().await.unwrap();
        daemon = scenario.start();
    }
    scenario.wait_for_count(SUCCEEDED, jobs as i64, LONG).await;
    let elapsed = started.elapsed();
    let (events, announced) = scenario.collect_events(&ids, LONG).await;
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    let rows = scenario.count(ROWS).await.unwrap();
    let stored = scenario.count(STORED_JOBS).await.unwrap();
    let failed = scenario.count("SELECT count(*) FROM generation_job WHERE status = 'failed'").await.unwrap();
    eprintln!(
        "{name}: jobs={jobs} kills={kills} elapsed={elapsed:.1?} rows={rows} failed={failed} events={events} \
         jobs_announced={announced}"
    );
    assert_eq!(rows, jobs as i64, "exactly one row per job");
    assert_eq!(stored, jobs as i64);
    assert_eq!(failed, 0, "every job succeeded");
    assert_eq!(announced, jobs, "every job announced");
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_kill_9s_over_600_jobs_cost_seconds_not_a_lease_each() {
    let calm = run_with_kills("kills-0", 0).await;
    let killed = run_with_kills("kills-5", 5).await;
    eprintln!("five kill -9: {killed:.1?} against {calm:.1?} without: {:.1?} more", killed.saturating_sub(calm));
    assert!(killed <= calm + Duration::from_secs(15), "5 kills cost {:?}", killed.saturating_sub(calm));
}

/// A memory alarm put back to normal, even if the test fails.
struct ClearAlarm;

impl Drop for ClearAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["set_vm_memory_high_watermark", "0.4"]).status();
    }
}

/// Sends SIGTERM and asserts the daemon exits 0 within `grace` + 5 s; returns how long it took.
async fn terminate_within(daemon: &mut tokio::process::Child, grace: Duration) -> Duration {
    let started = Instant::now();
    signal(daemon, "TERM");
    let limit = grace + Duration::from_secs(5);
    let status =
        tokio::time::timeout(limit, daemon.wait()).await.expect("the daemon exits within grace + 5 s").unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_memory_alarm_exits_within_the_grace_period() {
    let grace = Duration::from_secs(5);
    let mut scenario = Scenario::new(
        "term-alarm",
        Duration::from_millis(500),
        &[("INSTRUCTD__WORKER__CONCURRENCY", "8"), ("INSTRUCTD__WORKER__SHUTDOWN_GRACE_SECS", "5")],
    )
    .await;
    let ids = scenario.enqueue(40).await;
    let mut daemon = scenario.start();
    scenario.wait_for_count(SUCCEEDED, 5, LONG).await;

    // Publishing is blocked: events, dead letters and deferrals all wait on the broker.
    let _clear = ClearAlarm;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    scenario.wait_for_count(PENDING_EVENTS, 1, LONG).await;
    let took = terminate_within(&mut daemon, grace).await;
    eprintln!("SIGTERM during a memory alarm: exited 0 in {took:.1?} (grace {grace:?})");
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);

    // Nothing lost: the next daemon finishes the rest and sends what was pending.
    let mut daemon = scenario.start();
    scenario.wait_for_count(SUCCEEDED, 40, LONG).await;
    assert!(
        wait_until(LONG, || async { scenario.count(PENDING_EVENTS).await == Some(0) }).await,
        "every event was sent in the end"
    );
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    assert_eq!(scenario.count(ROWS).await, Some(ids.len() as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_model_call_exits_within_the_grace_period_and_the_job_runs_again() {
    let grace = Duration::from_secs(3);
    let mut scenario = Scenario::new(
        "term-slow",
        Duration::from_secs(120),
        &[("INSTRUCTD__WORKER__CONCURRENCY", "4"), ("INSTRUCTD__WORKER__SHUTDOWN_GRACE_SECS", "3")],
    )
    .await;
    let ids = scenario.enqueue(4).await;
    let mut daemon = scenario.start();
    assert!(wait_until(LONG, || async { scenario.llm_calls().await >= 4 }).await, "four calls in flight");

    let took = terminate_within(&mut daemon, grace).await;
    eprintln!("SIGTERM during a 120 s model call: exited 0 in {took:.1?} (grace {grace:?})");
    assert_eq!(scenario.count(SUCCEEDED).await, Some(0));

    // The model answers at once now: the next daemon takes the requeued jobs (their claims
    // were handed back) and finishes them.
    scenario.llm.reset().await;
    answer_always(&scenario.llm, tool_call_completion("Hero", r#"{"name": "Back", "secret_name": "Again"}"#)).await;
    let mut daemon = scenario.start();
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    assert_eq!(announced, 4);
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    assert_eq!(scenario.count(ROWS).await, Some(4));
    let taken_over = "SELECT count(*) FROM generation_job WHERE takeovers > 0";
    assert_eq!(scenario.count(taken_over).await, Some(0), "handed back, not abandoned");
}
