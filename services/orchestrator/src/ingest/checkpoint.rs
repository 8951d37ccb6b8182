//! Checkpoints of the SQLite write-ahead log, on a thread beside the ingest writer.
//!
//! By default SQLite checkpoints inside the commit that takes the log past 1000 pages: that
//! commit also copies the pages into the database file and fsyncs it. On the ingest writer, the
//! one thread every webhook waits for, that was a fifth of its CPU time plus its waits for the
//! disk. Here the writer commits with SQLite's checkpoints off, and a thread of its own runs the
//! same checkpoint (PASSIVE, which never blocks the writer).
//!
//! The log starts over once per lap: when it holds [`LOG_LAP_FRAMES`] pages, 64 MiB, not every
//! 1000 pages. Measured in the webhook benchmark on SQLite, 4 alternating 6 s runs of each:
//! copying the whole log and fsyncing the database every 1000 pages, as SQLite does by default,
//! the log's fsync took 0.75–0.81 ms and the process wrote ~22 KiB to the disk per webhook; once
//! a lap, 0.53–0.61 ms and ~20 KiB, and 13.4k webhooks/s became 15.2k (+14%). The log is at most
//! [`LOG_FRAMES_LIMIT`] pages long (~100 MiB), which SQLite reads once when it opens the database
//! after a crash.
//!
//! Within a lap the thread copies the log in passes of [`LOG_PASS_FRAMES`] pages (16 MiB), each
//! followed by an fsync of the database file of its own. SQLite fsyncs the database only in a
//! checkpoint that copies the log to its end, which beside a busy writer is nearly always the
//! writer's own at the lap's end (below). Copied in one go, a lap's pages (~16 MB in the benchmark)
//! stayed dirty in the page cache until that fsync, which then took 47–71 ms, once a lap, on the
//! writer, the thread every webhook waits for: the benchmark's p99 time to acknowledge was
//! 43–67 ms, on a slow disk whose log fsyncs took ~2.3 ms. Flushed a pass at a time, each flush is
//! smaller and off the writer (the log's fsync still queues behind it on the disk): p99 30–35 ms,
//! webhooks/s unchanged (4,858 against 4,878 on average), ~6% more written to the disk per webhook
//! (7 alternating 8 s runs of each).
//!
//! How full the log is comes from the wal-index header at the start of the `-shm` file, whose
//! layout SQLite documents (<https://www.sqlite.org/walformat.html>, "The WAL-Index Header"):
//! `mxFrame`, the frames in the log, and `nBackfill`, how many of them are copied. When that file
//! does not read as such a header, the writer keeps SQLite's own checkpoints.
//!
//! The log starts over from its beginning only when a commit finds every frame of it copied. A
//! checkpoint running beside a busy writer is always a commit or two behind, so the writer copies
//! the rest itself, between two groups, and the next group starts the log over. Past the lap's
//! mark the thread copies after every commit that leaves more than [`WRITER_COPIES_AT_MOST`]
//! pages uncopied, so what is left for the writer is a commit or two: copying up to 1000 pages
//! itself stalled the writer for ~5.6 ms, 7% of its time in SQLite under load. The writer copies
//! once at most [`WRITER_COPIES_AT_MOST`] pages are left, and whatever is left once the log
//! reaches [`LOG_FRAMES_LIMIT`]; the thread leaves both to it.
//!
//! The store's other connections (the job runner's, the pollers', the read RPCs') leave the
//! checkpoints to this thread too: each checkpoints only a log that reached [`LOG_FRAMES_LIMIT`],
//! which happens only while the ingest writer is not running or the thread fell far behind. With
//! SQLite's default they copied the log in whichever of their commits found it past 1000 pages.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
};

use super::sql::SqliteError;
use crate::store::{Backend, StoreError};

/// Log frames (pages) at which the log is copied and starts over: 64 MiB of 4 KiB pages.
const LOG_LAP_FRAMES: u32 = 16 * 1024;

/// Uncopied log frames the thread copies in one pass, anywhere in the lap: 16 MiB of 4 KiB pages.
/// The fsync after the pass writes them to the disk, and the writer's fsync of the log waits
/// behind it on the same disk: the larger the pass, the longer that wait.
const LOG_PASS_FRAMES: u32 = LOG_LAP_FRAMES / 4;

