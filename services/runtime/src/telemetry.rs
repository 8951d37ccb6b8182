//! Logs and traces: one `tracing` subscriber per process with text or JSON lines on stderr, `RUST_LOG`
//! filtering, and an OpenTelemetry layer so that spans carry W3C trace context across services.

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, TelemetrySettings};

/// The default filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// Could not install the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("RUST_LOG: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// A subscriber was already installed in this process.
    #[error("logging was already set up in this process: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; flushes spans when dropped.
#[must_use = "dropping the guard stops tracing"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("tracing did not shut down cleanly: {error}");
        }
    }
}

/// Installs the process-wide subscriber and the W3C trace-context propagator.
///
/// `service_name` names the process in traces unless `OTEL_SERVICE_NAME` is set.
pub fn init(
    settings: &TelemetrySettings,
    service_name: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let service_name = settings
        .service_name
        .clone()
        .unwrap_or_else(|| service_name.to_owned());
    // Spans get real trace and span ids so that context propagates between services even when
    // nothing is exported.
    let provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("leadrelay"));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    match settings.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()?,
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::warn!(
            endpoint = %endpoint.origin().ascii_serialization(),
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this build does not export spans yet; trace context is still propagated"
        );
    }
    Ok(TelemetryGuard { provider })
}
