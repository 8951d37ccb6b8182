//! Ingest: store a call, the canonical entity it changes and the sync jobs it implies in one
//! transaction, then acknowledge it.
//!
//! Calls are committed in groups: one writer (a thread of its own with a connection of its own,
//! on either engine) takes every call waiting in its queue and commits them
//! together, so a durable commit is paid once per group rather than once per call. While one
//! group commits, the next one gathers. A group whose transaction fails is retried call by call,
//! so one bad call cannot fail its neighbours; when the store's connection failed instead, every
//! call of the group hears so at once (one by one, each would wait for the store again).
//!
//! On SQLite the fsync that makes a commit durable is pipelined: the writer commits without
//! waiting for the disk and moves on to the next group, while a second thread fsyncs the
//! write-ahead log and only then answers the calls that commit covered. An answer therefore still
//! means "on disk", but the writer's time per group is its statements alone, not statements plus
//! an fsync (about 65% of a group's time when the writer waited for it).

mod checkpoint;
mod content_hash;
mod group;
mod priority;
mod sql;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use leadrelay_runtime::metrics::IngestStage;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::{mpsc, oneshot};

pub(crate) use self::checkpoint::LOG_FRAMES_LIMIT;
pub use self::sql::SqliteError;
use self::{
    content_hash::content_hash,
    sql::{PostgresTransaction, SqliteTransaction},
};
use crate::{
    mapping,
    routes::EntityType,
    store::{Backend, Store, StoreError},
};

/// Most calls committed in one transaction.
const MAX_GROUP: usize = 256;

/// Batches of calls waiting for the writer; senders wait when it is full (back-pressure). A
/// batch holds at most [`MAX_GROUP`] calls.
const QUEUE_DEPTH: usize = 256;

/// The hash a redelivered Hana call is recognised by (see the `content_hash` module). Public for
/// the fuzz target, which checks it against the hash's first definition on any bytes.
#[doc(hidden)]
pub fn redelivery_hash(kind: HanaEventKind, webhook: &HanaWebhook, raw_body: &[u8]) -> String {
    content_hash(kind, webhook, raw_body)
}

/// One Hana webhook call as the gateway received it.
#[derive(Clone, Debug)]
pub struct HanaCall {
    /// The event kind the URL named.
    pub kind: HanaEventKind,
    /// The parsed body, or why it could not be parsed.
    pub body: Result<HanaWebhook, String>,
    /// The body exactly as received.
    pub raw_body: prost::bytes::Bytes,
    /// When the gateway received it, unix milliseconds.
    pub received_at_ms: i64,
    /// The W3C `traceparent` of the call, saved with the event and its jobs.
    pub trace_context: Option<String>,
}

/// What ingest did with a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The stored event's id (the first one's for a duplicate; the quarantine id when quarantined).
    pub event_id: String,
    /// The call repeated an event already stored; nothing was added.
    pub duplicate: bool,
    /// The call could not be used and was kept in quarantine.
    pub quarantined: bool,
}

/// Ingest failed: nothing was stored and the call must not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the orchestrator is shutting down).
    #[error("the orchestrator is shutting down")]
    Stopped,
    /// Another orchestrator replica created an entity this group creates; retrying finds it.
    #[error("another orchestrator replica wrote the same entity at the same time")]
    Conflict,
    /// The call was not tried: the store's connection failed while its group was committed.
    #[error("not stored: the connection to the store failed ({0})")]
    ConnectionFailed(String),
}

impl IngestError {
    /// Whether the connection to the store failed (it could not be opened, broke, or stopped
    /// answering), as opposed to the calls: trying the calls one by one would only wait for the
    /// store again once per call.
    fn is_connection_failure(&self) -> bool {
        match self {
            Self::Store(StoreError::Connect { .. } | StoreError::Unanswered { .. }) => true,
            Self::Store(StoreError::Query(error)) => connection_failed(error),
            Self::Store(_) | Self::Stopped | Self::Conflict | Self::ConnectionFailed(_) => false,
        }
    }
}

