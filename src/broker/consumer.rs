//! Consuming the request queue with a prefetch a little over the worker's concurrency
//! ([`prefetch`]), spread over channels that each hold at most [`UNACKED_PER_CHANNEL`]
//! deliveries ([`channel_prefetches`]).

use futures_util::future::try_join_all;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use crate::config::Settings;

/// The deliveries the broker may hand a daemon running `concurrency` jobs at once: those,
/// and up to as many again (at most 128 more) waiting for a slot. A slot given back then
/// takes the next job at once, not after the round trip of an ack and a delivery (at 0 ms
/// @ 64: 3,719 → 4,099–4,239 jobs/s); the few extra keep a replica from taking a backlog
/// from the others, and a crash returns them to the queue.
pub fn prefetch(concurrency: u16) -> u16 {
    concurrency.saturating_add(concurrency.min(128))
}

/// The most deliveries one consuming channel holds unacked. RabbitMQ 3.x keeps a channel's
/// unacked deliveries in a queue that each ack walks from the oldest to the one it acks;
/// jobs finish in any order, so an ack costs in proportion to what its channel holds, all
/// in the channel's one Erlang process. At 10,000 jobs in flight on one channel that
/// process did ten times the work of any other on the broker and bounded the daemon's pace
/// (`recon:proc_window(reductions, …)`); 256 a channel keeps an ack's walk short, and the
/// channels' processes share the broker's cores.
pub const UNACKED_PER_CHANNEL: u16 = 256;

/// The prefetch of each channel the requests are consumed on: [`prefetch`] split as evenly
/// as it goes over as few channels as hold it at [`UNACKED_PER_CHANNEL`] each.
pub fn channel_prefetches(concurrency: u16) -> Vec<u16> {
    let total = prefetch(concurrency);
    let channels = total.div_ceil(UNACKED_PER_CHANNEL).max(1);
    (0..channels).map(|index| total / channels + u16::from(index < total % channels)).collect()
}

/// Opens the channels of [`channel_prefetches`] for `worker.concurrency` and starts a
/// consumer of the request queue on each.
pub async fn consume_requests(connection: &Connection, settings: &Settings) -> lapin::Result<Vec<(Channel, Consumer)>> {
    try_join_all(channel_prefetches(settings.worker.concurrency).into_iter().map(|prefetch| async move {
        let channel = connection.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                settings.broker.request_queue.as_str().into(),
                format!("instructd-{}", uuid::Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_is_split_evenly_over_channels_of_at_most_256() {
        for concurrency in [1, 2, 64, 127, 128, 129, 200, 256, 1000, 10_000, u16::MAX] {
            let prefetches = channel_prefetches(concurrency);
            let total: u32 = prefetches.iter().map(|&p| u32::from(p)).sum();
            assert_eq!(total, u32::from(prefetch(concurrency)), "at {concurrency}");
            assert!(prefetches.iter().all(|&p| (1..=UNACKED_PER_CHANNEL).contains(&p)), "at {concurrency}");
            let (least, most) = (prefetches.iter().min().unwrap(), prefetches.iter().max().unwrap());
            assert!(most - least <= 1, "at {concurrency}: {prefetches:?}");
            assert_eq!(prefetches.len(), usize::from(prefetch(concurrency).div_ceil(UNACKED_PER_CHANNEL)));
        }
        assert_eq!(channel_prefetches(64), vec![128]);
        assert_eq!(channel_prefetches(10_000).len(), 40);
    }
}
