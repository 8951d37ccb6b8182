//! Pipedrive's `CrmSyncService` over real gRPC against a spec-checked fake Pipedrive: found before
//! created, patched with only what differs, deleted deals marked lost, activities never twice.

mod common;

use leadrelay_proto::v1::{
    Activity, AddActivityRequest, ContactRef, Deal, DealStatus, DeleteDealRequest, ExternalRef,
    GetCapabilitiesRequest, Lead, Money, RemoteKind, SyncOutcome, System, UpsertDealRequest,
    UpsertLeadRequest, crm_sync_service_client::CrmSyncServiceClient,
};
use leadrelay_testkit::pipedrive::{
    DEAL_MARKER_KEY, activity, activity_types, answer, assert_requests_conform,
    crm::{Crm, Fault},
    deal, deal_fields, mount, ok, page, person,
};
use serde_json::{Value, json};
use tonic::transport::Channel;
use wiremock::{
    Mock, MockServer,
    matchers::{method, path, query_param},
};

const TOKEN: &str = "pd-sync-token-3b8e";

async fn sync(fake: &MockServer) -> CrmSyncServiceClient<Channel> {
    // Dropping the token does not stop the server: it runs until the test's runtime ends.
    let (channel, _shutdown) = common::serve(fake, TOKEN, "100/60s").await;
    CrmSyncServiceClient::new(channel)
}

fn link(kind: RemoteKind, id: i64) -> ExternalRef {
    ExternalRef {
        system: System::Pipedrive.into(),
        kind: kind.into(),
        remote_id: id.to_string(),
        linked_at: None,
        closed_at: None,
    }
}

/// The Hana seed's lead.
fn seed_lead(links: Vec<ExternalRef>) -> Lead {
    Lead {
        id: "lead_1".to_owned(),
        name: "Toan Truyen".to_owned(),
        emails: vec!["Toan@Example.com".to_owned()],
        phones: vec!["0978712200".to_owned()],
        external_refs: links,
        ..Default::default()
    }
}

/// Bodies of the requests the fake received for `http_method url_path`.
async fn bodies(fake: &MockServer, http_method: &str, url_path: &str) -> Vec<Value> {
    fake.received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|request| request.method.as_str() == http_method && request.url.path() == url_path)
        .map(|request| serde_json::from_slice(&request.body).unwrap_or(Value::Null))
        .collect()
}

fn no_persons() -> Value {
    json!({"success": true, "data": {"items": []}, "additional_data": {}})
}

#[tokio::test]
async fn capabilities_say_what_pipedrive_can_carry() {
    let fake = MockServer::start().await;
    let capabilities = sync(&fake)
        .await
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert_eq!(capabilities.system(), System::Pipedrive);
    assert!(capabilities.configured && capabilities.syncs_deals && capabilities.adds_activities);
}

#[tokio::test]
async fn a_lead_becomes_one_person_and_a_known_one_is_patched_only_where_it_adds() {
    let fake = MockServer::start().await;
    mount(&fake, "GET", "/api/v2/persons/search", no_persons()).await;
    mount(&fake, "POST", "/api/v2/persons", ok(person(7))).await;
    mount(&fake, "GET", "/api/v2/persons/7", ok(person(7))).await;
    mount(&fake, "PATCH", "/api/v2/persons/7", ok(person(7))).await;
    let mut sync = sync(&fake).await;

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
    assert_eq!(created.refs, vec![link(RemoteKind::PipedrivePerson, 7)]);
    let posted = bodies(&fake, "POST", "/api/v2/persons").await;
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["name"], "Toan Truyen");
    assert_eq!(posted[0]["emails"][0]["value"], "toan@example.com");
    assert_eq!(posted[0]["phones"][0]["value"], "0978712200");

    // Linked and unchanged: read, compared, nothing sent.
    let unchanged = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(vec![link(RemoteKind::PipedrivePerson, 7)])),
            changed_fields: Vec::new(),
            idempotency_key: "job_2".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(unchanged.outcome(), SyncOutcome::Unchanged);
    assert!(bodies(&fake, "PATCH", "/api/v2/persons/7").await.is_empty());

    // A second phone: only the phones are patched, the known one kept first.
    let mut lead = seed_lead(vec![link(RemoteKind::PipedrivePerson, 7)]);
    lead.phones.push("+84 978 712 201".to_owned());
    let updated = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(lead),
            changed_fields: vec!["phones".to_owned()],
            idempotency_key: "job_3".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(updated.outcome(), SyncOutcome::Updated);
    let patched = bodies(&fake, "PATCH", "/api/v2/persons/7").await;
    assert_eq!(patched.len(), 1);
    assert_eq!(
        patched[0],
        json!({"phones": [
            {"value": "0978712200", "primary": true, "label": "work"},
            {"value": "+84 978 712 201", "primary": false, "label": "work"}
        ]})
    );
    assert_requests_conform(&fake, TOKEN).await;
}