/// Whether `error` is the connection's: an I/O or protocol failure, or Postgres ending the
/// session (SQLSTATE class 08, connection exception; 57P01–57P03, the server shutting down,
/// crashed or starting up).
fn connection_failed(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// Which calls are accepted, and where they go.
#[derive(Clone, Debug, Default)]
pub struct IngestPolicy {
    /// Hana application ids accepted; empty accepts every application.
    pub hana_application_ids: Vec<String>,
    /// The config file's routes; empty for the default flows.
    pub routes: leadrelay_runtime::routes::Routes,
}

/// The group-commit writer's handle.
#[derive(Clone, Debug)]
pub struct Ingester {
    queue: mpsc::Sender<Vec<Pending>>,
    policy: std::sync::Arc<IngestPolicy>,
    store: Store,
}

struct Pending {
    checked: CheckedCall,
    reply: Reply,
    /// When it was checked and handed to the writer's queue: its wait for a group starts here.
    queued_at: Instant,
}

/// Where a call's answer goes.
type Reply = oneshot::Sender<Result<IngestOutcome, IngestError>>;

/// A committed call's answer, not yet sent.
type Answer = (Reply, Result<IngestOutcome, IngestError>);

/// A group's answers on their way to the thread that makes its commit durable.
struct Committed {
    /// When the group's transaction committed.
    at: Instant,
    answers: Vec<Answer>,
}

/// A call whose validation is already decided. Deciding it (validation, the dedupe hash) happens
/// in the caller's task, in parallel, so the serial writer does only database work.
struct CheckedCall {
    call: HanaCall,
    verdict: Verdict,
}

/// What validation decided.
enum Verdict {
    /// The call is usable: its kind, the id of the entity it is about and the hash of its
    /// content that recognises a redelivery.
    Accept {
        kind: HanaEventKind,
        hana_id: String,
        content_hash: String,
        /// The jobs it implies, as routed.
        plan: Vec<crate::routes::PlannedJob>,
    },
    /// The call goes to quarantine, for this reason.
    Quarantine(String),
}

impl CheckedCall {
    fn new(call: HanaCall, policy: &IngestPolicy) -> Self {
        let verdict = match validate(&call, policy) {
            Ok(valid) => Verdict::Accept {
                kind: valid.kind,
                content_hash: content_hash(valid.kind, valid.webhook, &call.raw_body),
                plan: crate::routes::plan(
                    valid.kind,
                    !valid.webhook.conversation_url.is_empty(),
                    policy
                        .routes
                        .targets(&valid.webhook.application_id, valid.kind.event_name()),
                ),
                hana_id: valid.hana_id,
            },
            Err(reason) => Verdict::Quarantine(reason),
        };
        Self { call, verdict }
    }
}

impl Ingester {
    /// Starts the writer. It stops once every handle is dropped and the queue is drained.
    ///
    /// The writer is a thread of its own with a connection of its own, on either engine. On
    /// SQLite it runs each group's statements synchronously. On Postgres it drives its connection
    /// from its own one-thread runtime: a group is nine round trips, one after the other, and on
    /// the service's runtime each answer waited for a worker busy with webhooks to get to it
    /// (~0.2–0.9 ms per statement where `pgbench` measures 0.09 ms for a round trip). In paired
    /// bench runs Postgres ingest went from 4.6–5.4k to 5.7–6.0k webhooks/s.
    pub fn start(store: Store, policy: IngestPolicy) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let handle = store.clone();
        let engine = store.backend().name();
        match store.sqlite_path() {
            Some(path) => spawn_writer(engine, SqliteCommitter::open(path)?, receiver)?,
            None => spawn_writer(engine, PostgresCommitter::new(store), receiver)?,
        }
        Ok(Self {
            queue,
            policy: std::sync::Arc::new(policy),
            store: handle,
        })
    }

    /// Stores a call; returns once it is committed.
    pub async fn ingest(&self, call: HanaCall) -> Result<IngestOutcome, IngestError> {
        self.ingest_all(vec![call])
            .await
            .pop()
            .unwrap_or(Err(IngestError::Stopped))
    }

    /// Stores each call on its own (one failing does not fail the others); returns the outcomes
    /// in the calls' order once every call is committed or failed.
    pub async fn ingest_all(
        &self,
        calls: Vec<HanaCall>,
    ) -> Vec<Result<IngestOutcome, IngestError>> {
        self.queue_all(calls).await.outcomes().await
    }

    /// Queues each call to be stored on its own; returns once they are queued (it waits while
    /// the writer's queue is full), with the handle their outcomes come through.
    pub async fn queue_all(&self, calls: Vec<HanaCall>) -> QueuedCalls {
        // The calls enter the queue together, so that the writer never takes part of them into
        // one group and leaves the rest to the next: they would all wait for the second group.
        let mut answers = Vec::with_capacity(calls.len());
        let mut batches = Vec::new();
        let mut calls = calls.into_iter().peekable();
        while calls.peek().is_some() {
            let mut batch = Vec::with_capacity(MAX_GROUP.min(calls.len()));
            for call in calls.by_ref().take(MAX_GROUP) {
                let (reply, answer) = oneshot::channel();
                let checked = CheckedCall::new(call, &self.policy);
                batch.push(Pending {
                    checked,
                    reply,
                    queued_at: Instant::now(),
                });
                answers.push(answer);
            }
            batches.push(batch);
        }
        for batch in batches {
            // A send fails only when the writer has stopped; the answers then say so.
            if self.queue.send(batch).await.is_err() {
                break;
            }
        }
        QueuedCalls {
            answers,
            store: self.store.clone(),
        }
    }
}

/// Calls in the writer's queue, whose outcomes come through this.
pub struct QueuedCalls {
    answers: Vec<oneshot::Receiver<Result<IngestOutcome, IngestError>>>,
    store: Store,
}

impl QueuedCalls {
    /// The outcomes in the calls' order, once every call is committed or failed.
    pub async fn outcomes(self) -> Vec<Result<IngestOutcome, IngestError>> {
        let mut outcomes = Vec::with_capacity(self.answers.len());
        for answer in self.answers {
            let outcome = answer.await.unwrap_or(Err(IngestError::Stopped));
            outcomes.push(outcome);
        }
        let queued_jobs = outcomes.iter().any(
            |outcome| matches!(outcome, Ok(stored) if !stored.duplicate && !stored.quarantined),
        );
        if queued_jobs {
            self.store.notify_jobs_queued();
        }
        outcomes
    }
}

/// Commits one group in one transaction.
trait Committer {
    async fn commit_once(
        &mut self,
        calls: &[&CheckedCall],
    ) -> Result<Vec<IngestOutcome>, IngestError>;

