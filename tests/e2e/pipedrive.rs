//! The Pipedrive adapter inside `leadrelay up`, pointed at a fake Pipedrive that answers as the
//! official OpenAPI documents say: every native RPC through a real grpcurl, every documented
//! failure mapped to its gRPC code with Pipedrive's message, and no secret in the logs.

use std::{path::Path, time::Duration};

use leadrelay_proto::pipedrive::v1::{
    GetDealRequest, pipedrive_adapter_service_client::PipedriveAdapterServiceClient,
};
use leadrelay_testkit::pipedrive::{
    assert_requests_conform, deal, mount, mount_every_operation, ok,
};
use serde_json::json;
use tonic::Code;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use crate::support::{Error, TestResult, Up, grpcurl};

const TOKEN: &str = "pd-e2e-token-0d4f7a";
const WEBHOOK_PASSWORD: &str = "pd-hook-password-9e21";

/// Calls `rpc` of the Pipedrive adapter through grpcurl; returns its JSON answer.
async fn grpcurl_call(
    address: std::net::SocketAddr,
    rpc: &str,
    request: serde_json::Value,
) -> Result<serde_json::Value, Error> {
    let method = format!("leadrelay.pipedrive.v1.PipedriveAdapterService/{rpc}");
    grpcurl(address, &method, &request)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{rpc} answered nothing").into())
}

