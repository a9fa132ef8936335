//! Reading the job ledger for people: the console's pages, its JSON API and `instructd jobs`
//! all go through these queries. Filters, newest first, one page at a time (keyset
//! pagination on `(created_at, job_id)`), counts by status and entity, and one job with its
//! calls and events.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult, TransactionTrait, Value as DbValue};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::outbox::outbox_event;
use super::stmt;
use crate::contract::{CompletionEvent, ErrorKind, JobError, JobStatus};
use crate::job::JobRecord;

/// The most jobs one page lists.
pub const MAX_PAGE: u32 = 200;

/// The most characters of a search text or a name in a filter.
const MAX_FILTER_CHARS: usize = 200;

/// A job row's statuses.
pub const STATUSES: [&str; 3] = ["running", "succeeded", "failed"];

/// Which jobs to list or count. Every field narrows; `None` does not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// One of [`STATUSES`].
    pub status: Option<&'static str>,
    pub entity: Option<String>,
    /// The model of any of the job's calls, or the model its request named.
    pub model: Option<String>,
    pub error_kind: Option<ErrorKind>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Text anywhere in the request (its messages, its metadata), case-insensitive.
    pub text: Option<String>,
}

/// Why a filter or a cursor was refused: the parameter and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {problem}")]
pub struct BadFilter {
    pub parameter: &'static str,
    pub problem: String,
}

impl BadFilter {
    pub fn new(parameter: &'static str, problem: impl Into<String>) -> Self {
        Self { parameter, problem: problem.into() }
    }
}

