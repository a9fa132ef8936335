//! Postgres side of a job: claiming a job id, and recording its outcome — entity rows, job
//! ledger and completion event — in one transaction (the transactional outbox).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement, TransactionTrait, Value as DbValue,
};
use serde_json::Value;
use uuid::Uuid;

use crate::contract::{CompletionEvent, JobError, JobStatus, Usage};
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
    pub result: Result<&'a dyn crate::entities::Record, &'a JobError>,
    pub trace: &'a CallTrace,
}

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn stmt(sql: &str, values: impl IntoIterator<Item = DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// Whether retrying the same statement can succeed (a lost connection, a pool timeout)
/// as opposed to a fault in the data (a constraint violation).
pub fn is_transient(error: &DbErr) -> bool {
    error.sql_err().is_none()
        && !matches!(error, DbErr::Json(_) | DbErr::Type(_) | DbErr::RecordNotInserted | DbErr::Custom(_))
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Claims `job.job_id` for `lease`: inserts a `running` row, or takes over a running
    /// row whose lease expired (its worker died). Two workers racing on one id serialize
    /// on the primary key; exactly one of them gets [`Claim::Acquired`].
    pub async fn claim_job(&self, job: &JobRecord<'_>, lease: Duration) -> Result<Claim, DbErr> {
        let token = Uuid::new_v4();
        let claimed = self
            .db
            .query_one_raw(stmt(
                "INSERT INTO generation_job (job_id, entity, status, attempts, request, claim_token, lease_expires_at)
                 VALUES ($1, $2, 'running', 0, $3, $4, now() + make_interval(secs => $5))
                 ON CONFLICT (job_id) DO UPDATE
                    SET claim_token = EXCLUDED.claim_token,
                        lease_expires_at = EXCLUDED.lease_expires_at,
                        updated_at = now()
                  WHERE generation_job.status = 'running' AND generation_job.lease_expires_at < now()
                 RETURNING job_id",
                [
                    job.job_id.into(),
                    job.entity.into(),
                    job.request.clone().into(),
                    token.into(),
                    lease.as_secs_f64().into(),
                ],
            ))
            .await?;
        if claimed.is_some() {
            return Ok(Claim::Acquired { token });
        }
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT status, lease_expires_at FROM generation_job WHERE job_id = $1",
                [job.job_id.into()],
            ))
            .await?;
        let Some(row) = row else {
            // Deleted between the two statements: claim again.
            return Box::pin(self.claim_job(job, lease)).await;
        };
        let status: String = row.try_get("", "status")?;
        if status == "running" {
            let lease_expires_at: Option<DateTime<Utc>> = row.try_get("", "lease_expires_at")?;
            Ok(Claim::Busy { lease_expires_at: lease_expires_at.unwrap_or_else(Utc::now) })
        } else {
            Ok(Claim::Finished)
        }
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

    /// Records a claimed job's outcome in one transaction: the entity row(s), the job row
    /// (only if `token` still holds the claim) and the completion event in the outbox.
    ///
    /// Returns `None` when the claim was lost (the lease expired and another worker took
    /// the job over): nothing is written, and the other worker will announce it.
    pub async fn record_outcome(
        &self,
        job: &JobRecord<'_>,
        token: Uuid,
        outcome: &Outcome<'_>,
    ) -> Result<Option<OutboxEvent>, DbErr> {
        let trace = outcome.trace;
        let usage = serde_json::to_value(trace.usage).expect("usage serializes");
        let responses = Value::Array(trace.responses.clone());
        let (status, record, record_id, error) = match outcome.result {
            Ok(record) => (JobStatus::Succeeded, Some(record.to_json()), Some(record.id()), None),
            Err(error) => (JobStatus::Failed, None, None, Some(error.clone())),
        };
        let txn = self.db.begin().await?;
        if let Ok(record) = outcome.result {
            record.insert(&txn).await?;
        }
        let updated = txn
            .execute_raw(stmt(
                "UPDATE generation_job
                    SET status = $3, attempts = $4, record_id = $5, error = $6, usage = $7, responses = $8,
                        claim_token = NULL, lease_expires_at = NULL, updated_at = now(), finished_at = now()
                  WHERE job_id = $1 AND claim_token = $2 AND status = 'running'",
                [
                    job.job_id.into(),
                    token.into(),
                    status.as_str().into(),
                    (trace.attempts as i32).into(),
                    record_id.into(),
                    error.as_ref().map(|e| serde_json::to_value(e).expect("errors serialize")).into(),
                    usage.into(),
                    responses.into(),
                ],
            ))
            .await?;
        if updated.rows_affected() != 1 {
            txn.rollback().await?;
            return Ok(None);
        }
        let event = CompletionEvent {
            event_id: Uuid::new_v4(),
            job_id: job.job_id,
            status,
            entity: job.entity.to_owned(),
            record,
            attempts: trace.attempts,
            usage: trace.usage,
            error,
            metadata: job.metadata.clone(),
            finished_at: Utc::now(),
        };
        let event = insert_event(&txn, job, &event).await?;
        txn.commit().await?;
        Ok(Some(event))
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
    let payload = serde_json::to_value(event).expect("events serialize");
    let routing_key = crate::contract::routing_key(event.status, job.routing_entity);
    txn.execute_raw(stmt(
        "INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, reply_to, payload)
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            event.event_id.into(),
            event.job_id.into(),
            routing_key.as_str().into(),
            job.correlation_id.into(),
            job.reply_to.map(str::to_owned).into(),
            payload.clone().into(),
        ],
    ))
    .await?;
    Ok(OutboxEvent {
        event_id: event.event_id,
        routing_key,
        correlation_id: job.correlation_id.to_owned(),
        reply_to: job.reply_to.map(str::to_owned),
        payload: serde_json::to_vec(&payload).expect("events serialize"),
    })
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
