//! Turning a delivery into a job, or into the reason it can never become one. Parse,
//! don't validate: everything the rest of the job's life relies on is checked here once.

use std::sync::Arc;

use lapin::BasicProperties;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::{LimitsSettings, Settings};
use crate::contract::{Content, ContentPart, GenerationRequest, Role};
use crate::entities::{EntityKind, Registry};
use crate::job::{JobRecord, TraceContext};
use crate::text;

/// A request that passed every check.
pub struct Job {
    pub id: Uuid,
    /// The id was assigned here (the request had no `job_id` and no UUID `message_id`): a
    /// copy of the message must carry it to be the same job.
    pub assigned_id: bool,
    pub kind: Arc<dyn EntityKind>,
    pub request: GenerationRequest,
    /// The request as received, kept on the job row.
    pub raw: Box<RawValue>,
    pub metadata: Value,
    /// The models to try, in order ([`crate::config::LlmSettings::models_for`]).
    pub models: Vec<String>,
    /// The job's trace context (set by the worker, from the job's span).
    pub trace: Option<TraceContext>,
    pub max_retries: u32,
    pub mode: crate::contract::Mode,
    pub correlation_id: String,
    pub reply_to: Option<String>,
    /// How many times the broker delivered this message before without it being settled
    /// (the quorum queue's `x-delivery-count`, read only on a redelivery: on a first delivery
    /// the header is whatever the publisher wrote).
    pub previous_deliveries: u64,
}

/// A message that can never succeed, with what could still be read of it.
pub struct Rejection {
    /// Why, bounded ([`text::message`]): it travels in an AMQP header, an event, the job row
    /// and the logs.
    pub reason: String,
    /// Read from the body or `message_id`, else assigned.
    pub job_id: Uuid,
    /// The entity as named, or `unknown`.
    pub entity: String,
    /// The registered entity's name, if the named one exists.
    pub routing_entity: Option<&'static str>,
    /// The request as received (`null` when it cannot be stored).
    pub raw: Box<RawValue>,
    pub metadata: Value,
    pub correlation_id: String,
    pub reply_to: Option<String>,
    /// The request's trace context (set by the worker, from the job's span).
    pub trace: Option<TraceContext>,
}

impl Job {
    pub fn record(&self) -> JobRecord<'_> {
        JobRecord {
            job_id: self.id,
            entity: self.kind.name(),
            routing_entity: Some(self.kind.name()),
            request: &self.raw,
            metadata: &self.metadata,
            correlation_id: &self.correlation_id,
            reply_to: self.reply_to.as_deref(),
            trace: self.trace.as_ref(),
        }
    }
}

impl Rejection {
    pub fn record(&self) -> JobRecord<'_> {
        JobRecord {
            job_id: self.job_id,
            entity: &self.entity,
            routing_entity: self.routing_entity,
            request: &self.raw,
            metadata: &self.metadata,
            correlation_id: &self.correlation_id,
            reply_to: self.reply_to.as_deref(),
            trace: self.trace.as_ref(),
        }
    }
}

/// The longest model name a request may give (providers' names are a few dozen characters).
pub const MAX_MODEL_CHARS: usize = 256;

