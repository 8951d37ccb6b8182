//! The CPU priority of the ingest's serial threads: the writer, and on SQLite the thread that
//! fsyncs the write-ahead log.
//!
//! Every webhook waits for each of them in turn, while the runtime's threads (HTTP, gRPC, the job
//! runner) share the work of many webhooks. When every core is busy, the scheduler makes a woken
//! serial thread wait its turn behind them: in the webhook benchmark on SQLite (2 cores, 64
//! concurrent senders), over 10 s the log's sync thread waited 1.6 s for a core against 0.55 s
//! of CPU, about 0.8 ms per fsync, and the writer waited 1.5 s. Reniced to -10 from outside the
//! process, in 6 alternating 8 s runs of each: the log's fsync took 2.46 ms instead of 2.82 (as
//! timed by the thread), 4,530 webhooks/s instead of 4,260 (+6%), p99 28–34 ms instead of 35–39,
//! and the process kept 1.42–1.48 cores busy instead of 1.34–1.40. Built in, against the build
//! before, 5 runs of each: +4.9% (more in each pair), fsync 2.33 ms instead of 2.70. A shorter
//! scheduler slice for them (`sched_setattr`) changed nothing measurable, and neither did a lower
//! priority for the checkpoint thread.
//!
//! Raising a priority needs `CAP_SYS_NICE` (root has it) or an `RLIMIT_NICE` allowing it.
//! Without either the threads run at the priority they were started with, like every other
//! thread, and say so once in the log: ingest works the same, a little slower on a busy machine.

/// The nice value the serial threads ask for: ahead of the runtime's threads (nice 0 unless the
/// process was started otherwise), short of -20, which would leave those threads next to nothing
/// of a core while the writer is busy.
const SERIAL_THREAD_NICE: i32 = -10;

/// Asks for [`SERIAL_THREAD_NICE`] for the calling thread, the serial `stage` of ingest.
pub(super) fn raise_for(stage: &'static str) {
    // On Linux, setpriority(PRIO_PROCESS, 0) changes the calling thread alone; on other systems
    // it would change the whole process, so there the threads keep the process's priority.
    #[cfg(target_os = "linux")]
    match rustix::process::setpriority_process(None, SERIAL_THREAD_NICE) {
        Ok(()) => tracing::debug!(
            stage,
            nice = SERIAL_THREAD_NICE,
            "the serial ingest thread runs ahead of the runtime's threads"
        ),
        Err(error) => tracing::info!(
            stage,
            %error,
            "the serial ingest thread runs at the process's CPU priority: raising it to nice {} \
             needs CAP_SYS_NICE; on a busy machine webhooks then wait longer for it",
            SERIAL_THREAD_NICE
        ),
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stage;
}
