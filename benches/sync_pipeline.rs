//! The whole pipeline: Hana webhooks through the gateway and the orchestrator, their sync jobs
//! through the Pipedrive and SalesMan adapters, into fakes of both CRMs with unlimited budgets.
//! Prints the time from a webhook's send to the CRM call it causes (the new Pipedrive person,
//! the new SalesMan lead), p50/p99, and events per second from the first send until every job is
//! done — beside the floor: the same fake's answer time to a direct call, measured in the run.
//!
//! Run with: `cargo bench --bench sync_pipeline`
//! Knobs: `LEADRELAY_BENCH_LEADS` (default 1000), `LEADRELAY_BENCH_SENDERS` (concurrent webhook
//! senders, default 8). SQLite, then Postgres (`LEADRELAY_TEST_POSTGRES_URL`; skipped with the
//! reason when unreachable).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use leadrelay_gateway::GatewayConfig;
use leadrelay_orchestrator::IngestPolicy;
use leadrelay_proto::v1::{
    GetStatsRequest, JobState, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_runtime::Settings;
use leadrelay_testkit::{TestDatabase, pipedrive::crm::Crm, salesman};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wiremock::MockServer;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TOKEN: &str = "bench-token";
const PIPEDRIVE_TOKEN: &str = "bench-pipedrive-token";
const SALESMAN_LOGIN: &str = "manager@isaler.ru";
const SALESMAN_KEY: &str = "bench-salesman-key";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Percentiles of durations, in milliseconds.
fn percentile_ms(sorted: &[Duration], percentile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * percentile).round() as usize;
    sorted[rank].as_secs_f64() * 1000.0
}

/// Every LeadRelay service in this process, on loopback ports, against the two fakes.
async fn start_leadrelay(
    database_url: &str,
    pipedrive_url: &str,
    salesman_url: &str,
    shutdown: &CancellationToken,
) -> Result<(String, tonic::transport::Channel), Error> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    ];
    let url = |listener: &TcpListener| -> Result<String, Error> {
        Ok(format!("http://{}", listener.local_addr()?))
    };
    let vars: HashMap<&str, String> = HashMap::from([
        ("LEADRELAY_DATABASE_URL", database_url.to_owned()),
        ("LEADRELAY_HANA_WEBHOOK_TOKEN", TOKEN.to_owned()),
        ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.to_owned()),
        ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN.to_owned()),
        ("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "1000000/1s".to_owned()),
        (
            "LEADRELAY_PIPEDRIVE_SEARCH_RATE_LIMIT",
            "1000000/1s".to_owned(),
        ),
        ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h".to_owned()),
        ("LEADRELAY_SALESMAN_API_URL", salesman_url.to_owned()),
        ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN.to_owned()),
        ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY.to_owned()),
        ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h".to_owned()),
        ("LEADRELAY_ORCHESTRATOR_URL", url(&listeners[0])?),
        ("LEADRELAY_PIPEDRIVE_ADAPTER_URL", url(&listeners[1])?),
        ("LEADRELAY_SALESMAN_ADAPTER_URL", url(&listeners[2])?),
    ]);
    let settings = Settings::from_lookup(|name| vars.get(name).cloned())?;
    let [orchestrator, pipedrive, salesman, gateway] = listeners;
    let gateway_url = url(&gateway)?;
    let orchestrator_url = url(&orchestrator)?;
    tokio::spawn({
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        async move { leadrelay_pipedrive::serve(&settings, pipedrive, shutdown).await }
    });
    tokio::spawn({
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        async move { leadrelay_salesman::serve(&settings, salesman, shutdown).await }
    });
    let store = leadrelay_orchestrator::open_store(&settings).await?;
    tokio::spawn(leadrelay_orchestrator::serve(
        store,
        IngestPolicy::default(),
        leadrelay_orchestrator::pollers(&settings),
        orchestrator,
        shutdown.clone(),
    ));
    tokio::spawn(leadrelay_gateway::serve(
        GatewayConfig::from_settings(&settings)?,
        gateway,
        shutdown.clone(),
    ));
    let channel = tonic::transport::Channel::from_shared(orchestrator_url)?
        .connect()
        .await?;
    Ok((gateway_url, channel))
}

/// What one run through the pipeline measured.
struct Run {
    events: usize,
    elapsed: Duration,
    to_pipedrive: Vec<Duration>,
    to_salesman: Vec<Duration>,
}

fn lead_body(number: usize) -> serde_json::Value {
    let attribute = |value: String| json!({"nomalizeData": value, "rawData": value});
    json!({
        "application": {"id": "bench-app"},
        "lead": {
            "id": attribute(format!("bench-lead-{number}")),
            "baseName": attribute(format!("Lead {number}")),
            "baseEmail": attribute(format!("lead{number}@example.com")),
        },
        "conversation": {"conversationUrl": format!("https://bot.hana.ai/apps/bench/chats/{number}")}
    })
}

