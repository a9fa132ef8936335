//! Generate → validate → re-ask: Instructor's `max_retries` loop. Transport retries happen
//! inside each call ([`super::client`]); this loop only ever shows the model its own
//! answer and what was wrong with it.

use std::sync::Arc;
use std::time::Duration;

use async_openai::types::chat::ChatCompletionRequestMessage;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use super::client::{CallError, Completion, LlmClient};
use super::modes::Strategy;
use super::providers::Providers;
use super::tools::{Answer, to_openai_messages};
use crate::config::{LlmSettings, ReaskHistory};
use crate::contract::{ChatMessage, ErrorKind, JobError};
use crate::entities::{EntityKind, Record};
use crate::job::{Call, CallTrace};

/// What one job asks of the model.
pub struct Prompt<'a> {
    pub kind: &'a dyn EntityKind,
    pub messages: &'a [ChatMessage],
    /// The models to try, in order (`LlmSettings::models_for`): never empty.
    pub models: &'a [String],
    /// How the schema is sent (the job's mode).
    pub strategy: &'a Strategy,
    /// Re-asks allowed after the first answer, for each model.
    pub max_retries: u32,
    /// When the whole job (calls, re-asks, waits) must be over.
    pub deadline: Instant,
    /// When the delivery must be handed back if the job is still waiting on the provider.
    pub hold: Instant,
    /// Cancelled when an operator cancels the job: the call in flight is abandoned, and the
    /// job fails with kind `cancelled`, keeping what the earlier calls cost and returned.
    pub cancelled: &'a CancellationToken,
}

/// The end of the generation step: a record to store, or why the job failed.
pub struct Generation {
    pub outcome: Result<Arc<dyn Record>, JobError>,
    pub trace: CallTrace,
}

/// The provider stayed unavailable until the job's deadline or the delivery's hold: the job
/// has no outcome, and runs again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProviderUnavailable(pub String);

/// How one model's turn ended.
enum Turn {
    /// The job is over: a record, or a failure no other model would mend (a refusal, a
    /// spent budget, a cancel, the job's deadline).
    Over(Result<Arc<dyn Record>, JobError>),
    /// This model gave up (its re-asks ran out, its provider rejected the call, …): the next
    /// model, if there is one, takes over.
    GaveUp(JobError),
    /// Its provider stayed unavailable (past `llm.fallback_after_secs` when a model follows).
    Unavailable(String),
}

/// The conversation and what the job has spent, carried from one model to the next.
struct Job<'p, 'a> {
    prompt: &'p Prompt<'a>,
    settings: &'p LlmSettings,
    trace: CallTrace,
    messages: Vec<ChatCompletionRequestMessage>,
    last_failure: Option<String>,
}

/// Asks the job's models in turn for one `prompt.kind`, validating each answer and re-asking
/// with the validation error up to `prompt.max_retries` times per model. An answer cut off at
/// the token limit (`finish_reason: length`) is re-asked once with a note, outside that
/// budget; a second one ends the model's turn. When a model gives up (see [`Turn::GaveUp`]),
/// the next one goes on with the conversation so far; when the last one gives up, the job
/// fails with its error, the others' named in the message.
///
/// Fails only with [`ProviderUnavailable`] (the last model's provider stayed unavailable):
/// every other way a job can end is a [`Generation`].
pub async fn generate(
    providers: &Providers,
    settings: &LlmSettings,
    prompt: Prompt<'_>,
) -> Result<Generation, ProviderUnavailable> {
    let strategy = prompt.strategy;
    // The conversation lives in the request while the call is out (a job waits on its model
    // with one copy of it, not three); it is built again for a re-ask that starts over.
    let messages = strategy.conversation(to_openai_messages(prompt.messages));
    let mut job = Job { prompt: &prompt, settings, trace: CallTrace::default(), messages, last_failure: None };
    let mut given_up: Vec<(&str, String)> = Vec::new();
    for (index, model) in prompt.models.iter().enumerate() {
        let (provider, client) = providers.for_model(model);
        let next = prompt.models.get(index + 1);
        // With a model to fall back on, an unavailable provider is waited for only so long.
        let patience = next.map(|_| Duration::from_secs(settings.fallback_after_secs));
        let turn = job.turn(client, model, provider, patience).await;
        let (error, unavailable) = match turn {
            Turn::Over(outcome) => return Ok(Generation { outcome, trace: job.trace }),
            Turn::GaveUp(error) => (error, None),
            Turn::Unavailable(last) => {
                let error =
                    JobError::new(ErrorKind::Llm, format!("the provider `{provider}` stayed unavailable ({last})"));
                (error, Some(last))
            }
        };
        // Past the job's deadline or the delivery's hold, no other model has time either.
        let in_time = Instant::now() < prompt.deadline.min(prompt.hold);
        let Some(next) = next.filter(|_| in_time) else {
            if let Some(last) = unavailable {
                // Its earlier models' calls are made again when it runs again.
                return Err(ProviderUnavailable(last));
            }
            if given_up.is_empty() {
                return Ok(Generation { outcome: Err(error), trace: job.trace });
            }
            given_up.push((model, error.message));
            return Ok(Generation {
                outcome: Err(JobError::new(error.kind, every_model_failed(&given_up))),
                trace: job.trace,
            });
        };
        tracing::warn!(%model, %next, error = %error.message, "the model gave up; falling back to the next");
        providers.metrics().fallback(prompt.kind.name());
        given_up.push((model, error.message));
    }
    unreachable!("a job has at least one model")
}

