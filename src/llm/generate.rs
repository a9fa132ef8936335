//! Generate → validate → re-ask: Instructor's `max_retries` loop. Transport retries happen
//! inside each call ([`super::client`]); this loop only ever shows the model its own
//! answer and what was wrong with it.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{CallError, LlmClient};
use super::modes::Strategy;
use super::tools::{Answer, to_openai_messages};
use crate::config::{LlmSettings, ReaskHistory};
use crate::contract::{ChatMessage, ErrorKind, JobError};
use crate::entities::{EntityKind, Record};
use crate::job::{Call, CallTrace};

/// What one job asks of the model.
pub struct Prompt<'a> {
    pub kind: &'a dyn EntityKind,
    pub messages: &'a [ChatMessage],
    pub model: &'a str,
    /// How the schema is sent (the job's mode).
    pub strategy: &'a Strategy,
    /// Re-asks allowed after the first answer.
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

/// Asks the model for one `prompt.kind` and validates the answer, re-asking with the
/// validation error up to `prompt.max_retries` times. An answer cut off at the token limit
/// (`finish_reason: length`) is re-asked once with a note, outside that budget; a second one
/// fails the job with kind `llm`.
///
/// Fails only with [`ProviderUnavailable`]: every other way a job can end is a [`Generation`].
pub async fn generate(
    client: &LlmClient,
    settings: &LlmSettings,
    prompt: Prompt<'_>,
) -> Result<Generation, ProviderUnavailable> {
    let mut trace = CallTrace::default();
    let strategy = prompt.strategy;
    // The conversation lives in the request while the call is out (a job waits on its model
    // with one copy of it, not three); it is built again for a re-ask that starts over.
    let start = || strategy.conversation(to_openai_messages(prompt.messages));
    let mut messages = start();
    let mut reasks = 0;
    let mut cut_off = false;
    let mut last_failure: Option<String> = None;
    let price = settings.price(prompt.model);
    let last_error = loop {
        if prompt.cancelled.is_cancelled() {
            return Ok(Generation { outcome: Err(cancelled(CANCELLED_WAITING)), trace });
        }
        if settings.job_cost_budget_usd > 0.0 {
            let spent = trace.usage.cost_usd.unwrap_or(0.0);
            if spent >= settings.job_cost_budget_usd {
                let message = format!(
                    "the job's dollar budget is spent (${spent} of llm.job_cost_budget_usd ${}) after {} attempt(s); \
                     last error: {}",
                    settings.job_cost_budget_usd,
                    trace.attempts,
                    last_failure.as_deref().unwrap_or("none"),
                );
                return Ok(Generation { outcome: Err(JobError::new(ErrorKind::Llm, message)), trace });
            }
        }
        let max_tokens = match settings.job_token_budget {
            0 => settings.max_tokens,
            budget => {
                let spent = trace.usage.total_tokens;
                if spent >= budget {
                    let message = format!(
                        "the job's token budget is spent ({spent} of llm.job_token_budget {budget} tokens) after \
                         {} attempt(s); last error: {}",
                        trace.attempts,
                        last_failure.as_deref().unwrap_or("none"),
                    );
                    return Ok(Generation { outcome: Err(JobError::new(ErrorKind::Llm, message)), trace });
                }
                // With a per-call cap, the answer may not spend more than is left either. Without
                // one, none is sent: a cap above the model's own output limit is a 400.
                let left = u32::try_from(budget - spent).unwrap_or(u32::MAX);
                match settings.max_tokens {
                    0 => 0,
                    max => max.min(left),
                }
            }
        };
        trace.attempts += 1;
        tracing::Span::current().record("attempt", trace.attempts);
        let request = strategy.request(prompt.model, std::mem::take(&mut messages), max_tokens, settings.temperature);
        let (started_at, started) = (chrono::Utc::now(), Instant::now());
        let called = tokio::select! {
            called = client.complete(&request, prompt.deadline, prompt.hold) => Some(called),
            // The call in flight is dropped.
            _ = prompt.cancelled.cancelled() => None,
        };
        messages = request.messages;
        let mut call = Call {
            model: prompt.model.to_owned(),
            started_at,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            usage: None,
            finish_reason: None,
            error: None,
        };
        let Some(called) = called else {
            let failure = cancelled(CANCELLED_CALLING);
            call.error = Some(failure.clone());
            trace.calls.push(call);
            return Ok(Generation { outcome: Err(failure), trace });
        };
        let completion = match called {
            Ok(completion) => completion,
            Err(CallError::Unavailable { last }) => return Err(ProviderUnavailable(last)),
            Err(error) => {
                let failure = call_failure(error);
                call.error = Some(failure.clone());
                trace.calls.push(call);
                return Ok(Generation { outcome: Err(failure), trace });
            }
        };
        let mut usage = completion.usage;
        usage.cost_usd = price.map(|price| price.cost(&usage));
        trace.usage += usage;
        client.metrics().tokens(&usage);
        if let Some(cost) = usage.cost_usd {
            client.metrics().cost(prompt.model, prompt.kind.name(), cost);
        }
        trace.responses.push(completion.raw.clone());
        call.usage = Some(usage);
        // The provider's word, kept as text that fits the row and any page.
        call.finish_reason = completion.finish_reason.as_deref().map(|reason| crate::text::quoted(reason).into_owned());
        // What was wrong with this answer is filled in below, when there is something.
        trace.calls.push(call);
        let blame = |trace: &mut CallTrace, error: &JobError| {
            if let Some(call) = trace.calls.last_mut() {
                call.error = Some(error.clone());
            }
        };
        let error = if completion.finish_reason.as_deref() == Some("length") {
            if cut_off {
                let message = if max_tokens < settings.max_tokens {
                    "the answer was cut off twice (finish_reason: length), the second time at what was left of \
                     llm.job_token_budget"
                } else {
                    "the answer was cut off at the token limit twice (finish_reason: length); raise llm.max_tokens \
                     or ask for less"
                };
                let failure = JobError::new(ErrorKind::Llm, message);
                blame(&mut trace, &failure);
                return Ok(Generation { outcome: Err(failure), trace });
            }
            cut_off = true;
            tracing::info!(attempt = trace.attempts, "answer cut off at the token limit; asking again");
            blame(&mut trace, &JobError::new(ErrorKind::Validation, CUT_OFF_NOTE));
            CUT_OFF_NOTE.to_owned()
        } else {
            let verdict = match strategy.answer(&completion) {
                Answer::Refused(reason) => {
                    let failure = JobError::new(ErrorKind::Refused, reason);
                    blame(&mut trace, &failure);
                    return Ok(Generation { outcome: Err(failure), trace });
                }
                Answer::Invalid(why) => Err(why),
                Answer::Arguments(arguments) => prompt.kind.hydrate(arguments),
            };
            match verdict {
                Ok(record) => return Ok(Generation { outcome: Ok(record), trace }),
                Err(error) => {
                    tracing::info!(attempt = trace.attempts, error = %error, "answer failed validation");
                    blame(&mut trace, &JobError::new(ErrorKind::Validation, error.as_str()));
                    if reasks == prompt.max_retries {
                        break error;
                    }
                    reasks += 1;
                    client.metrics().reask(prompt.kind.name());
                    error
                }
            }
        };
        if settings.reask_history == ReaskHistory::Last {
            messages = start();
        }
        strategy.append_reask(&mut messages, &completion, last_failure.insert(error));
    };
    let message = format!("no valid answer after {} attempt(s); last error: {last_error}", trace.attempts);
    Ok(Generation { outcome: Err(JobError::new(ErrorKind::Validation, message)), trace })
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

fn call_failure(error: CallError) -> JobError {
    JobError::new(ErrorKind::Llm, error.to_string())
}