impl JobFilter {
    /// The filter read from its parameters as the API and the command line spell them
    /// (`status`, `entity`, `model`, `error_kind`, `since`, `until`, `q`); an empty value does
    /// not filter. `since` and `until` are RFC 3339 times or ages before `now` (`90s`, `15m`,
    /// `1h`, `7d`).
    pub fn parse<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        now: DateTime<Utc>,
    ) -> Result<Self, BadFilter> {
        let mut filter = Self::default();
        for (name, value) in params {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match name {
                "status" => {
                    let status = STATUSES.into_iter().find(|status| *status == value);
                    filter.status = Some(status.ok_or_else(|| {
                        BadFilter::new("status", format!("`{}` is not running, succeeded or failed", quoted(value)))
                    })?);
                }
                "error_kind" => {
                    let kind = ErrorKind::ALL.into_iter().find(|kind| kind.as_str() == value);
                    filter.error_kind = Some(kind.ok_or_else(|| {
                        let kinds: Vec<&str> = ErrorKind::ALL.iter().map(|kind| kind.as_str()).collect();
                        BadFilter::new("error_kind", format!("`{}` is not one of {}", quoted(value), kinds.join(", ")))
                    })?);
                }
                "entity" => filter.entity = Some(bounded("entity", value)?),
                "model" => filter.model = Some(bounded("model", value)?),
                "q" => filter.text = Some(bounded("q", value)?),
                "since" => filter.since = Some(parse_time("since", value, now)?),
                "until" => filter.until = Some(parse_time("until", value, now)?),
                _ => {}
            }
        }
        Ok(filter)
    }

    /// The filter as query parameters (for the next page's link), in [`JobFilter::parse`]'s
    /// spelling.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        let mut params = Vec::new();
        if let Some(status) = self.status {
            params.push(("status", status.to_owned()));
        }
        if let Some(entity) = &self.entity {
            params.push(("entity", entity.clone()));
        }
        if let Some(model) = &self.model {
            params.push(("model", model.clone()));
        }
        if let Some(kind) = self.error_kind {
            params.push(("error_kind", kind.as_str().to_owned()));
        }
        if let Some(since) = self.since {
            params.push(("since", since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
        }
        if let Some(until) = self.until {
            params.push(("until", until.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
        }
        if let Some(text) = &self.text {
            params.push(("q", text.clone()));
        }
        params
    }

    /// The `WHERE` clause and its values, numbered from `$1`; `with_status: false` leaves the
    /// status out (the counts are by status).
    fn sql(&self, with_status: bool) -> (String, Vec<DbValue>) {
        let mut clauses = vec!["TRUE".to_owned()];
        let mut values: Vec<DbValue> = Vec::new();
        let mut bind = |value: DbValue| {
            values.push(value);
            format!("${}", values.len())
        };
        if let (Some(status), true) = (self.status, with_status) {
            clauses.push(format!("status = {}", bind(status.into())));
        }
        if let Some(entity) = &self.entity {
            clauses.push(format!("entity = {}", bind(entity.as_str().into())));
        }
        if let Some(model) = &self.model {
            let model = bind(model.as_str().into());
            clauses.push(format!(
                "(request->>'model' = {model} OR calls @> jsonb_build_array(jsonb_build_object('model', {model}::text)))"
            ));
        }
        if let Some(kind) = self.error_kind {
            clauses.push(format!("error->>'kind' = {}", bind(kind.as_str().into())));
        }
        if let Some(since) = self.since {
            clauses.push(format!("created_at >= {}", bind(since.into())));
        }
        if let Some(until) = self.until {
            clauses.push(format!("created_at < {}", bind(until.into())));
        }
        if let Some(text) = &self.text {
            // The text as a literal: `%`, `_` and `\` match themselves.
            let pattern = format!("%{}%", text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
            clauses.push(format!("request::text ILIKE {}", bind(pattern.into())));
        }
        (clauses.join(" AND "), values)
    }
}

fn quoted(value: &str) -> std::borrow::Cow<'_, str> {
    crate::text::quoted_within(value, 40)
}

fn bounded(parameter: &'static str, value: &str) -> Result<String, BadFilter> {
    if value.chars().count() > MAX_FILTER_CHARS {
        return Err(BadFilter::new(parameter, format!("longer than {MAX_FILTER_CHARS} characters")));
    }
    if value.contains('\0') {
        return Err(BadFilter::new(parameter, "contains a NUL character"));
    }
    Ok(value.to_owned())
}

/// An RFC 3339 time, or an age before `now`: a whole number of `s`, `m`, `h` or `d`.
fn parse_time(parameter: &'static str, value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, BadFilter> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    let bad = || {
        BadFilter::new(
            parameter,
            format!("`{}` is neither an RFC 3339 time nor an age like 15m, 1h or 7d", quoted(value)),
        )
    };
    let split = value.len().checked_sub(1).filter(|end| value.is_char_boundary(*end)).ok_or_else(bad)?;
    let (count, unit) = value.split_at(split);
    let count: i64 = count.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => Some(count),
        "m" => count.checked_mul(60),
        "h" => count.checked_mul(3_600),
        "d" => count.checked_mul(86_400),
        _ => None,
    };
    seconds
        .filter(|seconds| *seconds >= 0)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|age| now.checked_sub_signed(age))
        .ok_or_else(bad)
}

/// The most jobs a page lists unless told otherwise.
pub const DEFAULT_PAGE: u32 = 50;

/// A request for one page of jobs: the filter, where the page starts, how long it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: JobFilter,
    pub after: Option<Cursor>,
    pub limit: u32,
}

impl ListQuery {
    /// Read from [`JobFilter::parse`]'s parameters, `after` (the previous page's `next`) and
    /// `limit` (1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] by default).
    pub fn parse<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
        now: DateTime<Utc>,
    ) -> Result<Self, BadFilter> {
        let filter = JobFilter::parse(params.clone(), now)?;
        let (mut after, mut limit) = (None, DEFAULT_PAGE);
        for (name, value) in params {
            let value = value.trim();
            match name {
                "after" if !value.is_empty() => after = Some(value.parse()?),
                "limit" if !value.is_empty() => {
                    limit = value.parse().ok().filter(|limit| (1..=MAX_PAGE).contains(limit)).ok_or_else(|| {
                        BadFilter::new("limit", format!("must be a whole number from 1 to {MAX_PAGE}"))
                    })?;
                }
                _ => {}
            }
        }
        Ok(Self { filter, after, limit })
    }
}

