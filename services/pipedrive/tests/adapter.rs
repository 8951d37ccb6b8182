//! The Pipedrive adapter's native RPCs over real gRPC, against a wiremock Pipedrive whose answers
//! follow the official OpenAPI documents. Every request the adapter sends is checked against the
//! v2 document (v1 for webhooks): method, path, query and JSON body.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use leadrelay_proto::pipedrive::v1::{
    AddActivityRequest, AddDealRequest, CreatePersonRequest, DealStatus, DeleteWebhookRequest,
    GetDealRequest, GetStageRequest, ListActivitiesRequest, ListDealsRequest,
    ListNewActivitiesRequest, ListNewDealsRequest, ListStagesRequest, ListWebhooksRequest,
    RegisterWebhookRequest, SearchPersonsRequest, StringValues, UpdateDealRequest,
    UpdateDealStageRequest, UpdateDealStatusRequest, UpdatePersonRequest,
    pipedrive_adapter_service_client::PipedriveAdapterServiceClient,
};
use leadrelay_testkit::pipedrive::{
    activity_types, assert_requests_conform, deal, mount, mount_every_operation, ok, stage,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{method, path},
};

mod common;

const TOKEN: &str = "pd-adapter-token-91c3";

/// The adapter's native face, served on a random port against `server`.
async fn adapter(
    server: &MockServer,
    rate_limit: &str,
) -> (PipedriveAdapterServiceClient<Channel>, CancellationToken) {
    let (channel, shutdown) = common::serve(server, TOKEN, rate_limit).await;
    (PipedriveAdapterServiceClient::new(channel), shutdown)
}

#[tokio::test]
async fn every_native_rpc_sends_what_the_official_document_accepts() {
    let server = MockServer::start().await;
    mount_every_operation(&server).await;
    let (mut adapter, shutdown) = adapter(&server, "100/60s").await;

    let added = adapter
        .add_deal(AddDealRequest {
            title: "Deal 5".to_owned(),
            person_id: 7,
            value: "120.50".to_owned(),
            currency: "eur".to_owned(),
            status: DealStatus::Open.into(),
            expected_close_date: "2026-12-01".to_owned(),
            visible_to: 3,
            custom_fields: Some(leadrelay_proto::json::to_proto_struct(
                json!({"9f3b": "chat"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )),
            ..Default::default()
        })
        .await
        .expect("AddDeal")
        .into_inner()
        .deal
        .expect("a deal");
    assert_eq!(
        (added.id, added.value.as_str(), added.person_id),
        (5, "120.5", 7)
    );

    let got = adapter
        .get_deal(GetDealRequest { id: 5 })
        .await
        .expect("GetDeal")
        .into_inner();
    assert_eq!(got.deal.expect("a deal").currency, "EUR");

    adapter
        .update_deal(UpdateDealRequest {
            id: 5,
            title: Some("Renamed".to_owned()),
            value: Some("99".to_owned()),
            ..Default::default()
        })
        .await
        .expect("UpdateDeal");
    adapter
        .update_deal_status(UpdateDealStatusRequest {
            id: 5,
            status: DealStatus::Lost.into(),
            lost_reason: "Chose a competitor".to_owned(),
        })
        .await
        .expect("UpdateDealStatus lost");

    adapter
        .update_deal_stage(UpdateDealStageRequest {
            id: 5,
            pipeline_id: 1,
            stage_id: 2,
            expected_close_date: "2026-12-24".to_owned(),
        })
        .await
        .expect("UpdateDealStage");
    let got = adapter
        .get_stage(GetStageRequest { id: 2 })
        .await
        .expect("GetStage")
        .into_inner();
    assert_eq!(got.stage.expect("a stage").pipeline_id, 1);

    let stages = adapter
        .list_stages(ListStagesRequest { pipeline_id: 1 })
        .await
        .expect("ListStages")
        .into_inner()
        .stages;
    assert_eq!(
        stages.iter().map(|stage| stage.id).collect::<Vec<_>>(),
        vec![2, 3]
    );

    let created = adapter
        .add_activity(AddActivityRequest {
            subject: "Call 11".to_owned(),
            r#type: "call".to_owned(),
            deal_id: 5,
            person_id: 7,
            due_date: "2026-11-22".to_owned(),
            due_time: "09:30".to_owned(),
            duration: "00:30".to_owned(),
            note: "<p>https://bot.hana.ai/c/1</p>".to_owned(),
            ..Default::default()
        })
        .await
        .expect("AddActivity")
        .into_inner()
        .activity
        .expect("an activity");
    assert_eq!(created.person_id, 7);

    let new = adapter
        .list_new_deals(ListNewDealsRequest {
            after_id: 7,
            limit: 0,
        })
        .await
        .expect("ListNewDeals")
        .into_inner();
    assert_eq!(
        new.deals.iter().map(|deal| deal.id).collect::<Vec<_>>(),
        vec![8, 9]
    );
    assert_eq!(new.next_after_id, 9);
    let all = adapter
        .list_deals(ListDealsRequest {
            updated_since: Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 0,
            }),
        })
        .await
        .expect("ListDeals")
        .into_inner();
    assert_eq!(all.deals.len(), 3);

    let new = adapter
        .list_new_activities(ListNewActivitiesRequest {
            after_id: 0,
            limit: 2,
        })
        .await
        .expect("ListNewActivities")
        .into_inner();
    assert_eq!(new.next_after_id, 12);
    adapter
        .list_activities(ListActivitiesRequest {
            updated_since: None,
        })
        .await
        .expect("ListActivities");

    let found = adapter
        .search_persons(SearchPersonsRequest {
            email: "Toan@Example.com".to_owned(),
            phone: String::new(),
        })
        .await
        .expect("SearchPersons")
        .into_inner()
        .persons;
    assert_eq!(found[0].emails, vec!["toan@example.com"]);

    adapter
        .create_person(CreatePersonRequest {
            name: "Toan Truyen".to_owned(),
            emails: vec!["toan@example.com".to_owned()],
            phones: vec!["0978712200".to_owned()],
            ..Default::default()
        })
        .await
        .expect("CreatePerson");
    adapter
        .update_person(UpdatePersonRequest {
            id: 7,
            phones: Some(StringValues {
                values: vec!["0978712201".to_owned()],
            }),
            ..Default::default()
        })
        .await
        .expect("UpdatePerson");

    let registered = adapter
        .register_webhook(RegisterWebhookRequest {
            subscription_url: "https://leadrelay.example.com/webhooks/pipedrive".to_owned(),
            event_action: "*".to_owned(),
            event_object: "deal".to_owned(),
            ..Default::default()
        })
        .await
        .expect("RegisterWebhook")
        .into_inner()
        .webhook
        .expect("a webhook");
    assert!(registered.is_active);
    let listed = adapter
        .list_webhooks(ListWebhooksRequest {})
        .await
        .expect("ListWebhooks")
        .into_inner();
    assert_eq!(listed.webhooks.len(), 1);
    adapter
        .delete_webhook(DeleteWebhookRequest { id: 21 })
        .await
        .expect("DeleteWebhook");

    let deleted = adapter
        .update_deal_status(UpdateDealStatusRequest {
            id: 5,
            status: DealStatus::Deleted.into(),
            lost_reason: String::new(),
        })
        .await
        .expect("UpdateDealStatus deleted")
        .into_inner()
        .deal
        .expect("the deal as it was");
    assert!(deleted.is_deleted);

    let sent = assert_requests_conform(&server, TOKEN).await;
    assert!(sent >= 22, "{sent} requests");
    // The webhook password is sent to Pipedrive once, in the registration body only.
    shutdown.cancel();
}

