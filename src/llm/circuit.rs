//! The provider's circuit breaker. A queue worker has nobody waiting on the other end: when
//! the provider is down, the right thing is to stop calling it and wait, not to burn the
//! backlog into failures with retries.
//!
//! - **Closed**: calls go through. `llm.circuit_failures` transport failures in a row (5xx,
//!   429, timeouts, refused or reset connections) open it; any answer closes the count.
//! - **Open**: no call starts; callers wait. After `llm.circuit_min_open_secs` one caller is
//!   let through as the probe (**half-open**); the others keep waiting.
//! - The probe's answer (any answer: the provider is up) closes the circuit and wakes every
//!   waiter; a failed probe opens it again for twice as long, up to
//!   `llm.circuit_max_open_secs`. So an outage costs one call per open period, whatever the
//!   backlog.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::ProviderMetrics;

/// The circuit's state, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    /// Open, with its probe call in flight.
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

pub struct Circuit {
    inner: Mutex<Inner>,
    changed: Notify,
    threshold: u32,
    min_open: Duration,
    max_open: Duration,
    metrics: ProviderMetrics,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Transport failures in a row while closed.
    failures: u32,
    /// How long the openings last, from the next: `min_open`, doubling up to `max_open`.
    open_periods: ExponentialBackoff,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    Probing,
}

/// Leave to make one call; say how it went with [`Ticket::answered`] or [`Ticket::failed`].
/// Dropped unresolved (the call was cancelled), a probe hands the turn to the next caller.
pub struct Ticket {
    circuit: Arc<Circuit>,
    probe: bool,
    resolved: bool,
}

/// The lengths of successive openings: `min_open`, doubling up to `max_open` (no jitter: a
/// replica's probes are its own, one per opening).
fn periods(min_open: Duration, max_open: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new().with_min_delay(min_open).with_max_delay(max_open).without_max_times().build()
}

impl Circuit {
    pub fn new(threshold: u32, min_open: Duration, max_open: Duration, metrics: ProviderMetrics) -> Arc<Self> {
        metrics.circuit_open(false);
        Arc::new(Self {
            inner: Mutex::new(Inner { state: State::Closed, failures: 0, open_periods: periods(min_open, max_open) }),
            changed: Notify::new(),
            threshold: threshold.max(1),
            min_open,
            max_open,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("the circuit's lock is never poisoned")
    }

    pub fn state(&self) -> CircuitState {
        match self.lock().state {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::Probing => CircuitState::HalfOpen,
        }
    }

    /// Waits until a call may start, for at most until `deadline`: `None` if the circuit was
    /// still open then.
    pub async fn admit(self: &Arc<Self>, deadline: Instant) -> Option<Ticket> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that a change in between is not missed.
            changed.as_mut().enable();
            let reopens = {
                let mut inner = self.lock();
                match inner.state {
                    State::Closed => return Some(self.ticket(false)),
                    State::Open { until } if Instant::now() >= until => {
                        inner.state = State::Probing;
                        tracing::info!("LLM circuit half-open: probing the provider with one call");
                        return Some(self.ticket(true));
                    }
                    State::Open { until } => Some(until),
                    State::Probing => None,
                }
            };
            let wake = reopens.map_or(deadline, |until| until.min(deadline));
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
            }
        }
    }

    fn ticket(self: &Arc<Self>, probe: bool) -> Ticket {
        Ticket { circuit: self.clone(), probe, resolved: false }
    }

    /// The provider answered (whatever it said): close the circuit.
    fn answered(&self) {
        let reopened = {
            let mut inner = self.lock();
            inner.failures = 0;
            inner.open_periods = periods(self.min_open, self.max_open);
            !matches!(std::mem::replace(&mut inner.state, State::Closed), State::Closed)
        };
        if reopened {
            tracing::info!("LLM circuit closed: the provider answers again");
            self.metrics.circuit_open(false);
            self.changed.notify_waiters();
        }
    }

    /// A transport failure: counts towards opening; a failed probe opens it again, for longer.
    fn failed(&self, probe: bool) {
        let opened = {
            let mut inner = self.lock();
            match inner.state {
                State::Probing if probe => {
                    let open_for = inner.open_periods.next().unwrap_or(self.max_open);
                    inner.state = State::Open { until: Instant::now() + open_for };
                    Some((open_for, "the probe failed"))
                }
                State::Closed => {
                    inner.failures += 1;
                    if inner.failures >= self.threshold {
                        let open_for = inner.open_periods.next().unwrap_or(self.max_open);
                        inner.state = State::Open { until: Instant::now() + open_for };
                        Some((open_for, "transport failures in a row"))
                    } else {
                        None
                    }
                }
                // Calls that started before the circuit opened: already counted.
                _ => None,
            }
        };
        if let Some((open_for, why)) = opened {
            tracing::warn!(?open_for, failures = self.threshold, "LLM circuit open ({why}): calls paused");
            self.metrics.circuit_open(true);
            self.changed.notify_waiters();
        }
    }

    /// A probe that was cancelled: the next caller probes at once.
    fn abandoned(&self) {
        let mut inner = self.lock();
        if matches!(inner.state, State::Probing) {
            inner.state = State::Open { until: Instant::now() };
            drop(inner);
            self.changed.notify_waiters();
        }
    }
}

