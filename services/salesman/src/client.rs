//! A typed client for SalesMan's leads API v1: `POST {base}/developer/v1/leads`, form-encoded,
//! with `login`, `apikey` and `action` in the body, so the key never sits in a URL.
//!
//! SalesMan answers handled errors with HTTP 200 and an `error` object in the body (codes as
//! strings in v1, numbers in v2), sometimes without a `result` key; an error is recognised by
//! the `error` key alone. Values come as strings ("1583", "2"); they are parsed into typed
//! fields, and the numeric status and result codes into enums that keep their names.

use std::time::Duration;

use leadrelay_proto::salesman::v1::{AddLeadRequest, Lead, LeadResult, LeadStatus, UserLeadStats};
use leadrelay_runtime::outbound::{http_client, snippet, transport_text};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

/// How long one call may take; the vendor's own examples use 10 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows in a `list` page: fixed by SalesMan.
pub const PAGE_SIZE: usize = 200;

/// A SalesMan call failed.
#[derive(Debug, thiserror::Error)]
pub enum SalesManError {
    /// Error 400: the API key is wrong.
    #[error("SalesMan rejected the API key (400: {0}); check LEADRELAY_SALESMAN_API_KEY")]
    WrongApiKey(String),
    /// Error 401: the login is not a SalesMan user.
    #[error("SalesMan does not know the user (401: {0}); check LEADRELAY_SALESMAN_LOGIN")]
    UnknownUser(String),
    /// Error 402: the method or action does not exist on this SalesMan.
    #[error("SalesMan does not know this method (402: {0}); its API may be another version")]
    UnknownMethod(String),
    /// Error 403: the record is outside the user's scope.
    #[error("SalesMan refused access to the record (403: {0})")]
    Forbidden(String),
    /// Error 404: no such record.
    #[error("SalesMan has no such record (404: {0})")]
    NotFound(String),
    /// Error 405: a required parameter is missing.
    #[error("SalesMan is missing a parameter (405: {0})")]
    MissingParameter(String),
    /// Error 406: SalesMan found a duplicate.
    #[error("SalesMan found a duplicate (406: {0})")]
    Duplicate(String),
    /// Errors 407 and 409: the record cannot be changed that way.
    #[error("SalesMan refused the change ({code}: {text})")]
    Refused {
        /// SalesMan's code.
        code: String,
        /// SalesMan's text.
        text: String,
    },
    /// Error 500 in the body: SalesMan's database failed.
    #[error("SalesMan's database failed (500: {0})")]
    DatabaseFailed(String),
    /// Any other error code.
    #[error("SalesMan answered error {code}: {text}")]
    Other {
        /// SalesMan's code.
        code: String,
        /// SalesMan's text.
        text: String,
    },
    /// HTTP 500 or another failing status, or an empty body: SalesMan failed.
    #[error("SalesMan is unavailable: {0}")]
    Unavailable(String),
    /// No answer in time.
    #[error("SalesMan did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("cannot reach SalesMan: {0}")]
    Transport(String),
    /// A 200 answer that is not what the API documents.
    #[error("SalesMan answered something unexpected: {0}")]
    Unexpected(String),
}

impl SalesManError {
    fn from_body(code: String, text: String) -> Self {
        match code.as_str() {
            "400" => Self::WrongApiKey(text),
            "401" => Self::UnknownUser(text),
            "402" => Self::UnknownMethod(text),
            "403" => Self::Forbidden(text),
            "404" => Self::NotFound(text),
            "405" => Self::MissingParameter(text),
            "406" => Self::Duplicate(text),
            "407" | "409" => Self::Refused { code, text },
            "500" => Self::DatabaseFailed(text),
            _ => Self::Other { code, text },
        }
    }

    /// Whether sending the same call again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::DatabaseFailed(_) | Self::Unavailable(_) | Self::Timeout(_) | Self::Transport(_)
        )
    }
}

