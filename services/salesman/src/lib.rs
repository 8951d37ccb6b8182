//! The SalesMan adapter: SalesMan's leads API v1 behind `leadrelay.salesman.v1.SalesManAdapterService`
//! and the canonical `leadrelay.v1.CrmSyncService`.

use std::pin::Pin;

use leadrelay_proto::{
    salesman::v1::{
        AddLeadRequest, AddLeadResponse, GetLeadRequest, GetLeadResponse, GetLeadStatsRequest,
        GetLeadStatsResponse, ListLeadsRequest, ListLeadsResponse,
        sales_man_adapter_service_server::{SalesManAdapterService, SalesManAdapterServiceServer},
    },
    service_names,
    v1::{System, crm_sync_service_server::CrmSyncServiceServer},
};
use leadrelay_runtime::{
    Settings,
    adapter::{Credentials, PendingCrmSync, pending_adapter_rpc},
    grpc::{GrpcServer, GrpcServerError},
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, service::Routes};

/// SalesMan's native gRPC face.
#[derive(Clone, Debug)]
pub struct SalesManAdapter {
    credentials: Credentials,
}

impl SalesManAdapter {
    /// The adapter for the SalesMan settings; without URL, login and API key every RPC answers
    /// FAILED_PRECONDITION naming what to set.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            credentials: Credentials::new("SalesMan", settings.salesman_missing()),
        }
    }

    /// Whether URL, login and API key are set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = PendingCrmSync::new(System::Salesman, self.credentials.clone());
        Routes::new(SalesManAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }

    fn pending<T>(&self, request: &Request<T>) -> Status {
        pending_adapter_rpc(&self.credentials, request)
    }
}

/// The stream `ListLeads` answers with.
pub type LeadStream = Pin<Box<dyn Stream<Item = Result<ListLeadsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SalesManAdapterService for SalesManAdapter {
    type ListLeadsStream = LeadStream;

    async fn add_lead(
        &self,
        request: Request<AddLeadRequest>,
    ) -> Result<Response<AddLeadResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn get_lead(
        &self,
        request: Request<GetLeadRequest>,
    ) -> Result<Response<GetLeadResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn list_leads(
        &self,
        request: Request<ListLeadsRequest>,
    ) -> Result<Response<Self::ListLeadsStream>, Status> {
        Err(self.pending(&request))
    }

    async fn get_lead_stats(
        &self,
        request: Request<GetLeadStatsRequest>,
    ) -> Result<Response<GetLeadStatsResponse>, Status> {
        Err(self.pending(&request))
    }
}

/// Serves the SalesMan adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GrpcServerError> {
    let adapter = SalesManAdapter::from_settings(settings);
    GrpcServer::new(
        "salesman-adapter",
        adapter.routes(),
        &[service_names::SALESMAN_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await
}
