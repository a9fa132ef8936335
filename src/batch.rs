//! Group commits. Hundreds of jobs in flight each make the same few small writes (claim a
//! job, record an outcome, mark an event published); made one by one, each is a round trip
//! and a commit, and Postgres spends its time on the protocol rather than on the rows.
//! A [`Batcher`] hands them to a few writer tasks that each take everything waiting and
//! write it in one statement or transaction.
//!
//! Batches form on their own: a writer takes what queued up while the previous batch was
//! being written, and never waits for more. An idle daemon writes each item at once, as
//! before; a busy one writes fewer, larger batches. Writes that no job waits on (the
//! "published" marks) may instead linger a few milliseconds for more.

use std::future::Future;
use std::sync::Arc;

use sea_orm::{DbErr, RuntimeErr};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::{Duration, Instant};

/// The most items one write takes: large enough to amortise a round trip, small enough
/// that one statement stays quick.
pub const MAX_BATCH: usize = 128;

/// The longest one write may take. A write on a connection whose server vanished without a
/// word (no reset: a machine lost) would otherwise wait for TCP to give up, minutes, with every
/// item of that kind queued behind it; past this its items get an outage error, which their
/// callers retry on a fresh connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

type Pending<I, O> = (I, oneshot::Sender<Result<O, DbErr>>);

/// Submits items to writer tasks that write them in batches. Cheap to clone; the writers
/// stop when the last clone is dropped.
pub struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Pending<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Spawns `writers` tasks that call `write` with up to [`MAX_BATCH`] items at a time.
    /// `write` returns one result per item, in order.
    ///
    /// Must be called within a Tokio runtime.
    pub fn spawn<W, Fut>(writers: usize, write: W) -> Self
    where
        W: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<O, DbErr>>> + Send,
    {
        Self::spawn_lingering(writers, Duration::ZERO, write)
    }

    /// Like [`spawn`](Self::spawn), but a writer that found fewer than [`MAX_BATCH`] items
    /// waits up to `linger` for more before writing: for writes nobody waits on to go on
    /// with a job, larger batches for a little latency.
    pub fn spawn_lingering<W, Fut>(writers: usize, linger: Duration, write: W) -> Self
    where
        W: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<O, DbErr>>> + Send,
    {
        let (queue, receiver) = mpsc::unbounded_channel::<Pending<I, O>>();
        let receiver = Arc::new(Mutex::new(receiver));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let (receiver, write) = (receiver.clone(), write.clone());
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&receiver, linger).await {
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let count = items.len();
                    let written = tokio::time::timeout(WRITE_TIMEOUT, write(items)).await;
                    let mut results =
                        written.unwrap_or_else(|_| (0..count).map(|_| Err(timed_out())).collect()).into_iter();
                    for reply in replies {
                        let result = results.next().unwrap_or_else(|| {
                            Err(DbErr::Custom(format!("a batch of {count} writes returned fewer results")))
                        });
                        // The submitter may have given up (shutdown): the write stands.
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Self { queue }
    }

    /// Queues `item` for the next batch and waits for its result.
    pub async fn submit(&self, item: I) -> Result<O, DbErr> {
        let (reply, result) = oneshot::channel();
        self.queue.send((item, reply)).map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }
}

/// Waits for one item, then takes whatever else is already waiting or arrives within
/// `linger`, up to [`MAX_BATCH`]. `None` once every [`Batcher`] is dropped.
async fn next_batch<T>(receiver: &Mutex<mpsc::UnboundedReceiver<T>>, linger: Duration) -> Option<Vec<T>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let deadline = Instant::now() + linger;
    let mut batch = Vec::with_capacity(receiver.len().min(MAX_BATCH - 1) + 1);
    batch.push(first);
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) if linger.is_zero() => break,
            Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) | Err(_) => break,
            },
        }
    }
    Some(batch)
}

