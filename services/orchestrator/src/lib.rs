//! The orchestrator: owns the durable store, ingests events, plans and runs sync jobs and serves
//! the admin API (`leadrelay.v1.OrchestratorService`).

mod entity;
mod hana_stream;
pub mod ingest;
pub mod mapping;
pub mod pipedrive_events;
pub mod poller;
pub mod queries;
pub mod routes;
pub mod runner;
pub mod salesman_poller;
pub mod service;
pub mod store;

use leadrelay_proto::{service_names, v1::orchestrator_service_server::OrchestratorServiceServer};
use leadrelay_runtime::{Settings, grpc::GrpcServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use ingest::IngestPolicy;
pub use poller::{PipedrivePoller, PollerSettings};
pub use salesman_poller::SalesManPoller;
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
    /// The Pipedrive poller could not be set up.
    #[error(transparent)]
    Poller(#[from] poller::PollError),
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
        routes: settings.routes.clone(),
    }
}

/// The work the orchestrator does besides answering RPCs: the trigger pollers, and the job
/// runner's targets. Each is off while its system is not configured.
#[derive(Clone, Debug, Default)]
pub struct Pollers {
    /// New Pipedrive deals and activities.
    pub pipedrive: Option<PollerSettings>,
    /// SalesMan lead status changes.
    pub salesman: Option<PollerSettings>,
    /// The adapters sync jobs are run against, by system; jobs for other systems wait.
    pub sync_targets: Vec<(leadrelay_proto::v1::System, url::Url)>,
    /// How long a claimed job may run before another runner takes it again.
    pub job_lease: std::time::Duration,
}

/// The pollers and sync targets the settings configure.
pub fn pollers(settings: &Settings) -> Pollers {
    use leadrelay_proto::v1::System;
    let mut sync_targets = Vec::new();
    if settings.pipedrive_missing().is_empty() {
        sync_targets.push((System::Pipedrive, settings.peers.pipedrive_adapter.clone()));
    }
    if settings.salesman_missing().is_empty() {
        sync_targets.push((System::Salesman, settings.peers.salesman_adapter.clone()));
    }
    if settings.hana_missing().is_empty() {
        sync_targets.push((System::Hana, settings.peers.hana_adapter.clone()));
    }
    Pollers {
        sync_targets,
        job_lease: settings.job_lease,
        pipedrive: settings
            .pipedrive_missing()
            .is_empty()
            .then(|| PollerSettings {
                adapter_url: settings.peers.pipedrive_adapter.clone(),
                interval: settings.pipedrive.poll_interval,
            }),
        salesman: settings
            .salesman_missing()
            .is_empty()
            .then(|| PollerSettings {
                adapter_url: settings.peers.salesman_adapter.clone(),
                interval: settings.salesman.poll_interval,
            }),
    }
}

/// Reads the outstanding jobs by target and state, and the age of the oldest pending job of each
/// target in `run_targets`, from the store before each metrics scrape. Jobs for a system this
/// orchestrator does not run wait until it is configured: they are counted, but their age is no
/// lag to alert on.
fn register_job_gauges(store: &Store, run_targets: Vec<&'static str>) {
    let store = store.clone();
    leadrelay_runtime::metrics::metrics().on_scrape(move || {
        let store = store.clone();
        let run_targets = run_targets.clone();
        async move {
            let read = async {
                Ok::<_, StoreError>((
                    queries::outstanding_job_counts(store.pool()).await?,
                    queries::oldest_pending_by_target(store.pool()).await?,
                ))
            };
            let (jobs, oldest) = match read.await {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(%error, "could not read the job counts for the metrics");
                    return;
                }
            };
            let metrics = leadrelay_runtime::metrics::metrics();
            metrics.set_job_counts(jobs.iter().map(|count| {
                (
                    routes::system_name(count.target()),
                    queries::job_state_name(count.state()),
                    i64::try_from(count.count).unwrap_or(i64::MAX),
                )
            }));
            let now = ingest::now_ms();
            metrics.set_oldest_pending_ages(run_targets.iter().map(|target| {
                let created = oldest
                    .iter()
                    .find(|(pending, _)| pending == target)
                    .map(|(_, created)| *created);
                let age_ms = created.map_or(0, |created| now.saturating_sub(created));
                (
                    *target,
                    std::time::Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
                )
            }));
        }
    });
}

/// Serves the orchestrator on `listener` with an opened store until `shutdown` is cancelled,
/// running the configured `pollers`.
pub async fn serve(
    store: Store,
    policy: IngestPolicy,
    pollers: Pollers,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), OrchestratorError> {
    let pipedrive = pollers
        .pipedrive
        .map(|settings| {
            PipedrivePoller::new(store.clone(), &settings.adapter_url)
                .map(|poller| (poller, settings.interval))
        })
        .transpose()?;
    let salesman = pollers
        .salesman
        .map(|settings| {
            SalesManPoller::new(store.clone(), &settings.adapter_url)
                .map(|poller| (poller, settings.interval))
        })
        .transpose()?;
    register_job_gauges(
        &store,
        pollers
            .sync_targets
            .iter()
            .map(|(system, _)| routes::system_name(*system))
            .collect(),
    );
    let orchestrator = Orchestrator::new(store.clone(), policy)?
        .with_pipedrive_poller(pipedrive.as_ref().map(|(poller, _)| poller.clone()))
        .with_salesman_poller(salesman.as_ref().map(|(poller, _)| poller.clone()))
        .with_shutdown(shutdown.clone());
    if let Some((poller, interval)) = pipedrive {
        tokio::spawn(poller.run(interval, shutdown.clone()));
    }
    if let Some((poller, interval)) = salesman {
        tokio::spawn(poller.run(interval, shutdown.clone()));
    }
    if !pollers.sync_targets.is_empty() {
        let runner = runner::JobRunner::new(store.clone(), &pollers.sync_targets)?
            .with_lease(pollers.job_lease);
        tokio::spawn(runner.run(shutdown.clone()));
    }
    let routes = Routes::new(OrchestratorServiceServer::new(orchestrator));
    let result = GrpcServer::new("orchestrator", routes, &[service_names::ORCHESTRATOR])
        .serve(listener, shutdown)
        .await;
    store.close().await;
    Ok(result?)
}
