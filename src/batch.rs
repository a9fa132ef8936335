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
//!
//! One writer takes every batch while it keeps up; the others write only when it leaves a
//! full batch waiting ([`Batcher::spawn`]), so that their batches never split one it would
//! have written whole.

use std::future::Future;
use std::sync::Arc;

use sea_orm::{DbErr, RuntimeErr};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, Notify, mpsc, oneshot};
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
    /// The first writer takes whatever is waiting; the others take a batch only when a full
    /// one is left waiting after the first writer took its own (overflow). While one writer
    /// keeps up, batches are as large as with one; when it does not (10,000 jobs in flight
    /// finishing within a second), the others write beside it. Two writers that both took
    /// whatever was waiting made smaller batches, and cost 5–10% of the throughput at 64
    /// jobs at once.
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
        let shared = Arc::new(Shared {
            receiver: Mutex::new(receiver),
            overflow: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let write = Arc::new(write);
        for writer in 0..writers.max(1) {
            let (shared, write) = (shared.clone(), write.clone());
            tokio::spawn(async move {
                let overflow = writer > 0;
                while let Some(batch) = next_batch(&shared, linger, overflow).await {
                    if batch.is_empty() {
                        continue;
                    }
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
                if !overflow {
                    // Every Batcher is gone: the overflow writers stop too.
                    shared.closed.store(true, Ordering::Release);
                    shared.overflow.notify_waiters();
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

/// What a batcher's writers share: the queue, and word of a full batch left waiting.
struct Shared<T> {
    receiver: Mutex<mpsc::UnboundedReceiver<T>>,
    /// Given when a writer leaves [`MAX_BATCH`] items or more waiting.
    overflow: Notify,
    /// Set when the first writer has stopped (every [`Batcher`] dropped).
    closed: AtomicBool,
}

/// The first writer's batch: waits for one item, then takes whatever else is already
/// waiting or arrives within `linger`, up to [`MAX_BATCH`]. An overflow writer's: waits for
/// word of a full batch left waiting, then takes it (empty if another writer took it
/// first). `None` once every [`Batcher`] is dropped.
async fn next_batch<T>(shared: &Shared<T>, linger: Duration, overflow: bool) -> Option<Vec<T>> {
    if overflow {
        let notified = shared.overflow.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so that the last word cannot slip between.
        notified.as_mut().enable();
        if shared.closed.load(Ordering::Acquire) {
            return None;
        }
        notified.await;
        if shared.closed.load(Ordering::Acquire) {
            return None;
        }
    }
    let mut receiver = shared.receiver.lock().await;
    let first = if overflow {
        if receiver.len() < MAX_BATCH {
            return Some(Vec::new());
        }
        receiver.try_recv().ok()?
    } else {
        receiver.recv().await?
    };
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
    if receiver.len() >= MAX_BATCH {
        shared.overflow.notify_one();
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

    /// The size of each batch written, in order.
    type Sizes = Arc<std::sync::Mutex<Vec<usize>>>;

    /// A writer that records the size of each batch, takes 20 ms over each, and counts the
    /// most writes under way at once.
    fn slow_recording(writers: usize) -> (Batcher<usize, usize>, Sizes, Arc<AtomicUsize>) {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (writing, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let batcher = Batcher::spawn(writers, {
            let (sizes, most) = (sizes.clone(), most.clone());
            move |items: Vec<usize>| {
                sizes.lock().unwrap().push(items.len());
                let (writing, most) = (writing.clone(), most.clone());
                async move {
                    most.fetch_max(writing.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    writing.fetch_sub(1, Ordering::SeqCst);
                    items.into_iter().map(Ok).collect()
                }
            }
        });
        (batcher, sizes, most)
    }

    // Tokio's paused clock, as above.
    #[tokio::test(start_paused = true)]
    async fn a_second_writer_does_not_split_what_the_first_would_write_whole() {
        let (batcher, sizes, most) = slow_recording(2);
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest = futures_util::future::join_all((1..=100).map(|i| batcher.submit(i))).await;
        first.await.unwrap().unwrap();
        assert!(rest.iter().all(Result::is_ok));
        assert_eq!(*sizes.lock().unwrap(), vec![1, 100], "one writer while it keeps up");
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }

    // Tokio's paused clock, as above.
    #[tokio::test(start_paused = true)]
    async fn a_second_writer_takes_the_full_batches_the_first_leaves_waiting() {
        let (batcher, sizes, most) = slow_recording(2);
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest = futures_util::future::join_all((1..=3 * MAX_BATCH).map(|i| batcher.submit(i))).await;
        first.await.unwrap().unwrap();
        assert_eq!(rest.into_iter().map(Result::unwrap).collect::<Vec<_>>(), (1..=3 * MAX_BATCH).collect::<Vec<_>>());
        let mut sizes = sizes.lock().unwrap().clone();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, MAX_BATCH, MAX_BATCH, MAX_BATCH], "full batches, never split");
        assert_eq!(most.load(Ordering::SeqCst), 2, "the two writers wrote at once");
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
    fn recording(linger: Duration) -> (Batcher<usize, usize>, Sizes) {
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