#[tokio::test]
async fn requests_pipedrive_would_refuse_are_refused_before_any_call() {
    let server = MockServer::start().await;
    let (mut adapter, shutdown) = adapter(&server, "100/60s").await;
    let refused = adapter
        .update_deal_status(UpdateDealStatusRequest {
            id: 5,
            status: DealStatus::Won.into(),
            lost_reason: "price".to_owned(),
        })
        .await
        .expect_err("a lost reason only goes with lost");
    assert_eq!(refused.code(), Code::InvalidArgument);
    for request in [
        AddDealRequest {
            title: " ".to_owned(),
            ..Default::default()
        },
        AddDealRequest {
            title: "T".to_owned(),
            value: "12,5".to_owned(),
            ..Default::default()
        },
        AddDealRequest {
            title: "T".to_owned(),
            expected_close_date: "01/12/2026".to_owned(),
            ..Default::default()
        },
        AddDealRequest {
            title: "T".to_owned(),
            visible_to: 2,
            ..Default::default()
        },
    ] {
        let refused = adapter.add_deal(request).await.expect_err("malformed");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{}",
            refused.message()
        );
    }
    let refused = adapter
        .search_persons(SearchPersonsRequest {
            email: "a@b.c".to_owned(),
            phone: "1".to_owned(),
        })
        .await
        .expect_err("one term at a time");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        server
            .received_requests()
            .await
            .expect("recording")
            .is_empty()
    );

    // A stage of another pipeline: read, compared, and the deal is not patched.
    mount(&server, "GET", "/api/v2/stages/4", ok(stage(4, 2))).await;
    let refused = adapter
        .update_deal_stage(UpdateDealStageRequest {
            id: 5,
            pipeline_id: 1,
            stage_id: 4,
            expected_close_date: String::new(),
        })
        .await
        .expect_err("stage 4 is in pipeline 2");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("belongs to pipeline 2"),
        "{}",
        refused.message()
    );

    // An activity type the account does not have is never posted.
    mount(&server, "GET", "/api/v1/activityTypes", activity_types()).await;
    let refused = adapter
        .add_activity(AddActivityRequest {
            subject: "Lunch".to_owned(),
            r#type: "lunch".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("no such type");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("(call)"),
        "{}",
        refused.message()
    );
    let requests = server.received_requests().await.expect("recording");
    assert!(
        requests
            .iter()
            .all(|request| request.method.as_str() == "GET"),
        "nothing written"
    );
    assert_requests_conform(&server, TOKEN).await;
    shutdown.cancel();
}

