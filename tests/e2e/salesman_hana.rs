//! The SalesMan and Hana adapters inside `leadrelay up`, pointed at fakes that answer as their
//! documents say: every native RPC through a real grpcurl, and with debug logging on, neither the
//! SalesMan API key nor the Hana token in any log line.

use leadrelay_testkit::salesman;
use serde_json::json;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path},
};

use crate::support::{TestResult, Up, grpcurl};

const LOGIN: &str = "manager@isaler.ru";
const API_KEY: &str = "sm-api-key-2f9d41";
const HANA_TOKEN: &str = "hana-token-c81e55";

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_calls_every_native_rpc_of_salesman_and_hana_and_no_secret_is_logged() -> TestResult
{
    let salesman_fake = MockServer::start().await;
    let seen = salesman::mount(&salesman_fake, LOGIN, API_KEY, salesman::documented_answers).await;
    let hana_fake = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/external-api/v1.0/update"))
        .and(header(
            "authorization",
            format!("Bearer {HANA_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;

    let folder = tempfile::tempdir()?;
    let salesman_url = salesman_fake.uri();
    let hana_url = format!("{}/external-api/v1.0/update", hana_fake.uri());
    let up = Up::start(
        folder.path(),
        &[
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", API_KEY),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", HANA_TOKEN),
            ("RUST_LOG", "debug"),
        ],
    )?;
    let salesman_adapter = up.addr("salesman-adapter");
    let call = |rpc: &str| format!("leadrelay.salesman.v1.SalesManAdapterService/{rpc}");

    let added = grpcurl(
        salesman_adapter,
        &call("AddLead"),
        &json!({"title": "Toan Truyen", "email": "toan@example.com", "phone": "0978712200",
                "description": "Заявка из Hana", "utmSource": "hana"}),
    )
    .await?;
    assert_eq!(added, vec![json!({"id": "940", "text": "Success"})]);
    let lead = grpcurl(salesman_adapter, &call("GetLead"), &json!({"id": "7"})).await?;
    assert_eq!(lead[0]["lead"]["status"], "LEAD_STATUS_IN_WORK");
    assert_eq!(lead[0]["lead"]["statusName"], "В работе");
    let listed = grpcurl(salesman_adapter, &call("ListLeads"), &json!({})).await?;
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|item| item["lead"]["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["3", "2", "1"]);
    let stats = grpcurl(salesman_adapter, &call("GetLeadStats"), &json!({})).await?;
    assert_eq!(stats[0]["users"][0]["login"], "vladislav@isaler.ru");
    assert_eq!(stats[0]["users"][0]["open"], 2);

    let hana_adapter = up.addr("hana-adapter");
    for (rpc, id) in [
        ("UpdateLead", "3ee8e2ea-d149-4e24-98f0-072900b0b9f3"),
        ("UpdateOpportunity", "7ad14152-9be8-442d-bf0f-33c94b5db16d"),
    ] {
        let answer = grpcurl(
            hana_adapter,
            &format!("leadrelay.hana.v1.HanaAdapterService/{rpc}"),
            &json!({"id": id, "attributes": {"cf_string_salesman_id": "940", "dealValue": 1000000}}),
        )
        .await?;
        assert_eq!(
            answer,
            vec![json!({"response": {"success": true}})],
            "{rpc}"
        );
    }
    let hana_bodies: Vec<serde_json::Value> = hana_fake
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap_or_default())
        .collect();
    assert_eq!(
        hana_bodies[1],
        json!({"opportunity": {"id": "7ad14152-9be8-442d-bf0f-33c94b5db16d",
                               "cf_string_salesman_id": "940", "dealValue": 1000000}})
    );

    // Every SalesMan call carried the key in its body (the fake refuses others), one lead was
    // added, and the logs carry the key nowhere.
    let adds = salesman::calls(&seen, "add");
    assert_eq!(adds, 1);
    let logs = up.logs();
    assert!(logs.contains("salesman call"), "debug logging is on");
    assert!(logs.contains("hana update"), "debug logging is on");
    assert!(
        !logs.contains(API_KEY),
        "the SalesMan API key is in the logs"
    );
    assert!(!logs.contains(HANA_TOKEN), "the Hana token is in the logs");
    Ok(())
}
