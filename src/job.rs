//! What a job is, as the layers that handle it share it: [`JobRecord`] (what a request said
//! about itself; `decode` makes it, `store` writes it), [`CallTrace`] (what the model calls
//! returned; `llm` makes it, `store` writes it) and [`OutboxEvent`] (a completion event ready
//! to publish; `store` makes it, `broker` and `relay` publish it). Here, so that `broker`,
//! `decode`, `llm` and `store` need not import each other.

use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::contract::Usage;

/// What the request said about itself, recorded on the job row and echoed in events.
pub struct JobRecord<'a> {
    pub job_id: Uuid,
    /// The entity as the request named it.
    pub entity: &'a str,
    /// The routing key's entity segment (`unknown` unless the entity is registered).
    pub routing_entity: Option<&'a str>,
    /// The request as received (its text: a job in flight holds no parsed copy of it).
    pub request: &'a RawValue,
    pub metadata: &'a Value,
    pub correlation_id: &'a str,
    pub reply_to: Option<&'a str>,
}

/// What the calls of a job cost and returned, kept on the job row whatever the outcome.
#[derive(Debug, Default)]
pub struct CallTrace {
    /// Answers asked for: the first call plus re-asks.
    pub attempts: u32,
    /// Tokens summed over every answered call.
    pub usage: Usage,
    /// Every raw response, in order.
    pub responses: Vec<Value>,
}

/// A completion event waiting in the outbox, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    pub routing_key: String,
    pub correlation_id: String,
    pub reply_to: Option<String>,
    pub payload: Vec<u8>,
}
