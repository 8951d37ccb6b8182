//! Prometheus metrics: one registry per process, served as text on `GET /metrics` at
//! `LEADRELAY_METRICS_LISTEN` by every service (by `up` once for all of them).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `leadrelay_webhooks_total` | counter | `source` (hana, pipedrive), `outcome` |
//! | `leadrelay_webhook_ack_seconds` | histogram | `source` |
//! | `leadrelay_jobs` | gauge, read from the store at scrape time | `target`, `state` (pending, running, dead) |
//! | `leadrelay_oldest_pending_job_age_seconds` | gauge, at scrape time | `target` (each target this orchestrator runs) |
//! | `leadrelay_jobs_finished_total` | counter | `target`, `outcome` (done, retry, dead) |
//! | `leadrelay_dead_letters_total` | counter | `target` |
//! | `leadrelay_crm_calls_total` | counter | `system`, `status` (HTTP status, or timeout, network) |
//! | `leadrelay_crm_call_seconds` | histogram | `system` |
//! | `leadrelay_rate_limit_waits_total` | counter | `system` |
//! | `leadrelay_rate_limit_wait_seconds` | histogram | `system` |
//! | `leadrelay_ingest_groups_total` | counter | `engine` (sqlite, postgres) |
//! | `leadrelay_ingest_group_calls_total` | counter | `engine` |
//! | `leadrelay_ingest_writer_busy_seconds_total` | counter | `engine` |
//! | `leadrelay_ingest_log_sync_seconds` | histogram | `engine` (sqlite) |
//! | `leadrelay_ingest_log_bytes_total` | counter | `engine` (sqlite) |
//! | `leadrelay_ingest_log_length_bytes` | gauge, at the writer's last commit | `engine` (sqlite) |
//! | `leadrelay_ingest_checkpoint_failures_total` | counter | `engine` (sqlite) |
//! | `leadrelay_ingest_checkpoint_sync_seconds` | histogram | `engine` (sqlite) |
//! | `leadrelay_ingest_call_seconds` | histogram, one sample per webhook call and stage | `engine`, `stage` (queued, group, sync) |

use std::{
    future::Future,
    pin::Pin,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs of a sample.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Work done before each scrape (reading gauges from the store).
type Refresh = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    refreshers: Mutex<Vec<Refresh>>,
    webhooks: Family<Labels, Counter>,
    webhook_ack: HistogramFamily,
    jobs: Family<Labels, Gauge>,
    oldest_pending_age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    jobs_finished: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    crm_calls: Family<Labels, Counter>,
    crm_call_time: HistogramFamily,
    rate_limit_waits: Family<Labels, Counter>,
    rate_limit_wait_time: HistogramFamily,
    ingest_groups: Family<Labels, Counter>,
    ingest_group_calls: Family<Labels, Counter>,
    ingest_writer_busy: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    ingest_log_sync: HistogramFamily,
    /// The same fsyncs' count and time, for [`Metrics::ingest_writer_totals`]: a histogram's own
    /// count and sum are readable only in its crate's tests. Not registered (the histogram
    /// exports them).
    ingest_log_sync_totals: Family<Labels, TimeTotals>,
    ingest_log_bytes: Family<Labels, Counter>,
    ingest_log_length: Family<Labels, Gauge>,
    ingest_checkpoint_failures: Family<Labels, Counter>,
    ingest_checkpoint_sync: HistogramFamily,
    ingest_call_time: HistogramFamily,
    /// The same samples' count and time, for [`Metrics::ingest_writer_totals`]. Not registered.
    ingest_call_totals: Family<Labels, TimeTotals>,
    /// The count and time of the answers `webhook_ack` counts, for
    /// [`Metrics::webhook_ack_totals`]. Not registered.
    webhook_ack_totals: Family<Labels, TimeTotals>,
}

/// A stage of a Hana webhook call's way through the orchestrator's ingest, one after the other:
/// together they are the orchestrator's share of the time to acknowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestStage {
    /// In the writer's queue, until a group takes the call: long while the writer is busy.
    Queued,
    /// In its group, from the group's start until its transaction committed: the group's size
    /// times the writer's time per call.
    Group,
    /// From the commit until it is durable: waiting for the fsync of SQLite's write-ahead log
    /// under way, then one's own. Postgres flushes inside its commit and has no such stage.
    Sync,
}

impl IngestStage {
    /// The stage's `stage` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Group => "group",
            Self::Sync => "sync",
        }
    }
}

