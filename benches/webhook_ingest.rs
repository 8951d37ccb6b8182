//! Webhook ingest throughput and time-to-ack, through the gateway and the orchestrator with a
//! durable commit (SQLite, then Postgres), beside a bare axum endpoint measured in the same run
//! on the same machine with the same load generator.
//!
//! Run with: `cargo bench --bench webhook_ingest`
//! Knobs: `LEADRELAY_BENCH_SECONDS` (per target, default 10), `LEADRELAY_BENCH_ROUNDS` (the turns
//! the targets take, default 5), `LEADRELAY_BENCH_CONNECTIONS`
//! (default 64). Postgres uses the test server (`LEADRELAY_TEST_POSTGRES_URL`); it is skipped,
//! with the reason printed, when unreachable.
//!
//! The load generator runs in this process and shares the machine's cores with the servers, for
//! every target alike: compare the ratios, not the absolute figures. A second table shows each
//! engine's ingest writer, read from the process's metrics: its serial time per webhook, its busy
//! share, the webhooks per transaction and, on SQLite, the fsync of the write-ahead log each
//! acknowledgement waits for and how much of that log each webhook wrote. A third takes the mean
//! time to acknowledge apart:
//! - outside the gateway's handler (`leadrelay_webhook_ack_seconds` times the handler): the load
//!   generator, HTTP/1 both ways and reading the body;
//! - inside the handler but outside the orchestrator's ingest stages: parsing the body, the gRPC
//!   stream both ways, and the orchestrator's reading, checking and answering;
//! - the orchestrator's ingest stages (`leadrelay_ingest_call_seconds`): waiting for the writer,
//!   in the group until its commit, and from the commit until the fsync made it durable.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Json, Router, body::Bytes, routing::post};
use leadrelay_gateway::GatewayConfig;
use leadrelay_orchestrator::{IngestPolicy, store::Backend};
use leadrelay_runtime::{
    Settings,
    metrics::{IngestWriterTotals, WebhookAckTotals, metrics},
};
use leadrelay_testkit::TestDatabase;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The allocator the `leadrelay` binary runs with, for the bare endpoint as for LeadRelay.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TOKEN: &str = "bench-token";

/// What one load run measured.
#[derive(Default)]
struct Measurement {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU time this process spent during the run, load generator included; `None` where
    /// `/proc/self/stat` cannot be read.
    cpu: Option<Duration>,
    /// What the ingest writer did meanwhile; zero for the bare endpoint.
    writer: IngestWriterTotals,
    /// The gateway's answers meanwhile, timed in its handler; zero for the bare endpoint.
    gateway: WebhookAckTotals,
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time per answered request, in microseconds: steadier than req/s on a machine whose
    /// speed drifts, and what a change to the work per webhook moves.
    fn cpu_us_per_request(&self) -> f64 {
        match self.cpu {
            Some(cpu) if self.requests > 0 => cpu.as_secs_f64() * 1e6 / self.requests as f64,
            _ => f64::NAN,
        }
    }

    /// Cores this process kept busy on average: below the machine's count, the servers waited
    /// on something other than the CPU (the disk, a serial stage, each other).
    fn cores_busy(&self) -> f64 {
        match self.cpu {
            Some(cpu) if !self.elapsed.is_zero() => cpu.as_secs_f64() / self.elapsed.as_secs_f64(),
            _ => f64::NAN,
        }
    }

    /// The writer's serial time per webhook it stored, in microseconds: what bounds the rate
    /// (every other webhook waits while it works).
    fn writer_us_per_call(&self) -> f64 {
        self.writer.busy_seconds * 1e6 / self.writer.calls as f64
    }

    /// The share of the run the writer was busy.
    fn writer_busy_share(&self) -> f64 {
        self.writer.busy_seconds / self.elapsed.as_secs_f64()
    }

    /// The mean time of the fsyncs that made the writer's commits durable, and how many
    /// webhooks each covered; `None` when the engine flushes inside its commit (Postgres).
    fn log_syncs(&self) -> Option<(f64, f64)> {
        (self.writer.log_syncs > 0).then(|| {
            let syncs = self.writer.log_syncs as f64;
            (
                self.writer.log_sync_seconds * 1e3 / syncs,
                self.writer.calls as f64 / syncs,
            )
        })
    }