/// A fake Pipedrive that enforces a budget by arrival time: more than `limit` calls in any
/// `window` draw a 429, as the real one does.
struct BudgetedFake {
    limit: usize,
    window: Duration,
    arrivals: Mutex<VecDeque<Instant>>,
    all: Arc<Mutex<Vec<Instant>>>,
    rejected: Arc<Mutex<usize>>,
}

impl Respond for BudgetedFake {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        let now = Instant::now();
        self.all.lock().expect("arrivals").push(now);
        let mut arrivals = self.arrivals.lock().expect("arrivals");
        while arrivals
            .front()
            .is_some_and(|first| now.duration_since(*first) >= self.window)
        {
            arrivals.pop_front();
        }
        if arrivals.len() >= self.limit {
            *self.rejected.lock().expect("count") += 1;
            return ResponseTemplate::new(429)
                .insert_header("x-ratelimit-limit", self.limit.to_string().as_str())
                .insert_header("x-ratelimit-remaining", "0")
                .set_body_json(json!({"success": false, "error": "Request over limit"}));
        }
        arrivals.push_back(now);
        ResponseTemplate::new(200).set_body_json(ok(deal(5)))
    }
}

#[tokio::test]
async fn three_hundred_deals_under_a_scaled_budget_draw_no_429() {
    // 100 calls per 3 s stands in for 100 per 60 s: the same arithmetic, twenty times faster.
    let server = MockServer::start().await;
    let all = Arc::new(Mutex::new(Vec::new()));
    let rejected = Arc::new(Mutex::new(0));
    Mock::given(method("POST"))
        .and(path("/api/v2/deals"))
        .respond_with(BudgetedFake {
            limit: 100,
            window: Duration::from_secs(3),
            arrivals: Mutex::new(VecDeque::new()),
            all: all.clone(),
            rejected: rejected.clone(),
        })
        .mount(&server)
        .await;
    let (adapter, shutdown) = adapter(&server, "100/3s").await;
    let started = Instant::now();
    let mut calls = Vec::new();
    for number in 0..300 {
        let mut adapter = adapter.clone();
        calls.push(tokio::spawn(async move {
            loop {
                let request = AddDealRequest {
                    title: format!("Deal {number}"),
                    ..Default::default()
                };
                match adapter.add_deal(request).await {
                    Ok(_) => return,
                    // Refused by our own pacer (the slot was more than a window away): the
                    // hint says when to come back; Pipedrive was never asked.
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(status) => panic!("AddDeal {number}: {status}"),
                }
            }
        }));
    }
    for call in calls {
        call.await.expect("the call finishes");
    }
    let elapsed = started.elapsed();
    let arrivals = all.lock().expect("arrivals").clone();
    let busiest = arrivals
        .iter()
        .map(|first| {
            arrivals
                .iter()
                .filter(|at| **at >= *first && at.duration_since(*first) < Duration::from_secs(3))
                .count()
        })
        .max()
        .unwrap_or(0);
    println!(
        "300 AddDeal under 100/3 s: {} calls reached the fake, busiest 3 s window {busiest}, {elapsed:?}",
        arrivals.len()
    );
    assert_eq!(*rejected.lock().expect("count"), 0, "no 429 drawn");
    assert_eq!(arrivals.len(), 300);
    assert!(busiest <= 100, "busiest window {busiest}");
    assert_requests_conform(&server, TOKEN).await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_429_is_resource_exhausted_with_the_delay_and_holds_later_calls() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/deals/5"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", "1")
                .set_body_json(json!({"success": false, "error": "Request over limit"})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    mount(&server, "GET", "/api/v2/deals/5", ok(deal(5))).await;
    let (mut adapter, shutdown) = adapter(&server, "100/60s").await;
    let refused = adapter
        .get_deal(GetDealRequest { id: 5 })
        .await
        .expect_err("429");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = <tonic::Status as tonic_types::StatusExt>::get_error_details(&refused);
    let delay = details
        .retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry delay");
    assert_eq!(delay, Duration::from_secs(1));
    // The next call waits out the reset instead of drawing another 429.
    let started = Instant::now();
    adapter
        .get_deal(GetDealRequest { id: 5 })
        .await
        .expect("after the reset");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(assert_requests_conform(&server, TOKEN).await, 2);
    shutdown.cancel();
}
