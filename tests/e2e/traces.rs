//! One trace per lead: a webhook sent through `leadrelay up` reaches an in-process OTLP collector
//! as one trace, from the gateway through the orchestrator, the stored job and the adapter to
//! the call to Pipedrive, every parent link intact; and every log line written on the way carries
//! the trace id.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use leadrelay_testkit::pipedrive::crm::Crm;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::{Span, span::SpanKind},
};
use prost::Message as _;
use wiremock::MockServer;

use crate::{
    hana_ingest::SEED_SAMPLE,
    support::{Error, TestResult, Up},
};

/// The header a hosted collector would take its credential from.
const COLLECTOR_KEY_HEADER: &str = "x-collector-key";

/// The credential, which no log line may show.
const COLLECTOR_KEY: &str = "otlp-collector-secret-41";

/// The spans a collector received, from any protocol, and the credentials they came with.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>, Arc<Mutex<Vec<String>>>);

impl Received {
    fn key(&self, key: Option<&str>) {
        if let Ok(mut keys) = self.1.lock() {
            keys.push(key.unwrap_or_default().to_owned());
        }
    }

    fn keys(&self) -> Vec<String> {
        self.1.lock().map(|keys| keys.clone()).unwrap_or_default()
    }

    fn add(&self, request: ExportTraceServiceRequest) {
        let spans = request
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        if let Ok(mut received) = self.0.lock() {
            received.extend(spans);
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().map(|spans| spans.clone()).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.key(
            request
                .metadata()
                .get(COLLECTOR_KEY_HEADER)
                .and_then(|value| value.to_str().ok()),
        );
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on a random port.
async fn grpc_collector(received: Received) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

/// An OTLP/HTTP (protobuf) collector on a random port.
async fn http_collector(received: Received) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                received.key(
                    headers
                        .get(COLLECTOR_KEY_HEADER)
                        .and_then(|value| value.to_str().ok()),
                );
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        received.add(request);
                        (
                            axum::http::StatusCode::OK,
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::IntValue(number) => number.to_string(),
        any_value::Value::BoolValue(flag) => flag.to_string(),
        other => format!("{other:?}"),
    })
}

/// The one span of `trace` named `name`.
fn the_span<'a>(trace: &'a [Span], name: &str) -> Result<&'a Span, Error> {
    let mut named = trace.iter().filter(|span| span.name == name);
    let span = named.next().ok_or_else(|| {
        let names: Vec<&str> = trace.iter().map(|span| span.name.as_str()).collect();
        format!("no span {name} in the trace: {names:?}")
    })?;
    if named.next().is_some() {
        return Err(format!("more than one span {name} in the trace").into());
    }
    Ok(span)
}

fn assert_child(child: &Span, parent: &Span) {
    assert_eq!(
        hex(&child.parent_span_id),
        hex(&parent.span_id),
        "{} is not a child of {}",
        child.name,
        parent.name
    );
}

