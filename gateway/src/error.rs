//! Every way a gateway call can fail, mapped once to an HTTP status and a JSON `{"error": …}` body.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// A failed webhook or probe call.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The caller did not present the right secret; nothing was stored.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Pipedrive's Basic auth was missing or wrong; nothing was stored.
    #[error("{0}")]
    BasicAuthRequired(&'static str),
    /// The path names no endpoint or event.
    #[error("{0}")]
    NotFound(String),
    /// The body is larger than the limit.
    #[error("the body is larger than {limit} bytes", limit = crate::MAX_BODY_BYTES)]
    TooLarge,
    /// The body could not be read.
    #[error("cannot read the body: {0}")]
    BadBody(String),
    /// The orchestrator could not store the call; the sender should retry.
    #[error("{0}")]
    Unavailable(String),
    /// The orchestrator is not ready.
    #[error("{0}")]
    NotReady(String),
    /// The orchestrator rejected the call.
    #[error("{0}")]
    Rejected(String),
}

impl GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) | Self::BasicAuthRequired(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) | Self::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rejected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `outcome` label of the call in `leadrelay_webhooks_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) | Self::BasicAuthRequired(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::TooLarge => "too_large",
            Self::BadBody(_) => "bad_body",
            Self::Unavailable(_) | Self::NotReady(_) => "unavailable",
            Self::Rejected(_) => "rejected",
        }
    }

    /// Maps an orchestrator answer. Anything but a clear rejection means "not stored, retry".
    pub(crate) fn from_ingest_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        let message = format!(
            "the orchestrator did not store the call: {}",
            status.message()
        );
        match status.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied => {
                Self::Rejected(message)
            }
            _ => Self::Unavailable(message),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "webhook not accepted");
        }
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if let Self::BasicAuthRequired(_) = self {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"leadrelay\""),
            );
        }
        response
    }
}
