//! Nothing grows without bound: finished jobs' rows and published events are pruned after
//! their retention, events no queue is bound for are given up on, the rows of long-gone
//! workers go. Durations of a second, so that the daemon's own pruning pass does it.

use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_work_is_pruned_after_its_retention_and_unroutable_events_are_given_up() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    let second = "1s".parse().unwrap();
    settings.retention.succeeded_jobs = second;
    settings.retention.published_events = second;
    settings.retention.unroutable_events = second;
    settings.retention.prune_every = second;
    // Only failures are routed: a success's event comes back unroutable.
    let mut app = spawn_app_listening(settings, llm, "job.failed.#").await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Kept", "secret_name": "Hero"}"#)).await;
    app.db
        .execute_unprepared(
            "INSERT INTO worker (worker_id, hostname, pid, started_at, seen_at)
             VALUES (99, 'gone', 1, now() - interval '3 hours', now() - interval '2 hours')",
        )
        .await
        .unwrap();

    app.publish(&request("hero", "Make a hero")).await;
    app.publish(&json!({"entity": "hero", "messages": []})).await;
    assert_eq!(app.next_event().await.routing_key, "job.failed.hero");

    let pruned = wait_for(|| async {
        app.count("SELECT count(*) FROM generation_job WHERE status = 'succeeded'").await == 0
            && app.count("SELECT count(*) FROM event_outbox").await == 0
            && app.count("SELECT count(*) FROM worker WHERE worker_id = 99").await == 0
    })
    .await;
    assert!(
        pruned,
        "pruned: {} jobs, {} events left",
        app.count("SELECT count(*) FROM generation_job").await,
        app.count("SELECT count(*) FROM event_outbox").await
    );
    assert_eq!(
        app.count("SELECT count(*) FROM generation_job WHERE status = 'failed'").await,
        1,
        "failed jobs are kept 90 days"
    );
    assert_eq!(app.count("SELECT count(*) FROM hero").await, 1, "the rows generated are the product: never pruned");
    assert_eq!(app.count("SELECT count(*) FROM worker").await, 1, "this daemon's own row stays");
    // The counters move when the pass ends, after its last batch: wait for them too.
    let counted = wait_for(|| async {
        let metrics = app.get("/metrics").await.1;
        let pruned = |table| metric_sample(&metrics, "instructd_rows_pruned_total", &[("table", table)]).unwrap_or(0.0);
        metric_sample(&metrics, "instructd_events_abandoned_total", &[]) == Some(1.0)
            && pruned("generation_job") >= 1.0
            && pruned("event_outbox") >= 2.0
            && pruned("worker") >= 1.0
    })
    .await;
    assert!(counted, "{}", app.get("/metrics").await.1);
    app.stop().await;
}
