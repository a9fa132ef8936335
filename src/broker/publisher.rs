//! Publishing with publisher confirms. A publish succeeds only when the broker confirmed
//! it; a nack, or a mandatory message returned as unroutable, is an error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::job::OutboxEvent;
use crate::metrics::Metrics;
use crate::text;

/// Header that carries why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-instructd-error";

/// Header that says how many headers of the original were not kept on a copy (they would
/// not have fitted in an AMQP frame beside the reason).
pub const HEADERS_DROPPED_HEADER: &str = "x-instructd-headers-dropped";

/// Headers the broker writes on a delivery: never copied, so that a dead letter replayed, or a
/// deferred delivery coming back, starts its count afresh and no publisher can forge one.
const BROKER_HEADERS: &[&str] = &["x-delivery-count", "x-death"];
const BROKER_HEADER_PREFIXES: &[&str] = &["x-first-death-", "x-last-death-"];

/// The most bytes of original headers kept on a copy. RabbitMQ's frames are 128 KiB by
/// default and the header frame carries every property: with the reason
/// ([`text::MAX_MESSAGE_BYTES`]) and the other properties (at most 255 bytes each), this leaves
/// ample room.
const MAX_COPIED_HEADER_BYTES: usize = 96 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker could not take the message: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker nacked the message")]
    Nacked,
    #[error("the message could not be routed: {0}")]
    Returned(String),
    /// The shutdown's grace period ended while the broker held the publish (a memory or
    /// disk alarm blocks publishing connections).
    #[error("given up at the end of the shutdown's grace period")]
    Abandoned,
}

/// Confirm-mode channels on the publishing connection, each carrying one publish at a time.
/// Cheap to clone; safe to share.
///
/// One at a time per channel, because lapin hands a returned (unroutable) message to
/// whichever confirm completes next on its channel: with several publishes in flight, and
/// the broker acking them together, an unroutable event could be taken for confirmed and a
/// routed one for returned. A few channels keep publishes concurrent.
#[derive(Clone)]
pub struct Publisher {
    channels: Arc<[(Channel, Mutex<()>)]>,
    next: Arc<AtomicUsize>,
    events_exchange: String,
    dead_letter_queue: String,
    delay_queue: String,
    metrics: Metrics,
}

/// Where a publisher sends what it sends.
pub struct Destinations<'a> {
    pub events_exchange: &'a str,
    pub dead_letter_queue: &'a str,
    pub delay_queue: &'a str,
}

impl Publisher {
    /// Opens `channels` channels in confirm mode.
    pub async fn open(
        connection: &Connection,
        channels: usize,
        destinations: Destinations<'_>,
        metrics: Metrics,
    ) -> lapin::Result<Self> {
        let mut opened = Vec::with_capacity(channels.max(1));
        for _ in 0..channels.max(1) {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            opened.push((channel, Mutex::new(())));
        }
        Ok(Self {
            channels: opened.into(),
            next: Arc::new(AtomicUsize::new(0)),
            events_exchange: destinations.events_exchange.to_owned(),
            dead_letter_queue: destinations.dead_letter_queue.to_owned(),
            delay_queue: destinations.delay_queue.to_owned(),
            metrics,
        })
    }

    pub fn is_open(&self) -> bool {
        self.channels.iter().all(|(channel, _)| channel.status().connected())
    }

    /// Publishes a completion event to the events exchange, `mandatory`: it succeeds only
    /// once the broker confirmed it *and* routed it to at least one queue. An event that no
    /// queue is bound for comes back as [`PublishError::Returned`] and stays pending.
    pub async fn publish_event(&self, event: &OutboxEvent) -> Result<(), PublishError> {
        self.publish(&self.events_exchange, &event.routing_key, true, &event.payload, event_properties(event)).await?;
        self.metrics.event_published();
        Ok(())
    }

    /// Sends the requester its copy of an event, to the request's `reply_to` queue. Not
    /// mandatory: the requester may have stopped waiting and its queue be gone, which does
    /// not make the event undelivered.
    pub async fn publish_reply(&self, event: &OutboxEvent, reply_to: &str) -> Result<(), PublishError> {
        self.publish("", reply_to, false, &event.payload, event_properties(event)).await
    }

