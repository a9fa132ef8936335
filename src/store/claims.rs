//! Claiming a job id before generating it, so that a redelivered or duplicate request never
//! generates twice, and handing a claim back.
//!
//! A claim names the worker that holds it (`claimed_by`, see [`super::presence`]). It is
//! live while that worker's session holds its advisory lock *and* its heartbeat is fresh;
//! otherwise the next delivery of the job takes it over at once: a killed worker's session
//! ends with it (its lock is released within milliseconds), a frozen or unreachable one's
//! heartbeat goes stale after `worker.takeover_after_secs`.

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{Store, StoreSettings, one_by_one, stmt};
use crate::job::JobRecord;

/// The result of trying to claim a job id.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This worker owns the job until it records the outcome; `token` proves it.
    /// `takeovers` counts the claims before this one whose worker was gone (killed, frozen,
    /// cut off) before the job finished: the job's poison count. `age`: how long ago the job
    /// was first claimed (zero for a new one), across deferrals. `cancel_requested`: an
    /// operator asked to cancel it (`store::jobs::cancel`) while no worker ran it.
    Acquired { token: Uuid, takeovers: u32, age: Duration, cancel_requested: bool },
    /// The job already finished: nothing is generated; its event, as announced, answers this
    /// delivery too (`None` for a job finished before events were kept on the row).
    Finished { event: Option<StoredEvent> },
    /// Another live worker holds the claim.
    Busy,
}

/// A finished job's completion event, as it was announced.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub payload: Value,
    pub routing_key: String,
}

/// One claim as `try_claim_batch` reads it: the request's text embedded as it came, not
/// parsed again (as [`super::outcomes`] writes its rows).
#[derive(Serialize)]
struct ClaimRow<'a> {
    job_id: Uuid,
    entity: &'a str,
    request: &'a RawValue,
    token: Uuid,
}

/// A claim waiting for its batch.
pub struct ClaimRequest {
    job_id: Uuid,
    entity: String,
    request: Box<RawValue>,
}

impl Store {
    /// Claims `job.job_id` for this worker: inserts a `running` row, or takes over a running
    /// row whose claim was handed back or whose worker is gone. Two workers racing on one id
    /// serialize on the primary key; exactly one of them gets [`Claim::Acquired`].
    ///
    /// The caller must not be running the same job id itself: a claim held by this worker is
    /// taken over too (it is one a panicked or interrupted run could not hand back).
    pub async fn claim_job(&self, job: &JobRecord<'_>) -> Result<Claim, DbErr> {
        let request =
            ClaimRequest { job_id: job.job_id, entity: job.entity.to_owned(), request: job.request.to_owned() };
        self.claims.submit(request).await
    }

    /// Hands a claim back (the job is deferred or interrupted): the next delivery takes it
    /// over at once, without counting a takeover. `false` if `token` no longer held it.
    pub async fn release_claim(&self, job_id: Uuid, token: Uuid) -> Result<bool, DbErr> {
        // An expired lease too: an instructd from before heartbeats, running beside this one
        // during a rolling update, takes the job over as well.
        let result = self
            .db
            .execute_raw(stmt(
                "UPDATE generation_job SET claim_token = NULL, claimed_by = NULL, lease_expires_at = now(),
                        updated_at = now()
                  WHERE job_id = $1 AND claim_token = $2 AND status = 'running'",
                [job_id.into(), token.into()],
            ))
            .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// Claims a batch of jobs in one statement. A job id twice in the batch (the same request
/// delivered twice at once) is claimed once; the other copy finds it busy.
pub(super) async fn claim_batch(
    db: &DatabaseConnection,
    batch: Vec<ClaimRequest>,
    settings: StoreSettings,
) -> Vec<Result<Claim, DbErr>> {
    match try_claim_batch(db, &batch, settings).await {
        Ok(claims) => claims.into_iter().map(Ok).collect(),
        Err(error) => {
            one_by_one(&batch, error, |claim| try_claim_batch(db, std::slice::from_ref(claim), settings)).await
        }
    }
}

async fn try_claim_batch(
    db: &DatabaseConnection,
    batch: &[ClaimRequest],
    settings: StoreSettings,
) -> Result<Vec<Claim>, DbErr> {
    let mut first = HashMap::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for (i, claim) in batch.iter().enumerate() {
        if first.insert(claim.job_id, i).is_none() {
            rows.push(ClaimRow {
                job_id: claim.job_id,
                entity: &claim.entity,
                request: &claim.request,
                token: Uuid::new_v4(),
            });
        }
    }
    let count = rows.len() as i64;
    let rows = serde_json::to_string(&rows).expect("claims serialize");
    let claimed = db
        .query_all_raw(stmt(
            CLAIM_BATCH_SQL,
            [count.into(), rows.into(), settings.worker_id.into(), settings.takeover_after.as_secs_f64().into()],
        ))
        .await?;
    let mut by_job = HashMap::with_capacity(claimed.len());
    for row in &claimed {
        let job_id: Uuid = row.try_get("", "job_id")?;
        let token: Option<Uuid> = row.try_get("", "claim_token")?;
        let takeovers: Option<i32> = row.try_get("", "takeovers")?;
        let cancel_requested: Option<bool> = row.try_get("", "cancel_requested")?;
        let status: Option<String> = row.try_get("", "status")?;
        let age: f64 = row.try_get("", "age_secs")?;
        let claim = match (token, status.as_deref()) {
            (Some(token), _) => Claim::Acquired {
                token,
                takeovers: takeovers.unwrap_or(0).max(0) as u32,
                age: Duration::try_from_secs_f64(age).unwrap_or_default(),
                cancel_requested: cancel_requested.unwrap_or(false),
            },
            (None, Some("running") | None) => Claim::Busy,
            (None, Some(_)) => {
                let payload: Option<Value> = row.try_get("", "event")?;
                let routing_key: Option<String> = row.try_get("", "event_routing_key")?;
                let event = payload.zip(routing_key).map(|(payload, routing_key)| StoredEvent { payload, routing_key });
                Claim::Finished { event }
            }
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
                // A second copy of a job this batch claims is busy like any other duplicate.
                Claim::Acquired { .. } if first[&claim.job_id] != i => Claim::Busy,
                other => other,
            })
        })
        .collect()
}

