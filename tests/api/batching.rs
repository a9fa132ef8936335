//! Group commits (`src/batch.rs`): concurrent jobs' claims, outcomes and marks share
//! statements, yet what one job claims, writes or breaks stays its own. These drive the
//! store directly, many jobs at once; which of them end up in the same batch varies from
//! run to run, and none of the assertions depends on it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use instructd::contract::{ErrorKind, JobError};
use instructd::entities::{Record, Registry};
use instructd::llm::CallTrace;
use instructd::store::{Claim, JobRecord, Outcome, Store, is_transient};
use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::create_database;

const LEASE: Duration = Duration::from_secs(60);

async fn store() -> Store {
    let db = Database::connect(create_database().await).await.expect("the test database is reachable");
    migration::Migrator::up(&db, None).await.expect("migrations apply");
    Store::new(db)
}

fn job<'a>(job_id: Uuid, request: &'a Value) -> JobRecord<'a> {
    JobRecord {
        job_id,
        entity: "hero",
        routing_entity: Some("hero"),
        request,
        metadata: &Value::Null,
        correlation_id: "test",
        reply_to: None,
    }
}

fn hero(name: &str) -> Arc<dyn Record> {
    let registry = Registry::builtin();
    let answer = json!({"name": name, "secret_name": "Someone"}).to_string();
    registry.get("hero").expect("hero is registered").hydrate(&answer).expect("a valid hero")
}

async fn acquire(store: &Store, job_id: Uuid, request: &Value) -> Uuid {
    match store.claim_job(&job(job_id, request), LEASE).await.expect("claiming works") {
        Claim::Acquired { token } => token,
        other => panic!("expected to acquire job {job_id}, got {other:?}"),
    }
}