/// The count and sum of a histogram's samples, which its own crate lets only its tests read.
#[derive(Debug, Default)]
struct TimeTotals {
    count: Counter,
    seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl TimeTotals {
    /// Counts one sample that took `time`.
    fn add(&self, time: Duration) {
        self.count.inc();
        self.seconds.inc_by(time.as_secs_f64());
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The ingest writer's counters on one engine.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IngestWriterTotals {
    /// Transactions committed.
    pub groups: u64,
    /// Webhook calls handled in them.
    pub calls: u64,
    /// Time spent on them.
    pub busy_seconds: f64,
    /// fsyncs of the write-ahead log that made them durable (SQLite; on Postgres the commit
    /// itself waits for the server's flush).
    pub log_syncs: u64,
    /// Time those fsyncs took.
    pub log_sync_seconds: f64,
    /// Bytes the commits appended to the write-ahead log (SQLite): what those fsyncs wrote.
    pub log_bytes: u64,
    /// The time the calls spent in each stage ([`IngestStage`]), summed over the calls: divided
    /// by `calls` (by `synced_calls` for [`IngestStage::Sync`]), the mean per call.
    pub queued_seconds: f64,
    /// See `queued_seconds`.
    pub group_seconds: f64,
    /// See `queued_seconds`.
    pub sync_seconds: f64,
    /// Calls made durable by an fsync after their commit (SQLite).
    pub synced_calls: u64,
}

impl std::ops::Sub for IngestWriterTotals {
    type Output = Self;

    /// What the writer did between two readings.
    fn sub(self, earlier: Self) -> Self {
        Self {
            groups: self.groups - earlier.groups,
            calls: self.calls - earlier.calls,
            busy_seconds: self.busy_seconds - earlier.busy_seconds,
            log_syncs: self.log_syncs - earlier.log_syncs,
            log_sync_seconds: self.log_sync_seconds - earlier.log_sync_seconds,
            log_bytes: self.log_bytes - earlier.log_bytes,
            queued_seconds: self.queued_seconds - earlier.queued_seconds,
            group_seconds: self.group_seconds - earlier.group_seconds,
            sync_seconds: self.sync_seconds - earlier.sync_seconds,
            synced_calls: self.synced_calls - earlier.synced_calls,
        }
    }
}

impl std::ops::AddAssign for IngestWriterTotals {
    fn add_assign(&mut self, more: Self) {
        self.groups += more.groups;
        self.calls += more.calls;
        self.busy_seconds += more.busy_seconds;
        self.log_syncs += more.log_syncs;
        self.log_sync_seconds += more.log_sync_seconds;
        self.log_bytes += more.log_bytes;
        self.queued_seconds += more.queued_seconds;
        self.group_seconds += more.group_seconds;
        self.sync_seconds += more.sync_seconds;
        self.synced_calls += more.synced_calls;
    }
}

/// The gateway's answers to one source's webhooks: how many, and their time in the handler.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WebhookAckTotals {
    /// Webhooks answered, whatever the answer.
    pub answered: u64,
    /// Time from each handler's start to its answer, summed.
    pub seconds: f64,
}

impl std::ops::Sub for WebhookAckTotals {
    type Output = Self;

