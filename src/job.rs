//! What a job is, as the layers that handle it share it: [`JobRecord`] (what a request said
//! about itself; `decode` makes it, `store` writes it), [`CallTrace`] (what the model calls
//! returned; `llm` makes it, `store` writes it) and [`OutboxEvent`] (a completion event ready
//! to publish; `store` makes it, `broker` and `relay` publish it). Here, so that `broker`,
//! `decode`, `llm` and `store` need not import each other.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::contract::{JobError, Usage};

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
    /// The job's trace context, for its event's headers.
    pub trace: Option<&'a TraceContext>,
}

/// A W3C trace context (`traceparent`, and `tracestate` when there is one), as a message's
/// headers carry it: well-formed and bounded (made by [`crate::telemetry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceContext {
    pub traceparent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// What the calls of a job cost and returned, kept on the job row whatever the outcome.
#[derive(Debug, Default)]
pub struct CallTrace {
    /// Answers asked for: the first call plus re-asks.
    pub attempts: u32,
    /// Tokens summed over every answered call.
    pub usage: Usage,
    /// Every raw response, in order, as the provider sent it.
    pub responses: Vec<Box<RawValue>>,
    /// Every call, in order: each answered call (with `usage`) has the next of `responses`;
    /// a call that failed without an answer has none.
    pub calls: Vec<Call>,
}

impl CallTrace {
    /// The models the calls went to, each once, in the order first called.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = Vec::new();
        for call in &self.calls {
            if !models.contains(&call.model) {
                models.push(call.model.clone());
            }
        }
        models
    }
}

/// One call of a job to the model, as the job row keeps it (`generation_job.calls`) and the
/// console shows it beside the raw answer.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub model: String,
    /// The provider that served `model` (`default`: `llm.base_url`'s).
    pub provider: String,
    pub started_at: DateTime<Utc>,
    /// From the request to the answer, transport retries and waits for a slot included.
    pub duration_ms: u64,
    /// What the provider reported the call used; absent when it answered nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// What was wrong with the answer, as the re-ask told the model (`validation`), the
    /// model's refusal (`refused`), or why the call failed (`llm`); absent for the answer
    /// that was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

/// A completion event waiting in the outbox, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    pub routing_key: String,
    pub correlation_id: String,
    pub reply_to: Option<String>,
    pub payload: Vec<u8>,
    /// Sent as the event's `traceparent` / `tracestate` headers.
    pub trace: Option<TraceContext>,
}
