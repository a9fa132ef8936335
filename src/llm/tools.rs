//! Tools mode, as Instructor sends it: the entity's schema is a function tool named after
//! the schema's title, with the schema (minus its top-level `title`) as parameters, and
//! `tool_choice` forces it. A re-ask appends the assistant's tool call byte for byte and a
//! `tool` message carrying the validation error.

use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls, ChatCompletionNamedToolChoice,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestMessage,
    ChatCompletionRequestMessageContentPartImage, ChatCompletionRequestMessageContentPartText,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestSystemMessageContentPart, ChatCompletionRequestToolMessage, ChatCompletionRequestUserMessage,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart, ChatCompletionTool,
    ChatCompletionToolChoiceOption, ChatCompletionTools, FunctionCall, FunctionName, FunctionObject,
};
use serde_json::Value;
use serde_json::value::RawValue;

use super::client::Completion;
use super::modes::{ChatRequest, raw};
use crate::contract::{ChatMessage, Content, ContentPart, ImageDetail, Role};

/// The function tool for one entity.
pub struct ToolSpec {
    name: String,
    /// The request's `tools` and `tool_choice`, serialized once: every call sends the same
    /// bytes, and a job waiting on its model holds no copy of the schema.
    tools: Box<RawValue>,
    tool_choice: Box<RawValue>,
}

/// What the model answered, read in tools mode.
pub enum Answer<'a> {
    /// The arguments of the forced function call: the JSON to validate.
    Arguments(&'a str),
    /// The model declined (`message.refusal`).
    Refused(String),
    /// Not an answer at all (no call, a call to another function): re-asked.
    Invalid(String),
}

impl ToolSpec {
    /// The tool for an entity whose schema's title is `title`.
    pub fn new(title: &str, schema: &Value, strict: bool) -> Self {
        let mut parameters = schema.clone();
        if let Some(object) = parameters.as_object_mut() {
            object.remove("title");
        }
        let description = schema.get("description").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
            format!("Correctly extracted `{title}` with all the required parameters with correct types")
        });
        let tools = [ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject {
                name: title.to_owned(),
                description: Some(description),
                parameters: Some(parameters),
                strict: strict.then_some(true),
            },
        })];
        let tool_choice = ChatCompletionToolChoiceOption::Function(ChatCompletionNamedToolChoice {
            function: FunctionName { name: title.to_owned() },
        });
        Self { name: title.to_owned(), tools: raw(&tools), tool_choice: raw(&tool_choice) }
    }

    /// Offers the tool in `request` and forces it with `tool_choice`.
    pub fn apply<'s>(&'s self, request: &mut ChatRequest<'s>) {
        request.tools = Some(&self.tools);
        request.tool_choice = Some(&self.tool_choice);
    }

    /// Reads the answer out of a completion.
    pub fn answer<'a>(&self, completion: &'a Completion) -> Answer<'a> {
        let message = &completion.message;
        if let Some(refusal) = message.refusal.as_deref().filter(|r| !r.trim().is_empty()) {
            return Answer::Refused(refusal.to_owned());
        }
        let calls = message.tool_calls.as_deref().unwrap_or_default();
        match calls.iter().find(|call| call.function.name == self.name) {
            Some(call) => Answer::Arguments(&call.function.arguments),
            None if calls.is_empty() => {
                Answer::Invalid(format!("no call to the function `{}` was made; call it with the answer", self.name))
            }
            None => Answer::Invalid(format!(
                "the function `{}` was called instead of `{}`; call `{}`",
                crate::text::quoted(&calls[0].function.name),
                self.name,
                self.name
            )),
        }
    }

    /// Appends the failed answer and the validation error to the conversation, as
    /// Instructor's tools-mode re-ask does.
    pub fn append_reask(&self, messages: &mut Vec<ChatCompletionRequestMessage>, completion: &Completion, error: &str) {
        let text = format!("Validation Error found:\n{error}\nRecall the function correctly, fix the errors");
        let calls = completion.message.tool_calls.as_deref().unwrap_or_default();
        if calls.is_empty() {
            let content = completion.message.content.clone().unwrap_or_default();
            messages.push(assistant(content, None));
            messages.push(ChatCompletionRequestUserMessage::from(text).into());
            return;
        }
        let echoed = calls
            .iter()
            .map(|call| {
                ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                    id: call.id.clone(),
                    function: FunctionCall {
                        name: call.function.name.clone(),
                        arguments: call.function.arguments.clone(),
                    },
                })
            })
            .collect();
        messages.push(assistant(String::new(), Some(echoed)));
        // Every tool call needs its answer; the one we judged carries the error.
        let judged = calls.iter().position(|c| c.function.name == self.name).unwrap_or(0);
        for (index, call) in calls.iter().enumerate() {
            let content = if index == judged { text.clone() } else { format!("Only `{}` may be called.", self.name) };
            messages.push(
                ChatCompletionRequestToolMessage { content: content.into(), tool_call_id: call.id.clone() }.into(),
            );
        }
    }
}

