//! The Pipedrive REST client against a wiremock Pipedrive answering as the API documents:
//! the envelope, cursors, and every error shape, each mapped to its gRPC code.

use std::time::Duration;

use leadrelay_pipedrive::client::{PipedriveClient, PipedriveError};
use leadrelay_testkit::pipedrive::assert_requests_conform;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::Code;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{body_json, header, method, path, query_param, query_param_is_missing},
};

const TOKEN: &str = "pd-test-token-5e1c";

async fn client(server: &MockServer) -> PipedriveClient {
    client_with_timeout(server, Duration::from_secs(5)).await
}

async fn client_with_timeout(server: &MockServer, timeout: Duration) -> PipedriveClient {
    PipedriveClient::new(
        &server.uri().parse().expect("the fake's URI is a URL"),
        SecretString::from(TOKEN),
        timeout,
    )
    .expect("the client builds")
}

fn deal(id: u64) -> Value {
    json!({"id": id, "title": format!("Deal {id}"), "status": "open", "value": 120.5,
           "currency": "EUR", "person_id": 7, "stage_id": 2, "pipeline_id": 1,
           "add_time": "2026-11-20T10:00:00Z", "update_time": "2026-11-21T10:00:00Z",
           "custom_fields": {"f1a2": "chat"}})
}

async fn failing_get(server: &MockServer, response: ResponseTemplate) -> PipedriveError {
    Mock::given(method("GET"))
        .and(path("/api/v2/deals/1"))
        .respond_with(response)
        .mount(server)
        .await;
    client(server)
        .await
        .get::<Value>("deals/1", &[])
        .await
        .expect_err("the fake answers with an error")
}

