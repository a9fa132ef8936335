//! An answer checked against the very schema the model was sent, so that the constraints the
//! model is shown (`minLength`, `minimum`, `maxItems`, `enum`, `format`, `pattern`, …) are
//! exactly the ones enforced, declared once on the entity (`#[schemars(length(min = 1))]`).
//! (In strict mode the model is sent a schema derived from it for the provider's subset, which
//! may drop a keyword, e.g. some formats: the answer is still held to the entity's.)
//!
//! Like pydantic, the check reports **every** violation at once, one per line, each with its
//! path (`line_items[2].quantity: must be at least 1, got 0`): the model is re-asked with the
//! whole list rather than one mistake per round trip.

use std::fmt::Write as _;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{JsonType, ValidationError, Validator};
use serde_json::Value;

use crate::text;

/// The most violations described; an answer with more is told how many there were.
const MAX_VIOLATIONS: usize = 20;

/// The most characters of a value from the answer quoted in a violation.
const MAX_GOT_CHARS: usize = 40;

/// The schema of one entity, compiled to check answers against.
pub struct SchemaCheck {
    validator: Validator,
}

impl SchemaCheck {
    /// Compiles `schema` (draft 2020-12, formats checked).
    ///
    /// # Panics
    /// If `schema` is not a valid JSON schema: it comes from the entity's declaration, so that
    /// is a bug in the build, found at start-up (and by `instructd schema`'s tests).
    pub fn new(schema: &Value) -> Self {
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(schema)
            .unwrap_or_else(|error| panic!("an entity's schema does not compile: {error}"));
        Self { validator }
    }

    /// What is wrong with `answer`, one line per violation (empty when nothing is), bounded
    /// in count and length.
    pub fn violations(&self, answer: &Value) -> Vec<String> {
        if self.validator.is_valid(answer) {
            return Vec::new();
        }
        let mut lines = Vec::new();
        let mut errors = self.validator.iter_errors(answer);
        for error in errors.by_ref() {
            describe(&error, &mut lines);
            if lines.len() > MAX_VIOLATIONS {
                break;
            }
        }
        if lines.len() > MAX_VIOLATIONS {
            lines.truncate(MAX_VIOLATIONS);
            lines.push(format!("… and more: fix these {MAX_VIOLATIONS} first"));
        }
        lines
    }
}

/// The most bytes of one violation: a few fit in a message, whatever a line quotes.
const MAX_LINE_BYTES: usize = 400;

/// The violations as one message, one per line (each clipped to [`MAX_LINE_BYTES`]), cut at
/// a whole line to fit [`text::MAX_MESSAGE_BYTES`].
pub fn report(violations: &[String]) -> String {
    let mut message = String::new();
    for (shown, line) in violations.iter().enumerate() {
        let rest = violations.len() - shown;
        let line = text::clip(line, MAX_LINE_BYTES);
        // Room for this line and, if more follow, for saying how many.
        if message.len() + line.len() + 40 > text::MAX_MESSAGE_BYTES {
            let _ = write!(message, "… and {rest} more");
            return message;
        }
        message.push_str(&line);
        if rest > 1 {
            message.push('\n');
        }
    }
    message
}

