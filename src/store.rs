//! Postgres side of a job: claiming a job id, and recording its outcome — entity rows, job
//! ledger and completion event — in one transaction (the transactional outbox).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, RuntimeErr, Statement, TransactionTrait,
    Value as DbValue,
};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::batch::Batcher;
use crate::contract::{CompletionEvent, JobError, JobStatus, Usage};
use crate::entities::{Record, insert_records};
use crate::llm::CallTrace;

/// The result of trying to claim a job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns the job until it records the outcome; `token` proves it.
    Acquired { token: Uuid },
    /// The job already finished: its event is announced again, nothing is generated.
    Finished,
    /// Another worker holds a live claim until `lease_expires_at`.
    Busy { lease_expires_at: DateTime<Utc> },
}

/// What the request said about itself, recorded on the job row and echoed in events.
pub struct JobRecord<'a> {
    pub job_id: Uuid,
    /// The entity as the request named it.
    pub entity: &'a str,
    /// The routing key's entity segment (`unknown` unless the entity is registered).
    pub routing_entity: Option<&'a str>,
    pub request: &'a Value,
    pub metadata: &'a Value,
    pub correlation_id: &'a str,
    pub reply_to: Option<&'a str>,
}

/// An event waiting in the outbox, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    pub routing_key: String,
    pub correlation_id: String,
    pub reply_to: Option<String>,
    pub payload: Vec<u8>,
}

/// A job's outcome, ready to record.
pub struct Outcome<'a> {
    pub result: Result<&'a Arc<dyn Record>, &'a JobError>,
    pub trace: &'a CallTrace,
}

// The batched statements read their batch from one JSON parameter with
// `jsonb_to_recordset`, which handles NULLs and any column type, and bound it with
// `LIMIT <batch size>`, so that the planner knows how many rows it joins: with the
// sessions' `plan_cache_mode = force_custom_plan` (see `startup::connect_pool`), a few
// primary-key probes, never a scan of the whole table or of an index full of dead entries.

/// Writers per kind of batched write. One: while it writes a batch, the next one grows.
/// (Two writers made smaller batches and cost 5-10% of the throughput in the benchmark.)
const WRITERS: usize = 1;

/// How long the writer of "published" marks waits for more before writing. A mark holds
/// up no job (it comes after the ack and the confirm, outside the job's slot and the bound
/// on announcements), so its batches can grow: fewer statements and commits for Postgres.
const MARK_LINGER: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    claims: Batcher<ClaimRequest, Claim>,
    outcomes: Batcher<Arc<Finish>, Option<OutboxEvent>>,
    published: Batcher<Uuid, ()>,
}

fn stmt(sql: &str, values: impl IntoIterator<Item = DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// Whether retrying the same statement can succeed (a lost connection, a pool timeout,
/// a restarting server, a deadlock) as opposed to a fault in the data or the statement (a
/// constraint violation, a value Postgres cannot store), which would fail again forever.
pub fn is_transient(error: &DbErr) -> bool {
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(error)) | DbErr::Query(RuntimeErr::SqlxError(error)) => {
            match error.as_ref() {
                // By SQLSTATE class: connection exception, transaction rollback (deadlock,
                // serialization), insufficient resources, operator intervention (shutdown,
                // cancel), system error.
                sqlx::Error::Database(error) => {
                    error.code().is_some_and(|code| ["08", "40", "53", "57", "58"].iter().any(|c| code.starts_with(c)))
                }
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                _ => false,
            }
        }
        DbErr::Exec(RuntimeErr::Internal(_)) | DbErr::Query(RuntimeErr::Internal(_)) => true,
        _ => false,
    }
}

