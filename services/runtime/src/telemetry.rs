//! Logs and traces: one `tracing` subscriber per process with text or JSON lines on stderr, each
//! line carrying the trace and span id it was written in, `RUST_LOG` filtering, and an
//! OpenTelemetry layer so that spans carry W3C trace context across services and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, reach an OTLP collector.

use std::{fmt, sync::Arc, time::Duration};

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::filter_fn,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{self, Writer},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};
use url::Url;

use crate::config::{LogFormat, OtlpProtocol, TelemetrySettings};

/// The default filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// How long one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Could not install the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("RUST_LOG: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// A subscriber was already installed in this process.
    #[error("logging was already set up in this process: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
    /// The OTLP exporter could not be built from the settings.
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export to {endpoint}: {reason}")]
    Exporter {
        /// The collector, without credentials.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The exporter's own runtime could not start.
    #[error("cannot start the trace exporter's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Keeps the tracer provider alive; exports the spans still buffered when dropped.
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

/// Installs the process-wide subscriber and the W3C trace-context propagator, and exports spans
/// to `settings.otlp_endpoint` when it is set.
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
    // Spans get real trace and span ids so that context propagates between services and log
    // lines carry trace ids even when nothing is exported.
    let mut provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build());
    if let Some(endpoint) = &settings.otlp_endpoint {
        provider = provider.with_batch_exporter(OtlpExport::new(endpoint, settings.otlp_protocol)?);
    }
    let provider = provider.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("leadrelay"));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    // No colours: the ids are added to the formatted line, and log pipelines want plain text.
    let fmt_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let no_exporter_secrets = filter_fn(|metadata| !leaks_exporter_secrets(metadata));
    match settings.log_format {
        LogFormat::Text => registry
            .with(
                fmt_layer
                    .with_target(false)
                    .event_format(WithTraceIds::text(format::format().with_target(false)))
                    .with_filter(no_exporter_secrets),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt_layer
                    .json()
                    .event_format(WithTraceIds::json(
                        format::format()
                            .json()
                            .flatten_event(true)
                            .with_current_span(true),
                    ))
                    .with_filter(no_exporter_secrets),
            )
            .try_init()?,
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(
            endpoint = %redacted(endpoint),
            protocol = ?settings.otlp_protocol,
            "exporting traces over OTLP"
        );
    }
    Ok(TelemetryGuard { provider })
}

/// The address `listener` took, as the "listening" log lines show it (`127.0.0.1:50051`): with
/// a port of 0 in the settings, the log is where an operator or a test learns the port.
pub fn listening_addr(listener: &tokio::net::TcpListener) -> String {
    listener.local_addr().map_or_else(
        |error| format!("unknown ({error})"),
        |addr| addr.to_string(),
    )
}

/// Whether an event may carry the exporter's credentials: the OTLP exporter's own debug lines
/// print the headers it sends (`OTEL_EXPORTER_OTLP_HEADERS`, often an API key), so the
/// OpenTelemetry crates are logged at info and above only, whatever `RUST_LOG` says.
fn leaks_exporter_secrets(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target().starts_with("opentelemetry") && *metadata.level() > tracing::Level::INFO
}

/// The collector's address with any user, password, query or fragment left out.
fn redacted(endpoint: &Url) -> String {
    format!(
        "{}{}",
        endpoint.origin().ascii_serialization(),
        endpoint.path()
    )
}

/// The OTLP exporter, driven by a runtime of its own.
///
/// The SDK's batch processor exports from a plain thread, where the gRPC and HTTP clients find
/// no Tokio reactor; the export runs on a one-thread runtime owned here instead, which also keeps
/// the collector's connection independent of the service's own runtime during shutdown.
#[derive(Debug)]
struct OtlpExport {
    exporter: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OtlpExport {
    fn new(endpoint: &Url, protocol: OtlpProtocol) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        let build_error = |reason: &dyn std::fmt::Display| TelemetryError::Exporter {
            endpoint: redacted(endpoint),
            reason: reason.to_string(),
        };
        // The gRPC channel starts its connection task on the runtime it is built in.
        let _entered = runtime.enter();
        let exporter = match protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|error| build_error(&error))?,
            OtlpProtocol::HttpProtobuf => {
                // As the specification has it: the base endpoint gets the signal's path.
                let traces = format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'));
                let client = reqwest::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|error| build_error(&error))?;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(traces)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|error| build_error(&error))?
            }
        };
        drop(_entered);
        Ok(Self {
            exporter: Arc::new(exporter),
            runtime: Some(runtime),
        })
    }
}

