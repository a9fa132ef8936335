//! The console's own way to RabbitMQ, for its actions: replayed jobs published to the request
//! queue, and the dead-letter queue read, moved back and purged. One connection
//! (`instructd-console`), opened at the first action and again after it is lost; a channel
//! per action, in confirm mode, so that nothing is acknowledged or reported moved before the
//! broker has it. No dead letter is ever handed back unacknowledged (a quorum queue counts
//! that as a failed delivery, and RabbitMQ 4 drops a message after 20): one that is read and
//! not taken is copied to the queue's end, then acknowledged.

use std::collections::HashSet;

use anyhow::{Context, bail};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use ring::digest;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::broker::publisher::{header_text, json_properties, short};
use crate::broker::{connection, topology};
use crate::config::BrokerSettings;
use crate::text;

/// The most dead letters one listing reads.
pub const MAX_LISTED: u32 = 500;

/// The most dead letters one replay or purge goes through (the queue's length when it
/// starts, up to this): messages that come back meanwhile wait for the next one.
const MAX_SCANNED: u32 = 100_000;

/// How many bytes of a dead letter's body a listing quotes.
const FIRST_BYTES: usize = 200;

/// Headers the broker and instructd add when they dead-letter a message: a message moved
/// back starts without them (a clean delivery count).
const DELIVERY_HEADERS: &[&str] = &[
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-instructd-error",
];

pub struct ConsoleBroker {
    settings: BrokerSettings,
    connection: Mutex<Option<Connection>>,
}

/// A message in the dead-letter queue, as a listing shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// What replay and purge name it by: the first 16 hex digits of its body's SHA-256.
    pub id: String,
    /// Why it is there: instructd's `x-instructd-error`, or the broker's `x-death` reason.
    pub reason: String,
    /// The body's size in bytes.
    pub size: usize,
    /// The body's first 200 bytes, as text (invalid UTF-8 replaced).
    pub first_bytes: String,
    /// The job id, when the body or its `message_id` holds one.
    pub job_id: Option<Uuid>,
}

/// The dead-letter queue's length and its first messages.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetters {
    pub total: u32,
    pub dead_letters: Vec<DeadLetter>,
}

/// Which dead letters an action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    All,
    Ids(HashSet<String>),
}

/// What a purge deleted: how many messages, and their ids (none listed for all).
#[derive(Debug, Clone, Serialize)]
pub struct Purged {
    pub count: u32,
    pub ids: Vec<String>,
}

/// A dead letter moved back to the request queue.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub id: String,
    /// The job id it runs under now (a new one, when the body is a JSON object).
    pub job_id: Option<Uuid>,
    /// The job id it had.
    pub replay_of: Option<Uuid>,
}

impl ConsoleBroker {
    pub fn new(settings: BrokerSettings) -> Self {
        Self { settings, connection: Mutex::new(None) }
    }