/// Where a page ends: the last job listed. Opaque to clients (`<micros>.<job_id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    created_at: DateTime<Utc>,
    job_id: Uuid,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.created_at.timestamp_micros(), self.job_id.simple())
    }
}

impl std::str::FromStr for Cursor {
    type Err = BadFilter;

    fn from_str(text: &str) -> Result<Self, BadFilter> {
        let bad = || BadFilter::new("after", "not a cursor this API gave (a page's `next`)");
        let (micros, job_id) = text.split_once('.').ok_or_else(bad)?;
        let created_at = micros.parse().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
        let job_id = Uuid::try_parse(job_id).map_err(|_| bad())?;
        Ok(Self { created_at, job_id })
    }
}

/// One job in a list.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub job_id: Uuid,
    pub entity: String,
    pub status: String,
    /// Answers asked for: the first call plus re-asks.
    pub attempts: i32,
    /// The models the job's calls went to, or the one its request named.
    pub models: Vec<String>,
    /// `{"kind", "message"}` when the job failed.
    pub error: Option<Value>,
    pub record_id: Option<Uuid>,
    pub usage: Option<Value>,
    /// The job this one replays.
    pub replay_of: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A page of jobs, newest first, and where the next one starts.
#[derive(Debug, Clone, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    /// The `after` of the next page; absent on the last.
    pub next: Option<String>,
}

/// How many jobs a filter matches, by status and by entity and status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobCounts {
    pub total: i64,
    pub by_status: BTreeMap<String, i64>,
    pub by_entity: BTreeMap<String, BTreeMap<String, i64>>,
}

/// One call of a job, with its raw answer.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    /// 1 for the first call.
    pub n: usize,
    /// The call as recorded (`model`, `started_at`, `duration_ms`, `usage`, `finish_reason`,
    /// `error`); `{}` for a call of a job finished before calls were recorded.
    pub call: Value,
    /// The provider's raw response; absent for a call that failed without one.
    pub response: Option<Value>,
}

/// An event of the job as the outbox holds it (published ones are pruned after
/// `retention.published_events`).
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub event_id: Uuid,
    pub routing_key: String,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub abandoned_at: Option<DateTime<Utc>>,
    /// Tries that came back unroutable.
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// A job that replayed another.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    pub job_id: Uuid,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// Everything recorded of one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The request as received.
    pub request: Value,
    /// Each call to the model, in order.
    pub calls: Vec<CallView>,
    /// The completion event as announced (its `record` is the stored record).
    pub event: Option<Value>,
    pub event_routing_key: Option<String>,
    /// The job's events still in the outbox.
    pub events: Vec<EventView>,
    /// The jobs that replayed this one, oldest first.
    pub replays: Vec<Replay>,
    /// When an operator asked to cancel it while it ran.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The worker holding the job while it runs.
    pub claimed_by: Option<i64>,
    /// How often the job was taken over from a worker that was gone.
    pub takeovers: i32,
    pub updated_at: DateTime<Utc>,
}

const SUMMARY_COLUMNS: &str = "job_id, entity, status, attempts, error, record_id, usage, created_at, finished_at,
    request->>'replay_of' AS replay_of,
    coalesce((SELECT jsonb_agg(DISTINCT call->>'model') FROM jsonb_array_elements(calls) call
               WHERE call->>'model' IS NOT NULL),
             CASE WHEN jsonb_typeof(request->'model') = 'string' THEN jsonb_build_array(request->'model') END,
             '[]') AS models";

fn summary(row: &QueryResult) -> Result<JobSummary, DbErr> {
    let models: Value = row.try_get("", "models")?;
    Ok(JobSummary {
        job_id: row.try_get("", "job_id")?,
        entity: row.try_get("", "entity")?,
        status: row.try_get("", "status")?,
        attempts: row.try_get("", "attempts")?,
        models: serde_json::from_value(models).unwrap_or_default(),
        error: row.try_get("", "error")?,
        record_id: row.try_get("", "record_id")?,
        usage: row.try_get("", "usage")?,
        replay_of: row.try_get::<Option<String>>("", "replay_of")?.and_then(|id| Uuid::try_parse(&id).ok()),
        created_at: row.try_get("", "created_at")?,
        finished_at: row.try_get("", "finished_at")?,
    })
}