/// The one place SalesMan failures become gRPC statuses.
impl From<SalesManError> for tonic::Status {
    fn from(error: SalesManError) -> Self {
        let message = error.to_string();
        match error {
            SalesManError::WrongApiKey(_) | SalesManError::UnknownUser(_) => {
                Self::unauthenticated(message)
            }
            SalesManError::UnknownMethod(_) => Self::unimplemented(message),
            SalesManError::Forbidden(_) => Self::permission_denied(message),
            SalesManError::NotFound(_) => Self::not_found(message),
            SalesManError::MissingParameter(_) => Self::invalid_argument(message),
            SalesManError::Duplicate(_) => Self::already_exists(message),
            SalesManError::Refused { .. } => Self::failed_precondition(message),
            SalesManError::DatabaseFailed(_)
            | SalesManError::Unavailable(_)
            | SalesManError::Transport(_) => Self::unavailable(message),
            SalesManError::Timeout(_) => Self::deadline_exceeded(message),
            SalesManError::Other { .. } => Self::unknown(message),
            SalesManError::Unexpected(_) => Self::internal(message),
        }
    }
}

/// `first` of `action=list`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// SalesMan's default (newest first).
    #[default]
    Default,
    /// `first=new`.
    NewestFirst,
    /// `first=old`.
    OldestFirst,
}

/// The filters of `action=list`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// `order`; empty means `datum`.
    pub order: String,
    /// `first`.
    pub direction: Direction,
    /// `dateStart`, "YYYY-MM-DD".
    pub date_start: String,
    /// `dateEnd`, "YYYY-MM-DD".
    pub date_end: String,
}

/// The client. Cloning shares the connection pool.
#[derive(Clone)]
pub struct SalesManClient {
    http: reqwest::Client,
    leads: Url,
    login: String,
    api_key: SecretString,
    timeout: Duration,
}

impl std::fmt::Debug for SalesManClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesManClient")
            .field("leads", &self.leads.as_str())
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// Text of a value SalesMan may send as a string or a number.
fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

fn number(value: Option<&Value>) -> i64 {
    text(value).trim().parse().unwrap_or(0)
}

fn count(value: Option<&Value>) -> u32 {
    u32::try_from(number(value)).unwrap_or(0)
}

/// v1 `leads` URL-decodes `login` and `apikey` once more after PHP has. Only `%` and `+` change
/// under that second decoding, so only they are encoded beforehand: "a+b" arrives as "a+b", and
/// a value without them is sent exactly as the seed's example sends it.
fn survive_second_decoding(value: &str) -> String {
    value.replace('%', "%25").replace('+', "%2B")
}

/// A lead record of `info` or `list`, its strings parsed.
pub fn lead_of(record: &Value) -> Lead {
    let field = |name: &str| text(record.get(name));
    let status = match field("status").trim() {
        "0" => LeadStatus::Open,
        "1" => LeadStatus::InWork,
        "2" => LeadStatus::Processed,
        "3" => LeadStatus::Closed,
        _ => LeadStatus::Unspecified,
    };
    let result = match field("rezult").trim() {
        "1" => LeadResult::Spam,
        "2" => LeadResult::Duplicate,
        "3" => LeadResult::Other,
        "4" => LeadResult::NotTargeted,
        _ => LeadResult::Unspecified,
    };
    // `info` names the assignee by id (`iduser`); v1 `list` puts the assignee's name in `user`
    // and a placeholder in `userName`.
    let user = field("user");
    let (user_id, user_name) = match (number(record.get("iduser")), user.trim().parse::<i64>()) {
        (0, Ok(id)) => (id, field("userName")),
        (id, _) if id != 0 => (id, field("userName")),
        _ if !user.trim().is_empty() => (0, user.trim().to_owned()),
        _ => (0, field("userName")),
    };
    let content = match field("content") {
        content if content.is_empty() => field("description"),
        content => content,
    };
    Lead {
        id: number(record.get("id")),
        datum: field("datum"),
        datum_do: field("datum_do"),
        title: field("title"),
        email: field("email"),
        phone: field("phone"),
        site: field("site"),
        company: field("company"),
        city: field("city"),
        country: field("country"),
        content,
        client_id: number(record.get("clid")),
        client: field("client"),
        person_id: number(record.get("pid")),
        person: field("person"),
        deal_id: number(record.get("did")),
        deal: field("deal"),
        user_id,
        user_name,
        status: status.into(),
        status_name: field("statusName"),
        result: result.into(),
        result_name: field("rezultName"),
        client_path_id: number(record.get("clientpath")),
        client_path_name: field("clientpathName"),
    }
}

