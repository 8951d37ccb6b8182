//! A fake Pipedrive on wiremock whose every answer is checked against the official OpenAPI
//! documents before it is served, and a check of every request it received against the same
//! documents. Records are shaped as the v2 (v1 for webhooks and activity types) documents
//! type them: fields the document does not allow to be `null` are left out rather than nulled.

pub mod crm;

use std::path::PathBuf;

use serde_json::{Map, Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use crate::openapi::OpenApi;

/// `shared/reference/pipedrive/<file>`, beside the repository.
fn reference(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/pipedrive")
        .join(file)
}

/// The official v2 and v1 documents, loaded once per test binary.
fn specs() -> &'static (OpenApi, OpenApi) {
    static SPECS: std::sync::OnceLock<(OpenApi, OpenApi)> = std::sync::OnceLock::new();
    SPECS.get_or_init(|| {
        let load = |file: &str, prefix: &str| {
            OpenApi::load(&reference(file), prefix).unwrap_or_else(|error| {
                panic!("the official Pipedrive document must be beside the repository: {error}")
            })
        };
        (
            load("pipedrive-v2-openapi.yml", "/api/v2"),
            load("pipedrive-v1-openapi.yml", "/api/v1"),
        )
    })
}

/// The document a request path belongs to.
pub fn spec_for(url_path: &str) -> &'static OpenApi {
    let (v2, v1) = specs();
    if url_path.starts_with("/api/v1/") {
        v1
    } else {
        v2
    }
}

/// A fake answer, checked against the document before it is served.
///
/// # Panics
/// When the answer breaks the document: a fake must not drift from the real API.
pub fn answer(http_method: &str, url_path: &str, status: u16, body: Value) -> ResponseTemplate {
    let problems = spec_for(url_path).check_response(http_method, url_path, status, &body);
    assert!(
        problems.is_empty(),
        "the fake's answer breaks the document: {problems:#?}"
    );
    ResponseTemplate::new(status).set_body_json(body)
}

/// Mounts a checked 200 answer for `http_method url_path`.
pub async fn mount(server: &MockServer, http_method: &str, url_path: &str, body: Value) {
    Mock::given(method(http_method))
        .and(path(url_path))
        .respond_with(answer(http_method, url_path, 200, body))
        .mount(server)
        .await;
}

/// Checks every request `server` received against the documents, and that each carried `token`
/// in its `x-api-token` header and in no URL; returns how many there were.
///
/// # Panics
/// On the first request that breaks the documents or shows the token.
pub async fn assert_requests_conform(server: &MockServer, token: &str) -> usize {
    let requests = server.received_requests().await.unwrap_or_default();
    let mut problems = Vec::new();
    for request in &requests {
        let query: Vec<(String, String)> = request
            .url
            .query_pairs()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let body = (!request.body.is_empty()).then_some(request.body.as_slice());
        problems.extend(spec_for(request.url.path()).check_request(
            request.method.as_str(),
            request.url.path(),
            &query,
            body,
        ));
        let sent = request
            .headers
            .get("x-api-token")
            .and_then(|value| value.to_str().ok());
        if sent != Some(token) {
            problems.push(format!(
                "{} {}: no x-api-token header",
                request.method,
                request.url.path()
            ));
        }
        if request.url.as_str().contains(token) {
            problems.push(format!("{}: the token is in the URL", request.url.path()));
        }
    }
    assert!(
        problems.is_empty(),
        "requests break the official documents: {problems:#?}"
    );
    requests.len()
}

/// `{"success": true, "data": data}`.
pub fn ok(data: Value) -> Value {
    Value::Object(Map::from_iter([
        ("success".to_owned(), Value::Bool(true)),
        ("data".to_owned(), data),
    ]))
}

/// A list page; the last page has no `next_cursor` (the document types it as a string only).
pub fn page(data: Value, next: Option<&str>) -> Value {
    let mut page = ok(data);
    page["additional_data"] = match next {
        Some(next) => json!({ "next_cursor": next }),
        None => json!({}),
    };
    page
}

/// A v2 deal linked to person 7, in pipeline 1, stage 2.
pub fn deal(id: i64) -> Value {
    json!({
        "id": id, "title": format!("Deal {id}"), "owner_id": 1, "person_id": 7,
        "pipeline_id": 1, "stage_id": 2, "value": 120.5, "currency": "EUR",
        "add_time": "2026-11-20T10:00:00Z", "update_time": "2026-11-21T10:00:00Z",
        "is_deleted": false, "is_archived": false, "status": "open", "visible_to": 3,
        "expected_close_date": "2026-12-01", "label_ids": [], "custom_fields": {"9f3b": "chat"}
    })
}

/// A v2 stage.
pub fn stage(id: i64, pipeline_id: i64) -> Value {
    json!({
        "id": id, "order_nr": id, "name": format!("Stage {id}"), "is_deleted": false,
        "deal_probability": 50, "pipeline_id": pipeline_id, "is_deal_rot_enabled": false,
        "add_time": "2026-01-01T00:00:00Z", "update_time": "2026-01-01T00:00:00Z"
    })
}

