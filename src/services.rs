//! Running one service per process (the Kubernetes shape).

use std::net::SocketAddr;

use anyhow::Context;
use leadrelay_gateway::GatewayConfig;
use leadrelay_runtime::{ConfigError, Settings, shutdown::cancel_on_signal};
use tokio::net::TcpListener;

/// A service run on its own by a subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServiceKind {
    Gateway,
    Orchestrator,
    HanaAdapter,
    PipedriveAdapter,
    SalesmanAdapter,
    /// Not a service: applies migrations and exits.
    Migrate,
}

impl ServiceKind {
    /// The name the service reports in logs and traces.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Orchestrator => "orchestrator",
            Self::HanaAdapter => "hana-adapter",
            Self::PipedriveAdapter => "pipedrive-adapter",
            Self::SalesmanAdapter => "salesman-adapter",
            Self::Migrate => "migrate",
        }
    }

    /// Checks what this service needs beyond the common settings, before anything starts.
    pub(crate) fn preflight(self, settings: &Settings) -> Result<(), ConfigError> {
        if self == Self::Gateway {
            GatewayConfig::from_settings(settings)?;
        }
        Ok(())
    }

    /// Runs the service until a stop signal, or the migration once.
    pub(crate) async fn run(self, settings: Settings) -> anyhow::Result<()> {
        let shutdown = cancel_on_signal();
        let listen = settings.listen;
        if self != Self::Migrate {
            // Every service process serves its own metrics; a port it cannot take stops it.
            let metrics = bind("LEADRELAY_METRICS_LISTEN", listen.metrics).await?;
            tokio::spawn(leadrelay_runtime::metrics::serve(metrics, shutdown.clone()));
        }
        match self {
            Self::Migrate => {
                let store = leadrelay_orchestrator::Store::connect(&settings.database_url).await?;
                let report = store.migrate().await?;
                println!(
                    "applied {} migration(s); {} is at schema version {}",
                    report.applied,
                    store.database(),
                    report.version
                );
                store.close().await;
            }
            Self::Gateway => {
                let config = GatewayConfig::from_settings(&settings)?;
                let listener = bind("LEADRELAY_GATEWAY_LISTEN", listen.gateway).await?;
                leadrelay_gateway::serve(config, listener, shutdown).await?;
            }
            Self::Orchestrator => {
                let listener = bind("LEADRELAY_ORCHESTRATOR_LISTEN", listen.orchestrator).await?;
                let store = leadrelay_orchestrator::open_store(&settings).await?;
                let policy = leadrelay_orchestrator::ingest_policy(&settings);
                let pollers = leadrelay_orchestrator::pollers(&settings);
                leadrelay_orchestrator::serve(store, policy, pollers, listener, shutdown).await?;
            }
            Self::HanaAdapter => {
                let listener = bind("LEADRELAY_HANA_LISTEN", listen.hana).await?;
                leadrelay_hana::serve(&settings, listener, shutdown).await?;
            }
            Self::PipedriveAdapter => {
                let listener = bind("LEADRELAY_PIPEDRIVE_LISTEN", listen.pipedrive).await?;
                leadrelay_pipedrive::serve(&settings, listener, shutdown).await?;
            }
            Self::SalesmanAdapter => {
                let listener = bind("LEADRELAY_SALESMAN_LISTEN", listen.salesman).await?;
                leadrelay_salesman::serve(&settings, listener, shutdown).await?;
            }
        }
        Ok(())
    }
}

/// Binds a listener, naming the variable that chose the address when it cannot.
pub(crate) async fn bind(variable: &'static str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{variable}: cannot listen on {addr}"))
}