    /// The write-ahead log the writer's commits appended per webhook, in KiB; `None` when the
    /// engine has no such log of ours (Postgres).
    fn log_kib_per_call(&self) -> Option<f64> {
        (self.writer.log_bytes > 0 && self.writer.calls > 0)
            .then(|| self.writer.log_bytes as f64 / 1024.0 / self.writer.calls as f64)
    }

    /// The mean time per webhook in each of the orchestrator's ingest stages, in milliseconds.
    fn stages_ms(&self) -> StagesMs {
        StagesMs {
            queued: per_call(self.writer.queued_seconds, self.writer.calls),
            group: per_call(self.writer.group_seconds, self.writer.calls),
            sync: per_call(self.writer.sync_seconds, self.writer.synced_calls),
        }
    }

    /// The mean time from the gateway's handler starting on a webhook (its body read) to its
    /// answer, in milliseconds.
    fn gateway_ms(&self) -> f64 {
        per_call(self.gateway.seconds, self.gateway.answered)
    }

    fn mean_ms(&self) -> f64 {
        let total: u64 = self.latencies_us.iter().map(|&us| u64::from(us)).sum();
        total as f64 / 1000.0 / self.latencies_us.len().max(1) as f64
    }

    fn percentile_ms(&self, percentile: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies_us.len() as f64 - 1.0) * percentile).round() as usize;
        f64::from(self.latencies_us[rank]) / 1000.0
    }
}

/// `seconds` summed over `calls`, as milliseconds per call; 0 without calls.
fn per_call(seconds: f64, calls: u64) -> f64 {
    match calls {
        0 => 0.0,
        calls => seconds * 1e3 / calls as f64,
    }
}

