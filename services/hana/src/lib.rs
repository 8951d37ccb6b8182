//! The Hana adapter: Hana's update API (partner → Hana) behind `leadrelay.hana.v1.HanaAdapterService`
//! and the canonical `leadrelay.v1.CrmSyncService` (write-back of remote ids and status changes).

use leadrelay_proto::{
    hana::v1::{
        UpdateLeadRequest, UpdateLeadResponse, UpdateOpportunityRequest, UpdateOpportunityResponse,
        hana_adapter_service_server::{HanaAdapterService, HanaAdapterServiceServer},
    },
    service_names,
    v1::{System, crm_sync_service_server::CrmSyncServiceServer},
};
use leadrelay_runtime::{
    Settings,
    adapter::{Credentials, PendingCrmSync, pending_adapter_rpc},
    grpc::{GrpcServer, GrpcServerError},
    pending_rpcs,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, service::Routes};

/// Hana's native gRPC face.
#[derive(Clone, Debug)]
pub struct HanaAdapter {
    credentials: Credentials,
}

impl HanaAdapter {
    /// The adapter for the Hana settings; without an API URL and access token, write-back is off
    /// and every RPC answers FAILED_PRECONDITION naming what to set.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            credentials: Credentials::new("Hana write-back", settings.hana_missing()),
        }
    }

    /// Whether the update API's URL and token are set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = PendingCrmSync::new(System::Hana, self.credentials.clone());
        Routes::new(HanaAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }

    fn pending<T>(&self, request: &Request<T>) -> Status {
        pending_adapter_rpc(&self.credentials, request)
    }
}

pending_rpcs! {
    impl HanaAdapterService for HanaAdapter {
        update_lead(UpdateLeadRequest) -> UpdateLeadResponse;
        update_opportunity(UpdateOpportunityRequest) -> UpdateOpportunityResponse;
    }
}

/// Serves the Hana adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GrpcServerError> {
    let adapter = HanaAdapter::from_settings(settings);
    GrpcServer::new(
        "hana-adapter",
        adapter.routes(),
        &[service_names::HANA_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await
}