/// Up to `limit` jobs that `filter` matches, newest first, after `after` (the previous
/// page's `next`).
pub async fn list(
    db: &impl ConnectionTrait,
    filter: &JobFilter,
    after: Option<Cursor>,
    limit: u32,
) -> Result<JobPage, DbErr> {
    let limit = limit.clamp(1, MAX_PAGE);
    let (mut clause, mut values) = filter.sql(true);
    if let Some(after) = after {
        values.push(after.created_at.into());
        values.push(after.job_id.into());
        clause.push_str(&format!(" AND (created_at, job_id) < (${}, ${})", values.len() - 1, values.len()));
    }
    // One more than the page: whether there is a next one.
    values.push(i64::from(limit + 1).into());
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM generation_job WHERE {clause}
          ORDER BY created_at DESC, job_id DESC LIMIT ${}",
        values.len()
    );
    let rows = db.query_all_raw(stmt(&sql, values)).await?;
    let mut jobs = rows.iter().map(summary).collect::<Result<Vec<_>, _>>()?;
    let next = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|last| Cursor { created_at: last.created_at, job_id: last.job_id }.to_string())
    } else {
        None
    };
    Ok(JobPage { jobs, next })
}

/// How many jobs `filter` matches (its status aside), by status and by entity.
pub async fn count(db: &impl ConnectionTrait, filter: &JobFilter) -> Result<JobCounts, DbErr> {
    let (clause, values) = filter.sql(false);
    let sql =
        format!("SELECT entity, status, count(*) AS jobs FROM generation_job WHERE {clause} GROUP BY entity, status");
    let mut counts = JobCounts::default();
    for row in db.query_all_raw(stmt(&sql, values)).await? {
        let entity: String = row.try_get("", "entity")?;
        let status: String = row.try_get("", "status")?;
        let jobs: i64 = row.try_get("", "jobs")?;
        counts.total += jobs;
        *counts.by_status.entry(status.clone()).or_default() += jobs;
        *counts.by_entity.entry(entity).or_default().entry(status).or_default() += jobs;
    }
    Ok(counts)
}

