//! Webhook endpoints: authenticate, bound the body, hand the call to the orchestrator, and answer
//! 2xx only once it says the call is stored.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
};
use leadrelay_proto::v1::{
    HanaEventKind, IngestHanaEventRequest, UnparsedBody, ingest_hana_event_request::Body,
};
use leadrelay_runtime::propagation::current_traceparent;
use serde::{Deserialize, Serialize};

use crate::{
    AppState, INGEST_DEADLINE,
    auth::{TOKEN_HEADER, secret_matches},
    error::GatewayError,
    hana_body::parse_hana_body,
    pipedrive_body::parse_pipedrive_body,
};

/// `?token=` on Hana webhook URLs.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenQuery {
    token: Option<String>,
}

/// The 2xx body.
#[derive(Debug, Serialize)]
pub(crate) struct Accepted {
    status: &'static str,
    event_id: String,
    duplicate: bool,
}

impl Accepted {
    fn new(event_id: String, duplicate: bool) -> Json<Self> {
        Json(Self {
            status: "accepted",
            event_id,
            duplicate,
        })
    }
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, GatewayError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::TooLarge
        } else {
            GatewayError::BadBody(rejection.body_text())
        }
    })
}

/// `POST /webhooks/hana/{event}`.
pub(crate) async fn hana(
    State(state): State<Arc<AppState>>,
    Path(event): Path<String>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, GatewayError> {
    counted("hana", hana_call(state, Some(event), query, headers, body)).await
}

/// Runs a webhook's handling and counts its outcome and answer time in the metrics.
async fn counted(
    source: &str,
    handling: impl std::future::Future<Output = Result<Json<Accepted>, GatewayError>>,
) -> Result<Json<Accepted>, GatewayError> {
    let started = std::time::Instant::now();
    let answer = handling.await;
    let outcome = match &answer {
        Ok(accepted) if accepted.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(error) => error.outcome(),
    };
    leadrelay_runtime::metrics::metrics().webhook(source, outcome, started.elapsed());
    answer
}

/// `POST /webhooks/hana`: the event kind comes from the body's `event_name`.
pub(crate) async fn hana_without_event(
    State(state): State<Arc<AppState>>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, GatewayError> {
    counted("hana", hana_call(state, None, query, headers, body)).await
}

async fn hana_call(
    state: Arc<AppState>,
    event: Option<String>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, GatewayError> {
    let presented = query.ok().and_then(|Query(query)| query.token).or_else(|| {
        headers
            .get(TOKEN_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    });
    let authenticated = presented.as_deref().is_some_and(|token| {
        // Both are compared, so the answer takes as long whichever one matches.
        let current = secret_matches(token, &state.config.hana_webhook_token);
        let previous = state
            .config
            .hana_webhook_token_previous
            .as_ref()
            .is_some_and(|previous| secret_matches(token, previous));
        if previous && !current {
            tracing::info!(
                "a Hana webhook came with the previous token: Hana's webhook URL still has it"
            );
        }
        current || previous
    });
    if !authenticated {
        return Err(GatewayError::Unauthorized(
            "missing or wrong webhook token: put it in ?token= or the X-LeadRelay-Token header",
        ));
    }
    let kind = match event {
        None => HanaEventKind::Unspecified,
        Some(event) => HanaEventKind::from_event_name(&event).ok_or_else(|| {
            GatewayError::NotFound(format!(
                "unknown Hana event '{event}'; use lead.created, lead.updated, lead.deleted, opportunity.created, opportunity.updated or opportunity.deleted (ticket.* also accepted)"
            ))
        })?,
    };
    let raw_body = read_body(body)?;
    let call = hana_ingest_request(
        kind.into(),
        raw_body,
        Some(SystemTime::now().into()),
        // The call travels in a batch: its storing joins this webhook's trace through this.
        current_traceparent().unwrap_or_default(),
    );
    let answer = state
        .hana_calls
        .ingest(call)
        .await
        .map_err(|status| GatewayError::from_ingest_status(&status))?;
    Ok(Accepted::new(answer.event_id, answer.duplicate))
}

/// The orchestrator call for a Hana webhook: the body parsed, and kept exactly as received. An
/// unparseable body is still stored (in quarantine, with the reason) and acknowledged.
pub(crate) fn hana_ingest_request(
    kind: i32,
    raw_body: Bytes,
    received_at: Option<prost_types::Timestamp>,
    traceparent: String,
) -> IngestHanaEventRequest {
    let parsed = match parse_hana_body(&raw_body) {
        Ok(webhook) => Body::Webhook(webhook),
        Err(error) => Body::Unparsed(UnparsedBody {
            reason: error.to_string(),
        }),
    };
    IngestHanaEventRequest {
        kind,
        raw_body,
        body: Some(parsed),
        received_at,
        traceparent,
    }
}

/// `POST /webhooks/pipedrive`.
pub(crate) async fn pipedrive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, GatewayError> {
    counted("pipedrive", pipedrive_call(state, headers, body)).await
}

async fn pipedrive_call(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, GatewayError> {
    let Some(credentials) = &state.config.pipedrive_webhook else {
        return Err(GatewayError::NotFound(
            "the Pipedrive webhook endpoint is off: set LEADRELAY_PIPEDRIVE_WEBHOOK_USER and LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD".to_owned(),
        ));
    };
    let authenticated = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| credentials.matches_header(value));
    if !authenticated {
        return Err(GatewayError::BasicAuthRequired(
            "missing or wrong Basic auth: use the user and password registered with the Pipedrive webhook",
        ));
    }
    let raw_body = read_body(body)?;

    let mut request = tonic::Request::new(parse_pipedrive_body(&raw_body));
    request.set_timeout(INGEST_DEADLINE);
    let answer = state
        .orchestrator
        .clone()
        .ingest_pipedrive_event(request)
        .await
        .map_err(|status| GatewayError::from_ingest_status(&status))?
        .into_inner();
    Ok(Accepted::new(answer.event_id, answer.duplicate))
}
