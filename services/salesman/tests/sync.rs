//! SalesMan's `CrmSyncService` over real gRPC against the documented fake: a lead is added once,
//! found by its marker after a lost link, and updates v1 cannot express are reported as such.

mod common;

use std::sync::{Arc, Mutex};

use leadrelay_proto::v1::{
    DeleteLeadRequest, ExternalRef, GetCapabilitiesRequest, Lead, RemoteKind, SyncOutcome, System,
    UpsertDealRequest, UpsertLeadRequest, crm_sync_service_client::CrmSyncServiceClient,
};
use leadrelay_testkit::salesman::{self, lead_record, v1};
use serde_json::json;
use tonic::transport::Channel;
use wiremock::MockServer;

const LOGIN: &str = "manager@isaler.ru";
const API_KEY: &str = "sm-sync-key-8a1c";

async fn serve_sync(server: &MockServer) -> CrmSyncServiceClient<Channel> {
    CrmSyncServiceClient::new(common::serve(server.uri(), LOGIN, API_KEY).await)
}

fn seed_lead(links: Vec<ExternalRef>) -> Lead {
    Lead {
        id: "lead_0196a".to_owned(),
        name: "Toan Truyen".to_owned(),
        emails: vec!["toan@example.com".to_owned()],
        phones: vec!["0978712200".to_owned()],
        source_channels: vec!["Youtube".to_owned(), "Sendo".to_owned()],
        conversation_url: "https://bot.hana.ai/apps/1/chats/2".to_owned(),
        external_refs: links,
        ..Default::default()
    }
}

fn salesman_ref(id: &str) -> ExternalRef {
    ExternalRef {
        system: System::Salesman.into(),
        kind: RemoteKind::SalesmanLead.into(),
        remote_id: id.to_owned(),
        linked_at: None,
        closed_at: None,
    }
}

/// A SalesMan whose `add` answers lead `id` after `delay`, and whose v1 `list` (the newest 200
/// leads) never shows the lead just added, so only the adapter's own memory can find it again.
/// Returns the number of adds it received.
async fn mount_hiding_new_leads(
    server: &MockServer,
    id: i64,
    delay: std::time::Duration,
) -> Arc<Mutex<usize>> {
    let adds = Arc::new(Mutex::new(0));
    salesman::mount(server, LOGIN, API_KEY, {
        let adds = adds.clone();
        move |fields| match fields.get("action").map(String::as_str) {
            Some("add") => {
                *adds.lock().expect("adds") += 1;
                v1(&json!({"result":{"text":"Success","id":id}})).set_delay(delay)
            }
            Some("list") => v1(&json!({"data": [lead_record(1200, 0)]})),
            _ => v1(&json!({"result":"Error","error":{"code":"402","text":"Неизвестный метод"}})),
        }
    })
    .await;
    adds
}

#[tokio::test]
async fn a_lead_hidden_by_200_newer_ones_is_still_not_added_twice_by_the_same_adapter() {
    let server = MockServer::start().await;
    let adds = mount_hiding_new_leads(&server, 941, std::time::Duration::ZERO).await;
    let mut sync = serve_sync(&server).await;
    for key in ["job_1", "job_1"] {
        let answer = sync
            .upsert_lead(UpsertLeadRequest {
                lead: Some(seed_lead(Vec::new())),
                changed_fields: Vec::new(),
                idempotency_key: key.to_owned(),
            })
            .await
            .expect("UpsertLead")
            .into_inner();
        assert_eq!(answer.refs, vec![salesman_ref("941")]);
    }
    assert_eq!(*adds.lock().expect("adds"), 1, "added once");
}

/// The caller of an add goes away mid-call (its orchestrator was killed), and two runs of one
/// job race (a runner that lost its lease and its successor): SalesMan still gets one add, and
/// the retry gets the lead that add made.
#[tokio::test]
async fn a_caller_gone_mid_add_and_two_racing_runs_still_add_the_lead_once() {
    let server = MockServer::start().await;
    // Slow enough for the caller to give up first; SalesMan adds it anyway.
    let adds = mount_hiding_new_leads(&server, 942, std::time::Duration::from_millis(400)).await;
    let sync = serve_sync(&server).await;
    let upsert = |mut sync: CrmSyncServiceClient<Channel>| async move {
        sync.upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(Vec::new())),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
    };

    let gone = tokio::time::timeout(std::time::Duration::from_millis(100), upsert(sync.clone()));
    assert!(
        gone.await.is_err(),
        "the caller gave up before SalesMan answered"
    );
    let (first, second) = tokio::join!(upsert(sync.clone()), upsert(sync.clone()));
    for answer in [first, second] {
        assert_eq!(answer.expect("UpsertLead").refs, vec![salesman_ref("942")]);
    }
    assert_eq!(*adds.lock().expect("adds"), 1, "added once");
}

