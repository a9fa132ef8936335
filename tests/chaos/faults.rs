//! One test per fault the brief's guarantees must survive.

use std::time::Duration;

use crate::support::*;

const LONG: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_doubles_nothing() {
    let mut scenario =
        Scenario::new("kill9", Duration::from_millis(200), &[("INSTRUCTD__WORKER__CONCURRENCY", "16")]).await;
    let jobs = 300;
    let ids = scenario.enqueue(jobs).await;

    let mut kills = 0;
    for round in 1..=3 {
        let mut daemon = scenario.start();
        // Kill it while jobs are in flight, after it made some progress.
        scenario.wait_for_count(SUCCEEDED, (round * jobs / 5) as i64, LONG).await;
        daemon.start_kill().unwrap();
        daemon.wait().await.unwrap();
        kills += 1;
    }
    let mut daemon = scenario.start();
    scenario.wait_for_count(SUCCEEDED, jobs as i64, LONG).await;
    let (events, announced) = scenario.collect_events(&ids, LONG).await;
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;

    let rows = scenario.count(ROWS).await.unwrap();
    let stored = scenario.count(STORED_JOBS).await.unwrap();
    eprintln!(
        "kill -9: jobs={jobs} kills={kills} rows={rows} duplicates={} events={events} jobs_announced={announced}",
        rows - stored
    );
    assert_eq!(rows, jobs as i64, "exactly one row per job");
    assert_eq!(stored, jobs as i64);
    assert_eq!(announced, jobs, "every job announced at least once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let mut scenario = Scenario::new(
        "drain",
        Duration::from_secs(2),
        &[("INSTRUCTD__WORKER__CONCURRENCY", "8"), ("INSTRUCTD__WORKER__SHUTDOWN_GRACE_SECS", "20")],
    )
    .await;
    let mut daemon = scenario.start();
    let ids = scenario.enqueue(8).await;
    scenario.wait_for_count("SELECT count(*) FROM generation_job WHERE status = 'running'", 8, LONG).await;

    // Exit 0 within the grace period.
    stop_gracefully(&mut daemon, Duration::from_secs(20)).await;
    assert_eq!(scenario.count(SUCCEEDED).await, Some(8), "in-flight jobs finished");
    assert_eq!(scenario.count(ROWS).await, Some(8));
    assert_eq!(scenario.count(PENDING_EVENTS).await, Some(0), "the outbox was flushed");
    let (_, announced) = scenario.collect_events(&ids, Duration::from_secs(10)).await;
    assert_eq!(announced, 8);
    let left = rabbitmq_listing("list_queues", "name", "messages", &scenario.settings.broker.request_queue);
    assert_eq!(left.as_deref(), Some("0"), "nothing left to redeliver: every job was acked");
}

/// A memory alarm blocks publishing; the daemon is killed while its event is stuck, after
/// the commit. Once the alarm clears, a new daemon's relay sends the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stuck_behind_a_memory_alarm_is_sent_after_a_crash() {
    struct ClearAlarm;
    impl Drop for ClearAlarm {
        fn drop(&mut self) {
            let _ = std::process::Command::new("rabbitmqctl").args(["set_vm_memory_high_watermark", "0.4"]).status();
        }
    }
    let mut scenario = Scenario::new("alarm", Duration::from_millis(1500), &[]).await;
    let mut daemon = scenario.start();
    let ids = scenario.enqueue(1).await;
    scenario.wait_for_count("SELECT count(*) FROM generation_job WHERE status = 'running'", 1, LONG).await;

    let _clear = ClearAlarm;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    scenario.wait_for_count(SUCCEEDED, 1, LONG).await;
    scenario.wait_for_count(PENDING_EVENTS, 1, LONG).await;
    // Publishing is blocked: the event cannot leave. Crash now.
    daemon.start_kill().unwrap();
    daemon.wait().await.unwrap();
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);

    let mut daemon = scenario.start();
    let (_, announced) = scenario.collect_events(&ids, Duration::from_secs(60)).await;
    assert_eq!(announced, 1);
    assert!(
        wait_until(Duration::from_secs(30), || async { scenario.count(PENDING_EVENTS).await == Some(0) }).await,
        "the relayed event is marked published"
    );
    assert_eq!(scenario.count(ROWS).await, Some(1));
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
}