    /// A new channel on the console's connection, reconnecting once if it was lost.
    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut connection = self.connection.lock().await;
        if let Some(open) = connection.as_ref().filter(|open| open.status().connected())
            && let Ok(channel) = open.create_channel().await
        {
            return Ok(channel);
        }
        let opened = connection::connect(&self.settings, "console").await?;
        let channel = opened.create_channel().await?;
        // The queues may not exist yet (no worker ever started): declared as the workers do.
        topology::declare(&channel, &self.settings).await.context("declaring the topology")?;
        *connection = Some(opened);
        Ok(channel)
    }

    /// A channel whose publishes are confirmed.
    async fn confirming_channel(&self) -> anyhow::Result<Channel> {
        let channel = self.channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(channel)
    }

    /// Publishes `bodies` (each with its job id) to the request queue and waits for the
    /// broker to confirm every one.
    pub async fn publish_requests(&self, bodies: &[(Uuid, Vec<u8>)]) -> anyhow::Result<()> {
        let channel = self.confirming_channel().await?;
        let mut confirms = Vec::with_capacity(bodies.len());
        for (job_id, body) in bodies {
            let properties = json_properties().with_message_id(short(&job_id.to_string()));
            confirms.push(self.publish(&channel, body, properties).await?);
        }
        for confirm in confirms {
            confirmed(confirm.await?)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn publish(
        &self,
        channel: &Channel,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<lapin::PublisherConfirm> {
        channel
            .basic_publish(
                "".into(),
                short(&self.settings.request_queue),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                properties,
            )
            .await
    }

    /// How many messages the dead-letter queue holds (ready ones: not those a listing or an
    /// action holds at the moment).
    pub async fn dead_letter_count(&self) -> anyhow::Result<u32> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        let queue =
            channel.queue_declare(short(&self.settings.dead_letter_queue), options, FieldTable::default()).await?;
        let _ = channel.close(200, "counted".into()).await;
        Ok(queue.message_count())
    }

    /// The dead-letter queue's length and up to `limit` of its first messages. A message is
    /// read, copied to the queue's end (confirmed) and only then acknowledged: never handed
    /// back unacknowledged, which a quorum queue counts as a failed delivery (RabbitMQ 4 drops
    /// a message after 20 of them by default). So a listing moves what it shows to the end:
    /// the next one shows the next messages, and a queue no longer than `limit` keeps its
    /// order.
    pub async fn dead_letters(&self, limit: u32) -> anyhow::Result<DeadLetters> {
        let channel = self.confirming_channel().await?;
        let mut listed = DeadLetters { total: 0, dead_letters: Vec::new() };
        let mut left = None;
        while listed.dead_letters.len() < limit.min(MAX_LISTED) as usize && left != Some(0) {
            let Some(message) = self.get(&channel).await? else { break };
            let left = left.get_or_insert(message.message_count.saturating_add(1));
            *left -= 1;
            if listed.dead_letters.is_empty() {
                listed.total = message.message_count.saturating_add(1);
            }
            listed.dead_letters.push(describe(&message.delivery.data, &message.delivery.properties));
            self.to_the_end(&channel, &message.delivery).await?;
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(listed)
    }

    /// Moves `delivery` to the end of the dead-letter queue: a copy, confirmed, then the ack.
    async fn to_the_end(&self, channel: &Channel, delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
        let mut properties = delivery.properties.clone();
        if let Some(headers) = delivery.properties.headers() {
            let mut kept = FieldTable::default();
            for (name, value) in headers.inner() {
                if name.as_str() != "x-delivery-count" {
                    kept.insert(name.clone(), value.clone());
                }
            }
            properties = properties.with_headers(kept);
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                short(&self.settings.dead_letter_queue),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &delivery.data,
                properties,
            )
            .await?;
        confirmed(confirm.await?)?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn get(&self, channel: &Channel) -> lapin::Result<Option<lapin::message::BasicGetMessage>> {
        channel.basic_get(short(&self.settings.dead_letter_queue), BasicGetOptions { no_ack: false }).await
    }

    /// Moves `which` dead letters back to the request queue, each acknowledged in the DLQ only
    /// once the broker confirmed its copy. A copy starts without the delivery headers; a JSON
    /// object gets a new `job_id`, and `replay_of` names its old one, so that it runs again
    /// (an id that already has an outcome would only be answered from it).
    pub async fn replay_dead_letters(&self, which: &Which) -> anyhow::Result<Vec<Moved>> {
        let channel = self.confirming_channel().await?;
        let mut moved = Vec::new();
        let mut scan = Scan::new(which);
        while let Some((delivery, id)) = scan.next(self, &channel).await? {
            let old = job_id_of(&delivery.data, &delivery.properties);
            let (body, job_id) = match serde_json::from_slice::<Value>(&delivery.data) {
                Ok(Value::Object(mut request)) => {
                    let job_id = Uuid::new_v4();
                    request.insert("job_id".into(), Value::String(job_id.to_string()));
                    if let Some(old) = old {
                        request.insert("replay_of".into(), Value::String(old.to_string()));
                    }
                    (serde_json::to_vec(&request).expect("JSON serializes"), Some(job_id))
                }
                _ => (delivery.data.clone(), None),
            };
            let mut properties = without_delivery_headers(&delivery.properties);
            if let Some(job_id) = job_id {
                properties = properties.with_message_id(short(&job_id.to_string()));
            }
            confirmed(self.publish(&channel, &body, properties).await?.await?)?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            moved.push(Moved { id, job_id: job_id.or(old), replay_of: job_id.and(old) });
        }
        let _ = channel.close(200, "replayed".into()).await;
        Ok(moved)
    }

    /// Deletes `which` dead letters: the ids purged.
    pub async fn purge_dead_letters(&self, which: &Which) -> anyhow::Result<Purged> {
        let channel = self.confirming_channel().await?;
        if *which == Which::All {
            let count =
                channel.queue_purge(short(&self.settings.dead_letter_queue), QueuePurgeOptions::default()).await?;
            let _ = channel.close(200, "purged".into()).await;
            return Ok(Purged { count, ids: Vec::new() });
        }
        let mut purged = Purged { count: 0, ids: Vec::new() };
        let mut scan = Scan::new(which);
        while let Some((delivery, id)) = scan.next(self, &channel).await? {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            purged.count += 1;
            purged.ids.push(id);
        }
        let _ = channel.close(200, "purged".into()).await;
        Ok(purged)
    }
}

/// A pass over the dead letters there were when it started (up to [`MAX_SCANNED`]), handing
/// out those that `which` takes (of several copies of one id, the first); the others are moved
/// to the queue's end, so that none is handed back unacknowledged. It ends early once every
/// named id was handed out.
struct Scan<'a> {
    which: &'a Which,
    left: Option<u32>,
    taken: HashSet<String>,
}

impl<'a> Scan<'a> {
    fn new(which: &'a Which) -> Self {
        Self { which, left: None, taken: HashSet::new() }
    }

    async fn next(
        &mut self,
        broker: &ConsoleBroker,
        channel: &Channel,
    ) -> anyhow::Result<Option<(lapin::message::Delivery, String)>> {
        loop {
            if self.left == Some(0) || matches!(self.which, Which::Ids(ids) if self.taken.len() == ids.len()) {
                return Ok(None);
            }
            let Some(message) = broker.get(channel).await? else { return Ok(None) };
            let left = self.left.get_or_insert(MAX_SCANNED.min(message.message_count.saturating_add(1)));
            *left -= 1;
            let id = body_id(&message.delivery.data);
            let wanted = match self.which {
                Which::All => true,
                Which::Ids(ids) => ids.contains(&id) && !self.taken.contains(&id),
            };
            if wanted {
                if matches!(self.which, Which::Ids(_)) {
                    self.taken.insert(id.clone());
                }
                return Ok(Some((message.delivery, id)));
            }
            broker.to_the_end(channel, &message.delivery).await?;
        }
    }
}

fn confirmed(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => bail!("the queue did not take it: {}", returned.reply_text),
        Confirmation::Nack(_) => bail!("the broker refused it (is the queue full?)"),
    }
}

/// A dead letter's id: the first 16 hex digits of its body's SHA-256.
pub fn body_id(body: &[u8]) -> String {
    digest::digest(&digest::SHA256, body).as_ref()[..8].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The job id a message carries: its body's `job_id`, or its `message_id` when that is a UUID.
fn job_id_of(body: &[u8], properties: &BasicProperties) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct JobId {
        job_id: Option<Uuid>,
    }
    serde_json::from_slice::<JobId>(body)
        .ok()
        .and_then(|request| request.job_id)
        .or_else(|| properties.message_id().as_ref().and_then(|id| Uuid::try_parse(id.as_str()).ok()))
}

fn describe(body: &[u8], properties: &BasicProperties) -> DeadLetter {
    let reason = header_text(properties.headers(), "x-instructd-error")
        .or_else(|| death_reason(properties.headers()))
        .unwrap_or_else(|| "no reason given (published to the dead-letter queue directly?)".to_owned());
    let first = &body[..body.len().min(FIRST_BYTES)];
    DeadLetter {
        id: body_id(body),
        reason: text::message(&reason),
        size: body.len(),
        first_bytes: text::without_nul(&String::from_utf8_lossy(first)).into_owned(),
        job_id: job_id_of(body, properties),
    }
}

/// The reason RabbitMQ gave when it dead-lettered the message itself (`x-death`).
fn death_reason(headers: &Option<FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.as_ref()?.inner().get("x-death")? else { return None };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else { return None };
    let field = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(text)) => Some(text.to_string()),
        Some(AMQPValue::ShortString(text)) => Some(text.as_str().to_owned()),
        _ => None,
    };
    let queue = field("queue").unwrap_or_default();
    Some(format!("dead-lettered by RabbitMQ from {queue}: {}", field("reason")?))
}

