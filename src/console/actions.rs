//! What an operator may do to jobs (replay, cancel) and dead letters (replay, purge), whoever asks: the API, a console form or
//! `instructd jobs|dlq`. Each action is logged with who did what, and counted
//! (`instructd_console_actions_total`).

use std::sync::Arc;

use sea_orm::{DatabaseConnection, DbErr};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::broker::{ConsoleBroker, DeadLetters, Moved, Purged, Which};
use crate::config::Settings;
use crate::contract::Mode;
use crate::metrics::{Action, Metrics};
use crate::store::jobs::{self, BadFilter, Cancel, JobFilter};

/// The most jobs one bulk replay sends.
pub const MAX_BULK: u32 = 1_000;

/// Why an action did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    BadRequest(#[from] BadFilter),
    #[error("{0}")]
    NotFound(String),
    /// The job is in a state the action does not apply to.
    #[error("{0}")]
    Conflict(String),
    #[error("the database did not answer: {0}")]
    Database(#[from] DbErr),
    #[error("RabbitMQ did not take it: {0:#}")]
    Broker(anyhow::Error),
}

/// What a replay may change; anything else is the job's request as received.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// A model from `llm.allowed_models` (or `llm.model`).
    #[serde(default)]
    pub model: Option<String>,
    /// At most `llm.max_retries`.
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A job sent again.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// The new job's id.
    pub job_id: Uuid,
    pub replay_of: Uuid,
}

