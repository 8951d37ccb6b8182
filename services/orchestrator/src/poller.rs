//! The Pipedrive trigger poller: new deals and new activities, every
//! `LEADRELAY_PIPEDRIVE_POLL_INTERVAL`, fetched through the Pipedrive adapter (so within its
//! budget) and stored as Pipedrive events.
//!
//! Each stream keeps its watermark (the highest id stored) in the store, and each new record is
//! stored in the transaction that moves the watermark past it: a poller stopped at any point,
//! even killed, resumes after the last record it stored, missing nothing and repeating nothing.
//! On its first run a stream starts at the newest record without storing the ones before:
//! they are not new.
//!
//! Each store operation is given up after `STORE_DEADLINE` (15 s): a statement caught in flight
//! by a database host going silent fails the poll instead of holding the poll loop for the
//! system's TCP timeout (~15 min). The next poll starts at the stored watermark.

use std::time::Duration;

use leadrelay_proto::{
    json::to_proto_struct,
    pipedrive::v1::{
        Activity, Deal, ListNewActivitiesRequest, ListNewDealsRequest,
        pipedrive_adapter_service_client::PipedriveAdapterServiceClient,
    },
    v1::{IngestPipedriveEventRequest, PipedriveEventOrigin},
};
use leadrelay_runtime::propagation::{TracedChannel, connect_lazy, current_traceparent};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    ingest::IngestError,
    pipedrive_events::{Watermark, ingest_pipedrive, set_watermark, watermark},
    store::{STORE_DEADLINE, Store, StoreError},
};

/// Records asked for per call.
const PAGE: u32 = 100;

const SYSTEM: &str = "pipedrive";

/// A poll failed; the next one starts where this one stopped.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The Pipedrive adapter failed or refused (e.g. the budget is spent).
    #[error("the Pipedrive adapter failed: {0}")]
    Adapter(#[from] tonic::Status),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Storing an event failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The adapter URL is not a valid gRPC endpoint.
    #[error("the Pipedrive adapter URL {0} is not usable")]
    AdapterUrl(String),
    /// A stored watermark is not an id.
    #[error("the stored {0} watermark '{1}' is not an id")]
    Watermark(&'static str, String),
}

/// Where the poller finds Pipedrive and how often it looks.
#[derive(Clone, Debug)]
pub struct PollerSettings {
    /// The Pipedrive adapter's gRPC URL.
    pub adapter_url: url::Url,
    /// The polling interval.
    pub interval: Duration,
}

/// One new record, as an event.
struct Polled {
    id: i64,
    request: IngestPipedriveEventRequest,
}

fn rfc3339(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|at| {
        chrono::DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).unwrap_or(0))
    })
    .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    .unwrap_or_default()
}

fn event(entity: &str, id: i64, changed_at: &str, data: Value) -> IngestPipedriveEventRequest {
    IngestPipedriveEventRequest {
        origin: PipedriveEventOrigin::Poll.into(),
        event_key: format!("{entity}:{id}:{changed_at}"),
        entity: entity.to_owned(),
        action: "create".to_owned(),
        entity_id: id.to_string(),
        data: match data {
            Value::Object(fields) => Some(to_proto_struct(fields)),
            _ => None,
        },
        ..Default::default()
    }
}

fn deal_event(deal: &Deal) -> Polled {
    let changed_at = rfc3339(deal.update_time.as_ref().or(deal.add_time.as_ref()));
    let data = json!({
        "id": deal.id, "title": deal.title, "status": deal.status().as_str_name(),
        "person_id": deal.person_id, "pipeline_id": deal.pipeline_id, "stage_id": deal.stage_id,
        "value": deal.value, "currency": deal.currency, "update_time": changed_at,
    });
    Polled {
        id: deal.id,
        request: event("deal", deal.id, &changed_at, data),
    }
}

fn activity_event(activity: &Activity) -> Polled {
    let changed_at = rfc3339(activity.update_time.as_ref().or(activity.add_time.as_ref()));
    let data = json!({
        "id": activity.id, "subject": activity.subject, "type": activity.r#type,
        "deal_id": activity.deal_id, "person_id": activity.person_id, "done": activity.done,
        "due_date": activity.due_date, "note": activity.note, "update_time": changed_at,
    });
    Polled {
        id: activity.id,
        request: event("activity", activity.id, &changed_at, data),
    }
}

/// The streams the poller follows.
#[derive(Clone, Copy, Debug)]
enum Stream {
    Deals,
    Activities,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Self::Deals => "deals",
            Self::Activities => "activities",
        }
    }
}

/// Polls Pipedrive through its adapter.
#[derive(Clone, Debug)]
pub struct PipedrivePoller {
    store: Store,
    adapter: PipedriveAdapterServiceClient<TracedChannel>,
    /// One poll at a time (the timer's and TriggerPoll's), so a watermark only moves forward.
    running: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// How long one store operation may take (see [`STORE_DEADLINE`]).
    store_deadline: Duration,
}

impl PipedrivePoller {
    /// A poller over `store`, reaching the adapter at `adapter_url` (connected on first use).
    pub fn new(store: Store, adapter_url: &url::Url) -> Result<Self, PollError> {
        Ok(Self {
            store,
            adapter: PipedriveAdapterServiceClient::new(lazy_channel(adapter_url)?),
            running: std::sync::Arc::default(),
            store_deadline: STORE_DEADLINE,
        })
    }

    /// The same poller, giving a store operation up after `deadline` instead of
    /// [`STORE_DEADLINE`].
    #[cfg(test)]
    fn with_store_deadline(mut self, deadline: Duration) -> Self {
        self.store_deadline = deadline;
        self
    }

