//! The three ways to ask for structured output, as Instructor has them, behind one
//! [`Strategy`]: how the request is built, where the answer is read, and how a re-ask is
//! appended.
//! - `tools`: see [`super::tools`];
//! - `json` and `json_schema`: the schema in a system message (Instructor's wording) and a
//!   `response_format` of `json_object` or `json_schema`; the answer is the message text,
//!   taken out of a Markdown code fence if the model wrapped it in one; a re-ask appends the
//!   assistant's text and a user message with the error.

use std::collections::HashMap;

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestSystemMessageContentPart, ChatCompletionRequestUserMessage, ResponseFormat,
    ResponseFormatJsonSchema,
};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::client::Completion;
use super::strict::strict_schema;
use super::tools::{Answer, ToolSpec};
use crate::contract::Mode;
use crate::entities::{EntityKind, Registry};

/// Every registered entity's [`Strategy`] in every mode, built once at start-up: the schema
/// rewrite and the system message are the same for every job.
pub struct Strategies(HashMap<(&'static str, Mode), Strategy>);

impl Strategies {
    /// Fails, naming the entity and the field, when `strict` asks for a schema strict mode
    /// cannot express.
    pub fn new(registry: &Registry, strict: bool) -> Result<Self, String> {
        let mut strategies = HashMap::new();
        for name in registry.names() {
            let kind = registry.get(name).expect("a registered name");
            for mode in Mode::ALL {
                let strategy = Strategy::new(mode, kind.as_ref(), strict)
                    .map_err(|why| format!("the schema of `{name}` cannot be strict: {why}"))?;
                strategies.insert((name, mode), strategy);
            }
        }
        Ok(Self(strategies))
    }

    /// The strategy for a registered entity (by its [`EntityKind::name`]).
    pub fn get(&self, entity: &'static str, mode: Mode) -> &Strategy {
        &self.0[&(entity, mode)]
    }
}

/// One job's way of asking.
pub enum Strategy {
    Tools(ToolSpec),
    Json(JsonSpec),
}

pub struct JsonSpec {
    /// The system message that carries the schema.
    instruction: String,
    /// The request's `response_format`, serialized once (see [`ChatRequest`]).
    format: Box<RawValue>,
}

/// A chat-completions request as instructd sends it (the fields of async-openai's
/// `CreateChatCompletionRequest` that it sets, in their order): the job's conversation and
/// limits, and its strategy's fixed part — the tool or the response format, which carry the
/// entity's schema — as bytes serialized once at start-up. A job waiting on its model holds
/// no copy of the schema, and no call clones one.
#[derive(Serialize)]
pub struct ChatRequest<'s> {
    pub messages: Vec<ChatCompletionRequestMessage>,
    pub model: &'s str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<&'s RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<&'s RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<&'s RawValue>,
}

/// `value` serialized, for a [`ChatRequest`]'s fixed part.
pub(super) fn raw(value: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("request parts serialize to JSON")
}

impl Strategy {
    /// The strategy for `kind` in `mode`. Fails (with a message naming the field) only when
    /// `strict` asks for a schema strict mode cannot express.
    pub fn new(mode: Mode, kind: &dyn EntityKind, strict: bool) -> Result<Self, String> {
        // Strict applies where the API has it: the tool's function and json_schema.
        let strict = strict && mode != Mode::Json;
        let schema = if strict { strict_schema(kind.schema())? } else { kind.schema().clone() };
        Ok(match mode {
            Mode::Tools => Strategy::Tools(ToolSpec::new(kind.title(), &schema, strict)),
            Mode::Json => Strategy::Json(JsonSpec::new(&schema, ResponseFormat::JsonObject)),
            Mode::JsonSchema => {
                let json_schema = ResponseFormatJsonSchema {
                    description: None,
                    name: format_name(kind.title()),
                    schema: schema.clone(),
                    strict: strict.then_some(true),
                };
                Strategy::Json(JsonSpec::new(&schema, ResponseFormat::JsonSchema { json_schema }))
            }
        })
    }

    /// The conversation to start from: the request's messages, with the schema merged into
    /// the first system message (or put before them) in the JSON modes.
    pub fn conversation(&self, mut messages: Vec<ChatCompletionRequestMessage>) -> Vec<ChatCompletionRequestMessage> {
        let Strategy::Json(spec) = self else { return messages };
        match messages.first_mut() {
            Some(ChatCompletionRequestMessage::System(system)) => {
                let existing = match &system.content {
                    ChatCompletionRequestSystemMessageContent::Text(text) => text.clone(),
                    // A system message in parts is text (`decode` allows no image there).
                    ChatCompletionRequestSystemMessageContent::Array(parts) => parts
                        .iter()
                        .map(|ChatCompletionRequestSystemMessageContentPart::Text(part)| part.text.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                };
                system.content =
                    ChatCompletionRequestSystemMessageContent::Text(format!("{existing}\n\n{}", spec.instruction));
            }
            _ => messages.insert(0, ChatCompletionRequestSystemMessage::from(spec.instruction.as_str()).into()),
        }
        messages
    }

    /// The chat-completions request for `messages`.
    pub fn request<'s>(
        &'s self,
        model: &'s str,
        messages: Vec<ChatCompletionRequestMessage>,
        max_tokens: u32,
        temperature: Option<f32>,
    ) -> ChatRequest<'s> {
        let mut request = ChatRequest {
            messages,
            model,
            max_completion_tokens: (max_tokens > 0).then_some(max_tokens),
            response_format: None,
            temperature,
            tools: None,
            tool_choice: None,
        };
        match self {
            Strategy::Tools(tool) => tool.apply(&mut request),
            Strategy::Json(spec) => request.response_format = Some(&spec.format),
        }
        request
    }

    /// Reads the answer out of a completion.
    pub fn answer<'a>(&self, completion: &'a Completion) -> Answer<'a> {
        match self {
            Strategy::Tools(tool) => tool.answer(completion),
            Strategy::Json(_) => {
                let message = &completion.message;
                if let Some(refusal) = message.refusal.as_deref().filter(|r| !r.trim().is_empty()) {
                    return Answer::Refused(refusal.to_owned());
                }
                match message.content.as_deref().map(extract_json).filter(|text| !text.is_empty()) {
                    Some(json) => Answer::Arguments(json),
                    None => Answer::Invalid("the answer was empty; answer with the JSON object".to_owned()),
                }
            }
        }
    }

    /// Appends the failed answer and `error` to the conversation, as Instructor's re-ask
    /// does in this mode.
    pub fn append_reask(&self, messages: &mut Vec<ChatCompletionRequestMessage>, completion: &Completion, error: &str) {
        match self {
            Strategy::Tools(tool) => tool.append_reask(messages, completion, error),
            Strategy::Json(_) => {
                let text = completion.message.content.clone().unwrap_or_default();
                messages.push(
                    ChatCompletionRequestAssistantMessage {
                        content: Some(ChatCompletionRequestAssistantMessageContent::Text(text)),
                        ..Default::default()
                    }
                    .into(),
                );
                let reask = format!("Correct your JSON ONLY RESPONSE, based on the following errors:\n{error}");
                messages.push(ChatCompletionRequestUserMessage::from(reask).into());
            }
        }
    }
}