impl Job<'_, '_> {
    /// One model's turn: its first call and its re-asks.
    /// `patience`: how long each call may wait for an unavailable provider (none: as long
    /// as the job's deadline and the delivery's hold allow).
    async fn turn(&mut self, client: &LlmClient, model: &str, provider: &str, patience: Option<Duration>) -> Turn {
        let (prompt, settings) = (self.prompt, self.settings);
        let strategy = prompt.strategy;
        let start = || strategy.conversation(to_openai_messages(prompt.messages));
        let (mut attempts, mut reasks) = (0, 0);
        let mut cut_off = false;
        let price = settings.price(model);
        loop {
            if prompt.cancelled.is_cancelled() {
                return Turn::Over(Err(cancelled(CANCELLED_WAITING)));
            }
            if let Some(spent) = self.budget_spent() {
                return Turn::Over(Err(spent));
            }
            let max_tokens = self.max_tokens();
            self.trace.attempts += 1;
            attempts += 1;
            tracing::Span::current().record("attempt", self.trace.attempts);
            let request = strategy.request(model, std::mem::take(&mut self.messages), max_tokens, settings.temperature);
            let (started_at, started) = (chrono::Utc::now(), Instant::now());
            let span = call_span(model, provider, self.trace.attempts, max_tokens);
            let calling = client.complete(&request, prompt.deadline, prompt.hold, patience.map(|p| started + p));
            let called = tokio::select! {
                called = calling.instrument(span.clone()) => Some(called),
                // The call in flight is dropped.
                _ = prompt.cancelled.cancelled() => None,
            };
            self.messages = request.messages;
            record_call(&span, called.as_ref());
            let mut call = Call {
                model: model.to_owned(),
                provider: provider.to_owned(),
                started_at,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                usage: None,
                finish_reason: None,
                error: None,
            };
            let Some(called) = called else {
                let failure = cancelled(CANCELLED_CALLING);
                call.error = Some(failure.clone());
                self.trace.calls.push(call);
                return Turn::Over(Err(failure));
            };
            let mut completion = match called {
                Ok(completion) => completion,
                Err(CallError::Unavailable { last }) => {
                    let message = format!("the provider `{provider}` stayed unavailable ({last})");
                    call.error = Some(JobError::new(ErrorKind::Llm, message));
                    self.trace.calls.push(call);
                    return Turn::Unavailable(last);
                }
                Err(error) => {
                    let deadline = matches!(error, CallError::DeadlineExceeded { .. });
                    let failure = JobError::new(ErrorKind::Llm, error.to_string());
                    call.error = Some(failure.clone());
                    self.trace.calls.push(call);
                    // The job's own deadline is no model's fault: no other has time left.
                    return if deadline { Turn::Over(Err(failure)) } else { Turn::GaveUp(failure) };
                }
            };
            let mut usage = completion.usage;
            usage.cost_usd = price.map(|price| price.cost(&usage));
            self.trace.usage += usage;
            client.metrics().tokens(&usage);
            if let Some(cost) = usage.cost_usd {
                client.metrics().cost(model, prompt.kind.name(), cost);
            }
            // Its text moves to the trace: nothing reads it from the completion past here.
            self.trace.responses.push(std::mem::replace(&mut completion.raw, RawValue::NULL.to_owned()));
            call.usage = Some(usage);
            // The provider's word, kept as text that fits the row and any page.
            call.finish_reason =
                completion.finish_reason.as_deref().map(|reason| crate::text::quoted(reason).into_owned());
            // What was wrong with this answer is filled in below, when there is something.
            self.trace.calls.push(call);
            let (error, exhausted) = if completion.finish_reason.as_deref() == Some("length") {
                if cut_off {
                    let message = if max_tokens < settings.max_tokens {
                        "the answer was cut off twice (finish_reason: length), the second time at what was left of \
                         llm.job_token_budget"
                    } else {
                        "the answer was cut off at the token limit twice (finish_reason: length); raise \
                         llm.max_tokens or ask for less"
                    };
                    let failure = JobError::new(ErrorKind::Llm, message);
                    self.blame(&failure);
                    return Turn::GaveUp(failure);
                }
                cut_off = true;
                tracing::info!(attempt = self.trace.attempts, "answer cut off at the token limit; asking again");
                self.blame(&JobError::new(ErrorKind::Validation, CUT_OFF_NOTE));
                (CUT_OFF_NOTE.to_owned(), false)
            } else {
                let verdict = match strategy.answer(&completion) {
                    Answer::Refused(reason) => {
                        let failure = JobError::new(ErrorKind::Refused, reason);
                        self.blame(&failure);
                        return Turn::Over(Err(failure));
                    }
                    Answer::Invalid(why) => Err(why),
                    Answer::Arguments(arguments) => prompt.kind.hydrate(arguments),
                };
                match verdict {
                    Ok(record) => return Turn::Over(Ok(record)),
                    Err(error) => {
                        tracing::info!(attempt = self.trace.attempts, error = %error, "answer failed validation");
                        self.blame(&JobError::new(ErrorKind::Validation, error.as_str()));
                        let exhausted = reasks == prompt.max_retries;
                        if !exhausted {
                            reasks += 1;
                            client.metrics().reask(prompt.kind.name());
                        }
                        (error, exhausted)
                    }
                }
            };
            // The answer and what was wrong with it stay in the conversation: a re-ask shows
            // them to this model, a fallback to the next.
            if settings.reask_history == ReaskHistory::Last {
                self.messages = start();
            }
            self.reask(&completion, error);
            if exhausted {
                let message = format!(
                    "no valid answer after {attempts} attempt(s); last error: {}",
                    self.last_failure.as_deref().unwrap_or_default()
                );
                return Turn::GaveUp(JobError::new(ErrorKind::Validation, message));
            }
        }
    }

