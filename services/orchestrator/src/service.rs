//! `leadrelay.v1.OrchestratorService`.

use leadrelay_proto::v1::{
    GetDealRequest, GetDealResponse, GetEventRequest, GetEventResponse, GetLeadRequest,
    GetLeadResponse, GetStatsRequest, GetStatsResponse, HanaEventKind, IngestFailure,
    IngestHanaEventRequest, IngestHanaEventResponse, IngestHanaEventResult,
    IngestHanaEventsRequest, IngestHanaEventsResponse, IngestHanaStreamRequest,
    IngestPipedriveEventRequest, IngestPipedriveEventResponse, ListEventsRequest,
    ListEventsResponse, ListJobsRequest, ListJobsResponse, ListQuarantinedRequest,
    ListQuarantinedResponse, ReplayDeadLettersRequest, ReplayDeadLettersResponse, RetryJobRequest,
    RetryJobResponse, System, TriggerPollRequest, TriggerPollResponse, get_deal_request,
    get_lead_request, ingest_hana_event_request, ingest_hana_event_result,
    orchestrator_service_server::OrchestratorService,
};
use leadrelay_runtime::propagation::{continue_trace, current_traceparent};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::{
    ingest::{
        HanaCall, IngestError, IngestOutcome, IngestPolicy, Ingester, millis, now_ms, timestamp,
    },
    queries::{self, EntityKey, Page},
    store::{Store, StoreError},
};

/// The orchestrator's gRPC face.
#[derive(Clone, Debug)]
pub struct Orchestrator {
    store: Store,
    ingester: Ingester,
    pipedrive_poller: Option<crate::poller::PipedrivePoller>,
    salesman_poller: Option<crate::salesman_poller::SalesManPoller>,
    /// Cancelled when the orchestrator shuts down: its IngestHanaStreams then end, which a
    /// server's graceful shutdown waits for.
    streams_end: CancellationToken,
}

impl Orchestrator {
    /// An orchestrator over an opened, migrated store; starts its ingest writer.
    pub fn new(store: Store, policy: IngestPolicy) -> Result<Self, StoreError> {
        let ingester = Ingester::start(store.clone(), policy)?;
        Ok(Self {
            store,
            ingester,
            pipedrive_poller: None,
            salesman_poller: None,
            streams_end: CancellationToken::new(),
        })
    }

    /// The orchestrator with its IngestHanaStreams ending once `shutdown` is cancelled: they
    /// never end by themselves, and a server shutting down waits for its open calls.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.streams_end = shutdown;
        self
    }

    /// The orchestrator with `poller` for TriggerPoll of SalesMan.
    #[must_use]
    pub fn with_salesman_poller(
        mut self,
        poller: Option<crate::salesman_poller::SalesManPoller>,
    ) -> Self {
        self.salesman_poller = poller;
        self
    }

    /// The orchestrator with `poller` for TriggerPoll of Pipedrive.
    #[must_use]
    pub fn with_pipedrive_poller(mut self, poller: Option<crate::poller::PipedrivePoller>) -> Self {
        self.pipedrive_poller = poller;
        self
    }

    /// The store this orchestrator owns.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// A failed poll as a status: the adapter's own status passes through (RESOURCE_EXHAUSTED keeps
/// its retry hint), prefixed so the caller knows it came from the poll.
fn poll_status(error: crate::poller::PollError) -> Status {
    match error {
        crate::poller::PollError::Adapter(status) => Status::with_details(
            status.code(),
            format!("the poll failed: {}", status.message()),
            status.details().to_vec().into(),
        ),
        crate::poller::PollError::Store(error) => store_status(&error),
        crate::poller::PollError::Ingest(error) => error.into(),
        other => Status::internal(other.to_string()),
    }
}

/// The one place store failures become gRPC statuses.
fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Corrupt(_) => Status::internal(error.to_string()),
        StoreError::CreateFolder { .. }
        | StoreError::Connect { .. }
        | StoreError::Migrate { .. }
        | StoreError::Query(_)
        | StoreError::Sqlite(_)
        | StoreError::Sync(_)
        | StoreError::Writer(_)
        | StoreError::Unanswered { .. } => {
            Status::unavailable(format!("the store is unavailable: {error}"))
        }
    }
}

