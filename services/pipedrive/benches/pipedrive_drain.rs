//! Drains 1,000 queued lead + deal upserts through the Pipedrive adapter's `CrmSyncService` (real
//! gRPC over loopback) against a fake Pipedrive that enforces the budget the way Pipedrive does:
//! a call beyond the limit of a rolling window, counted on arrival, draws a 429.
//!
//! Prints the calls each lead + deal took, how much of the budget the drain used, and the 429s.
//!
//! Run with: `cargo bench -p leadrelay-pipedrive --bench pipedrive_drain`
//! Knobs: `LEADRELAY_BENCH_PAIRS` (default 1000), `LEADRELAY_BENCH_WORKERS` (concurrent drains,
//! default 16), `LEADRELAY_BENCH_SCALE` (default 30: the seed's 100 calls / 60 s and the search
//! limit of 10 / 2 s run 30 times faster, as 100 / 2 s and 10 / 67 ms, so the run takes about a
//! minute and a half instead of forty).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use leadrelay_pipedrive::{
    PipedriveAdapter, PipedriveApi,
    client::{DEFAULT_TIMEOUT, PipedriveClient},
};
use leadrelay_proto::{
    service_names,
    v1::{
        ContactRef, Deal, DealStatus, ExternalRef, Lead, Money, UpsertDealRequest,
        UpsertLeadRequest, crm_sync_service_client::CrmSyncServiceClient,
    },
};
use leadrelay_runtime::{adapter::Credentials, config::RateLimit, grpc::GrpcServer};
use secrecy::SecretString;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A rolling window counted on arrival.
struct Window {
    limit: usize,
    per: Duration,
    arrivals: Mutex<VecDeque<Instant>>,
}

impl Window {
    fn admit(&self, now: Instant) -> bool {
        let mut arrivals = self
            .arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while arrivals
            .front()
            .is_some_and(|first| now.duration_since(*first) >= self.per)
        {
            arrivals.pop_front();
        }
        if arrivals.len() >= self.limit {
            return false;
        }
        arrivals.push_back(now);
        true
    }
}

/// The fake Pipedrive's state: its budget, what it saw, the ids it hands out.
struct Fake {
    budget: Window,
    search: Window,
    calls: AtomicU64,
    rejected: AtomicU64,
    next_id: AtomicI64,
    arrivals: Mutex<Vec<Instant>>,
}

async fn pipedrive(State(fake): State<Arc<Fake>>, method: Method, uri: Uri) -> Response {
    let now = Instant::now();
    let is_search = uri.path().ends_with("/search");
    let admitted = fake.budget.admit(now) && (!is_search || fake.search.admit(now));
    if !admitted {
        fake.rejected.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1")],
            Json(json!({"success": false, "error": "Request over limit"})),
        )
            .into_response();
    }
    fake.calls.fetch_add(1, Ordering::Relaxed);
    fake.arrivals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(now);
    let id = || fake.next_id.fetch_add(1, Ordering::Relaxed);
    let body = match (method.as_str(), uri.path()) {
        ("GET", "/api/v2/persons/search") => {
            json!({"success": true, "data": {"items": []}, "additional_data": {}})
        }
        ("POST", "/api/v2/persons") => {
            json!({"success": true, "data": {"id": id(), "name": "Lead"}})
        }
        ("POST", "/api/v2/deals") => {
            json!({"success": true, "data": {"id": id(), "title": "Deal", "status": "open"}})
        }
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    Json(body).into_response()
}