/// Uncopied frames the writer copies itself once the log is past [`LOG_LAP_FRAMES`]:
/// about what one large group commits. More is left to the thread, up to [`LOG_FRAMES_LIMIT`].
const WRITER_COPIES_AT_MOST: u32 = 256;

/// Log frames past which the writer copies whatever is left, however much that is: the log never
/// grows past this by more than a commit, even when the thread falls behind. The store's other
/// connections checkpoint at this length (`wal_autocheckpoint`), for a log grown without the
/// ingest writer.
pub(crate) const LOG_FRAMES_LIMIT: u32 = LOG_LAP_FRAMES + LOG_LAP_FRAMES / 2;

/// Times, a millisecond apart, the writer tries its checkpoint past the limit while the thread's
/// is running.
const WRITER_CHECKPOINT_WAITS: u32 = 200;

/// `iVersion` of the wal-index header SQLite writes (3.7.0 and every version since).
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// How full the log is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LogFill {
    /// Frames in the log since it last started over.
    pub(super) frames: u32,
    /// How many of them a checkpoint has copied into the database file.
    pub(super) copied: u32,
}

impl LogFill {
    fn uncopied(self) -> u32 {
        self.frames.saturating_sub(self.copied)
    }

    /// Whether the checkpoint thread copies the log now: whenever a pass is uncopied, and once
    /// the log is due to start over, whenever more is uncopied than the writer copies itself. It
    /// leaves the rest to the writer: two checkpoints cannot run at once, and the writer's is the
    /// one that lets the log start over.
    fn thread_copies(self) -> bool {
        self.frames < LOG_FRAMES_LIMIT
            && (self.uncopied() >= LOG_PASS_FRAMES
                || (self.frames >= LOG_LAP_FRAMES && self.uncopied() > WRITER_COPIES_AT_MOST))
    }

    /// Whether the writer copies the rest of the log itself, so that its next group starts the
    /// log over: when the log is due to and little is left, or when the thread fell far behind.
    fn writer_copies(self) -> bool {
        (self.frames >= LOG_LAP_FRAMES && self.uncopied() <= WRITER_COPIES_AT_MOST)
            || self.frames >= LOG_FRAMES_LIMIT
    }
}

/// Where the log ends: on which lap (the log's first salt, which SQLite changes each time the log
/// starts over) and after how many frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LogEnd {
    lap: u32,
    frames: u32,
}

impl LogEnd {
    /// The frames appended since `earlier`: every frame of the log when it started over between
    /// the two. The writer reads the end after each of its commits, and the log starts over only
    /// at the start of a commit, so at most once between two readings.
    fn frames_since(self, earlier: Self) -> u32 {
        if self.lap == earlier.lap {
            self.frames.saturating_sub(earlier.frames)
        } else {
            self.frames
        }
    }
}

/// What the wal-index header says of the log.
#[derive(Clone, Copy, Debug)]
pub(super) struct LogHeader {
    pub(super) fill: LogFill,
    /// The log's first salt, which SQLite changes each time the log starts over.
    lap: u32,
    /// The bytes of one frame: a page and the frame's 24-byte header.
    frame_bytes: u64,
}

impl LogHeader {
    fn end(self) -> LogEnd {
        LogEnd {
            lap: self.lap,
            frames: self.fill.frames,
        }
    }
}

/// The wal-index (`<database>-shm`), read for how full the log is.
pub(super) struct WalIndex {
    file: File,
    path: PathBuf,
}

impl WalIndex {
    /// Opens the wal-index of `database`; it exists once a connection has read the database.
    pub(super) fn open(database: &Path) -> std::io::Result<Self> {
        let path = super::sqlite_sibling(database, "-shm");
        Ok(Self {
            file: File::open(&path)?,
            path,
        })
    }

    /// How full the log is now. The header is read without SQLite's locks: a value may be a
    /// commit old, which only moves a checkpoint by a commit.
    pub(super) fn fill(&self) -> std::io::Result<LogFill> {
        self.header().map(|header| header.fill)
    }

