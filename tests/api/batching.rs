//! Group commits (`src/batch.rs`): concurrent jobs' claims, outcomes and marks share
//! statements, yet what one job claims, writes or breaks stays its own. These drive the
//! store directly, many jobs at once; which of them end up in the same batch varies from
//! run to run, and none of the assertions depends on it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use instructd::contract::{ErrorKind, JobError};
use instructd::entities::Record;
use instructd::job::{CallTrace, JobRecord};
use instructd::store::{Claim, DbFault, Outcome, Store, StoreSettings, classify};
use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Leftovers, create_database};

/// A store on a fresh, migrated database, as worker `worker_id`.
pub async fn store_as(db: sea_orm::DatabaseConnection, worker_id: i64) -> Store {
    let settings =
        StoreSettings { worker_id, takeover_after: Duration::from_secs(4), max_responses_bytes: 1024 * 1024 };
    Store::new(db, settings)
}

/// A store on a database of its own, dropped with the [`Leftovers`] returned beside it.
async fn store() -> (Store, Leftovers) {
    let url = create_database().await;
    let database = Leftovers::database(&url);
    let db = Database::connect(url).await.expect("the test database is reachable");
    migration::Migrator::up(&db, None).await.expect("migrations apply");
    (store_as(db, 1).await, database)
}

/// A request's text, as a job holds it.
pub fn raw(request: Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(&request).expect("JSON")
}

pub fn job<'a>(job_id: Uuid, request: &'a RawValue) -> JobRecord<'a> {
    JobRecord {
        job_id,
        entity: "hero",
        routing_entity: Some("hero"),
        request,
        metadata: &Value::Null,
        correlation_id: "test",
        reply_to: None,
        trace: None,
    }
}

pub fn hero(name: &str) -> Arc<dyn Record> {
    let app = instructd::heroes::app();
    let registry = app.registry();
    let answer = json!({"name": name, "secret_name": "Someone"}).to_string();
    registry.get("hero").expect("hero is registered").hydrate(&answer).expect("a valid hero")
}

pub async fn acquire(store: &Store, job_id: Uuid, request: &RawValue) -> Uuid {
    match store.claim_job(&job(job_id, request)).await.expect("claiming works") {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected to acquire job {job_id}, got {other:?}"),
    }
}

