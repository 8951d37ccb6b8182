//! The gateway: turns Hana and Pipedrive webhooks into orchestrator gRPC calls. Stateless: it
//! answers 2xx only once the orchestrator has committed the call.

mod auth;
mod error;
mod hana_batches;
pub mod hana_body;
mod hana_stream;
mod pipedrive_body;
mod webhooks;

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use leadrelay_proto::v1::orchestrator_service_client::OrchestratorServiceClient;
use leadrelay_runtime::{
    ConfigError, Settings,
    propagation::{ServerSpan, TracedChannel, connect_lazy},
    shutdown::drain_bounded,
};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tower_http::trace::TraceLayer;

pub use auth::{BasicCredentials, TOKEN_HEADER};
pub use error::GatewayError;

/// The largest webhook body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long the gateway waits for the orchestrator, well inside Hana's 5 s.
pub const INGEST_DEADLINE: Duration = Duration::from_secs(3);

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayStartError {
    /// The orchestrator URL is unusable.
    #[error("LEADRELAY_ORCHESTRATOR_URL: {0}")]
    OrchestratorUrl(#[from] tonic::transport::Error),
    /// Serving failed.
    #[error("gateway server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// What the gateway checks and where it forwards to.
pub struct GatewayConfig {
    /// The secret Hana must present.
    pub hana_webhook_token: SecretString,
    /// The secret it replaces, accepted too while a rotation is under way.
    pub hana_webhook_token_previous: Option<SecretString>,
    /// The Basic-auth credentials Pipedrive must present; `None` turns the endpoint off.
    pub pipedrive_webhook: Option<BasicCredentials>,
    /// The orchestrator's address, for messages.
    pub orchestrator_url: url::Url,
}

impl GatewayConfig {
    /// The gateway's configuration from the settings; the Hana webhook token is required.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let hana_webhook_token = settings.hana.webhook_token.clone().ok_or_else(|| {
            ConfigError::required(
                "LEADRELAY_HANA_WEBHOOK_TOKEN",
                "by the gateway: the secret Hana puts in the webhook URL (`leadrelay up` generates one)",
            )
        })?;
        let pipedrive_webhook = match (
            &settings.pipedrive.webhook_user,
            &settings.pipedrive.webhook_password,
        ) {
            (Some(user), Some(password)) => {
                Some(BasicCredentials::new(user.clone(), password.clone()))
            }
            _ => None,
        };
        Ok(Self {
            hana_webhook_token,
            hana_webhook_token_previous: settings.hana.webhook_token_previous.clone(),
            pipedrive_webhook,
            orchestrator_url: settings.peers.orchestrator.clone(),
        })
    }
}

/// Shared state of the handlers.
pub(crate) struct AppState {
    config: GatewayConfig,
    /// Hana calls go on a stream, or in batches while none is open; see [`hana_stream`].
    hana_calls: hana_stream::HanaCalls,
    orchestrator: OrchestratorServiceClient<TracedChannel>,
    orchestrator_health: HealthClient<TracedChannel>,
}

/// The gateway's HTTP routes over a lazily connected orchestrator channel.
pub fn router(config: GatewayConfig) -> Result<Router, GatewayStartError> {
    let channel = connect_lazy(&config.orchestrator_url)?;
    let orchestrator = OrchestratorServiceClient::new(channel.clone());
    let state = Arc::new(AppState {
        hana_calls: hana_stream::HanaCalls::start(
            orchestrator.clone(),
            hana_batches::HanaBatches::start(orchestrator.clone()),
        ),
        orchestrator,
        orchestrator_health: HealthClient::new(channel),
        config,
    });
    Ok(Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/webhooks/hana", post(webhooks::hana_without_event))
        .route("/webhooks/hana/{event}", post(webhooks::hana))
        .route("/webhooks/pipedrive", post(webhooks::pipedrive))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(ServerSpan::HTTP))
        .with_state(state))
}

/// Serves the gateway on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayStartError> {
    let app = router(config)?;
    tracing::info!(
        addr = %leadrelay_runtime::telemetry::listening_addr(&listener),
        "gateway listening"
    );
    let draining = shutdown.clone();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move { draining.cancelled().await })
        .into_future();
    if let Some(result) = drain_bounded(server, &shutdown, "gateway").await {
        result?;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Liveness: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the orchestrator answers its health check as SERVING.
async fn readyz(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, GatewayError> {
    let mut health = state.orchestrator_health.clone();
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    let status = health
        .check(request)
        .await
        .map_err(|status| {
            GatewayError::NotReady(format!(
                "orchestrator at {} did not answer: {}",
                state.config.orchestrator_url,
                status.message()
            ))
        })?
        .into_inner()
        .status;
    if status != ServingStatus::Serving as i32 {
        return Err(GatewayError::NotReady(format!(
            "orchestrator at {} is not serving",
            state.config.orchestrator_url
        )));
    }
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({ "status": "ready" })),
    ))
}

async fn not_found() -> GatewayError {
    GatewayError::NotFound(
        "no such endpoint; webhooks go to POST /webhooks/hana/{event} or POST /webhooks/pipedrive"
            .to_owned(),
    )
}