/// Mean milliseconds per webhook in the orchestrator's ingest stages (see
/// `leadrelay_runtime::metrics::IngestStage`).
struct StagesMs {
    queued: f64,
    group: f64,
    sync: f64,
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// CPU time this process has used (user and system, every thread), from `/proc/self/stat`.
/// Its fields 14 and 15 count clock ticks of 1/100 s (Linux's `USER_HZ` on every architecture it
/// runs these benches on).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold blanks: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// A Hana-shaped lead id, distinct for every `sequence`. Hana's ids are random hex in UUID-like
/// groups (the seed's sample lead id is `e734c76a-52ca-44f0-a21e8e1fe627c308`; its application
/// id, `dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2`, is a random UUID too), so each new lead lands on
/// a page of its own in the index that finds a lead by its Hana id; ids that grow with `sequence`
/// would put consecutive leads on a few pages and make the store look cheaper than Hana's traffic
/// makes it.
/// Measured on 2026-12-02 (SQLite, two alternating pairs of runs): with growing ids the writer
/// took 29–30 µs per webhook instead of 35–36 and wrote 10.1 KiB of log instead of 14.4, and
/// the share of the bare endpoint was 21.6–21.8% instead of 18.6–19.4%.
fn hana_lead_id(sequence: u64) -> String {
    // splitmix64's finaliser: a bijection of u64, so distinct sequences give distinct ids.
    fn mix(value: u64) -> u64 {
        let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let (high, low) = (mix(sequence), mix(!sequence));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

/// A lead.created body with a unique lead id, shaped like the Hana sample.
fn body(sequence: u64) -> String {
    let id = hana_lead_id(sequence);
    format!(
        r#"{{"application":{{"id":"bench-app"}},"lead":{{"id":{{"nomalizeData":"{id}","rawData":"{id}"}},"baseName":{{"nomalizeData":"Toan Truyen","rawData":"Toan Truyen"}},"baseEmail":{{"nomalizeData":"lead{sequence}@example.com","rawData":"lead{sequence}@example.com"}},"basePhonenumber":{{"nomalizeData":"0978712200","rawData":"0978712200"}},"baseSourceInput":{{"nomalizeData":["Youtube","Sendo"],"rawData":["Youtube","Sendo"]}},"cf_number_kieu_so":{{"nomalizeData":1.09,"rawData":1.09}}}},"conversation":{{"conversationUrl":"https://bot.hana.ai/apps/bench/chats/{sequence}"}}}}"#
    )
}

/// Posts unique bodies to `url` from `connections` clients for `duration`.
async fn load(
    url: &str,
    connections: usize,
    duration: Duration,
    sequence: Arc<AtomicU64>,
) -> Result<Measurement, Error> {
    let cpu_before = process_cpu();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (url, sequence) = (url.to_owned(), sequence.clone());
        tasks.push(tokio::spawn(async move {
            // One client per connection: 64 clients are 64 TCP connections, as 64 senders are.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()?;
            let mut latencies = Vec::new();
            let mut errors = 0_u64;
            while Instant::now() < deadline {
                let body = body(sequence.fetch_add(1, Ordering::Relaxed));
                let sent = Instant::now();
                let answer = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let ok = match answer {
                    Ok(answer) => answer.status() == 200 && answer.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
            }
            Ok::<_, Error>((latencies, errors))
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, task_errors) = task.await??;
        latencies_us.extend(latencies);
        errors += task_errors;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(process_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    latencies_us.sort_unstable();
    Ok(Measurement {
        requests: latencies_us.len() as u64,
        errors,
        elapsed,
        latencies_us,
        cpu,
        writer: IngestWriterTotals::default(),
        gateway: WebhookAckTotals::default(),
    })
}

/// The bare endpoint: reads the body and answers what the gateway answers, doing nothing else.
async fn start_bare(shutdown: CancellationToken) -> Result<SocketAddr, Error> {
    let counter = Arc::new(AtomicU64::new(0));
    let app = Router::new().route(
        "/webhooks/hana/{event}",
        post(move |body: Bytes| {
            let counter = counter.clone();
            async move {
                let id = counter.fetch_add(1, Ordering::Relaxed);
                Json(serde_json::json!({
                    "status": "accepted",
                    "event_id": format!("evt_{id}_{}", body.len()),
                    "duplicate": false
                }))
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(addr)
}

/// The gateway and the orchestrator, each on its own loopback port, over `database_url`.
async fn start_leadrelay(
    database_url: &str,
    shutdown: CancellationToken,
) -> Result<SocketAddr, Error> {
    let vars: HashMap<&str, String> = HashMap::from([
        ("LEADRELAY_DATABASE_URL", database_url.to_owned()),
        ("LEADRELAY_HANA_WEBHOOK_TOKEN", TOKEN.to_owned()),
    ]);
    let mut settings = Settings::from_lookup(|name| vars.get(name).cloned())?;
    let store = leadrelay_orchestrator::open_store(&settings).await?;
    let orchestrator = TcpListener::bind("127.0.0.1:0").await?;
    settings.peers.orchestrator = format!("http://{}", orchestrator.local_addr()?).parse()?;
    tokio::spawn(leadrelay_orchestrator::serve(
        store,
        IngestPolicy::default(),
        leadrelay_orchestrator::Pollers::default(),
        orchestrator,
        shutdown.clone(),
    ));
    let gateway = TcpListener::bind("127.0.0.1:0").await?;
    let addr = gateway.local_addr()?;
    tokio::spawn(leadrelay_gateway::serve(
        GatewayConfig::from_settings(&settings)?,
        gateway,
        shutdown,
    ));
    Ok(addr)
}

/// A target under load: where to post, and the bodies' sequence, which runs on across rounds.
struct Target {
    label: &'static str,
    /// The engine of its ingest writer; `None` for the bare endpoint.
    engine: Option<&'static str>,
    url: String,
    sequence: Arc<AtomicU64>,
    measured: Measurement,
    /// This target's throughput in each round, for the per-round ratios.
    per_round: Vec<f64>,
}

impl Target {
    fn new(label: &'static str, engine: Option<&'static str>, url: String) -> Self {
        Self {
            label,
            engine,
            url,
            sequence: Arc::new(AtomicU64::new(0)),
            measured: Measurement::default(),
            per_round: Vec::new(),
        }
    }

    /// Warm-up: connections, pools, the SQLite page cache.
    async fn warm_up(&self, connections: usize) -> Result<(), Error> {
        load(
            &self.url,
            connections,
            Duration::from_secs(1),
            self.sequence.clone(),
        )
        .await?;
        Ok(())
    }

    async fn measure_round(&mut self, connections: usize, duration: Duration) -> Result<(), Error> {
        let before = self.engine.map(|engine| {
            (
                metrics().ingest_writer_totals(engine),
                metrics().webhook_ack_totals("hana"),
            )
        });
        let round = load(&self.url, connections, duration, self.sequence.clone()).await?;
        // Targets take turns, so what the gateway answered meanwhile was this target's.
        if let (Some(engine), Some((writer, gateway))) = (self.engine, before) {
            self.measured.writer += metrics().ingest_writer_totals(engine) - writer;
            self.measured.gateway += metrics().webhook_ack_totals("hana") - gateway;
        }
        if let Some(spent) = round.cpu {
            self.measured.cpu = Some(self.measured.cpu.unwrap_or_default() + spent);
        }
        self.per_round.push(round.throughput());
        self.measured.requests += round.requests;
        self.measured.errors += round.errors;
        self.measured.elapsed += round.elapsed;
        self.measured.latencies_us.extend(round.latencies_us);
        Ok(())
    }
}

fn row(label: &str, measurement: &Measurement, baseline: f64, spread: &str) {
    println!(
        "{label:<34} {:>9.0} {:>8.2} {:>8.2} {:>10.0} {:>6.2} {:>7} {:>9.1}% {spread:>17}",
        measurement.throughput(),
        measurement.percentile_ms(0.50),
        measurement.percentile_ms(0.99),
        measurement.cpu_us_per_request(),
        measurement.cores_busy(),
        measurement.errors,
        100.0 * measurement.throughput() / baseline
    );
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let seconds = env_number("LEADRELAY_BENCH_SECONDS", 10);
    let rounds = env_number("LEADRELAY_BENCH_ROUNDS", 5).clamp(1, seconds.max(1));
    let connections = usize::try_from(env_number("LEADRELAY_BENCH_CONNECTIONS", 64))?;
    let slice = Duration::from_secs_f64(seconds as f64 / rounds as f64);
    let shutdown = CancellationToken::new();
    let folder = tempfile::tempdir()?;

    let bare = start_bare(shutdown.clone()).await?;
    let mut targets = vec![Target::new(
        "bare axum endpoint",
        None,
        format!("http://{bare}/webhooks/hana/lead.created"),
    )];
    let sqlite_url = format!("sqlite://{}/bench.db", folder.path().display());
    let sqlite = start_leadrelay(&sqlite_url, shutdown.clone()).await?;
    targets.push(Target::new(
        "gateway+orchestrator, SQLite",
        Some(Backend::Sqlite.name()),
        format!("http://{sqlite}/webhooks/hana/lead.created?token={TOKEN}"),
    ));
    let postgres = match TestDatabase::create("bench").await {
        Ok(database) => {
            let gateway = start_leadrelay(database.url(), shutdown.clone()).await?;
            targets.push(Target::new(
                "gateway+orchestrator, Postgres",
                Some(Backend::Postgres.name()),
                format!("http://{gateway}/webhooks/hana/lead.created?token={TOKEN}"),
            ));
            Ok(database)
        }
        Err(error) => Err(error.to_string()),
    };

    for target in &targets {
        target.warm_up(connections).await?;
    }
    // The targets take turns, a slice each per round: the machine's speed drifts (the bare
    // endpoint alone has measured 31k to 61k req/s within minutes), and turns expose every
    // target to the same drift, so the ratios hold even when the absolute figures move.
    for round in 1..=rounds {
        for target in &mut targets {
            target.measure_round(connections, slice).await?;
        }
        eprintln!("round {round} of {rounds} measured");
    }

    println!();
    println!(
        "webhook ingest: {connections} connections, {seconds} s per target in {rounds} turns after 1 s warm-up, {} cores shared with the load generator",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "{:<34} {:>9} {:>8} {:>8} {:>10} {:>6} {:>7} {:>10} {:>17}",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "cores",
        "errors",
        "of bare",
        "of bare per turn"
    );
    let (bare, others) = targets.split_first_mut().ok_or("no bare target")?;
    bare.measured.latencies_us.sort_unstable();
    row(bare.label, &bare.measured, bare.measured.throughput(), "");
    for target in others.iter_mut() {
        target.measured.latencies_us.sort_unstable();
        let ratios: Vec<f64> = target
            .per_round
            .iter()
            .zip(&bare.per_round)
            .map(|(own, bare)| 100.0 * own / bare)
            .collect();
        let spread = format!(
            "{:.1}–{:.1}%",
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max)
        );
        row(
            target.label,
            &target.measured,
            bare.measured.throughput(),
            &spread,
        );
    }
    if let Err(reason) = &postgres {
        println!("gateway+orchestrator, Postgres     skipped: {reason}");
    }
    println!(
        "CPU µs/req and cores (CPU time per second) count this process (servers and load generator), not the Postgres server's own processes."
    );
    // The writer stores the webhooks one group after the other: its time per webhook bounds the
    // rate, and its busy share says how close to that bound the run came.
    println!();
    // On SQLite every acknowledgement also waits for an fsync of the write-ahead log: its time
    // is the disk's share of the time to acknowledge. The log written per webhook is what the
    // fsyncs and the checkpoints move, and unlike the times it does not drift with the machine.
    println!(
        "{:<34} {:>16} {:>12} {:>16} {:>14} {:>16} {:>16}",
        "ingest writer",
        "µs per webhook",
        "busy",
        "webhooks/group",
        "log fsync ms",
        "webhooks/fsync",
        "log KiB/webhook"
    );
    for target in others.iter() {
        let writer = &target.measured;
        let (sync_ms, per_sync) = writer.log_syncs().map_or_else(
            || ("—".to_owned(), "—".to_owned()),
            |(ms, per_sync)| (format!("{ms:.2}"), format!("{per_sync:.1}")),
        );
        let log_kib = writer
            .log_kib_per_call()
            .map_or_else(|| "—".to_owned(), |kib| format!("{kib:.1}"));
        println!(
            "{:<34} {:>16.1} {:>11.0}% {:>16.1} {:>14} {:>16} {:>16}",
            target.label,
            writer.writer_us_per_call(),
            100.0 * writer.writer_busy_share(),
            writer.writer.calls as f64 / writer.writer.groups as f64,
            sync_ms,
            per_sync,
            log_kib
        );
    }
    // The time to acknowledge, taken apart: outside the gateway's handler (the load generator,
    // HTTP/1 both ways, reading the body), inside it but outside the orchestrator's ingest stages
    // (parsing, the gRPC stream both ways, the orchestrator's reading and answering), and those
    // stages, from the metrics.
    println!();
    println!(
        "{:<34} {:>8} {:>14} {:>14} {:>8} {:>9} {:>9}",
        "mean ms per webhook",
        "ack",
        "client, HTTP",
        "gateway, gRPC",
        "queued",
        "in group",
        "to fsync"
    );
    for target in others.iter() {
        let measured = &target.measured;
        let ack = measured.mean_ms();
        let gateway = measured.gateway_ms();
        let stages = measured.stages_ms();
        let sync = (measured.writer.synced_calls > 0).then_some(stages.sync);
        println!(
            "{:<34} {:>8.2} {:>14.2} {:>14.2} {:>8.2} {:>9.2} {:>9}",
            target.label,
            ack,
            ack - gateway,
            gateway - stages.queued - stages.group - stages.sync,
            stages.queued,
            stages.group,
            sync.map_or_else(|| "—".to_owned(), |ms| format!("{ms:.2}")),
        );
    }
    shutdown.cancel();
    if let Ok(database) = postgres {
        tokio::time::sleep(Duration::from_millis(500)).await;
        database.drop_database().await?;
    }
    Ok(())
}
