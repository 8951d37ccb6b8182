//! `leadrelay.v1.OrchestratorService`.

use leadrelay_proto::v1::{
    GetDealRequest, GetDealResponse, GetEventRequest, GetEventResponse, GetLeadRequest,
    GetLeadResponse, GetStatsRequest, GetStatsResponse, IngestHanaEventRequest,
    IngestHanaEventResponse, IngestPipedriveEventRequest, IngestPipedriveEventResponse,
    ListEventsRequest, ListEventsResponse, ListJobsRequest, ListJobsResponse,
    ListQuarantinedRequest, ListQuarantinedResponse, ReplayDeadLettersRequest,
    ReplayDeadLettersResponse, RetryJobRequest, RetryJobResponse, TriggerPollRequest,
    TriggerPollResponse, orchestrator_service_server::OrchestratorService,
};
use leadrelay_runtime::{adapter::not_implemented, pending_rpcs};
use tonic::{Request, Status};

use crate::store::Store;

/// The orchestrator's gRPC face.
#[derive(Clone, Debug)]
pub struct Orchestrator {
    store: Store,
}

impl Orchestrator {
    /// An orchestrator over an opened, migrated store.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The store this orchestrator owns.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn pending<T>(&self, request: &Request<T>) -> Status {
        not_implemented(request)
    }
}

pending_rpcs! {
    impl OrchestratorService for Orchestrator {
        ingest_hana_event(IngestHanaEventRequest) -> IngestHanaEventResponse;
        ingest_pipedrive_event(IngestPipedriveEventRequest) -> IngestPipedriveEventResponse;
        get_lead(GetLeadRequest) -> GetLeadResponse;
        get_deal(GetDealRequest) -> GetDealResponse;
        list_events(ListEventsRequest) -> ListEventsResponse;
        get_event(GetEventRequest) -> GetEventResponse;
        list_jobs(ListJobsRequest) -> ListJobsResponse;
        retry_job(RetryJobRequest) -> RetryJobResponse;
        replay_dead_letters(ReplayDeadLettersRequest) -> ReplayDeadLettersResponse;
        list_quarantined(ListQuarantinedRequest) -> ListQuarantinedResponse;
        get_stats(GetStatsRequest) -> GetStatsResponse;
        trigger_poll(TriggerPollRequest) -> TriggerPollResponse;
    }
}