    /// The header as it is now; read as [`WalIndex::fill`] is.
    pub(super) fn header(&self) -> std::io::Result<LogHeader> {
        // The first copy of the header (48 bytes), then the checkpoint info, whose first field
        // is nBackfill.
        let mut header = [0_u8; 100];
        self.file.read_exact_at(&mut header, 0)?;
        let field = |offset: usize| {
            let mut bytes = [0_u8; 4];
            bytes.copy_from_slice(&header[offset..offset + 4]);
            u32::from_ne_bytes(bytes)
        };
        let initialised = header[12] == 1;
        if field(0) != WAL_INDEX_VERSION || !initialised {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} does not start with an initialised wal-index header (version {})",
                    self.path.display(),
                    field(0)
                ),
            ));
        }
        // szPage: the page size, or 1 for 65536.
        let page_size = match u16::from_ne_bytes([header[14], header[15]]) {
            1 => 65_536,
            size => u64::from(size),
        };
        Ok(LogHeader {
            fill: LogFill {
                frames: field(16),
                copied: field(96),
            },
            lap: field(32),
            frame_bytes: page_size + 24,
        })
    }
}

/// The writer's side of the checkpoints.
pub(super) enum Checkpoints {
    /// A thread checkpoints; the writer tells it when it committed.
    Beside {
        committed: mpsc::SyncSender<()>,
        log: WalIndex,
        /// Where the log ended after the writer's last commit.
        end: LogEnd,
    },
    /// SQLite checkpoints inside the writer's commits, as by default.
    InWriter,
}

impl Checkpoints {
    /// Turns the writer's own checkpoints off and starts the thread, with a connection of its
    /// own to `database`. Keeps SQLite's checkpoints when the wal-index cannot be read.
    pub(super) fn start(
        database: &Path,
        writer: &rusqlite::Connection,
    ) -> Result<Self, StoreError> {
        // A read makes sure the wal-index exists and is initialised.
        writer
            .query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
            .map_err(SqliteError::from)?;
        let (log, end) = match WalIndex::open(database)
            .and_then(|log| log.header().map(|header| (log, header.end())))
        {
            Ok(opened) => opened,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot read how full the SQLite write-ahead log is; the ingest writer \
                     checkpoints it itself"
                );
                return Ok(Self::InWriter);
            }
        };
        let connection = rusqlite::Connection::open(database).map_err(SqliteError::from)?;
        // NORMAL: a checkpoint fsyncs the log before copying it, and the database after only
        // when it copied the log to its end (hence the fsync after each pass, below).
        connection
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
            .map_err(SqliteError::from)?;
        let thread_log = WalIndex::open(database).map_err(StoreError::Writer)?;
        // Opened for writing, though nothing is written through it: Windows fsyncs only through
        // a handle that may write.
        let database_file = std::fs::OpenOptions::new()
            .write(true)
            .open(database)
            .inspect_err(|error| {
                tracing::warn!(
                    %error,
                    "cannot open the SQLite database for the checkpoint thread's fsyncs; each \
                     lap's pages are fsynced at its end, by the ingest writer"
                );
            })
            .ok();
        let (committed, commits) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || {
                copy_log_when_full(&connection, &thread_log, &commits, database_file.as_ref());
            })
            .map_err(StoreError::Writer)?;
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(SqliteError::from)?;
        Ok(Self::Beside {
            committed,
            log,
            end,
        })
    }

    /// Called by the writer after each commit, with no transaction open; returns what the commit
    /// did to the log, `None` when the wal-index cannot tell.
    pub(super) fn after_commit(&mut self, writer: &rusqlite::Connection) -> Option<LogWritten> {
        let Self::Beside {
            committed,
            log,
            end,
        } = self
        else {
            return None;
        };
        // A full channel already holds a wake-up, which covers this commit.
        let _ = committed.try_send(());
        let header = log.header();
        let written = header.as_ref().ok().map(|header| {
            let frames = header.end().frames_since(*end);
            *end = header.end();
            LogWritten {
                appended: u64::from(frames) * header.frame_bytes,
                length: u64::from(header.fill.frames) * header.frame_bytes,
            }
        });
        match header.map(|header| header.fill) {
            Ok(fill) if fill.writer_copies() => {
                // Past the limit the writer waits out a checkpoint the thread is still running
                // (SQLite runs one at a time and never waits for the other), so that the log
                // cannot keep growing while the thread is slow; below it, it tries again after
                // its next commit.
                let attempts = if fill.frames >= LOG_FRAMES_LIMIT {
                    WRITER_CHECKPOINT_WAITS
                } else {
                    1
                };
                for attempt in 1..=attempts {
                    match passive_checkpoint(writer) {
                        Ok(Checkpoint::Busy) if attempt < attempts => {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        Ok(Checkpoint::Ran | Checkpoint::Busy) => break,
                        Err(error) => {
                            tracing::warn!(%error, "checkpoint of the SQLite write-ahead log by the writer failed");
                            checkpoint_failed();
                            break;
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                // Without the header nothing would keep the log from growing: SQLite takes
                // checkpoints back.
                tracing::warn!(
                    %error,
                    "cannot read how full the SQLite write-ahead log is any more; the ingest \
                     writer checkpoints it itself from now on"
                );
                match writer.execute_batch("PRAGMA wal_autocheckpoint = 1000") {
                    Ok(()) => *self = Self::InWriter,
                    Err(error) => {
                        tracing::warn!(%error, "turning SQLite's checkpoints back on failed");
                    }
                }
            }
        }
        written
    }
}

/// What a commit did to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LogWritten {
    /// The bytes it appended: whole frames, each a page and its header.
    pub(super) appended: u64,
    /// The log's length after it, from where the log last started over.
    pub(super) length: u64,
}

/// What a checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Checkpoint {
    /// It copied what no reader still needs.
    Ran,
    /// Another connection's checkpoint was running, so it copied nothing.
    Busy,
}

/// Runs a PASSIVE checkpoint: copies what no reader still needs, without waiting for anyone.
fn passive_checkpoint(connection: &rusqlite::Connection) -> rusqlite::Result<Checkpoint> {
    // The first column is 1 when another checkpoint held the lock.
    let busy: i64 = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(0))?;
    Ok(if busy == 0 {
        Checkpoint::Ran
    } else {
        Checkpoint::Busy
    })
}

