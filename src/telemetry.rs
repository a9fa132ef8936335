//! Logs and traces: one subscriber for the process, JSON for a log stack or readable text for
//! a terminal, and, when `telemetry.otlp_endpoint` is set, OpenTelemetry spans exported over
//! OTLP/HTTP. Every job runs in a `job` span that records `job_id`, `entity` and `attempt` as
//! they become known (see `worker.rs`); the W3C trace context of its request's headers is that
//! span's parent, and its event carries the job's own ([`trace_context`]).

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{BrokerSettings, LogFormat, LogSettings, TelemetrySettings};
use crate::job::TraceContext;

/// The W3C header of the trace context's position: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header of vendors' trace data.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` passed on (W3C: vendors must propagate at least 512 characters; a
/// longer one is dropped rather than cut, which would corrupt it).
const MAX_TRACESTATE_BYTES: usize = 512;

/// Installs the global subscriber, logs only. `RUST_LOG`, when set, wins over `log.level`.
/// Logs go to stderr so that commands such as `instructd schema` keep stdout clean.
pub fn init(settings: &LogSettings) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(settings))
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    // A second init (tests build several apps in one process) is harmless: keep the first.
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

fn log_filter(settings: &LogSettings) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber with the traces of `telemetry` (none when its endpoint is
/// empty). The returned handle flushes the spans still buffered when it is shut down.
pub fn init_with_traces(settings: &LogSettings, telemetry: &TelemetrySettings) -> anyhow::Result<Traces> {
    if telemetry.otlp_endpoint.is_empty() {
        init(settings);
        return Ok(Traces(None));
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    // The exporter's HTTP client is reqwest's, over the process' TLS provider.
    crate::install_crypto_provider();
    let endpoint = format!("{}/v1/traces", telemetry.otlp_endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: cannot export there: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(telemetry.service_name.clone()).build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(telemetry.sample_ratio))))
        .with_resource(resource)
        .build();
    // Only instructd's own spans (the job, its model calls, its store) become trace spans,
    // whatever the log level: not the drivers' and the HTTP stack's; and no log event becomes
    // a span event (they quote answers and provider errors: the logs have them).
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("instructd"))
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("instructd") && *meta.level() <= Level::INFO
        }));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_span_events(FmtSpan::NONE);
    let logs = match settings.format {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).boxed(),
        LogFormat::Pretty => logs.compact().boxed(),
    };
    let installed =
        tracing_subscriber::registry().with(traces).with(logs.with_filter(log_filter(settings))).try_init().is_ok();
    if installed {
        Ok(Traces(Some(provider)))
    } else {
        // A subscriber was there first (a test process): these spans would go nowhere.
        let _ = provider.shutdown();
        Ok(Traces(None))
    }
}

/// The trace exporter, flushed when the daemon stops.
#[must_use = "spans still buffered are lost unless it is shut down"]
pub struct Traces(Option<SdkTracerProvider>);

impl Traces {
    /// Exports the spans still buffered (for at most a few seconds), then stops exporting.
    pub fn shutdown(self) {
        if let Some(provider) = self.0 {
            // The exporter blocks (its own HTTP client): not on the runtime's threads.
            let flushed = std::thread::spawn(move || provider.shutdown_with_timeout(Duration::from_secs(5))).join();
            if let Ok(Err(error)) = flushed {
                eprintln!("warning: the last spans could not be exported: {error}");
            }
        }
    }
}

/// A request's W3C trace context (its `traceparent` and `tracestate` headers) as the parent
/// of `span`, when the headers hold a valid one; and the context the job's messages carry
/// on: the span's own when traces are exported, else the request's, unchanged.
///
/// The span gets the messaging attributes of a consumed message (on the trace span only: the
/// logs, which show the span's fields on every line, stay as they were).
pub fn adopt_parent(
    span: &tracing::Span,
    headers: Option<&FieldTable>,
    broker: &BrokerSettings,
) -> Option<TraceContext> {
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", broker.request_queue.clone());
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let from_request = parent.span().span_context().is_valid();
    if from_request {
        let _ = span.set_parent(parent.clone());
    }
    let own = span.context();
    let context = if own.span().span_context().is_valid() {
        own
    } else if from_request {
        parent
    } else {
        return None;
    };
    let mut fields = Fields::default();
    TraceContextPropagator::new().inject_context(&context, &mut fields);
    Some(TraceContext {
        traceparent: fields.traceparent?,
        tracestate: fields.tracestate.filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE_BYTES),
    })
}

/// The AMQP headers, as the propagator reads them: text values only.
struct Headers<'a>(Option<&'a FieldTable>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.map(|headers| headers.inner().keys().map(|key| key.as_str()).collect()).unwrap_or_default()
    }
}

/// What the propagator writes.
#[derive(Default)]
struct Fields {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// `trace_context`'s headers, for a message about the job.
pub fn trace_context(trace: &TraceContext) -> impl Iterator<Item = (&'static str, &str)> {
    std::iter::once((TRACEPARENT, trace.traceparent.as_str()))
        .chain(trace.tracestate.as_deref().map(|s| (TRACESTATE, s)))
}

#[cfg(test)]
mod tests {
    use lapin::types::LongString;

    use super::*;

    fn broker() -> BrokerSettings {
        crate::config::Settings::load_from(None, Default::default()).unwrap().broker
    }

    fn headers(pairs: &[(&str, &str)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert((*key).into(), AMQPValue::LongString(LongString::from(value.to_string())));
        }
        table
    }

    #[test]
    fn a_requests_trace_context_is_passed_on_when_no_traces_are_exported() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let table = headers(&[(TRACEPARENT, parent), (TRACESTATE, "congo=t61rcWkgMzE")]);
        let trace = adopt_parent(&tracing::Span::none(), Some(&table), &broker()).unwrap();
        assert_eq!(trace.traceparent, parent);
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn a_malformed_or_absent_trace_context_is_none() {
        for value in ["", "00-zz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"] {
            assert_eq!(
                adopt_parent(&tracing::Span::none(), Some(&headers(&[(TRACEPARENT, value)])), &broker()),
                None,
                "{value}"
            );
        }
        assert_eq!(adopt_parent(&tracing::Span::none(), None, &broker()), None);
        let long = format!("a={}", "x".repeat(600));
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = adopt_parent(
            &tracing::Span::none(),
            Some(&headers(&[(TRACEPARENT, parent), (TRACESTATE, &long)])),
            &broker(),
        );
        assert_eq!(trace.unwrap().tracestate, None, "an oversized tracestate is dropped, not cut");
    }
}