/// `properties` for a copy that starts over: persistent, without an expiration (a delayed
/// copy's), without `user_id` (the broker checks it against the connection's user) and
/// without the delivery headers; the rest as it was.
fn without_delivery_headers(properties: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default().with_delivery_mode(2);
    if let Some(value) = properties.content_type() {
        copy = copy.with_content_type(value.clone());
    }
    if let Some(value) = properties.content_encoding() {
        copy = copy.with_content_encoding(value.clone());
    }
    if let Some(value) = properties.correlation_id() {
        copy = copy.with_correlation_id(value.clone());
    }
    if let Some(value) = properties.reply_to() {
        copy = copy.with_reply_to(value.clone());
    }
    if let Some(value) = properties.message_id() {
        copy = copy.with_message_id(value.clone());
    }
    if let Some(value) = properties.timestamp() {
        copy = copy.with_timestamp(*value);
    }
    if let Some(value) = properties.kind() {
        copy = copy.with_type(value.clone());
    }
    if let Some(value) = properties.app_id() {
        copy = copy.with_app_id(value.clone());
    }
    if let Some(value) = properties.priority() {
        copy = copy.with_priority(*value);
    }
    if let Some(headers) = properties.headers() {
        let mut kept = FieldTable::default();
        for (name, value) in headers.inner() {
            if !DELIVERY_HEADERS.contains(&name.as_str()) {
                kept.insert(name.clone(), value.clone());
            }
        }
        copy = copy.with_headers(kept);
    }
    copy
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, LongString};

    use super::*;

    #[test]
    fn a_copy_starts_without_the_delivery_headers_and_keeps_the_rest() {
        let mut headers = FieldTable::default();
        for name in DELIVERY_HEADERS {
            headers.insert((*name).into(), AMQPValue::LongString(LongString::from("x")));
        }
        headers.insert("traceparent".into(), AMQPValue::LongString(LongString::from("00-abc-def-01")));
        let original =
            json_properties().with_headers(headers).with_expiration("1000".into()).with_correlation_id("c".into());
        let copy = without_delivery_headers(&original);
        let kept: Vec<&str> = copy.headers().as_ref().unwrap().inner().keys().map(|name| name.as_str()).collect();
        assert_eq!(kept, ["traceparent"]);
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.correlation_id().as_ref().map(|id| id.as_str()), Some("c"));
        assert_eq!(copy.delivery_mode(), &Some(2));
    }

    #[test]
    fn a_dead_letter_says_why_it_is_there_and_which_job_it_was() {
        let job_id = Uuid::new_v4();
        let body = format!(r#"{{"job_id": "{job_id}", "entity": "hero"}}"#);
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(LongString::from("instructd.requests")));
        death.insert("reason".into(), AMQPValue::LongString(LongString::from("delivery_limit")));
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
        let letter = describe(body.as_bytes(), &json_properties().with_headers(headers));
        assert_eq!(letter.reason, "dead-lettered by RabbitMQ from instructd.requests: delivery_limit");
        assert_eq!(letter.job_id, Some(job_id));
        assert_eq!((letter.size, letter.id.len()), (body.len(), 16));
        assert_eq!(letter.id, body_id(body.as_bytes()));

        let binary = vec![0xff; 1000];
        let letter = describe(&binary, &json_properties().with_message_id(job_id.to_string().into()));
        assert_eq!(letter.job_id, Some(job_id), "the message_id, when the body has none");
        assert_eq!(letter.first_bytes.chars().count(), FIRST_BYTES);
        assert!(letter.reason.starts_with("no reason given"));
    }
}
