//! Trace context end to end (feature `opentelemetry`), in the [W3C Trace Context] format that
//! OpenTelemetry, Kafka consumers' instrumentations and most tracing backends share:
//!
//! 1. [`writer_headers`]: `add_new_event` stores the caller's current span context as the
//!    event's `traceparent` (and `tracestate`) headers, unless the caller set `traceparent`
//!    itself. The current span is the `tracing` span (through `tracing-opentelemetry`) when it
//!    carries an OpenTelemetry context, else OpenTelemetry's own current context.
//! 2. [`PublishSpan`]: the relay publishes each record inside a `PRODUCER` span named
//!    `<topic> publish` (OpenTelemetry's messaging conventions), a child of the writer's span,
//!    from the global tracer provider; the record's `traceparent` is that span's, so a
//!    consumer's span joins the same trace: writer → relay publish → consumer.
//!
//! [W3C Trace Context]: https://www.w3.org/TR/trace-context/

use std::collections::{BTreeMap, HashMap};

#[cfg(feature = "opentelemetry")]
pub(crate) use enabled::{writer_headers, PublishSpan};

#[cfg(not(feature = "opentelemetry"))]
pub(crate) use disabled::{writer_headers, PublishSpan};

/// The W3C headers this module reads and writes.
pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

/// `true` for a W3C trace context header name (ASCII case insensitive).
pub(crate) fn is_trace_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(TRACEPARENT) || name.eq_ignore_ascii_case(TRACESTATE)
}

#[cfg(not(feature = "opentelemetry"))]
mod disabled {
    use super::{BTreeMap, HashMap};

    /// Without the feature: nothing is captured.
    pub(crate) fn writer_headers(_: &BTreeMap<String, String>) -> Option<HashMap<String, String>> {
        None
    }

    /// Without the feature: no span; the row's headers go out as they are.
    pub(crate) struct PublishSpan;

    impl PublishSpan {
        pub(crate) fn start<'a>(
            _topic: &str,
            _key: &str,
            _event_id: &str,
            _headers: impl Iterator<Item = (&'a str, &'a str)>,
        ) -> Self {
            PublishSpan
        }

        pub(crate) fn headers(&self) -> HashMap<String, String> {
            HashMap::new()
        }

        pub(crate) fn end(self, _report: Result<(i32, i64), &str>) {}
    }
}

#[cfg(feature = "opentelemetry")]
mod enabled {
    use super::{is_trace_header, BTreeMap, HashMap, TRACEPARENT};
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
    use opentelemetry::{global, Context, KeyValue};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    /// The instrumentation scope of the relay's spans.
    const TRACER: &str = "outbox";

    /// The current span context as W3C headers, for an event whose `headers` do not set
    /// `traceparent` already (in any ASCII case); `None` when there is no sampled-or-not valid
    /// current span.
    pub(crate) fn writer_headers(
        headers: &BTreeMap<String, String>,
    ) -> Option<HashMap<String, String>> {
        // Any case: the relay reads trace headers ASCII case insensitively, so a caller's
        // `TraceParent` is theirs, and a second `traceparent` beside it would override it.
        if headers.keys().any(|k| k.eq_ignore_ascii_case(TRACEPARENT)) {
            return None;
        }
        let cx = current_context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut out = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        Some(out)
    }

    fn current_context() -> Context {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = tracing::Span::current().context();
        if cx.span().span_context().is_valid() {
            cx
        } else {
            Context::current()
        }
    }

    /// The relay's producer span of one record.
    pub(crate) struct PublishSpan {
        span: global::BoxedSpan,
        cx: Context,
    }

    impl PublishSpan {
        /// Starts the span as a child of the context in `headers` (the row's `traceparent` /
        /// `tracestate`; a root span when they are missing or malformed).
        pub(crate) fn start<'a>(
            topic: &str,
            key: &str,
            event_id: &str,
            headers: impl Iterator<Item = (&'a str, &'a str)>,
        ) -> Self {
            let carrier: HashMap<String, String> = headers
                .filter(|(k, _)| is_trace_header(k))
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect();
            let parent = TraceContextPropagator::new().extract(&carrier);
            let tracer = global::tracer(TRACER);
            let span = tracer
                .span_builder(format!("{topic} publish"))
                .with_kind(SpanKind::Producer)
                .with_attributes([
                    KeyValue::new("messaging.system", "kafka"),
                    KeyValue::new("messaging.operation.type", "publish"),
                    KeyValue::new("messaging.destination.name", topic.to_string()),
                    KeyValue::new("messaging.kafka.message.key", key.to_string()),
                    KeyValue::new("messaging.message.id", event_id.to_string()),
                ])
                .start_with_context(&tracer, &parent);
            let cx = parent.with_remote_span_context(span.span_context().clone());
            PublishSpan { span, cx }
        }

        /// The record's `traceparent` and `tracestate` for this span (`tracestate` may be absent).
        pub(crate) fn headers(&self) -> HashMap<String, String> {
            let mut out = HashMap::new();
            TraceContextPropagator::new().inject_context(&self.cx, &mut out);
            out
        }

        /// Ends the span with the delivery report: the partition and offset, or the error.
        pub(crate) fn end(mut self, report: Result<(i32, i64), &str>) {
            match report {
                Ok((partition, offset)) => {
                    self.span.set_attribute(KeyValue::new(
                        "messaging.destination.partition.id",
                        partition.to_string(),
                    ));
                    self.span
                        .set_attribute(KeyValue::new("messaging.kafka.offset", offset));
                }
                Err(e) => self.span.set_status(Status::error(e.to_string())),
            }
            self.span.end();
        }
    }
}