    /// Sends committed calls their answers once their commit, made at `_committed_at`, is
    /// durable. The default is for a committer whose commit returns only once it is durable.
    fn acknowledge(&mut self, answers: Vec<Answer>, _committed_at: Instant) {
        for (reply, outcome) in answers {
            let _ = reply.send(outcome);
        }
    }

    /// Commits a group, retrying when another replica created one of its entities first (the
    /// retry reads that entity and applies the group on top of it), and once on a new connection
    /// when the connection failed after it was open: Postgres may have ended one kept from an
    /// earlier group (a restart, a failover). A connection that could not be opened is not tried
    /// again.
    async fn commit(&mut self, calls: &[&CheckedCall]) -> Result<Vec<IngestOutcome>, IngestError> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        let mut reconnected = false;
        loop {
            match self.commit_once(calls).await {
                Err(IngestError::Conflict) if attempt < ATTEMPTS => attempt += 1,
                Err(error)
                    if error.is_connection_failure()
                        && !matches!(error, IngestError::Store(StoreError::Connect { .. }))
                        && !reconnected =>
                {
                    tracing::info!(%error, "the store's connection failed; committing the group again on a new one");
                    reconnected = true;
                }
                outcome => return outcome,
            }
        }
    }
}

/// Runs `committer`'s groups on a thread named after `engine` with a one-thread runtime of its
/// own.
fn spawn_writer(
    engine: &'static str,
    committer: impl Committer + Send + 'static,
    receiver: mpsc::Receiver<Vec<Pending>>,
) -> Result<(), StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreError::Writer)?;
    std::thread::Builder::new()
        .name(format!("{engine}-writer"))
        .spawn(move || {
            priority::raise_for("writer");
            runtime.block_on(write_groups(engine, committer, receiver))
        })
        .map_err(StoreError::Writer)?;
    Ok(())
}

/// How long the Postgres writer waits for one group's transaction before it gives its connection
/// up. A connection to a host that vanished (a failover to another address, a network partition)
/// never fails by itself: its statements wait for the system's TCP timeout, 15 minutes on
/// Linux, and every webhook waits behind them. The gateway stops waiting for a call after 3 s.
///
/// A group given up during its COMMIT may have been stored. Its calls are answered with the
/// error all the same; the redelivery Hana then makes is recognised as a duplicate.
const POSTGRES_GROUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Commits through a Postgres connection of its own, opened with the pool's settings from the
/// writer's thread (so that its socket is driven by the writer's runtime) and kept from one group
/// to the next. A group that fails ends it: the next attempt opens a new one, so after Postgres
/// restarts, the first group fails on the dead connection and goes again on a new one.
struct PostgresCommitter {
    store: Store,
    connection: Option<PgConnection>,
}

impl PostgresCommitter {
    fn new(store: Store) -> Self {
        Self {
            store,
            connection: None,
        }
    }
}

impl Committer for PostgresCommitter {
    async fn commit_once(
        &mut self,
        calls: &[&CheckedCall],
    ) -> Result<Vec<IngestOutcome>, IngestError> {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => open_writer_connection(&self.store).await?,
        };
        let committed = self
            .store
            .within(POSTGRES_GROUP_DEADLINE, commit_on(&mut connection, calls))
            .await;
        match &committed {
            Ok(_) | Err(IngestError::Conflict) => self.connection = Some(connection),
            // A broken or silent connection is dropped as it is: closing waits for a server that
            // does not answer.
            Err(error) if error.is_connection_failure() => {}
            Err(_) => {
                if let Err(error) = connection.close().await {
                    tracing::debug!(%error, "closing the ingest writer's failed connection failed");
                }
            }
        }
        committed
    }
}

/// Opens the Postgres writer's connection, with sequential scans off for its session.
///
/// The writer finds rows only by key, and every key it looks up by has an index. But Postgres
/// keeps a statement's generic plan from its sixth run on, and a plan made while a table is still
/// nearly empty (a new store) scans the table: on a few pages a scan is cheapest. That plan then
/// stays until the table is next analyzed, however large it grows. Measured on a new database
/// in the ingest benchmark: the lead lookup scanned every lead once per group (35k rows after
/// 35k webhooks, and growing), the writer took 430–530 µs per webhook instead of 85–100, and
/// ingest ran at 1.9–2.9k webhooks/s instead of 9.5–11k. With scans off, the plan uses the index
/// whatever the table's size when it is made.
async fn open_writer_connection(store: &Store) -> Result<PgConnection, IngestError> {
    let mut connection = store.open_postgres_connection().await?;
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut connection)
        .await?;
    Ok(connection)
}

/// Commits `calls` in one transaction on `connection`.
async fn commit_on(
    connection: &mut PgConnection,
    calls: &[&CheckedCall],
) -> Result<Vec<IngestOutcome>, IngestError> {
    let mut transaction = PostgresTransaction(connection.begin().await?);
    let outcomes = group::commit_group(&mut transaction, Backend::Postgres, calls).await?;
    transaction.0.commit().await?;
    Ok(outcomes)
}

/// Settings of the SQLite writer's connection. `synchronous = NORMAL` lets a commit return
/// without an fsync; the acknowledging thread fsyncs the write-ahead log before answering, which
/// makes an acknowledged event survive power loss as `FULL` would. Checkpoints run beside the
/// writer ([`checkpoint`]) and still fsync. The file is already in WAL mode (the store set it).
const SQLITE_WRITER_PRAGMAS: &str =
    "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