impl Store {
    /// Wraps the pool and starts the writers that group claims, outcomes and "published"
    /// marks of concurrent jobs into shared statements (see [`crate::batch`]).
    ///
    /// Must be called within a Tokio runtime.
    pub fn new(db: DatabaseConnection) -> Self {
        let claims = Batcher::spawn(WRITERS, {
            let db = db.clone();
            move |batch| {
                let db = db.clone();
                async move { claim_batch(&db, batch).await }
            }
        });
        let outcomes = Batcher::spawn(WRITERS, {
            let db = db.clone();
            move |batch| {
                let db = db.clone();
                async move { finish_batch(&db, batch).await }
            }
        });
        let published = Batcher::spawn_lingering(WRITERS, MARK_LINGER, {
            let db = db.clone();
            move |batch| {
                let db = db.clone();
                async move { mark_published_batch(&db, batch).await }
            }
        });
        Self { db, claims, outcomes, published }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Claims `job.job_id` for `lease`: inserts a `running` row, or takes over a running
    /// row whose lease expired (its worker died). Two workers racing on one id serialize
    /// on the primary key; exactly one of them gets [`Claim::Acquired`].
    pub async fn claim_job(&self, job: &JobRecord<'_>, lease: Duration) -> Result<Claim, DbErr> {
        let request = ClaimRequest {
            job_id: job.job_id,
            entity: job.entity.to_owned(),
            request: job.request.clone(),
            lease_secs: lease.as_secs_f64(),
        };
        self.claims.submit(request).await
    }

    /// Extends a running job's lease; `false` if `token` no longer holds the claim.
    pub async fn renew_lease(&self, job_id: Uuid, token: Uuid, lease: Duration) -> Result<bool, DbErr> {
        let result = self
            .db
            .execute_raw(stmt(
                "UPDATE generation_job SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
                  WHERE job_id = $1 AND claim_token = $2 AND status = 'running'",
                [job_id.into(), token.into(), lease.as_secs_f64().into()],
            ))
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Prepares a claimed job's outcome for [`Store::record`]: the row values and the
    /// completion event, serialised once however often the write is retried.
    pub fn finish(&self, job: &JobRecord<'_>, token: Uuid, outcome: &Outcome<'_>) -> Arc<Finish> {
        let trace = outcome.trace;
        let (status, record, error) = match outcome.result {
            Ok(record) => (JobStatus::Succeeded, Some(record.clone()), None),
            Err(error) => (JobStatus::Failed, None, Some(error.clone())),
        };
        let event = CompletionEvent {
            event_id: Uuid::new_v4(),
            job_id: job.job_id,
            status,
            entity: job.entity.to_owned(),
            record: record.as_ref().map(|record| record.to_json()),
            attempts: trace.attempts,
            usage: trace.usage,
            error: error.clone(),
            metadata: job.metadata.clone(),
            finished_at: Utc::now(),
        };
        let outbox = outbox_event(job, &event);
        let row = FinishRow {
            job_id: job.job_id,
            token,
            status: status.as_str(),
            attempts: trace.attempts,
            record_id: record.as_ref().map(|record| record.id()),
            error: error.as_ref(),
            usage: trace.usage,
            responses: &trace.responses,
            event_id: event.event_id,
            routing_key: &outbox.routing_key,
            correlation_id: job.correlation_id,
            reply_to: job.reply_to,
            // The bytes that will be published, not a second serialisation of the event.
            payload: serde_json::from_slice(&outbox.payload).expect("an event serializes to JSON"),
        };
        let row = serde_json::to_string(&row).expect("an outcome serializes");
        Arc::new(Finish { event: outbox, row, record })
    }

    /// Records a claimed job's outcome in one transaction: the entity row(s), the job row
    /// (only if the claim token still holds the claim) and the completion event in the
    /// outbox. Outcomes of concurrent jobs share the transaction.
    ///
    /// Returns `None` when the claim was lost (the lease expired and another worker took
    /// the job over): nothing is written, and the other worker will announce it.
    pub async fn record(&self, finish: &Arc<Finish>) -> Result<Option<OutboxEvent>, DbErr> {
        self.outcomes.submit(finish.clone()).await
    }

    /// Marks an event published once the broker confirmed it; marks of concurrent jobs
    /// share one statement. A mark that is lost (the process dies first) only means the
    /// relay sends the event again.
    pub async fn mark_published(&self, event_id: Uuid) -> Result<(), DbErr> {
        self.published.submit(event_id).await
    }

    /// Records a request that can never succeed: a `failed` job row (unless the id is
    /// already taken) and its `job.failed` event, in one transaction.
    pub async fn record_rejection(&self, job: &JobRecord<'_>, error: &JobError) -> Result<OutboxEvent, DbErr> {
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt(
            "INSERT INTO generation_job (job_id, entity, status, attempts, request, error, usage, finished_at)
             VALUES ($1, $2, 'failed', 0, $3, $4, $5, now())
             ON CONFLICT (job_id) DO NOTHING",
            [
                job.job_id.into(),
                job.entity.into(),
                job.request.clone().into(),
                serde_json::to_value(error).expect("errors serialize").into(),
                serde_json::to_value(Usage::default()).expect("usage serializes").into(),
            ],
        ))
        .await?;
        let event = CompletionEvent {
            event_id: Uuid::new_v4(),
            job_id: job.job_id,
            status: JobStatus::Failed,
            entity: job.entity.to_owned(),
            record: None,
            attempts: 0,
            usage: Usage::default(),
            error: Some(error.clone()),
            metadata: job.metadata.clone(),
            finished_at: Utc::now(),
        };
        let event = insert_event(&txn, job, &event).await?;
        txn.commit().await?;
        Ok(event)
    }

    /// For a job that already finished: a copy of its completion event (new `event_id`),
    /// addressed to this delivery's `correlation_id` and `reply_to`, put in the outbox.
    /// `None` if the job has no event on record.
    pub async fn reannounce(&self, job: &JobRecord<'_>) -> Result<Option<OutboxEvent>, DbErr> {
        let txn = self.db.begin().await?;
        let previous = txn
            .query_one_raw(stmt(
                "SELECT payload FROM event_outbox WHERE job_id = $1 ORDER BY created_at LIMIT 1",
                [job.job_id.into()],
            ))
            .await?;
        let Some(previous) = previous else { return Ok(None) };
        let payload: Value = previous.try_get("", "payload")?;
        let mut event: CompletionEvent = serde_json::from_value(payload).map_err(|e| DbErr::Json(e.to_string()))?;
        event.event_id = Uuid::new_v4();
        let event = insert_event(&txn, job, &event).await?;
        txn.commit().await?;
        Ok(Some(event))
    }
}

async fn insert_event(
    txn: &impl ConnectionTrait,
    job: &JobRecord<'_>,
    event: &CompletionEvent,
) -> Result<OutboxEvent, DbErr> {
    let outbox = outbox_event(job, event);
    txn.execute_raw(stmt(
        "INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, reply_to, payload)
         VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        [
            event.event_id.into(),
            event.job_id.into(),
            outbox.routing_key.as_str().into(),
            job.correlation_id.into(),
            outbox.reply_to.clone().into(),
            std::str::from_utf8(&outbox.payload).expect("serde_json writes UTF-8").into(),
        ],
    ))
    .await?;
    Ok(outbox)
}

fn outbox_event(job: &JobRecord<'_>, event: &CompletionEvent) -> OutboxEvent {
    OutboxEvent {
        event_id: event.event_id,
        routing_key: crate::contract::routing_key(event.status, job.routing_entity),
        correlation_id: job.correlation_id.to_owned(),
        reply_to: job.reply_to.map(str::to_owned),
        payload: serde_json::to_vec(event).expect("events serialize"),
    }
}

/// Reads an outbox row (the relay's query) into an [`OutboxEvent`].
pub fn outbox_event_from_row(row: &QueryResult) -> Result<OutboxEvent, DbErr> {
    let payload: Value = row.try_get("", "payload")?;
    Ok(OutboxEvent {
        event_id: row.try_get("", "event_id")?,
        routing_key: row.try_get("", "routing_key")?,
        correlation_id: row.try_get("", "correlation_id")?,
        reply_to: row.try_get("", "reply_to")?,
        payload: serde_json::to_vec(&payload).expect("JSON serializes"),
    })
}

/// [`Finish::row`]: one outcome as `try_finish_batch` reads it.
#[derive(Serialize)]
struct FinishRow<'a> {
    job_id: Uuid,
    token: Uuid,
    status: &'a str,
    attempts: u32,
    record_id: Option<Uuid>,
    error: Option<&'a JobError>,
    usage: Usage,
    responses: &'a [Value],
    event_id: Uuid,
    routing_key: &'a str,
    correlation_id: &'a str,
    reply_to: Option<&'a str>,
    payload: &'a RawValue,
}