fn scaled(calls: u32, per: Duration, scale: u32) -> RateLimit {
    RateLimit {
        calls,
        per: per / scale.max(1),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let pairs = usize::try_from(env_number("LEADRELAY_BENCH_PAIRS", 1000))?;
    let workers = usize::try_from(env_number("LEADRELAY_BENCH_WORKERS", 16))?;
    let scale = u32::try_from(env_number("LEADRELAY_BENCH_SCALE", 30))?;
    let budget = scaled(100, Duration::from_secs(60), scale);
    let search = scaled(10, Duration::from_secs(2), scale);

    let fake = Arc::new(Fake {
        budget: Window {
            limit: budget.calls as usize,
            per: budget.per,
            arrivals: Mutex::new(VecDeque::new()),
        },
        search: Window {
            limit: search.calls as usize,
            per: search.per,
            arrivals: Mutex::new(VecDeque::new()),
        },
        calls: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        next_id: AtomicI64::new(1),
        arrivals: Mutex::new(Vec::new()),
    });
    let fake_listener = TcpListener::bind("127.0.0.1:0").await?;
    let fake_url = format!("http://{}", fake_listener.local_addr()?);
    tokio::spawn(
        axum::serve(
            fake_listener,
            Router::new().fallback(pipedrive).with_state(fake.clone()),
        )
        .into_future(),
    );

    let client = PipedriveClient::new(
        &fake_url.parse()?,
        SecretString::from("bench-token"),
        DEFAULT_TIMEOUT,
    )?
    .paced_with_search_limit(budget, search);
    let api = Arc::new(PipedriveApi::new(client, None, None));
    let adapter = PipedriveAdapter::new(Credentials::new("Pipedrive", Vec::new()), Some(api));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(
        GrpcServer::new(
            "pipedrive-adapter",
            adapter.routes(),
            &[service_names::PIPEDRIVE_ADAPTER, service_names::CRM_SYNC],
        )
        .serve(listener, shutdown.clone()),
    );
    let sync = CrmSyncServiceClient::connect(format!("http://{address}")).await?;

    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (mut sync, next, refused) = (sync.clone(), next.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let number = next.fetch_add(1, Ordering::Relaxed);
                if number >= pairs {
                    return Ok::<_, Error>(());
                }
                let mut lead = Lead {
                    id: format!("lead_{number}"),
                    name: format!("Lead {number}"),
                    emails: vec![format!("lead{number}@example.com")],
                    phones: vec![format!("+8490{number:07}")],
                    ..Default::default()
                };
                let person = loop {
                    let request = UpsertLeadRequest {
                        lead: Some(lead.clone()),
                        changed_fields: Vec::new(),
                        idempotency_key: format!("lead-job-{number}"),
                    };
                    match sync.upsert_lead(request).await {
                        Ok(answer) => break answer.into_inner().refs,
                        Err(status) => wait_out(&status, &refused).await?,
                    }
                };
                lead.external_refs = person.into_iter().collect::<Vec<ExternalRef>>();
                let deal = Deal {
                    id: format!("deal_{number}"),
                    title: format!("Ticket {number}"),
                    value: Some(Money {
                        amount: "1500000".to_owned(),
                        currency_code: "VND".to_owned(),
                    }),
                    status: DealStatus::Open.into(),
                    contact: Some(ContactRef {
                        lead_id: lead.id.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                loop {
                    let request = UpsertDealRequest {
                        deal: Some(deal.clone()),
                        contact: Some(lead.clone()),
                        changed_fields: Vec::new(),
                        idempotency_key: format!("deal-job-{number}"),
                    };
                    match sync.upsert_deal(request).await {
                        Ok(_) => break,
                        Err(status) => wait_out(&status, &refused).await?,
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();

    let calls = fake.calls.load(Ordering::Relaxed);
    let rejected = fake.rejected.load(Ordering::Relaxed);
    let arrivals = fake
        .arrivals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let span = match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) => last.duration_since(*first),
        _ => Duration::ZERO,
    };
    // In `span` a perfect pacer can make `calls` per started window.
    let windows = (span.as_secs_f64() / budget.per.as_secs_f64()).floor() + 1.0;
    let allowed = windows * f64::from(budget.calls);
    println!();
    println!(
        "pipedrive drain: {pairs} lead + deal upserts, {workers} concurrent, budget {} calls / {:?} (the seed's 100 / 60 s, {scale}x faster), search {} / {:?}",
        budget.calls, budget.per, search.calls, search.per
    );
    println!("calls to Pipedrive         {calls}");
    println!(
        "calls per lead + deal      {:.2}",
        calls as f64 / pairs as f64
    );
    println!(
        "budget utilisation         {:.1}%  ({calls} of {allowed:.0} allowed in {:.1} s)",
        100.0 * calls as f64 / allowed,
        span.as_secs_f64()
    );
    println!("429s drawn                 {rejected}");
    println!(
        "refused by our pacer       {}  (RESOURCE_EXHAUSTED with a retry hint; never sent)",
        refused.load(Ordering::Relaxed)
    );
    println!(
        "drain time                 {:.1} s  (at the real budget: {:.0} min)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * f64::from(scale) / 60.0
    );
    Ok(())
}

/// Waits as the sync engine will: for the hinted delay when the pacer refused, else fails.
async fn wait_out(status: &tonic::Status, refused: &AtomicU64) -> Result<(), Error> {
    if status.code() != Code::ResourceExhausted {
        return Err(format!("unexpected {status:?}").into());
    }
    refused.fetch_add(1, Ordering::Relaxed);
    let details = <tonic::Status as tonic_types::StatusExt>::get_error_details(status);
    let delay = details
        .retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or(Duration::from_millis(100));
    tokio::time::sleep(delay / 2).await;
    Ok(())
}
