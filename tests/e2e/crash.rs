//! 2xx means stored: the orchestrator is killed with SIGKILL while webhooks stream in, restarted,
//! and every call the gateway acknowledged is found afterwards — on SQLite and on Postgres.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use leadrelay_proto::v1::{
    GetEventRequest, GetLeadRequest, RemoteKey, System, get_lead_request,
    orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::TestDatabase;
use serde_json::json;
use tonic::transport::Channel;

use crate::{
    hana_ingest::Backend,
    support::{Service, TestResult, free_port, wait_http_ok, wait_serving},
};

/// Concurrent senders, like Hana's parallel deliveries.
const SENDERS: usize = 16;
/// How long webhooks stream between kills.
const STREAM_BETWEEN_KILLS: Duration = Duration::from_millis(1200);
/// How many times the orchestrator is killed.
const KILLS: usize = 3;

/// What the senders saw: every acknowledged call's event id and Hana lead id.
#[derive(Default)]
struct Acknowledged {
    calls: Vec<(String, String)>,
    refused: usize,
}

async fn every_acknowledged_event_survives_sigkill(backend: Backend) -> TestResult {
    let folder = tempfile::tempdir()?;
    let database = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(TestDatabase::create("crash").await?),
    };
    let database_url = match &database {
        Some(database) => database.url().to_owned(),
        None => format!("sqlite://{}/data/leadrelay.db", folder.path().display()),
    };
    let orchestrator_port = free_port()?;
    let orchestrator_listen = format!("127.0.0.1:{orchestrator_port}");
    let orchestrator_env = [
        ("LEADRELAY_DATABASE_URL", database_url.as_str()),
        (
            "LEADRELAY_ORCHESTRATOR_LISTEN",
            orchestrator_listen.as_str(),
        ),
    ];
    let orchestrator_url = format!("http://{orchestrator_listen}");
    // The gateway is never restarted: it takes a port of its own.
    let gateway = Service::start(
        folder.path(),
        &["gateway"],
        &[
            ("LEADRELAY_GATEWAY_LISTEN", "127.0.0.1:0"),
            ("LEADRELAY_ORCHESTRATOR_URL", orchestrator_url.as_str()),
            ("LEADRELAY_HANA_WEBHOOK_TOKEN", "crash-test-token"),
        ],
    )?;
    let mut orchestrator = Service::start(folder.path(), &["orchestrator"], &orchestrator_env)?;
    wait_serving(orchestrator_listen.parse()?).await?;
    let gateway_listen = gateway.listening_addr("gateway listening").await?;
    wait_http_ok(&format!("http://{gateway_listen}/healthz")).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let url = format!("http://{gateway_listen}/webhooks/hana/lead.created?token=crash-test-token");
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (stop, acknowledged, url) = (stop.clone(), acknowledged.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
            let mut sequence = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                sequence += 1;
                let lead_id = format!("crash-{sender}-{sequence}");
                let body = json!({
                    "application": {"id": "crash-app"},
                    "lead": {
                        "id": {"nomalizeData": lead_id, "rawData": lead_id},
                        "baseName": {"nomalizeData": format!("Lead {sequence}"), "rawData": format!("Lead {sequence}")}
                    }
                });
                let answer = http.post(&url).json(&body).send().await;
                let acked = match answer {
                    Ok(answer) if answer.status() == 200 => {
                        let answer: serde_json::Value = answer.json().await?;
                        answer["event_id"].as_str().map(str::to_owned)
                    }
                    // Refused or cut off: not acknowledged, so nothing is promised.
                    _ => None,
                };
                let mut seen = acknowledged.lock().map_err(|_| "poisoned")?;
                match acked {
                    Some(event_id) => seen.calls.push((event_id, lead_id)),
                    None => seen.refused += 1,
                }
            }
            Ok::<_, crate::support::Error>(())
        }));
    }

    for _ in 0..KILLS {
        tokio::time::sleep(STREAM_BETWEEN_KILLS).await;
        orchestrator.kill()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        orchestrator = Service::start(folder.path(), &["orchestrator"], &orchestrator_env)?;
        wait_serving(orchestrator_listen.parse()?).await?;
    }
    tokio::time::sleep(STREAM_BETWEEN_KILLS).await;
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await??;
    }

    let seen = std::mem::take(&mut *acknowledged.lock().map_err(|_| "poisoned")?);
    let channel = Channel::from_shared(orchestrator_url.clone())?
        .connect()
        .await?;
    let mut client = OrchestratorServiceClient::new(channel);
    let mut missing = Vec::new();
    for (event_id, lead_id) in &seen.calls {
        let event = client
            .get_event(GetEventRequest {
                id: event_id.clone(),
            })
            .await;
        let lead = client
            .get_lead(GetLeadRequest {
                key: Some(get_lead_request::Key::Remote(RemoteKey {
                    system: System::Hana.into(),
                    remote_id: lead_id.clone(),
                })),
            })
            .await;
        if event.is_err() || lead.is_err() {
            missing.push(event_id.clone());
        }
    }
    println!(
        "{backend:?}: {} calls acknowledged, {} refused while the orchestrator was down, {} lost",
        seen.calls.len(),
        seen.refused,
        missing.len()
    );
    assert!(
        seen.calls.len() > 100,
        "too few calls to mean anything: {}",
        seen.calls.len()
    );
    assert!(
        seen.refused > 0,
        "the orchestrator was never down while calls arrived"
    );
    assert!(
        missing.is_empty(),
        "acknowledged but lost: {missing:?}\n{}",
        orchestrator.logs()
    );
    drop(gateway);
    drop(orchestrator);
    if let Some(database) = database {
        database.drop_database().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_every_acknowledged_event_across_sigkill() -> TestResult {
    every_acknowledged_event_survives_sigkill(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_every_acknowledged_event_across_sigkill() -> TestResult {
    every_acknowledged_event_survives_sigkill(Backend::Postgres).await
}
