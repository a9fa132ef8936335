//! A job's outcome — entity rows, job row and completion event — in one transaction (the
//! transactional outbox); a rejected request's failure; and the event a duplicate of a
//! finished job is answered with.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use super::claims::StoredEvent;
use super::outbox::outbox_event;
use super::{Outcome, Store, one_by_one, stmt};
use crate::contract::{CompletionEvent, JobError, JobStatus, Usage};
use crate::entities::{Record, insert_records};
use crate::job::{Call, JobRecord, OutboxEvent};
use crate::text;

/// A claimed job's outcome, prepared by [`Store::finish`].
pub struct Finish {
    /// What is announced once the outcome is committed.
    event: OutboxEvent,
    /// The job row's new values and the event's outbox row, as one JSON object of the
    /// batch's `jsonb_to_recordset`, serialized once when the outcome is ready.
    row: String,
    record: Option<Arc<dyn Record>>,
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
    responses: Vec<Box<RawValue>>,
    calls: &'a [Call],
    event_id: Uuid,
    routing_key: &'a str,
    correlation_id: &'a str,
    reply_to: Option<&'a str>,
    payload: &'a RawValue,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Store {
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
            models: trace.models(),
            model: record.as_ref().and_then(|_| trace.calls.last()).map(|call| call.model.clone()),
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
            responses: storable_responses(&trace.responses, self.settings.max_responses_bytes),
            calls: &trace.calls,
            event_id: event.event_id,
            routing_key: &outbox.routing_key,
            correlation_id: job.correlation_id,
            reply_to: job.reply_to,
            // The bytes that will be published, not a second serialisation of the event.
            payload: serde_json::from_slice(&outbox.payload).expect("an event serializes to JSON"),
            traceparent: job.trace.map(|trace| trace.traceparent.as_str()),
            tracestate: job.trace.and_then(|trace| trace.tracestate.as_deref()),
        };
        let row = serde_json::to_string(&row).expect("an outcome serializes");
        Arc::new(Finish { event: outbox, row, record })
    }

    /// Records a claimed job's outcome in one transaction: the entity row(s), the job row
    /// (only if the claim token still holds the claim) and the completion event in the
    /// outbox. Outcomes of concurrent jobs share the transaction.
    ///
    /// Returns `None` when the claim was lost (its worker was taken for gone and another
    /// took the job over): nothing is written, and the other worker will announce it.
    pub async fn record(&self, finish: &Arc<Finish>) -> Result<Option<OutboxEvent>, DbErr> {
        self.outcomes.submit(finish.clone()).await
    }

    /// Records a request that can never succeed: a `failed` job row and its `job.failed`
    /// event, in one statement — unless the job id already has a row (a running or finished
    /// job, or this very rejection recorded before): then nothing is written and `None` is
    /// returned, so that no event contradicts the row.
    pub async fn record_rejection(&self, job: &JobRecord<'_>, error: &JobError) -> Result<Option<OutboxEvent>, DbErr> {
        let event = CompletionEvent {
            event_id: Uuid::new_v4(),
            job_id: job.job_id,
            status: JobStatus::Failed,
            entity: job.entity.to_owned(),
            record: None,
            attempts: 0,
            usage: Usage::default(),
            models: Vec::new(),
            model: None,
            error: Some(error.clone()),
            metadata: job.metadata.clone(),
            finished_at: Utc::now(),
        };
        let outbox = outbox_event(job, &event);
        let payload = std::str::from_utf8(&outbox.payload).expect("serde_json writes UTF-8");
        let inserted = self
            .db
            .query_one_raw(stmt(
                "WITH job AS (
                    INSERT INTO generation_job
                           (job_id, entity, status, attempts, request, error, usage, finished_at, event, event_routing_key)
                    VALUES ($1, $2, 'failed', 0, $3::jsonb, $4, $5, now(), $6::jsonb, $7)
                    ON CONFLICT (job_id) DO NOTHING
                    RETURNING job_id
                 )
                 INSERT INTO event_outbox
                        (event_id, job_id, routing_key, correlation_id, reply_to, payload, traceparent, tracestate)
                 SELECT $8, job_id, $7, $9, $10, $6::jsonb, $11, $12 FROM job
                 RETURNING event_id",
                [
                    job.job_id.into(),
                    job.entity.into(),
                    job.request.get().into(),
                    serde_json::to_value(error).expect("errors serialize").into(),
                    serde_json::to_value(Usage::default()).expect("usage serializes").into(),
                    payload.into(),
                    outbox.routing_key.as_str().into(),
                    outbox.event_id.into(),
                    job.correlation_id.into(),
                    outbox.reply_to.clone().into(),
                    job.trace.map(|trace| trace.traceparent.clone()).into(),
                    job.trace.and_then(|trace| trace.tracestate.clone()).into(),
                ],
            ))
            .await?;
        Ok(inserted.map(|_| outbox))
    }
}

