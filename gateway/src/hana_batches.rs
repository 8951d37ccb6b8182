//! Hands Hana webhook calls to the orchestrator in batches while no stream of calls is open (see
//! [`crate::hana_stream`]): the calls that arrive while earlier ones are on their way go together
//! in one `IngestHanaEvents` call.
//!
//! A call on its own costs a gRPC stream: headers each way, a task on each side, a wake-up of
//! both connection tasks. Under load those, not the store, were what a webhook waited for (about
//! 4 of the 10 ms a webhook took at 64 concurrent senders). A lone webhook still goes at once, in
//! a batch of one; batches grow only while every slot is taken, so they add no wait of their own.
//! Each call keeps its own answer: the orchestrator answers every call of a batch on its own, and
//! a batch that fails as a whole fails each of its calls, which are then answered 5xx and sent
//! again by Hana.
//!
//! An orchestrator older than the gateway (during a rolling upgrade, or after a rollback) does not
//! know `IngestHanaEvents` and answers UNIMPLEMENTED. Every webhook would then fail, and Hana
//! switches an event off for 30 minutes after 5 failures, so the refused batch is sent again call
//! by call (`IngestHanaEvent`), and calls go one by one for [`ONE_BY_ONE_FOR`] before a batch is
//! tried again.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use leadrelay_proto::v1::{
    IngestHanaEventRequest, IngestHanaEventResponse, IngestHanaEventResult,
    IngestHanaEventsRequest, ingest_hana_event_result::Result as CallResult,
    orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_runtime::propagation::{TracedChannel, link_trace};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::{Code, Status};
use tracing::Instrument as _;

use crate::{INGEST_DEADLINE, webhooks::hana_ingest_request};

/// Batches on their way at once. While all of them are, calls wait and then go together.
const SLOTS: usize = 4;

/// Most calls in one batch.
const MAX_CALLS: usize = 128;

/// Most encoded bytes in one batch, well inside the 4 MiB a gRPC server takes by default. A call
/// larger than this on its own (a body near the 1 MiB limit, parsed and raw) goes alone.
const MAX_BYTES: usize = 3 * 1024 * 1024;

/// The shortest deadline a batch is sent with, however long its oldest call waited.
const MIN_DEADLINE: Duration = Duration::from_millis(100);

/// How long calls go one by one after the orchestrator refused a batch.
const ONE_BY_ONE_FOR: Duration = Duration::from_secs(60);

/// What a call's sender hears back.
pub(crate) type Answer = Result<IngestHanaEventResponse, Status>;

/// A call waiting for its batch.
struct Queued {
    call: IngestHanaEventRequest,
    /// The call's encoded size, measured in the webhook's own task: the batching task is one
    /// for every call.
    bytes: usize,
    queued_at: Instant,
    reply: oneshot::Sender<Answer>,
}

/// The handle the webhook handlers queue their calls on.
#[derive(Clone)]
pub(crate) struct HanaBatches {
    queue: mpsc::Sender<Queued>,
}

impl HanaBatches {
    /// Starts the task that sends the batches; it stops once the handle is dropped.
    pub(crate) fn start(orchestrator: OrchestratorServiceClient<TracedChannel>) -> Self {
        let (queue, queued) = mpsc::channel(MAX_CALLS * SLOTS);
        let orchestrator = Arc::new(Orchestrator {
            client: orchestrator,
            batches_refused_at: Mutex::new(None),
        });
        tokio::spawn(send_batches(orchestrator, queued));
        Self { queue }
    }

    /// Stores `call` through the orchestrator; answers once it is stored, or why not.
    pub(crate) async fn ingest(&self, call: IngestHanaEventRequest) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.forward(call, Instant::now(), reply).await;
        answer
            .await
            .map_err(|_| Status::unavailable("the gateway is shutting down"))?
    }

    /// Queues `call`, waiting since `queued_at`, to be answered on `reply`. A call that cannot
    /// be queued (the gateway is shutting down) is answered so at once.
    pub(crate) async fn forward(
        &self,
        call: IngestHanaEventRequest,
        queued_at: Instant,
        reply: oneshot::Sender<Answer>,
    ) {
        let queued = Queued {
            bytes: call.encoded_len(),
            call,
            queued_at,
            reply,
        };
        if let Err(refused) = self.queue.send(queued).await {
            let _ = refused
                .0
                .reply
                .send(Err(Status::unavailable("the gateway is shutting down")));
        }
    }
}

/// Takes a free slot, then every call waiting (up to a batch), and sends them; repeats.
async fn send_batches(orchestrator: Arc<Orchestrator>, mut queued: mpsc::Receiver<Queued>) {
    let slots = Arc::new(Semaphore::new(SLOTS));
    let mut waiting = Vec::with_capacity(MAX_CALLS);
    loop {
        // The slot first: while every slot is taken, calls gather in the queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if queued.recv_many(&mut waiting, MAX_CALLS).await == 0 {
            return;
        }
        let batches = split_by_size(std::mem::take(&mut waiting), |queued| queued.bytes);
        tokio::spawn(send(orchestrator.clone(), batches, slot));
    }
}

