//! The message contract other services depend on (see the README's "Contract"): the
//! generation request consumed from `instructd.requests` and the completion event
//! published to `instructd.events`. Names and shapes here are public API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A generation request as it arrives on the request queue.
///
/// Unknown fields are ignored so that newer publishers can talk to older workers.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GenerationRequest {
    /// The idempotency key. Absent: the AMQP `message_id` if it is a UUID, else assigned.
    #[serde(default)]
    pub job_id: Option<Uuid>,
    pub entity: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// How the schema is sent to the model; `llm.mode` when absent.
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub metadata: Option<Value>,
    /// The job this request runs again (set by the console's replay).
    #[serde(default)]
    pub replay_of: Option<Uuid>,
}

/// How the schema is sent to the model (Instructor's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The schema as a function tool named after its title, forced with `tool_choice`.
    Tools,
    /// `response_format: json_object`, the schema in a system message.
    Json,
    /// `response_format: json_schema` (strict when `llm.strict`), the schema also in a
    /// system message.
    JsonSchema,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Tools, Mode::Json, Mode::JsonSchema];
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Content,
}

/// A message's content: text, or a list of OpenAI content parts (text, and images in a
/// user's message), as Instructor accepts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        #[serde(deserialize_with = "from_object")]
        image_url: ImageUrl,
    },
}

/// `T` from a JSON object only (a derived `Deserialize` would also take a list of its fields'
/// values).
fn from_object<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
    deserializer: D,
) -> Result<T, D::Error> {
    let object = serde_json::Map::<String, Value>::deserialize(deserializer)?;
    T::deserialize(Value::Object(object)).map_err(serde::de::Error::custom)
}

/// An image: a `data:image/…;base64,…` URL, or a URL the provider fetches (which schemes are
/// accepted is `limits.image_url_schemes`; instructd itself fetches nothing).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ImageDetail>,
}

/// How closely the model looks at an image (OpenAI's `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDetail {
    Auto,
    Low,
    High,
}

impl Content {
    /// The bytes of its text, every text part together.
    pub fn text_bytes(&self) -> usize {
        match self {
            Content::Text(text) => text.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text { text } => text.len(),
                    ContentPart::ImageUrl { .. } => 0,
                })
                .sum(),
        }
    }

    /// Its text, the text parts joined by newlines (an image is not text).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(text) => text.as_str().into(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect::<Vec<_>>()
                .join("\n")
                .into(),
        }
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Self {
        Content::Text(text.to_owned())
    }
}

impl<'de> Deserialize<'de> for Content {
    /// A string, or a list of parts; anything else is refused with both named.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Content;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a string or a list of content parts")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content::Text(text.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content::Text(text))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, parts: A) -> Result<Content, A::Error> {
                // Each part from a JSON object only: serde's tagged enums would also take a list
                // (`["text", "hi"]`), which the contract does not allow.
                let parts: Vec<serde_json::Map<String, Value>> =
                    Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(parts))?;
                parts
                    .into_iter()
                    .enumerate()
                    .map(|(index, part)| {
                        serde_path_to_error::deserialize(Value::Object(part))
                            .map_err(|error| serde::de::Error::custom(format!("[{index}].{error}")))
                    })
                    .collect::<Result<_, _>>()
                    .map(Content::Parts)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Succeeded,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }
}

/// Why a job failed: the `error.kind` of a failed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request can never succeed (bad shape, unknown entity, empty messages).
    InvalidRequest,
    /// The model's answers kept failing validation until the re-asks ran out.
    Validation,
    /// The model declined to answer.
    Refused,
    /// The provider kept failing or rejected the call.
    Llm,
    /// A fault of instructd or its database that retrying will not fix.
    Internal,
    /// An operator cancelled the job (the console, its API, `instructd jobs cancel`).
    Cancelled,
}

/// The `error` object of a failed event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] =
        [Self::InvalidRequest, Self::Validation, Self::Refused, Self::Llm, Self::Internal, Self::Cancelled];

    /// The kind as it is spelled in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Validation => "validation",
            Self::Refused => "refused",
            Self::Llm => "llm",
            Self::Internal => "internal",
            Self::Cancelled => "cancelled",
        }
    }
}

impl JobError {
    /// An error whose message is bounded and clean ([`crate::text::message`]): it is quoted in
    /// an event, the job row, a dead letter's header and the logs.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = if message.len() > crate::text::MAX_MESSAGE_BYTES || message.contains('\0') {
            crate::text::message(&message)
        } else {
            message
        };
        Self { kind, message }
    }
}

/// Tokens spent by a job, summed over every call, and what they cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens the provider served from its cache (part of `prompt_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
    /// What the calls cost in US dollars, by `llm.prices`; absent for a model without a price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

impl std::ops::AddAssign for Usage {
    /// Sums the counts, and the costs: a cost is known once any call's is.
    fn add_assign(&mut self, other: Self) {
        // Saturating: a provider's counts are not to be trusted with an overflow.
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (Some(spent), Some(more)) => Some(((spent + more) * 1e9).round() / 1e9),
            (spent, more) => spent.or(more),
        };
    }
}

/// The completion event published to `instructd.events` as `job.<status>.<entity>`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CompletionEvent {
    pub event_id: Uuid,
    pub job_id: Uuid,
    pub status: JobStatus,
    pub entity: String,
    pub record: Option<Value>,
    pub attempts: u32,
    pub usage: Usage,
    /// The models the job's calls went to, in the order they were first tried (more than one
    /// when it fell back; `llm.fallback`); absent when no call was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// The model whose answer was stored; absent when the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub error: Option<JobError>,
    pub metadata: Value,
    pub finished_at: DateTime<Utc>,
}

/// The entity segment of a routing key: the entity's name when it is one instructd knows,
/// `unknown` otherwise (so that a hostile name cannot inject `#` or `.` into a binding).
pub fn routing_key(status: JobStatus, entity: Option<&str>) -> String {
    format!("job.{}.{}", status.as_str(), entity.unwrap_or("unknown"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn content_is_text_or_parts_and_says_so_when_it_is_neither() {
        let text: ChatMessage = serde_json::from_value(json!({"role": "user", "content": "Hi"})).unwrap();
        assert_eq!(text.content, Content::Text("Hi".into()));
        let parts =
            json!([{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]);
        let message: ChatMessage = serde_json::from_value(json!({"role": "user", "content": parts})).unwrap();
        assert_eq!(message.content.text(), "Look");
        assert_eq!(message.content.text_bytes(), 4);
        // Written back as it came.
        assert_eq!(serde_json::to_value(&message).unwrap()["content"], parts);
        let error = serde_json::from_value::<ChatMessage>(json!({"role": "user", "content": 7})).unwrap_err();
        assert!(error.to_string().contains("expected a string or a list of content parts"), "{error}");
        let error =
            serde_json::from_str::<ChatMessage>(r#"{"role": "user", "content": [{"type": "video"}]}"#).unwrap_err();
        assert!(error.to_string().contains("unknown variant `video`"), "{error}");
    }
}
