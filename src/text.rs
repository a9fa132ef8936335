//! Bounds on every text that crosses a boundary. What a request, a model or a provider
//! wrote can be quoted in a dead letter's `x-instructd-error` header (an AMQP header frame is
//! at most 128 KiB, and a larger one closes the connection), in an event, in the job row and
//! in the logs. Each of those is clipped here to a size that fits them all, and cleaned of the
//! NUL character, which Postgres `text` and `jsonb` refuse.

use std::borrow::Cow;

use serde_json::Value;

/// The most bytes of a reason or an error message that instructd passes on: a dead letter's
/// `x-instructd-error`, an event's `error.message`, the job row's error, a log field, and the
/// validation error a re-ask shows the model.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// The most characters of a value from a request quoted inside a reason (an entity's name,
/// a model's name): enough to recognise it.
pub const MAX_QUOTED_CHARS: usize = 100;

/// What stands for a cut: the text went on.
const ELLIPSIS: &str = "…";

/// `text` cut to at most `max_bytes` bytes (on a character boundary, ending in `…` when
/// cut), with every NUL replaced by U+FFFD.
pub fn clip(text: &str, max_bytes: usize) -> Cow<'_, str> {
    let text = without_nul(text);
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{ELLIPSIS}", &text[..end]))
}

/// A reason or error message as instructd passes it on: [`clip`] to [`MAX_MESSAGE_BYTES`].
pub fn message(text: &str) -> String {
    clip(text, MAX_MESSAGE_BYTES).into_owned()
}

/// A value from a request as it may be quoted in a reason: at most [`MAX_QUOTED_CHARS`]
/// characters, NUL replaced.
pub fn quoted(value: &str) -> Cow<'_, str> {
    quoted_within(value, MAX_QUOTED_CHARS)
}

/// `value` cut to at most `max_chars` characters (ending in `…` when cut), NUL replaced.
pub fn quoted_within(value: &str, max_chars: usize) -> Cow<'_, str> {
    match value.char_indices().nth(max_chars) {
        Some((end, _)) => Cow::Owned(format!("{}{ELLIPSIS}", without_nul(&value[..end]))),
        None => without_nul(value),
    }
}

/// `text` with every NUL character replaced by U+FFFD.
pub fn without_nul(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(text) }
}

/// The path of the first string (or key) in `value` that holds a NUL character, as
/// `heroes[2].name` (empty for `value` itself), if there is one.
pub fn nul_path(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| nul_path(item).map(|rest| format!("[{index}]{}", dotted(&rest)))),
        Value::Object(object) => object.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(quoted(key).into_owned());
            }
            nul_path(item).map(|rest| format!("{}{}", quoted(key), dotted(&rest)))
        }),
        _ => None,
    }
}

/// `rest` of a path as it follows a segment: `.name`, `[2]…`, or nothing.
fn dotted(rest: &str) -> String {
    if rest.is_empty() || rest.starts_with('[') { rest.to_owned() } else { format!(".{rest}") }
}

/// `value` as Postgres `jsonb` can store it: every NUL in a string or key written out as the
/// six characters `\u0000` (the JSON escape, kept readable). Borrowed when there is none.
pub fn storable_json(value: &Value) -> Cow<'_, Value> {
    if nul_path(value).is_none() {
        return Cow::Borrowed(value);
    }
    fn escape(value: &Value) -> Value {
        let text = |s: &str| s.replace('\0', "\\u0000");
        match value {
            Value::String(s) => Value::String(text(s)),
            Value::Array(items) => Value::Array(items.iter().map(escape).collect()),
            Value::Object(object) => Value::Object(object.iter().map(|(k, v)| (text(k), escape(v))).collect()),
            other => other.clone(),
        }
    }
    Cow::Owned(escape(value))
}

/// Whether JSON text holds a NUL character, which it can only hold as the escape `\u0000`
/// (a false alarm on an escaped backslash before `u0000` only sends the text the slow way).
pub fn json_has_nul(json: &[u8]) -> bool {
    json.windows(6).any(|window| window == b"\\u0000")
}

/// The deepest nesting of arrays and objects a JSON tree of serde_json's may have (its
/// recursion limit refuses the 128th level).
pub const MAX_JSON_DEPTH: usize = 127;

/// Whether JSON text nests arrays and objects at most [`MAX_JSON_DEPTH`] deep. serde_json
/// checks that only where it builds a value: it skips a field nobody reads (and checks a
/// `RawValue`) at any depth. Not a validation of the text, which the parse does.
pub fn json_depth_within_limit(json: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_depth_is_what_a_serde_json_tree_allows_and_strings_do_not_count() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(json_depth_within_limit(nested(MAX_JSON_DEPTH).as_bytes()));
        assert!(serde_json::from_str::<Value>(&nested(MAX_JSON_DEPTH)).is_ok());
        assert!(!json_depth_within_limit(nested(MAX_JSON_DEPTH + 1).as_bytes()));
        assert!(serde_json::from_str::<Value>(&nested(MAX_JSON_DEPTH + 1)).is_err());
        let in_strings = format!(r#"{{"a": "{}", "b": "\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert!(json_depth_within_limit(in_strings.as_bytes()));
    }

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_on_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let clipped = clip(&long, 11);
        assert!(clipped.len() <= 11, "{clipped}");
        assert!(clipped.ends_with('…'));
        assert_eq!(clip("a\0b", 10), "a\u{FFFD}b");
        assert!(message(&"x".repeat(200_000)).len() <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn quoted_values_are_short_and_clean() {
        assert_eq!(quoted("hero"), "hero");
        assert_eq!(quoted(&"v".repeat(500)).chars().count(), MAX_QUOTED_CHARS + 1);
        assert_eq!(quoted("a\0"), "a\u{FFFD}");
    }

    #[test]
    fn the_path_of_a_nul_is_named() {
        assert_eq!(nul_path(&json!({"name": "ok"})), None);
        assert_eq!(nul_path(&json!({"name": "a\u{0}b"})).as_deref(), Some("name"));
        let team = json!({"heroes": [{"name": "a"}, {"name": "b", "powers": ["x", "y\u{0}"]}]});
        assert_eq!(nul_path(&team).as_deref(), Some("heroes[1].powers[1]"));
        assert_eq!(nul_path(&json!(["\u{0}"])).as_deref(), Some("[0]"));
    }

    #[test]
    fn json_with_nul_is_stored_with_the_escape_written_out() {
        let value = json!({"content": "a\u{0}b", "k\u{0}": [1, "\u{0}"]});
        let stored = storable_json(&value);
        assert_eq!(*stored, json!({"content": "a\\u0000b", "k\\u0000": [1, "\\u0000"]}));
        assert!(matches!(storable_json(&json!({"a": "b"})), Cow::Borrowed(_)));
    }
}
