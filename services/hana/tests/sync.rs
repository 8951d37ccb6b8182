//! Hana's `CrmSyncService` over real gRPC: the CRMs' remote ids and a deal's status written back
//! into the Hana lead and ticket; what Hana's API cannot do is answered NOT_SUPPORTED without a
//! call.

mod common;

use leadrelay_proto::v1::{
    Deal, DealStatus, DeleteDealRequest, ExternalRef, GetCapabilitiesRequest, Lead, RemoteKind,
    SourceRef, SyncOutcome, System, UpsertDealRequest, UpsertLeadRequest,
    crm_sync_service_client::CrmSyncServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method},
};

const TOKEN: &str = "hana-sync-token-b4c2";

async fn serve_sync(server: &MockServer) -> CrmSyncServiceClient<Channel> {
    CrmSyncServiceClient::new(common::serve(format!("{}/update", server.uri()), TOKEN).await)
}

fn link(system: System, kind: RemoteKind, id: &str) -> ExternalRef {
    ExternalRef {
        system: system.into(),
        kind: kind.into(),
        remote_id: id.to_owned(),
        linked_at: None,
        closed_at: None,
    }
}

fn from_hana(id: &str) -> Option<SourceRef> {
    Some(SourceRef {
        system: System::Hana.into(),
        app_id: "app".to_owned(),
        remote_id: id.to_owned(),
    })
}

#[tokio::test]
async fn remote_ids_and_deal_status_are_written_back_into_hana() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&server)
        .await;
    let mut sync = serve_sync(&server).await;

    let lead = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(Lead {
                id: "lead_1".to_owned(),
                source: from_hana("e734c76a"),
                external_refs: vec![
                    link(System::Pipedrive, RemoteKind::PipedrivePerson, "7"),
                    link(System::Salesman, RemoteKind::SalesmanLead, "940"),
                ],
                ..Default::default()
            }),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(lead.outcome(), SyncOutcome::Updated);

    let deal = sync
        .upsert_deal(UpsertDealRequest {
            deal: Some(Deal {
                id: "deal_1".to_owned(),
                source: from_hana("7ad14152"),
                status: DealStatus::Lost.into(),
                lost_reason: "Chose a competitor".to_owned(),
                stage_id: "4".to_owned(),
                external_refs: vec![link(System::Pipedrive, RemoteKind::PipedriveDeal, "5")],
                ..Default::default()
            }),
            contact: None,
            changed_fields: vec!["status".to_owned()],
            idempotency_key: "job_2".to_owned(),
        })
        .await
        .expect("UpsertDeal")
        .into_inner();
    assert_eq!(deal.outcome(), SyncOutcome::Updated);

    let bodies: Vec<Value> = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap_or_default())
        .collect();
    assert_eq!(
        bodies,
        vec![
            json!({"lead": {"id": "e734c76a", "cf_string_pipedrive_person_id": "7",
                            "cf_string_salesman_lead_id": "940"}}),
            json!({"opportunity": {"id": "7ad14152", "cf_string_pipedrive_deal_id": "5",
                                   "cf_string_deal_status": "lost",
                                   "cf_string_lost_reason": "Chose a competitor",
                                   "cf_string_deal_stage_id": "4"}}),
        ]
    );
}

#[tokio::test]
async fn what_hana_cannot_do_is_not_supported_and_sends_nothing() {
    let server = MockServer::start().await;
    let mut sync = serve_sync(&server).await;
    // A lead that did not come from Hana has no Hana record to write into.
    let elsewhere = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(Lead {
                id: "lead_2".to_owned(),
                source: Some(SourceRef {
                    system: System::Pipedrive.into(),
                    app_id: String::new(),
                    remote_id: "7".to_owned(),
                }),
                ..Default::default()
            }),
            changed_fields: Vec::new(),
            idempotency_key: "job_3".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(elsewhere.outcome(), SyncOutcome::NotSupported);
    let deleted = sync
        .delete_deal(DeleteDealRequest::default())
        .await
        .expect("DeleteDeal")
        .into_inner();
    assert_eq!(deleted.outcome(), SyncOutcome::NotSupported);
    // Nothing to write: unchanged, no call.
    let nothing = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(Lead {
                id: "lead_3".to_owned(),
                source: from_hana("abc"),
                ..Default::default()
            }),
            changed_fields: Vec::new(),
            idempotency_key: "job_4".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(nothing.outcome(), SyncOutcome::Unchanged);
    assert!(
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
    let capabilities = sync
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(capabilities.configured && capabilities.updates_leads && !capabilities.creates_leads);
}
