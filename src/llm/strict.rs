//! The schema rewrite that OpenAI's strict structured outputs require (`llm.strict = true`):
//! every property required, optional ones made nullable, `additionalProperties: false` on
//! every object, no `default`, no `$schema`, no `format` the API rejects, `oneOf` as
//! `anyOf`, and `$ref`s that carry sibling keys inlined. Maps (objects whose keys are data)
//! cannot be expressed and are rejected with an error naming the field.

use serde_json::{Value, json};

/// `format`s strict mode accepts; any other (`int32`, `uint`, `double`, …) is dropped.
const ALLOWED_FORMATS: &[&str] =
    &["date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"];

/// Rewrites `schema` for strict mode. The error names the offending field.
pub fn strict_schema(schema: &Value) -> Result<Value, String> {
    let definitions = schema.get("$defs").or_else(|| schema.get("definitions")).cloned().unwrap_or(Value::Null);
    let mut root = schema.clone();
    if let Some(object) = root.as_object_mut() {
        object.remove("$schema");
    }
    rewrite(&mut root, &definitions, "", 0)?;
    Ok(root)
}

fn rewrite(node: &mut Value, definitions: &Value, path: &str, depth: usize) -> Result<(), String> {
    if depth > 32 {
        return Err(format!("{}: the schema nests too deeply (a recursive $ref?)", display(path)));
    }
    let Some(object) = node.as_object_mut() else { return Ok(()) };
    object.remove("default");
    if let Some(format) = object.get("format").and_then(Value::as_str)
        && !ALLOWED_FORMATS.contains(&format)
    {
        object.remove("format");
    }
    if let Some(one_of) = object.remove("oneOf") {
        object.insert("anyOf".into(), one_of);
    }
    // A $ref with siblings (a description, a default…) is not accepted: inline the target.
    if object.contains_key("$ref") && object.len() > 1 {
        let reference = object.remove("$ref").and_then(|r| r.as_str().map(str::to_owned)).unwrap_or_default();
        let target = resolve(definitions, &reference)
            .ok_or_else(|| format!("{}: unresolvable $ref {reference}", display(path)))?;
        for (key, value) in target.as_object().into_iter().flatten() {
            object.entry(key.clone()).or_insert_with(|| value.clone());
        }
        return rewrite(node, definitions, path, depth + 1);
    }

    let is_object =
        object.get("type").is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.contains(&json!("object"))));
    if is_object {
        let has_properties = object.get("properties").and_then(Value::as_object).is_some_and(|p| !p.is_empty());
        let open_map = matches!(object.get("additionalProperties"), Some(Value::Object(_)) | Some(Value::Bool(true)));
        if open_map || !has_properties && !matches!(object.get("additionalProperties"), Some(Value::Bool(false))) {
            return Err(format!(
                "{}: a map (an object with free-form keys) cannot be expressed in strict mode; \
                 use a list of key/value objects",
                display(path)
            ));
        }
        let required: Vec<String> = object
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let properties = object
            .entry("properties")
            .or_insert_with(|| Value::Object(Default::default()))
            .as_object_mut()
            .ok_or_else(|| format!("{}: `properties` is not an object", display(path)))?;
        let mut all = Vec::with_capacity(properties.len());
        for (name, property) in properties.iter_mut() {
            let field = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            rewrite(property, definitions, &field, depth + 1)?;
            if !required.contains(name) {
                make_nullable(property);
            }
            all.push(Value::String(name.clone()));
        }
        object.insert("required".into(), Value::Array(all));
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["items", "not"] {
        if let Some(child) = object.get_mut(key) {
            rewrite(child, definitions, &format!("{path}[]"), depth + 1)?;
        }
    }
    for key in ["anyOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(children)) = object.get_mut(key) {
            for child in children {
                rewrite(child, definitions, path, depth + 1)?;
            }
        }
    }
    for key in ["$defs", "definitions"] {
        if let Some(Value::Object(children)) = object.get_mut(key) {
            for (name, child) in children.iter_mut() {
                rewrite(child, definitions, &format!("#/{key}/{name}"), depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Lets an optional property be `null` (strict mode has no optional properties).
fn make_nullable(property: &mut Value) {
    let null = json!({"type": "null"});
    let Some(object) = property.as_object_mut() else { return };
    if let Some(Value::Array(options)) = object.get_mut("anyOf") {
        if !options.iter().any(|o| o.get("type") == Some(&json!("null"))) {
            options.push(null);
        }
        return;
    }
    match object.get_mut("type") {
        Some(Value::String(kind)) if kind != "null" => {
            let kind = kind.clone();
            object.insert("type".into(), json!([kind, "null"]));
        }
        Some(Value::Array(kinds)) if !kinds.contains(&json!("null")) => kinds.push(json!("null")),
        Some(_) => {}
        None => {
            let inner = Value::Object(std::mem::take(object));
            object.insert("anyOf".into(), json!([inner, null]));
        }
    }
}

fn resolve<'a>(definitions: &'a Value, reference: &str) -> Option<&'a Value> {
    let name = reference.strip_prefix("#/$defs/").or_else(|| reference.strip_prefix("#/definitions/"))?;
    definitions.get(name)
}

fn display(path: &str) -> &str {
    if path.is_empty() { "the schema" } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hero_becomes_strict() {
        let hero = json!({
            "properties": {
                "name": {"title": "Name", "type": "string"},
                "secret_name": {"title": "Secret Name", "type": "string"},
                "age": {"anyOf": [{"type": "integer", "format": "int32"}, {"type": "null"}], "default": null, "title": "Age"}
            },
            "required": ["name", "secret_name"], "title": "Hero", "type": "object",
            "$schema": "https://json-schema.org/draft/2020-12/schema"
        });
        let strict = strict_schema(&hero).unwrap();
        assert_eq!(
            strict,
            json!({
                "properties": {
                    "name": {"title": "Name", "type": "string"},
                    "secret_name": {"title": "Secret Name", "type": "string"},
                    "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Age"}
                },
                "required": ["name", "secret_name", "age"], "title": "Hero", "type": "object",
                "additionalProperties": false
            })
        );
    }

    #[test]
    fn nested_objects_refs_with_siblings_and_one_of_are_rewritten() {
        let schema = json!({
            "type": "object", "title": "Team",
            "properties": {
                "name": {"type": "string"},
                "motto": {"type": "string", "default": "onward"},
                "size": {"type": "integer", "format": "uint32"},
                "heroes": {"type": "array", "items": {"$ref": "#/$defs/Member"}},
                "lead": {"$ref": "#/$defs/Member", "description": "who leads"},
                "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]}
            },
            "required": ["name", "heroes", "lead", "kind"],
            "$defs": {"Member": {"type": "object", "properties": {"n": {"type": "string"}}}}
        });
        let strict = strict_schema(&schema).unwrap();
        let properties = &strict["properties"];
        assert_eq!(strict["required"], json!(["name", "motto", "size", "heroes", "lead", "kind"]));
        assert_eq!(strict["additionalProperties"], false);
        assert_eq!(properties["motto"], json!({"type": ["string", "null"]}), "optional: nullable, no default");
        assert_eq!(properties["size"], json!({"type": ["integer", "null"]}), "uint32 is dropped");
        assert_eq!(properties["heroes"]["items"], json!({"$ref": "#/$defs/Member"}), "a bare $ref stays");
        assert_eq!(properties["lead"]["description"], "who leads");
        assert_eq!(properties["lead"]["additionalProperties"], false, "a $ref with siblings is inlined");
        assert!(properties["lead"].get("$ref").is_none());
        assert_eq!(properties["kind"], json!({"anyOf": [{"const": "a"}, {"const": "b"}]}));
        assert_eq!(strict["$defs"]["Member"]["required"], json!(["n"]));
        assert_eq!(strict["$defs"]["Member"]["additionalProperties"], false);
    }

    #[test]
    fn the_team_schema_becomes_strict() {
        let app = crate::heroes::app();
        let registry = app.registry();
        let strict = strict_schema(registry.get("team").unwrap().schema()).unwrap();
        assert_eq!(strict["required"], json!(["name", "headquarters", "heroes"]));
        assert_eq!(strict["additionalProperties"], false);
        assert_eq!(strict["properties"]["heroes"]["items"], json!({"$ref": "#/$defs/Hero"}));
        let hero = &strict["$defs"]["Hero"];
        assert_eq!(hero["required"], json!(["name", "secret_name", "age"]));
        assert_eq!(hero["additionalProperties"], false);
        assert_eq!(
            hero["properties"]["age"],
            json!({"anyOf": [{"maximum": 150, "minimum": 0, "type": "integer"}, {"type": "null"}], "title": "Age"}),
            "nullable, without its default"
        );
    }

    #[test]
    fn a_closed_object_without_properties_stays_one() {
        let schema = json!({"type": "object", "additionalProperties": false});
        assert_eq!(
            strict_schema(&schema).unwrap(),
            json!({"type": "object", "additionalProperties": false, "properties": {}, "required": []})
        );
    }

    #[test]
    fn a_map_is_refused_naming_its_field() {
        let schema = json!({
            "type": "object",
            "properties": {"scores": {"type": "object", "additionalProperties": {"type": "integer"}}},
            "required": ["scores"]
        });
        let error = strict_schema(&schema).unwrap_err();
        assert!(error.starts_with("scores: a map"), "{error}");
    }
}
