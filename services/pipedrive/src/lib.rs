//! The Pipedrive adapter: Pipedrive API v2 behind `leadrelay.pipedrive.v1.PipedriveAdapterService`
//! (the connector's whole operation set) and the canonical `leadrelay.v1.CrmSyncService`.

pub mod adapter;
pub mod client;
pub mod pacing;
pub mod sync;
pub mod wire;

use std::sync::Arc;

use leadrelay_proto::{
    pipedrive::v1::pipedrive_adapter_service_server::PipedriveAdapterServiceServer, service_names,
    v1::crm_sync_service_server::CrmSyncServiceServer,
};
use leadrelay_runtime::{
    Settings,
    adapter::Credentials,
    grpc::{GrpcServer, GrpcServerError},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use self::client::PipedriveError;
pub use self::{
    adapter::{PipedriveAdapter, PipedriveApi},
    sync::PipedriveSync,
};

impl PipedriveAdapter {
    /// The adapter for the Pipedrive settings; without an API token every RPC answers
    /// FAILED_PRECONDITION naming `LEADRELAY_PIPEDRIVE_API_TOKEN`.
    pub fn from_settings(settings: &Settings) -> Result<Self, PipedriveError> {
        let api = PipedriveApi::from_settings(settings)?.map(Arc::new);
        Ok(Self::new(
            Credentials::new("Pipedrive", settings.pipedrive_missing()),
            api,
        ))
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = PipedriveSync::new(self.credentials().clone(), self.api_handle());
        Routes::new(PipedriveAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }
}

/// The Pipedrive adapter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP client could not be built from the settings.
    #[error("cannot set up the Pipedrive client: {0}")]
    Client(#[from] PipedriveError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcServerError),
}

/// Serves the Pipedrive adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let adapter = PipedriveAdapter::from_settings(settings)?;
    GrpcServer::new(
        "pipedrive-adapter",
        adapter.routes(),
        &[service_names::PIPEDRIVE_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await?;
    Ok(())
}