/// Prepared statements the SQLite writer keeps: more than the statements it runs.
const SQLITE_STATEMENT_CACHE: usize = 128;

/// Commits through the writer's own SQLite connection and hands the answers to the thread that
/// makes them durable.
struct SqliteCommitter {
    connection: rusqlite::Connection,
    durable: std::sync::mpsc::Sender<Committed>,
    checkpoints: checkpoint::Checkpoints,
}

impl SqliteCommitter {
    fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let connection = rusqlite::Connection::open(path).map_err(SqliteError::from)?;
        connection
            .execute_batch(SQLITE_WRITER_PRAGMAS)
            .map_err(SqliteError::from)?;
        connection.set_prepared_statement_cache_capacity(SQLITE_STATEMENT_CACHE);
        let checkpoints = checkpoint::Checkpoints::start(path, &connection)?;
        let (durable, committed) = std::sync::mpsc::channel();
        let mut log = WriteAheadLog::of(path);
        std::thread::Builder::new()
            .name("sqlite-sync".to_owned())
            .spawn(move || {
                priority::raise_for("log sync");
                log.sync_then_answer(&committed)
            })
            .map_err(StoreError::Writer)?;
        Ok(Self {
            connection,
            durable,
            checkpoints,
        })
    }
}

impl Committer for SqliteCommitter {
    async fn commit_once(
        &mut self,
        calls: &[&CheckedCall],
    ) -> Result<Vec<IngestOutcome>, IngestError> {
        let connection = &self.connection;
        // IMMEDIATE takes the write lock up front, so the group never fails half-way for it.
        connection.execute_batch("BEGIN IMMEDIATE")?;
        // The group's statements go back to the connection's cache when the transaction value
        // is dropped, before COMMIT.
        let outcomes = {
            let mut transaction = SqliteTransaction::new(connection);
            group::commit_group(&mut transaction, Backend::Sqlite, calls).await
        };
        let committed = outcomes.and_then(|outcomes| {
            connection.execute_batch("COMMIT")?;
            Ok(outcomes)
        });
        if committed.is_err()
            && !connection.is_autocommit()
            && let Err(error) = connection.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "rolling back a failed ingest group failed");
        }
        committed
    }

    fn acknowledge(&mut self, answers: Vec<Answer>, committed_at: Instant) {
        // When the sync thread has stopped (an fsync failed), the replies are dropped with the
        // message and every caller hears that nothing was acknowledged.
        let _ = self.durable.send(Committed {
            at: committed_at,
            answers,
        });
        // After the answers are on their way: a checkpoint the writer has to run itself delays
        // the next group, not this one.
        if let Some(written) = self.checkpoints.after_commit(&self.connection) {
            let (metrics, engine) = (
                leadrelay_runtime::metrics::metrics(),
                Backend::Sqlite.name(),
            );
            metrics.ingest_log_written(engine, written.appended);
            metrics.ingest_log_length(engine, written.length);
        }
    }
}

/// The SQLite file's write-ahead log, which holds every commit until a checkpoint.
struct WriteAheadLog {
    path: std::path::PathBuf,
    folder: Option<std::path::PathBuf>,
    /// The handle the log is synced through, kept open from one fsync to the next (see
    /// [`WriteAheadLog::sync`]).
    open: Option<OpenLog>,
}

/// The log file as opened, and which file that was.
struct OpenLog {
    file: std::fs::File,
    identity: Option<FileIdentity>,
}

/// What tells one file from another that took its name: device and inode.
type FileIdentity = (u64, u64);

/// Which file `path` names, read without reading its times.
///
/// Linux (since 6.13, on ext4, XFS, btrfs and tmpfs) stamps a file's next change with a
/// fine-grained time once someone has read its times, and with the clock's tick (4 ms on a kernel
/// built with `HZ=250`) otherwise. `std::fs::metadata` reads every field, so checking the log's
/// name before each fsync had every write after it change the log's mtime: its inode was dirty at
/// every fsync, and `fdatasync` wrote it to the disk (a request of its own, waited for) before the
/// flush. Asking `statx` for the inode number alone leaves the times unread. Measured with block
/// tracepoints, 400 fsyncs of 300 KiB each, 1.2 ms apart: 800 write requests with the full `stat`
/// between them, 481 with this one, 526 with none. In the webhook benchmark (SQLite, an fsync every
/// 2 ms or so) the sync thread's requests per fsync went from 1.84–2.0 to 1.52–1.65; there the disk
/// is busy with the checkpoints too, and the fsync's time did not change measurably (0.66–0.74 ms
/// either way).
#[cfg(target_os = "linux")]
fn named_identity(path: &std::path::Path) -> std::io::Result<Option<FileIdentity>> {
    use rustix::fs::{AtFlags, CWD, StatxFlags};
    statx_identity(
        rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::INO),
        || std::fs::metadata(path),
    )
}

/// Which file `file` is; read as [`named_identity`] reads a name's.
#[cfg(target_os = "linux")]
fn open_identity(file: &std::fs::File) -> std::io::Result<Option<FileIdentity>> {
    use rustix::fs::{AtFlags, StatxFlags};
    statx_identity(
        rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::INO),
        || file.metadata(),
    )
}

