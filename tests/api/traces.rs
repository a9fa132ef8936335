//! Traces across services: a request's W3C `traceparent` is the parent of its job's span; the
//! job, each model call (with the OpenTelemetry GenAI attributes) and the store are spans
//! exported over OTLP/HTTP to a receiver in the test; the completion event carries the job's
//! trace context on. The daemon is the real binary (its own process, its own subscriber).

use instructd::broker::publisher::header_text;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn with_traceparent(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), AMQPValue::LongString(LongString::from(traceparent)));
    headers.insert("tracestate".into(), AMQPValue::LongString(LongString::from("caller=yes")));
    BasicProperties::default().with_content_type("application/json".into()).with_headers(headers)
}

fn valid_hero() -> Value {
    tool_call_completion("Hero", r#"{"name": "Deadpond", "secret_name": "Dive Wilson"}"#)
}

/// Every span the collector received, from OTLP/HTTP JSON bodies.
async fn spans(collector: &MockServer) -> Vec<Value> {
    let mut spans = Vec::new();
    for request in collector.received_requests().await.unwrap_or_default() {
        assert_eq!(request.url.path(), "/v1/traces");
        let body: Value = serde_json::from_slice(&request.body).expect("OTLP/HTTP JSON");
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = attribute(&resource["resource"], "service.name");
            assert_eq!(service, Some(Value::from("instructd")), "{resource}");
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    spans
}

/// An attribute's value (`intValue` as a number, whichever way the encoder wrote it).
fn attribute(holder: &Value, key: &str) -> Option<Value> {
    let attribute = holder["attributes"].as_array()?.iter().find(|attribute| attribute["key"] == key)?;
    let value = &attribute["value"];
    if let Some(text) = value.get("stringValue") {
        return Some(text.clone());
    }
    match value.get("intValue")? {
        Value::String(number) => number.parse::<i64>().ok().map(Value::from),
        number => Some(number.clone()),
    }
}

fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let names: Vec<&Value> = spans.iter().map(|span| &span["name"]).collect();
    spans.iter().find(|span| span["name"] == name).unwrap_or_else(|| panic!("no span `{name}` among {names:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_spans_join_the_callers_trace_and_its_event_carries_it_on() {
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let endpoint = [("INSTRUCTD__TELEMETRY__OTLP_ENDPOINT", collector.uri())];
    let mut app = spawn_binary_with(&built_binary("instructd"), &endpoint).await;
    answer_always(&app.llm, valid_hero()).await;
    let request = request("hero", "Make a hero");

    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    app.publish_raw(&serde_json::to_vec(&request).unwrap(), with_traceparent(&caller)).await;
    let received = app.next_event().await;
    assert_eq!(received.routing_key, "job.succeeded.hero");
    let traceparent = header_text(received.properties.headers(), "traceparent").expect("the event has a traceparent");
    // Flushes the spans still buffered.
    app.stop().await;

    // The event carries the job's position in the caller's trace.
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE_ID, "01"), "{traceparent}");
    let job_span = parts[2];
    assert_ne!(job_span, CALLER_SPAN, "the job's own span, not the caller's");
    let spans = spans(&collector).await;
    let job = named(&spans, "job");
    assert_eq!(job["traceId"], TRACE_ID);
    assert_eq!(job["parentSpanId"], CALLER_SPAN, "the request's span is the job's parent");
    assert_eq!(job["spanId"], job_span, "the event's traceparent is the job span's");
    assert_eq!(attribute(job, "job_id"), Some(request["job_id"].clone()));
    assert_eq!(attribute(job, "entity"), Some(Value::from("hero")));
    assert_eq!(attribute(job, "messaging.system"), Some(Value::from("rabbitmq")));
    // The model call: a child of the job, with the GenAI attributes.
    let chat = named(&spans, "chat fake-model");
    assert_eq!((&chat["traceId"], &chat["parentSpanId"]), (&job["traceId"], &job["spanId"]));
    for (key, value) in [
        ("gen_ai.operation.name", Value::from("chat")),
        ("gen_ai.request.model", Value::from("fake-model")),
        ("gen_ai.response.model", Value::from("fake-model")),
        ("gen_ai.usage.input_tokens", Value::from(100)),
        ("gen_ai.usage.output_tokens", Value::from(20)),
        ("gen_ai.response.finish_reasons", Value::from("tool_calls")),
        ("instructd.provider", Value::from("default")),
    ] {
        assert_eq!(attribute(chat, key), Some(value), "{key} of {chat}");
    }
    let store = named(&spans, "store outcome");
    assert_eq!((&store["traceId"], &store["parentSpanId"]), (&job["traceId"], &job["spanId"]));
    assert_eq!(attribute(store, "db.system.name"), Some(Value::from("postgresql")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_collector_the_requests_trace_context_is_passed_on_unchanged() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, valid_hero()).await;
    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");

    app.publish_raw(&serde_json::to_vec(&request("hero", "Make a hero")).unwrap(), with_traceparent(&caller)).await;
    let received = app.next_event().await;

    let headers = received.properties.headers();
    assert_eq!(header_text(headers, "traceparent").as_deref(), Some(caller.as_str()));
    assert_eq!(header_text(headers, "tracestate").as_deref(), Some("caller=yes"));
    // A request without one: an event without one.
    app.publish(&request("hero", "Make another")).await;
    let received = app.next_event().await;
    assert_eq!(header_text(received.properties.headers(), "traceparent"), None);
    app.stop().await;
}