#[tokio::test]
async fn a_lead_is_added_once_and_found_again_by_its_marker() {
    let server = MockServer::start().await;
    // SalesMan as it stores leads: after an add, the newest list shows it, description untagged.
    let added: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = salesman::mount(&server, LOGIN, API_KEY, {
        let added = added.clone();
        move |fields| match fields.get("action").map(String::as_str) {
            Some("add") => {
                added
                    .lock()
                    .expect("added")
                    .push(fields.get("description").cloned().unwrap_or_default());
                v1(&json!({"result":{"text":"Success","id":940}}))
            }
            Some("list") => {
                let rows: Vec<_> = added
                    .lock()
                    .expect("added")
                    .iter()
                    .map(|description| {
                        let mut row = lead_record(940, 0);
                        row["content"] = json!(salesman_untag(description));
                        row
                    })
                    .collect();
                if rows.is_empty() {
                    v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}}))
                } else {
                    v1(&json!({ "data": rows }))
                }
            }
            _ => v1(&json!({"result":"Error","error":{"code":"402","text":"Неизвестный метод"}})),
        }
    })
    .await;
    let mut sync = serve_sync(&server).await;

    let created = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(Vec::new())),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(created.outcome(), SyncOutcome::Created);
    assert_eq!(created.refs, vec![salesman_ref("940")]);
    let fields = seen
        .lock()
        .expect("seen")
        .last()
        .cloned()
        .unwrap_or_default();
    assert_eq!(fields.get("title").map(String::as_str), Some("Toan Truyen"));
    assert_eq!(
        fields.get("email").map(String::as_str),
        Some("toan@example.com")
    );
    assert_eq!(fields.get("phone").map(String::as_str), Some("0978712200"));
    assert_eq!(fields.get("utm_source").map(String::as_str), Some("hana"));

    // The link was lost (a crash before its commit) and the adapter restarted too: the retry
    // finds the lead by its marker, adds nothing.
    let retried = serve_sync(&server)
        .await
        .upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(Vec::new())),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(retried.outcome(), SyncOutcome::Unchanged);
    assert_eq!(retried.refs, vec![salesman_ref("940")]);
    assert_eq!(added.lock().expect("added").len(), 1, "added once");

    // Linked: v1 cannot update a lead, and says so without a call.
    let calls = seen.lock().expect("seen").len();
    let update = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(vec![salesman_ref("940")])),
            changed_fields: vec!["phones".to_owned()],
            idempotency_key: "job_2".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(update.outcome(), SyncOutcome::NotSupported);
    assert_eq!(update.refs, vec![salesman_ref("940")]);
    let deleted = sync
        .delete_lead(DeleteLeadRequest {
            lead: Some(seed_lead(vec![salesman_ref("940")])),
            idempotency_key: "job_3".to_owned(),
        })
        .await
        .expect("DeleteLead")
        .into_inner();
    assert_eq!(deleted.outcome(), SyncOutcome::NotSupported);
    let deal = sync
        .upsert_deal(UpsertDealRequest::default())
        .await
        .expect("UpsertDeal")
        .into_inner();
    assert_eq!(deal.outcome(), SyncOutcome::NotSupported);
    assert_eq!(seen.lock().expect("seen").len(), calls, "nothing sent");

    let capabilities = sync
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(capabilities.configured && capabilities.creates_leads);
    assert!(!capabilities.updates_leads && !capabilities.syncs_deals);
}

/// What SalesMan's `untag()` (PHP `strip_tags`, then removing `" ' \ ` « » < >`) leaves of a
/// text, written apart from the adapter's own normalisation.
fn salesman_untag(text: &str) -> String {
    let stripped: String = text
        .split('<')
        .enumerate()
        .map(|(index, part)| {
            if index == 0 {
                part
            } else {
                part.split_once('>').map_or("", |(_, after)| after)
            }
        })
        .collect();
    ["\"", "'", "\\", "`", "«", "»", "<", ">"]
        .iter()
        .fold(stripped, |text, removed| text.replace(removed, ""))
}
