//! A typed client for Pipedrive's REST API: v2 for deals, stages, activities and persons, v1 for
//! webhooks (which have no v2 endpoint).
//!
//! It sends the API token in the `x-api-token` header (never in a URL), unwraps the
//! `{success, data, additional_data}` envelope, follows v2 cursors, and turns every failure into
//! a [`PipedriveError`] that carries Pipedrive's own message.

use std::time::Duration;

use reqwest::{Method, StatusCode, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use url::Url;

use crate::pacing::{CallKind, Pacer};
use leadrelay_runtime::{
    config::RateLimit,
    outbound::{http_client, snippet, transport_text},
};

/// How long one call may take before it is given up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Most items a v2 list page may hold.
pub const MAX_PAGE: u32 = 500;

/// The retry delay assumed for a 429 that names none: Pipedrive's burst window is 2 s.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// A Pipedrive call failed.
#[derive(Debug, thiserror::Error)]
pub enum PipedriveError {
    /// 401: the API token is wrong or revoked.
    #[error(
        "Pipedrive rejected the API token (401: {message}); check LEADRELAY_PIPEDRIVE_API_TOKEN"
    )]
    Unauthorized {
        /// Pipedrive's message.
        message: String,
    },
    /// 402/403 with a JSON body: the account or the user may not do this.
    #[error("Pipedrive refused the request ({status}: {message})")]
    Forbidden {
        /// The HTTP status.
        status: u16,
        /// Pipedrive's message.
        message: String,
    },
    /// 403 with an HTML page: Pipedrive's edge blocked this client, usually for sending on
    /// after 429s.
    #[error(
        "Pipedrive's edge blocked this client (403 with an HTML page), usually after requests were sent on despite 429s; stop calling and wait before trying again"
    )]
    Blocked,
    /// 404: the record does not exist (or was deleted).
    #[error("Pipedrive has no such record (404: {message})")]
    NotFound {
        /// Pipedrive's message.
        message: String,
    },
    /// 400, 410, 415, 422…: the request itself is wrong; sending it again will not help.
    #[error("Pipedrive rejected the request ({status}: {message})")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Pipedrive's message, with its error code when it gave one.
        message: String,
    },
    /// 429: a rate limit was reached.
    #[error("{}", rate_limited_message(*.retry_after, *.daily))]
    RateLimited {
        /// When to try again.
        retry_after: Duration,
        /// The company's daily token budget is spent (it resets at midnight, server time).
        daily: bool,
    },
    /// 5xx: Pipedrive failed or is in maintenance; the call may be retried.
    #[error("Pipedrive is unavailable ({status}: {message})")]
    Unavailable {
        /// The HTTP status.
        status: u16,
        /// Pipedrive's message.
        message: String,
    },
    /// No answer in time.
    #[error("Pipedrive did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("cannot reach Pipedrive: {0}")]
    Transport(String),
    /// A 2xx answer that is not what the API documents.
    #[error("Pipedrive answered something unexpected: {0}")]
    Unexpected(String),
}

fn rate_limited_message(retry_after: Duration, daily: bool) -> String {
    if daily {
        format!(
            "Pipedrive's daily API token budget is spent; calls resume when it resets (retry in {} s)",
            retry_after.as_secs()
        )
    } else {
        format!(
            "Pipedrive's rate limit was reached; retry in {} ms",
            retry_after.as_millis()
        )
    }
}

impl PipedriveError {
    /// Whether sending the same call again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Unavailable { .. }
                | Self::Timeout(_)
                | Self::Transport(_)
                | Self::Blocked
        )
    }
}

/// The `additional_data` of a list answer that matters here.
#[derive(Debug, Default, serde::Deserialize)]
struct Additional {
    next_cursor: Option<String>,
}

/// A successful answer.
#[derive(Debug, serde::Deserialize)]
struct Envelope<T> {
    success: bool,
    data: Option<T>,
    #[serde(default)]
    additional_data: Option<Additional>,
}

/// The client. Cloning shares the connection pool and the pace.
#[derive(Clone)]
pub struct PipedriveClient {
    http: reqwest::Client,
    pacer: Option<std::sync::Arc<Pacer>>,
    /// `…/api/v2/`.
    v2: Url,
    /// `…/api/v1/` (webhooks).
    v1: Url,
    token: SecretString,
    timeout: Duration,
}