/// Adds the line(s) saying what `error` found.
fn describe(error: &ValidationError<'_>, lines: &mut Vec<String>) {
    let path = dotted_path(error.instance_path());
    let instance = error.instance();
    let line = match error.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().map_or_else(|| property.to_string(), str::to_owned);
            let field = if path.is_empty() { name } else { format!("{path}.{name}") };
            lines.push(format!("{field}: field required"));
            return;
        }
        ValidationErrorKind::AnyOf { context } => {
            // An `Option<T>` is `anyOf: [T, null]`: what matters is why it is not a `T`.
            let mut branches = context.iter().filter(|errors| !errors.iter().all(expects_null));
            if let (Some(branch), None) = (branches.next(), branches.next()) {
                branch.iter().for_each(|error| describe(error, lines));
                return;
            }
            format!("matches none of the {} shapes it may take", context.len())
        }
        ValidationErrorKind::Type { kind } => format!("must be {}, got {}", expected(kind), got(instance)),
        ValidationErrorKind::MinLength { limit: 1 } => "must not be empty".to_owned(),
        ValidationErrorKind::MinLength { limit } => {
            format!("must have at least {limit} characters, got {}", characters(instance))
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("must have at most {limit} characters, got {}", characters(instance))
        }
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}, got {}", got(instance)),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}, got {}", got(instance)),
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            format!("must be greater than {limit}, got {}", got(instance))
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}, got {}", got(instance)),
        ValidationErrorKind::MultipleOf { multiple_of, .. } => {
            format!("must be a multiple of {multiple_of}, got {}", got(instance))
        }
        ValidationErrorKind::MinItems { limit } => {
            format!("must have at least {limit} {}, got {}", items(*limit), len(instance))
        }
        ValidationErrorKind::MaxItems { limit } => {
            format!("must have at most {limit} {}, got {}", items(*limit), len(instance))
        }
        ValidationErrorKind::UniqueItems => "must not repeat an item".to_owned(),
        ValidationErrorKind::Enum { options } => format!("must be one of {}, got {}", one_of(options), got(instance)),
        ValidationErrorKind::Constant { expected_value } => format!("must be {expected_value}, got {}", got(instance)),
        ValidationErrorKind::Format { format } => format!("must be {}, got {}", format_name(format), got(instance)),
        ValidationErrorKind::Pattern { pattern } => format!("must match the pattern {pattern}, got {}", got(instance)),
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            const NAMED: usize = 5;
            let mut names: Vec<String> =
                unexpected.iter().take(NAMED).map(|name| format!("`{}`", text::quoted(name))).collect();
            if unexpected.len() > NAMED {
                names.push(format!("and {} more", unexpected.len() - NAMED));
            }
            format!("unexpected {}: {}", if unexpected.len() == 1 { "field" } else { "fields" }, names.join(", "))
        }
        ValidationErrorKind::FalseSchema => "is not allowed here".to_owned(),
        // Keywords instructd's schemas do not use; the validator's own words.
        _ => text::clip(&error.to_string(), 300).into_owned(),
    };
    let subject = if path.is_empty() { "the answer" } else { &path };
    lines.push(format!("{subject}: {line}"));
}

/// `true` if `error` only says the value is not `null` (the other branch of an `Option`).
fn expects_null(error: &ValidationError<'_>) -> bool {
    matches!(error.kind(), ValidationErrorKind::Type { kind: TypeKind::Single(JsonType::Null) })
}

/// A location in the answer as a path into it: `line_items[2].quantity`.
fn dotted_path(location: &Location) -> String {
    let mut path = String::new();
    for segment in location.iter() {
        match segment {
            LocationSegment::Index(index) => {
                let _ = write!(path, "[{index}]");
            }
            LocationSegment::Property(name) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&text::quoted(&name));
            }
        }
    }
    path
}

fn expected(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(kind) => type_name(*kind).to_owned(),
        TypeKind::Multiple(kinds) => kinds.iter().map(type_name).collect::<Vec<_>>().join(" or "),
    }
}

fn type_name(kind: JsonType) -> &'static str {
    match kind {
        JsonType::Array => "a list",
        JsonType::Boolean => "true or false",
        JsonType::Integer => "an integer",
        JsonType::Null => "null",
        JsonType::Number => "a number",
        JsonType::Object => "an object",
        JsonType::String => "a string",
    }
}

/// A value of the answer as a violation quotes it: short.
fn got(value: &Value) -> String {
    match value {
        Value::String(value) => format!("\"{}\"", text::quoted_within(value, MAX_GOT_CHARS)),
        Value::Array(list) => format!("a list of {} {}", list.len(), items(list.len() as u64)),
        Value::Object(_) => "an object".to_owned(),
        other => text::clip(&other.to_string(), MAX_GOT_CHARS).into_owned(),
    }
}

fn characters(value: &Value) -> usize {
    value.as_str().map_or(0, |text| text.chars().count())
}

fn len(value: &Value) -> usize {
    value.as_array().map_or(0, Vec::len)
}

fn items(count: u64) -> &'static str {
    if count == 1 { "item" } else { "items" }
}

fn one_of(options: &Value) -> String {
    let options: Vec<String> = options.as_array().map(|o| o.iter().map(Value::to_string).collect()).unwrap_or_default();
    text::clip(&options.join(", "), 300).into_owned()
}

