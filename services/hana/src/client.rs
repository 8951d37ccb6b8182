//! A client for Hana's update endpoint (partner → Hana): `POST` to the URL obtained from Hana,
//! `Authorization: Bearer <access_token>`, a JSON body `{"lead": {"id": …, <attribute>: <value>}}`
//! or `{"opportunity": {…}}` with plain values (no `nomalizeData` wrapper).
//!
//! Hana documents neither the answer nor its errors, so the answer is kept as JSON (or as text
//! when it is not JSON), an `error` key or `"success": false` in a 2xx answer is a refusal, and
//! HTTP statuses are read by their usual meaning.

use std::time::Duration;

use leadrelay_runtime::outbound::{http_client, snippet, transport_text};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

/// How long one call may take (Hana's own integrations use 30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The retry delay assumed for a 429 that names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Which Hana record an update is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A lead (customer): `{"lead": {…}}`.
    Lead,
    /// An opportunity (ticket): `{"opportunity": {…}}`.
    Opportunity,
}

impl Record {
    fn key(self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Opportunity => "opportunity",
        }
    }
}

/// A Hana call failed.
#[derive(Debug, thiserror::Error)]
pub enum HanaError {
    /// 401: the access token is wrong or expired.
    #[error(
        "Hana rejected the access token ({status}: {message}); check LEADRELAY_HANA_ACCESS_TOKEN"
    )]
    Unauthorized {
        /// The HTTP status.
        status: u16,
        /// Hana's message.
        message: String,
    },
    /// 403: the token may not update this record.
    #[error("Hana refused the update (403: {0})")]
    Forbidden(String),
    /// 404: no such record.
    #[error("Hana has no such record (404: {0})")]
    NotFound(String),
    /// 400, 422 or a refusal in a 2xx answer: the update itself is wrong.
    #[error("Hana refused the update ({status}: {message})")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Hana's message.
        message: String,
    },
    /// 429: Hana asks to slow down.
    #[error("Hana's rate limit was reached; retry in {} s", .0.as_secs())]
    RateLimited(Duration),
    /// 5xx: Hana failed; the call may be retried.
    #[error("Hana is unavailable ({status}: {message})")]
    Unavailable {
        /// The HTTP status.
        status: u16,
        /// Hana's message.
        message: String,
    },
    /// No answer in time.
    #[error("Hana did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("cannot reach Hana: {0}")]
    Transport(String),
    /// The request cannot be sent as given.
    #[error("{0}")]
    Invalid(String),
}

/// The one place Hana failures become gRPC statuses.
impl From<HanaError> for tonic::Status {
    fn from(error: HanaError) -> Self {
        let message = error.to_string();
        match error {
            HanaError::Unauthorized { .. } => Self::unauthenticated(message),
            HanaError::Forbidden(_) => Self::permission_denied(message),
            HanaError::NotFound(_) => Self::not_found(message),
            HanaError::Rejected { .. } | HanaError::Invalid(_) => Self::invalid_argument(message),
            HanaError::RateLimited(delay) => {
                let mut details = tonic_types::ErrorDetails::new();
                details.set_retry_info(Some(delay));
                <Self as tonic_types::StatusExt>::with_error_details(
                    tonic::Code::ResourceExhausted,
                    message,
                    details,
                )
            }
            HanaError::Unavailable { .. } | HanaError::Transport(_) => Self::unavailable(message),
            HanaError::Timeout(_) => Self::deadline_exceeded(message),
        }
    }
}

/// The client. Cloning shares the connection pool.
#[derive(Clone)]
pub struct HanaClient {
    http: reqwest::Client,
    url: Url,
    token: SecretString,
    timeout: Duration,
}

impl std::fmt::Debug for HanaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HanaClient").finish_non_exhaustive()
    }
}

/// Hana's message in an answer: `message`, `error` (text or `{message}`), or the body itself.
fn message_of(bytes: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Value>(bytes) else {
        return snippet(bytes);
    };
    for key in ["message", "error", "msg"] {
        match json.get(key) {
            Some(Value::String(text)) if !text.is_empty() => return text.clone(),
            Some(Value::Object(inner)) => {
                if let Some(Value::String(text)) = inner.get("message") {
                    return text.clone();
                }
                return Value::Object(inner.clone()).to_string();
            }
            _ => {}
        }
    }
    snippet(bytes)
}