/// The identity `statx` found; on a kernel without `statx` (before 4.11), the one `metadata`
/// reads.
#[cfg(target_os = "linux")]
fn statx_identity(
    found: rustix::io::Result<rustix::fs::Statx>,
    metadata: impl FnOnce() -> std::io::Result<std::fs::Metadata>,
) -> std::io::Result<Option<FileIdentity>> {
    match found {
        Ok(found) => Ok(Some((
            rustix::fs::makedev(found.stx_dev_major, found.stx_dev_minor),
            found.stx_ino,
        ))),
        Err(rustix::io::Errno::NOSYS) => Ok(file_identity(&metadata()?)),
        Err(error) => Err(error.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn named_identity(path: &std::path::Path) -> std::io::Result<Option<FileIdentity>> {
    Ok(file_identity(&std::fs::metadata(path)?))
}

#[cfg(not(target_os = "linux"))]
fn open_identity(file: &std::fs::File) -> std::io::Result<Option<FileIdentity>> {
    Ok(file_identity(&file.metadata()?))
}

#[cfg(unix)]
fn file_identity(metadata: &std::fs::Metadata) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt as _;
    Some((metadata.dev(), metadata.ino()))
}

/// Without an identity the log is opened again for every fsync.
#[cfg(not(unix))]
fn file_identity(_: &std::fs::Metadata) -> Option<FileIdentity> {
    None
}

/// A file SQLite keeps beside `database`: its name with `suffix` (`-wal`, `-shm`) appended.
fn sqlite_sibling(database: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut path = database.as_os_str().to_owned();
    path.push(suffix);
    path.into()
}

impl WriteAheadLog {
    fn of(database: &std::path::Path) -> Self {
        Self {
            path: sqlite_sibling(database, "-wal"),
            folder: database.parent().map(std::path::Path::to_path_buf),
            open: None,
        }
    }

    /// Answers committed calls once the log holding them is on disk. Every commit handed over
    /// before an fsync starts is covered by it, so one fsync answers all the groups committed
    /// while the previous one ran.
    ///
    /// An fsync that fails may have dropped the pages it was to write (Linux marks them clean),
    /// so a later success proves nothing: the thread answers the calls it holds with the error
    /// and stops, and every later call is refused until the orchestrator restarts and SQLite
    /// recovers from what is really on disk.
    fn sync_then_answer(&mut self, committed: &std::sync::mpsc::Receiver<Committed>) {
        let mut folder_synced = false;
        while let Ok(first) = committed.recv() {
            let mut groups = vec![first];
            groups.extend(committed.try_iter());
            let sync_started = Instant::now();
            let synced = self.sync(&mut folder_synced);
            let synced_at = Instant::now();
            // Each group's time from its commit until durable, counted once its calls are answered.
            let waits: Vec<(Duration, usize)> = groups
                .iter()
                .map(|group| (synced_at - group.at, group.answers.len()))
                .collect();
            let answers = groups.into_iter().flat_map(|group| group.answers);
            if let Err(error) = &synced {
                tracing::error!(
                    wal = %self.path.display(),
                    %error,
                    "fsync of the SQLite write-ahead log failed; no call is acknowledged until \
                     the orchestrator restarts"
                );
            }
            for (reply, outcome) in answers {
                let outcome = match (&synced, outcome) {
                    (Err(error), Ok(_)) => Err(IngestError::Store(StoreError::Sync(
                        std::io::Error::new(error.kind(), error.to_string()),
                    ))),
                    (_, outcome) => outcome,
                };
                let _ = reply.send(outcome);
            }
            let metrics = leadrelay_runtime::metrics::metrics();
            let engine = Backend::Sqlite.name();
            metrics.ingest_log_synced(engine, synced_at - sync_started);
            if synced.is_err() {
                return;
            }
            metrics.ingest_calls(
                engine,
                IngestStage::Sync,
                waits
                    .into_iter()
                    .flat_map(|(wait, calls)| std::iter::repeat_n(wait, calls)),
            );
        }
    }

    /// Makes every write to the log so far durable. An fsync covers the writes made through any
    /// handle of the file, SQLite's included.
    ///
    /// The handle stays open between fsyncs, because Linux reports a failed write-back only to
    /// the handles that were open when it failed, and to one opened later only until some handle
    /// has reported it. SQLite syncs the log through its own handle before every checkpoint; a
    /// handle opened for each fsync would miss a failure the checkpoint had already reported,
    /// and acknowledge calls whose pages were lost. The file's identity is checked each time, so
    /// that a log replaced under the same name is opened anew.
    fn sync(&mut self, folder_synced: &mut bool) -> std::io::Result<()> {
        let named = named_identity(&self.path)?;
        let open = match self.open.take() {
            Some(open) if named.is_some() && open.identity == named => open,
            _ => {
                let file = std::fs::File::open(&self.path)?;
                let identity = open_identity(&file)?;
                OpenLog { file, identity }
            }
        };
        let open = self.open.insert(open);
        open.file.sync_data()?;
        // The log's name in its folder must be durable too; once is enough.
        if !*folder_synced {
            if let Some(folder) = &self.folder
                && !folder.as_os_str().is_empty()
            {
                std::fs::File::open(folder)?.sync_all()?;
            }
            *folder_synced = true;
        }
        Ok(())
    }
}

/// Commits the queued calls group after group; counts each group, its calls and the time it took
/// in the `engine`'s ingest metrics.
async fn write_groups(
    engine: &'static str,
    mut committer: impl Committer,
    mut receiver: mpsc::Receiver<Vec<Pending>>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // A batch that did not fit into the last group starts the next one.
    let mut held_over: Option<Vec<Pending>> = None;
    loop {
        let first = match held_over.take() {
            Some(batch) => batch,
            None => match receiver.recv().await {
                Some(batch) => batch,
                None => return,
            },
        };
        group.extend(first);
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(batch) if group.len() + batch.len() <= MAX_GROUP => group.extend(batch),
                Ok(batch) => {
                    held_over = Some(batch);
                    break;
                }
                Err(_) => break,
            }
        }
        // The writer's time from here to the answers' hand-off is serial: every other call waits.
        let started = Instant::now();
        let queued: Vec<Duration> = group
            .iter()
            .map(|pending| started.saturating_duration_since(pending.queued_at))
            .collect();
        let group_calls = group.len();
        let calls: Vec<&CheckedCall> = group.iter().map(|pending| &pending.checked).collect();
        let answers: Vec<Answer> = match committer.commit(&calls).await {
            Ok(outcomes) => group
                .drain(..)
                .zip(outcomes)
                .map(|(pending, outcome)| (pending.reply, Ok(outcome)))
                .collect(),
            Err(error) if error.is_connection_failure() => {
                tracing::warn!(calls = group.len(), %error, "group commit failed: the store's connection failed; no call of the group is stored");
                refuse_all(group.drain(..), &error.to_string())
            }
            Err(error) => {
                tracing::warn!(calls = group.len(), %error, "group commit failed; committing its calls one by one");
                let mut answers = Vec::with_capacity(group.len());
                let mut calls = group.drain(..);
                while let Some(pending) = calls.next() {
                    let outcome = committer
                        .commit(&[&pending.checked])
                        .await
                        .map(|mut outcomes| outcomes.remove(0));
                    let connection_failed = match &outcome {
                        Err(error) if error.is_connection_failure() => Some(error.to_string()),
                        _ => None,
                    };
                    answers.push((pending.reply, outcome));
                    // Once the connection failed, the rest would each wait for the store again.
                    if let Some(reason) = connection_failed {
                        answers.extend(refuse_all(calls.by_ref(), &reason));
                        break;
                    }
                }
                answers
            }
        };
        let committed_at = Instant::now();
        committer.acknowledge(answers, committed_at);
        let metrics = leadrelay_runtime::metrics::metrics();
        metrics.ingest_group(engine, group_calls, started.elapsed());
        metrics.ingest_calls(engine, IngestStage::Queued, queued);
        metrics.ingest_calls(
            engine,
            IngestStage::Group,
            std::iter::repeat_n(committed_at - started, group_calls),
        );
    }
}