    /// What was answered between two readings.
    fn sub(self, earlier: Self) -> Self {
        Self {
            answered: self.answered - earlier.answered,
            seconds: self.seconds - earlier.seconds,
        }
    }
}

impl std::ops::AddAssign for WebhookAckTotals {
    fn add_assign(&mut self, more: Self) {
        self.answered += more.answered;
        self.seconds += more.seconds;
    }
}

/// Time buckets from 1 ms to about 33 s, doubling: acks are milliseconds, CRM calls tens to
/// hundreds of milliseconds, rate-limit waits seconds.
fn time_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

/// Time buckets from 0.1 ms to about 3 s, doubling: an fsync takes a fraction of a millisecond on
/// an idle SSD and milliseconds on a busy or networked disk.
fn sync_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

/// The process's metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(name, value)| (*name, (*value).to_owned()))
        .collect()
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("leadrelay");
        let webhooks = Family::<Labels, Counter>::default();
        registry.register(
            "webhooks",
            "Webhook calls received, by source and outcome",
            webhooks.clone(),
        );
        let webhook_ack = HistogramFamily::new_with_constructor(time_buckets as fn() -> Histogram);
        registry.register(
            "webhook_ack_seconds",
            "Time from a webhook's arrival to its answer",
            webhook_ack.clone(),
        );
        let jobs = Family::<Labels, Gauge>::default();
        registry.register(
            "jobs",
            "Sync jobs not done, by target and state (pending, running, dead)",
            jobs.clone(),
        );
        let oldest_pending_age =
            Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "oldest_pending_job_age_seconds",
            "Age of the oldest pending sync job of each target the orchestrator runs; 0 when none is pending",
            oldest_pending_age.clone(),
        );
        let jobs_finished = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Sync job runs by target and outcome (done, retry, dead)",
            jobs_finished.clone(),
        );
        let dead_letters = Family::<Labels, Counter>::default();
        registry.register(
            "dead_letters",
            "Sync jobs that became dead letters",
            dead_letters.clone(),
        );
        let crm_calls = Family::<Labels, Counter>::default();
        registry.register(
            "crm_calls",
            "Calls to Hana, Pipedrive and SalesMan by HTTP status (or timeout, network)",
            crm_calls.clone(),
        );
        let crm_call_time =
            HistogramFamily::new_with_constructor(time_buckets as fn() -> Histogram);
        registry.register(
            "crm_call_seconds",
            "Time of one call to a CRM",
            crm_call_time.clone(),
        );
        let rate_limit_waits = Family::<Labels, Counter>::default();
        registry.register(
            "rate_limit_waits",
            "Calls held back to stay within a CRM's rate limit",
            rate_limit_waits.clone(),
        );
        let rate_limit_wait_time =
            HistogramFamily::new_with_constructor(time_buckets as fn() -> Histogram);
        registry.register(
            "rate_limit_wait_seconds",
            "How long a call was held back for a CRM's rate limit",
            rate_limit_wait_time.clone(),
        );
        let ingest_groups = Family::<Labels, Counter>::default();
        registry.register(
            "ingest_groups",
            "Transactions the ingest writer committed Hana webhooks in, by engine",
            ingest_groups.clone(),
        );
        let ingest_group_calls = Family::<Labels, Counter>::default();
        registry.register(
            "ingest_group_calls",
            "Hana webhook calls the ingest writer handled in those transactions, by engine",
            ingest_group_calls.clone(),
        );
        let ingest_writer_busy =
            Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "ingest_writer_busy_seconds",
            "Time the ingest writer, which stores webhooks one group after the other, spent on its groups; its rate is the share of time it is busy, and near 1 it is what limits ingest",
            ingest_writer_busy.clone(),
        );
        let ingest_log_sync =
            HistogramFamily::new_with_constructor(sync_buckets as fn() -> Histogram);
        registry.register(
            "ingest_log_sync_seconds",
            "Time of one fsync of the SQLite write-ahead log, which every webhook acknowledgement waits for: the disk's share of the time to acknowledge",
            ingest_log_sync.clone(),
        );
        let ingest_log_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "ingest_log_bytes",
            "Bytes the ingest writer's commits appended to the SQLite write-ahead log (whole pages, each with its frame header), which the fsyncs write and the checkpoints copy; divided by the webhooks stored, the disk write each webhook costs",
            ingest_log_bytes.clone(),
        );
        let ingest_log_length = Family::<Labels, Gauge>::default();
        registry.register(
            "ingest_log_length_bytes",
            "Length of the SQLite write-ahead log at the ingest writer's last commit, counted from where it last started over; it starts over about every 64 MiB. Past ~100 MiB something keeps it from starting over and it grows until the disk is full: a connection holding a read transaction open (an sqlite3 shell left in one, a backup tool), or checkpoints failing",
            ingest_log_length.clone(),
        );
        let ingest_checkpoint_failures = Family::<Labels, Counter>::default();
        registry.register(
            "ingest_checkpoint_failures",
            "Checkpoints of the SQLite write-ahead log, or fsyncs of the database after one, that failed; the log keeps every page they did not copy, and the next checkpoint tries again",
            ingest_checkpoint_failures.clone(),
        );
        let ingest_checkpoint_sync =
            HistogramFamily::new_with_constructor(sync_buckets as fn() -> Histogram);
        registry.register(
            "ingest_checkpoint_sync_seconds",
            "Time of one fsync of the SQLite database after the checkpoint thread copied a pass of the write-ahead log into it: the fsync of the log, which every acknowledgement waits for, queues behind it on the same disk",
            ingest_checkpoint_sync.clone(),
        );
        let ingest_call_time =
            HistogramFamily::new_with_constructor(sync_buckets as fn() -> Histogram);
        registry.register(
            "ingest_call_seconds",
            "Time a Hana webhook call spent in each stage of the orchestrator's ingest, one after the other: queued (waiting for the writer), group (in its transaction until the commit) and, on SQLite, sync (from the commit until the write-ahead log's fsync made it durable)",
            ingest_call_time.clone(),
        );
        Self {
            registry,
            refreshers: Mutex::new(Vec::new()),
            webhooks,
            webhook_ack,
            jobs,
            oldest_pending_age,
            jobs_finished,
            dead_letters,
            crm_calls,
            crm_call_time,
            rate_limit_waits,
            rate_limit_wait_time,
            ingest_groups,
            ingest_group_calls,
            ingest_writer_busy,
            ingest_log_sync,
            ingest_log_sync_totals: Family::default(),
            ingest_log_bytes,
            ingest_log_length,
            ingest_checkpoint_failures,
            ingest_checkpoint_sync,
            ingest_call_time,
            ingest_call_totals: Family::default(),
            webhook_ack_totals: Family::default(),
        }
    }

    /// The ingest writer on `engine` handled a group of `calls` in `busy`.
    pub fn ingest_group(&self, engine: &str, calls: usize, busy: Duration) {
        let engine = labels(&[("engine", engine)]);
        self.ingest_groups.get_or_create(&engine).inc();
        self.ingest_group_calls
            .get_or_create(&engine)
            .inc_by(u64::try_from(calls).unwrap_or(u64::MAX));
        self.ingest_writer_busy
            .get_or_create(&engine)
            .inc_by(busy.as_secs_f64());
    }

    /// The ingest writer on `engine` made its commits durable with an fsync that took `elapsed`.
    pub fn ingest_log_synced(&self, engine: &str, elapsed: Duration) {
        let engine = labels(&[("engine", engine)]);
        self.ingest_log_sync
            .get_or_create(&engine)
            .observe(elapsed.as_secs_f64());
        let totals = self.ingest_log_sync_totals.get_or_create(&engine);
        totals.add(elapsed);
    }

    /// A commit of the ingest writer on `engine` appended `bytes` to the write-ahead log.
    pub fn ingest_log_written(&self, engine: &str, bytes: u64) {
        self.ingest_log_bytes
            .get_or_create(&labels(&[("engine", engine)]))
            .inc_by(bytes);
    }

    /// The write-ahead log of `engine` was `bytes` long after the ingest writer's last commit.
    pub fn ingest_log_length(&self, engine: &str, bytes: u64) {
        self.ingest_log_length
            .get_or_create(&labels(&[("engine", engine)]))
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A checkpoint of the write-ahead log of `engine`, or the fsync of the database after one,
    /// failed.
    pub fn ingest_checkpoint_failed(&self, engine: &str) {
        self.ingest_checkpoint_failures
            .get_or_create(&labels(&[("engine", engine)]))
            .inc();
    }

    /// The checkpoint thread of `engine` fsynced the database in `elapsed`, after copying a pass
    /// of the write-ahead log into it.
    pub fn ingest_checkpoint_synced(&self, engine: &str, elapsed: Duration) {
        self.ingest_checkpoint_sync
            .get_or_create(&labels(&[("engine", engine)]))
            .observe(elapsed.as_secs_f64());
    }

    /// Calls of the ingest writer on `engine` spent `times` in `stage`, one per call.
    pub fn ingest_calls(
        &self,
        engine: &str,
        stage: IngestStage,
        times: impl IntoIterator<Item = Duration>,
    ) {
        let labels = labels(&[("engine", engine), ("stage", stage.label())]);
        let histogram = self.ingest_call_time.get_or_create(&labels);
        let totals = self.ingest_call_totals.get_or_create(&labels);
        for time in times {
            histogram.observe(time.as_secs_f64());
            totals.add(time);
        }
    }

    /// A webhook from `source` answered with `outcome` after `elapsed`.
    pub fn webhook(&self, source: &str, outcome: &str, elapsed: Duration) {
        self.webhooks
            .get_or_create(&labels(&[("source", source), ("outcome", outcome)]))
            .inc();
        let source = labels(&[("source", source)]);
        self.webhook_ack
            .get_or_create(&source)
            .observe(elapsed.as_secs_f64());
        self.webhook_ack_totals.get_or_create(&source).add(elapsed);
    }

    /// How many webhooks from `source` the gateway answered since the process started, and the
    /// time they took from the handler's start (the body read) to the answer.
    pub fn webhook_ack_totals(&self, source: &str) -> WebhookAckTotals {
        self.webhook_ack_totals
            .get(&labels(&[("source", source)]))
            .map_or_else(WebhookAckTotals::default, |totals| WebhookAckTotals {
                answered: totals.count.get(),
                seconds: totals.seconds.get(),
            })
    }

    /// Replaces the job counts with `counts` of (target, state, count): a state no job is in any
    /// more disappears rather than keeping its last count.
    pub fn set_job_counts<'a>(&self, counts: impl IntoIterator<Item = (&'a str, &'a str, i64)>) {
        self.jobs.clear();
        for (target, state, count) in counts {
            self.jobs
                .get_or_create(&labels(&[("target", target), ("state", state)]))
                .set(count);
        }
    }

    /// Replaces the ages of the oldest pending job of each target with `ages` of (target, age).
    pub fn set_oldest_pending_ages<'a>(&self, ages: impl IntoIterator<Item = (&'a str, Duration)>) {
        self.oldest_pending_age.clear();
        for (target, age) in ages {
            self.oldest_pending_age
                .get_or_create(&labels(&[("target", target)]))
                .set(age.as_secs_f64());
        }
    }

    /// A job run for `target` ended with `outcome`: done, retry or dead.
    pub fn job_finished(&self, target: &str, outcome: &str) {
        self.jobs_finished
            .get_or_create(&labels(&[("target", target), ("outcome", outcome)]))
            .inc();
        if outcome == "dead" {
            self.dead_letters
                .get_or_create(&labels(&[("target", target)]))
                .inc();
        }
    }

    /// A call to `system` ended with `status` after `elapsed`.
    pub fn crm_call(&self, system: &str, status: &str, elapsed: Duration) {
        self.crm_calls
            .get_or_create(&labels(&[("system", system), ("status", status)]))
            .inc();
        self.crm_call_time
            .get_or_create(&labels(&[("system", system)]))
            .observe(elapsed.as_secs_f64());
    }

    /// A call to `system` was held back `waited` for its rate limit.
    pub fn rate_limit_wait(&self, system: &str, waited: Duration) {
        self.rate_limit_waits
            .get_or_create(&labels(&[("system", system)]))
            .inc();
        self.rate_limit_wait_time
            .get_or_create(&labels(&[("system", system)]))
            .observe(waited.as_secs_f64());
    }

    /// What the ingest writer on `engine` has done since the process started.
    pub fn ingest_writer_totals(&self, engine: &str) -> IngestWriterTotals {
        let stage = |stage: IngestStage| {
            self.ingest_call_totals
                .get(&labels(&[("engine", engine), ("stage", stage.label())]))
                .map_or((0, 0.0), |totals| {
                    (totals.count.get(), totals.seconds.get())
                })
        };
        let (synced_calls, sync_seconds) = stage(IngestStage::Sync);
        let engine = labels(&[("engine", engine)]);
        let log_syncs = self.ingest_log_sync_totals.get(&engine);
        IngestWriterTotals {
            groups: self
                .ingest_groups
                .get(&engine)
                .map_or(0, |count| count.get()),
            calls: self
                .ingest_group_calls
                .get(&engine)
                .map_or(0, |count| count.get()),
            busy_seconds: self
                .ingest_writer_busy
                .get(&engine)
                .map_or(0.0, |busy| busy.get()),
            log_syncs: log_syncs.as_ref().map_or(0, |totals| totals.count.get()),
            log_sync_seconds: log_syncs
                .as_ref()
                .map_or(0.0, |totals| totals.seconds.get()),
            log_bytes: self
                .ingest_log_bytes
                .get(&engine)
                .map_or(0, |bytes| bytes.get()),
            queued_seconds: stage(IngestStage::Queued).1,
            group_seconds: stage(IngestStage::Group).1,
            sync_seconds,
            synced_calls,
        }
    }

    /// Runs `refresh` before every scrape (e.g. to read gauges from the store).
    pub fn on_scrape<F, Fut>(&self, refresh: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Ok(mut refreshers) = self.refreshers.lock() {
            refreshers.push(Box::new(move || Box::pin(refresh())));
        }
    }

    /// The metrics as Prometheus text, after running the scrape hooks.
    pub async fn render(&self) -> String {
        let pending: Vec<_> = match self.refreshers.lock() {
            Ok(refreshers) => refreshers.iter().map(|refresh| refresh()).collect(),
            Err(_) => Vec::new(),
        };
        for refresh in pending {
            refresh.await;
        }
        let mut text = String::new();
        if let Err(error) = encode(&mut text, &self.registry) {
            tracing::warn!(%error, "could not encode the metrics");
        }
        text
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    use axum::{Router, http::header, routing::get};

    let app = Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics().render().await,
            )
        }),
    );
    tracing::info!(
        addr = %crate::telemetry::listening_addr(&listener),
        "metrics listening"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The names of the samples `text` holds, labels left off.
    fn sample_names(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn every_metric_renders_with_its_labels_and_buckets() {
        let metrics = Metrics::new();
        metrics.webhook("hana", "accepted", Duration::from_millis(3));
        metrics.set_job_counts([("pipedrive", "pending", 2)]);
        metrics.set_oldest_pending_ages([("pipedrive", Duration::from_secs(5))]);
        metrics.job_finished("salesman", "dead");
        metrics.crm_call("pipedrive", "429", Duration::from_millis(80));
        metrics.rate_limit_wait("pipedrive", Duration::from_secs(2));
        metrics.ingest_group("sqlite", 19, Duration::from_millis(250));
        metrics.ingest_log_synced("sqlite", Duration::from_micros(500));
        metrics.ingest_log_written("sqlite", 41_200);
        // The length is the last one reported, not a sum.
        metrics.ingest_log_length("sqlite", 70_000_000);
        metrics.ingest_log_length("sqlite", 41_200);
        metrics.ingest_checkpoint_failed("sqlite");
        metrics.ingest_checkpoint_failed("sqlite");
        metrics.ingest_checkpoint_synced("sqlite", Duration::from_millis(12));
        metrics.ingest_calls(
            "sqlite",
            IngestStage::Queued,
            [Duration::from_micros(300), Duration::from_micros(900)],
        );
        metrics.ingest_calls("sqlite", IngestStage::Group, [Duration::from_millis(1); 2]);
        metrics.ingest_calls("sqlite", IngestStage::Sync, [Duration::from_micros(700)]);
        let text = metrics.render().await;
        for sample in [
            r#"leadrelay_webhooks_total{source="hana",outcome="accepted"} 1"#,
            r#"leadrelay_jobs{target="pipedrive",state="pending"} 2"#,
            "leadrelay_oldest_pending_job_age_seconds{target=\"pipedrive\"} 5.0",
            r#"leadrelay_jobs_finished_total{target="salesman",outcome="dead"} 1"#,
            r#"leadrelay_dead_letters_total{target="salesman"} 1"#,
            r#"leadrelay_crm_calls_total{system="pipedrive",status="429"} 1"#,
            r#"leadrelay_rate_limit_waits_total{system="pipedrive"} 1"#,
            r#"leadrelay_webhook_ack_seconds_bucket{le="0.004",source="hana"} 1"#,
            r#"leadrelay_ingest_groups_total{engine="sqlite"} 1"#,
            r#"leadrelay_ingest_group_calls_total{engine="sqlite"} 19"#,
            r#"leadrelay_ingest_writer_busy_seconds_total{engine="sqlite"} 0.25"#,
            r#"leadrelay_ingest_log_sync_seconds_bucket{le="0.0004",engine="sqlite"} 0"#,
            r#"leadrelay_ingest_log_sync_seconds_bucket{le="0.0008",engine="sqlite"} 1"#,
            r#"leadrelay_ingest_log_bytes_total{engine="sqlite"} 41200"#,
            r#"leadrelay_ingest_log_length_bytes{engine="sqlite"} 41200"#,
            r#"leadrelay_ingest_checkpoint_failures_total{engine="sqlite"} 2"#,
            r#"leadrelay_ingest_checkpoint_sync_seconds_bucket{le="0.0128",engine="sqlite"} 1"#,
            r#"leadrelay_ingest_call_seconds_bucket{le="0.0004",engine="sqlite",stage="queued"} 1"#,
            r#"leadrelay_ingest_call_seconds_bucket{le="0.0016",engine="sqlite",stage="queued"} 2"#,
            r#"leadrelay_ingest_call_seconds_count{engine="sqlite",stage="group"} 2"#,
            r#"leadrelay_ingest_call_seconds_bucket{le="0.0008",engine="sqlite",stage="sync"} 1"#,
        ] {
            assert!(text.contains(sample), "{sample} not in:\n{text}");
        }
        assert_eq!(
            metrics.ingest_writer_totals("sqlite"),
            IngestWriterTotals {
                groups: 1,
                calls: 19,
                busy_seconds: 0.25,
                log_syncs: 1,
                log_sync_seconds: 0.0005,
                log_bytes: 41_200,
                queued_seconds: 0.0012,
                group_seconds: 0.002,
                sync_seconds: 0.0007,
                synced_calls: 1,
            }
        );
        assert_eq!(
            metrics.ingest_writer_totals("postgres"),
            IngestWriterTotals::default()
        );
        assert_eq!(
            metrics.webhook_ack_totals("hana"),
            WebhookAckTotals {
                answered: 1,
                seconds: 0.003,
            }
        );
        assert_eq!(
            metrics.webhook_ack_totals("pipedrive"),
            WebhookAckTotals::default()
        );
        let answered_before = metrics.webhook_ack_totals("hana");
        metrics.webhook("hana", "duplicate", Duration::from_millis(5));
        metrics.webhook("hana", "unauthorized", Duration::from_millis(1));
        let mut answered = WebhookAckTotals::default();
        answered += metrics.webhook_ack_totals("hana") - answered_before;
        assert_eq!(answered.answered, 2);
        assert!((answered.seconds - 0.006).abs() < 1e-9, "{answered:?}");
        let before = metrics.ingest_writer_totals("sqlite");
        metrics.ingest_group("sqlite", 5, Duration::from_millis(50));
        metrics.ingest_log_synced("sqlite", Duration::from_millis(2));
        metrics.ingest_log_written("sqlite", 8_240);
        metrics.ingest_calls("sqlite", IngestStage::Sync, [Duration::from_millis(3); 5]);
        let mut spent = IngestWriterTotals::default();
        spent += metrics.ingest_writer_totals("sqlite") - before;
        assert_eq!((spent.groups, spent.calls, spent.log_syncs), (1, 5, 1));
        assert!((spent.busy_seconds - 0.05).abs() < 1e-9, "{spent:?}");
        assert!((spent.log_sync_seconds - 0.002).abs() < 1e-9, "{spent:?}");
        assert_eq!((spent.synced_calls, spent.log_bytes), (5, 8_240));
        assert!((spent.sync_seconds - 0.015).abs() < 1e-9, "{spent:?}");
        assert!(text.ends_with("# EOF\n"));
    }

    /// The Grafana dashboard shipped in deploy/ queries only metrics that exist.
    #[tokio::test]
    async fn the_dashboard_queries_only_metrics_that_exist() {
        let metrics = Metrics::new();
        metrics.webhook("hana", "accepted", Duration::from_millis(3));
        metrics.set_job_counts([("pipedrive", "pending", 2)]);
        metrics.set_oldest_pending_ages([("pipedrive", Duration::from_secs(3))]);
        metrics.job_finished("salesman", "dead");
        metrics.crm_call("pipedrive", "200", Duration::from_millis(80));
        metrics.rate_limit_wait("pipedrive", Duration::from_secs(2));
        metrics.ingest_group("sqlite", 19, Duration::from_millis(250));
        metrics.ingest_log_synced("sqlite", Duration::from_micros(500));
        metrics.ingest_log_written("sqlite", 41_200);
        metrics.ingest_log_length("sqlite", 41_200);
        metrics.ingest_checkpoint_failed("sqlite");
        metrics.ingest_checkpoint_synced("sqlite", Duration::from_millis(12));
        metrics.ingest_calls("sqlite", IngestStage::Queued, [Duration::from_micros(300)]);
        let exist = sample_names(&metrics.render().await);

        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/observability/grafana-dashboard.json"
        );
        let text = std::fs::read_to_string(path).expect("the dashboard is in deploy/");
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let mut queried = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("a PromQL expression");
                let mut rest = expr;
                while let Some(start) = rest.find("leadrelay_") {
                    let name: String = rest[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[start + name.len()..];
                    queried.insert(name);
                }
            }
        }
        assert!(queried.len() >= 9, "{queried:?}");
        let missing: Vec<&String> = queried.difference(&exist).collect();
        assert!(
            missing.is_empty(),
            "the dashboard queries {missing:?}; the metrics are {exist:?}"
        );
    }
}