impl From<IngestError> for Status {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Store(error) => store_status(&error),
            IngestError::Stopped | IngestError::Conflict | IngestError::ConnectionFailed(_) => {
                Status::unavailable(error.to_string())
            }
        }
    }
}

fn entity_key<K>(
    key: Option<K>,
    id_of: impl FnOnce(K) -> Result<EntityKey, Status>,
) -> Result<EntityKey, Status> {
    let key = key.ok_or_else(|| Status::invalid_argument("set `id` or `remote`"))?;
    id_of(key)
}

fn remote_key(remote: leadrelay_proto::v1::RemoteKey) -> Result<EntityKey, Status> {
    let system = System::try_from(remote.system).unwrap_or(System::Unspecified);
    if system == System::Unspecified || remote.remote_id.is_empty() {
        return Err(Status::invalid_argument(
            "`remote` needs a `system` (SYSTEM_HANA, SYSTEM_PIPEDRIVE, SYSTEM_SALESMAN) and a `remote_id`",
        ));
    }
    Ok(EntityKey::Remote {
        system,
        remote_id: remote.remote_id,
    })
}

/// A Hana call as ingest takes it, and the span its storing is recorded in: a child of the
/// call's own `traceparent` when it carries one (a call from a batch or a stream), else of the
/// current span (the RPC's, for a call on its own).
pub(crate) fn hana_call(request: IngestHanaEventRequest) -> (HanaCall, tracing::Span) {
    let body = match request.body {
        Some(ingest_hana_event_request::Body::Webhook(webhook)) => Ok(webhook),
        Some(ingest_hana_event_request::Body::Unparsed(unparsed)) => Err(unparsed.reason),
        None => Err("the call carried no body".to_owned()),
    };
    let received_at_ms = request.received_at.as_ref().map_or_else(now_ms, millis);
    let kind = HanaEventKind::try_from(request.kind).unwrap_or(HanaEventKind::Unspecified);
    let span = tracing::info_span!(
        "ingest",
        otel.name = "ingest hana event",
        event_kind = kind.as_str_name(),
        application_id = body
            .as_ref()
            .map_or("", |webhook| webhook.application_id.as_str()),
        event_id = tracing::field::Empty,
        duplicate = tracing::field::Empty,
        quarantined = tracing::field::Empty,
    );
    if !request.traceparent.is_empty() {
        continue_trace(&span, Some(&request.traceparent));
    }
    let call = HanaCall {
        kind,
        body,
        raw_body: request.raw_body,
        received_at_ms,
        // Saved with the event and its jobs: each job's run continues this trace.
        trace_context: span.in_scope(current_traceparent),
    };
    (call, span)
}

/// The answer for a stored Hana call, recorded in its span.
fn stored(span: &tracing::Span, outcome: IngestOutcome) -> IngestHanaEventResponse {
    record_outcome(
        span,
        &outcome.event_id,
        outcome.duplicate,
        outcome.quarantined,
    );
    tracing::debug!(parent: span, "hana event stored");
    IngestHanaEventResponse {
        event_id: outcome.event_id,
        duplicate: outcome.duplicate,
        quarantined: outcome.quarantined,
    }
}

/// What became of one call of a batch or a stream, recorded on its span.
pub(crate) fn call_result(
    span: &tracing::Span,
    outcome: Result<IngestOutcome, IngestError>,
) -> IngestHanaEventResult {
    IngestHanaEventResult {
        result: Some(match outcome {
            Ok(outcome) => ingest_hana_event_result::Result::Stored(stored(span, outcome)),
            Err(error) => {
                let status = Status::from(error);
                ingest_hana_event_result::Result::Failure(IngestFailure {
                    code: status.code().into(),
                    message: status.message().to_owned(),
                })
            }
        }),
    }
}

/// Records what became of an ingested event on its span.
fn record_outcome(span: &tracing::Span, event_id: &str, duplicate: bool, quarantined: bool) {
    span.record("event_id", event_id);
    span.record("duplicate", duplicate);
    span.record("quarantined", quarantined);
}