/// The event a duplicate delivery of a finished job is answered with: the one announced for
/// the job (so it agrees with the job row, and keeps the routing key it was announced with),
/// under a new `event_id`, addressed to this delivery's `correlation_id` and `reply_to`.
pub fn reannouncement(job: &JobRecord<'_>, stored: &StoredEvent) -> Result<OutboxEvent, DbErr> {
    let mut payload = stored.payload.clone();
    let event_id = Uuid::new_v4();
    match payload.as_object_mut() {
        Some(event) => event.insert("event_id".to_owned(), json!(event_id)),
        None => return Err(DbErr::Json(format!("the stored event of job {} is not an object", job.job_id))),
    };
    Ok(OutboxEvent {
        event_id,
        routing_key: stored.routing_key.clone(),
        correlation_id: job.correlation_id.to_owned(),
        reply_to: job.reply_to.map(str::to_owned),
        payload: serde_json::to_vec(&payload).expect("JSON serializes"),
        // This delivery's trace: the duplicate's sender follows its own request.
        trace: job.trace.cloned(),
    })
}

/// The raw responses as the job row keeps them: NUL characters written out (Postgres
/// `jsonb` refuses them), and at most `max_bytes` of them; each one past that is replaced by
/// a note of its size. The bytes measured are the bytes embedded in the row.
fn storable_responses(responses: &[Box<RawValue>], max_bytes: usize) -> Vec<Box<RawValue>> {
    let mut kept = 0usize;
    responses
        .iter()
        .map(|response| {
            let text = storable_response(response);
            kept = kept.saturating_add(text.get().len());
            if kept <= max_bytes {
                text
            } else {
                let note = format!("{} bytes, over limits.max_responses_bytes ({max_bytes})", text.get().len());
                serde_json::value::to_raw_value(&json!({ "omitted": note })).expect("JSON serializes")
            }
        })
        .collect()
}

/// One response as `jsonb` can store it: a response without a NUL is kept as it came.
fn storable_response(response: &RawValue) -> Box<RawValue> {
    if !text::json_has_nul(response.get().as_bytes()) {
        return response.to_owned();
    }
    match serde_json::from_str::<Value>(response.get()) {
        Ok(value) => serde_json::value::to_raw_value(&*text::storable_json(&value)),
        // (Deeper than a tree may be: the client refuses such an answer before it gets here.)
        Err(error) => serde_json::value::to_raw_value(&json!({
            "omitted": format!("a response with a NUL that could not be rewritten: {error}")
        })),
    }
    .expect("JSON serializes")
}

/// Records a batch of outcomes in one transaction: the job rows whose claim still holds
/// and their outbox rows in one statement, then their entity rows.
pub(super) async fn finish_batch(
    db: &DatabaseConnection,
    batch: Vec<Arc<Finish>>,
) -> Vec<Result<Option<OutboxEvent>, DbErr>> {
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
    let stored = txn.query_all_raw(stmt(FINISH_BATCH_SQL, [(batch.len() as i64).into(), rows.into()])).await?;
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

/// The statement that records a batch of outcomes: `$1` its size, `$2` its rows as a JSON
/// array. (Public for the test of its plans, `tests/api/plans.rs`.)
pub const FINISH_BATCH_SQL: &str = "WITH batch AS (
                SELECT * FROM jsonb_to_recordset($2::jsonb) AS b(
                    job_id uuid, token uuid, status text, attempts int, record_id uuid, error jsonb, usage jsonb,
                    responses jsonb, calls jsonb, event_id uuid, routing_key text, correlation_id text, reply_to text, payload jsonb,
                    traceparent text, tracestate text)
                 LIMIT $1
             ), finished AS (
                UPDATE generation_job job
                   SET status = batch.status, attempts = batch.attempts, record_id = batch.record_id,
                       error = batch.error, usage = batch.usage, responses = batch.responses, calls = batch.calls,
                       event = batch.payload, event_routing_key = batch.routing_key,
                       claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL,
                       updated_at = now(), finished_at = now()
                  FROM batch
                 -- A claim token is set only while the job runs.
                 WHERE job.job_id = batch.job_id AND job.claim_token = batch.token
                RETURNING batch.event_id
             ), announced AS (
                INSERT INTO event_outbox
                       (event_id, job_id, routing_key, correlation_id, reply_to, payload, traceparent, tracestate)
                SELECT batch.event_id, batch.job_id, batch.routing_key, batch.correlation_id, batch.reply_to, batch.payload,
                       batch.traceparent, batch.tracestate
                  FROM batch JOIN finished USING (event_id)
             )
             SELECT event_id FROM finished";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_kept_up_to_the_cap_and_noted_past_it() {
        let big = json!({"content": "x".repeat(600)});
        let raw = |value: &Value| serde_json::value::to_raw_value(value).unwrap();
        let responses = vec![raw(&big), raw(&big), raw(&json!({"content": "a\u{0}b"}))];
        let parse = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).unwrap();
        let kept: Vec<Value> = storable_responses(&responses, 1024).iter().map(|raw| parse(raw)).collect();
        assert_eq!(kept[0], big);
        assert!(kept[1]["omitted"].as_str().unwrap().contains("over limits.max_responses_bytes (1024)"));
        assert!(kept[2]["omitted"].is_string(), "the cap counts every response before");
        let with_nul = storable_responses(&responses[2..], 1024);
        assert_eq!(parse(&with_nul[0]), json!({"content": "a\\u0000b"}));
    }
}
