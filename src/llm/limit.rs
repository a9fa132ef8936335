//! Provider protection: a limit on concurrent calls to the LLM that adapts to the provider
//! (additive increase, multiplicative decrease). A 429 halves it, once per round of calls
//! (calls already in flight when it was halved do not halve it again); every `limit`
//! successes in a row raise it by one, up to `llm.max_concurrency`. So a burst of jobs
//! meeting a rate limit backs off as a whole instead of turning into a storm of 429s.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::metrics::ProviderMetrics;

pub struct AdaptiveLimit {
    state: Mutex<State>,
    released: Notify,
    max: usize,
    metrics: ProviderMetrics,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// Successes since the limit last changed.
    successes: usize,
    /// Bumped on every decrease: a 429 from a call that started before it does not count.
    epoch: u64,
}

/// A call slot; released when dropped.
pub struct Permit {
    limit: Arc<AdaptiveLimit>,
    epoch: u64,
}

impl AdaptiveLimit {
    pub fn new(max: usize, metrics: ProviderMetrics) -> Arc<Self> {
        let max = max.max(1);
        metrics.concurrency_limit(max);
        Arc::new(Self {
            state: Mutex::new(State { limit: max, in_flight: 0, successes: 0, epoch: 0 }),
            released: Notify::new(),
            max,
            metrics,
        })
    }

    /// The current limit.
    pub fn current(&self) -> usize {
        self.lock().limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("the limiter's lock is never poisoned")
    }

    /// Waits for a call slot.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is not missed.
            released.as_mut().enable();
            {
                let mut state = self.lock();
                if state.in_flight < state.limit {
                    state.in_flight += 1;
                    return Permit { limit: self.clone(), epoch: state.epoch };
                }
            }
            released.await;
        }
    }
}

impl Permit {
    /// The call succeeded: after `limit` successes in a row the limit grows by one.
    pub fn succeeded(self) {
        let raised = {
            let mut state = self.limit.lock();
            state.successes += 1;
            if state.successes >= state.limit && state.limit < self.limit.max {
                state.limit += 1;
                state.successes = 0;
                Some(state.limit)
            } else {
                None
            }
        };
        if let Some(limit) = raised {
            tracing::info!(limit, "LLM concurrency limit raised");
            self.limit.metrics.concurrency_limit(limit);
        }
    }

    /// The provider answered 429: halve the limit, unless it was already halved since this
    /// call started.
    pub fn rate_limited(self) {
        let lowered = {
            let mut state = self.limit.lock();
            state.successes = 0;
            if self.epoch == state.epoch && state.limit > 1 {
                state.limit = (state.limit / 2).max(1);
                state.epoch += 1;
                Some(state.limit)
            } else {
                None
            }
        };
        if let Some(limit) = lowered {
            tracing::warn!(limit, "the provider is rate limiting; LLM concurrency limit lowered");
            self.limit.metrics.concurrency_limit(limit);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.lock().in_flight -= 1;
        self.limit.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn a_burst_of_429s_halves_once_per_round_and_successes_raise_it_again() {
        let limit = AdaptiveLimit::new(8, Metrics::new([], []).llm_provider("default"));
        // Eight calls in flight all get a 429: one halving, not eight.
        let mut permits = Vec::new();
        for _ in 0..8 {
            permits.push(limit.acquire().await);
        }
        for permit in permits {
            permit.rate_limited();
        }
        assert_eq!(limit.current(), 4);
        // The next round's 429 halves again.
        limit.acquire().await.rate_limited();
        assert_eq!(limit.current(), 2);
        limit.acquire().await.rate_limited();
        limit.acquire().await.rate_limited();
        assert_eq!(limit.current(), 1, "never below one");
        // Additive increase: `limit` successes in a row raise it by one.
        limit.acquire().await.succeeded();
        assert_eq!(limit.current(), 2);
        limit.acquire().await.succeeded();
        limit.acquire().await.succeeded();
        assert_eq!(limit.current(), 3);
        for _ in 0..100 {
            limit.acquire().await.succeeded();
        }
        assert_eq!(limit.current(), 8, "never above the maximum");
    }

    #[tokio::test]
    async fn callers_over_the_limit_wait_for_a_slot() {
        let limit = AdaptiveLimit::new(1, Metrics::new([], []).llm_provider("default"));
        let first = limit.acquire().await;
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.succeeded() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the second caller waits");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
