//! The pruning task: every `retention.prune_every`, one pass of
//! [`crate::store::retention::prune`], counted in `instructd_rows_pruned_total` and
//! `instructd_events_abandoned_total`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;
use crate::metrics::Metrics;
use crate::store::{Store, retention};

/// Prunes every `retention.prune_every` until `stop` is cancelled.
pub async fn run(store: Store, settings: RetentionSettings, metrics: Metrics, stop: CancellationToken) {
    let every = settings.prune_every.get().unwrap_or(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match retention::prune(store.db(), &settings).await {
            Ok(pruned) => {
                metrics.rows_pruned("generation_job", pruned.jobs);
                metrics.rows_pruned("event_outbox", pruned.events);
                metrics.rows_pruned("worker", pruned.workers);
                metrics.events_abandoned(pruned.abandoned);
                if pruned.abandoned > 0 {
                    tracing::warn!(
                        events = pruned.abandoned,
                        after = %settings.unroutable_events,
                        "gave up on events that no queue was bound for (retention.unroutable_events)"
                    );
                }
                if pruned.jobs + pruned.events + pruned.workers > 0 {
                    tracing::info!(
                        jobs = pruned.jobs,
                        events = pruned.events,
                        workers = pruned.workers,
                        "pruned rows past their retention"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "pruning failed; trying again next pass"),
        }
    }
}