#[tokio::test]
async fn a_lead_whose_email_pipedrive_knows_is_not_created_again() {
    let fake = MockServer::start().await;
    mount(
        &fake,
        "GET",
        "/api/v2/persons/search",
        leadrelay_testkit::pipedrive::person_search(),
    )
    .await;
    let mut sync = sync(&fake).await;
    let found = sync
        .upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(Vec::new())),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .expect("UpsertLead")
        .into_inner();
    assert_eq!(found.outcome(), SyncOutcome::Unchanged);
    assert_eq!(found.refs, vec![link(RemoteKind::PipedrivePerson, 7)]);
    let requests = fake.received_requests().await.unwrap_or_default();
    assert_eq!(requests.len(), 1, "one exact search, nothing created");
    assert_eq!(
        requests[0]
            .url
            .query_pairs()
            .find(|(name, _)| name == "term")
            .map(|(_, term)| term.into_owned()),
        Some("toan@example.com".to_owned())
    );
    assert_requests_conform(&fake, TOKEN).await;
}

fn ticket(links: Vec<ExternalRef>, title: &str) -> Deal {
    Deal {
        id: "deal_1".to_owned(),
        title: title.to_owned(),
        value: Some(Money {
            amount: "120.50".to_owned(),
            currency_code: "EUR".to_owned(),
        }),
        status: DealStatus::Open.into(),
        contact: Some(ContactRef {
            lead_id: "lead_1".to_owned(),
            ..Default::default()
        }),
        external_refs: links,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_deal_is_linked_to_its_person_patched_with_what_changed_and_lost_when_deleted() {
    let fake = MockServer::start().await;
    mount(&fake, "POST", "/api/v2/deals", ok(deal(5))).await;
    mount(&fake, "GET", "/api/v2/deals/5", ok(deal(5))).await;
    mount(&fake, "PATCH", "/api/v2/deals/5", ok(deal(5))).await;
    mount(&fake, "GET", "/api/v2/deals", page(json!([deal(3)]), None)).await;
    mount(&fake, "GET", "/api/v1/dealFields", deal_fields()).await;
    let mut sync = sync(&fake).await;
    let contact = seed_lead(vec![link(RemoteKind::PipedrivePerson, 7)]);

    let created = sync
        .upsert_deal(UpsertDealRequest {
            deal: Some(ticket(Vec::new(), "Deal 5")),
            contact: Some(contact.clone()),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .expect("UpsertDeal")
        .into_inner();
    assert_eq!(created.outcome(), SyncOutcome::Created);
    assert!(created.refs.contains(&link(RemoteKind::PipedriveDeal, 5)));
    assert!(created.refs.contains(&link(RemoteKind::PipedrivePerson, 7)));
    // The contact's link is trusted: no call to read the person.
    assert!(bodies(&fake, "GET", "/api/v2/persons/7").await.is_empty());
    let posted = bodies(&fake, "POST", "/api/v2/deals").await;
    assert_eq!(
        posted,
        vec![
            json!({"title": "Deal 5", "value": 120.50, "currency": "EUR", "status": "open", "person_id": 7,
                   "custom_fields": {DEAL_MARKER_KEY: "deal_1"}})
        ]
    );

    // The same deal again: nothing differs (120.50 is 120.5), nothing is sent.
    let again = sync
        .upsert_deal(UpsertDealRequest {
            deal: Some(ticket(vec![link(RemoteKind::PipedriveDeal, 5)], "Deal 5")),
            contact: Some(contact.clone()),
            changed_fields: Vec::new(),
            idempotency_key: "job_2".to_owned(),
        })
        .await
        .expect("UpsertDeal")
        .into_inner();
    assert_eq!(again.outcome(), SyncOutcome::Unchanged);

    // A new title: only the title is patched.
    let renamed = sync
        .upsert_deal(UpsertDealRequest {
            deal: Some(ticket(
                vec![link(RemoteKind::PipedriveDeal, 5)],
                "Deal 5, renamed",
            )),
            contact: Some(contact),
            changed_fields: vec!["title".to_owned()],
            idempotency_key: "job_3".to_owned(),
        })
        .await
        .expect("UpsertDeal")
        .into_inner();
    assert_eq!(renamed.outcome(), SyncOutcome::Updated);
    assert_eq!(
        bodies(&fake, "PATCH", "/api/v2/deals/5").await,
        vec![json!({"title": "Deal 5, renamed"})]
    );

    let deleted = sync
        .delete_deal(DeleteDealRequest {
            deal: Some(ticket(vec![link(RemoteKind::PipedriveDeal, 5)], "Deal 5")),
            reason: String::new(),
            idempotency_key: "job_4".to_owned(),
        })
        .await
        .expect("DeleteDeal")
        .into_inner();
    assert_eq!(deleted.outcome(), SyncOutcome::Updated);
    assert_eq!(
        bodies(&fake, "PATCH", "/api/v2/deals/5").await.last(),
        Some(&json!({"status": "lost", "lost_reason": "deleted in Hana"}))
    );
    assert_requests_conform(&fake, TOKEN).await;
}

/// The caller of a person's creation goes away mid-call (its orchestrator was killed), then two
/// runs of the job race (a runner that lost its lease, and its successor): Pipedrive still holds
/// one person, and every answer names it.
#[tokio::test]
async fn a_caller_gone_mid_create_and_two_racing_runs_still_make_one_person() {
    use std::time::Duration;

    let fake = MockServer::start().await;
    // Person creations are applied at once and answered late, so the first caller has given up
    // before its answer comes, and the two racing runs overlap for as long as their searches and
    // creations take.
    let crm = Crm::with_faults(Box::new(|_, request| {
        if request.method.as_str() == "POST" && request.url.path() == "/api/v2/persons" {
            Fault::SlowAnswer(Duration::from_millis(400))
        } else {
            Fault::None
        }
    }));
    crm.mount(&fake).await;
    let sync = sync(&fake).await;
    let upsert = |mut sync: CrmSyncServiceClient<Channel>| async move {
        sync.upsert_lead(UpsertLeadRequest {
            lead: Some(seed_lead(Vec::new())),
            changed_fields: Vec::new(),
            idempotency_key: "job_1".to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
    };

    let gone = tokio::time::timeout(Duration::from_millis(100), upsert(sync.clone())).await;
    assert!(
        gone.is_err(),
        "the caller gave up before Pipedrive answered"
    );
    let (first, second) = tokio::join!(upsert(sync.clone()), upsert(sync.clone()));
    let person = {
        let records = crm.records();
        assert_eq!(
            records.persons.len(),
            1,
            "one person: {:?}",
            records.persons
        );
        *records.persons.keys().next().expect("one person")
    };
    for answer in [first, second] {
        assert_eq!(
            answer.expect("UpsertLead").refs,
            vec![link(RemoteKind::PipedrivePerson, person)]
        );
    }
}

#[tokio::test]
async fn a_deal_whose_creation_timed_out_is_found_by_its_marker_not_created_twice() {
    use std::time::Duration;

    let fake = MockServer::start().await;
    // The first deal creation is applied, but its answer comes after the adapter gave up.
    let crm = Crm::with_faults(Box::new(|_, request| {
        let first_post = request.method.as_str() == "POST" && request.url.path() == "/api/v2/deals";
        if first_post {
            Fault::SlowAnswer(Duration::from_secs(3))
        } else {
            Fault::None
        }
    }));
    crm.mount(&fake).await;
    let person = crm.add_person("Toan Truyen", "toan@example.com");
    let (channel, _shutdown) = common::serve_with(
        &fake,
        TOKEN,
        "100/60s",
        &[("LEADRELAY_PIPEDRIVE_TIMEOUT", "1s")],
    )
    .await;
    let mut sync = CrmSyncServiceClient::new(channel);
    let request = UpsertDealRequest {
        deal: Some(ticket(Vec::new(), "Chat ticket")),
        contact: Some(seed_lead(Vec::new())),
        changed_fields: Vec::new(),
        idempotency_key: "job_1".to_owned(),
    };

    let timed_out = sync.upsert_deal(request.clone()).await;
    assert_eq!(
        timed_out.err().map(|status| status.code()),
        Some(tonic::Code::DeadlineExceeded),
        "a timeout is transient: the runner retries it"
    );
    assert_eq!(
        crm.records().deals.len(),
        1,
        "the deal was created all the same"
    );

    let retried = sync
        .upsert_deal(UpsertDealRequest {
            idempotency_key: "job_1".to_owned(),
            ..request
        })
        .await
        .expect("UpsertDeal")
        .into_inner();
    {
        let records = crm.records();
        assert_eq!(records.deals.len(), 1, "the retry found the deal");
        let (id, created) = records.deals.iter().next().expect("one deal");
        assert!(retried.refs.contains(&link(RemoteKind::PipedriveDeal, *id)));
        assert!(
            retried
                .refs
                .contains(&link(RemoteKind::PipedrivePerson, person))
        );
        assert_eq!(created["person_id"], json!(person));
        assert_eq!(
            records.deal_fields.len(),
            1,
            "the marker field was added once"
        );
        let key = records.deal_fields[0]["key"].as_str().unwrap_or_default();
        assert_eq!(created["custom_fields"][key], json!("deal_1"));
    }
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    assert_requests_conform(&fake, TOKEN).await;
}

#[tokio::test]
async fn a_token_that_may_not_add_the_marker_field_still_creates_deals() {
    let fake = MockServer::start().await;
    mount(
        &fake,
        "GET",
        "/api/v1/dealFields",
        json!({"success": true, "data": [], "additional_data": {"start": 0, "limit": 500, "more_items_in_collection": false}}),
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/dealFields"))
        .respond_with(wiremock::ResponseTemplate::new(403).set_body_json(json!({
            "success": false, "error": "You do not have permissions to add fields",
            "errorCode": 403, "error_info": "Please check developers.pipedrive.com"
        })))
        .mount(&fake)
        .await;
    mount(&fake, "POST", "/api/v2/deals", ok(deal(5))).await;
    let mut sync = sync(&fake).await;
    let contact = seed_lead(vec![link(RemoteKind::PipedrivePerson, 7)]);
    for key in ["job_1", "job_2"] {
        let created = sync
            .upsert_deal(UpsertDealRequest {
                deal: Some(ticket(Vec::new(), "Deal 5")),
                contact: Some(contact.clone()),
                changed_fields: Vec::new(),
                idempotency_key: key.to_owned(),
            })
            .await
            .expect("UpsertDeal")
            .into_inner();
        assert_eq!(created.outcome(), SyncOutcome::Created);
    }
    let posted = bodies(&fake, "POST", "/api/v2/deals").await;
    assert!(
        posted
            .iter()
            .all(|body| body.get("custom_fields").is_none()),
        "{posted:?}"
    );
    assert_eq!(
        bodies(&fake, "POST", "/api/v1/dealFields").await.len(),
        1,
        "the refusal is remembered, not asked again per deal"
    );
}

#[tokio::test]
async fn the_conversation_link_is_added_once_whatever_the_retries() {
    let fake = MockServer::start().await;
    mount(&fake, "GET", "/api/v1/activityTypes", activity_types()).await;
    mount(&fake, "POST", "/api/v2/activities", ok(activity(11))).await;
    // The deal has no activity yet; after the first add, it has the one with our marker.
    Mock::given(method("GET"))
        .and(path("/api/v2/activities"))
        .and(query_param("deal_id", "5"))
        .respond_with(answer(
            "GET",
            "/api/v2/activities",
            200,
            page(json!([]), None),
        ))
        .up_to_n_times(1)
        .mount(&fake)
        .await;
    let mut added = activity(11);
    added["note"] = json!("<p>https://bot.hana.ai/c/1</p><p>LeadRelay: job_9</p>");
    Mock::given(method("GET"))
        .and(path("/api/v2/activities"))
        .and(query_param("deal_id", "5"))
        .respond_with(answer(
            "GET",
            "/api/v2/activities",
            200,
            page(json!([added]), None),
        ))
        .mount(&fake)
        .await;
    let mut sync = sync(&fake).await;
    let request = AddActivityRequest {
        activity: Some(Activity {
            subject: "Hana conversation".to_owned(),
            r#type: "call".to_owned(),
            note: "<p>https://bot.hana.ai/c/1</p>".to_owned(),
            ..Default::default()
        }),
        deal: Some(ticket(vec![link(RemoteKind::PipedriveDeal, 5)], "Deal 5")),
        contact: Some(seed_lead(vec![link(RemoteKind::PipedrivePerson, 7)])),
        idempotency_key: "job_9".to_owned(),
    };
    // Without a note, the deal's conversation link is the note.
    let mut from_the_deal = request.clone();
    from_the_deal.idempotency_key = "job_10".to_owned();
    if let Some(activity) = from_the_deal.activity.as_mut() {
        activity.note.clear();
    }
    if let Some(deal) = from_the_deal.deal.as_mut() {
        deal.conversation_url = "https://bot.hana.ai/c/2?a=1&b=2".to_owned();
    }
    let first = sync
        .add_activity(request.clone())
        .await
        .expect("AddActivity")
        .into_inner();
    assert_eq!(first.outcome(), SyncOutcome::Created);
    let retry = sync
        .add_activity(request)
        .await
        .expect("AddActivity")
        .into_inner();
    assert_eq!(retry.outcome(), SyncOutcome::Unchanged);
    assert_eq!(retry.refs, vec![link(RemoteKind::PipedriveActivity, 11)]);
    let posted = bodies(&fake, "POST", "/api/v2/activities").await;
    assert_eq!(posted.len(), 1, "added once");
    sync.add_activity(from_the_deal)
        .await
        .expect("AddActivity with the conversation link");
    let with_link = bodies(&fake, "POST", "/api/v2/activities").await;
    assert_eq!(
        with_link.last().map(|body| body["note"].clone()),
        Some(json!(
            "<p>Hana conversation: <a href=\"https://bot.hana.ai/c/2?a=1&amp;b=2\">https://bot.hana.ai/c/2?a=1&amp;b=2</a></p><p>LeadRelay: job_10</p>"
        ))
    );
    assert_eq!(
        posted[0]["participants"],
        json!([{"person_id": 7, "primary": true}])
    );
    assert_eq!(posted[0]["deal_id"], 5);
    assert!(posted[0]["note"].as_str().is_some_and(
        |note| note.contains("https://bot.hana.ai/c/1") && note.contains("LeadRelay: job_9")
    ));
    assert_requests_conform(&fake, TOKEN).await;
}
