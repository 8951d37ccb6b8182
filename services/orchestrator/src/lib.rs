//! The orchestrator: owns the durable store, ingests events, plans and runs sync jobs and serves
//! the admin API (`leadrelay.v1.OrchestratorService`).

mod entity;
pub mod ingest;
pub mod mapping;
pub mod pipedrive_events;
pub mod queries;
pub mod routes;
pub mod service;
pub mod store;

use leadrelay_proto::{service_names, v1::orchestrator_service_server::OrchestratorServiceServer};
use leadrelay_runtime::{Settings, grpc::GrpcServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use ingest::IngestPolicy;
pub use service::Orchestrator;
pub use store::{Store, StoreError};

/// The orchestrator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// The store could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] leadrelay_runtime::grpc::GrpcServerError),
}

/// Opens and migrates the store named by the settings.
pub async fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    let store = Store::connect(&settings.database_url).await?;
    store.migrate().await?;
    Ok(store)
}

/// What ingest accepts, from the settings.
pub fn ingest_policy(settings: &Settings) -> IngestPolicy {
    IngestPolicy {
        hana_application_ids: settings.hana.application_ids.clone(),
    }
}

/// Serves the orchestrator on `listener` with an opened store until `shutdown` is cancelled.
pub async fn serve(
    store: Store,
    policy: IngestPolicy,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), OrchestratorError> {
    let orchestrator = Orchestrator::new(store.clone(), policy)?;
    let routes = Routes::new(OrchestratorServiceServer::new(orchestrator));
    let result = GrpcServer::new("orchestrator", routes, &[service_names::ORCHESTRATOR])
        .serve(listener, shutdown)
        .await;
    store.close().await;
    Ok(result?)
}
