//! The contract's topology, declared idempotently at every (re)connection: the request
//! queue (a durable quorum queue dead-lettering to the DLQ), the DLQ, the delay queue
//! (where a delivery waits before it goes back to the request queue) and the durable topic
//! exchange for events.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::BrokerSettings;

/// Declares the queues and the exchange. Declaring with arguments that differ from an
/// existing queue's fails (PRECONDITION_FAILED), which is the right outcome: a silently
/// different queue would break the delivery guarantees.
pub async fn declare(channel: &Channel, settings: &BrokerSettings) -> lapin::Result<()> {
    let mut dlq = FieldTable::default();
    dlq.insert("x-queue-type".into(), long_string("quorum"));
    channel.queue_declare(settings.dead_letter_queue.as_str().into(), QueueDeclareOptions::durable(), dlq).await?;

    let mut requests = FieldTable::default();
    requests.insert("x-queue-type".into(), long_string("quorum"));
    // A message that keeps killing workers is redelivered `delivery_limit` times, then
    // dead-lettered — at least once, which on quorum queues needs reject-publish.
    requests.insert("x-delivery-limit".into(), AMQPValue::LongInt(settings.delivery_limit as i32));
    requests.insert("x-dead-letter-exchange".into(), long_string(""));
    requests.insert("x-dead-letter-routing-key".into(), long_string(&settings.dead_letter_queue));
    requests.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    requests.insert("x-overflow".into(), long_string("reject-publish"));
    channel.queue_declare(settings.request_queue.as_str().into(), QueueDeclareOptions::durable(), requests).await?;

    // Each deferred copy carries its own `expiration`; once expired it is dead-lettered back to
    // the request queue as a new message (no delivery count). Quorum, and at-least-once, so
    // that the move back cannot lose it.
    let mut delay = FieldTable::default();
    delay.insert("x-queue-type".into(), long_string("quorum"));
    delay.insert("x-dead-letter-exchange".into(), long_string(""));
    delay.insert("x-dead-letter-routing-key".into(), long_string(&settings.request_queue));
    delay.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    delay.insert("x-overflow".into(), long_string("reject-publish"));
    channel.queue_declare(settings.delay_queue.as_str().into(), QueueDeclareOptions::durable(), delay).await?;

    channel
        .exchange_declare(
            settings.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