fn assistant(content: String, tool_calls: Option<Vec<ChatCompletionMessageToolCalls>>) -> ChatCompletionRequestMessage {
    ChatCompletionRequestAssistantMessage {
        content: Some(ChatCompletionRequestAssistantMessageContent::Text(content)),
        tool_calls,
        ..Default::default()
    }
    .into()
}

/// The request's messages in async-openai's types.
///
/// Content parts reach the provider as they came (`decode` allowed images in a user's
/// message only); a system or assistant message's parts are text.
pub fn to_openai_messages(messages: &[ChatMessage]) -> Vec<ChatCompletionRequestMessage> {
    messages
        .iter()
        .map(|message| match (message.role, &message.content) {
            (Role::System, Content::Text(text)) => ChatCompletionRequestSystemMessage::from(text.as_str()).into(),
            (Role::System, Content::Parts(parts)) => ChatCompletionRequestSystemMessage {
                content: ChatCompletionRequestSystemMessageContent::Array(
                    parts
                        .iter()
                        .filter_map(|part| match part {
                            ContentPart::Text { text } => {
                                Some(ChatCompletionRequestSystemMessageContentPart::Text(text_part(text)))
                            }
                            ContentPart::ImageUrl { .. } => None,
                        })
                        .collect(),
                ),
                name: None,
            }
            .into(),
            (Role::User, Content::Text(text)) => ChatCompletionRequestUserMessage::from(text.as_str()).into(),
            (Role::User, Content::Parts(parts)) => ChatCompletionRequestUserMessage {
                content: ChatCompletionRequestUserMessageContent::Array(parts.iter().map(user_part).collect()),
                name: None,
            }
            .into(),
            (Role::Assistant, content) => assistant(content.text().into_owned(), None),
        })
        .collect()
}

fn text_part(text: &str) -> ChatCompletionRequestMessageContentPartText {
    ChatCompletionRequestMessageContentPartText { text: text.to_owned(), prompt_cache_breakpoint: None }
}

fn user_part(part: &ContentPart) -> ChatCompletionRequestUserMessageContentPart {
    match part {
        ContentPart::Text { text } => ChatCompletionRequestUserMessageContentPart::Text(text_part(text)),
        ContentPart::ImageUrl { image_url } => {
            ChatCompletionRequestUserMessageContentPart::ImageUrl(ChatCompletionRequestMessageContentPartImage {
                image_url: async_openai::types::chat::ImageUrl {
                    url: image_url.url.clone(),
                    detail: image_url.detail.map(|detail| match detail {
                        ImageDetail::Auto => async_openai::types::chat::ImageDetail::Auto,
                        ImageDetail::Low => async_openai::types::chat::ImageDetail::Low,
                        ImageDetail::High => async_openai::types::chat::ImageDetail::High,
                    }),
                },
                prompt_cache_breakpoint: None,
            })
        }
    }
}