/// The broker closes the daemon's connections mid-run: it reconnects, re-declares, resumes
/// with its prefetch in force, and nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_are_reopened() {
    let mut scenario =
        Scenario::new("close-connections", Duration::from_millis(300), &[("INSTRUCTD__WORKER__CONCURRENCY", "8")])
            .await;
    let mut daemon = scenario.start();
    let ids = scenario.enqueue(80).await;
    scenario.wait_for_count(SUCCEEDED, 15, LONG).await;

    let connections = rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "pid", "client_properties"]);
    let mut closed = 0;
    // The daemon names its connections (client property `connection_name`).
    for line in connections.lines().filter(|l| l.contains("instructd-consumer") || l.contains("instructd-publisher")) {
        let pid = line.split_whitespace().next().unwrap();
        rabbitmqctl(&["close_connection", pid, "chaos test"]);
        closed += 1;
    }
    assert!(closed >= 2, "closed the consumer and publisher connections: {connections}");

    scenario.wait_for_count(SUCCEEDED, 80, LONG).await;
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    assert_eq!(announced, 80);
    assert_eq!(scenario.count(ROWS).await, Some(80));
    let prefetch =
        rabbitmq_listing("list_consumers", "queue_name", "prefetch_count", &scenario.settings.broker.request_queue)
            .expect("the daemon consumes again");
    let expected = instructd::broker::consumer::prefetch(scenario.settings.worker.concurrency);
    assert_eq!(prefetch, expected.to_string(), "prefetch is back in force after the reconnect");
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
}

/// RabbitMQ stops and starts mid-run: all jobs still finish, none doubled, every event
/// confirmed (the test's own listener dies with the broker, so it checks the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_pauses_work_without_losing_it() {
    let mut scenario =
        Scenario::new("broker-restart", Duration::from_millis(300), &[("INSTRUCTD__WORKER__CONCURRENCY", "8")]).await;
    let mut daemon = scenario.start();
    scenario.enqueue(60).await;
    scenario.wait_for_count(SUCCEEDED, 10, LONG).await;

    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    // The test's event queue went with its connection: events are returned unroutable,
    // and stay pending, until a queue is bound again.
    scenario.reconnect().await;

    scenario.wait_for_count(SUCCEEDED, 60, LONG).await;
    assert_eq!(scenario.count(ROWS).await, Some(60));
    assert!(
        wait_until(LONG, || async { scenario.count(PENDING_EVENTS).await == Some(0) }).await,
        "every event was eventually confirmed by the broker (confirmed mandatory: routed to a queue)"
    );

    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
}

/// Postgres restarts mid-run: jobs wait and retry, nothing is dead-lettered or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_pauses_work_without_losing_it() {
    let mut scenario =
        Scenario::new("pg-restart", Duration::from_millis(300), &[("INSTRUCTD__WORKER__CONCURRENCY", "8")]).await;
    let mut daemon = scenario.start();
    let ids = scenario.enqueue(60).await;
    scenario.wait_for_count(SUCCEEDED, 10, LONG).await;

    let (version, cluster) = pg_cluster();
    let status = std::process::Command::new("pg_ctlcluster").args([&version, &cluster, "restart"]).status().unwrap();
    assert!(status.success());

    scenario.wait_for_count(SUCCEEDED, 60, LONG).await;
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    assert_eq!(announced, 60);
    assert_eq!(scenario.count(ROWS).await, Some(60));
    let dead_letters = rabbitmq_listing("list_queues", "name", "messages", &scenario.settings.broker.dead_letter_queue);
    assert_eq!(dead_letters.as_deref(), Some("0"), "an outage never dead-letters a job");
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_workers_is_dead_lettered_at_the_delivery_limit() {
    use instructd::broker::publisher::{ERROR_HEADER, header_text};
    use lapin::options::BasicGetOptions;

    // The model never answers in time, and the worker is killed during every call.
    let mut scenario =
        Scenario::new("poison", Duration::from_secs(600), &[("INSTRUCTD__BROKER__DELIVERY_LIMIT", "2")]).await;
    let ids = scenario.enqueue(1).await;
    for delivery in 1..=2 {
        let mut daemon = scenario.start();
        assert!(wait_until(LONG, || async { scenario.llm_calls().await >= delivery }).await, "delivery {delivery}");
        daemon.start_kill().unwrap();
        daemon.wait().await.unwrap();
    }

    // The third delivery is the last the queue allows: the job fails, the message goes to the
    // dead-letter queue with the reason, and the model is not called again.
    let mut daemon = scenario.start();
    let (_, announced) = scenario.collect_events(&ids, LONG).await;
    assert_eq!(announced, 1);
    let failed = "SELECT count(*) FROM generation_job WHERE status = 'failed' AND error->>'kind' = 'internal'";
    assert_eq!(scenario.count(failed).await, Some(1));
    let dlq = scenario.settings.broker.dead_letter_queue.clone();
    let dead = scenario
        .channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the dead-letter queue");
    let reason = header_text(dead.delivery.properties.headers(), ERROR_HEADER).unwrap();
    assert!(reason.contains("delivered 3 times"), "{reason}");
    assert_eq!(scenario.llm_calls().await, 2, "the last delivery does not call the model");
    let queue = scenario.settings.broker.request_queue.clone();
    let acked = || async { rabbitmq_listing("list_queues", "name", "messages", &queue).as_deref() == Some("0") };
    assert!(wait_until(LONG, acked).await, "the request left its queue");
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
}