/// Who asked, as the log says it.
#[derive(Debug, Clone, Copy)]
pub struct Who(pub &'static str);

/// The actions, over the ledger and the broker.
pub struct Actions {
    db: DatabaseConnection,
    broker: ConsoleBroker,
    settings: Arc<Settings>,
    metrics: Metrics,
    /// The application's entities (a cancelled job's event names its entity only if it is
    /// one of them).
    entities: Vec<&'static str>,
}

impl Actions {
    pub fn new(db: DatabaseConnection, settings: Arc<Settings>, metrics: Metrics, entities: Vec<&'static str>) -> Self {
        Self { db, broker: ConsoleBroker::new(settings.broker.clone()), settings, metrics, entities }
    }

    /// Cancels `job_id`: a running job gives up its model call at its worker's next
    /// heartbeat and ends with kind `cancelled`; one waiting for its delivery ends now; with
    /// `queued`, one whose request no worker has taken yet ends when it arrives, without a
    /// call. A finished job is a conflict.
    pub async fn cancel(&self, job_id: Uuid, queued: bool, who: Who) -> Result<Cancel, ActionError> {
        let cancel = jobs::cancel(&self.db, job_id, queued, &self.entities, who.0).await?;
        match &cancel {
            Cancel::Unknown => {
                return Err(ActionError::NotFound(format!(
                    "no job {job_id}: if its request is still in the queue, cancel it with queued=true"
                )));
            }
            Cancel::Finished { status } => {
                return Err(ActionError::Conflict(format!("job {job_id} has already finished ({status})")));
            }
            Cancel::Requested | Cancel::Cancelled | Cancel::Queued => {}
        }
        self.metrics.console_action(Action::Cancel, 1);
        tracing::info!(who = who.0, action = "cancel", %job_id, outcome = ?cancel, "cancelled a job");
        Ok(cancel)
    }

    fn check(&self, overrides: &Overrides) -> Result<(), BadFilter> {
        let llm = &self.settings.llm;
        if let Some(model) = &overrides.model
            && !llm.allows_model(model)
        {
            let model = crate::text::quoted(model);
            return Err(BadFilter::new("model", format!("`{model}` is not llm.model nor in llm.allowed_models")));
        }
        if let Some(retries) = overrides.max_retries
            && retries > llm.max_retries
        {
            return Err(BadFilter::new("max_retries", format!("at most llm.max_retries ({})", llm.max_retries)));
        }
        Ok(())
    }

    /// Sends `job_id`'s request again as a new job (a new id; `replay_of` names this one),
    /// with `overrides`. A job still running is not replayed.
    pub async fn replay(&self, job_id: Uuid, overrides: &Overrides, who: Who) -> Result<Replayed, ActionError> {
        self.check(overrides)?;
        let Some((status, request)) = jobs::request_of(&self.db, job_id).await? else {
            return Err(ActionError::NotFound(format!("no job {job_id}")));
        };
        if status == "running" {
            return Err(ActionError::Conflict(format!("job {job_id} is still running: cancel it, or wait")));
        }
        let (replayed, body) = again(job_id, request, overrides)?;
        self.broker.publish_requests(&[(replayed.job_id, body)]).await.map_err(ActionError::Broker)?;
        self.metrics.console_action(Action::Replay, 1);
        tracing::info!(who = who.0, action = "replay", %job_id, new_job_id = %replayed.job_id, "replayed a job");
        Ok(replayed)
    }

    /// Replays every finished job `filter` matches, newest first, up to `limit` (at most
    /// [`MAX_BULK`]); running ones are left alone, and so is a request that is not a JSON
    /// object (it was refused as such). Published a page at a time: a failure part of the
    /// way says how many were sent before it.
    pub async fn replay_matching(
        &self,
        filter: &JobFilter,
        limit: u32,
        overrides: &Overrides,
        who: Who,
    ) -> Result<Vec<Replayed>, ActionError> {
        self.check(overrides)?;
        if !(1..=MAX_BULK).contains(&limit) {
            return Err(BadFilter::new("limit", format!("must be a whole number from 1 to {MAX_BULK}")).into());
        }
        let mut replayed = Vec::new();
        let mut after = None;
        while replayed.len() < limit as usize {
            let page = jobs::list(&self.db, filter, after, jobs::MAX_PAGE).await?;
            let mut bodies = Vec::new();
            for job in page.jobs.iter().filter(|job| job.status != "running") {
                if replayed.len() + bodies.len() == limit as usize {
                    break;
                }
                if let Some((_, request)) = jobs::request_of(&self.db, job.job_id).await?
                    && let Ok((again, body)) = again(job.job_id, request, overrides)
                {
                    bodies.push((again, body));
                }
            }
            let (sent, payloads): (Vec<Replayed>, Vec<(Uuid, Vec<u8>)>) = bodies
                .into_iter()
                .map(|(again, body)| {
                    let job_id = again.job_id;
                    (again, (job_id, body))
                })
                .unzip();
            if let Err(error) = self.broker.publish_requests(&payloads).await {
                self.record_replays(replayed.len(), filter, who);
                let sent = replayed.len();
                return Err(ActionError::Broker(error.context(format!("{sent} job(s) were replayed before this"))));
            }
            replayed.extend(sent);
            match page.next.as_deref().map(str::parse) {
                Some(Ok(next)) => after = Some(next),
                _ => break,
            }
        }
        self.record_replays(replayed.len(), filter, who);
        Ok(replayed)
    }

    fn record_replays(&self, count: usize, filter: &JobFilter, who: Who) {
        self.metrics.console_action(Action::Replay, count as u64);
        tracing::info!(who = who.0, action = "replay", jobs = count, filter = ?filter, "replayed jobs");
    }

    /// How many messages the dead-letter queue holds.
    pub async fn dead_letter_count(&self) -> Result<u32, ActionError> {
        self.broker.dead_letter_count().await.map_err(ActionError::Broker)
    }

    /// The dead-letter queue's length and up to `limit` of its messages.
    pub async fn dead_letters(&self, limit: u32) -> Result<DeadLetters, ActionError> {
        self.broker.dead_letters(limit).await.map_err(ActionError::Broker)
    }

    /// Moves `which` dead letters back to the request queue.
    pub async fn replay_dead_letters(&self, which: &Which, who: Who) -> Result<Vec<Moved>, ActionError> {
        let moved = self.broker.replay_dead_letters(which).await.map_err(ActionError::Broker)?;
        self.metrics.console_action(Action::DeadLetterReplay, moved.len() as u64);
        tracing::info!(who = who.0, action = "dead_letter_replay", messages = moved.len(), "moved dead letters back");
        Ok(moved)
    }

    /// Deletes `which` dead letters.
    pub async fn purge_dead_letters(&self, which: &Which, who: Who) -> Result<Purged, ActionError> {
        let purged = self.broker.purge_dead_letters(which).await.map_err(ActionError::Broker)?;
        self.metrics.console_action(Action::DeadLetterPurge, u64::from(purged.count));
        tracing::info!(who = who.0, action = "dead_letter_purge", count = purged.count, ids = ?purged.ids, "purged dead letters");
        Ok(purged)
    }
}

/// `request` (job `job_id`'s) as a new job: a new id, `replay_of`, and the overrides.
fn again(job_id: Uuid, request: Value, overrides: &Overrides) -> Result<(Replayed, Vec<u8>), ActionError> {
    let Value::Object(mut request) = request else {
        return Err(ActionError::Conflict(format!(
            "job {job_id}'s request is not a JSON object (it was refused as such): nothing to send again"
        )));
    };
    let replayed = Replayed { job_id: Uuid::new_v4(), replay_of: job_id };
    request.insert("job_id".into(), Value::String(replayed.job_id.to_string()));
    request.insert("replay_of".into(), Value::String(job_id.to_string()));
    if let Some(model) = &overrides.model {
        request.insert("model".into(), Value::String(model.clone()));
    }
    if let Some(retries) = overrides.max_retries {
        request.insert("max_retries".into(), retries.into());
    }
    if let Some(mode) = overrides.mode {
        request.insert("mode".into(), serde_json::to_value(mode).expect("modes serialize"));
    }
    Ok((replayed, serde_json::to_vec(&request).expect("JSON serializes")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_replay_is_the_request_with_a_new_id_its_origin_and_the_overrides() {
        let old = Uuid::new_v4();
        let request = json!({"job_id": old, "entity": "hero", "messages": [], "model": "a", "metadata": {"k": 1}});
        let overrides = Overrides { model: Some("b".into()), max_retries: Some(3), mode: Some(Mode::Json) };
        let (replayed, body) = again(old, request, &overrides).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_ne!(replayed.job_id, old);
        assert_eq!(
            body,
            json!({"job_id": replayed.job_id, "entity": "hero", "messages": [], "model": "b", "metadata": {"k": 1},
                   "replay_of": old, "max_retries": 3, "mode": "json"})
        );
        assert!(matches!(again(old, json!("text"), &Overrides::default()), Err(ActionError::Conflict(_))));
    }
}
