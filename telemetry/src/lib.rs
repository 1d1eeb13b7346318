//! Wakegate's telemetry, shared by the interceptor and the controller: the log subscriber, and
//! OpenTelemetry traces exported over OTLP when the standard `OTEL_*` variables ask for them.
//!
//! Traces are on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
//! set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Everything else is
//! read by the OpenTelemetry SDK and exporter themselves, as the specification describes:
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`), the endpoints,
//! headers and timeouts, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` and the batch processor's `OTEL_BSP_*`.
//!
//! With traces off nothing is installed: [`tracer`] is `None`, which the hot paths check once,
//! and spans with the [`TARGET`] target have no subscriber layer interested in them, so their
//! macros do nothing.

pub mod context;

use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The `tracing` target of spans meant for OpenTelemetry (and never for the logs).
pub const TARGET: &str = "otel";

/// How logs are written.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, fields flattened.
    Json,
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans still queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Why telemetry could not start.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer, when traces are on.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Whether the environment asks for traces.
pub fn traces_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

impl Telemetry {
    /// Installs the global log subscriber (`RUST_LOG`, default `info`) and, when the
    /// environment asks for traces, the OTLP trace pipeline under `service` (unless
    /// `OTEL_SERVICE_NAME` names another). Must run inside a Tokio runtime: the exporter and
    /// the batch processor run on it. A second call installs nothing more.
    pub fn init(service: &'static str, format: LogFormat) -> Result<Self, Error> {
        let provider = if traces_configured() {
            Some(provider(service)?)
        } else {
            None
        };
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info"))
            // Trace spans are for the exporter, whatever RUST_LOG says.
            .add_directive(
                format!("{TARGET}=off")
                    .parse()
                    .map_err(|e| Error(format!("log filter: {e}")))?,
            );
        let ansi = std::io::stdout().is_terminal();
        let Some(provider) = provider else {
            // Traces off: the plain log subscriber, its filter global, so a disabled log
            // statement costs the hot path one level comparison.
            let logs = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi);
            let _ = match format {
                LogFormat::Text => logs.try_init(),
                LogFormat::Json => logs.json().flatten_event(true).try_init(),
            };
            return Ok(Self { provider: None });
        };
        let logs = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .boxed(),
        }
        .with_filter(filter);
        let tracer = provider.tracer(service);
        let _ = TRACER.set(tracer.clone());
        let traces = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
        let _ = tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init();
        tracing::info!("exporting traces over OTLP");
        Ok(Self {
            provider: Some(provider),
        })
    }

    /// Exports the spans still queued, and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "traces could not all be exported at shutdown");
            }
        }
    }
}

fn provider(service: &'static str) -> Result<SdkTracerProvider, Error> {
    // The protocol, endpoint, headers and timeout come from the OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|e| Error(format!("OTLP trace exporter: {e}")))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    resource = resource.with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}