fn format_name(format: &str) -> String {
    match format {
        "date" => "a date (YYYY-MM-DD)".to_owned(),
        "date-time" => "a date and time (RFC 3339, e.g. 2026-01-31T09:30:00Z)".to_owned(),
        "time" => "a time (RFC 3339, e.g. 09:30:00Z)".to_owned(),
        "uuid" => "a UUID".to_owned(),
        "email" => "an email address".to_owned(),
        "uri" => "a URI".to_owned(),
        other => format!("a valid `{}`", text::quoted(other)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn invoice_schema() -> Value {
        json!({
            "$defs": {
                "LineItem": {
                    "properties": {
                        "description": {"minLength": 1, "title": "Description", "type": "string"},
                        "quantity": {"minimum": 1, "title": "Quantity", "type": "integer"},
                    },
                    "required": ["description", "quantity"],
                    "title": "LineItem",
                    "type": "object"
                }
            },
            "properties": {
                "vendor": {"minLength": 1, "title": "Vendor", "type": "string"},
                "currency": {"enum": ["EUR", "USD", "GBP"], "title": "Currency", "type": "string"},
                "issued_on": {"format": "date", "title": "Issued On", "type": "string"},
                "due_on": {"anyOf": [{"format": "date", "type": "string"}, {"type": "null"}], "default": null},
                "line_items": {"items": {"$ref": "#/$defs/LineItem"}, "maxItems": 2, "minItems": 1, "type": "array"}
            },
            "required": ["vendor", "currency", "issued_on", "line_items"],
            "title": "Invoice",
            "type": "object"
        })
    }

    #[test]
    fn every_violation_is_listed_with_its_path() {
        let check = SchemaCheck::new(&invoice_schema());
        let answer = json!({
            "vendor": "",
            "currency": "JPY",
            "issued_on": "31/01/2026",
            "due_on": "soon",
            "line_items": [{"description": "a", "quantity": 1}, {"description": "b", "quantity": 0}, {"quantity": "2"}]
        });
        let mut violations = check.violations(&answer);
        violations.sort();
        assert_eq!(
            violations,
            [
                r#"currency: must be one of "EUR", "USD", "GBP", got "JPY""#,
                r#"due_on: must be a date (YYYY-MM-DD), got "soon""#,
                r#"issued_on: must be a date (YYYY-MM-DD), got "31/01/2026""#,
                "line_items: must have at most 2 items, got 3",
                "line_items[1].quantity: must be at least 1, got 0",
                "line_items[2].description: field required",
                r#"line_items[2].quantity: must be an integer, got "2""#,
                "vendor: must not be empty",
            ]
        );
    }

    #[test]
    fn a_valid_answer_has_no_violations_and_null_fills_an_option() {
        let check = SchemaCheck::new(&invoice_schema());
        let answer = json!({
            "vendor": "ACME", "currency": "EUR", "issued_on": "2026-01-31", "due_on": null,
            "line_items": [{"description": "a", "quantity": 1}]
        });
        assert_eq!(check.violations(&answer), Vec::<String>::new());
    }

    #[test]
    fn the_root_and_long_values_are_named_briefly() {
        let check = SchemaCheck::new(&invoice_schema());
        assert_eq!(check.violations(&json!([1, 2])), ["the answer: must be an object, got a list of 2 items"]);
        let long = "x".repeat(10_000);
        let violations = check.violations(&json!({"vendor": "a", "currency": long, "issued_on": "2026-01-31", "line_items": [{"description": "a", "quantity": 1}]}));
        assert_eq!(violations, [format!(r#"currency: must be one of "EUR", "USD", "GBP", got "{}…""#, "x".repeat(40))]);
    }

    #[test]
    fn a_flood_of_violations_is_cut_and_the_report_fits_a_message() {
        let schema = json!({"type": "array", "items": {"type": "integer", "minimum": 0}});
        let check = SchemaCheck::new(&schema);
        let violations = check.violations(&json!(vec![-1; 10_000]));
        assert_eq!(violations.len(), MAX_VIOLATIONS + 1);
        assert_eq!(violations[0], "[0]: must be at least 0, got -1");
        assert!(violations[MAX_VIOLATIONS].starts_with("… and more"), "{violations:?}");

        let long: Vec<String> = (0..100).map(|i| format!("field_{i}: {}", "y".repeat(60))).collect();
        let report = report(&long);
        assert!(report.len() <= text::MAX_MESSAGE_BYTES, "{}", report.len());
        assert!(report.ends_with(" more"), "{report}");
        assert!(report.lines().all(|line| line.starts_with("field_") || line.starts_with('…')), "{report}");
        assert_eq!(super::report(&["a: x".to_owned(), "b: y".to_owned()]), "a: x\nb: y");
        // A line too long for a message is clipped, not dropped.
        let report = super::report(&[format!("a: {}", "z".repeat(5_000))]);
        assert!(report.starts_with("a: zzz") && report.ends_with('…') && report.len() <= MAX_LINE_BYTES, "{report}");
    }

    #[test]
    fn unexpected_fields_are_named_up_to_five() {
        let check =
            SchemaCheck::new(&json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}));
        let answer: serde_json::Map<String, Value> = (0..1_000).map(|i| (format!("k{i:04}"), json!(1))).collect();
        let violations = check.violations(&Value::Object(answer));
        assert_eq!(
            violations,
            ["the answer: unexpected fields: `k0000`, `k0001`, `k0002`, `k0003`, `k0004`, and 995 more"]
        );
    }
}