/// Decodes a request body and its AMQP properties into a [`Job`]. `redelivered` is the
/// delivery's flag: only a redelivery's `x-delivery-count` was written by the broker.
pub fn decode(
    body: &[u8],
    properties: &BasicProperties,
    redelivered: bool,
    registry: &Registry,
    settings: &Settings,
) -> Result<Job, Box<Rejection>> {
    let message_id = properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok());
    let correlation = properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
    let reply_to = properties.reply_to().as_ref().map(|r| r.as_str().to_owned()).filter(|r| !r.is_empty());
    // A property with a NUL cannot be stored (Postgres text refuses it): the request is
    // rejected, and its failure recorded with the NUL replaced (and no reply_to to answer).
    let nul_property = [("correlation_id", &correlation), ("reply_to", &reply_to)]
        .into_iter()
        .find(|(_, value)| value.as_deref().is_some_and(|v| v.contains('\0')))
        .map(|(name, _)| name);
    let correlation = correlation.map(|c| text::without_nul(&c).into_owned());
    let reply_to = reply_to.filter(|r| !r.contains('\0'));
    let mut rejection = Rejection {
        reason: String::new(),
        job_id: message_id.unwrap_or_else(Uuid::new_v4),
        entity: "unknown".to_owned(),
        routing_entity: None,
        raw: RawValue::NULL.to_owned(),
        metadata: Value::Null,
        correlation_id: String::new(),
        reply_to: reply_to.clone(),
        trace: None,
    };
    let reject = |mut rejection: Rejection, reason: String| {
        rejection.correlation_id = correlation.clone().unwrap_or_else(|| rejection.job_id.to_string());
        rejection.reason = text::message(&reason);
        Err(Box::new(rejection))
    };

    if body.len() > settings.broker.max_message_bytes {
        let reason = format!(
            "the message is {} bytes, over broker.max_message_bytes ({})",
            body.len(),
            settings.broker.max_message_bytes
        );
        return reject(rejection, reason);
    }
    // The common case, a well-formed request with nothing a rejection must describe, is read
    // straight into its type: no tree of it is built. Anything else (not JSON, not a request,
    // a NUL anywhere) goes the way below, which says what is wrong with it. The typed read
    // skips the fields it does not know without checking their bytes or their depth: its text
    // as a `RawValue` (UTF-8 throughout) and the depth check are the checks the tree made.
    let direct = if nul_property.is_none() && !text::json_has_nul(body) && text::json_depth_within_limit(body) {
        serde_json::from_slice::<GenerationRequest>(body)
            .ok()
            .and_then(|request| Some((request, serde_json::from_slice::<Box<RawValue>>(body).ok()?)))
    } else {
        None
    };
    let (mut request, metadata_bytes) = match direct {
        Some((request, raw)) => {
            rejection.raw = raw;
            let metadata_bytes = request.metadata.as_ref().filter(|metadata| !metadata.is_null()).map_or(0, json_size);
            if metadata_bytes <= settings.limits.max_metadata_bytes {
                rejection.metadata = request.metadata.clone().unwrap_or(Value::Null);
            }
            rejection.entity = text::quoted(&request.entity).into_owned();
            rejection.routing_entity = registry.get(&request.entity).map(|kind| kind.name());
            if let Some(job_id) = request.job_id {
                rejection.job_id = job_id;
            }
            (request, metadata_bytes)
        }
        None => match read_with_reasons(body, nul_property, registry, settings, &mut rejection) {
            Ok(read) => read,
            Err(reason) => return reject(rejection, reason),
        },
    };
    let Some(kind) = registry.get(&request.entity).cloned() else {
        let known = registry.names().collect::<Vec<_>>().join(", ");
        let reason = format!("unknown entity `{}` (known: {known})", text::quoted(&request.entity));
        return reject(rejection, reason);
    };
    if request.messages.is_empty() {
        return reject(rejection, "messages: must not be empty".to_owned());
    }
    if let Some(model) = &request.model {
        if model.trim().is_empty() {
            return reject(rejection, "model: must not be empty when given".to_owned());
        }
        // A name travels on in events, spans and the job's calls: bounded, like any name.
        if model.chars().count() > MAX_MODEL_CHARS {
            return reject(rejection, format!("model: at most {MAX_MODEL_CHARS} characters"));
        }
        if !settings.llm.allows_model(model) {
            return reject(rejection, format!("model: `{}` is not one of llm.allowed_models", text::quoted(model)));
        }
    }
    if let Err(reason) = within_limits(&request, metadata_bytes, settings) {
        return reject(rejection, reason);
    }
    let job_id = rejection.job_id;
    Ok(Job {
        id: job_id,
        assigned_id: request.job_id.is_none() && message_id.is_none(),
        kind,
        models: settings.llm.models_for(&request.entity, request.model.as_deref()),
        trace: None,
        // The request may ask for fewer re-asks than the cap, never more.
        max_retries: request.max_retries.unwrap_or(settings.llm.default_max_retries).min(settings.llm.max_retries),
        mode: request.mode.unwrap_or(settings.llm.mode),
        metadata: request.metadata.take().unwrap_or(Value::Null),
        correlation_id: correlation.unwrap_or_else(|| job_id.to_string()),
        reply_to,
        previous_deliveries: if redelivered { delivery_count(properties) } else { 0 },
        raw: rejection.raw,
        request,
    })
}

