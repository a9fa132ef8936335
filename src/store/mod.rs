//! Everything instructd keeps in Postgres, and all of its SQL:
//! - [`claims`]: claiming a job id, and handing a claim back;
//! - [`outcomes`]: a job's outcome — entity rows, job row and completion event — in one
//!   transaction (the transactional outbox), a rejected request's failure, and the event a
//!   duplicate of a finished job is answered with;
//! - [`outbox`]: marking events published, and the relay's queries;
//! - [`presence`]: each daemon's heartbeat and session lock, which tell a live claim from an
//!   abandoned one;
//! - [`retention`]: pruning what is old;
//! - [`jobs`]: the job ledger read for people (the console, its API, `instructd jobs`);
//! - [`migration_lock`]: replicas migrating one database take turns;
//! - [`fault`]: what a database error means for the work that hit it.
//!
//! Concurrent jobs' claims, outcomes and "published" marks share statements ([`crate::batch`]).

pub mod claims;
pub mod fault;
pub mod jobs;
pub mod migration_lock;
pub mod outbox;
pub mod outcomes;
pub mod presence;
pub mod retention;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DatabaseConnection, DbBackend, DbErr, Statement, Value as DbValue};
use uuid::Uuid;

use crate::batch::Batcher;
use crate::contract::JobError;
use crate::entities::Record;
use crate::job::{CallTrace, OutboxEvent};

pub use claims::Claim;
pub use fault::{DbFault, classify};
pub use outbox::mark_published_in;
pub use outcomes::Finish;

/// A job's outcome, ready to record.
pub struct Outcome<'a> {
    pub result: Result<&'a Arc<dyn Record>, &'a JobError>,
    pub trace: &'a CallTrace,
}

/// How this process stores: who it is, when another worker's claim counts as abandoned, and
/// how much of a job's raw responses it keeps.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// This daemon's `worker.worker_id` (see [`presence`]).
    pub worker_id: i64,
    /// `worker.takeover_after_secs`.
    pub takeover_after: Duration,
    /// `limits.max_responses_bytes`.
    pub max_responses_bytes: usize,
}

// The batched statements read their batch from one JSON parameter with
// `jsonb_to_recordset`, which handles NULLs and any column type, and bound it with
// `LIMIT <batch size>`. They reach rows by primary key only: on the write pool's sessions
// (`startup::Planning::KeyProbes`, sequential scans off) the plan each session caches for
// them is a few primary-key probes whatever the tables' sizes, never a scan of a table.

/// Writers per kind of batched write. One: while it writes a batch, the next one grows.
/// (Two writers made smaller batches and cost 5-10% of the throughput in the benchmark.)
const WRITERS: usize = 1;

/// The connections of the batched writes' own pool ([`Store::with_write_pool`]): one for
/// each writer of claims, outcomes and "published" marks.
pub const WRITE_CONNECTIONS: u32 = 3 * WRITERS as u32;

/// How long the writer of "published" marks waits for more before writing. A mark holds
/// up no job (it comes after the ack and the confirm, outside the job's slot and the bound
/// on announcements), so its batches can grow: fewer statements and commits for Postgres.
const MARK_LINGER: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    settings: StoreSettings,
    claims: Batcher<claims::ClaimRequest, Claim>,
    outcomes: Batcher<Arc<Finish>, Option<OutboxEvent>>,
    published: Batcher<Uuid, ()>,
}

fn stmt(sql: &str, values: impl IntoIterator<Item = DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

impl Store {
    /// Wraps the pool and starts the writers that group claims, outcomes and "published"
    /// marks of concurrent jobs into shared statements (see [`crate::batch`]).
    ///
    /// Must be called within a Tokio runtime.
    pub fn new(db: DatabaseConnection, settings: StoreSettings) -> Self {
        Self::with_write_pool(db.clone(), db, settings)
    }

    /// Like [`new`](Self::new), with the batched writes on a pool of their own (`writes`,
    /// whose sessions keep their plans: see `startup::Planning::KeyProbes`), and every other
    /// query on `db`.
    ///
    /// Must be called within a Tokio runtime.
    pub fn with_write_pool(db: DatabaseConnection, writes: DatabaseConnection, settings: StoreSettings) -> Self {
        let claims = Batcher::spawn(WRITERS, {
            let db = writes.clone();
            move |batch| {
                let db = db.clone();
                async move { claims::claim_batch(&db, batch, settings).await }
            }
        });
        let outcomes = Batcher::spawn(WRITERS, {
            let db = writes.clone();
            move |batch| {
                let db = db.clone();
                async move { outcomes::finish_batch(&db, batch).await }
            }
        });
        let published = Batcher::spawn_lingering(WRITERS, MARK_LINGER, {
            let db = writes;
            move |batch| {
                let db = db.clone();
                async move { outbox::mark_published_batch(&db, batch).await }
            }
        });
        Self { db, settings, claims, outcomes, published }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }
}

/// After a batch failed with `error`: when the fault may lie with one item (a constraint an
/// entity row breaks, a table the database refuses to write), writes each item alone, so
/// that only that item fails or waits; when the database is unavailable, every item gets the
/// error.
async fn one_by_one<'a, I, O, F, Fut>(batch: &'a [I], error: DbErr, alone: F) -> Vec<Result<O, DbErr>>
where
    F: Fn(&'a I) -> Fut,
    Fut: Future<Output = Result<Vec<O>, DbErr>>,
{
    if batch.len() == 1 || classify(&error) == DbFault::Outage {
        return batch.iter().map(|_| Err(error.clone())).collect();
    }
    let mut results = Vec::with_capacity(batch.len());
    for item in batch {
        results.push(alone(item).await.and_then(|mut one| one.pop().ok_or_else(|| error.clone())));
    }
    results
}