/// Answers every call of a group whose commit failed because the store's connection did: none
/// of them is stored.
fn refuse_all(calls: impl Iterator<Item = Pending>, reason: &str) -> Vec<Answer> {
    calls
        .map(|pending| {
            let refused = IngestError::ConnectionFailed(reason.to_owned());
            (pending.reply, Err(refused))
        })
        .collect()
}

/// The key an entity first captured in Hana is stored under: the application and the Hana id,
/// length-prefixed so that no two pairs share a key.
pub(crate) fn source_key(application_id: &str, hana_id: &str) -> String {
    format!("hana:{}:{application_id}:{hana_id}", application_id.len())
}

/// How a lead or deal is found by its source key on SQLite (migration 0006): by the key's last 16
/// characters, which the index holds, and by the whole key, which decides. Binds
/// [`source_key_tail`] of the key, then the key.
pub(crate) const SQLITE_BY_SOURCE_KEY: &str = "substr(source_key, -16) = ? AND source_key = ?";

/// The last 16 characters of `key` (all of a shorter one), as SQLite's `substr(key, -16)`
/// counts them: characters, not bytes.
pub(crate) fn source_key_tail(key: &str) -> &str {
    key.char_indices()
        .rev()
        .nth(15)
        .map_or(key, |(start, _)| &key[start..])
}

/// A call that passed validation.
struct ValidCall<'a> {
    kind: HanaEventKind,
    webhook: &'a HanaWebhook,
    hana_id: String,
}

/// The kind named by a body's `event_name`: as the URLs spell it, but forgiving of case and
/// surrounding blanks.
fn kind_from_name(name: &str) -> Option<HanaEventKind> {
    HanaEventKind::from_event_name(&name.trim().to_ascii_lowercase())
}

/// Decides whether a call can be used, and why not.
fn validate<'a>(call: &'a HanaCall, policy: &IngestPolicy) -> Result<ValidCall<'a>, String> {
    let webhook = call.body.as_ref().map_err(Clone::clone)?;
    // A body that names its event is more specific than the URL it was sent to.
    let kind = kind_from_name(&webhook.event_name).unwrap_or(call.kind);
    if kind == HanaEventKind::Unspecified {
        return Err(
            "no event kind: the URL names none and the body has no known `event_name`".to_owned(),
        );
    }
    if webhook.application_id.is_empty() {
        return Err("the body has no `application.id`".to_owned());
    }
    if !policy.hana_application_ids.is_empty()
        && !policy
            .hana_application_ids
            .contains(&webhook.application_id)
    {
        return Err(format!(
            "application id '{}' is not in LEADRELAY_HANA_APPLICATION_IDS",
            webhook.application_id
        ));
    }
    let (attributes, section) = match EntityType::of(kind) {
        EntityType::Lead => (&webhook.lead, "lead"),
        EntityType::Deal => (&webhook.opportunity, "opportunity"),
    };
    let hana_id = mapping::hana_id(attributes);
    if hana_id.is_empty() {
        return Err(format!(
            "{} without an id: `{section}.id` is missing",
            kind.event_name()
        ));
    }
    Ok(ValidCall {
        kind,
        webhook,
        hana_id,
    })
}