/// Reads a request the way that can say what is wrong with it: as a JSON tree first, so that
/// a rejection still names the job, the entity and the metadata where the request gives them
/// (written into `rejection`). Returns the request and the size of its metadata, or why it
/// is rejected.
fn read_with_reasons(
    body: &[u8],
    nul_property: Option<&str>,
    registry: &Registry,
    settings: &Settings,
    rejection: &mut Rejection,
) -> Result<(GenerationRequest, usize), String> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    // Postgres text and jsonb cannot hold a NUL character: such a request is rejected, and
    // its failure recorded without it.
    let nul = contains_nul(&raw);
    if !nul {
        // Its text, as received: the parsed `raw` is not kept past decoding. (It parsed
        // above; were its text refused all the same, the row would hold `null`, not fail.)
        rejection.raw = serde_json::from_slice(body).unwrap_or_else(|_| RawValue::NULL.to_owned());
    }
    // Measured once: checked below, and echoed in a failed event unless it is over the limit.
    let metadata_bytes = raw.get("metadata").filter(|metadata| !metadata.is_null()).map_or(0, json_size);
    if metadata_bytes <= settings.limits.max_metadata_bytes && !nul {
        rejection.metadata = raw.get("metadata").cloned().unwrap_or(Value::Null);
    }
    if let Some(entity) = raw.get("entity").and_then(Value::as_str) {
        // Echoed in the failed event and the job row: bounded and clean.
        rejection.entity = text::quoted(entity).into_owned();
        rejection.routing_entity = registry.get(entity).map(|kind| kind.name());
    }
    match raw.get("job_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if Uuid::parse_str(id).is_ok() => rejection.job_id = Uuid::parse_str(id).unwrap(),
        Some(other) => {
            let shown = text::quoted(&other.to_string()).into_owned();
            return Err(format!("job_id: {shown} is not a UUID"));
        }
    }
    if nul {
        return Err("the request contains a NUL character (\\u0000), which Postgres cannot store".to_owned());
    }
    if let Some(property) = nul_property {
        return Err(format!("the AMQP property {property} contains a NUL character, which Postgres cannot store"));
    }
    let request: GenerationRequest = serde_path_to_error::deserialize(&raw).map_err(|e| {
        // serde quotes the offending value (an unknown role, say): keep the path readable.
        let why = text::clip(&e.inner().to_string(), 1024).into_owned();
        format!("not a generation request: {why} at {}", text::quoted(&e.path().to_string()))
    })?;
    Ok((request, metadata_bytes))
}

/// The request's size against `limits.*`: checked before anything is spent on it.
/// `metadata_bytes` is the size of the request's metadata as compact JSON (0 when absent).
fn within_limits(request: &GenerationRequest, metadata_bytes: usize, settings: &Settings) -> Result<(), String> {
    let limits = &settings.limits;
    if request.messages.len() > limits.max_messages {
        return Err(format!(
            "messages: {} messages, over limits.max_messages ({})",
            request.messages.len(),
            limits.max_messages
        ));
    }
    for (i, message) in request.messages.iter().enumerate() {
        let bytes = message.content.text_bytes();
        if bytes > limits.max_content_bytes {
            return Err(format!(
                "messages[{i}].content: {bytes} bytes, over limits.max_content_bytes ({})",
                limits.max_content_bytes
            ));
        }
        if let Content::Parts(parts) = &message.content {
            content_parts_within_limits(i, message.role, parts, limits)?;
        }
    }
    if metadata_bytes > limits.max_metadata_bytes {
        return Err(format!(
            "metadata: {metadata_bytes} bytes of JSON, over limits.max_metadata_bytes ({})",
            limits.max_metadata_bytes
        ));
    }
    Ok(())
}