#[tokio::test]
async fn the_token_travels_in_the_header_and_data_is_unwrapped() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/deals/42"))
        .and(header("x-api-token", TOKEN))
        .and(query_param_is_missing("api_token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"success": true, "data": deal(42), "additional_data": null})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let found: Value = client(&server).await.get("deals/42", &[]).await.unwrap();
    assert_eq!(found["title"], "Deal 42");
    assert_eq!(found["custom_fields"]["f1a2"], "chat");
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn bodies_are_sent_as_json_and_a_200_post_is_success() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/deals"))
        .and(header("content-type", "application/json"))
        .and(body_json(
            json!({"title": "Deal 9", "value": 120.5, "person_id": 7}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"success": true, "data": deal(9)})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let created: Value = client(&server)
        .await
        .send(
            Method::POST,
            "deals",
            &json!({"title": "Deal 9", "value": 120.5, "person_id": 7}),
        )
        .await
        .unwrap();
    assert_eq!(created["id"], 9);
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn lists_follow_the_cursor_to_the_end() {
    let server = MockServer::start().await;
    let page = |ids: std::ops::Range<u64>, next: Value| {
        ResponseTemplate::new(200).set_body_json(json!({
            "success": true,
            "data": ids.map(deal).collect::<Vec<_>>(),
            "additional_data": {"next_cursor": next}
        }))
    };
    Mock::given(method("GET"))
        .and(path("/api/v2/deals"))
        .and(query_param("limit", "500"))
        .and(query_param("sort_by", "update_time"))
        .and(query_param_is_missing("cursor"))
        .respond_with(page(1..501, json!("c2")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/deals"))
        .and(query_param("cursor", "c2"))
        .respond_with(page(501..1001, json!("c3")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/deals"))
        .and(query_param("cursor", "c3"))
        .respond_with(page(1001..1038, Value::Null))
        .expect(1)
        .mount(&server)
        .await;
    let deals: Vec<Value> = client(&server)
        .await
        .list_all("deals", &[("sort_by", "update_time".to_owned())])
        .await
        .unwrap();
    assert_eq!(deals.len(), 1037);
    let ids: Vec<u64> = deals
        .iter()
        .map(|deal| deal["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (1..1038).collect::<Vec<_>>());
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_with_pipedrive_s_message() {
    let server = MockServer::start().await;
    let error = failing_get(
        &server,
        ResponseTemplate::new(401).set_body_json(
            json!({"success": false, "error": "unauthorized access", "errorCode": 401}),
        ),
    )
    .await;
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("unauthorized access"),
        "{status:?}"
    );
    assert!(
        status.message().contains("LEADRELAY_PIPEDRIVE_API_TOKEN"),
        "{status:?}"
    );
    assert!(!status.message().contains(TOKEN));
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn the_html_403_page_is_a_block_not_a_permission_error() {
    let server = MockServer::start().await;
    let error = failing_get(
        &server,
        ResponseTemplate::new(403).set_body_raw(
            "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>blocked</body></html>",
            "text/html; charset=UTF-8",
        ),
    )
    .await;
    assert!(matches!(error, PipedriveError::Blocked), "{error:?}");
    assert!(error.is_transient());
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("stop calling"), "{status:?}");
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_json_403_is_permission_denied() {
    let server = MockServer::start().await;
    let status = tonic::Status::from(
        failing_get(
            &server,
            ResponseTemplate::new(403).set_body_json(json!({"success": false,
                "error": "You have reached the limit of open deals", "code": "feature_capping_deals_limit"})),
        )
        .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("feature_capping_deals_limit"),
        "{status:?}"
    );
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_missing_record_is_not_found() {
    let server = MockServer::start().await;
    let status = tonic::Status::from(
        failing_get(
            &server,
            ResponseTemplate::new(404).set_body_json(
                json!({"success": false, "error": "Deal not found", "error_info": "Please check developers.pipedrive.com", "data": null}),
            ),
        )
        .await,
    );
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("Deal not found"), "{status:?}");
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_schema_validation_400_is_invalid_argument_with_the_field() {
    let server = MockServer::start().await;
    Mock::given(method("PATCH"))
        .and(path("/api/v2/deals/5"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "success": false,
            "error": "Validation failed: value: Parameter 'value' must be a number",
            "code": "ERR_SCHEMA_VALIDATION_FAILED",
            "error_info": "Please check developers.pipedrive.com",
            "data": null, "additional_data": null
        })))
        .mount(&server)
        .await;
    let error = client(&server)
        .await
        .send::<Value, _>(Method::PATCH, "deals/5", &json!({"value": "12"}))
        .await
        .unwrap_err();
    assert!(!error.is_transient());
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("Parameter 'value' must be a number [ERR_SCHEMA_VALIDATION_FAILED]"),
        "{status:?}"
    );
    // This request breaks the document on purpose: it is what makes Pipedrive answer the
    // schema-validation 400 this test maps.
}

fn retry_delay(status: &tonic::Status) -> Option<Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info()?.retry_delay
}

#[tokio::test]
async fn a_429_with_rate_headers_carries_their_delay() {
    let server = MockServer::start().await;
    let error = failing_get(
        &server,
        ResponseTemplate::new(429)
            .insert_header("x-ratelimit-limit", "40")
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-reset", "2")
            .set_body_json(json!({"success": false, "error": "Request over limit"})),
    )
    .await;
    assert!(matches!(
        error,
        PipedriveError::RateLimited { daily: false, .. }
    ));
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(2)));
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_429_without_headers_waits_one_burst_window() {
    let server = MockServer::start().await;
    let status = tonic::Status::from(failing_get(&server, ResponseTemplate::new(429)).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(2)));
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_spent_daily_budget_is_reported_as_such() {
    let server = MockServer::start().await;
    let error = failing_get(
        &server,
        ResponseTemplate::new(429)
            .insert_header("x-daily-ratelimit-token-limit", "30000")
            .insert_header("x-daily-ratelimit-token-remaining", "0")
            .insert_header("retry-after", "3600"),
    )
    .await;
    assert!(matches!(
        error,
        PipedriveError::RateLimited { daily: true, .. }
    ));
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("daily API token budget"),
        "{status:?}"
    );
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(3600)));
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn a_5xx_is_unavailable_and_transient() {
    let server = MockServer::start().await;
    let error = failing_get(
        &server,
        ResponseTemplate::new(503).set_body_string("Service Unavailable: maintenance"),
    )
    .await;
    assert!(error.is_transient());
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("maintenance"), "{status:?}");
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn no_answer_in_time_is_deadline_exceeded() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/deals/1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_secs(3))
                .set_body_json(json!({"success": true, "data": deal(1)})),
        )
        .mount(&server)
        .await;
    let error = client_with_timeout(&server, Duration::from_millis(300))
        .await
        .get::<Value>("deals/1", &[])
        .await
        .unwrap_err();
    assert!(matches!(error, PipedriveError::Timeout(_)), "{error:?}");
    assert_eq!(tonic::Status::from(error).code(), Code::DeadlineExceeded);
    assert_requests_conform(&server, TOKEN).await;
}

#[tokio::test]
async fn webhooks_use_the_v1_path_and_its_own_error_shape() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/webhooks"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "status": "error", "success": false,
            "errors": {"subscription_url": ["invalid or non-reachable URL"]}
        })))
        .mount(&server)
        .await;
    let status = tonic::Status::from(
        client(&server)
            .await
            .v1::<Value, _>(
                Method::POST,
                "webhooks",
                Some(
                    &json!({"subscription_url": "http://localhost/x", "event_action": "*",
                             "event_object": "deal", "name": "LeadRelay", "version": "2.0"}),
                ),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("subscription_url: invalid or non-reachable URL"),
        "{status:?}"
    );
    assert_requests_conform(&server, TOKEN).await;
}
