//! Pipedrive webhooks in: stored once per `meta.id`, unusable bodies quarantined, on SQLite and on
//! Postgres.

use leadrelay_proto::v1::{GetEventRequest, ListEventsRequest, ListQuarantinedRequest};
use serde_json::{Value, json};

use crate::{
    hana_ingest::{Backend, Harness},
    support::TestResult,
};

const USER: &str = "pipedrive-hook";
const PASSWORD: &str = "pd-hook-secret-41";

async fn post(harness: &Harness, body: &str) -> Result<(u16, Value), crate::support::Error> {
    let answer = harness
        .http
        .post(format!("{}/webhooks/pipedrive", harness.up.gateway_url()))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().await?))
}

/// A v2 webhook body as Pipedrive sends it for a deal marked won.
fn deal_won(meta_id: &str) -> String {
    json!({
        "data": {"id": 123, "title": "Deal 123", "status": "won", "stage_id": 4, "person_id": 7},
        "previous": {"status": "open"},
        "meta": {"action": "change", "entity": "deal", "entity_id": "123", "id": meta_id,
                 "timestamp": "2026-11-20T10:00:00.000Z", "version": "2.0", "company_id": "1",
                 "user_id": "2", "correlation_id": "c-1", "type": "general"}
    })
    .to_string()
}

async fn a_webhook_delivered_twice_is_stored_once(backend: Backend) -> TestResult {
    let mut harness = Harness::start(
        backend,
        &[
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", USER),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD", PASSWORD),
        ],
    )
    .await?;
    let (status, first) = post(&harness, &deal_won("0f1e-meta-1")).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    let (status, again) = post(&harness, &deal_won("0f1e-meta-1")).await?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["event_id"], first["event_id"]);
    // A different delivery of a change to the same deal is a new event.
    let (_, other) = post(&harness, &deal_won("0f1e-meta-2")).await?;
    assert_eq!(other["duplicate"], false);

    let events = harness
        .orchestrator
        .list_events(ListEventsRequest::default())
        .await?
        .into_inner()
        .events;
    let pipedrive: Vec<_> = events
        .iter()
        .filter(|event| event.kind == "deal.change")
        .collect();
    assert_eq!(pipedrive.len(), 2, "{events:?}");
    let stored = harness
        .orchestrator
        .get_event(GetEventRequest {
            id: first["event_id"].as_str().unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner()
        .event
        .ok_or("the event is stored")?;
    assert_eq!(stored.kind, "deal.change");

    // Authenticated but unusable: answered 2xx and kept with the reason.
    let (status, kept) = post(&harness, "{not json").await?;
    assert_eq!(status, 200, "{kept}");
    let (status, _) = post(&harness, r#"{"meta":{"entity":"deal","action":"change"}}"#).await?;
    assert_eq!(status, 200);
    let quarantined = harness
        .orchestrator
        .list_quarantined(ListQuarantinedRequest::default())
        .await?
        .into_inner()
        .calls;
    let reasons: Vec<&str> = quarantined
        .iter()
        .map(|call| call.reason.as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.starts_with("the body is not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|reason| reason.contains("meta.id")),
        "{reasons:?}"
    );
    assert!(!harness.up.logs().contains(PASSWORD));
    harness.finish().await
}

mod sqlite {
    #[tokio::test]
    async fn a_webhook_delivered_twice_is_stored_once() -> crate::support::TestResult {
        super::a_webhook_delivered_twice_is_stored_once(super::Backend::Sqlite).await
    }
}

mod postgres {
    #[tokio::test]
    async fn a_webhook_delivered_twice_is_stored_once() -> crate::support::TestResult {
        super::a_webhook_delivered_twice_is_stored_once(super::Backend::Postgres).await
    }
}
