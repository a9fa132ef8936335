//! The registry of entities a request may name, filled by [`crate::App::entity`].

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use entity::Generate;
use futures_util::future::BoxFuture;
use sea_orm::{DatabaseTransaction, DbErr, EntityTrait, IntoActiveModel};
use serde_json::Value;
use uuid::Uuid;

use crate::validation::SchemaCheck;

/// The entities instructd can generate, by the name requests use.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn EntityKind>>,
}

impl Registry {
    /// Registers the SeaORM entity `E` under `name`.
    pub fn with<E>(mut self, name: &'static str) -> Self
    where
        E: EntityTrait,
        E::Model: Generate + IntoActiveModel<E::ActiveModel>,
        E::ActiveModel: Send,
    {
        self.kinds.insert(name, Arc::new(Table::<E>::new(name)));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn EntityKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

/// One generated entity: its schema, and how to turn the model's answer into rows.
pub trait EntityKind: Send + Sync {
    /// The name requests use (`hero`).
    fn name(&self) -> &'static str;
    /// The schema's title (`Hero`): the tool's name in tools mode.
    fn title(&self) -> &str;
    /// The JSON schema the model is sent, as `instructd schema` prints it.
    fn schema(&self) -> &Value;
    /// Parses and validates the model's JSON answer into a record ready to insert, with
    /// server-owned fields filled. The error text is fit to send back to the model.
    fn hydrate(&self, answer: &str) -> Result<Arc<dyn Record>, String>;
}

/// A validated, hydrated record (or graph of records) ready to be inserted.
pub trait Record: Send + Sync {
    /// The primary key of the (root) row.
    fn id(&self) -> Uuid;
    /// The record as the completion event carries it.
    fn to_json(&self) -> Value;
    /// The record as `Any`, to tell records of one entity from another's.
    fn as_any(&self) -> &dyn Any;
    /// Inserts `rows`, records of this one's entity, in `txn`: one INSERT for them all,
    /// then their children. See [`insert_records`].
    fn insert_rows<'a>(
        &'a self,
        rows: &'a [&'a dyn Record],
        txn: &'a DatabaseTransaction,
    ) -> BoxFuture<'a, Result<(), DbErr>>;
}

/// Inserts records of any entities in `txn` (the outcomes of a batch of jobs): one INSERT
/// per entity rather than one per record.
pub async fn insert_records(records: &[&dyn Record], txn: &DatabaseTransaction) -> Result<(), DbErr> {
    let mut groups: Vec<Vec<&dyn Record>> = Vec::new();
    for record in records {
        let entity = record.as_any().type_id();
        match groups.iter_mut().find(|group| group[0].as_any().type_id() == entity) {
            Some(group) => group.push(*record),
            None => groups.push(vec![*record]),
        }
    }
    for group in &groups {
        group[0].insert_rows(group, txn).await?;
    }
    Ok(())
}

struct Table<E> {
    name: &'static str,
    title: String,
    schema: Value,
    check: SchemaCheck,
    _entity: PhantomData<fn() -> E>,
}

impl<E: EntityTrait> Table<E>
where
    E::Model: Generate,
{
    fn new(name: &'static str) -> Self {
        let mut schema = response_schema::<E::Model>();
        E::Model::finish_schema(&mut schema);
        pydantic_key_order(&mut schema, false);
        let title = schema.get("title").and_then(Value::as_str).unwrap_or(name).to_owned();
        let check = SchemaCheck::new(&schema);
        Self { name, title, schema, check, _entity: PhantomData }
    }
}

/// The schema of `T` as the model is sent it, laid out as pydantic lays it out: no
/// `$schema` key; definitions under `$defs`, each with its title; keywords in alphabetical
/// order and properties in declaration order (so `instructd schema hero` is the seed's JSON,
/// byte for byte, once pretty-printed alike).
pub fn response_schema<T: schemars::JsonSchema>() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.meta_schema = None;
    let mut schema = settings.into_generator().into_root_schema_for::<T>().to_value();
    if let Some(Value::Object(definitions)) = schema.get_mut("$defs") {
        for (name, definition) in definitions.iter_mut() {
            if let Value::Object(definition) = definition {
                definition.entry("title").or_insert_with(|| Value::String(name.clone()));
            }
        }
    }
    pydantic_key_order(&mut schema, false);
    schema
}