/// Sends the seed lead through `leadrelay up` exporting over `protocol` to `collector`, and
/// checks the trace the collector receives.
async fn one_webhook_is_one_trace(
    protocol: &str,
    collector: SocketAddr,
    received: Received,
) -> TestResult {
    let pipedrive_fake = MockServer::start().await;
    Crm::new().mount(&pipedrive_fake).await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let endpoint = format!("http://{collector}");
    let collector_headers = format!("{COLLECTOR_KEY_HEADER}={COLLECTOR_KEY}");
    let up = Up::start(
        folder.path(),
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", "pd-trace-token-1"),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_LOG_FORMAT", "json"),
            // Everything, the OpenTelemetry crates' own debug lines included.
            ("RUST_LOG", "debug"),
            ("OTEL_EXPORTER_OTLP_HEADERS", &collector_headers),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )?;

    let answer = reqwest::Client::new()
        .post(up.hana_webhook("lead.created"))
        .body(SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    let answer: serde_json::Value = answer.json().await?;
    let event_id = answer["event_id"].as_str().unwrap_or_default().to_owned();
    assert!(!event_id.is_empty(), "{answer}");

    // The webhook's trace is the one with the gateway's span; it is complete once the outbound
    // call that creates the person has ended and the job's span after it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let spans = received.spans();
        let root = spans
            .iter()
            .find(|span| span.name == "POST /webhooks/hana/lead.created");
        if let Some(root) = root {
            let trace: Vec<Span> = spans
                .iter()
                .filter(|span| span.trace_id == root.trace_id)
                .cloned()
                .collect();
            let job_ended = trace
                .iter()
                .any(|span| span.name == "sync pipedrive upsert_lead");
            let created = trace.iter().any(|span| span.name == "POST pipedrive");
            if job_ended && created {
                break trace;
            }
        }
        if Instant::now() > deadline {
            let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
            return Err(format!(
                "the collector never got the whole trace; spans: {names:?}\nlogs:\n{}",
                up.logs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let gateway = the_span(&trace, "POST /webhooks/hana/lead.created")?;
    let ingest = the_span(&trace, "ingest hana event")?;
    let job = the_span(&trace, "sync pipedrive upsert_lead")?;
    let adapter = the_span(&trace, "leadrelay.v1.CrmSyncService/UpsertLead")?;

    assert!(
        gateway.parent_span_id.is_empty(),
        "the webhook starts the trace"
    );
    assert_eq!(gateway.kind, SpanKind::Server as i32);
    // The gateway hands the call over on a stream or in a batch; either carries the call's own
    // trace context.
    assert_child(ingest, gateway);
    assert_child(job, ingest);
    assert_child(adapter, job);
    assert_eq!(adapter.kind, SpanKind::Server as i32);

    assert_eq!(
        attribute(ingest, "event_id").as_deref(),
        Some(event_id.as_str())
    );
    assert_eq!(
        attribute(ingest, "application_id").as_deref(),
        Some("dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2")
    );
    assert_eq!(
        attribute(job, "event_id").as_deref(),
        Some(event_id.as_str())
    );
    assert_eq!(attribute(job, "sync.target").as_deref(), Some("pipedrive"));
    assert_eq!(attribute(job, "outcome").as_deref(), Some("done"));
    let remote_ids = attribute(job, "remote_ids").unwrap_or_default();
    assert!(
        remote_ids.starts_with("REMOTE_KIND_PIPEDRIVE_PERSON="),
        "{remote_ids}"
    );

    // The call went on the gateway's stream of Hana calls, which opens when the gateway starts,
    // or in a batch if it came before the stream was open. A batch is a trace of its own (the
    // gateway's client span, the orchestrator's server span under it), linked to the webhook's
    // span; the stream has no span of its own (it lasts as long as the gateway does), and each
    // call's storing joins its webhook's trace, as asserted above.
    let spans = received.spans();
    if let Ok(batch) = the_span(&spans, "ingest hana batch") {
        assert_ne!(batch.trace_id, gateway.trace_id);
        assert_eq!(batch.kind, SpanKind::Client as i32);
        assert!(
            batch
                .links
                .iter()
                .any(|link| link.trace_id == gateway.trace_id && link.span_id == gateway.span_id),
            "the batch links to the webhook's span: {:?}",
            batch.links
        );
        let batch_call = the_span(&spans, "leadrelay.v1.OrchestratorService/IngestHanaEvents")?;
        assert_child(batch_call, batch);
        assert_eq!(batch_call.kind, SpanKind::Server as i32);
    }

    // The adapter's calls to Pipedrive are client spans under its request span, and each one
    // handed the trace on to Pipedrive.
    let by_id: HashMap<Vec<u8>, &Span> = trace
        .iter()
        .map(|span| (span.span_id.clone(), span))
        .collect();
    let outbound: Vec<&Span> = trace
        .iter()
        .filter(|span| attribute(span, "crm.system").as_deref() == Some("pipedrive"))
        .collect();
    assert!(
        outbound.iter().any(|span| span.name == "POST pipedrive"),
        "no call creating the person in the trace"
    );
    for call in &outbound {
        assert_eq!(call.kind, SpanKind::Client as i32);
        assert_eq!(
            attribute(call, "server.address").as_deref(),
            Some("127.0.0.1")
        );
        let mut ancestor = by_id.get(&call.parent_span_id);
        while let Some(span) = ancestor
            && span.span_id != adapter.span_id
        {
            ancestor = by_id.get(&span.parent_span_id);
        }
        assert!(ancestor.is_some(), "{} is not under the adapter", call.name);
    }
    let trace_id = hex(&gateway.trace_id);
    let outbound_ids: Vec<String> = outbound.iter().map(|span| hex(&span.span_id)).collect();
    let sent = pipedrive_fake.received_requests().await.unwrap_or_default();
    let traced: Vec<&str> = sent
        .iter()
        .filter_map(|request| request.headers.get("traceparent")?.to_str().ok())
        .filter(|traceparent| traceparent.contains(&trace_id))
        .collect();
    assert_eq!(traced.len(), outbound.len(), "{traced:?}");
    for traceparent in traced {
        // `00-{trace id}-{parent span id}-{flags}`: the parent is the outbound call's span.
        let parent = traceparent.split('-').nth(2).unwrap_or_default();
        assert!(outbound_ids.iter().any(|id| id == parent), "{traceparent}");
    }

    // The exporter sent its credential, and no log line shows it.
    let keys = received.keys();
    assert!(
        !keys.is_empty() && keys.iter().all(|key| key == COLLECTOR_KEY),
        "{keys:?}"
    );
    let logs = up.logs();
    assert!(
        !logs.contains(COLLECTOR_KEY),
        "the collector's credential is in the logs"
    );

    // Every log line written inside the trace names it.
    let traced_lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["trace_id"] == trace_id.as_str())
        .collect();
    assert!(
        traced_lines
            .iter()
            .any(|line| line["message"] == "pipedrive call"),
        "no debug line of the Pipedrive call carries the trace id:\n{logs}"
    );
    for line in logs.lines() {
        let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if line.get("span").is_some() {
            assert!(
                line["trace_id"].as_str().is_some_and(|id| id.len() == 32),
                "a line written in a span has no trace id: {line}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_is_one_trace_over_otlp_grpc() -> TestResult {
    let received = Received::default();
    let collector = grpc_collector(received.clone()).await?;
    one_webhook_is_one_trace("grpc", collector, received).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_is_one_trace_over_otlp_http() -> TestResult {
    let received = Received::default();
    let collector = http_collector(received.clone()).await?;
    one_webhook_is_one_trace("http/protobuf", collector, received).await
}
