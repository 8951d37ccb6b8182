//! Checkpoints of the SQLite write-ahead log, on a thread of their own.
//!
//! SQLite checkpoints on the committing connection by default: once the log holds 1000 pages, the
//! commit that crossed the mark also copies them into the database file and fsyncs it. On the
//! ingest writer that stalled every call queued behind it, and took 15% of the writer's time. Here
//! the writer only commits; this thread copies (a PASSIVE checkpoint, which never blocks the
//! writer) at most every [`INTERVAL`] while commits keep coming.
//!
//! The log starts over from its beginning only when a commit finds every frame of it copied. Under
//! load that never ran dry, a checkpoint running beside the writer could always be one commit
//! behind and the log would grow without end; once it holds [`WRITER_CHECKPOINT_FRAMES`] the writer
//! is asked to checkpoint once itself, between two groups, after which the log starts over.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use super::sql::SqliteError;
use crate::store::StoreError;

/// Log frames (pages) past which the writer checkpoints once itself: 64 MiB of 4 KiB pages.
const WRITER_CHECKPOINT_FRAMES: i64 = 16 * 1024;

/// The size the log file is cut back to when it starts over (SQLite keeps it at its largest
/// otherwise).
const LOG_SIZE_LIMIT_BYTES: i64 = 16 * 1024 * 1024;

/// The writer's side: says when it committed, and hears when it must checkpoint itself.
pub(super) struct Checkpoints {
    committed: mpsc::SyncSender<()>,
    writer_must_checkpoint: Arc<AtomicBool>,
}

impl Checkpoints {
    /// Sets up `writer` (checkpoints off, the log's size limit) and starts the thread, with a
    /// connection of its own to `database`.
    pub(super) fn start(
        database: &Path,
        writer: &rusqlite::Connection,
    ) -> Result<Self, StoreError> {
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {LOG_SIZE_LIMIT_BYTES};"
            ))
            .map_err(SqliteError::from)?;
        let connection = rusqlite::Connection::open(database).map_err(SqliteError::from)?;
        // NORMAL: a checkpoint fsyncs the log before copying and the database after.
        connection
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
            .map_err(SqliteError::from)?;
        let (committed, commits) = mpsc::sync_channel(1);
        let writer_must_checkpoint = Arc::new(AtomicBool::new(false));
        let asked = writer_must_checkpoint.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || checkpoint_while_committed(&connection, &commits, &asked))
            .map_err(StoreError::Writer)?;
        Ok(Self {
            committed,
            writer_must_checkpoint,
        })
    }

    /// Called by the writer after each commit, with no transaction open.
    pub(super) fn after_commit(&self, writer: &rusqlite::Connection) {
        // A full channel already holds a wake-up: this commit is covered by it.
        let _ = self.committed.try_send(());
        if self.writer_must_checkpoint.swap(false, Ordering::Relaxed) {
            match passive_checkpoint(writer) {
                Ok((frames, copied)) => {
                    tracing::info!(
                        frames,
                        copied,
                        "the write-ahead log outgrew its checkpoints; the writer checkpointed it"
                    );
                }
                Err(error) => tracing::warn!(%error, "checkpoint by the writer failed"),
            }
        }
    }
}

/// Runs a PASSIVE checkpoint; returns the frames in the log and how many of them are copied.
fn passive_checkpoint(connection: &rusqlite::Connection) -> rusqlite::Result<(i64, i64)> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
}

fn checkpoint_while_committed(
    connection: &rusqlite::Connection,
    commits: &mpsc::Receiver<()>,
    writer_must_checkpoint: &AtomicBool,
) {
    // One wake-up stands for every commit made since the last checkpoint began.
    while commits.recv().is_ok() {
        match passive_checkpoint(connection) {
            Ok((frames, _)) if frames >= WRITER_CHECKPOINT_FRAMES => {
                writer_must_checkpoint.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "checkpoint of the SQLite write-ahead log failed"),
        }
    }
}