/// How many jobs are running now (claimed, not finished).
pub async fn count_running(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let row =
        db.query_one_raw(stmt("SELECT count(*) AS running FROM generation_job WHERE status = 'running'", [])).await?;
    Ok(row.map(|row| row.try_get("", "running")).transpose()?.unwrap_or(0))
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Cancel {
    /// The job was running: the worker holding it abandons its model call at its next
    /// heartbeat and ends it with kind `cancelled`.
    Requested,
    /// The job was waiting for its delivery to come back (deferred, handed back): it ended
    /// now, failed with kind `cancelled`, its event in the outbox.
    Cancelled,
    /// No worker has taken the job yet (its request is still in the queue): it is marked,
    /// and ends with kind `cancelled`, without a call, when its delivery arrives.
    Queued,
    /// The job had already finished (`status`): nothing changed.
    Finished { status: String },
    /// No job has that id (and `queued` was not asked).
    Unknown,
}

/// Cancels `job_id`, in one transaction: a job running on a worker is marked for that worker
/// to cancel; a job waiting for its delivery (no worker holds it) is failed at once with kind
/// `cancelled` and its event; a finished job is left alone. A job id with no row is unknown,
/// unless `queued` says its request is still in the queue: then a row marks it cancelled, and
/// the worker that takes its delivery ends it without a call. `entities`: the registered ones
/// (the event's routing key names the entity only when it is one of them).
pub async fn cancel(
    db: &DatabaseConnection,
    job_id: Uuid,
    queued: bool,
    entities: &[&'static str],
    who: &str,
) -> Result<Cancel, DbErr> {
    let txn = db.begin().await?;
    let row = txn
        .query_one_raw(stmt(
            "SELECT status, entity, attempts, request, usage, claim_token IS NOT NULL AS held,
                    request = 'null'::jsonb AS undelivered
               FROM generation_job WHERE job_id = $1 FOR UPDATE",
            [job_id.into()],
        ))
        .await?;
    let Some(row) = row else {
        if !queued {
            return Ok(Cancel::Unknown);
        }
        // No request yet (JSON null) and no entity: the claim fills both in from the delivery.
        txn.execute_raw(stmt(
            "INSERT INTO generation_job (job_id, entity, status, attempts, request, cancel_requested_at)
             VALUES ($1, '', 'running', 0, 'null'::jsonb, now())
             ON CONFLICT (job_id) DO UPDATE SET cancel_requested_at = coalesce(generation_job.cancel_requested_at, now())
              WHERE generation_job.status = 'running'",
            [job_id.into()],
        ))
        .await?;
        txn.commit().await?;
        return Ok(Cancel::Queued);
    };
    let status: String = row.try_get("", "status")?;
    if status != "running" {
        return Ok(Cancel::Finished { status });
    }
    if row.try_get::<bool>("", "undelivered")? {
        return Ok(Cancel::Queued);
    }
    if row.try_get::<bool>("", "held")? {
        txn.execute_raw(stmt(
            "UPDATE generation_job SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
              WHERE job_id = $1",
            [job_id.into()],
        ))
        .await?;
        txn.commit().await?;
        return Ok(Cancel::Requested);
    }
    let entity: String = row.try_get("", "entity")?;
    let request: Value = row.try_get("", "request")?;
    let usage: Option<Value> = row.try_get("", "usage")?;
    let attempts: i32 = row.try_get("", "attempts")?;
    let metadata = request.get("metadata").cloned().unwrap_or(Value::Null);
    let error = JobError::new(ErrorKind::Cancelled, format!("cancelled by an operator ({who}) while it waited"));
    let event = CompletionEvent {
        event_id: Uuid::new_v4(),
        job_id,
        status: JobStatus::Failed,
        entity: entity.clone(),
        record: None,
        attempts: u32::try_from(attempts).unwrap_or(0),
        usage: usage.and_then(|usage| serde_json::from_value(usage).ok()).unwrap_or_default(),
        models: Vec::new(),
        model: None,
        error: Some(error.clone()),
        metadata: metadata.clone(),
        finished_at: Utc::now(),
    };
    let raw = serde_json::value::RawValue::from_string(request.to_string()).expect("JSON is JSON");
    let job_id_text = job_id.to_string();
    let record = JobRecord {
        job_id,
        entity: &entity,
        routing_entity: entities.iter().copied().find(|known| *known == entity),
        request: &raw,
        metadata: &metadata,
        correlation_id: &job_id_text,
        reply_to: None,
        trace: None,
    };
    let outbox = outbox_event(&record, &event);
    let payload: Value = serde_json::from_slice(&outbox.payload).expect("an event is JSON");
    txn.execute_raw(stmt(
        "UPDATE generation_job
            SET status = 'failed', error = $2, event = $3, event_routing_key = $4, cancel_requested_at = now(),
                claimed_by = NULL, lease_expires_at = NULL, updated_at = now(), finished_at = now()
          WHERE job_id = $1",
        [
            job_id.into(),
            serde_json::to_value(&error).expect("errors serialize").into(),
            payload.clone().into(),
            outbox.routing_key.as_str().into(),
        ],
    ))
    .await?;
    txn.execute_raw(stmt(
        "INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, payload) VALUES ($1, $2, $3, $4, $5)",
        [
            outbox.event_id.into(),
            job_id.into(),
            outbox.routing_key.as_str().into(),
            outbox.correlation_id.as_str().into(),
            payload.into(),
        ],
    ))
    .await?;
    txn.commit().await?;
    Ok(Cancel::Cancelled)
}

/// The running jobs held by worker `worker_id` that an operator asked to cancel.
pub async fn cancel_requests(db: &impl ConnectionTrait, worker_id: i64) -> Result<Vec<Uuid>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT job_id FROM generation_job
              WHERE claimed_by = $1 AND cancel_requested_at IS NOT NULL AND status = 'running'",
            [worker_id.into()],
        ))
        .await?;
    rows.iter().map(|row| row.try_get("", "job_id")).collect()
}

