//! The Hana adapter's native RPCs over real gRPC, against a wiremock Hana update endpoint that
//! expects what the Hana developer document shows: `POST`, `Authorization: Bearer <token>`, JSON
//! `{"lead": {"id": …, <attribute>: <plain value>}}` or `{"opportunity": {…}}`.

mod common;

use std::collections::BTreeMap;

use leadrelay_proto::{
    hana::v1::{
        UpdateLeadRequest, UpdateOpportunityRequest,
        hana_adapter_service_client::HanaAdapterServiceClient,
    },
    json::to_proto_value,
};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path},
};

const TOKEN: &str = "hana-access-token-7f31";

async fn serve_adapter(server: &MockServer) -> HanaAdapterServiceClient<Channel> {
    HanaAdapterServiceClient::new(
        common::serve(format!("{}/partner/update", server.uri()), TOKEN).await,
    )
}

fn attributes(values: Value) -> BTreeMap<String, prost_types::Value> {
    let Value::Object(fields) = values else {
        return BTreeMap::new();
    };
    fields
        .into_iter()
        .map(|(name, value)| (name, to_proto_value(value)))
        .collect()
}

async fn bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap_or(Value::Null))
        .collect()
}

#[tokio::test]
async fn updates_send_the_documented_body_with_plain_values() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/partner/update"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&server)
        .await;
    let mut adapter = serve_adapter(&server).await;

    let answer = adapter
        .update_lead(UpdateLeadRequest {
            id: "3ee8e2ea-d149-4e24-98f0-072900b0b9f3".to_owned(),
            attributes: attributes(json!({
                "baseName": "Thu Hương", "basePhonenumber": "+84395458994",
                "baseSourceInput": ["Youtube", "Sendo"], "cf_number_diem_viral": 3,
                "cf_date_ngay_mua": "2020-02-12T00:00:00.000+0700"
            })),
        })
        .await
        .expect("UpdateLead")
        .into_inner();
    assert_eq!(
        answer
            .response
            .map(|value| leadrelay_proto::json::from_proto_value(&value)),
        Some(json!({"success": true}))
    );
    adapter
        .update_opportunity(UpdateOpportunityRequest {
            id: "7ad14152-9be8-442d-bf0f-33c94b5db16d".to_owned(),
            attributes: attributes(json!({"baseName": "Cập nhật ticket", "dealValue": 1_000_000})),
        })
        .await
        .expect("UpdateOpportunity");
    assert_eq!(
        bodies(&server).await,
        vec![
            json!({"lead": {"id": "3ee8e2ea-d149-4e24-98f0-072900b0b9f3", "baseName": "Thu Hương",
                   "basePhonenumber": "+84395458994", "baseSourceInput": ["Youtube", "Sendo"],
                   "cf_number_diem_viral": 3, "cf_date_ngay_mua": "2020-02-12T00:00:00.000+0700"}}),
            json!({"opportunity": {"id": "7ad14152-9be8-442d-bf0f-33c94b5db16d",
                   "baseName": "Cập nhật ticket", "dealValue": 1_000_000}}),
        ]
    );
}

#[tokio::test]
async fn an_update_hana_would_refuse_is_refused_before_sending() {
    let server = MockServer::start().await;
    let mut adapter = serve_adapter(&server).await;
    for (id, values) in [
        ("", json!({"baseName": "x"})),
        ("lead-1", json!({})),
        ("lead-1", json!({"id": "other"})),
        (
            "lead-1",
            json!({"baseName": {"nomalizeData": "x", "rawData": "x"}}),
        ),
        ("lead-1", json!({"baseSourceInput": [{"a": 1}]})),
    ] {
        let refused = adapter
            .update_lead(UpdateLeadRequest {
                id: id.to_owned(),
                attributes: attributes(values.clone()),
            })
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{values}: {}",
            refused.message()
        );
    }
    assert!(
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn hana_s_failures_map_to_codes_with_its_message() {
    let server = MockServer::start().await;
    let cases = [
        (
            "lead-401",
            ResponseTemplate::new(401).set_body_json(json!({"message": "Token expired"})),
            Code::Unauthenticated,
            "Token expired",
        ),
        (
            "lead-404",
            ResponseTemplate::new(404).set_body_json(json!({"message": "Lead not found"})),
            Code::NotFound,
            "Lead not found",
        ),
        (
            "lead-400",
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": {"message": "Invalid attribute cf_x"}})),
            Code::InvalidArgument,
            "Invalid attribute cf_x",
        ),
        (
            "lead-refused",
            ResponseTemplate::new(200)
                .set_body_json(json!({"success": false, "message": "Unknown attribute"})),
            Code::InvalidArgument,
            "Unknown attribute",
        ),
        (
            "lead-429",
            ResponseTemplate::new(429).insert_header("retry-after", "7"),
            Code::ResourceExhausted,
            "retry in 7 s",
        ),
        (
            "lead-502",
            ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>"),
            Code::Unavailable,
            "Bad Gateway",
        ),
    ];
    for (id, response, ..) in &cases {
        Mock::given(method("POST"))
            .and(wiremock::matchers::body_partial_json(
                json!({"lead": {"id": id}}),
            ))
            .respond_with(response.clone())
            .mount(&server)
            .await;
    }
    let mut adapter = serve_adapter(&server).await;
    for (id, _, code, message) in cases {
        let status = adapter
            .update_lead(UpdateLeadRequest {
                id: id.to_owned(),
                attributes: attributes(json!({"baseName": "x"})),
            })
            .await
            .expect_err("fails");
        assert_eq!(status.code(), code, "{id}: {}", status.message());
        assert!(
            status.message().contains(message),
            "{id}: {}",
            status.message()
        );
        assert!(!status.message().contains(TOKEN));
    }
}
