//! `IngestHanaStream`: Hana calls on one long-lived stream, each answered once it is stored.
//!
//! The gateway keeps one stream open and writes every Hana webhook onto it as it arrives. Here
//! the calls are read as they come; those already received when the reader gets to them go to the
//! writer's queue together, like a batch, and reading goes on while they are stored. Each call is
//! answered on its own once its group is durable, in whatever order groups finish.
//!
//! With batches (`IngestHanaEvents`) a webhook waited for a free batch slot, then for its whole
//! batch's call. Timed in the benchmark at 64 concurrent senders on SQLite, of the 4.9 ms a
//! webhook spent in the gateway: 1.0 ms waiting for a slot, and 1.6 ms in the batch call besides
//! the orchestrator's own 2.3 ms (sending it, its answer coming back, the answers handed out). On
//! the stream a call waits for no slot and no other call.
//!
//! The stream never ends by itself. When the orchestrator shuts down, the reader stops taking
//! calls, answers every call it took, and then ends the stream (status OK): a server shutting down
//! gracefully waits for its open calls. Calls the gateway sent that were not read are not stored;
//! the gateway sends every call left unanswered again.

use futures_util::FutureExt as _;
use leadrelay_proto::v1::{IngestHanaStreamRequest, IngestHanaStreamResponse};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{
    ingest::{Ingester, QueuedCalls},
    service::{call_result, hana_call},
};

/// Most calls read before they go to the writer: what one group commits at most.
const MAX_CALLS_AT_ONCE: usize = 256;

/// Answers waiting to be written to the stream. When the gateway reads them slower than calls
/// are stored, answering waits, and so does reading new calls once the writer's queue is full.
const ANSWERS_BUFFERED: usize = 1024;

/// The answers of one stream, as tonic sends them.
pub(crate) type Answers = ReceiverStream<Result<IngestHanaStreamResponse, Status>>;

/// Reads the calls of `incoming`, stores them through `ingester` and answers each; ends once the
/// gateway ends its side, the stream breaks, or `shutdown` is cancelled, after every call read
/// is answered.
pub(crate) fn answer_calls(
    ingester: Ingester,
    incoming: Streaming<IngestHanaStreamRequest>,
    shutdown: CancellationToken,
) -> Answers {
    let (answers, answered) = mpsc::channel(ANSWERS_BUFFERED);
    tokio::spawn(read_calls(ingester, incoming, answers, shutdown));
    ReceiverStream::new(answered)
}

/// The call read; `None` once the gateway ended its side or the stream broke.
fn read(
    message: Result<Option<IngestHanaStreamRequest>, Status>,
) -> Option<IngestHanaStreamRequest> {
    message.unwrap_or_else(|status| {
        tracing::debug!(%status, "a Hana call stream broke");
        None
    })
}

async fn read_calls(
    ingester: Ingester,
    mut incoming: Streaming<IngestHanaStreamRequest>,
    answers: mpsc::Sender<Result<IngestHanaStreamResponse, Status>>,
    shutdown: CancellationToken,
) {
    let mut answering = JoinSet::new();
    let mut ended = false;
    while !ended {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            message = incoming.message() => read(message),
        };
        let Some(first) = first else { break };
        let mut received = vec![first];
        // Every call already received goes with the first: they are stored together.
        while received.len() < MAX_CALLS_AT_ONCE {
            match incoming.message().now_or_never().map(read) {
                Some(Some(call)) => received.push(call),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        let mut call_ids = Vec::with_capacity(received.len());
        let (calls, spans): (Vec<_>, Vec<_>) = received
            .into_iter()
            .map(|received| {
                call_ids.push(received.call_id);
                // A call without its message is stored in quarantine, as a batch's would be.
                hana_call(received.call.unwrap_or_default())
            })
            .unzip();
        let queued = ingester.queue_all(calls).await;
        answering.spawn(answer(queued, call_ids, spans, answers.clone()));
        while answering.try_join_next().is_some() {}
    }
    // The stream ends when `answers` is dropped: only once every call read is answered.
    while answering.join_next().await.is_some() {}
}

/// Answers the calls `queued` once they are stored.
async fn answer(
    queued: QueuedCalls,
    call_ids: Vec<u64>,
    spans: Vec<tracing::Span>,
    answers: mpsc::Sender<Result<IngestHanaStreamResponse, Status>>,
) {
    let outcomes = queued.outcomes().await;
    for ((outcome, span), call_id) in outcomes.into_iter().zip(&spans).zip(call_ids) {
        let answer = IngestHanaStreamResponse {
            call_id,
            result: Some(call_result(span, outcome)),
        };
        // The gateway is gone: it answered its webhooks with an error, and Hana sends them again.
        if answers.send(Ok(answer)).await.is_err() {
            return;
        }
    }
}