/// Sorts schema keywords alphabetically, as pydantic emits them, keeping the order of the
/// names inside `properties` and `$defs` (declaration order).
fn pydantic_key_order(value: &mut Value, names: bool) {
    match value {
        Value::Object(object) => {
            if !names {
                object.sort_keys();
            }
            for (key, child) in object.iter_mut() {
                let child_names = !names && (key == "properties" || key == "$defs");
                pydantic_key_order(child, child_names);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| pydantic_key_order(item, false)),
        _ => {}
    }
}

impl<E> EntityKind for Table<E>
where
    E: EntityTrait,
    E::Model: Generate + IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn title(&self) -> &str {
        &self.title
    }

    fn schema(&self) -> &Value {
        &self.schema
    }

    fn hydrate(&self, answer: &str) -> Result<Arc<dyn Record>, String> {
        let check = || {
            let answer = parse_json(answer)?;
            let violations = self.check.violations(&answer);
            if !violations.is_empty() {
                return Err(crate::validation::report(&violations));
            }
            let mut answer = answer;
            whole_numbers_as_integers(&mut answer);
            let mut model: E::Model = from_json(answer)?;
            model.hydrate();
            model.validate()?;
            Ok(model)
        };
        // The error is shown to the model and quoted in the job's failure: bounded, whatever
        // the answer quoted back.
        check().map(|model| Arc::new(Row::<E>(model)) as Arc<dyn Record>).map_err(|e: String| crate::text::message(&e))
    }
}

struct Row<E: EntityTrait>(E::Model);

impl<E> Record for Row<E>
where
    E: EntityTrait,
    E::Model: Generate + IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send,
{
    fn id(&self) -> Uuid {
        self.0.record_id()
    }

    fn to_json(&self) -> Value {
        serde_json::to_value(&self.0).expect("entity models serialize to JSON")
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn insert_rows<'a>(
        &'a self,
        rows: &'a [&'a dyn Record],
        txn: &'a DatabaseTransaction,
    ) -> BoxFuture<'a, Result<(), DbErr>> {
        let models: Vec<&E::Model> = rows
            .iter()
            .map(|row| &row.as_any().downcast_ref::<Self>().expect("rows of one entity are grouped together").0)
            .collect();
        Box::pin(async move {
            E::insert_many(models.iter().map(|model| (*model).clone().into_active_model()))
                .exec_without_returning(txn)
                .await?;
            for model in models {
                model.insert_children(txn).await?;
            }
            Ok(())
        })
    }
}

/// Parses the model's JSON answer into `T`, with an error that names the field and the
/// problem (e.g. `secret_name: field required`), fit to send back to the model. (A
/// generated entity's answer is also checked against its schema between the two steps:
/// [`parse_json`], then [`from_json`].)
pub fn parse_answer<T: serde::de::DeserializeOwned>(answer: &str) -> Result<T, String> {
    from_json(parse_json(answer)?)
}

/// Reads the model's answer as JSON.
///
/// Raw control characters inside strings (a newline typed into a name), which strict JSON
/// forbids but grammar-constrained local models emit, are escaped first. A string holding the
/// NUL character (`\u0000`), which Postgres cannot store, is a validation error like any
/// other, so that the model is asked again rather than the insert failing.
pub fn parse_json(answer: &str) -> Result<Value, String> {
    let answer = escape_control_characters(answer);
    let value: Value = serde_json::from_str(&answer).map_err(|error| describe_json_error(".", &error))?;
    // (Raw NULs were escaped above.)
    if answer.contains("\\u0000")
        && let Some(path) = crate::text::nul_path(&value)
    {
        let field = if path.is_empty() { "the answer".to_owned() } else { path };
        return Err(format!("{field}: must not contain the NUL character (\\u0000)"));
    }
    Ok(value)
}

/// Turns a JSON answer into `T`, naming the field that does not fit (a number too large for
/// its column, say, which the schema does not bound).
pub fn from_json<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(answer).map_err(|error| {
        let path = error.path().to_string();
        describe_json_error(&path, &error.into_inner())
    })
}