/// A message's content parts against `limits.*`: how many, and each image's place, scheme
/// and size. What is refused here never reaches the provider.
fn content_parts_within_limits(
    i: usize,
    role: Role,
    parts: &[ContentPart],
    limits: &LimitsSettings,
) -> Result<(), String> {
    if parts.is_empty() {
        return Err(format!("messages[{i}].content: an empty list of parts"));
    }
    if parts.len() > limits.max_content_parts {
        return Err(format!(
            "messages[{i}].content: {} parts, over limits.max_content_parts ({})",
            parts.len(),
            limits.max_content_parts
        ));
    }
    for (j, part) in parts.iter().enumerate() {
        let ContentPart::ImageUrl { image_url } = part else { continue };
        let at = format!("messages[{i}].content[{j}]");
        if role != Role::User {
            return Err(format!("{at}: an image is allowed in a user's message only"));
        }
        let url = &image_url.url;
        if url.len() > limits.max_image_bytes {
            return Err(format!(
                "{at}.image_url.url: {} bytes, over limits.max_image_bytes ({})",
                url.len(),
                limits.max_image_bytes
            ));
        }
        let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase()).unwrap_or_default();
        if !limits.image_url_schemes.contains(&scheme) {
            return Err(format!(
                "{at}.image_url.url: scheme `{}` is not allowed (limits.image_url_schemes: {})",
                text::quoted(&scheme),
                limits.image_url_schemes.join(", ")
            ));
        }
        if scheme == "data" && !is_base64_image(url) {
            return Err(format!("{at}.image_url.url: a data URL must be data:image/<type>;base64,<data>"));
        }
    }
    Ok(())
}

/// `data:image/<type>;base64,<data>`, the data in base64's alphabet.
fn is_base64_image(url: &str) -> bool {
    let Some((header, data)) = url.split_once(',') else { return false };
    let Some(media) = header.get(5..).filter(|_| header[..5].eq_ignore_ascii_case("data:")) else { return false };
    let Some(media) = media.strip_suffix(";base64") else { return false };
    let Some(subtype) = media.strip_prefix("image/") else { return false };
    !subtype.is_empty()
        && subtype.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !data.is_empty()
        && data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// Whether any string or key in `value` holds a NUL character.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(object) => object.iter().any(|(key, value)| key.contains('\0') || contains_nul(value)),
        _ => false,
    }
}

