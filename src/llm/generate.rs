//! Generate → validate → re-ask: Instructor's `max_retries` loop. Transport retries happen
//! inside each call ([`super::client`]); this loop only ever shows the model its own
//! answer and what was wrong with it.

use std::time::Instant;

use serde_json::Value;

use super::client::{CallError, LlmClient};
use super::tools::{Answer, ToolSpec, to_openai_messages};
use crate::config::LlmSettings;
use crate::contract::{ChatMessage, ErrorKind, JobError, Usage};
use crate::entities::{EntityKind, Record};
use crate::metrics;

/// What one job asks of the model.
pub struct Prompt<'a> {
    pub kind: &'a dyn EntityKind,
    pub messages: &'a [ChatMessage],
    pub model: &'a str,
    /// Re-asks allowed after the first answer.
    pub max_retries: u32,
    /// When the whole job (calls, re-asks, waits) must be over.
    pub deadline: Instant,
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

/// The end of the generation step: a record to store, or why the job failed.
pub struct Generation {
    pub outcome: Result<Box<dyn Record>, JobError>,
    pub trace: CallTrace,
}

/// Asks the model for one `prompt.kind` and validates the answer, re-asking with the
/// validation error up to `prompt.max_retries` times.
pub async fn generate(client: &LlmClient, settings: &LlmSettings, prompt: Prompt<'_>) -> Generation {
    let tool = ToolSpec::new(prompt.kind.title(), prompt.kind.schema());
    let mut messages = to_openai_messages(prompt.messages);
    let mut trace = CallTrace::default();
    let mut last_error = String::new();
    for attempt in 1..=prompt.max_retries.saturating_add(1) {
        trace.attempts = attempt;
        tracing::Span::current().record("attempt", attempt);
        let request = tool.request(prompt.model, messages.clone(), settings.max_tokens, settings.temperature);
        let completion = match client.complete(&request, prompt.deadline).await {
            Ok(completion) => completion,
            Err(error) => return Generation { outcome: Err(call_failure(error)), trace },
        };
        trace.usage += completion.usage;
        metrics::tokens(&completion.usage);
        trace.responses.push(completion.raw.clone());
        let verdict = match tool.answer(&completion) {
            Answer::Refused(reason) => {
                let error = JobError::new(ErrorKind::Refused, reason);
                return Generation { outcome: Err(error), trace };
            }
            Answer::Invalid(why) => Err(why),
            Answer::Arguments(arguments) => prompt.kind.hydrate(arguments),
        };
        match verdict {
            Ok(record) => return Generation { outcome: Ok(record), trace },
            Err(error) => {
                tracing::info!(attempt, error = %error, "answer failed validation");
                if attempt <= prompt.max_retries {
                    metrics::reask(prompt.kind.name());
                }
                tool.append_reask(&mut messages, &completion, &error);
                last_error = error;
            }
        }
    }
    let message = format!("no valid answer after {} attempt(s); last error: {last_error}", trace.attempts);
    Generation { outcome: Err(JobError::new(ErrorKind::Validation, message)), trace }
}

fn call_failure(error: CallError) -> JobError {
    JobError::new(ErrorKind::Llm, error.to_string())
}