/// Writes `1e3` and `30.0` as the integers they are. A JSON schema's `integer` accepts
/// them, as pydantic does, and so must the `i32` behind it (serde would refuse a float).
/// (Everywhere in the answer: a JSON column keeps `30`, not `30.0`.)
fn whole_numbers_as_integers(value: &mut Value) {
    match value {
        Value::Number(number) if number.is_f64() => {
            let float = number.as_f64().unwrap_or(f64::NAN);
            // Within ±2^53 every whole float is exact, and fits an i64.
            if float.fract() == 0.0 && float.abs() <= 9_007_199_254_740_992.0 {
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(object) => object.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// `text` with every raw control character inside a JSON string escaped (`\n`, `\u0007`…).
fn escape_control_characters(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    let (mut in_string, mut backslash) = (false, false);
    for c in text.chars() {
        if in_string && c.is_control() && (c as u32) < 0x20 {
            match c {
                '\n' => escaped.push_str("\\n"),
                '\r' => escaped.push_str("\\r"),
                '\t' => escaped.push_str("\\t"),
                other => escaped.push_str(&format!("\\u{:04x}", other as u32)),
            }
            backslash = false;
            continue;
        }
        escaped.push(c);
        if in_string {
            match (c, backslash) {
                ('\\', false) => backslash = true,
                ('"', false) => in_string = false,
                _ => backslash = false,
            }
        } else if c == '"' {
            in_string = true;
        }
    }
    std::borrow::Cow::Owned(escaped)
}

fn describe_json_error(path: &str, error: &serde_json::Error) -> String {
    let message = error.to_string();
    // serde_json appends " at line L column C", which means nothing to the model.
    let message = message.split(" at line ").next().unwrap_or(&message);
    if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
        let field = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
        return format!("{field}: field required");
    }
    if error.is_syntax() || error.is_eof() {
        return format!("the answer is not valid JSON: {message}");
    }
    if path == "." { message.to_owned() } else { format!("{path}: {message}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entity::hero;

    #[test]
    fn a_missing_field_is_named() {
        let error = parse_answer::<hero::Model>(r#"{"name": "Superman"}"#).unwrap_err();
        assert_eq!(error, "secret_name: field required");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_field() {
        let error = parse_answer::<hero::Model>(r#"{"name": "a", "secret_name": "b", "age": "thirty"}"#).unwrap_err();
        assert!(error.starts_with("age: invalid type: string \"thirty\""), "{error}");
    }

    #[test]
    fn an_answer_is_checked_against_its_schema_listing_every_violation() {
        let app = crate::heroes::app();
        let hero = app.registry().get("hero").unwrap();
        let error = hero.hydrate(r#"{"name": "a", "age": "thirty"}"#).err().unwrap();
        let mut lines: Vec<&str> = error.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, [r#"age: must be an integer, got "thirty""#, "secret_name: field required"]);
        // A whole number written as a float is an integer, as JSON Schema and pydantic say.
        assert!(hero.hydrate(r#"{"name": "a", "secret_name": "b", "age": 3e1}"#).is_ok());
        assert!(hero.hydrate(r#"{"name": "a", "secret_name": "b", "age": 30.5}"#).is_err());
        // A value the schema allows but the column cannot hold is still named.
        let error = hero.hydrate(r#"{"name": "a", "secret_name": "b", "age": 10000000000}"#).err().unwrap();
        assert!(error.starts_with("age: invalid value: integer `10000000000`, expected i32"), "{error}");
        assert!(hero.hydrate(r#"{"name": "a", "secret_name": "b", "age": null}"#).is_ok());
    }

    /// The Rust side of `tests/pydantic/shapes.py` (only its schema is read).
    #[allow(dead_code)]
    mod shapes {
        use schemars::JsonSchema;

        #[derive(JsonSchema)]
        #[schemars(transform = entity::schema::pydantic_style)]
        pub struct Event {
            pub at: chrono::DateTime<chrono::Utc>,
            pub tags: Option<Vec<String>>,
            pub color: Color,
            pub address: Address,
            pub backup: Option<Address>,
            #[schemars(regex(pattern = r"^\S"), length(max = 5))]
            pub note: String,
        }

        #[derive(JsonSchema)]
        #[serde(rename_all = "lowercase")]
        pub enum Color {
            Red,
            Green,
        }

        #[derive(JsonSchema)]
        #[schemars(transform = entity::schema::pydantic_style)]
        pub struct Address {
            pub city: String,
        }
    }

    #[test]
    fn timestamps_optional_lists_enums_and_nested_models_are_written_as_pydantic_writes_them() {
        let pydantic: Value = serde_json::from_str(include_str!("../tests/pydantic/shapes.schema.json")).unwrap();
        assert_eq!(response_schema::<shapes::Event>(), pydantic);
    }

    #[test]
    fn broken_json_is_reported_as_such() {
        let error = parse_answer::<hero::Model>(r#"{"name": "a", "#).unwrap_err();
        assert!(error.starts_with("the answer is not valid JSON"), "{error}");
    }

    #[test]
    fn raw_control_characters_inside_strings_are_tolerated() {
        let model: hero::Model = parse_answer("{\"name\": \"Super\nman\", \"secret_name\": \"a\\\"\tb\"}").unwrap();
        assert_eq!(model.name, "Super\nman");
        assert_eq!(model.secret_name, "a\"\tb");
        // Outside strings they are whitespace, as JSON allows.
        assert!(parse_answer::<hero::Model>("{\n\"name\": \"a\",\n\"secret_name\": \"b\"}").is_ok());
    }

    #[test]
    fn a_nul_character_is_a_validation_error_naming_its_field() {
        let error = parse_answer::<hero::Model>(r#"{"name": "Super\u0000man", "secret_name": "b"}"#).unwrap_err();
        assert_eq!(error, r"name: must not contain the NUL character (\u0000)");
        // An escaped backslash followed by `u0000` is text, not NUL.
        assert!(parse_answer::<hero::Model>(r#"{"name": "a\\u0000", "secret_name": "b"}"#).is_ok());
    }

    #[test]
    fn trailing_text_after_the_object_is_not_valid_json() {
        let error = parse_answer::<hero::Model>(r#"{"name": "a", "secret_name": "b"} and more"#).unwrap_err();
        assert!(error.starts_with("the answer is not valid JSON: trailing characters"), "{error}");
    }

    #[test]
    fn a_server_owned_id_in_the_answer_is_ignored() {
        let sent = "00000000-0000-0000-0000-000000000001";
        let model: hero::Model =
            parse_answer(&format!(r#"{{"id": "{sent}", "name": "a", "secret_name": "b"}}"#)).unwrap();
        assert_ne!(model.id.to_string(), sent);
        assert_eq!(model.age, None);
    }
}