impl SalesManClient {
    /// A client for the SalesMan installation at `base` (its leads API is under
    /// `developer/v1/leads`; a path prefix is kept).
    pub fn new(
        base: &Url,
        login: String,
        api_key: SecretString,
        timeout: Duration,
    ) -> Result<Self, SalesManError> {
        let mut root = base.clone();
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let leads = root
            .join("developer/v1/leads")
            .map_err(|error| SalesManError::Unexpected(format!("bad base URL {base}: {error}")))?;
        let http =
            http_client(timeout).map_err(|error| SalesManError::Transport(error.to_string()))?;
        Ok(Self {
            http,
            leads,
            login,
            api_key,
            timeout,
        })
    }

    /// `action=add`: the new lead's id and SalesMan's text.
    pub async fn add(&self, lead: &AddLeadRequest) -> Result<(i64, String), SalesManError> {
        let fields = [
            ("title", &lead.title),
            ("email", &lead.email),
            ("phone", &lead.phone),
            ("company", &lead.company),
            ("description", &lead.description),
            ("ip", &lead.ip),
            ("country", &lead.country),
            ("city", &lead.city),
            ("path", &lead.path),
            ("partner", &lead.partner),
            ("user", &lead.user),
            ("utm_source", &lead.utm_source),
            ("utm_medium", &lead.utm_medium),
            ("utm_campaign", &lead.utm_campaign),
            ("utm_term", &lead.utm_term),
            ("utm_content", &lead.utm_content),
        ];
        let params: Vec<(&str, &str)> = fields
            .iter()
            .filter(|(_, value)| !value.trim().is_empty())
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let answer = self.call("add", &params).await?;
        // v1: {"result":{"text":"Success","id":940}}; v2: {"result":"Success","id":940}.
        let (id, text_value) = match answer.get("result") {
            Some(Value::Object(result)) => (number(result.get("id")), text(result.get("text"))),
            Some(Value::String(result)) => (number(answer.get("id")), result.clone()),
            _ => (0, String::new()),
        };
        if id <= 0 {
            return Err(SalesManError::Unexpected(format!(
                "add answered without a lead id: {answer}"
            )));
        }
        Ok((id, text_value))
    }

    /// `action=info`: one lead.
    pub async fn info(&self, id: i64) -> Result<Lead, SalesManError> {
        let id_text = id.to_string();
        let answer = self.call("info", &[("id", id_text.as_str())]).await?;
        // v1: {"result":{"data":{…},"id":"1583"}}; v2: {"data":{…},"id":1583}.
        let record = answer
            .pointer("/result/data")
            .or_else(|| answer.get("data"))
            .filter(|record| record.is_object())
            .ok_or_else(|| {
                SalesManError::Unexpected(format!("info answered without data: {answer}"))
            })?;
        Ok(lead_of(record))
    }

