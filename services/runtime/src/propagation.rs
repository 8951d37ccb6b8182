//! W3C trace-context propagation across gRPC and HTTP hops.
//!
//! Clients inject the current span's context into outgoing metadata ([`TraceContextInterceptor`]);
//! servers open their request span as a child of the incoming context ([`ServerSpan`]). Both go
//! through the global propagator that [`crate::telemetry::init`] installs, and do nothing when
//! none is installed.

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
};
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tower_http::trace::MakeSpan;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into gRPC metadata.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads propagation fields from HTTP headers (gRPC metadata travels as HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Injects the current span's trace context (`traceparent`, `tracestate`) into every outgoing call.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextInterceptor;

impl Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let context = Span::current().context();
        global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
        });
        Ok(request)
    }
}

/// The current span's W3C `traceparent`, to be saved with work that continues later.
pub fn current_traceparent() -> Option<String> {
    let context = Span::current().context();
    let mut fields = std::collections::HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut fields));
    fields.remove("traceparent")
}

/// Makes `span` continue the trace whose W3C `traceparent` was saved with work that continues
/// now (see [`current_traceparent`]). A missing or malformed value leaves the span a root.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let parent = context_of(traceparent);
    // A span without an OpenTelemetry layer cannot take a parent; that is fine in tests.
    let _ = span.set_parent(parent);
}

/// The trace context a W3C `traceparent` names.
fn context_of(traceparent: &str) -> opentelemetry::Context {
    let fields =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    global::get_text_map_propagator(|propagator| propagator.extract(&fields))
}

/// Links `span` to the trace whose W3C `traceparent` is given: for work done for several traces
/// at once (a batch), which can be the child of only one. A missing or malformed value adds
/// nothing.
pub fn link_trace(span: &Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt as _;
    if traceparent.is_empty() {
        return;
    }
    let linked = context_of(traceparent).span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// A channel to a peer service that carries trace context on every call.
pub type TracedChannel = InterceptedService<Channel, TraceContextInterceptor>;

/// How often a connection to a peer with calls in flight is pinged.
const PEER_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a ping may go unanswered before its connection is taken for dead.
const PEER_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a channel to a peer lazily: the first call connects, so services start in any order.
pub fn connect_lazy(url: &url::Url) -> Result<TracedChannel, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.as_str().trim_end_matches('/').to_owned())?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        // A connection whose peer vanished without closing it (a node lost, a partition) is
        // found by an unanswered ping and replaced, not used until TCP gives up (~15 min).
        .http2_keep_alive_interval(PEER_PING_INTERVAL)
        .keep_alive_timeout(PEER_PING_TIMEOUT)
        .connect_lazy();
    Ok(InterceptedService::new(channel, TraceContextInterceptor))
}

/// Opens each server request's span as a child of the caller's trace context.
#[derive(Clone, Copy, Debug)]
pub struct ServerSpan {
    protocol: &'static str,
}

impl ServerSpan {
    /// For gRPC servers: the span is named after the RPC path.
    pub const GRPC: Self = Self { protocol: "grpc" };
    /// For HTTP servers.
    pub const HTTP: Self = Self { protocol: "http" };
}

impl<B> MakeSpan<B> for ServerSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        // Named as OpenTelemetry's conventions have it: the RPC (`package.Service/Method`), or
        // the HTTP method and path; never the query, which may hold a webhook token.
        let path = request.uri().path();
        let name = if self.protocol == "grpc" {
            path.trim_start_matches('/').to_owned()
        } else {
            format!("{} {path}", request.method())
        };
        let span = tracing::info_span!(
            "request",
            otel.name = %name,
            otel.kind = "server",
            protocol = self.protocol,
            method = %request.method(),
            path = %path,
        );
        let parent = global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        // A span without an OpenTelemetry layer cannot take a parent; that is fine in tests.
        let _ = span.set_parent(parent);
        span
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A client span's context survives injection into metadata and extraction on the server.
    #[test]
    fn trace_context_round_trips_through_grpc_metadata() -> Result<(), Status> {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let client_span = tracing::info_span!("client");
            let client_trace = client_span.context().span().span_context().trace_id();
            let request =
                client_span.in_scope(|| TraceContextInterceptor.call(Request::new(())))?;
            let traceparent = request
                .metadata()
                .get("traceparent")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(
                traceparent.contains(&client_trace.to_string()),
                "{traceparent}"
            );

            let http_request = http::Request::builder()
                .uri("/leadrelay.v1.OrchestratorService/GetLead")
                .header("traceparent", traceparent)
                .body(())
                .map_err(|error| Status::internal(error.to_string()))?;
            let mut make_span = ServerSpan::GRPC;
            let server_span = make_span.make_span(&http_request);
            let server_trace = server_span.context().span().span_context().trace_id();
            assert_eq!(server_trace, client_trace);
            Ok(())
        })
    }
}
