//! Hands Hana webhook calls to the orchestrator on one long-lived stream (`IngestHanaStream`):
//! each call is written onto it as it arrives and answered as soon as the orchestrator has stored
//! it.
//!
//! Batches ([`crate::hana_batches`]) cost a webhook a wait for a free slot and then for its whole
//! batch's round trip; on the stream it waits for neither. In the `webhook_ingest` benchmark (64
//! concurrent senders, SQLite) the stream took the median time to acknowledge from 5.8–6.0 ms to
//! 4.5–5.0 ms and the throughput from 11.3–11.6% to 13.7–15.3% of the bare endpoint's.
//!
//! Batches remain the way calls go whenever no stream is open: before the first one opens, while
//! the orchestrator is unreachable, and for [`NO_STREAM_FOR`] after an orchestrator refused the
//! stream as UNIMPLEMENTED (one older than the gateway, during a rolling upgrade or after a
//! rollback).
//!
//! A call the orchestrator has not answered when its stream ends (the orchestrator shut down, the
//! connection broke) is sent again in a batch, which answers the webhook. That is safe whether or
//! not it was stored: a stored call answers `duplicate: true` with its event id. A call left
//! unanswered past its webhook's deadline ends its stream too: the webhook is answered 503, and
//! the calls after it go in batches and then on a new stream instead of waiting on a stream that
//! may never answer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use leadrelay_proto::v1::{
    IngestHanaEventRequest, IngestHanaStreamRequest, IngestHanaStreamResponse,
    orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_runtime::propagation::TracedChannel;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Code, Status};

use crate::{
    INGEST_DEADLINE,
    hana_batches::{Answer, HanaBatches, Resend, call_answer},
};

/// How long calls go in batches after the orchestrator refused the stream.
const NO_STREAM_FOR: Duration = Duration::from_secs(60);

/// The first wait before opening a stream again after opening one failed; it doubles up to
/// [`MOST_BETWEEN_TRIES`] while the orchestrator stays unreachable.
const FIRST_BETWEEN_TRIES: Duration = Duration::from_millis(250);
const MOST_BETWEEN_TRIES: Duration = Duration::from_secs(10);

/// How long opening a stream may take before it is given up and tried again.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls written to the stream but not yet taken by the connection; a webhook waits while it is
/// full.
const OUTGOING_BUFFERED: usize = 1024;

/// The handle the webhook handlers send their calls through.
pub(crate) struct HanaCalls {
    shared: Arc<Shared>,
    batches: HanaBatches,
    /// Stops the task that keeps the stream open once the handlers are gone.
    _stop: DropGuard,
}

/// What the handlers and the stream's task share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Where calls go; `None` while no stream is open (then they go in batches).
    open: Option<OpenStream>,
    /// The id the next call gets; ids are never reused, across streams too.
    next_call_id: u64,
    /// Calls sent and not yet answered, by id.
    unanswered: HashMap<u64, Unanswered>,
}

struct OpenStream {
    /// Counts the streams opened: tells apart the calls of the one that ended.
    number: u64,
    outgoing: mpsc::Sender<IngestHanaStreamRequest>,
    /// Cancelled when a call on the stream went unanswered past its deadline: the stream is then
    /// given up for a new one.
    given_up: CancellationToken,
}

/// A call sent on a stream and not answered yet.
struct Unanswered {
    stream: u64,
    /// What the call is made again from, should its stream end before it is answered.
    resend: Resend,
    queued_at: Instant,
    reply: oneshot::Sender<Answer>,
}

impl State {
    /// Registers `call` as sent on the open stream, to be answered on `reply`: where to write it
    /// and its id. `None` when no stream is open.
    fn register(
        &mut self,
        call: &IngestHanaEventRequest,
        reply: oneshot::Sender<Answer>,
    ) -> Option<(mpsc::Sender<IngestHanaStreamRequest>, u64)> {
        let open = self.open.as_ref()?;
        let (stream, outgoing) = (open.number, open.outgoing.clone());
        let call_id = self.next_call_id;
        self.next_call_id += 1;
        self.unanswered.insert(
            call_id,
            Unanswered {
                stream,
                resend: Resend::of(call),
                queued_at: Instant::now(),
                reply,
            },
        );
        Some((outgoing, call_id))
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing leaves the state half-changed across a panic: every change is one insert,
        // remove or assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HanaCalls {
    /// Starts the task that keeps a stream to `orchestrator` open; calls go in `batches` while
    /// none is.
    pub(crate) fn start(
        orchestrator: OrchestratorServiceClient<TracedChannel>,
        batches: HanaBatches,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        tokio::spawn(keep_stream_open(
            orchestrator,
            shared.clone(),
            batches.clone(),
            stop.clone(),
        ));
        Self {
            shared,
            batches,
            _stop: stop.drop_guard(),
        }
    }

    /// Stores `call` through the orchestrator; answers once it is stored, or why not.
    pub(crate) async fn ingest(&self, call: IngestHanaEventRequest) -> Answer {
        let (reply, answer) = oneshot::channel();
        let registered = self.shared.state().register(&call, reply);
        let Some((outgoing, call_id)) = registered else {
            return self.batches.ingest(call).await;
        };
        let request = IngestHanaStreamRequest {
            call_id,
            call: Some(call),
        };
        let sent_and_answered = async {
            // When the stream has just ended, the call stays unanswered and goes again in a
            // batch with the others of its stream.
            let _ = outgoing.send(request).await;
            answer.await
        };
        // The deadline covers the wait to be written too: an orchestrator that stops reading
        // fills the stream's buffer.
        match tokio::time::timeout(INGEST_DEADLINE, sent_and_answered).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::unavailable("the gateway is shutting down")),
            Err(_) => {
                let mut state = self.shared.state();
                if let Some(unanswered) = state.unanswered.remove(&call_id)
                    && let Some(open) = &state.open
                    && open.number == unanswered.stream
                {
                    // An orchestrator that stopped answering on this stream (a stuck reader, a
                    // connection that died without a word) would fail every later call too.
                    open.given_up.cancel();
                }
                drop(state);
                Err(Status::deadline_exceeded(format!(
                    "the orchestrator did not answer within {} s",
                    INGEST_DEADLINE.as_secs()
                )))
            }
        }
    }
}