/// The size of `value` as compact JSON, in bytes.
fn json_size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// The quorum queue's `x-delivery-count` header (absent on a first delivery).
fn delivery_count(properties: &BasicProperties) -> u64 {
    use lapin::types::AMQPValue;
    let value = properties.headers().as_ref().and_then(|headers| headers.inner().get("x-delivery-count").cloned());
    match value {
        Some(AMQPValue::LongLongInt(n)) => n.max(0) as u64,
        Some(AMQPValue::LongInt(n)) => n.max(0) as u64,
        Some(AMQPValue::ShortInt(n)) => n.max(0) as u64,
        Some(AMQPValue::LongUInt(n)) => n.into(),
        Some(AMQPValue::ShortUInt(n)) => n.into(),
        Some(AMQPValue::ShortShortInt(n)) => n.max(0) as u64,
        Some(AMQPValue::ShortShortUInt(n)) => n.into(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decoded_text(text: &[u8]) -> Result<Job, Box<Rejection>> {
        let settings = Settings::load_from(None, Default::default()).unwrap();
        decode(text, &BasicProperties::default(), false, crate::heroes::app().registry(), &settings)
    }

    fn decoded(body: &Value) -> Result<Job, Box<Rejection>> {
        decoded_text(&serde_json::to_vec(body).unwrap())
    }

    #[test]
    fn a_request_read_directly_is_the_request_read_as_a_tree() {
        let job_id = Uuid::new_v4();
        let body = json!({
            "job_id": job_id, "entity": "hero", "max_retries": 1, "mode": "json",
            "metadata": {"tenant": "a", "n": [1, 2]},
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        });
        let text = serde_json::to_vec(&body).unwrap();
        let settings = Settings::load_from(None, Default::default()).unwrap();
        let app = crate::heroes::app();
        let mut rejection = Rejection {
            reason: String::new(),
            job_id: Uuid::nil(),
            entity: String::new(),
            routing_entity: None,
            raw: RawValue::NULL.to_owned(),
            metadata: Value::Null,
            correlation_id: String::new(),
            reply_to: None,
            trace: None,
        };
        let (tree, metadata_bytes) = read_with_reasons(&text, None, app.registry(), &settings, &mut rejection).unwrap();
        let direct: GenerationRequest = serde_json::from_slice(&text).unwrap();
        assert_eq!(serde_json::to_value(&direct).unwrap(), serde_json::to_value(&tree).unwrap());
        assert_eq!(metadata_bytes, json_size(&body["metadata"]));

        let job = decoded(&body).unwrap_or_else(|rejection| panic!("{}", rejection.reason));
        assert_eq!(job.id, job_id);
        assert_eq!(job.metadata, body["metadata"]);
        assert_eq!(serde_json::from_str::<Value>(job.raw.get()).unwrap(), body);
    }

    #[test]
    fn what_the_direct_read_refuses_is_still_read_or_rejected_with_its_reason() {
        // A repeated key: refused by the typed read, kept (the last one) by the tree's.
        let text = br#"{"entity": "nobody", "entity": "hero", "messages": [{"role": "user", "content": "u"}]}"#;
        let job = decoded_text(text);
        assert_eq!(job.map(|job| job.kind.name()).ok(), Some("hero"));

        let not_a_uuid = decoded(&json!({"job_id": "x", "entity": "hero", "messages": []})).err().unwrap();
        assert_eq!(not_a_uuid.reason, "job_id: \"x\" is not a UUID");
        let nul =
            decoded(&json!({"entity": "hero", "messages": [{"role": "user", "content": "a\u{0}b"}]})).err().unwrap();
        assert!(nul.reason.contains("NUL character"), "{}", nul.reason);
        assert_eq!(nul.entity, "hero", "the rejection still names what it could read");
    }

    #[test]
    fn a_field_nobody_reads_is_still_checked_for_its_bytes_and_its_depth() {
        // serde_json skips an unknown field's string without checking its bytes.
        let mut text = br#"{"entity": "hero", "messages": [{"role": "user", "content": "u"}], "x": "#.to_vec();
        text.extend_from_slice(b"\"\xff\xfe\"}");
        let refused = decoded_text(&text).err().unwrap();
        assert!(refused.reason.starts_with("the body is not JSON"), "{}", refused.reason);

        // Nor is a field nobody reads read at any depth: as deep as a tree may be, no deeper.
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let body = |depth: usize| {
            format!(r#"{{"entity": "hero", "messages": [{{"role": "user", "content": "u"}}], "x": {}}}"#, nested(depth))
        };
        assert!(decoded_text(body(text::MAX_JSON_DEPTH - 1).as_bytes()).is_ok());
        let refused = decoded_text(body(text::MAX_JSON_DEPTH).as_bytes()).err().unwrap();
        assert!(refused.reason.contains("recursion limit exceeded"), "{}", refused.reason);
    }
}