/// A write that took longer than [`WRITE_TIMEOUT`]: an outage, retried.
fn timed_out() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(format!("a database write took longer than {WRITE_TIMEOUT:?}")))
}

/// A writer is gone (it panicked, or the runtime is shutting down): transient, so the
/// caller's retry policy applies.
fn gone() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal("the database writer stopped".to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn each_submitter_gets_its_own_result() {
        let batcher =
            Batcher::spawn(2, |items: Vec<u32>| async move { items.into_iter().map(|i| Ok(i * 2)).collect() });
        let results = futures_util::future::join_all((0..500).map(|i| {
            let batcher = batcher.clone();
            async move { batcher.submit(i).await.unwrap() }
        }))
        .await;
        assert_eq!(results, (0..500).map(|i| i * 2).collect::<Vec<_>>());
    }

    // Tokio's paused clock: time moves only when every task waits, so the order of events
    // below does not depend on how loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn items_that_queue_during_a_write_go_together_in_the_next() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let batcher = Batcher::spawn(1, {
            let sizes = sizes.clone();
            move |items: Vec<u32>| {
                sizes.lock().unwrap().push(items.len());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    items.into_iter().map(Ok).collect()
                }
            }
        });
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(0).await }
        });
        // The writer is busy with the first item until these are all queued.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest = futures_util::future::join_all((1..=10).map(|i| batcher.submit(i))).await;
        first.await.unwrap().unwrap();
        assert!(rest.iter().all(Result::is_ok));
        assert_eq!(*sizes.lock().unwrap(), vec![1, 10]);
    }

    #[tokio::test]
    async fn a_batch_never_exceeds_the_maximum() {
        let largest = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::spawn(1, {
            let largest = largest.clone();
            move |items: Vec<usize>| {
                largest.fetch_max(items.len(), Ordering::Relaxed);
                async move { items.into_iter().map(Ok).collect() }
            }
        });
        let all = futures_util::future::join_all((0..3 * MAX_BATCH).map(|i| batcher.submit(i))).await;
        assert!(all.iter().all(Result::is_ok));
        assert!(largest.load(Ordering::Relaxed) <= MAX_BATCH);
    }

    /// A writer that records the size of each batch it writes.
    fn recording(linger: Duration) -> (Batcher<usize, usize>, Arc<std::sync::Mutex<Vec<usize>>>) {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let batcher = Batcher::spawn_lingering(1, linger, {
            let sizes = sizes.clone();
            move |items: Vec<usize>| {
                sizes.lock().unwrap().push(items.len());
                async move { items.into_iter().map(Ok).collect() }
            }
        });
        (batcher, sizes)
    }

    // Tokio's paused clock: time moves only when every task waits, so the order of events
    // below does not depend on how loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_writer_waits_for_more_before_writing() {
        let (batcher, sizes) = recording(Duration::from_secs(2));
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(0).await }
        });
        // The writer took the first item and lingers for more.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let rest = futures_util::future::join_all((1..=10).map(|i| batcher.submit(i))).await;
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(rest.into_iter().map(Result::unwrap).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
        assert_eq!(*sizes.lock().unwrap(), vec![11]);
    }

    // Tokio's paused clock: time moves only when every task waits, so the order of events
    // below does not depend on how loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_written_without_lingering() {
        let (batcher, sizes) = recording(Duration::from_secs(3600));
        let all = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all((0..MAX_BATCH).map(|i| batcher.submit(i))),
        )
        .await
        .expect("a full batch does not wait out the linger");
        assert!(all.iter().all(Result::is_ok));
        assert_eq!(*sizes.lock().unwrap(), vec![MAX_BATCH]);
    }

    #[tokio::test]
    async fn a_short_answer_from_the_writer_is_an_error_not_a_hang() {
        let batcher = Batcher::spawn(1, |_items: Vec<u32>| async move { Vec::<Result<u32, DbErr>>::new() });
        assert!(matches!(batcher.submit(1).await, Err(DbErr::Custom(_))));
    }
}
