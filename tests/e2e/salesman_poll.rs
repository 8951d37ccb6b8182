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

    // The first look records the leads as they are: nothing changed yet.
    assert_eq!(trigger(&up).await?, 0);
    set(2, 1);
    assert_eq!(trigger(&up).await?, 1, "open → in work");
    assert_eq!(trigger(&up).await?, 0, "no change, no event");
    set(2, 2);
    set(3, 3);
    assert_eq!(trigger(&up).await?, 2, "in work → processed, open → closed");

    up.stop_with("KILL")?;
    let up = start(folder.path(), &fake)?;
    assert_eq!(
        trigger(&up).await?,
        0,
        "the statuses seen survive a restart"
    );

    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let mut keys: Vec<String> = orchestrator
        .list_events(ListEventsRequest {
            source: System::Salesman.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|event| {
            assert_eq!(event.kind, "lead.status");
            event.dedupe_key
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["lead:2:status:1", "lead:2:status:2", "lead:3:status:3"]
    );
    Ok(())
}