/// A claim waiting for its batch.
pub struct ClaimRequest {
    job_id: Uuid,
    entity: String,
    request: Value,
    lease_secs: f64,
}

/// A claimed job's outcome, prepared by [`Store::finish`].
pub struct Finish {
    /// What is announced once the outcome is committed.
    event: OutboxEvent,
    /// The job row's new values and the event's outbox row, as one JSON object of the
    /// batch's `jsonb_to_recordset`, serialized once when the outcome is ready.
    row: String,
    record: Option<Arc<dyn Record>>,
}

/// Claims a batch of jobs in one statement. A job id twice in the batch (the same request
/// delivered twice at once) is claimed once; the other copy finds it busy.
async fn claim_batch(db: &DatabaseConnection, batch: Vec<ClaimRequest>) -> Vec<Result<Claim, DbErr>> {
    match try_claim_batch(db, &batch).await {
        Ok(claims) => claims.into_iter().map(Ok).collect(),
        Err(error) => one_by_one(&batch, error, |claim| try_claim_batch(db, std::slice::from_ref(claim))).await,
    }
}

async fn try_claim_batch(db: &DatabaseConnection, batch: &[ClaimRequest]) -> Result<Vec<Claim>, DbErr> {
    let mut first = HashMap::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for (i, claim) in batch.iter().enumerate() {
        if first.insert(claim.job_id, i).is_none() {
            rows.push(json!({
                "job_id": claim.job_id,
                "entity": claim.entity,
                "request": claim.request,
                "token": Uuid::new_v4(),
                "lease_secs": claim.lease_secs,
            }));
        }
    }
    // The statement's snapshot predates its own inserts and updates: a row the CTE claimed
    // comes back through `claimed`; one it could not claim through `generation_job` as it
    // was (`NULL` only if another transaction inserted it meanwhile: a claim just taken).
    let claimed = db
        .query_all_raw(stmt(
            "WITH batch AS (
                SELECT * FROM jsonb_to_recordset($2) AS b(job_id uuid, entity text, request jsonb, token uuid, lease_secs float8)
                 LIMIT $1
             ), claimed AS (
                INSERT INTO generation_job (job_id, entity, status, attempts, request, claim_token, lease_expires_at)
                SELECT job_id, entity, 'running', 0, request, token, now() + make_interval(secs => lease_secs) FROM batch
                ON CONFLICT (job_id) DO UPDATE
                   SET claim_token = EXCLUDED.claim_token,
                       lease_expires_at = EXCLUDED.lease_expires_at,
                       updated_at = now()
                 WHERE generation_job.status = 'running' AND generation_job.lease_expires_at < now()
                RETURNING job_id, claim_token
             )
             SELECT batch.job_id, claimed.claim_token, job.status, job.lease_expires_at
               FROM batch
               LEFT JOIN claimed ON claimed.job_id = batch.job_id
               LEFT JOIN generation_job job ON job.job_id = batch.job_id",
            [(rows.len() as i64).into(), Value::Array(rows).into()],
        ))
        .await?;
    let mut by_job = HashMap::with_capacity(claimed.len());
    for row in &claimed {
        let job_id: Uuid = row.try_get("", "job_id")?;
        let token: Option<Uuid> = row.try_get("", "claim_token")?;
        let status: Option<String> = row.try_get("", "status")?;
        let lease_expires_at: Option<DateTime<Utc>> = row.try_get("", "lease_expires_at")?;
        let claim = match (token, status.as_deref()) {
            (Some(token), _) => Claim::Acquired { token },
            (None, Some("running") | None) => {
                Claim::Busy { lease_expires_at: lease_expires_at.unwrap_or_else(Utc::now) }
            }
            (None, Some(_)) => Claim::Finished,
        };
        by_job.insert(job_id, claim);
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, claim)| {
            let result = by_job
                .get(&claim.job_id)
                .cloned()
                .ok_or_else(|| DbErr::Custom(format!("claiming job {} returned no row", claim.job_id)))?;
            Ok::<_, DbErr>(match result {
                // A second copy of a job this batch claims waits like any other duplicate.
                Claim::Acquired { .. } if first[&claim.job_id] != i => Claim::Busy {
                    lease_expires_at: Utc::now() + chrono::Duration::milliseconds((claim.lease_secs * 1000.0) as i64),
                },
                other => other,
            })
        })
        .collect()
}