/// Copies the log whenever [`LogFill::thread_copies`] says so, and fsyncs the database file
/// after every pass, through `database`: SQLite fsyncs it only in a checkpoint that reaches the
/// log's end (see the module's documentation). SQLite's handles of the file, open since before
/// any pass, still hear of a write-back that failed (Linux reports it to every handle open when
/// it failed), so the checkpoint that lets the log start over fails on it as it would have.
fn copy_log_when_full(
    connection: &rusqlite::Connection,
    log: &WalIndex,
    commits: &mpsc::Receiver<()>,
    database: Option<&File>,
) {
    // One wake-up stands for every commit since the last look.
    while commits.recv().is_ok() {
        match log.fill() {
            Ok(fill) if fill.thread_copies() => match passive_checkpoint(connection) {
                Ok(Checkpoint::Ran) => {
                    if let Some(database) = database {
                        sync_copied_pages(database);
                    }
                }
                Ok(Checkpoint::Busy) => {}
                Err(error) => {
                    tracing::warn!(%error, "checkpoint of the SQLite write-ahead log failed");
                    checkpoint_failed();
                }
            },
            Ok(_) => {}
            // The writer hears it too, and takes checkpoints back.
            Err(_) => return,
        }
    }
}

/// Fsyncs `database` after a pass; the time goes to the metrics.
fn sync_copied_pages(database: &File) {
    let started = std::time::Instant::now();
    match database.sync_data() {
        Ok(()) => leadrelay_runtime::metrics::metrics()
            .ingest_checkpoint_synced(Backend::Sqlite.name(), started.elapsed()),
        Err(error) => {
            tracing::warn!(
                %error,
                "fsync of the SQLite database after a checkpoint failed; the log keeps every page \
                 until a checkpoint's own fsync succeeds"
            );
            checkpoint_failed();
        }
    }
}