impl SpanExporter for OtlpExport {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let exporter = Arc::clone(&self.exporter);
        let exported = self
            .runtime
            .as_ref()
            .map(|runtime| runtime.spawn(async move { exporter.export(batch).await }));
        async move {
            match exported {
                Some(handle) => handle.await.unwrap_or_else(|error| {
                    Err(OTelSdkError::InternalFailure(format!(
                        "the export task failed: {error}"
                    )))
                }),
                None => Err(OTelSdkError::AlreadyShutdown),
            }
        }
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        if let Some(runtime) = self.runtime.take() {
            // Never blocks, so it is safe on any thread, inside a runtime or not.
            runtime.shutdown_background();
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        // The provider hands the resource over before the first export, while this is the only
        // owner of the exporter.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

impl Drop for OtlpExport {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Formats each event with the inner format, then adds the trace and span id of the span the
/// event happened in, so that every line written while handling a webhook or running a job can
/// be found from its trace (and the trace from any line).
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<F> WithTraceIds<F> {
    fn text(inner: F) -> Self {
        Self { inner, json: false }
    }

    fn json(inner: F) -> Self {
        Self { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = context.parent_span().and_then(|span| {
            let extensions = span.extensions();
            let data = extensions.get::<OtelData>()?;
            Some((data.trace_id()?, data.span_id()?))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(context, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(context, Writer::new(&mut line), event)?;
        // Both formats end the line with a newline; JSON closes its object just before it.
        let end = line.trim_end_matches('\n').len();
        let (body, tail) = line.split_at(end);
        if self.json {
            let Some(object) = body.strip_suffix('}') else {
                return writer.write_str(&line);
            };
            write!(
                writer,
                "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}{tail}"
            )
        } else {
            write!(writer, "{body} trace_id={trace_id} span_id={span_id}{tail}")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut captured) = self.0.lock() {
                captured.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|bytes| bytes.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Writes one line outside any span and one inside, returning the lines and the span's ids.
    fn log_two_lines(json: bool) -> (Vec<String>, String, String) {
        let provider = SdkTracerProvider::builder().build();
        let captured = Captured::default();
        let fmt_layer = tracing_subscriber::fmt::layer()
            .with_writer(captured.clone())
            .with_ansi(false);
        let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let registry = tracing_subscriber::registry().with(otel_layer);
        let ids = |span: &tracing::Span| {
            let context = span.context();
            let span_context = context.span().span_context().clone();
            (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
            )
        };
        let (trace_id, span_id) = if json {
            let subscriber = registry.with(fmt_layer.json().event_format(WithTraceIds::json(
                format::format().json().flatten_event(true),
            )));
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!("outside");
                let span = tracing::info_span!("job", job_id = "j-1");
                span.in_scope(|| tracing::info!(target_system = "pipedrive", "inside \"quoted\""));
                ids(&span)
            })
        } else {
            let subscriber =
                registry.with(fmt_layer.event_format(WithTraceIds::text(format::format())));
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!("outside");
                let span = tracing::info_span!("job", job_id = "j-1");
                span.in_scope(|| tracing::info!(target_system = "pipedrive", "inside"));
                ids(&span)
            })
        };
        (captured.lines(), trace_id, span_id)
    }

    #[test]
    fn json_lines_inside_a_span_carry_its_trace_and_span_id() -> Result<(), serde_json::Error> {
        let (lines, trace_id, span_id) = log_two_lines(true);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let outside: serde_json::Value = serde_json::from_str(&lines[0])?;
        assert_eq!(outside["message"], "outside", "{outside}");
        assert!(outside.get("trace_id").is_none(), "{outside}");
        let inside: serde_json::Value = serde_json::from_str(&lines[1])?;
        assert_eq!(inside["message"], "inside \"quoted\"", "{inside}");
        assert_eq!(inside["target_system"], "pipedrive", "{inside}");
        assert_eq!(inside["trace_id"], trace_id.as_str(), "{inside}");
        assert_eq!(inside["span_id"], span_id.as_str(), "{inside}");
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "0".repeat(32));
        Ok(())
    }

    #[test]
    fn text_lines_inside_a_span_end_with_its_trace_and_span_id() {
        let (lines, trace_id, span_id) = log_two_lines(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!lines[0].contains("trace_id="), "{}", lines[0]);
        assert!(
            lines[1].ends_with(&format!(
                "inside target_system=\"pipedrive\" trace_id={trace_id} span_id={span_id}"
            )),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn the_exporters_debug_lines_are_never_written() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(captured.clone())
                .with_filter(filter_fn(|metadata| !leaks_exporter_secrets(metadata))),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "opentelemetry-otlp", headers = "x-api-key=secret", "TonicChannelBuilt");
            tracing::warn!(target: "opentelemetry_sdk", "export failed");
            tracing::debug!(target: "leadrelay_pipedrive", "pipedrive call");
        });
        let lines = captured.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            !lines.iter().any(|line| line.contains("secret")),
            "{lines:?}"
        );
    }

    #[test]
    fn the_collector_address_is_logged_without_credentials() -> Result<(), url::ParseError> {
        let endpoint = Url::parse("https://user:secret@collector.example:4318/otlp?key=secret")?;
        assert_eq!(redacted(&endpoint), "https://collector.example:4318/otlp");
        Ok(())
    }
}