/// The statement that claims a batch: `$1` its size, `$2` its rows as a JSON array, `$3`
/// the worker id, `$4` the takeover bound in seconds. (Public for the test of its plans,
/// `tests/api/plans.rs`.)
///
/// The statement's snapshot predates its own inserts and updates: a row the CTE claimed
/// comes back through `claimed`; one it could not claim through `generation_job` as it
/// was (`NULL` only if another transaction inserted it meanwhile: a claim just taken).
///
/// A running row is taken over when its claim was handed back (no token), when it is this
/// worker's own (the caller is not running it), when its worker is gone — no fresh
/// heartbeat, or its session's advisory lock is free (`pg_try_advisory_xact_lock` takes
/// it only if nobody holds it, and lets go at the end of this statement) — or, for a claim
/// of an instructd from before heartbeats, when its lease expired. A finished job is
/// answered with the event on its row, or (finished before events were kept there) the
/// last one of its status in the outbox.
pub const CLAIM_BATCH_SQL: &str = "WITH batch AS (
                SELECT * FROM jsonb_to_recordset($2::jsonb) AS b(job_id uuid, entity text, request jsonb, token uuid)
                 LIMIT $1
             ), claimed AS (
                INSERT INTO generation_job (job_id, entity, status, attempts, request, claim_token, claimed_by)
                SELECT job_id, entity, 'running', 0, request, token, $3 FROM batch
                ON CONFLICT (job_id) DO UPDATE
                   SET claim_token = EXCLUDED.claim_token,
                       -- A job cancelled before any worker took it (`store::jobs::cancel`) has no
                       -- request yet: this delivery's.
                       entity = CASE WHEN generation_job.request = 'null'::jsonb THEN EXCLUDED.entity
                                     ELSE generation_job.entity END,
                       request = CASE WHEN generation_job.request = 'null'::jsonb THEN EXCLUDED.request
                                      ELSE generation_job.request END,
                       claimed_by = EXCLUDED.claimed_by,
                       takeovers = generation_job.takeovers
                                   + CASE WHEN generation_job.claim_token IS NULL THEN 0 ELSE 1 END,
                       lease_expires_at = NULL,
                       updated_at = now()
                 WHERE generation_job.status = 'running' AND (
                          generation_job.claim_token IS NULL
                       OR generation_job.claimed_by = $3
                       OR (generation_job.claimed_by IS NULL AND generation_job.lease_expires_at < now())
                       OR (generation_job.claimed_by IS NOT NULL AND (
                              NOT EXISTS (SELECT 1 FROM worker
                                           WHERE worker.worker_id = generation_job.claimed_by
                                             AND worker.seen_at > now() - make_interval(secs => $4))
                           OR pg_try_advisory_xact_lock(generation_job.claimed_by))))
                RETURNING job_id, claim_token, takeovers, cancel_requested_at IS NOT NULL AS cancel_requested
             )
             SELECT batch.job_id, claimed.claim_token, claimed.takeovers, claimed.cancel_requested, job.status,
                    coalesce(extract(epoch FROM now() - job.created_at), 0)::float8 AS age_secs,
                    coalesce(job.event, earlier.payload) AS event,
                    coalesce(job.event_routing_key, earlier.routing_key) AS event_routing_key
               FROM batch
               LEFT JOIN claimed ON claimed.job_id = batch.job_id
               LEFT JOIN generation_job job ON job.job_id = batch.job_id
               LEFT JOIN LATERAL (
                    SELECT payload, routing_key FROM event_outbox
                     WHERE job.event IS NULL AND job.status IN ('succeeded', 'failed')
                       AND event_outbox.job_id = job.job_id AND event_outbox.payload->>'status' = job.status
                     ORDER BY event_outbox.created_at DESC LIMIT 1
               ) earlier ON true";