impl Ticket {
    /// The provider answered, successfully or with a definite refusal (4xx): it is up.
    pub fn answered(mut self) {
        self.resolved = true;
        self.circuit.answered();
    }

    /// The call failed in transport (5xx, 429, timeout, connection).
    pub fn failed(mut self) {
        self.resolved = true;
        self.circuit.failed(self.probe);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.resolved && self.probe {
            self.circuit.abandoned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn circuit() -> Arc<Circuit> {
        Circuit::new(3, Duration::from_secs(1), Duration::from_secs(4), Metrics::new([], []).llm_provider("default"))
    }

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_it_and_a_successful_probe_closes_it() {
        let circuit = circuit();
        for _ in 0..2 {
            circuit.admit(later(60)).await.unwrap().failed();
        }
        assert_eq!(circuit.state(), CircuitState::Closed, "two failures are not enough");
        circuit.admit(later(60)).await.unwrap().answered();
        for _ in 0..3 {
            circuit.admit(later(60)).await.unwrap().failed();
        }
        assert_eq!(circuit.state(), CircuitState::Open);

        // While open, a caller whose deadline comes first gives up without calling.
        let started = Instant::now();
        assert!(circuit.admit(started + Duration::from_millis(500)).await.is_none());
        // The probe is let through after the open period; a second caller waits for it.
        let probe = circuit.admit(later(60)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        let waiter = tokio::spawn({
            let circuit = circuit.clone();
            async move { circuit.admit(later(60)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "only the probe calls while half-open");
        probe.answered();
        assert!(waiter.await.unwrap(), "closing wakes the waiters");
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_open_it_for_longer_up_to_the_maximum() {
        let circuit = circuit();
        for _ in 0..3 {
            circuit.admit(later(600)).await.unwrap().failed();
        }
        let mut waits = Vec::new();
        for _ in 0..4 {
            let started = Instant::now();
            let probe = circuit.admit(later(600)).await.unwrap();
            waits.push(started.elapsed().as_secs());
            probe.failed();
        }
        assert_eq!(waits, [1, 2, 4, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_lets_the_next_caller_probe() {
        let circuit = circuit();
        for _ in 0..3 {
            circuit.admit(later(60)).await.unwrap().failed();
        }
        let probe = circuit.admit(later(60)).await.unwrap();
        drop(probe);
        let next = tokio::time::timeout(Duration::from_millis(10), circuit.admit(later(60))).await;
        assert!(next.unwrap().is_some(), "the turn passes on at once");
    }
}