fn start_up(folder: &Path, fake: &MockServer, log_level: &str) -> Result<Up, Error> {
    let uri = fake.uri();
    Up::start(
        folder,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", uri.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", TOKEN),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", "pipedrive-hook"),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD", WEBHOOK_PASSWORD),
            ("LEADRELAY_PIPEDRIVE_TIMEOUT", "1s"),
            // Polling is not what these tests are about.
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("RUST_LOG", log_level),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_calls_every_native_rpc_against_up_with_a_fake_pipedrive() -> TestResult {
    let fake = MockServer::start().await;
    mount_every_operation(&fake).await;
    let folder = tempfile::tempdir()?;
    let up = start_up(folder.path(), &fake, "info")?;
    let adapter = up.addr("pipedrive-adapter");

    let calls = [
        (
            "AddDeal",
            json!({"title": "Deal 5", "personId": "7", "value": "120.50", "currency": "EUR"}),
            "/deal/id",
            json!("5"),
        ),
        ("GetDeal", json!({"id": "5"}), "/deal/value", json!("120.5")),
        (
            "UpdateDeal",
            json!({"id": "5", "title": "Renamed"}),
            "/deal/id",
            json!("5"),
        ),
        (
            "UpdateDealStatus",
            json!({"id": "5", "status": "DEAL_STATUS_LOST", "lostReason": "Price"}),
            "/deal/id",
            json!("5"),
        ),
        (
            "UpdateDealStage",
            json!({"id": "5", "pipelineId": "1", "stageId": "2"}),
            "/deal/stageId",
            json!("2"),
        ),
        (
            "GetStage",
            json!({"id": "2"}),
            "/stage/pipelineId",
            json!("1"),
        ),
        (
            "ListStages",
            json!({"pipelineId": "1"}),
            "/stages/0/id",
            json!("2"),
        ),
        (
            "AddActivity",
            json!({"subject": "Call 11", "type": "call", "dealId": "5", "personId": "7"}),
            "/activity/id",
            json!("11"),
        ),
        (
            "ListNewDeals",
            json!({"afterId": "7"}),
            "/nextAfterId",
            json!("9"),
        ),
        (
            "ListNewActivities",
            json!({"afterId": "11"}),
            "/nextAfterId",
            json!("12"),
        ),
        (
            "SearchPersons",
            json!({"email": "toan@example.com"}),
            "/persons/0/id",
            json!("7"),
        ),
        (
            "CreatePerson",
            json!({"name": "Toan Truyen", "emails": ["toan@example.com"]}),
            "/person/id",
            json!("7"),
        ),
        (
            "UpdatePerson",
            json!({"id": "7", "phones": {"values": ["0978712200"]}}),
            "/person/id",
            json!("7"),
        ),
        (
            "ListDeals",
            json!({"updatedSince": "2026-11-01T00:00:00Z"}),
            "/deals/2/id",
            json!("7"),
        ),
        ("ListActivities", json!({}), "/activities/1/id", json!("11")),
        (
            "RegisterWebhook",
            json!({"subscriptionUrl": "https://leadrelay.example.com/webhooks/pipedrive",
                   "eventAction": "*", "eventObject": "deal"}),
            "/webhook/id",
            json!("21"),
        ),
        (
            "ListWebhooks",
            json!({}),
            "/webhooks/0/version",
            json!("2.0"),
        ),
        ("DeleteWebhook", json!({"id": "21"}), "", json!({})),
    ];
    for (rpc, request, pointer, expected) in calls {
        let answer = grpcurl_call(adapter, rpc, request).await?;
        let found = if pointer.is_empty() {
            Some(&answer)
        } else {
            answer.pointer(pointer)
        };
        assert_eq!(found, Some(&expected), "{rpc} answered {answer}");
    }
    let sent = assert_requests_conform(&fake, TOKEN).await;
    assert!(sent >= 19, "{sent} requests reached the fake");
    assert!(!up.logs().contains(TOKEN));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_failure_maps_to_a_code_with_pipedrive_s_message_and_no_secret_is_logged()
-> TestResult {
    let fake = MockServer::start().await;
    let failing = |id: i64, response: ResponseTemplate| {
        Mock::given(method("GET"))
            .and(path(format!("/api/v2/deals/{id}")))
            .respond_with(response)
    };
    // The documents type no error answers; these follow Pipedrive's documented error envelope.
    let error = |status: u16, message: &str| {
        ResponseTemplate::new(status).set_body_json(json!({
            "success": false, "error": message,
            "error_info": "Please check developers.pipedrive.com",
            "data": null, "additional_data": null
        }))
    };
    failing(401, error(401, "unauthorized access"))
        .mount(&fake)
        .await;
    failing(
        403,
        ResponseTemplate::new(403)
            .insert_header("content-type", "text/html; charset=UTF-8")
            .set_body_string(
                "<!DOCTYPE html><html><title>Attention Required! | Cloudflare</title></html>",
            ),
    )
    .mount(&fake)
    .await;
    failing(404, error(404, "Deal not found"))
        .mount(&fake)
        .await;
    failing(
        400,
        ResponseTemplate::new(400).set_body_json(json!({
            "success": false,
            "error": "Validation failed: id: Parameter 'id' must be an integer",
            "code": "ERR_SCHEMA_VALIDATION_FAILED",
            "error_info": "Please check developers.pipedrive.com", "data": null
        })),
    )
    .mount(&fake)
    .await;
    failing(500, error(500, "Internal server error"))
        .mount(&fake)
        .await;
    failing(
        4291,
        ResponseTemplate::new(429)
            .insert_header("x-ratelimit-limit", "40")
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-reset", "1")
            .set_body_json(json!({"success": false, "error": "Request over limit"})),
    )
    .mount(&fake)
    .await;
    failing(
        4292,
        ResponseTemplate::new(429)
            .set_body_json(json!({"success": false, "error": "Too many requests"})),
    )
    .mount(&fake)
    .await;
    failing(
        408,
        ResponseTemplate::new(200)
            .set_delay(Duration::from_secs(3))
            .set_body_json(ok(deal(408))),
    )
    .mount(&fake)
    .await;
    mount(&fake, "GET", "/api/v2/deals/5", ok(deal(5))).await;

    let folder = tempfile::tempdir()?;
    let up = start_up(folder.path(), &fake, "debug")?;
    let mut adapter = PipedriveAdapterServiceClient::new(up.channel("pipedrive-adapter").await?);
    let cases = [
        (401, Code::Unauthenticated, "unauthorized access"),
        (403, Code::Unavailable, "blocked this client"),
        (404, Code::NotFound, "Deal not found"),
        (400, Code::InvalidArgument, "ERR_SCHEMA_VALIDATION_FAILED"),
        (500, Code::Unavailable, "Internal server error"),
        (408, Code::DeadlineExceeded, "did not answer within 1s"),
        (4291, Code::ResourceExhausted, "retry in 1000 ms"),
        (4292, Code::ResourceExhausted, "retry in 2000 ms"),
    ];
    for (id, code, message) in cases {
        let status = adapter
            .get_deal(GetDealRequest { id })
            .await
            .err()
            .ok_or_else(|| format!("deal {id} must fail"))?;
        assert_eq!(status.code(), code, "deal {id}: {}", status.message());
        assert!(
            status.message().contains(message),
            "deal {id}: '{}' lacks '{message}'",
            status.message()
        );
        if code == Code::ResourceExhausted {
            let details = <tonic::Status as tonic_types::StatusExt>::get_error_details(&status);
            assert!(details.retry_info().is_some(), "deal {id}: a retry hint");
        }
    }
    // After the 429s the pace holds: the next call waits for the reset instead of drawing more.
    let started = std::time::Instant::now();
    adapter.get_deal(GetDealRequest { id: 5 }).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A webhook registration sends the password to Pipedrive; it must still never be logged.
    mount_every_operation(&fake).await;
    grpcurl_call(
        up.addr("pipedrive-adapter"),
        "RegisterWebhook",
        json!({"subscriptionUrl": "https://leadrelay.example.com/webhooks/pipedrive",
               "eventAction": "*", "eventObject": "deal"}),
    )
    .await?;
    let logs = up.logs();
    assert!(
        logs.contains("pipedrive call"),
        "debug logging is on: {logs}"
    );
    assert!(!logs.contains(TOKEN), "the API token is in the logs");
    assert!(
        !logs.contains(WEBHOOK_PASSWORD),
        "the webhook password is in the logs"
    );
    Ok(())
}
