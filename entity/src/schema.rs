//! Makes schemars' output read like pydantic's, so that a model sees the same schema as
//! Instructor would send it (`instructd schema hero` equals the seed's JSON).

use schemars::Schema;
use serde_json::{Map, Value, json};

/// A schemars `transform` for generated entities, applied with
/// `#[schemars(transform = entity::schema::pydantic_style)]`:
///
/// - every property gets pydantic's title (`secret_name` → `Secret Name`), an inlined enum
///   (`#[schemars(inline)]`, pydantic's `Literal[...]`) included, but a reference to a
///   definition (a nested model, an enum), optional or not: pydantic leaves those untitled;
/// - `"type": ["integer", "null"]` becomes `"anyOf": [{"type": "integer"}, {"type": "null"}]`;
/// - an optional property (not in `required`) defaults to `null`, as `Optional[int] = None`;
/// - Rust's numeric formats (`int32`, `uint8`, `double`, …) are dropped: they describe
///   Rust's storage, not the answer, and strict providers reject some of them.
pub fn pydantic_style(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else { return };
    let required: Vec<String> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) else { return };
    for (name, property) in properties.iter_mut() {
        let Some(property) = property.as_object_mut() else { continue };
        drop_numeric_format(property);
        split_nullable_type(property);
        if !required.contains(name) && is_nullable(property) && !property.contains_key("default") {
            property.insert("default".into(), Value::Null);
        }
        if is_reference(property) {
            continue;
        }
        if property.contains_key("enum") {
            // An inlined enum carries its type's name; pydantic titles a `Literal` by its field.
            property.insert("title".into(), Value::String(pydantic_title(name)));
        }
        property.entry("title").or_insert_with(|| Value::String(pydantic_title(name)));
    }
}

/// Python's `name.title().replace("_", " ")`, which pydantic uses for field titles.
pub fn pydantic_title(name: &str) -> String {
    let mut title = String::with_capacity(name.len());
    let mut start_of_word = true;
    for c in name.chars() {
        if c.is_alphabetic() {
            if start_of_word {
                title.extend(c.to_uppercase());
            } else {
                title.extend(c.to_lowercase());
            }
            start_of_word = false;
        } else {
            title.push(if c == '_' { ' ' } else { c });
            start_of_word = true;
        }
    }
    title
}

fn drop_numeric_format(property: &mut Map<String, Value>) {
    let numeric = property.get("format").and_then(Value::as_str).is_some_and(|format| {
        matches!(
            format,
            "int8"
                | "int16"
                | "int32"
                | "int64"
                | "uint"
                | "uint8"
                | "uint16"
                | "uint32"
                | "uint64"
                | "float"
                | "double"
        )
    });
    if numeric {
        property.remove("format");
    }
}

fn split_nullable_type(property: &mut Map<String, Value>) {
    let Some(Value::Array(types)) = property.get("type") else { return };
    if types.len() != 2 || !types.contains(&json!("null")) {
        return;
    }
    let inner = types.iter().find(|t| *t != "null").cloned().unwrap_or(Value::Null);
    property.remove("type");
    // Keywords that describe the non-null value move inside its branch.
    let mut branch = Map::new();
    branch.insert("type".into(), inner);
    for key in ["format", "minimum", "maximum", "minLength", "maxLength", "pattern", "items", "minItems", "maxItems"] {
        if let Some(value) = property.remove(key) {
            branch.insert(key.into(), value);
        }
    }
    property.insert("anyOf".into(), json!([Value::Object(branch), {"type": "null"}]));
}

/// `{"$ref": …}`, or `{"anyOf": [{"$ref": …}, {"type": "null"}]}` (an `Option` of one).
fn is_reference(property: &Map<String, Value>) -> bool {
    property.contains_key("$ref")
        || property
            .get("anyOf")
            .and_then(Value::as_array)
            .is_some_and(|branches| branches.iter().any(|b| b.get("$ref").is_some()))
}

fn is_nullable(property: &Map<String, Value>) -> bool {
    property
        .get("anyOf")
        .and_then(Value::as_array)
        .is_some_and(|branches| branches.iter().any(|b| b.get("type") == Some(&json!("null"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_follow_python_str_title() {
        assert_eq!(pydantic_title("secret_name"), "Secret Name");
        assert_eq!(pydantic_title("age"), "Age");
        assert_eq!(pydantic_title("team_id2x"), "Team Id2X");
    }
}