/// `job_id`'s status and its request as received; `None` if no job has that id.
pub async fn request_of(db: &impl ConnectionTrait, job_id: Uuid) -> Result<Option<(String, Value)>, DbErr> {
    let row =
        db.query_one_raw(stmt("SELECT status, request FROM generation_job WHERE job_id = $1", [job_id.into()])).await?;
    row.map(|row| Ok((row.try_get("", "status")?, row.try_get("", "request")?))).transpose()
}

/// Everything recorded of `job_id`; `None` if no job has that id.
pub async fn get(db: &impl ConnectionTrait, job_id: Uuid) -> Result<Option<JobDetail>, DbErr> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, request, responses, calls, event, event_routing_key, claimed_by, takeovers,
                cancel_requested_at, updated_at
           FROM generation_job WHERE job_id = $1"
    );
    let Some(row) = db.query_one_raw(stmt(&sql, [job_id.into()])).await? else {
        return Ok(None);
    };
    let responses: Value = row.try_get("", "responses")?;
    let calls: Value = row.try_get("", "calls")?;
    let events = db
        .query_all_raw(stmt(
            "SELECT event_id, routing_key, created_at, published_at, abandoned_at, attempts, last_error
               FROM event_outbox WHERE job_id = $1 ORDER BY created_at",
            [job_id.into()],
        ))
        .await?
        .iter()
        .map(|row| {
            Ok(EventView {
                event_id: row.try_get("", "event_id")?,
                routing_key: row.try_get("", "routing_key")?,
                created_at: row.try_get("", "created_at")?,
                published_at: row.try_get("", "published_at")?,
                abandoned_at: row.try_get("", "abandoned_at")?,
                attempts: row.try_get("", "attempts")?,
                last_error: row.try_get("", "last_error")?,
            })
        })
        .collect::<Result<Vec<_>, DbErr>>()?;
    let replays = db
        .query_all_raw(stmt(
            "SELECT job_id, status, created_at FROM generation_job
              WHERE request->>'replay_of' = $1 ORDER BY created_at, job_id LIMIT 100",
            [job_id.to_string().into()],
        ))
        .await?
        .iter()
        .map(|row| {
            Ok(Replay {
                job_id: row.try_get("", "job_id")?,
                status: row.try_get("", "status")?,
                created_at: row.try_get("", "created_at")?,
            })
        })
        .collect::<Result<Vec<_>, DbErr>>()?;
    Ok(Some(JobDetail {
        summary: summary(&row)?,
        request: row.try_get("", "request")?,
        calls: call_views(calls, responses),
        event: row.try_get("", "event")?,
        event_routing_key: row.try_get("", "event_routing_key")?,
        events,
        replays,
        cancel_requested_at: row.try_get("", "cancel_requested_at")?,
        claimed_by: row.try_get("", "claimed_by")?,
        takeovers: row.try_get("", "takeovers")?,
        updated_at: row.try_get("", "updated_at")?,
    }))
}

