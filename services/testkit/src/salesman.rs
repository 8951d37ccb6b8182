//! A fake SalesMan leads API v1 on wiremock, answering as the API document and the SalesMan
//! source show: form-encoded requests with the credentials in the body, errors at HTTP 200,
//! Cyrillic unescaped and `/` escaped in JSON served as `text/html`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

/// Every request's form fields, as SalesMan's PHP reads them.
pub type Seen = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// A SalesMan checking `login` and `apikey` as v1 does (key first, then user), then answering
/// with what `answer` returns for the request's fields.
struct SalesMan<F> {
    login: String,
    api_key: String,
    seen: Seen,
    answer: F,
}

impl<F> Respond for SalesMan<F>
where
    F: Fn(&HashMap<String, String>) -> ResponseTemplate + Send + Sync + 'static,
{
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let fields: HashMap<String, String> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(fields.clone());
        // The credentials travel in the body; a query string would put them in proxy logs.
        if request.url.query().is_some() || request.url.path() != "/developer/v1/leads" {
            return ResponseTemplate::new(404);
        }
        if fields.get("apikey") != Some(&self.api_key) {
            return v1(
                &json!({"result":"Error","error":{"code":"400","text":"Не верный API key"}}),
            );
        }
        if fields.get("login") != Some(&self.login) {
            return v1(
                &json!({"result":"Error","error":{"code":"401","text":"Неизвестный пользователь"}}),
            );
        }
        (self.answer)(&fields)
    }
}

/// How many of the requests `seen` holds asked for `action` ("add", "list", …).
pub fn calls(seen: &Seen, action: &str) -> usize {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|fields| fields.get("action").map(String::as_str) == Some(action))
        .count()
}

/// SalesMan's v1 body: Cyrillic unescaped, `/` escaped, served as `text/html`.
pub fn v1(body: &Value) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .insert_header("content-type", "text/html; charset=utf-8")
        .set_body_string(body.to_string().replace('/', "\\/"))
}

/// Mounts a SalesMan for `login` and `api_key` on `server`; returns what it will have seen.
pub async fn mount<F>(server: &MockServer, login: &str, api_key: &str, answer: F) -> Seen
where
    F: Fn(&HashMap<String, String>) -> ResponseTemplate + Send + Sync + 'static,
{
    let seen = Seen::default();
    Mock::given(method("POST"))
        .respond_with(SalesMan {
            login: login.to_owned(),
            api_key: api_key.to_owned(),
            seen: seen.clone(),
            answer,
        })
        .mount(server)
        .await;
    seen
}

/// A lead record as v1 `info` returns it (every value a string, Cyrillic text).
pub fn lead_record(id: i64, status: u8) -> Value {
    let status_name = ["Открыт", "В работе", "Обработан", "Закрыт"]
        .get(usize::from(status))
        .copied()
        .unwrap_or("Открыт");
    json!({
        "id": id.to_string(), "datum": "2026-11-20 10:00:00", "datum_do": "", "status": status.to_string(),
        "rezult": "0", "title": "Toan Truyen", "email": "toan@example.com", "phone": "0978712200",
        "site": "", "company": "", "description": "Заявка из Hana", "ip": "", "city": "", "country": "",
        "iduser": "0", "clientpath": "0", "pid": "0", "clid": "0", "did": "0",
        "statusName": status_name, "rezultName": "", "clientpathName": "", "userName": "",
        "client": "", "person": "", "deal": null
    })
}

/// The answers of a working leads API: `add` → id 940, `info` → [`lead_record`], `list` → one
/// page of three leads then "not found", `stat` → two users.
pub fn documented_answers(fields: &HashMap<String, String>) -> ResponseTemplate {
    match fields.get("action").map(String::as_str) {
        Some("add") => v1(&json!({"result":{"text":"Success","id":940}})),
        Some("info") => {
            let id = fields.get("id").and_then(|id| id.parse().ok()).unwrap_or(0);
            v1(&json!({"result":{"data": lead_record(id, 1),"id": id.to_string()}}))
        }
        Some("list") if fields.get("offset").map(String::as_str).unwrap_or("0") == "0" => {
            v1(&json!({"data": [lead_record(3, 2), lead_record(2, 1), lead_record(1, 0)]}))
        }
        Some("list") => v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}})),
        Some("stat") => v1(&json!({"data":[
            {"title":"vladislav@isaler.ru","open":"2","processed":"1"},
            {"title":"viktor@isaler.ru","open":"0","processed":"0"}
        ]})),
        _ => v1(&json!({"result":"Error","error":{"code":"402","text":"Неизвестный метод"}})),
    }
}

/// A lead a [`mount_stateful`] SalesMan holds, with when it was added.
#[derive(Clone, Debug)]
pub struct Added {
    /// When the `add` arrived.
    pub at: std::time::Instant,
    /// The lead as `list` returns it.
    pub record: Value,
}

/// The leads a [`mount_stateful`] SalesMan holds, oldest first.
pub type Leads = Arc<Mutex<Vec<Added>>>;

/// A SalesMan that keeps the leads added to it: `add` stores one (ids from 1000) and `list`
/// returns the newest 200 — as v1 does, whatever the offset — so a lead added earlier is found
/// by the marker in its description only while fewer than 200 newer leads exist.
pub async fn mount_stateful(server: &MockServer, login: &str, api_key: &str) -> Leads {
    let leads = Leads::default();
    mount(server, login, api_key, {
        let leads = leads.clone();
        move |fields| {
            let mut leads = leads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match fields.get("action").map(String::as_str) {
                Some("add") => {
                    let id = 1000 + i64::try_from(leads.len()).unwrap_or(i64::MAX - 1000);
                    let mut record = lead_record(id, 0);
                    for field in ["title", "email", "phone", "description", "company", "city"] {
                        record[field] = json!(fields.get(field).cloned().unwrap_or_default());
                    }
                    leads.push(Added {
                        at: std::time::Instant::now(),
                        record,
                    });
                    v1(&json!({"result": {"text": "Success", "id": id}}))
                }
                Some("list") if fields.get("offset").is_none_or(|offset| offset == "0") => {
                    let page: Vec<Value> = leads
                        .iter()
                        .rev()
                        .take(200)
                        .map(|added| added.record.clone())
                        .collect();
                    if page.is_empty() {
                        v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}}))
                    } else {
                        v1(&json!({ "data": page }))
                    }
                }
                Some("list") => {
                    v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}}))
                }
                _ => documented_answers(fields),
            }
        }
    })
    .await;
    leads
}