/// Records a batch of outcomes in one transaction: the job rows whose claim still holds
/// and their outbox rows in one statement, then their entity rows.
async fn finish_batch(db: &DatabaseConnection, batch: Vec<Arc<Finish>>) -> Vec<Result<Option<OutboxEvent>, DbErr>> {
    let stored = match try_finish_batch(db, &batch).await {
        Ok(stored) => stored.into_iter().map(Ok).collect(),
        Err(error) => one_by_one(&batch, error, |finish| try_finish_batch(db, std::slice::from_ref(finish))).await,
    };
    batch.iter().zip(stored).map(|(finish, stored)| Ok(stored?.then(|| finish.event.clone()))).collect()
}

/// Whether each outcome of `batch` was stored (`false`: its claim was lost).
async fn try_finish_batch(db: &DatabaseConnection, batch: &[Arc<Finish>]) -> Result<Vec<bool>, DbErr> {
    let mut rows = String::with_capacity(batch.iter().map(|finish| finish.row.len() + 1).sum::<usize>() + 2);
    rows.push('[');
    for (index, finish) in batch.iter().enumerate() {
        if index > 0 {
            rows.push(',');
        }
        rows.push_str(&finish.row);
    }
    rows.push(']');
    let txn = db.begin().await?;
    let stored = txn
        .query_all_raw(stmt(
            "WITH batch AS (
                SELECT * FROM jsonb_to_recordset($2::jsonb) AS b(
                    job_id uuid, token uuid, status text, attempts int, record_id uuid, error jsonb, usage jsonb,
                    responses jsonb, event_id uuid, routing_key text, correlation_id text, reply_to text, payload jsonb)
                 LIMIT $1
             ), finished AS (
                UPDATE generation_job job
                   SET status = batch.status, attempts = batch.attempts, record_id = batch.record_id,
                       error = batch.error, usage = batch.usage, responses = batch.responses,
                       claim_token = NULL, lease_expires_at = NULL, updated_at = now(), finished_at = now()
                  FROM batch
                 -- A claim token is set only while the job runs.
                 WHERE job.job_id = batch.job_id AND job.claim_token = batch.token
                RETURNING batch.event_id
             ), announced AS (
                INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, reply_to, payload)
                SELECT batch.event_id, batch.job_id, batch.routing_key, batch.correlation_id, batch.reply_to, batch.payload
                  FROM batch JOIN finished USING (event_id)
             )
             SELECT event_id FROM finished",
            [(batch.len() as i64).into(), rows.into()],
        ))
        .await?;
    let stored: HashSet<Uuid> = stored.iter().map(|row| row.try_get("", "event_id")).collect::<Result<_, _>>()?;
    let result: Vec<bool> = batch.iter().map(|finish| stored.contains(&finish.event.event_id)).collect();
    let records: Vec<&dyn Record> = batch
        .iter()
        .zip(&result)
        .filter(|(_, kept)| **kept)
        .filter_map(|(finish, _)| finish.record.as_deref())
        .collect();
    insert_records(&records, &txn).await?;
    txn.commit().await?;
    Ok(result)
}