    fn reask(&mut self, completion: &Completion, error: String) {
        let error = self.last_failure.insert(error);
        self.prompt.strategy.append_reask(&mut self.messages, completion, error);
    }

    /// The last call's error.
    fn blame(&mut self, error: &JobError) {
        if let Some(call) = self.trace.calls.last_mut() {
            call.error = Some(error.clone());
        }
    }

    /// Why the job may make no more calls, when one of its budgets is spent.
    fn budget_spent(&self) -> Option<JobError> {
        let (settings, trace) = (self.settings, &self.trace);
        let last = self.last_failure.as_deref().unwrap_or("none");
        if settings.job_cost_budget_usd > 0.0 {
            let spent = trace.usage.cost_usd.unwrap_or(0.0);
            if spent >= settings.job_cost_budget_usd {
                let message = format!(
                    "the job's dollar budget is spent (${spent} of llm.job_cost_budget_usd ${}) after {} attempt(s); \
                     last error: {last}",
                    settings.job_cost_budget_usd, trace.attempts,
                );
                return Some(JobError::new(ErrorKind::Llm, message));
            }
        }
        let budget = settings.job_token_budget;
        let spent = trace.usage.total_tokens;
        if budget > 0 && spent >= budget {
            let message = format!(
                "the job's token budget is spent ({spent} of llm.job_token_budget {budget} tokens) after {} \
                 attempt(s); last error: {last}",
                trace.attempts,
            );
            return Some(JobError::new(ErrorKind::Llm, message));
        }
        None
    }