/// A new public id: a prefix and a time-ordered UUID.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Unix milliseconds from a protobuf timestamp.
pub(crate) fn millis(at: &prost_types::Timestamp) -> i64 {
    at.seconds * 1000 + i64::from(at.nanos / 1_000_000)
}

/// A protobuf timestamp from unix milliseconds.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Row as _;

    use super::*;

    /// The plan a connection caches for `statement`, which takes one `text[]`: its generic plan,
    /// which Postgres makes at the statement's sixth run.
    async fn cached_plan(
        connection: &mut PgConnection,
        name: &str,
        statement: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::raw_sql(&format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE {name}(text[]) AS {statement}"
        ))
        .execute(&mut *connection)
        .await?;
        sqlx::raw_sql(&format!("EXPLAIN EXECUTE {name}('{{a,b}}')"))
            .fetch_all(&mut *connection)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>(0))
            .collect()
    }

    /// Each lookup the writer makes, as `group` spells it on Postgres.
    const WRITER_LOOKUPS: [&str; 4] = [
        "SELECT source_key, id, body FROM leads WHERE source_key = ANY($1::text[]) FOR UPDATE",
        "SELECT source_key, id, body FROM deals WHERE source_key = ANY($1::text[]) FOR UPDATE",
        "SELECT source_key, id FROM leads WHERE source_key = ANY($1::text[])",
        "SELECT dedupe_key FROM events WHERE source = 'hana' AND dedupe_key = ANY($1::text[])",
    ];

    /// On a new store, holding what its first few groups stored, the writer's lookups use their
    /// indexes, not a scan that would then stay in the connection's plan cache while the tables
    /// grow.
    #[tokio::test]
    async fn the_postgres_writer_looks_rows_up_by_index_on_a_new_store()
    -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let database = leadrelay_testkit::TestDatabase::create("writer_plans").await?;
        let store = Store::connect(&database.url().parse()?).await?;
        store.migrate().await?;
        // A few pages of leads, not yet analyzed: a scan of them is cheaper than the index.
        sqlx::raw_sql(
            "INSERT INTO leads (id, source_key, body, created_at, updated_at) \
             SELECT 'lead_' || n, 'hana:3:app:' || n, '\\x00'::bytea, 0, 0 \
             FROM generate_series(1, 300) AS n",
        )
        .execute(store.pool())
        .await?;
        let mut writer = open_writer_connection(&store).await?;
        for (number, statement) in WRITER_LOOKUPS.into_iter().enumerate() {
            let plan = cached_plan(&mut writer, &format!("lookup_{number}"), statement).await?;
            assert!(
                plan.iter().any(|step| step.contains("Index")),
                "{statement}\nis planned as {plan:?}"
            );
        }
        // The same plans on a connection with scans on (the default) scan: what the writer's
        // setting prevents.
        let mut plain = store.open_postgres_connection().await?;
        let plan = cached_plan(&mut plain, "lookup", WRITER_LOOKUPS[0]).await?;
        assert!(
            plan.iter().any(|step| step.contains("Seq Scan")),
            "{plan:?}"
        );
        writer.close().await?;
        plain.close().await?;
        store.close().await;
        database.drop_database().await?;
        Ok(())
    }

    fn outcome(event_id: &str) -> IngestOutcome {
        IngestOutcome {
            event_id: event_id.to_owned(),
            duplicate: false,
            quarantined: false,
        }
    }

    /// Records the size of each group it is asked to commit.
    struct RecordingCommitter(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

    impl Committer for RecordingCommitter {
        async fn commit_once(
            &mut self,
            calls: &[&CheckedCall],
        ) -> Result<Vec<IngestOutcome>, IngestError> {
            if let Ok(mut sizes) = self.0.lock() {
                sizes.push(calls.len());
            }
            Ok(calls.iter().map(|_| outcome("evt")).collect())
        }
    }

    fn pending_batch(calls: usize) -> Vec<Pending> {
        (0..calls)
            .map(|_| Pending {
                checked: CheckedCall::new(
                    HanaCall {
                        kind: HanaEventKind::LeadCreated,
                        body: Err("not JSON".to_owned()),
                        raw_body: prost::bytes::Bytes::from_static(b"{"),
                        received_at_ms: 0,
                        trace_context: None,
                    },
                    &IngestPolicy::default(),
                ),
                reply: oneshot::channel().0,
                queued_at: Instant::now(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_is_never_split_between_groups() {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        for calls in [200, 100, 56, 30] {
            queue
                .send(pending_batch(calls))
                .await
                .expect("the queue has room");
        }
        drop(queue);
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        write_groups("test", RecordingCommitter(sizes.clone()), receiver).await;
        // 200 and 100 calls do not fit in one group (256): the 100 start the next group, which
        // the 56 and the 30 join.
        assert_eq!(*sizes.lock().expect("sizes"), vec![200, 186]);
    }

    #[test]
    fn calls_are_answered_after_the_log_is_synced() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let database = folder.path().join("store.db");
        std::fs::write(folder.path().join("store.db-wal"), b"frames").expect("write the log");
        let (durable, committed) = std::sync::mpsc::channel();
        let syncer = std::thread::spawn({
            let mut log = WriteAheadLog::of(&database);
            move || log.sync_then_answer(&committed)
        });
        let (reply, answer) = oneshot::channel();
        durable
            .send(Committed {
                at: Instant::now(),
                answers: vec![(reply, Ok(outcome("evt_1")))],
            })
            .expect("the sync thread runs");
        assert_eq!(
            answer.blocking_recv().expect("an answer").expect("synced"),
            outcome("evt_1")
        );
        drop(durable);
        syncer.join().expect("the sync thread stops with its queue");
    }

    #[cfg(unix)]
    #[test]
    fn the_log_is_synced_through_one_kept_handle_until_another_file_takes_its_name() {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::MetadataExt as _;

        let folder = tempfile::tempdir().expect("temporary folder");
        let wal = folder.path().join("store.db-wal");
        std::fs::write(&wal, b"frames").expect("write the log");
        let mut log = WriteAheadLog::of(&folder.path().join("store.db"));
        let mut folder_synced = false;
        let synced_through = |log: &WriteAheadLog| {
            let open = log.open.as_ref().expect("a handle kept after an fsync");
            (
                open.file.as_raw_fd(),
                open.file.metadata().expect("fstat").ino(),
            )
        };

        log.sync(&mut folder_synced).expect("synced");
        let (handle, inode) = synced_through(&log);
        assert_eq!(inode, std::fs::metadata(&wal).expect("stat").ino());
        // A handle opened and closed for this fsync would not be there to compare with.
        log.sync(&mut folder_synced).expect("synced again");
        assert_eq!(synced_through(&log), (handle, inode), "the same handle");

        // Another file under the log's name: renamed over it, so the inode is sure to differ.
        let replacement = folder.path().join("replacement");
        std::fs::write(&replacement, b"other frames").expect("write the other log");
        let replaced = std::fs::metadata(&replacement).expect("stat").ino();
        std::fs::rename(&replacement, &wal).expect("replace the log");
        log.sync(&mut folder_synced)
            .expect("synced after the replacement");
        assert_ne!(replaced, inode);
        assert_eq!(
            synced_through(&log).1,
            replaced,
            "the file now under the name"
        );
    }

    /// The identity read without the file's times is the one `std::fs::metadata` reads, which
    /// a kernel without `statx` falls back to.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_log_is_told_by_its_device_and_inode_read_without_its_times() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let wal = folder.path().join("store.db-wal");
        std::fs::write(&wal, b"frames").expect("write the log");
        let file = std::fs::File::open(&wal).expect("open the log");
        let read_by_std = file_identity(&std::fs::metadata(&wal).expect("stat"));

        assert_eq!(named_identity(&wal).expect("statx by name"), read_by_std);
        assert_eq!(
            open_identity(&file).expect("statx of the handle"),
            read_by_std
        );
        assert!(named_identity(&folder.path().join("missing-wal")).is_err());
    }

    #[test]
    fn a_failed_sync_answers_with_the_error_and_refuses_every_later_call() {
        let folder = tempfile::tempdir().expect("temporary folder");
        // No log file: the fsync cannot even open it.
        let mut log = WriteAheadLog::of(&folder.path().join("missing.db"));
        let (durable, committed) = std::sync::mpsc::channel();
        let syncer = std::thread::spawn(move || log.sync_then_answer(&committed));
        let (reply, answer) = oneshot::channel();
        durable
            .send(Committed {
                at: Instant::now(),
                answers: vec![(reply, Ok(outcome("evt_1")))],
            })
            .expect("the sync thread runs");
        let error = answer
            .blocking_recv()
            .expect("an answer")
            .expect_err("not durable");
        assert!(
            error.to_string().contains("cannot make the commit durable"),
            "{error}"
        );
        syncer
            .join()
            .expect("the sync thread stops after a failure");
        let (reply, later) = oneshot::channel();
        let later_group = Committed {
            at: Instant::now(),
            answers: vec![(reply, Ok(outcome("evt_2")))],
        };
        assert!(durable.send(later_group).is_err());
        assert!(
            later.blocking_recv().is_err(),
            "a later call is never acknowledged"
        );
    }

    #[test]
    fn event_names_in_the_body_are_understood() {
        assert_eq!(
            kind_from_name("ticket.updated"),
            Some(HanaEventKind::OpportunityUpdated)
        );
        assert_eq!(
            kind_from_name("Lead.Created"),
            Some(HanaEventKind::LeadCreated)
        );
        assert_eq!(kind_from_name("update_customer_info"), None);
    }

    /// `.cargo/config.toml` compiles the bundled SQLite without its allocation counters and
    /// without one page cache shared by every connection. A build that lost those options (the
    /// file gone, or SQLite linked from elsewhere) fails here instead of quietly slowing the
    /// ingest writer.
    #[test]
    fn the_bundled_sqlite_is_compiled_with_the_repository_options() -> Result<(), rusqlite::Error> {
        let connection = rusqlite::Connection::open_in_memory()?;
        let mut statement = connection.prepare("PRAGMA compile_options")?;
        let options = statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        assert!(
            options.iter().any(|option| option == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options
                .iter()
                .any(|option| option == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
        Ok(())
    }
}