/// Opens a stream, hands its answers to the calls, and opens another once it ends; until
/// `stop` is cancelled.
async fn keep_stream_open(
    mut orchestrator: OrchestratorServiceClient<TracedChannel>,
    shared: Arc<Shared>,
    batches: HanaBatches,
    stop: CancellationToken,
) {
    let mut between_tries = FIRST_BETWEEN_TRIES;
    let mut number = 0;
    loop {
        number += 1;
        let (outgoing, calls) = mpsc::channel(OUTGOING_BUFFERED);
        let opening = tokio::time::timeout(
            OPEN_TIMEOUT,
            orchestrator.ingest_hana_stream(ReceiverStream::new(calls)),
        );
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = opening => opened,
        };
        let wait = match opened {
            Ok(Ok(response)) => {
                between_tries = FIRST_BETWEEN_TRIES;
                let given_up = CancellationToken::new();
                shared.state().open = Some(OpenStream {
                    number,
                    outgoing,
                    given_up: given_up.clone(),
                });
                tracing::debug!(
                    stream = number,
                    "Hana calls go to the orchestrator on a stream"
                );
                let ended = tokio::select! {
                    () = stop.cancelled() => return,
                    () = given_up.cancelled() => Err(Status::deadline_exceeded(format!(
                        "a call on it went unanswered for {} s",
                        INGEST_DEADLINE.as_secs()
                    ))),
                    ended = hand_out_answers(response.into_inner(), &shared) => ended,
                };
                match ended {
                    Ok(()) => tracing::info!(
                        stream = number,
                        "the orchestrator ended the stream of Hana calls (shutting down?); \
                         opening another"
                    ),
                    Err(status) => tracing::warn!(
                        stream = number,
                        %status,
                        "the stream of Hana calls to the orchestrator broke or went silent; \
                         opening another"
                    ),
                }
                resend_unanswered(&shared, number, &batches).await;
                // Not at once: an orchestrator shutting down ends every stream it is given.
                FIRST_BETWEEN_TRIES
            }
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "the orchestrator does not take a stream of Hana calls (IngestHanaStream; is \
                     it older than the gateway?): sending calls in batches for {} s",
                    NO_STREAM_FOR.as_secs()
                );
                NO_STREAM_FOR
            }
            Ok(Err(status)) => {
                tracing::debug!(%status, "opening a stream of Hana calls failed; batches meanwhile");
                next_wait(&mut between_tries)
            }
            Err(_) => {
                tracing::debug!("opening a stream of Hana calls timed out; batches meanwhile");
                next_wait(&mut between_tries)
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The wait before the next try, doubling the one after.
fn next_wait(between_tries: &mut Duration) -> Duration {
    let wait = *between_tries;
    *between_tries = (*between_tries * 2).min(MOST_BETWEEN_TRIES);
    wait
}

/// Answers each call whose answer comes on `answers`; returns once the stream ends.
async fn hand_out_answers(
    mut answers: tonic::Streaming<IngestHanaStreamResponse>,
    shared: &Shared,
) -> Result<(), Status> {
    while let Some(answer) = answers.message().await? {
        // Absent when the call's webhook stopped waiting (its deadline passed).
        let unanswered = shared.state().unanswered.remove(&answer.call_id);
        if let Some(unanswered) = unanswered {
            let _ = unanswered.reply.send(call_answer(answer.result));
        }
    }
    Ok(())
}

/// Closes stream `number` to new calls and sends every call it left unanswered again in a batch.
async fn resend_unanswered(shared: &Shared, number: u64, batches: &HanaBatches) {
    let left: Vec<Unanswered> = {
        let mut state = shared.state();
        state.open = None;
        let ids: Vec<u64> = state
            .unanswered
            .iter()
            .filter(|(_, unanswered)| unanswered.stream == number)
            .map(|(id, _)| *id)
            .collect();
        ids.iter()
            .filter_map(|id| state.unanswered.remove(id))
            .collect()
    };
    if !left.is_empty() {
        tracing::info!(
            calls = left.len(),
            "sending the calls the ended stream left unanswered again, in batches"
        );
    }
    for unanswered in left {
        batches
            .forward(
                unanswered.resend.into_call(),
                unanswered.queued_at,
                unanswered.reply,
            )
            .await;
    }
}