fn page(page_size: u32, page_token: &str) -> Result<Page, Status> {
    Page::parse(page_size, page_token).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl OrchestratorService for Orchestrator {
    async fn ingest_hana_event(
        &self,
        request: Request<IngestHanaEventRequest>,
    ) -> Result<Response<IngestHanaEventResponse>, Status> {
        let (call, span) = hana_call(request.into_inner());
        let outcome = self.ingester.ingest(call).await?;
        Ok(Response::new(stored(&span, outcome)))
    }

    async fn ingest_hana_events(
        &self,
        request: Request<IngestHanaEventsRequest>,
    ) -> Result<Response<IngestHanaEventsResponse>, Status> {
        let (calls, spans): (Vec<HanaCall>, Vec<tracing::Span>) = request
            .into_inner()
            .calls
            .into_iter()
            .map(hana_call)
            .unzip();
        let outcomes = self.ingester.ingest_all(calls).await;
        let results = outcomes
            .into_iter()
            .zip(&spans)
            .map(|(outcome, span)| call_result(span, outcome))
            .collect();
        Ok(Response::new(IngestHanaEventsResponse { results }))
    }

    type IngestHanaStreamStream = crate::hana_stream::Answers;

    async fn ingest_hana_stream(
        &self,
        request: Request<Streaming<IngestHanaStreamRequest>>,
    ) -> Result<Response<Self::IngestHanaStreamStream>, Status> {
        Ok(Response::new(crate::hana_stream::answer_calls(
            self.ingester.clone(),
            request.into_inner(),
            self.streams_end.clone(),
        )))
    }

    async fn ingest_pipedrive_event(
        &self,
        request: Request<IngestPipedriveEventRequest>,
    ) -> Result<Response<IngestPipedriveEventResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!(
            "ingest",
            otel.name = "ingest pipedrive event",
            event_id = tracing::field::Empty,
            duplicate = tracing::field::Empty,
            quarantined = tracing::field::Empty,
        );
        let outcome = async {
            let trace_context = current_traceparent();
            crate::pipedrive_events::ingest_pipedrive(
                &self.store,
                &request,
                trace_context.as_deref(),
                None,
            )
            .await
        }
        .instrument(span.clone())
        .await?;
        record_outcome(
            &span,
            &outcome.event_id,
            outcome.duplicate,
            outcome.quarantined,
        );
        tracing::debug!(parent: &span, "pipedrive event stored");
        Ok(Response::new(IngestPipedriveEventResponse {
            event_id: outcome.event_id,
            duplicate: outcome.duplicate,
            quarantined: outcome.quarantined,
        }))
    }

    async fn get_lead(
        &self,
        request: Request<GetLeadRequest>,
    ) -> Result<Response<GetLeadResponse>, Status> {
        let key = entity_key(request.into_inner().key, |key| match key {
            get_lead_request::Key::Id(id) => Ok(EntityKey::Id(id)),
            get_lead_request::Key::Remote(remote) => remote_key(remote),
        })?;
        let lead = queries::get_lead(self.store.pool(), &key)
            .await
            .map_err(|error| store_status(&error))?
            .ok_or_else(|| Status::not_found(format!("no lead {}", describe(&key))))?;
        Ok(Response::new(GetLeadResponse { lead: Some(lead) }))
    }

    async fn get_deal(
        &self,
        request: Request<GetDealRequest>,
    ) -> Result<Response<GetDealResponse>, Status> {
        let key = entity_key(request.into_inner().key, |key| match key {
            get_deal_request::Key::Id(id) => Ok(EntityKey::Id(id)),
            get_deal_request::Key::Remote(remote) => remote_key(remote),
        })?;
        let deal = queries::get_deal(self.store.pool(), &key)
            .await
            .map_err(|error| store_status(&error))?
            .ok_or_else(|| Status::not_found(format!("no deal {}", describe(&key))))?;
        Ok(Response::new(GetDealResponse { deal: Some(deal) }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let request = request.into_inner();
        let source = System::try_from(request.source).unwrap_or(System::Unspecified);
        let (events, next_page_token) = queries::list_events(
            self.store.pool(),
            source,
            page(request.page_size, &request.page_token)?,
        )
        .await
        .map_err(|error| store_status(&error))?;
        Ok(Response::new(ListEventsResponse {
            events,
            next_page_token,
        }))
    }

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<GetEventResponse>, Status> {
        let id = request.into_inner().id;
        let (event, jobs) = queries::get_event(self.store.pool(), &id)
            .await
            .map_err(|error| store_status(&error))?
            .ok_or_else(|| Status::not_found(format!("no event with id '{id}'")))?;
        Ok(Response::new(GetEventResponse {
            event: Some(event),
            jobs,
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let size = match request.page_size {
            0 => 50,
            size @ 1..=500 => i64::from(size),
            size => {
                return Err(Status::invalid_argument(format!(
                    "page_size {size} is out of range: 1 to 500, or 0 for 50"
                )));
            }
        };
        let after_seq = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                Status::invalid_argument("page_token is not one this server gave out")
            })?
        };
        let target = match request.target() {
            System::Unspecified => "",
            system => crate::routes::system_name(system),
        };
        let (jobs, next_page_token) = queries::list_jobs(
            self.store.pool(),
            queries::job_state_name(request.state()),
            target,
            size,
            after_seq,
        )
        .await
        .map_err(|error| store_status(&error))?;
        Ok(Response::new(ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn retry_job(
        &self,
        request: Request<RetryJobRequest>,
    ) -> Result<Response<RetryJobResponse>, Status> {
        let id = request.into_inner().id;
        match queries::retry_job(self.store.pool(), &id, now_ms())
            .await
            .map_err(|error| store_status(&error))?
        {
            Ok(job) => Ok(Response::new(RetryJobResponse { job: Some(job) })),
            Err(queries::RetryRefusal::NotFound) => Err(Status::not_found(format!("no job {id}"))),
            Err(queries::RetryRefusal::State(state)) => Err(Status::failed_precondition(format!(
                "job {id} is {state}: only a dead or waiting job can be retried"
            ))),
        }
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let target = match request.target() {
            System::Unspecified => "",
            system => crate::routes::system_name(system),
        };
        let replayed = queries::replay_dead_letters(
            self.store.pool(),
            target,
            i64::from(request.limit),
            now_ms(),
        )
        .await
        .map_err(|error| store_status(&error))?;
        Ok(Response::new(ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
        }))
    }

    async fn list_quarantined(
        &self,
        request: Request<ListQuarantinedRequest>,
    ) -> Result<Response<ListQuarantinedResponse>, Status> {
        let request = request.into_inner();
        let (calls, next_page_token) = queries::list_quarantined(
            self.store.pool(),
            page(request.page_size, &request.page_token)?,
        )
        .await
        .map_err(|error| store_status(&error))?;
        Ok(Response::new(ListQuarantinedResponse {
            calls,
            next_page_token,
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let stats = queries::stats(self.store.pool())
            .await
            .map_err(|error| store_status(&error))?;
        Ok(Response::new(GetStatsResponse {
            events_total: stats.events,
            duplicates_total: stats.duplicates,
            quarantined_total: stats.quarantined,
            jobs: stats.jobs,
            oldest_pending_job_created_at: stats.oldest_pending_ms.map(timestamp),
        }))
    }

    async fn trigger_poll(
        &self,
        request: Request<TriggerPollRequest>,
    ) -> Result<Response<TriggerPollResponse>, Status> {
        match request.get_ref().system() {
            System::Pipedrive => {
                let poller = self.pipedrive_poller.as_ref().ok_or_else(|| {
                    Status::failed_precondition(
                        "Pipedrive is not configured: set LEADRELAY_PIPEDRIVE_API_TOKEN",
                    )
                })?;
                let events_stored = poller.poll_once().await.map_err(poll_status)?;
                Ok(Response::new(TriggerPollResponse {
                    events_stored,
                    polled_at: Some(timestamp(now_ms())),
                }))
            }
            System::Salesman => {
                let poller = self.salesman_poller.as_ref().ok_or_else(|| {
                    Status::failed_precondition(
                        "SalesMan is not configured: set LEADRELAY_SALESMAN_API_URL, LEADRELAY_SALESMAN_LOGIN and LEADRELAY_SALESMAN_API_KEY",
                    )
                })?;
                let events_stored = poller.poll_once().await.map_err(poll_status)?;
                Ok(Response::new(TriggerPollResponse {
                    events_stored,
                    polled_at: Some(timestamp(now_ms())),
                }))
            }
            System::Hana | System::Unspecified => Err(Status::invalid_argument(
                "`system` must be SYSTEM_PIPEDRIVE or SYSTEM_SALESMAN: only CRMs are polled",
            )),
        }
    }
}

fn describe(key: &EntityKey) -> String {
    match key {
        EntityKey::Id(id) => format!("with id '{id}'"),
        EntityKey::Remote { system, remote_id } => {
            format!("linked to {} id '{remote_id}'", system.as_str_name())
        }
    }
}