pub async fn count(store: &Store, sql: &str) -> i64 {
    let row = store.db().query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap().unwrap();
    row.try_get_by_index(0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_simultaneous_claims_on_one_job_exactly_one_acquires() {
    // Ten live workers (each holds its session lock and writes its heartbeat) claim one job
    // at once; a worker claims a job once (it knows what it runs).
    let url = create_database().await;
    let _database = Leftovers::database(&url);
    let db = Database::connect(url.as_str()).await.expect("the test database is reachable");
    migration::Migrator::up(&db, None).await.expect("migrations apply");
    let mut workers = Vec::new();
    for worker_id in 100..110 {
        let mut session = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
        assert!(instructd::store::presence::lock(&mut session, worker_id).await.unwrap());
        instructd::store::presence::heartbeat(&mut session, worker_id).await.unwrap();
        workers.push((store_as(db.clone(), worker_id).await, session));
    }
    let request = raw(json!({"entity": "hero"}));
    let job_id = Uuid::new_v4();
    let claims =
        join_all(workers.iter().map(|(store, _)| async { store.claim_job(&job(job_id, &request)).await })).await;
    let claims: Vec<Claim> = claims.into_iter().map(|claim| claim.expect("claiming works")).collect();
    let acquired = claims.iter().filter(|claim| matches!(claim, Claim::Acquired { .. })).count();
    assert_eq!(acquired, 1, "{claims:?}");
    assert!(claims.iter().all(|claim| matches!(claim, Claim::Acquired { .. } | Claim::Busy)), "{claims:?}");

    // Many different jobs at once: each is acquired, with a token of its own.
    let store = &workers[0].0;
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let claims = join_all(ids.iter().map(|id| async { store.claim_job(&job(*id, &request)).await })).await;
    let mut tokens: Vec<Uuid> = claims
        .into_iter()
        .map(|claim| match claim.expect("claiming works") {
            Claim::Acquired { token, takeovers: 0, .. } => token,
            other => panic!("a fresh job was not acquired: {other:?}"),
        })
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 40);
    assert_eq!(count(store, "SELECT count(*) FROM generation_job WHERE status = 'running'").await, 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_stored_fails_alone() {
    let (store, _database) = store().await;
    let request = raw(json!({"entity": "hero"}));
    let trace = CallTrace { attempts: 1, ..Default::default() };
    // The fifth job's record is the second's, with the same primary key: whichever of the
    // two is inserted second breaks the key, whether they share a batch or not.
    let heroes = ["Ada", "Grace", "Edsger", "Barbara"].map(hero);
    let records = [&heroes[0], &heroes[1], &heroes[2], &heroes[3], &heroes[1]];
    let mut jobs = Vec::new();
    for record in records {
        let job_id = Uuid::new_v4();
        let token = acquire(&store, job_id, &request).await;
        jobs.push((job_id, token, record.clone()));
    }
    let finishes: Vec<_> = jobs
        .iter()
        .map(|(job_id, token, record)| {
            store.finish(&job(*job_id, &request), *token, &Outcome { result: Ok(record), trace: &trace })
        })
        .collect();
    let stored = join_all(finishes.iter().map(|finish| store.record(finish))).await;

    let mut failed = Vec::new();
    for (index, stored) in stored.iter().enumerate() {
        match stored {
            Ok(Some(_)) => {}
            Err(error) => {
                assert_eq!(classify(error), DbFault::Data, "a refused row is not worth retrying: {error}");
                failed.push(index);
            }
            Ok(None) => panic!("job {index}: the claim is held, yet the outcome was dropped"),
        }
    }
    assert!(failed == [1] || failed == [4], "only one of the two jobs with the same record fails: {failed:?}");
    assert_eq!(count(&store, "SELECT count(*) FROM hero").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'succeeded'").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM event_outbox").await, 4);
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'running'").await, 1);

    // The worker then fails that job instead; the claim still holds.
    let (job_id, token, _) = &jobs[failed[0]];
    let failure = JobError::new(ErrorKind::Internal, "the record could not be stored");
    let finish = store.finish(&job(*job_id, &request), *token, &Outcome { result: Err(&failure), trace: &trace });
    assert!(store.record(&finish).await.expect("a failure can be stored").is_some());
    assert_eq!(count(&store, "SELECT count(*) FROM generation_job WHERE status = 'failed'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_is_stored_only_under_the_claim_that_holds() {
    let (store, _database) = store().await;
    let request = raw(json!({"entity": "hero"}));
    let trace = CallTrace { attempts: 1, ..Default::default() };
    let job_id = Uuid::new_v4();
    let first = acquire(&store, job_id, &request).await;
    // The first worker is gone (it never wrote a heartbeat); another takes the job over.
    let other = store_as(store.db().clone(), 2).await;
    let second = acquire(&other, job_id, &request).await;
    assert_ne!(first, second);

    let (late, current) = (hero("Late"), hero("Current"));
    let late = store.finish(&job(job_id, &request), first, &Outcome { result: Ok(&late), trace: &trace });
    let current = store.finish(&job(job_id, &request), second, &Outcome { result: Ok(&current), trace: &trace });
    let (late, current) = tokio::join!(store.record(&late), store.record(&current));
    assert!(late.expect("no error").is_none(), "the outcome of a lost claim is dropped");
    assert!(current.expect("no error").is_some());
    assert_eq!(count(&store, "SELECT count(*) FROM hero").await, 1);
    assert_eq!(count(&store, "SELECT count(*) FROM hero WHERE name = 'Current'").await, 1);

    // Claimed again once finished: nothing to generate, and the event as announced.
    match store.claim_job(&job(job_id, &request)).await.unwrap() {
        Claim::Finished { event: Some(event) } => {
            assert_eq!(event.routing_key, "job.succeeded.hero");
            assert_eq!(event.payload["record"]["name"], "Current");
        }
        other => panic!("expected the finished job's event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_of_many_events_land_on_exactly_those_events() {
    let (store, _database) = store().await;
    let request = raw(json!({"entity": "hero"}));
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
    let (store, _database) = store().await;
    let request = raw(json!({"entity": "any"}));
    let trace = CallTrace { attempts: 1, ..Default::default() };
    let app = instructd::heroes::app();
    let registry = app.registry();
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