/// Sends `leads` lead.created webhooks from `senders` tasks; waits until every job is done.
async fn run(database_url: &str, leads: usize, senders: usize) -> Result<Run, Error> {
    let shutdown = CancellationToken::new();
    let pipedrive_fake = MockServer::start().await;
    let crm = Crm::new();
    crm.mount(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    let salesman_leads =
        salesman::mount_stateful(&salesman_fake, SALESMAN_LOGIN, SALESMAN_KEY).await;
    let (gateway, channel) = start_leadrelay(
        database_url,
        &pipedrive_fake.uri(),
        &salesman_fake.uri(),
        &shutdown,
    )
    .await?;

    let url = format!("{gateway}/webhooks/hana/lead.created?token={TOKEN}");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (next, url) = (next.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut sent = Vec::new();
            loop {
                let number = next.fetch_add(1, Ordering::Relaxed);
                if number >= leads {
                    return Ok::<_, Error>(sent);
                }
                let at = Instant::now();
                let answer = http.post(&url).json(&lead_body(number)).send().await?;
                if answer.status() != 200 {
                    return Err(format!("webhook {number} answered {}", answer.status()).into());
                }
                sent.push((format!("lead{number}@example.com"), at));
            }
        }));
    }
    let mut sent_at = HashMap::new();
    for task in tasks {
        sent_at.extend(task.await??);
    }
    let mut orchestrator = OrchestratorServiceClient::new(channel);
    loop {
        let stats = orchestrator
            .get_stats(GetStatsRequest {})
            .await?
            .into_inner();
        let unfinished: u64 = stats
            .jobs
            .iter()
            .filter(|count| {
                matches!(
                    count.state(),
                    JobState::Pending | JobState::Running | JobState::Dead
                )
            })
            .map(|count| count.count)
            .sum();
        if unfinished == 0 && !stats.jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();

    let since_sent = |email: Option<&str>, at: Instant| -> Option<Duration> {
        Some(at.saturating_duration_since(*sent_at.get(email?)?))
    };
    let mut to_pipedrive: Vec<Duration> = crm
        .records()
        .writes
        .iter()
        .filter(|write| write.call == "POST /api/v2/persons")
        .filter_map(|write| since_sent(write.body["emails"][0]["value"].as_str(), write.at))
        .collect();
    let mut to_salesman: Vec<Duration> = salesman_leads
        .lock()
        .map_err(|_| "poisoned")?
        .iter()
        .filter_map(|added| since_sent(added.record["email"].as_str(), added.at))
        .collect();
    to_pipedrive.sort_unstable();
    to_salesman.sort_unstable();
    if to_pipedrive.len() != leads || to_salesman.len() != leads {
        return Err(format!(
            "{leads} leads made {} persons and {} SalesMan leads",
            to_pipedrive.len(),
            to_salesman.len()
        )
        .into());
    }
    Ok(Run {
        events: leads,
        elapsed,
        to_pipedrive,
        to_salesman,
    })
}

/// The floor: the Pipedrive fake's answer time to a direct person creation, `calls` times.
async fn floor(calls: usize) -> Result<Vec<Duration>, Error> {
    let fake = MockServer::start().await;
    Crm::new().mount(&fake).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v2/persons", fake.uri());
    let mut times = Vec::with_capacity(calls);
    for number in 0..calls {
        let at = Instant::now();
        http.post(&url)
            .header("x-api-token", PIPEDRIVE_TOKEN)
            .json(&json!({"name": format!("Lead {number}")}))
            .send()
            .await?
            .error_for_status()?;
        times.push(at.elapsed());
    }
    times.sort_unstable();
    Ok(times)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let leads = env_number("LEADRELAY_BENCH_LEADS", 1000);
    let senders = env_number("LEADRELAY_BENCH_SENDERS", 8);
    let folder = tempfile::tempdir()?;
    let floor = floor(leads).await?;

    let sqlite = run(
        &format!("sqlite://{}/bench.db", folder.path().display()),
        leads,
        senders,
    )
    .await?;
    eprintln!("measured SQLite");
    let postgres = match TestDatabase::create("sync_bench").await {
        Ok(database) => {
            let measured = run(database.url(), leads, senders).await;
            database.drop_database().await?;
            Ok(measured?)
        }
        Err(error) => Err(error.to_string()),
    };

    println!();
    println!(
        "sync pipeline: {leads} lead.created webhooks from {senders} senders, each synced to Pipedrive and SalesMan (fakes, unlimited budgets), {} cores",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>12}",
        "measured", "p50 ms", "p99 ms", "p50/floor", "events/s"
    );
    let floor_p50 = percentile_ms(&floor, 0.5);
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9} {:>12}",
        "floor: direct call to the fake",
        floor_p50,
        percentile_ms(&floor, 0.99),
        "1.0",
        "-"
    );
    let rows = |label: &str, run: &Run| {
        for (target, times) in [
            ("Pipedrive person", &run.to_pipedrive),
            ("SalesMan lead", &run.to_salesman),
        ] {
            println!(
                "{:<40} {:>9.2} {:>9.2} {:>9.1} {:>12.0}",
                format!("{label}: webhook → {target}"),
                percentile_ms(times, 0.5),
                percentile_ms(times, 0.99),
                percentile_ms(times, 0.5) / floor_p50,
                run.events as f64 / run.elapsed.as_secs_f64()
            );
        }
    };
    rows("SQLite", &sqlite);
    match &postgres {
        Ok(run) => rows("Postgres", run),
        Err(reason) => println!("{:<40} skipped: {reason}", "Postgres"),
    }
    Ok(())
}