/// A v2 call activity on deal 5 with person 7.
pub fn activity(id: i64) -> Value {
    json!({
        "id": id, "subject": format!("Call {id}"), "type": "call", "owner_id": 1,
        "is_deleted": false, "add_time": "2026-11-20T10:00:00Z",
        "update_time": "2026-11-20T10:00:00Z", "deal_id": 5, "person_id": 7,
        "due_date": "2026-11-22", "due_time": "09:30", "duration": "00:30", "done": false,
        "note": "<p>https://bot.hana.ai/c/1</p>"
    })
}

/// A v2 person: the Hana seed's lead.
pub fn person(id: i64) -> Value {
    json!({
        "id": id, "name": "Toan Truyen", "owner_id": 1,
        "add_time": "2026-11-20T10:00:00Z", "update_time": "2026-11-20T10:00:00Z",
        "emails": [{"value": "toan@example.com", "primary": true, "label": "work"}],
        "phones": [{"value": "0978712200", "primary": true, "label": "work"}],
        "is_deleted": false, "visible_to": 3, "custom_fields": {}
    })
}

/// `data` of a person search finding person 7.
pub fn person_search() -> Value {
    json!({"success": true, "data": {"items": [{"result_score": 1.0, "item": {
        "id": 7, "type": "person", "name": "Toan Truyen", "phones": ["0978712200"],
        "emails": ["toan@example.com"], "visible_to": 3, "owner": {"id": 1},
        "custom_fields": [], "notes": []
    }}]}, "additional_data": {}})
}

/// The account's activity types (v1): only "call".
pub fn activity_types() -> Value {
    json!({"success": true, "data": [
        {"id": 1, "order_nr": 1, "name": "Call", "key_string": "call", "icon_key": "call",
         "active_flag": true, "is_custom_flag": false, "add_time": "2026-01-01T00:00:00Z"}
    ]})
}

/// The key of the account's "LeadRelay deal id" field in [`deal_fields`].
pub const DEAL_MARKER_KEY: &str = "5c1f0e9a7d3b2a4c6e8f0a1b3c5d7e9f1a2b3c4d";

/// The account's custom deal fields (v1): the field LeadRelay marks its deals with.
pub fn deal_fields() -> Value {
    json!({"success": true, "data": [
        {"id": 12, "key": DEAL_MARKER_KEY, "name": "LeadRelay deal id", "field_type": "varchar",
         "add_time": "2026-01-01T00:00:00Z", "active_flag": true, "edit_flag": true}
    ], "additional_data": {"start": 0, "limit": 500, "more_items_in_collection": false}})
}

/// A v1 webhook (version 2.0) on every deal event.
pub fn webhook(id: i64) -> Value {
    json!({
        "id": id, "company_id": 1, "owner_id": 1, "user_id": 1, "event_action": "*",
        "event_object": "deal", "subscription_url": "https://leadrelay.example.com/webhooks/pipedrive",
        "is_active": 1, "add_time": "2026-11-20T10:00:00Z", "type": "general",
        "http_auth_user": "pipedrive-hook", "admin_id": 1, "version": "2.0", "name": "LeadRelay deal *"
    })
}

/// Mounts a checked answer for every endpoint the adapter's native RPCs use, around deal 5,
/// stage 2 (pipeline 1), activity 11, person 7 and webhook 21.
pub async fn mount_every_operation(server: &MockServer) {
    let v1 = |data: Value| json!({"status": "ok", "success": true, "data": data});
    mount(server, "POST", "/api/v2/deals", ok(deal(5))).await;
    mount(server, "GET", "/api/v2/deals/5", ok(deal(5))).await;
    mount(server, "PATCH", "/api/v2/deals/5", ok(deal(5))).await;
    mount(server, "DELETE", "/api/v2/deals/5", ok(json!({"id": 5}))).await;
    mount(
        server,
        "GET",
        "/api/v2/deals",
        page(json!([deal(9), deal(8), deal(7)]), None),
    )
    .await;
    mount(server, "GET", "/api/v2/stages/2", ok(stage(2, 1))).await;
    mount(
        server,
        "GET",
        "/api/v2/stages",
        page(json!([stage(3, 1), stage(2, 1)]), None),
    )
    .await;
    mount(server, "GET", "/api/v1/activityTypes", activity_types()).await;
    mount(server, "GET", "/api/v1/dealFields", deal_fields()).await;
    mount(server, "POST", "/api/v2/activities", ok(activity(11))).await;
    mount(
        server,
        "GET",
        "/api/v2/activities",
        page(json!([activity(12), activity(11)]), None),
    )
    .await;
    mount(server, "GET", "/api/v2/persons/search", person_search()).await;
    mount(server, "POST", "/api/v2/persons", ok(person(7))).await;
    mount(server, "PATCH", "/api/v2/persons/7", ok(person(7))).await;
    Mock::given(method("POST"))
        .and(path("/api/v1/webhooks"))
        .respond_with(answer("POST", "/api/v1/webhooks", 201, v1(webhook(21))))
        .mount(server)
        .await;
    mount(server, "GET", "/api/v1/webhooks", v1(json!([webhook(21)]))).await;
    mount(
        server,
        "DELETE",
        "/api/v1/webhooks/21",
        v1(json!({"id": 21})),
    )
    .await;
}