/// The calls beside their answers: each answered call (one with `usage`) has the next
/// response; a call that failed without an answer has none. (Rows written before calls were
/// kept have responses alone.)
fn call_views(calls: Value, responses: Value) -> Vec<CallView> {
    let array = |value: Value| match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let (calls, responses) = (array(calls), array(responses));
    let mut responses = responses.into_iter();
    let mut views: Vec<CallView> = calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            let response = if call.get("usage").is_some() { responses.next() } else { None };
            CallView { n: index + 1, call, response }
        })
        .collect();
    for response in responses {
        views.push(CallView { n: views.len() + 1, call: Value::Object(Default::default()), response: Some(response) });
    }
    views
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn filters_are_read_from_their_parameters_and_empty_ones_do_not_filter() {
        let filter = JobFilter::parse(
            [
                ("status", "failed"),
                ("entity", "hero"),
                ("model", ""),
                ("error_kind", "validation"),
                ("since", "1h"),
                ("until", "2026-12-01T11:30:00+00:00"),
                ("q", " 50%_off "),
                ("limit", "ignored here"),
            ],
            now(),
        )
        .unwrap();
        assert_eq!(filter.status, Some("failed"));
        assert_eq!(filter.entity.as_deref(), Some("hero"));
        assert_eq!(filter.model, None);
        assert_eq!(filter.error_kind, Some(ErrorKind::Validation));
        assert_eq!(filter.since, Some(now() - chrono::TimeDelta::hours(1)));
        assert_eq!(filter.until.unwrap().to_rfc3339(), "2026-12-01T11:30:00+00:00");
        assert_eq!(filter.text.as_deref(), Some("50%_off"));
        // The next page's link reads back as the same filter.
        let params = filter.params();
        let again = JobFilter::parse(params.iter().map(|(name, value)| (*name, value.as_str())), now()).unwrap();
        assert_eq!(again, filter);
    }

    #[test]
    fn a_bad_filter_names_its_parameter() {
        let cases = [
            ("status", "done", "status: `done` is not running, succeeded or failed"),
            (
                "error_kind",
                "x",
                "error_kind: `x` is not one of invalid_request, validation, refused, llm, internal, cancelled",
            ),
            ("since", "yesterday", "since: `yesterday` is neither an RFC 3339 time nor an age like 15m, 1h or 7d"),
            ("until", "-5m", "until: `-5m` is neither an RFC 3339 time nor an age like 15m, 1h or 7d"),
            ("since", "99999999999999d", "since: `99999999999999d` is neither"),
            ("since", "é", "since: `é` is neither"),
            ("q", "a\0b", "q: contains a NUL character"),
        ];
        for (name, value, expected) in cases {
            let error = JobFilter::parse([(name, value)], now()).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{name}={value}: {error}");
        }
        let long = "x".repeat(MAX_FILTER_CHARS + 1);
        assert_eq!(JobFilter::parse([("entity", long.as_str())], now()).unwrap_err().parameter, "entity");
    }

    #[test]
    fn a_cursor_reads_back_and_a_forged_one_is_refused() {
        let cursor = Cursor { created_at: now() + chrono::TimeDelta::microseconds(123_456), job_id: Uuid::new_v4() };
        assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        for forged in ["", "12", "abc.def", "1.not-a-uuid", "99999999999999999999.0c6f1e4e2b7a4a539d1a3f5d8c0e9a11"] {
            let error = forged.parse::<Cursor>().unwrap_err();
            assert_eq!(error.parameter, "after", "{forged}");
        }
    }

    #[test]
    fn the_search_text_matches_itself_and_no_pattern() {
        let filter = JobFilter { text: Some("50%_\\".into()), ..Default::default() };
        let (clause, values) = filter.sql(true);
        assert_eq!(clause, "TRUE AND request::text ILIKE $1");
        assert_eq!(values, vec![DbValue::from("%50\\%\\_\\\\%")]);
    }

    #[test]
    fn calls_line_up_with_their_answers() {
        let usage = json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2});
        let calls = json!([{"model": "m", "usage": usage, "error": {"kind": "validation", "message": "age: must be at least 0"}},
                           {"model": "m", "error": {"kind": "llm", "message": "HTTP 400"}}]);
        let views = call_views(calls, json!([{"id": "first"}]));
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].response, Some(json!({"id": "first"})));
        assert_eq!(views[1].response, None);
        assert_eq!(views[1].n, 2);
        // A fallback: the first model's call failed without an answer, the next one answered.
        let calls = json!([{"model": "small", "error": {"kind": "llm", "message": "HTTP 404"}},
                           {"model": "large", "usage": usage}]);
        let views = call_views(calls, json!([{"id": "large's"}]));
        assert_eq!(views[0].response, None);
        assert_eq!(views[1].response, Some(json!({"id": "large's"})));
        // A job from before calls were recorded: its answers, one per call.
        let views = call_views(json!([]), json!([{"id": "a"}, {"id": "b"}]));
        assert_eq!(views.iter().map(|view| view.call.clone()).collect::<Vec<_>>(), vec![json!({}), json!({})]);
    }
}