/// Checks one attribute value: strings, numbers, booleans and lists of those; Hana takes no
/// objects as attribute values.
fn check_value(name: &str, value: &Value) -> Result<(), HanaError> {
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
            other => Err(HanaError::Invalid(format!(
                "attribute {name}: a list may hold strings and numbers only, not {other}"
            ))),
        }),
        Value::Null => Err(HanaError::Invalid(format!(
            "attribute {name}: null is not a value Hana documents; leave the attribute out"
        ))),
        Value::Object(_) => Err(HanaError::Invalid(format!(
            "attribute {name}: give the plain value, not an object (no nomalizeData wrapper)"
        ))),
    }
}

impl HanaClient {
    /// A client for the update endpoint at `url`.
    pub fn new(url: Url, token: SecretString, timeout: Duration) -> Result<Self, HanaError> {
        let http = http_client(timeout).map_err(|error| HanaError::Transport(error.to_string()))?;
        Ok(Self {
            http,
            url,
            token,
            timeout,
        })
    }

    /// Writes `attributes` on the `record` with `id`; returns Hana's answer. The id and every
    /// value are checked before anything is sent.
    pub async fn update(
        &self,
        record: Record,
        id: &str,
        attributes: Map<String, Value>,
    ) -> Result<Value, HanaError> {
        let id = id.trim();
        if id.is_empty() {
            return Err(HanaError::Invalid(format!(
                "the {} id is required",
                record.key()
            )));
        }
        if attributes.is_empty() {
            return Err(HanaError::Invalid(
                "nothing to update: give at least one attribute".to_owned(),
            ));
        }
        if attributes.contains_key("id") {
            return Err(HanaError::Invalid(
                "`id` names the record; it is not an attribute to write".to_owned(),
            ));
        }
        for (name, value) in &attributes {
            check_value(name, value)?;
        }
        let mut fields = Map::new();
        fields.insert("id".to_owned(), Value::String(id.to_owned()));
        fields.extend(attributes);
        let mut body = Map::new();
        body.insert(record.key().to_owned(), Value::Object(fields));

        let mut authorization = reqwest::header::HeaderValue::from_str(&format!(
            "Bearer {}",
            self.token.expose_secret()
        ))
        .map_err(|_| {
            HanaError::Invalid("the access token holds characters a header cannot carry".to_owned())
        })?;
        authorization.set_sensitive(true);
        let request = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&Value::Object(body));
        let response = leadrelay_runtime::outbound::send("hana", request)
            .await
            .map_err(|error| self.transport(&error))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport(&error))?;
        tracing::debug!(
            record = record.key(),
            status = status.as_u16(),
            "hana update"
        );
        let code = status.as_u16();
        match code {
            200..=299 => {}
            401 => {
                return Err(HanaError::Unauthorized {
                    status: code,
                    message: message_of(&bytes),
                });
            }
            403 => return Err(HanaError::Forbidden(message_of(&bytes))),
            404 => return Err(HanaError::NotFound(message_of(&bytes))),
            429 => {
                return Err(HanaError::RateLimited(
                    retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                ));
            }
            500..=599 => {
                return Err(HanaError::Unavailable {
                    status: code,
                    message: message_of(&bytes),
                });
            }
            _ => {
                return Err(HanaError::Rejected {
                    status: code,
                    message: message_of(&bytes),
                });
            }
        }
        let answer = match serde_json::from_slice::<Value>(&bytes) {
            Ok(answer) => answer,
            Err(_) if bytes.iter().all(u8::is_ascii_whitespace) => Value::Null,
            Err(_) => Value::String(snippet(&bytes)),
        };
        if answer.get("error").is_some_and(|error| !error.is_null())
            || answer.get("success") == Some(&Value::Bool(false))
        {
            return Err(HanaError::Rejected {
                status: code,
                message: message_of(&bytes),
            });
        }
        Ok(answer)
    }

    fn transport(&self, error: &reqwest::Error) -> HanaError {
        if error.is_timeout() {
            HanaError::Timeout(self.timeout)
        } else {
            // The URL is Hana's own and may carry a key: it is left out.
            HanaError::Transport(transport_text(error, "Hana"))
        }
    }
}