impl std::fmt::Debug for PipedriveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipedriveClient")
            .field("v2", &self.v2.as_str())
            .finish_non_exhaustive()
    }
}

impl PipedriveClient {
    /// A client for the Pipedrive at `base` (`https://api.pipedrive.com` or the company
    /// domain; a path prefix, as a test fake may use, is kept).
    pub fn new(base: &Url, token: SecretString, timeout: Duration) -> Result<Self, PipedriveError> {
        let mut root = base.clone();
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let join = |path: &str| {
            root.join(path).map_err(|error| {
                PipedriveError::Unexpected(format!("bad base URL {base}: {error}"))
            })
        };
        let http =
            http_client(timeout).map_err(|error| PipedriveError::Transport(error.to_string()))?;
        Ok(Self {
            http,
            pacer: None,
            v2: join("api/v2/")?,
            v1: join("api/v1/")?,
            token,
            timeout,
        })
    }

    /// The same client, every call paced within `budget` (see [`crate::pacing`]).
    #[must_use]
    pub fn paced(mut self, budget: RateLimit) -> Self {
        self.pacer = Some(std::sync::Arc::new(Pacer::new(budget)));
        self
    }

    /// The same client, paced within `budget` and `search` for search calls.
    #[must_use]
    pub fn paced_with_search_limit(mut self, budget: RateLimit, search: RateLimit) -> Self {
        self.pacer = Some(std::sync::Arc::new(Pacer::with_search_limit(
            budget, search,
        )));
        self
    }

    /// `GET /api/v2/{path}` → `data`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, PipedriveError> {
        let (data, _) = self
            .call::<T, ()>(Method::GET, &self.v2, path, query, None)
            .await?;
        data.ok_or_else(|| PipedriveError::Unexpected(format!("GET {path} returned no data")))
    }

    /// `POST`/`PATCH` `/api/v2/{path}` with a JSON body → `data`.
    pub async fn send<T: DeserializeOwned, B: Serialize + Sync>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, PipedriveError> {
        let (data, _) = self
            .call::<T, B>(method.clone(), &self.v2, path, &[], Some(body))
            .await?;
        data.ok_or_else(|| PipedriveError::Unexpected(format!("{method} {path} returned no data")))
    }

    /// `DELETE /api/v2/{path}`.
    pub async fn delete(&self, path: &str) -> Result<(), PipedriveError> {
        self.call::<Value, ()>(Method::DELETE, &self.v2, path, &[], None)
            .await?;
        Ok(())
    }

    /// Every item of a v2 list, following `additional_data.next_cursor` to the end.
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<T>, PipedriveError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self.list_page(path, query, MAX_PAGE, cursor).await?;
            items.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(items),
            }
        }
    }

    /// One page of a v2 list of at most `limit` items, and the cursor of the next page.
    pub async fn list_page<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        limit: u32,
        cursor: Option<String>,
    ) -> Result<(Vec<T>, Option<String>), PipedriveError> {
        let mut page_query = query.to_vec();
        page_query.push(("limit", limit.clamp(1, MAX_PAGE).to_string()));
        if let Some(cursor) = cursor {
            page_query.push(("cursor", cursor));
        }
        let (page, additional) = self
            .call::<Vec<T>, ()>(Method::GET, &self.v2, path, &page_query, None)
            .await?;
        let next = additional
            .and_then(|additional| additional.next_cursor)
            .filter(|next| !next.is_empty());
        Ok((page.unwrap_or_default(), next))
    }

    /// A call to a v1 path (webhooks) → `data`.
    pub async fn v1<T: DeserializeOwned, B: Serialize + Sync>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, PipedriveError> {
        let (data, _) = self.call(method, &self.v1, path, &[], body).await?;
        Ok(data)
    }

    async fn call<T: DeserializeOwned, B: Serialize + Sync>(
        &self,
        method: Method,
        base: &Url,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<(Option<T>, Option<Additional>), PipedriveError> {
        let url = base
            .join(path.trim_start_matches('/'))
            .map_err(|error| PipedriveError::Unexpected(format!("bad path {path}: {error}")))?;
        // Held until the answer is in: the call keeps its place in the budget until then.
        let _permit = match &self.pacer {
            Some(pacer) => {
                let kind = if path.ends_with("/search") {
                    CallKind::Search
                } else {
                    CallKind::Regular
                };
                Some(pacer.admit(kind, None).await?)
            }
            None => None,
        };
        let mut token = reqwest::header::HeaderValue::from_str(self.token.expose_secret())
            .map_err(|_| PipedriveError::Unauthorized {
                message: "the API token holds characters a header cannot carry".to_owned(),
            })?;
        token.set_sensitive(true);
        let mut request = self
            .http
            .request(method.clone(), url)
            .header("x-api-token", token)
            .header(reqwest::header::ACCEPT, "application/json");
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = leadrelay_runtime::outbound::send("pipedrive", request)
            .await
            .map_err(|error| self.transport(&error))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport(&error))?;
        tracing::debug!(%method, path, status = status.as_u16(), "pipedrive call");
        if let Some(pacer) = &self.pacer {
            pacer.observe(&headers);
        }
        if !status.is_success() {
            let error = error_from(status, &headers, &bytes);
            if let (Some(pacer), PipedriveError::RateLimited { retry_after, daily }) =
                (&self.pacer, &error)
            {
                pacer.rate_limited(*retry_after, *daily);
            }
            return Err(error);
        }
        if bytes.is_empty() {
            return Ok((None, None));
        }
        let envelope: Envelope<T> = serde_json::from_slice(&bytes).map_err(|error| {
            PipedriveError::Unexpected(format!("{method} {path}: {error}: {}", snippet(&bytes)))
        })?;
        if !envelope.success {
            return Err(PipedriveError::Unexpected(format!(
                "{method} {path} answered {status} with success=false: {}",
                snippet(&bytes)
            )));
        }
        Ok((envelope.data, envelope.additional_data))
    }

    fn transport(&self, error: &reqwest::Error) -> PipedriveError {
        if error.is_timeout() {
            PipedriveError::Timeout(self.timeout)
        } else {
            // Without the URL: it is harmless, but the error text stays short and the same
            // whatever the company domain.
            PipedriveError::Transport(transport_text(error, "Pipedrive"))
        }
    }
}