impl JsonSpec {
    fn new(schema: &Value, format: ResponseFormat) -> Self {
        let pretty = serde_json::to_string_pretty(schema).expect("schemas serialize");
        // Instructor's JSON-mode system message, word for word.
        let instruction = format!(
            "As a genius expert, your task is to understand the content and provide\n\
             the parsed objects in json that match the following json_schema:\n\n\
             {pretty}\n\n\
             Make sure to return an instance of the JSON, not the schema itself"
        );
        Self { instruction, format: raw(&format) }
    }
}

/// A `response_format` name: letters, digits, `_` and `-`, at most 64 characters.
fn format_name(title: &str) -> String {
    let name: String = title
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    if name.is_empty() { "answer".to_owned() } else { name }
}

/// The JSON in a model's text: the body of a Markdown code fence if there is one (```json
/// or bare ```), else from the first `{` to the last `}`, else the trimmed text.
pub fn extract_json(text: &str) -> &str {
    if let Some(start) = text.find("```") {
        let after = &text[start + 3..];
        // Skip the fence's info string (`json`) up to the end of its line.
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(0);
        let body = &after[body_start..];
        if let Some(end) = body.find("```") {
            return body[..end].trim();
        }
    }
    match (text.find('{'), text.rfind('}')) {
        (Some(start), Some(end)) if start < end => &text[start..=end],
        _ => text.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_read_out_of_code_fences_and_prose() {
        let answer = r#"{"name": "A"}"#;
        assert_eq!(extract_json(answer), answer);
        assert_eq!(extract_json("```json\n{\"name\": \"A\"}\n```"), answer);
        assert_eq!(extract_json("Here you go:\n```\n{\"name\": \"A\"}\n```\nEnjoy."), answer);
        assert_eq!(extract_json("Sure! {\"name\": \"A\"} Hope that helps."), answer);
        assert_eq!(extract_json("  no json here "), "no json here");
    }

    #[test]
    fn format_names_are_what_the_api_accepts() {
        assert_eq!(format_name("Hero"), "Hero");
        assert_eq!(format_name("Team of Heroes!"), "Team_of_Heroes_");
        assert_eq!(format_name(""), "answer");
    }
}