/// Marks a batch of events published.
async fn mark_published_batch(db: &DatabaseConnection, batch: Vec<Uuid>) -> Vec<Result<(), DbErr>> {
    match mark_published_in(db, &batch).await {
        Ok(_) => batch.iter().map(|_| Ok(())).collect(),
        Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
    }
}

/// Marks events published, in `db` (a transaction or the pool): the batched marks of
/// [`Store::mark_published`], and the relay's own, in the transaction that holds the rows.
pub async fn mark_published_in(db: &impl ConnectionTrait, event_ids: &[Uuid]) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        "UPDATE event_outbox SET published_at = coalesce(published_at, now()), last_error = NULL
          WHERE event_id IN (SELECT jsonb_array_elements_text($2)::uuid LIMIT $1)",
        [(event_ids.len() as i64).into(), json!(event_ids).into()],
    ))
    .await?;
    Ok(())
}

/// After a batch failed with `error`: when the fault may lie in one item's data (a
/// constraint an entity row breaks), writes each item alone, so that only that item
/// fails; when the database is unavailable, every item gets the error and is retried.
async fn one_by_one<'a, I, O, F, Fut>(batch: &'a [I], error: DbErr, alone: F) -> Vec<Result<O, DbErr>>
where
    F: Fn(&'a I) -> Fut,
    Fut: Future<Output = Result<Vec<O>, DbErr>>,
{
    if batch.len() == 1 || is_transient(&error) {
        return batch.iter().map(|_| Err(error.clone())).collect();
    }
    let mut results = Vec::with_capacity(batch.len());
    for item in batch {
        results.push(alone(item).await.and_then(|mut one| one.pop().ok_or_else(|| error.clone())));
    }
    results
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};

    use super::is_transient;

    fn sqlx(error: sqlx::Error) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(error)))
    }

    #[test]
    fn outages_are_transient_and_faults_in_the_data_are_not() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for transient in [
            sqlx(sqlx::Error::Io(reset)),
            sqlx(sqlx::Error::PoolTimedOut),
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            DbErr::Conn(RuntimeErr::Internal("gone".into())),
        ] {
            assert!(is_transient(&transient), "{transient}");
        }
        for fault in [
            sqlx(sqlx::Error::ColumnNotFound("x".into())),
            DbErr::Json("bad".into()),
            DbErr::Custom("no".into()),
            DbErr::RecordNotInserted,
        ] {
            assert!(!is_transient(&fault), "{fault}");
        }
    }
}