/// Pipedrive's message in an error body: `error` (+ `code`/`errorCode`), the webhooks
/// endpoint's `errors` map, or the body itself.
fn error_message(bytes: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Value>(bytes) else {
        return snippet(bytes);
    };
    let mut message = match json.get("error") {
        Some(Value::String(error)) => error.clone(),
        Some(other) if !other.is_null() => other.to_string(),
        _ => match json.get("errors") {
            Some(Value::Object(fields)) => fields
                .iter()
                .map(|(field, problems)| format!("{field}: {}", flatten(problems)))
                .collect::<Vec<_>>()
                .join("; "),
            _ => snippet(bytes),
        },
    };
    for key in ["code", "errorCode"] {
        match json.get(key) {
            Some(Value::String(code)) => message = format!("{message} [{code}]"),
            Some(Value::Number(code)) => message = format!("{message} [{code}]"),
            _ => {}
        }
    }
    if let Some(Value::String(info)) = json.get("error_info")
        && !info.is_empty()
        && !info.starts_with("Please check developers.pipedrive.com")
    {
        message = format!("{message} ({info})");
    }
    message
}

fn flatten(value: &Value) -> String {
    match value {
        Value::Array(items) => items.iter().map(flatten).collect::<Vec<_>>().join(", "),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn header_number(headers: &HeaderMap, name: &str) -> Option<f64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|number| number.is_finite() && *number >= 0.0)
}