/// `items` in order, cut so that no part but a lone item holds more than [`MAX_BYTES`].
fn split_by_size<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for item in items {
        let item_bytes = size(&item);
        if !part.is_empty() && bytes + item_bytes > MAX_BYTES {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += item_bytes;
        part.push(item);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Sends `batches` one after the other, holding `slot` until all are answered.
async fn send(
    orchestrator: Arc<Orchestrator>,
    batches: Vec<Vec<Queued>>,
    slot: OwnedSemaphorePermit,
) {
    for batch in batches {
        orchestrator.send(batch).await;
    }
    drop(slot);
}

/// The orchestrator the calls go to, and whether it lately refused batches.
struct Orchestrator {
    client: OrchestratorServiceClient<TracedChannel>,
    batches_refused_at: Mutex<Option<Instant>>,
}

impl Orchestrator {
    /// Whether the orchestrator refused a batch less than [`ONE_BY_ONE_FOR`] ago.
    fn refuses_batches(&self) -> bool {
        self.batches_refused_at
            .lock()
            .ok()
            .and_then(|refused_at| *refused_at)
            .is_some_and(|refused_at| refused_at.elapsed() < ONE_BY_ONE_FOR)
    }

    /// Sends `batch`, in one call when the orchestrator takes batches, and answers each call.
    async fn send(&self, batch: Vec<Queued>) {
        if self.refuses_batches() {
            self.send_one_by_one(batch).await;
            return;
        }
        let oldest = oldest(&batch);
        let (calls, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|queued| (queued.call, queued.reply))
            .unzip();
        // The batch is a trace of its own, linked to each webhook's trace; each call's storing is
        // in its webhook's trace (the orchestrator continues the call's `traceparent`).
        let span = tracing::info_span!(
            "hana batch",
            otel.name = "ingest hana batch",
            otel.kind = "client",
            calls = calls.len(),
        );
        for call in &calls {
            link_trace(&span, &call.traceparent);
        }
        // Kept until the answer, to be sent again one by one if the batch is refused: what the
        // calls were made of, not the calls, whose parsed bodies are the costly part to copy.
        let kept: Vec<Resend> = calls.iter().map(Resend::of).collect();
        let mut request = tonic::Request::new(IngestHanaEventsRequest { calls });
        request.set_timeout(deadline(oldest));
        let answer = self
            .client
            .clone()
            .ingest_hana_events(request)
            .instrument(span)
            .await;
        match answer {
            Ok(response) => {
                let mut results = response.into_inner().results.into_iter();
                for reply in replies {
                    let _ = reply.send(call_answer(results.next()));
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "the orchestrator does not take batches of Hana calls (IngestHanaEvents; is \
                     it older than the gateway?): sending calls one by one"
                );
                if let Ok(mut refused_at) = self.batches_refused_at.lock() {
                    *refused_at = Some(Instant::now());
                }
                let resent = kept
                    .into_iter()
                    .zip(replies)
                    .map(|(kept, reply)| {
                        let call = kept.into_call();
                        Queued {
                            bytes: call.encoded_len(),
                            call,
                            queued_at: oldest,
                            reply,
                        }
                    })
                    .collect();
                self.send_one_by_one(resent).await;
            }
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }

    /// Sends each call of `batch` on its own, all at once, answering each when its call returns.
    /// Returns once every call is answered: the batch's slot stays taken until then, so an
    /// orchestrator that refuses batches gets no more calls at once than batches would carry.
    async fn send_one_by_one(&self, batch: Vec<Queued>) {
        let mut calls = tokio::task::JoinSet::new();
        for queued in batch {
            let mut client = self.client.clone();
            calls.spawn(async move {
                let mut request = tonic::Request::new(queued.call);
                request.set_timeout(deadline(queued.queued_at));
                let answer = client
                    .ingest_hana_event(request)
                    .await
                    .map(tonic::Response::into_inner);
                let _ = queued.reply.send(answer);
            });
        }
        while calls.join_next().await.is_some() {}
    }
}

/// A call's answer from what the orchestrator said of it in a batch or on a stream; `None`
/// when it said nothing of the call.
pub(crate) fn call_answer(result: Option<IngestHanaEventResult>) -> Answer {
    match result.and_then(|result| result.result) {
        Some(CallResult::Stored(stored)) => Ok(stored),
        Some(CallResult::Failure(failure)) => {
            Err(Status::new(Code::from_i32(failure.code), failure.message))
        }
        None => Err(Status::internal(
            "the orchestrator's answer did not say what became of the call",
        )),
    }
}

/// What a call is made again from when the orchestrator refuses its batch or its stream ends
/// before it is answered: the body as received (a shared buffer, not a copy) and what the
/// webhook's handler added to it.
pub(crate) struct Resend {
    kind: i32,
    raw_body: Bytes,
    received_at: Option<prost_types::Timestamp>,
    traceparent: String,
}

impl Resend {
    pub(crate) fn of(call: &IngestHanaEventRequest) -> Self {
        Self {
            kind: call.kind,
            raw_body: call.raw_body.clone(),
            received_at: call.received_at,
            traceparent: call.traceparent.clone(),
        }
    }

    /// The call again, its body parsed again: parsing is a function of the body alone.
    pub(crate) fn into_call(self) -> IngestHanaEventRequest {
        hana_ingest_request(self.kind, self.raw_body, self.received_at, self.traceparent)
    }
}

/// When the longest waiting call of `batch` was queued.
fn oldest(batch: &[Queued]) -> Instant {
    batch
        .iter()
        .map(|queued| queued.queued_at)
        .min()
        .unwrap_or_else(Instant::now)
}

/// A call's deadline: the webhook's, less what waiting here already spent.
fn deadline(queued_at: Instant) -> Duration {
    INGEST_DEADLINE
        .saturating_sub(queued_at.elapsed())
        .max(MIN_DEADLINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_by_size_and_an_oversized_call_goes_alone() {
        let sizes = vec![MAX_BYTES / 2, MAX_BYTES / 2, 1, MAX_BYTES + 5, 10, 20];
        let parts = split_by_size(sizes, |size| *size);
        assert_eq!(
            parts,
            vec![
                vec![MAX_BYTES / 2, MAX_BYTES / 2],
                vec![1],
                vec![MAX_BYTES + 5],
                vec![10, 20],
            ]
        );
        assert!(split_by_size(Vec::<usize>::new(), |size| *size).is_empty());
    }
}
