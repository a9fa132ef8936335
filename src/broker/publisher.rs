//! Publishing with publisher confirms. A publish succeeds only when the broker confirmed
//! it; a nack, or a mandatory message returned as unroutable, is an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use crate::store::OutboxEvent;

/// Header that carries why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-instructd-error";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker could not take the message: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker nacked the message")]
    Nacked,
    #[error("the message could not be routed: {0}")]
    Returned(String),
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
}

impl Publisher {
    /// Opens `channels` channels in confirm mode.
    pub async fn open(
        connection: &Connection,
        channels: usize,
        events_exchange: &str,
        dead_letter_queue: &str,
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
            events_exchange: events_exchange.to_owned(),
            dead_letter_queue: dead_letter_queue.to_owned(),
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
        crate::metrics::event_published();
        Ok(())
    }

    /// Sends the requester its copy of an event, to the request's `reply_to` queue. Not
    /// mandatory: the requester may have stopped waiting and its queue be gone, which does
    /// not make the event undelivered.
    pub async fn publish_reply(&self, event: &OutboxEvent, reply_to: &str) -> Result<(), PublishError> {
        self.publish("", reply_to, false, &event.payload, event_properties(event)).await
    }

    /// Copies a request that can never succeed to the dead-letter queue, with the reason
    /// in `x-instructd-error` and the original properties and headers kept. Returns once
    /// the broker confirmed the copy is in the queue.
    pub async fn dead_letter(&self, body: &[u8], original: &BasicProperties, reason: &str) -> Result<(), PublishError> {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(LongString::from(reason)));
        let properties = original.clone().with_headers(headers).with_delivery_mode(2);
        self.publish("", &self.dead_letter_queue, true, body, properties).await
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

fn event_properties(event: &OutboxEvent) -> BasicProperties {
    json_properties()
        .with_correlation_id(short(&event.correlation_id))
        .with_message_id(short(&event.event_id.to_string()))
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