/// When to call again after a 429: `Retry-After`, else `x-ratelimit-reset`, else the 2 s burst
/// window. An exhausted daily budget shows as a zero in either daily counter.
fn rate_limited(headers: &HeaderMap) -> PipedriveError {
    let daily = ["x-daily-ratelimit-token-remaining", "x-daily-requests-left"]
        .iter()
        .any(|name| header_number(headers, name) == Some(0.0));
    let retry_after = header_number(headers, "retry-after")
        .or_else(|| header_number(headers, "x-ratelimit-reset"))
        .map_or(DEFAULT_RETRY_AFTER, |seconds| {
            Duration::from_secs_f64(seconds.min(86_400.0)).max(Duration::from_millis(100))
        });
    PipedriveError::RateLimited { retry_after, daily }
}

fn error_from(status: StatusCode, headers: &HeaderMap, bytes: &[u8]) -> PipedriveError {
    let is_html = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("text/html"))
        || snippet(bytes).starts_with('<');
    let message = || error_message(bytes);
    match status.as_u16() {
        401 => PipedriveError::Unauthorized { message: message() },
        403 if is_html => PipedriveError::Blocked,
        402 | 403 => PipedriveError::Forbidden {
            status: status.as_u16(),
            message: message(),
        },
        404 => PipedriveError::NotFound { message: message() },
        429 => rate_limited(headers),
        500..=599 => PipedriveError::Unavailable {
            status: status.as_u16(),
            message: message(),
        },
        other => PipedriveError::Rejected {
            status: other,
            message: message(),
        },
    }
}

/// The one place Pipedrive failures become gRPC statuses.
impl From<PipedriveError> for tonic::Status {
    fn from(error: PipedriveError) -> Self {
        let message = error.to_string();
        match error {
            PipedriveError::Unauthorized { .. } => Self::unauthenticated(message),
            PipedriveError::Forbidden { .. } => Self::permission_denied(message),
            PipedriveError::NotFound { .. } => Self::not_found(message),
            PipedriveError::Rejected { status: 400, .. } => Self::invalid_argument(message),
            PipedriveError::Rejected { .. } => Self::failed_precondition(message),
            PipedriveError::RateLimited { retry_after, .. } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.set_retry_info(Some(retry_after));
                <Self as tonic_types::StatusExt>::with_error_details(
                    tonic::Code::ResourceExhausted,
                    message,
                    details,
                )
            }
            PipedriveError::Blocked | PipedriveError::Unavailable { .. } => {
                Self::unavailable(message)
            }
            PipedriveError::Timeout(_) => Self::deadline_exceeded(message),
            PipedriveError::Transport(_) => Self::unavailable(message),
            PipedriveError::Unexpected(_) => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_from_each_documented_error_shape() {
        assert_eq!(
            error_message(
                br#"{"success":false,"error":"Validation failed: title: Parameter 'title' must be a string","code":"ERR_SCHEMA_VALIDATION_FAILED","error_info":"Please check developers.pipedrive.com","data":null}"#
            ),
            "Validation failed: title: Parameter 'title' must be a string [ERR_SCHEMA_VALIDATION_FAILED]"
        );
        assert_eq!(
            error_message(br#"{"success":false,"error":"unauthorized access","errorCode":401}"#),
            "unauthorized access [401]"
        );
        assert_eq!(
            error_message(
                br#"{"status":"error","success":false,"errors":{"subscription_url":["invalid or non-reachable URL"]}}"#
            ),
            "subscription_url: invalid or non-reachable URL"
        );
        assert_eq!(error_message(b"Bad Gateway"), "Bad Gateway");
    }

    #[test]
    fn retry_delays_come_from_the_headers_or_the_burst_window() {
        let mut headers = HeaderMap::new();
        assert!(matches!(
            rate_limited(&headers),
            PipedriveError::RateLimited { retry_after, daily: false } if retry_after == DEFAULT_RETRY_AFTER
        ));
        headers.insert("x-ratelimit-reset", "1.5".parse().unwrap());
        assert!(matches!(
            rate_limited(&headers),
            PipedriveError::RateLimited { retry_after, .. } if retry_after == Duration::from_millis(1500)
        ));
        headers.insert("retry-after", "7".parse().unwrap());
        headers.insert("x-daily-ratelimit-token-remaining", "0".parse().unwrap());
        assert!(matches!(
            rate_limited(&headers),
            PipedriveError::RateLimited { retry_after, daily: true } if retry_after == Duration::from_secs(7)
        ));
    }
}
