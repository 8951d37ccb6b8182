//! The Pipedrive trigger poller inside `leadrelay up`, against a fake Pipedrive whose deals keep
//! coming: killed with SIGKILL again and again while it polls, it misses no new deal and stores
//! none twice.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use leadrelay_proto::v1::{
    ListEventsRequest, System, TriggerPollRequest,
    orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::pipedrive::{assert_requests_conform, deal, mount, page};
use serde_json::json;
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{method, path},
};

use crate::support::{Error, TestResult, Up};

const TOKEN: &str = "pd-poll-token-6c2a";

/// Deals 1..=`newest`, newest first, in pages of the requested size; the cursor is an offset.
struct GrowingDeals {
    newest: Arc<AtomicI64>,
}

impl Respond for GrowingDeals {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let query: BTreeMap<String, String> = request.url.query_pairs().into_owned().collect();
        let limit: i64 = query
            .get("limit")
            .and_then(|limit| limit.parse().ok())
            .unwrap_or(100);
        let offset: i64 = query
            .get("cursor")
            .and_then(|cursor| cursor.parse().ok())
            .unwrap_or(0);
        let newest = self.newest.load(Ordering::SeqCst);
        let ids: Vec<i64> = (1..=newest)
            .rev()
            .skip(usize::try_from(offset).unwrap_or(0))
            .take(usize::try_from(limit).unwrap_or(100))
            .collect();
        let more = offset + limit < newest;
        let next = (offset + limit).to_string();
        let body = page(
            json!(ids.into_iter().map(deal).collect::<Vec<_>>()),
            more.then_some(next.as_str()),
        );
        ResponseTemplate::new(200).set_body_json(body)
    }
}

fn start(folder: &std::path::Path, fake: &MockServer) -> Result<Up, Error> {
    let uri = fake.uri();
    Up::start(
        folder,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", uri.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", TOKEN),
            // A generous budget: this test is about the watermark, not the pace.
            ("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "10000/1s"),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "50ms"),
        ],
    )
}

/// The deal ids stored as polled events, with how often each was stored.
async fn polled_deals(up: &Up) -> Result<BTreeMap<i64, usize>, Error> {
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let mut seen = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let answer = orchestrator
            .list_events(ListEventsRequest {
                source: System::Pipedrive.into(),
                page_size: 500,
                page_token,
            })
            .await?
            .into_inner();
        for event in answer
            .events
            .iter()
            .filter(|event| event.kind == "deal.create")
        {
            let id: i64 = event
                .dedupe_key
                .split(':')
                .nth(1)
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| format!("a poll key names the deal: {}", event.dedupe_key))?;
            *seen.entry(id).or_insert(0) += 1;
        }
        if answer.next_page_token.is_empty() {
            return Ok(seen);
        }
        page_token = answer.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_poller_killed_again_and_again_misses_nothing_and_repeats_nothing() -> TestResult {
    let fake = MockServer::start().await;
    let newest = Arc::new(AtomicI64::new(5));
    Mock::given(method("GET"))
        .and(path("/api/v2/deals"))
        .respond_with(GrowingDeals {
            newest: newest.clone(),
        })
        .mount(&fake)
        .await;
    mount(&fake, "GET", "/api/v2/activities", page(json!([]), None)).await;
    let folder = tempfile::tempdir()?;

    // The first poll starts the watermark at deal 5: the deals before LeadRelay are not new.
    let mut up = start(folder.path(), &fake)?;
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    orchestrator
        .trigger_poll(TriggerPollRequest {
            system: System::Pipedrive.into(),
        })
        .await?;

    // New deals keep coming while the poller runs and is killed three times.
    let growth = tokio::spawn({
        let newest = newest.clone();
        async move {
            for _ in 0..300 {
                newest.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stored = polled_deals(&up).await?.len();
        println!(
            "killing the poller with {stored} new deals stored, newest deal {}",
            newest.load(Ordering::SeqCst)
        );
        up.stop_with("KILL")?;
        up = start(folder.path(), &fake)?;
    }
    growth.await?;

    // Catch up, then nothing more to find.
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let trigger = TriggerPollRequest {
        system: System::Pipedrive.into(),
    };
    orchestrator.trigger_poll(trigger).await?;
    let last = orchestrator.trigger_poll(trigger).await?.into_inner();
    assert_eq!(last.events_stored, 0);

    let seen = polled_deals(&up).await?;
    let expected: Vec<i64> = (6..=newest.load(Ordering::SeqCst)).collect();
    let missed: Vec<i64> = expected
        .iter()
        .copied()
        .filter(|id| !seen.contains_key(id))
        .collect();
    let repeated: Vec<(&i64, &usize)> = seen.iter().filter(|(_, count)| **count > 1).collect();
    let unexpected: Vec<&i64> = seen.keys().filter(|id| **id < 6).collect();
    assert!(missed.is_empty(), "missed deals {missed:?}");
    assert!(repeated.is_empty(), "deals stored twice {repeated:?}");
    assert!(
        unexpected.is_empty(),
        "deals from before the watermark {unexpected:?}"
    );
    assert_eq!(seen.len(), 300);
    assert_requests_conform(&fake, TOKEN).await;
    Ok(())
}