    /// The next call's cap on completion tokens: `llm.max_tokens`, held to what is left of the
    /// token budget. Without a per-call cap none is sent: a cap above the model's own output
    /// limit is a 400.
    fn max_tokens(&self) -> u32 {
        let settings = self.settings;
        match (settings.job_token_budget, settings.max_tokens) {
            (0, max) | (_, max @ 0) => max,
            (budget, max) => {
                let left = u32::try_from(budget.saturating_sub(self.trace.usage.total_tokens)).unwrap_or(u32::MAX);
                max.min(left)
            }
        }
    }
}

/// The failure of a job every model of which gave up: each model with its error, each given
/// its share of the message's bound, so that the last one is never cut off.
fn every_model_failed(given_up: &[(&str, String)]) -> String {
    const PREFIX: &str = "every model failed: ";
    let share = ((crate::text::MAX_MESSAGE_BYTES - PREFIX.len()) / given_up.len().max(1)).saturating_sub(2);
    let parts: Vec<String> = given_up
        .iter()
        .map(|(model, error)| crate::text::clip(&format!("{model}: {error}"), share).into_owned())
        .collect();
    format!("{PREFIX}{}", parts.join("; "))
}

/// The span of one model call, with the OpenTelemetry GenAI attributes known before it.
fn call_span(model: &str, provider: &str, attempt: u32, max_tokens: u32) -> tracing::Span {
    let span = tracing::info_span!(
        "chat",
        otel.name = %format_args!("chat {model}"),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.system = "openai",
        gen_ai.request.model = model,
        gen_ai.request.max_tokens = Empty,
        gen_ai.response.model = Empty,
        gen_ai.response.id = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        error.type = Empty,
        instructd.provider = provider,
        instructd.attempt = i64::from(attempt),
    );
    if max_tokens > 0 {
        span.record("gen_ai.request.max_tokens", i64::from(max_tokens));
    }
    span
}

/// What the call came to, on its span: the answer's model, id, finish reason and tokens, or
/// why it failed (`None`: cancelled). The provider's words are clipped.
fn record_call(span: &tracing::Span, called: Option<&Result<Completion, CallError>>) {
    fn said(text: &Option<String>) -> Option<std::borrow::Cow<'_, str>> {
        text.as_deref().map(|text| crate::text::clip(text, 200))
    }
    match called {
        Some(Ok(completion)) => {
            if let Some(model) = said(&completion.model) {
                span.record("gen_ai.response.model", model.as_ref());
            }
            if let Some(id) = said(&completion.id) {
                span.record("gen_ai.response.id", id.as_ref());
            }
            if let Some(reason) = &completion.finish_reason {
                span.record("gen_ai.response.finish_reasons", crate::text::clip(reason, 64).as_ref());
            }
            // As signed integers: the exporter writes an unsigned one as text.
            let count = |tokens: u64| i64::try_from(tokens).unwrap_or(i64::MAX);
            span.record("gen_ai.usage.input_tokens", count(completion.usage.prompt_tokens));
            span.record("gen_ai.usage.output_tokens", count(completion.usage.completion_tokens));
        }
        Some(Err(error)) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", error.kind());
        }
        None => {
            span.record("error.type", "cancelled");
        }
    }
}

/// What a re-ask says about an answer cut off at the token limit.
const CUT_OFF_NOTE: &str = "the answer was cut off at the token limit (finish_reason: length), so it is \
                            incomplete; answer again, complete and as short as the schema allows";

/// Why a job an operator cancelled failed, while its model call was out.
const CANCELLED_CALLING: &str = "cancelled by an operator while it ran; the model call in flight was abandoned";

/// Why a job an operator cancelled failed, between its calls (or before the first).
const CANCELLED_WAITING: &str = "cancelled by an operator before its next model call";

fn cancelled(message: &str) -> JobError {
    JobError::new(ErrorKind::Cancelled, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_is_named_in_a_failure_that_fits_a_message() {
        let long = "x".repeat(5000);
        let given_up = [("small", long.clone()), ("medium", long), ("large", "no valid answer".to_owned())];
        let message = every_model_failed(&given_up);
        assert!(message.len() <= crate::text::MAX_MESSAGE_BYTES, "{}", message.len());
        assert!(message.starts_with("every model failed: small: xxx"), "{message}");
        assert!(message.contains("…; medium: xxx"), "{message}");
        assert!(message.ends_with("; large: no valid answer"), "the last model's error is whole: {message}");
    }
}
