//! A claim is live while its worker is: its session holds the worker's advisory lock and its
//! heartbeat is fresh. A killed worker's claims are taken over at once (its session ended
//! with it), a frozen or unreachable one's once its heartbeat is stale; a claim handed back
//! is taken without counting as a takeover. These drive the store and the presence SQL
//! directly against Postgres.

use instructd::store::{Claim, presence};
use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::batching::{acquire, count, job, raw, store_as};
use crate::helpers::{Leftovers, create_database};

/// A migrated database: its URL, a pool on it, and what drops it when the test ends.
async fn database() -> (String, sea_orm::DatabaseConnection, Leftovers) {
    let url = create_database().await;
    let leftovers = Leftovers::database(&url);
    let db = Database::connect(url.as_str()).await.expect("the test database is reachable");
    migration::Migrator::up(&db, None).await.expect("migrations apply");
    (url, db, leftovers)
}

/// Worker `worker_id`'s presence, as its daemon keeps it: the lock, then a heartbeat.
async fn present(url: &str, worker_id: i64) -> PgConnection {
    let mut session = PgConnection::connect(url).await.expect("a session");
    assert!(presence::lock(&mut session, worker_id).await.unwrap(), "the lock is free");
    presence::heartbeat(&mut session, worker_id).await.unwrap();
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_claim_holds_and_a_frozen_or_killed_workers_is_taken_over() {
    let (url, db, _database) = database().await;
    let (first, second) = (store_as(db.clone(), 11).await, store_as(db.clone(), 22).await);
    let request = raw(json!({"entity": "hero"}));
    let session = present(&url, 11).await;

    let frozen = Uuid::new_v4();
    acquire(&first, frozen, &request).await;
    assert_eq!(second.claim_job(&job(frozen, &request)).await.unwrap(), Claim::Busy, "worker 11 is alive");
    // Its session lives on, but its heartbeat stops (a frozen process, a machine cut off).
    db.execute_unprepared("UPDATE worker SET seen_at = now() - interval '10 seconds' WHERE worker_id = 11")
        .await
        .unwrap();
    assert!(
        matches!(second.claim_job(&job(frozen, &request)).await.unwrap(), Claim::Acquired { takeovers: 1, .. }),
        "a stale heartbeat gives the claim up"
    );

    let mut session = session;
    presence::heartbeat(&mut session, 11).await.unwrap();
    let killed = Uuid::new_v4();
    acquire(&first, killed, &request).await;
    assert_eq!(second.claim_job(&job(killed, &request)).await.unwrap(), Claim::Busy);
    // Killed: its session ends (a killed process's socket is closed by its kernel), its lock
    // with it, while its heartbeat is still fresh.
    drop(session);
    let taken = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            if let Claim::Acquired { takeovers, .. } = second.claim_job(&job(killed, &request)).await.unwrap() {
                return takeovers;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the killed worker's claim is taken over as soon as Postgres sees its session end");
    assert_eq!(taken, 1);
    assert_eq!(count(&second, "SELECT count(*) FROM generation_job WHERE claimed_by = 22").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_handed_back_is_taken_without_counting_and_a_leftover_of_ones_own_is_taken_back() {
    let (url, db, _database) = database().await;
    let (first, second) = (store_as(db.clone(), 33).await, store_as(db.clone(), 44).await);
    let request = raw(json!({"entity": "hero"}));
    let _alive = present(&url, 33).await;

    let deferred = Uuid::new_v4();
    let token = acquire(&first, deferred, &request).await;
    assert!(first.release_claim(deferred, token).await.unwrap());
    assert!(!first.release_claim(deferred, token).await.unwrap(), "a token hands its claim back once");
    assert!(
        matches!(second.claim_job(&job(deferred, &request)).await.unwrap(), Claim::Acquired { takeovers: 0, .. }),
        "a claim handed back is free, and waiting is not a takeover"
    );

    // A run of worker 33 that panicked left its claim behind; 33 is not running the job any
    // more (its caller knows), so its next delivery takes the claim back, counting it.
    let leftover = Uuid::new_v4();
    let old = acquire(&first, leftover, &request).await;
    match first.claim_job(&job(leftover, &request)).await.unwrap() {
        Claim::Acquired { token, takeovers, .. } => {
            assert_ne!(token, old);
            assert_eq!(takeovers, 1);
        }
        other => panic!("expected the leftover claim back, got {other:?}"),
    }
    assert_eq!(second.claim_job(&job(leftover, &request)).await.unwrap(), Claim::Busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_another_live_worker_holds_is_deferred_without_holding_a_slot_and_taken_over_when_it_dies() {
    use crate::helpers::*;
    let llm = wiremock::MockServer::start().await;
    let url = create_database().await;
    let mut settings = test_settings(&llm, &url).await;
    // One slot: a delivery waiting on another worker's claim would hold up every other job.
    settings.worker.concurrency = 1;
    settings.broker.defer_secs = 1;
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "A", "secret_name": "B"}"#)).await;

    // Worker 777, alive (its session holds its lock, its heartbeat is kept fresh), runs job X.
    let held = request("hero", "Make a hero");
    let held_id: Uuid = held["job_id"].as_str().unwrap().parse().unwrap();
    let (dies, died) = tokio::sync::oneshot::channel::<()>();
    let mut session = present(&url, 777).await;
    let heartbeat = tokio::spawn(async move {
        tokio::pin!(died);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                    presence::heartbeat(&mut session, 777).await.unwrap();
                }
                // Killed: its session ends with it.
                _ = &mut died => return,
            }
        }
    });
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO generation_job (job_id, entity, status, request, claim_token, claimed_by)
             VALUES ('{held_id}', 'hero', 'running', '{{}}', gen_random_uuid(), 777)"
        ))
        .await
        .unwrap();

    app.publish(&held).await;
    let other = request("hero", "Make another hero");
    app.publish(&other).await;
    let first = app.next_event().await;
    assert_eq!(first.event.job_id.to_string(), other["job_id"].as_str().unwrap(), "the other job went on");
    let metrics = app.get("/metrics").await.1;
    let deferred = metric_sample(&metrics, "instructd_deliveries_deferred_total", &[("reason", "claimed")]);
    assert!(deferred >= Some(1.0), "{metrics}");

    dies.send(()).unwrap();
    heartbeat.await.unwrap();
    let taken = app.next_event().await;
    assert_eq!(taken.event.job_id, held_id);
    assert_eq!(taken.routing_key, "job.succeeded.hero");
    let job = app.job(held_id).await;
    assert_eq!(job.takeovers, 1, "taken from a worker that was gone");
    app.stop().await;
}
