//! The SalesMan lead status poller inside `leadrelay up`: each status change (open → in work →
//! processed → closed) is stored once as an event, across restarts.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use leadrelay_proto::v1::{
    ListEventsRequest, System, TriggerPollRequest,
    orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::salesman::{self, lead_record, v1};
use serde_json::json;
use wiremock::MockServer;

use crate::support::{Error, TestResult, Up};

const LOGIN: &str = "manager@isaler.ru";
const API_KEY: &str = "sm-poll-key-5d7e";

/// Lead id → SalesMan status code.
type Statuses = Arc<Mutex<BTreeMap<i64, u8>>>;

fn start(folder: &std::path::Path, fake: &MockServer) -> Result<Up, Error> {
    let uri = fake.uri();
    Up::start(
        folder,
        &[
            ("LEADRELAY_SALESMAN_API_URL", uri.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", API_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
        ],
    )
}

async fn trigger(up: &Up) -> Result<u32, Error> {
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    Ok(orchestrator
        .trigger_poll(TriggerPollRequest {
            system: System::Salesman.into(),
        })
        .await?
        .into_inner()
        .events_stored)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_status_change_is_stored_once_across_restarts() -> TestResult {
    let statuses: Statuses = Arc::new(Mutex::new(BTreeMap::from([(1, 0), (2, 0), (3, 0)])));
    let fake = MockServer::start().await;
    salesman::mount(&fake, LOGIN, API_KEY, {
        let statuses = statuses.clone();
        move |fields| {
            if fields.get("offset").map(String::as_str).unwrap_or("0") != "0" {
                return v1(&json!({"result":"Error","error":{"code":"404","text":"Не найдено"}}));
            }
            let rows: Vec<_> = statuses
                .lock()
                .map(|statuses| {
                    statuses
                        .iter()
                        .rev()
                        .map(|(id, status)| lead_record(*id, *status))
                        .collect()
                })
                .unwrap_or_default();
            v1(&json!({ "data": rows }))
        }
    })
    .await;
    let set = |id: i64, status: u8| {
        if let Ok(mut statuses) = statuses.lock() {
            statuses.insert(id, status);
        }
    };
    let folder = tempfile::tempdir()?;
    let mut up = start(folder.path(), &fake)?;

    // The timer's first poll runs at start-up, beside the ones triggered here: which of them
    // stores a change may vary, so the test counts the events stored, not who stored them.
    // The first look records the leads as they are: nothing changed yet.
    trigger(&up).await?;
    assert!(status_events(&up).await?.is_empty());
    set(2, 1);
    trigger(&up).await?;
    assert_eq!(
        status_events(&up).await?,
        vec!["lead:2:status:1"],
        "open → in work"
    );
    trigger(&up).await?;
    assert_eq!(status_events(&up).await?.len(), 1, "no change, no event");
    set(2, 2);
    set(3, 3);
    trigger(&up).await?;
    assert_eq!(
        status_events(&up).await?.len(),
        3,
        "in work → processed, open → closed"
    );

    up.stop_with("KILL")?;
    let up = start(folder.path(), &fake)?;
    assert_eq!(
        trigger(&up).await?,
        0,
        "the statuses seen survive a restart"
    );
    assert_eq!(
        status_events(&up).await?,
        vec!["lead:2:status:1", "lead:2:status:2", "lead:3:status:3"]
    );
    Ok(())
}

/// The keys of the stored SalesMan status events, sorted.
async fn status_events(up: &Up) -> Result<Vec<String>, Error> {
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let mut keys = Vec::new();
    for event in orchestrator
        .list_events(ListEventsRequest {
            source: System::Salesman.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .events
    {
        assert_eq!(event.kind, "lead.status");
        keys.push(event.dedupe_key);
    }
    keys.sort();
    Ok(keys)
}