    /// Polls every stream once; returns how many new records were stored.
    pub async fn poll_once(&self) -> Result<u32, PollError> {
        let _running = self.running.lock().await;
        let mut stored = 0;
        for stream in [Stream::Deals, Stream::Activities] {
            stored += self.poll_stream(stream).await?;
        }
        Ok(stored)
    }

    async fn fetch(&self, stream: Stream, after_id: i64) -> Result<(Vec<Polled>, i64), PollError> {
        let mut adapter = self.adapter.clone();
        Ok(match stream {
            Stream::Deals => {
                let answer = adapter
                    .list_new_deals(ListNewDealsRequest {
                        after_id,
                        limit: PAGE,
                    })
                    .await?
                    .into_inner();
                (
                    answer.deals.iter().map(deal_event).collect(),
                    answer.next_after_id,
                )
            }
            Stream::Activities => {
                let answer = adapter
                    .list_new_activities(ListNewActivitiesRequest {
                        after_id,
                        limit: PAGE,
                    })
                    .await?
                    .into_inner();
                (
                    answer.activities.iter().map(activity_event).collect(),
                    answer.next_after_id,
                )
            }
        })
    }

    async fn poll_stream(&self, stream: Stream) -> Result<u32, PollError> {
        let name = stream.name();
        let Some(stored_at) = self
            .store
            .within(self.store_deadline, watermark(&self.store, SYSTEM, name))
            .await?
        else {
            // First run: start at the newest record.
            let (_, newest) = self.fetch(stream, 0).await?;
            let value = newest.to_string();
            let started = set_watermark(
                &self.store,
                Watermark {
                    system: SYSTEM,
                    stream: name,
                    value: &value,
                },
            );
            self.store.within(self.store_deadline, started).await?;
            tracing::info!(
                stream = name,
                watermark = newest,
                "pipedrive poller started its watermark"
            );
            return Ok(0);
        };
        let mut after_id: i64 = stored_at
            .parse()
            .map_err(|_| PollError::Watermark(name, stored_at.clone()))?;
        let mut stored = 0;
        loop {
            let (records, _) = self.fetch(stream, after_id).await?;
            let full_page = records.len() >= usize::try_from(PAGE).unwrap_or(usize::MAX);
            for record in records {
                let value = record.id.to_string();
                let traceparent = current_traceparent();
                let stored_record = ingest_pipedrive(
                    &self.store,
                    &record.request,
                    traceparent.as_deref(),
                    Some(Watermark {
                        system: SYSTEM,
                        stream: name,
                        value: &value,
                    }),
                );
                let outcome = self
                    .store
                    .within(self.store_deadline, stored_record)
                    .await?;
                after_id = after_id.max(record.id);
                if !outcome.duplicate {
                    stored += 1;
                }
            }
            if !full_page {
                return Ok(stored);
            }
        }
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        every(interval, shutdown, "pipedrive", || self.poll_once()).await;
    }
}

/// A channel to an adapter at `url`, connected on first use (the adapter may start later), that
/// hands the current trace on with every call.
pub(crate) fn lazy_channel(url: &url::Url) -> Result<TracedChannel, PollError> {
    connect_lazy(url).map_err(|error| PollError::AdapterUrl(format!("{url}: {error}")))
}

/// Runs `poll` every `interval` until `shutdown`; a failed poll is logged, and the next one
/// starts where it stopped.
pub(crate) async fn every<F, Fut>(
    interval: Duration,
    shutdown: CancellationToken,
    system: &'static str,
    mut poll: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u32, PollError>>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // One trace per poll: the events it stores and the jobs they queue continue it.
        let span = tracing::info_span!("poll", otel.name = %format_args!("poll {system}"), system);
        match poll().instrument(span).await {
            Ok(0) => {}
            Ok(stored) => tracing::info!(system, stored, "poll stored new events"),
            Err(error) => {
                tracing::warn!(system, %error, "poll failed; the next one starts where it stopped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::RelayedDatabase;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The adapter's address: nothing listens there, so a poll that gets past the store fails
    /// at the adapter.
    const NO_ADAPTER: &str = "http://127.0.0.1:9";

    /// A statement in flight when the database's host goes silent never gets its answer. The
    /// poll gives it up at the store deadline, and the next poll reaches the store again; without
    /// the deadline the poll waits for the system's TCP timeout (~15 min).
    #[tokio::test]
    async fn a_database_that_goes_silent_mid_statement_fails_the_poll_instead_of_holding_it()
    -> TestResult {
        let database = RelayedDatabase::create("poller_silence").await?;
        let stored = Watermark {
            system: SYSTEM,
            stream: Stream::Deals.name(),
            value: "5",
        };
        set_watermark(&database.direct, stored).await?;
        // Another session holds the watermarks: the poll's first statement waits in Postgres,
        // in flight, until the relay goes silent.
        let holder = database.hold("poll_watermarks").await?;
        let poller = PipedrivePoller::new(database.relayed.clone(), &NO_ADAPTER.parse()?)?
            .with_store_deadline(Duration::from_secs(1));
        let polled = database
            .silence_mid_statement(holder, "SELECT watermark", {
                let poller = poller.clone();
                async move { poller.poll_once().await }
            })
            .await?;
        assert!(
            matches!(polled, Err(PollError::Store(StoreError::Unanswered { .. }))),
            "{polled:?}"
        );

        // Once the database answers again, a poll reads its watermark and goes on to the
        // adapter, which is not there.
        database
            .restore_until(|| async {
                Ok(match poller.poll_once().await {
                    Err(PollError::Adapter(_)) => None,
                    other => Some(format!("the poll did not reach the adapter: {other:?}")),
                })
            })
            .await?;
        database.drop_database().await?;
        Ok(())
    }
}
