//! W3C trace context (`traceparent` / `tracestate`) in HTTP headers and in wake events.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The context a request's `traceparent` / `tracestate` carry (empty when they carry none, or
/// an invalid one: a new trace is then started).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Sets `traceparent` (and `tracestate`) to name `span` as the parent.
pub fn inject(span: &SpanContext, headers: &mut http::HeaderMap) {
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// `span` as a `traceparent` value, for carrying it outside HTTP headers.
pub fn traceparent(span: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    )
}

/// The span a `traceparent` value names, if it is a valid one.
pub fn from_traceparent(value: &str) -> Option<SpanContext> {
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", http::HeaderValue::from_str(value).ok()?);
    let cx = extract(&headers);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_survives_the_round_trip() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = from_traceparent(value).expect("valid");
        assert_eq!(traceparent(&span), value);
        let mut headers = http::HeaderMap::new();
        inject(&span, &mut headers);
        assert_eq!(headers["traceparent"], value);
        assert_eq!(
            extract(&headers).span().span_context().trace_id(),
            span.trace_id()
        );
    }

    #[test]
    fn an_invalid_traceparent_names_nothing() {
        assert!(
            from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(from_traceparent("garbage").is_none());
        assert!(from_traceparent("bad\nheader").is_none());
    }
}