async fn count(store: &Store, sql: &str) -> i64 {
    let row = store.db().query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap().unwrap();
    row.try_get_by_index(0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_simultaneous_claims_on_one_job_exactly_one_acquires() {
    let store = store().await;
    let request = json!({"entity": "hero"});
    let job_id = Uuid::new_v4();
    let claims = join_all((0..50).map(|_| async { store.claim_job(&job(job_id, &request), LEASE).await })).await;
    let claims: Vec<Claim> = claims.into_iter().map(|claim| claim.expect("claiming works")).collect();
    let acquired = claims.iter().filter(|claim| matches!(claim, Claim::Acquired { .. })).count();
    assert_eq!(acquired, 1, "{claims:?}");
    assert!(claims.iter().all(|claim| matches!(claim, Claim::Acquired { .. } | Claim::Busy { .. })), "{claims:?}");

    // Many different jobs at once: each is acquired, with a token of its own.
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let claims = join_all(ids.iter().map(|id| async { store.claim_job(&job(*id, &request), LEASE).await })).await;
    let mut tokens: Vec<Uuid> = claims
        .into_iter()
        .map(|claim| match claim.expect("claiming works") {
            Claim::Acquired { token } => token,
            other => panic!("a fresh job was not acquired: {other:?}"),
        })
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 40);
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'running'").await, 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_stored_fails_alone() {
    let store = store().await;
    let request = json!({"entity": "hero"});
    let trace = CallTrace { attempts: 1, ..Default::default() };
    // Postgres text cannot hold a NUL character: this hero's row is refused.
    let names = ["Ada", "Grace", "Bad\u{0}Name", "Edsger", "Barbara"];
    let mut jobs = Vec::new();
    for name in names {
        let job_id = Uuid::new_v4();
        let token = acquire(&store, job_id, &request).await;
        jobs.push((job_id, token, hero(name)));
    }
    let finishes: Vec<_> = jobs
        .iter()
        .map(|(job_id, token, record)| {
            store.finish(&job(*job_id, &request), *token, &Outcome { result: Ok(record), trace: &trace })
        })
        .collect();
    let stored = join_all(finishes.iter().map(|finish| store.record(finish))).await;

    for (name, stored) in names.iter().zip(&stored) {
        match stored {
            Ok(Some(event)) => assert!(!name.contains('\0'), "{name:?} was stored: {event:?}"),
            Err(error) => {
                assert!(name.contains('\0'), "{name:?} failed: {error}");
                assert!(!is_transient(error), "a refused row is not worth retrying: {error}");
            }
            Ok(None) => panic!("{name:?}: the claim is held, yet the outcome was dropped"),
        }
    }
    assert_eq!(count(&store, "SELECT count(*) FROM hero").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'succeeded'").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM event_outbox").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'running'").await, 1);

    // The worker then fails that job instead; the claim still holds.
    let (job_id, token, _) = &jobs[2];
    let failure = JobError::new(ErrorKind::Internal, "the record could not be stored");
    let finish = store.finish(&job(*job_id, &request), *token, &Outcome { result: Err(&failure), trace: &trace });
    assert!(store.record(&finish).await.expect("a failure can be stored").is_some());
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'failed'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_is_stored_only_under_the_claim_that_holds() {
    let store = store().await;
    let request = json!({"entity": "hero"});
    let trace = CallTrace { attempts: 1, ..Default::default() };
    let job_id = Uuid::new_v4();
    let first = acquire(&store, job_id, &request).await;
    // The first worker's lease runs out; another takes the job over.
    store
        .db()
        .execute_unprepared(&format!(
            "UPDATE generation_job SET lease_expires_at = now() - interval '1 second' WHERE job_id = '{job_id}'"
        ))
        .await
        .unwrap();
    let second = acquire(&store, job_id, &request).await;
    assert_ne!(first, second);

    let (late, current) = (hero("Late"), hero("Current"));
    let late = store.finish(&job(job_id, &request), first, &Outcome { result: Ok(&late), trace: &trace });
    let current = store.finish(&job(job_id, &request), second, &Outcome { result: Ok(&current), trace: &trace });
    let (late, current) = tokio::join!(store.record(&late), store.record(&current));
    assert!(late.expect("no error").is_none(), "the outcome of a lost claim is dropped");
    assert!(current.expect("no error").is_some());
    assert_eq!(count(&store, "SELECT count(*) FROM hero").await, 1);
    assert_eq!(count(&store, "SELECT count(*) FROM hero WHERE name = 'Current'").await, 1);

    // Claimed again once finished: nothing to generate.
    assert_eq!(store.claim_job(&job(job_id, &request), LEASE).await.unwrap(), Claim::Finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_of_many_events_land_on_exactly_those_events() {
    let store = store().await;
    let request = json!({"entity": "hero"});
    let trace = CallTrace { attempts: 1, ..Default::default() };
    let mut events = Vec::new();
    for i in 0..30 {
        let job_id = Uuid::new_v4();
        let token = acquire(&store, job_id, &request).await;
        let record = hero(&format!("Hero {i}"));
        let finish = store.finish(&job(job_id, &request), token, &Outcome { result: Ok(&record), trace: &trace });
        events.push(store.record(&finish).await.unwrap().expect("stored"));
    }
    let (marked, unmarked) = events.split_at(20);
    let marks = join_all(marked.iter().map(|event| store.mark_published(event.event_id))).await;
    assert!(marks.iter().all(Result::is_ok));
    assert_eq!(count(&store, "SELECT count(*) FROM event_outbox WHERE published_at IS NOT NULL").await, 20);
    for event in unmarked {
        let sql =
            format!("SELECT count(*) FROM event_outbox WHERE event_id = '{}' AND published_at IS NULL", event.event_id);
        assert_eq!(count(&store, &sql).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heroes_and_teams_finishing_together_are_each_stored_with_their_heroes() {
    let store = store().await;
    let request = json!({"entity": "any"});
    let trace = CallTrace { attempts: 1, ..Default::default() };
    let registry = Registry::builtin();
    let team = |name: &str| {
        let answer = json!({
            "name": name,
            "headquarters": "Somewhere",
            "heroes": [{"name": format!("{name} One"), "secret_name": "A"}, {"name": format!("{name} Two"), "secret_name": "B"}],
        });
        registry.get("team").expect("team is registered").hydrate(&answer.to_string()).expect("a valid team")
    };
    let records = [hero("Solo 1"), team("Alpha"), hero("Solo 2"), team("Beta"), hero("Solo 3")];
    let mut finishes = Vec::new();
    for record in &records {
        let job_id = Uuid::new_v4();
        let token = acquire(&store, job_id, &request).await;
        finishes.push(store.finish(&job(job_id, &request), token, &Outcome { result: Ok(record), trace: &trace }));
    }
    let stored = join_all(finishes.iter().map(|finish| store.record(finish))).await;
    assert!(stored.iter().all(|stored| matches!(stored, Ok(Some(_)))), "{stored:?}");
    assert_eq!(count(&store, "SELECT count(*) FROM team").await, 2);
    assert_eq!(count(&store, "SELECT count(*) FROM hero WHERE team_id IS NULL").await, 3);
    for name in ["Alpha", "Beta"] {
        let sql = format!(
            "SELECT count(*) FROM hero JOIN team ON team.id = hero.team_id WHERE team.name = '{name}' AND hero.name LIKE '{name} %'"
        );
        assert_eq!(count(&store, &sql).await, 2, "{name}'s heroes belong to {name}");
    }
}