    /// `action=list`: one page of up to [`PAGE_SIZE`] leads; an empty page ends the list.
    pub async fn list_page(
        &self,
        page: u32,
        filter: &ListFilter,
    ) -> Result<Vec<Lead>, SalesManError> {
        let offset = page.to_string();
        let mut params = vec![("offset", offset.as_str())];
        if !filter.order.trim().is_empty() {
            params.push(("order", filter.order.trim()));
        }
        match filter.direction {
            Direction::Default => {}
            Direction::NewestFirst => params.push(("first", "new")),
            Direction::OldestFirst => params.push(("first", "old")),
        }
        if !filter.date_start.trim().is_empty() {
            params.push(("dateStart", filter.date_start.trim()));
        }
        if !filter.date_end.trim().is_empty() {
            params.push(("dateEnd", filter.date_end.trim()));
        }
        let answer = match self.call("list", &params).await {
            Ok(answer) => answer,
            // An empty page is "not found": the end of the list, not a failure.
            Err(SalesManError::NotFound(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        match answer.get("data") {
            Some(Value::Array(records)) => Ok(records.iter().map(lead_of).collect()),
            None if answer.as_array().is_some_and(Vec::is_empty) => Ok(Vec::new()),
            _ => Err(SalesManError::Unexpected(format!(
                "list answered without data: {}",
                snippet(answer.to_string().as_bytes())
            ))),
        }
    }

    /// `action=stat`: this month's counts per active user.
    pub async fn stat(&self) -> Result<Vec<UserLeadStats>, SalesManError> {
        let answer = self.call("stat", &[]).await?;
        let rows = match &answer {
            Value::Array(rows) => rows.clone(),
            other => match other.get("data") {
                Some(Value::Array(rows)) => rows.clone(),
                _ => {
                    return Err(SalesManError::Unexpected(format!(
                        "stat answered without data: {answer}"
                    )));
                }
            },
        };
        Ok(rows
            .iter()
            .map(|row| UserLeadStats {
                // v1 names the login `title`, v2 `login`.
                login: match text(row.get("login")) {
                    login if login.is_empty() => text(row.get("title")),
                    login => login,
                },
                open: count(row.get("open")),
                processed: count(row.get("processed")),
            })
            .collect())
    }

    async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<Value, SalesManError> {
        // Built before any await: the serializer is not `Send`.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("login", &survive_second_decoding(&self.login));
            form.append_pair(
                "apikey",
                &survive_second_decoding(self.api_key.expose_secret()),
            );
            form.append_pair("action", action);
            for (name, value) in params {
                form.append_pair(name, value);
            }
            form.finish()
        };
        let request = self
            .http
            .post(self.leads.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        let response = leadrelay_runtime::outbound::send("salesman", request)
            .await
            .map_err(|error| self.transport(&error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport(&error))?;
        tracing::debug!(action, status = status.as_u16(), "salesman call");
        if !status.is_success() {
            return Err(SalesManError::Unavailable(format!(
                "HTTP {}{}",
                status.as_u16(),
                match snippet(&bytes) {
                    body if body.is_empty() => String::new(),
                    body => format!(": {body}"),
                }
            )));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(SalesManError::Unavailable(format!(
                "{action} answered with an empty body"
            )));
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|error| {
            SalesManError::Unexpected(format!("{action}: not JSON ({error}): {}", snippet(&bytes)))
        })?;
        if let Some(error) = answer.get("error") {
            return Err(SalesManError::from_body(
                text(error.get("code")).trim().to_owned(),
                text(error.get("text")),
            ));
        }
        Ok(answer)
    }

    fn transport(&self, error: &reqwest::Error) -> SalesManError {
        if error.is_timeout() {
            SalesManError::Timeout(self.timeout)
        } else {
            SalesManError::Transport(transport_text(error, "SalesMan"))
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_records_are_typed_and_keep_their_names() {
        let lead = lead_of(&json!({
            "id": "1583", "datum": "2017-08-10 08:02:51", "email": "m@x.ru",
            "phone": "79235552226", "content": "Нужна CRM", "clid": "6193", "pid": "2724",
            "did": "0", "user": "Иван Петров", "userName": "Не определен", "status": "2",
            "statusName": "Обработан", "rezult": "0", "rezultName": "0", "clientpath": "14",
            "clientpathName": "Рекомендации клиентов"
        }));
        assert_eq!(lead.id, 1583);
        assert_eq!(lead.status(), LeadStatus::Processed);
        assert_eq!(lead.status_name, "Обработан");
        assert_eq!(lead.result(), LeadResult::Unspecified);
        assert_eq!(
            (lead.client_id, lead.person_id, lead.deal_id),
            (6193, 2724, 0)
        );
        assert_eq!((lead.user_id, lead.user_name.as_str()), (0, "Иван Петров"));
        assert_eq!(lead.content, "Нужна CRM");
    }

    #[test]
    fn error_codes_map_by_meaning() {
        let status = |code: &str| {
            tonic::Status::from(SalesManError::from_body(code.to_owned(), "x".to_owned())).code()
        };
        assert_eq!(status("400"), tonic::Code::Unauthenticated);
        assert_eq!(status("401"), tonic::Code::Unauthenticated);
        assert_eq!(status("402"), tonic::Code::Unimplemented);
        assert_eq!(status("404"), tonic::Code::NotFound);
        assert_eq!(status("406"), tonic::Code::AlreadyExists);
        assert_eq!(status("1"), tonic::Code::Unknown);
    }

    #[test]
    fn credentials_survive_the_second_decoding() {
        assert_eq!(survive_second_decoding("a+b%c@x.ru"), "a%2Bb%25c@x.ru");
        assert_eq!(
            survive_second_decoding("vladislav@isaler.ru"),
            "vladislav@isaler.ru"
        );
    }
}