/// Counts a failed checkpoint, or a failed fsync after one, for the operators' alert: the log
/// keeps what it did not copy, and grows on while they go on failing.
fn checkpoint_failed() {
    leadrelay_runtime::metrics::metrics().ingest_checkpoint_failed(Backend::Sqlite.name());
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn open_writer(database: &Path) -> rusqlite::Result<rusqlite::Connection> {
        let writer = rusqlite::Connection::open(database)?;
        writer.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
        )?;
        Ok(writer)
    }

    /// A connection to `database` inside a read transaction that has read: it holds a snapshot.
    fn holding_a_snapshot(database: &Path) -> rusqlite::Result<rusqlite::Connection> {
        let connection = rusqlite::Connection::open(database)?;
        connection.execute_batch("BEGIN")?;
        let _: i64 = connection.query_row("SELECT count(*) FROM rows", [], |row| row.get(0))?;
        Ok(connection)
    }

    /// The sample `sample` (name and labels) in the process's metrics so far; 0 before the first.
    fn rendered_count(sample: &str) -> Result<u64, Box<dyn std::error::Error>> {
        let text = tokio::runtime::Builder::new_current_thread()
            .build()?
            .block_on(leadrelay_runtime::metrics::metrics().render());
        let count = text
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(Ok(0), str::parse)?;
        Ok(count)
    }

    /// The fsyncs of the database after a pass counted in the process's metrics so far.
    fn checkpoint_syncs() -> Result<u64, Box<dyn std::error::Error>> {
        rendered_count("leadrelay_ingest_checkpoint_sync_seconds_count{engine=\"sqlite\"}")
    }

    /// Commits `transactions` transactions of 16 rows of 2 KiB, as the writer does; returns what
    /// each did to the log, as counted.
    fn commit_rows(
        writer: &rusqlite::Connection,
        checkpoints: &mut Checkpoints,
        transactions: usize,
        mut each: impl FnMut(),
    ) -> rusqlite::Result<Vec<Option<LogWritten>>> {
        let mut appended = Vec::with_capacity(transactions);
        for _ in 0..transactions {
            writer.execute_batch("BEGIN IMMEDIATE")?;
            for _ in 0..16 {
                writer.execute("INSERT INTO rows (body) VALUES (zeroblob(2048))", [])?;
            }
            writer.execute_batch("COMMIT")?;
            appended.push(checkpoints.after_commit(writer));
            each();
        }
        Ok(appended)
    }

    #[test]
    fn the_wal_index_tells_how_full_the_log_is() -> TestResult {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        let writer = open_writer(&database)?;
        writer.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        let log = WalIndex::open(&database)?;
        let before = log.fill()?;
        writer.execute("INSERT INTO rows (body) VALUES (zeroblob(100000))", [])?;
        let after = log.fill()?;
        assert!(
            after.frames >= before.frames + 24,
            "a 100 kB row is ~25 pages: {before:?} → {after:?}"
        );
        let (frames, copied): (u32, u32) =
            writer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(1)?, row.get(2)?))
            })?;
        assert_eq!(
            log.fill()?,
            LogFill { frames, copied },
            "the header agrees with what SQLite reports"
        );
        assert_eq!(copied, frames);
        Ok(())
    }

    #[test]
    fn the_thread_copies_passes_and_past_the_mark_large_leftovers_and_the_writer_the_last_commits()
    {
        let fill = |frames, copied| LogFill { frames, copied };
        // Below the mark the thread copies once a pass is uncopied, the writer never.
        for (frames, copied) in [
            (1_000, 0),
            (LOG_PASS_FRAMES - 1, 0),
            (LOG_LAP_FRAMES - 1, LOG_LAP_FRAMES - LOG_PASS_FRAMES),
        ] {
            assert!(!fill(frames, copied).thread_copies(), "{frames} {copied}");
            assert!(!fill(frames, copied).writer_copies(), "{frames} {copied}");
        }
        for (frames, copied) in [
            (LOG_PASS_FRAMES, 0),
            (LOG_LAP_FRAMES - 1, 0),
            (LOG_LAP_FRAMES - 1, LOG_LAP_FRAMES - 1 - LOG_PASS_FRAMES),
        ] {
            assert!(fill(frames, copied).thread_copies(), "{frames} {copied}");
            assert!(!fill(frames, copied).writer_copies(), "{frames} {copied}");
        }
        // Past it the thread copies after any commit that leaves more than the writer copies;
        // the writer copies a commit or two itself. Never both.
        let past = LOG_LAP_FRAMES + 1_000;
        for copied in [0, past - 1_000, past - WRITER_COPIES_AT_MOST - 1] {
            assert!(fill(past, copied).thread_copies());
            assert!(!fill(past, copied).writer_copies());
        }
        for copied in [past - WRITER_COPIES_AT_MOST, past - 1] {
            assert!(!fill(past, copied).thread_copies());
            assert!(fill(past, copied).writer_copies());
        }
        // Far past it the writer copies whatever is left and the thread none: the log must not
        // grow on.
        assert!(fill(LOG_FRAMES_LIMIT, 0).writer_copies());
        assert!(!fill(LOG_FRAMES_LIMIT, 0).thread_copies());
    }

    #[test]
    fn the_log_is_copied_in_passes_beside_the_writer_and_starts_over_once_a_lap() -> TestResult {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        let writer = open_writer(&database)?;
        let mut checkpoints = Checkpoints::start(&database, &writer)?;
        assert!(matches!(checkpoints, Checkpoints::Beside { .. }));
        let log = WalIndex::open(&database)?;
        let migrated = std::fs::metadata(&database)?.len();
        let syncs_before = checkpoint_syncs()?;

        // A page per row (two 2 KiB rows do not fit in one), 16 rows a commit: 800 commits are
        // ~14,800 frames, below the mark. The thread copies them on the way, into the database
        // file, whenever a pass is uncopied (how many passes depends on when it wakes), and
        // fsyncs the database after each. The log goes on growing.
        commit_rows(&writer, &mut checkpoints, 800, || {})?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let fill = loop {
            let fill = log.fill()?;
            if fill.uncopied() < LOG_PASS_FRAMES || std::time::Instant::now() >= deadline {
                break fill;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            fill.frames > 12_000 && fill.frames < LOG_LAP_FRAMES,
            "the log started over before the mark: {fill:?}"
        );
        assert!(
            fill.uncopied() < LOG_PASS_FRAMES,
            "the thread left more than a pass uncopied: {fill:?}"
        );
        assert!(
            std::fs::metadata(&database)?.len() >= migrated + 32 * 1024 * 1024,
            "the passes are not in the database file"
        );
        assert!(
            checkpoint_syncs()? > syncs_before,
            "the database was not fsynced after a pass"
        );

        // 3500 commits more are ~65,000 frames, four times the mark.
        let (mut largest, mut previous, mut laps) = (0, fill.frames, 0);
        commit_rows(&writer, &mut checkpoints, 3500, || {
            if let Ok(fill) = log.fill() {
                if fill.frames < previous {
                    laps += 1;
                }
                previous = fill.frames;
                largest = largest.max(fill.frames);
            }
        })?;
        // The writer's own checkpoint waits for none: while the thread's runs, it is skipped
        // and tried again after the next commit, so the log may pass the mark by a few commits,
        // and past the limit only by one.
        assert!(
            largest <= LOG_FRAMES_LIMIT + 64,
            "the log should start over soon after {LOG_LAP_FRAMES} frames, yet held {largest}"
        );
        assert!(
            laps >= 2,
            "the log started over {laps} times in ~64,000 frames"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::metadata(&database)?.len() < migrated + 32 * 1024 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file stayed near {migrated} bytes: nothing was copied into it"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    #[test]
    fn each_commit_counts_the_bytes_it_appended_to_the_log_also_when_the_log_starts_over()
    -> TestResult {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        let writer = open_writer(&database)?;
        let mut checkpoints = Checkpoints::start(&database, &writer)?;
        let log = WalIndex::open(&database)?;
        let wal = crate::ingest::sqlite_sibling(&database, "-wal");

        // On the log's first lap it only grows, by what each commit appended: whole frames of
        // a 4 KiB page and a 24-byte header. 30 commits stay far below the lap's mark.
        let mut first_lap = Vec::new();
        for _ in 0..30 {
            let before = std::fs::metadata(&wal)?.len();
            let counted = commit_rows(&writer, &mut checkpoints, 1, || {})?;
            let length = std::fs::metadata(&wal)?.len();
            let grown = length - before;
            // The file also holds the log's 32-byte header.
            assert_eq!(
                counted,
                [Some(LogWritten {
                    appended: grown,
                    length: length - 32
                })],
                "the log grew by {grown} bytes to {length}"
            );
            assert_eq!(grown % (4096 + 24), 0, "{grown} bytes are not whole frames");
            // 16 rows of 2 KiB fill at least 8 pages.
            assert!(grown >= 8 * (4096 + 24), "{grown} bytes");
            first_lap.push(grown);
        }
        let lap = log.header()?.lap;

        // ~18 frames a commit: the log starts over after 16,384 frames, so several times in 5000
        // commits. A commit on a new lap counts its frames, not the frames less the old lap's.
        let counted = commit_rows(&writer, &mut checkpoints, 5000, || {})?;
        assert_ne!(log.header()?.lap, lap, "the log never started over");
        let (fewest, most) = (
            first_lap.iter().min().copied().unwrap_or_default(),
            first_lap.iter().max().copied().unwrap_or_default(),
        );
        for written in counted {
            let bytes = written.ok_or("the wal-index could not be read")?.appended;
            // Interior pages along the path to the table's last leaf add a few frames now and then.
            assert!(
                (fewest..=most + 8 * (4096 + 24)).contains(&bytes),
                "a commit counted {bytes} bytes; on the first lap each counted {fewest} to {most}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_reader_holding_an_old_snapshot_keeps_the_log_growing_and_its_length_shows_it() -> TestResult
    {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        let writer = open_writer(&database)?;
        let mut checkpoints = Checkpoints::start(&database, &writer)?;
        let frame_bytes = 4096 + 24;
        let limit = u64::from(LOG_FRAMES_LIMIT) * frame_bytes;

        // A read transaction left open (an sqlite3 shell, a backup tool) pins the pages of its
        // snapshot: no checkpoint copies past them, and the log cannot start over. ~1,700 commits
        // of ~18 frames are ~30,000 frames, past the limit the log otherwise never passes.
        let reader = holding_a_snapshot(&database)?;
        let lengths: Vec<u64> = commit_rows(&writer, &mut checkpoints, 1_700, || {})?
            .into_iter()
            .map(|written| written.map(|written| written.length))
            .collect::<Option<_>>()
            .ok_or("the wal-index could not be read")?;
        let last = lengths.last().copied().unwrap_or_default();
        assert!(
            last > limit + 4 * 1024 * 1024,
            "with a reader pinning it the log should outgrow {limit} bytes, yet is {last}"
        );
        assert!(
            lengths.windows(2).all(|pair| pair[0] < pair[1]),
            "the log started over under a reader"
        );

        // Once the reader is done the writer copies the log and it starts over.
        reader.execute_batch("COMMIT")?;
        let after: Vec<u64> = commit_rows(&writer, &mut checkpoints, 5, || {})?
            .into_iter()
            .flatten()
            .map(|written| written.length)
            .collect();
        assert!(
            after.iter().any(|length| *length < 1024 * 1024),
            "the log did not start over once the reader was done: {after:?}"
        );
        Ok(())
    }

    #[test]
    fn a_checkpoint_that_fails_is_counted() -> TestResult {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        let writer = open_writer(&database)?;
        writer.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        // ~300 commits of ~18 frames leave more than a pass uncopied: the thread copies.
        commit_rows(&writer, &mut Checkpoints::InWriter, 300, || {})?;
        let log = WalIndex::open(&database)?;
        assert!(log.fill()?.thread_copies(), "{:?}", log.fill()?);

        // A connection inside a transaction cannot checkpoint: SQLite answers SQLITE_LOCKED.
        let connection = holding_a_snapshot(&database)?;
        let failures = "leadrelay_ingest_checkpoint_failures_total{engine=\"sqlite\"}";
        let before = rendered_count(failures)?;
        let (commit, commits) = mpsc::sync_channel(1);
        commit.send(())?;
        drop(commit);
        copy_log_when_full(&connection, &log, &commits, None);
        assert!(
            rendered_count(failures)? > before,
            "the failed checkpoint was not counted"
        );
        // It copied nothing.
        assert_eq!(log.fill()?.copied, 0);
        Ok(())
    }

    #[test]
    fn without_a_readable_wal_index_the_writer_keeps_sqlite_checkpoints() -> TestResult {
        let folder = tempfile::tempdir()?;
        let database = folder.path().join("log.db");
        // A rollback-journal database has no wal-index.
        let writer = rusqlite::Connection::open(&database)?;
        writer.execute_batch("CREATE TABLE rows (id INTEGER PRIMARY KEY)")?;
        let checkpoints = Checkpoints::start(&database, &writer)?;
        assert!(matches!(checkpoints, Checkpoints::InWriter));
        let autocheckpoint: i64 =
            writer.query_row("PRAGMA wal_autocheckpoint", [], |row| row.get(0))?;
        assert_eq!(autocheckpoint, 1000);
        Ok(())
    }
}