    /// Copies a request that can never succeed to the dead-letter queue, with the reason
    /// (clipped to [`text::MAX_MESSAGE_BYTES`]) in `x-instructd-error` and the original
    /// properties and headers kept, but for the broker's own delivery headers. Returns once the
    /// broker confirmed the copy is in the queue.
    pub async fn dead_letter(&self, body: &[u8], original: &BasicProperties, reason: &str) -> Result<(), PublishError> {
        let mut headers = copied_headers(original);
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(LongString::from(text::message(reason))));
        let properties = original.clone().with_headers(headers.into()).with_delivery_mode(2);
        self.publish("", &self.dead_letter_queue, true, body, properties).await
    }

    /// Moves a delivery aside for `delay`: a copy to the delay queue (without the broker's
    /// delivery headers, and with `job_id` as its `message_id` when the body does not carry it,
    /// so that the copy is the same job), which the broker dead-letters back to the request
    /// queue once it expired. Returns once the broker confirmed the copy.
    pub async fn defer(
        &self,
        body: &[u8],
        original: &BasicProperties,
        job_id: Option<Uuid>,
        delay: Duration,
    ) -> Result<(), PublishError> {
        let headers = copied_headers(original);
        let mut properties = original
            .clone()
            .with_headers(headers.into())
            .with_delivery_mode(2)
            .with_expiration(delay.as_millis().to_string().into());
        if let Some(job_id) = job_id {
            properties = properties.with_message_id(job_id.to_string().into());
        }
        self.publish("", &self.delay_queue, true, body, properties).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (channel, in_use) = &self.channels[self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len()];
        let _one_at_a_time = in_use.lock().await;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                short(routing_key),
                BasicPublishOptions { mandatory, ..Default::default() },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Returned(returned.reply_text.to_string())),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}

/// The headers of `original` that a copy keeps: all but the broker's own delivery headers,
/// and none at all (but a note of how many) if they would not fit beside the reason.
fn copied_headers(original: &BasicProperties) -> BTreeMap<ShortString, AMQPValue> {
    let Some(headers) = original.headers() else { return BTreeMap::new() };
    let broker_header = |name: &str| {
        BROKER_HEADERS.contains(&name) || BROKER_HEADER_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
    };
    let kept: BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(name, _)| !broker_header(name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if table_size(kept.iter()) <= MAX_COPIED_HEADER_BYTES {
        return kept;
    }
    let note = format!(
        "the original's headers ({} of them, {} bytes) were not kept: too large to copy beside the reason",
        kept.len(),
        table_size(kept.iter())
    );
    BTreeMap::from([(ShortString::from(HEADERS_DROPPED_HEADER), AMQPValue::LongString(LongString::from(note)))])
}

/// An upper bound of the bytes a field table takes on the wire.
fn table_size<'a>(entries: impl Iterator<Item = (&'a ShortString, &'a AMQPValue)>) -> usize {
    4 + entries.map(|(name, value)| 1 + name.as_str().len() + value_size(value)).sum::<usize>()
}

/// An upper bound of the bytes an AMQP field value takes on the wire, with its type tag.
fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(bytes) => 4 + bytes.as_slice().len(),
        AMQPValue::FieldArray(items) => 4 + items.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(table) => table_size(table.inner().iter()),
        _ => 8,
    }
}

fn event_properties(event: &OutboxEvent) -> BasicProperties {
    let properties = json_properties()
        .with_correlation_id(short(&event.correlation_id))
        .with_message_id(short(&event.event_id.to_string()));
    match &event.trace {
        // The job's W3C trace context: a consumer's spans join the request's trace.
        Some(trace) => {
            let headers: BTreeMap<ShortString, AMQPValue> = crate::telemetry::trace_context(trace)
                .map(|(name, value)| (ShortString::from(name), AMQPValue::LongString(LongString::from(value))))
                .collect();
            properties.with_headers(headers.into())
        }
        None => properties,
    }
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// An AMQP short string, truncated to the protocol's 255 bytes (on a char boundary).
pub fn short(value: &str) -> ShortString {
    let mut end = value.len().min(255);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&value[..end])
}

/// The first header of a delivery's table as text, if it is a string.
pub fn header_text(headers: &Option<FieldTable>, name: &str) -> Option<String> {
    match headers.as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
