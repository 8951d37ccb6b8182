//! `leadrelay up`: all five services in one process, each on its own port, talking real gRPC over
//! loopback, with the store opened (and migrated) before anything is announced.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use leadrelay_runtime::{
    Settings,
    config::{DatabaseUrl, loopback_url},
    shutdown::{DRAIN_TIMEOUT, cancel_on_signal},
};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinSet;

use crate::services::bind;

/// Where the generated webhook token is kept, beside the SQLite file, so the URL configured in
/// Hana keeps working across restarts.
const TOKEN_FILE: &str = "hana-webhook-token";

/// Runs every service until a stop signal or until one of them fails.
pub(crate) async fn run(mut settings: Settings) -> anyhow::Result<()> {
    // First, so that a stop signal during start-up is a clean stop too.
    let shutdown = cancel_on_signal();
    let listen = settings.listen;
    let gateway = bind("LEADRELAY_GATEWAY_LISTEN", listen.gateway).await?;
    let orchestrator = bind("LEADRELAY_ORCHESTRATOR_LISTEN", listen.orchestrator).await?;
    let hana = bind("LEADRELAY_HANA_LISTEN", listen.hana).await?;
    let pipedrive = bind("LEADRELAY_PIPEDRIVE_LISTEN", listen.pipedrive).await?;
    let salesman = bind("LEADRELAY_SALESMAN_LISTEN", listen.salesman).await?;
    let metrics = bind("LEADRELAY_METRICS_LISTEN", listen.metrics).await?;
    let bound = Bound {
        metrics: metrics.local_addr()?,
        gateway: gateway.local_addr()?,
        orchestrator: orchestrator.local_addr()?,
        hana: hana.local_addr()?,
        pipedrive: pipedrive.local_addr()?,
        salesman: salesman.local_addr()?,
    };

    // In one process the peers are always the listeners just bound.
    settings.peers.orchestrator = loopback_url(bound.orchestrator).parse()?;
    settings.peers.hana_adapter = loopback_url(bound.hana).parse()?;
    settings.peers.pipedrive_adapter = loopback_url(bound.pipedrive).parse()?;
    settings.peers.salesman_adapter = loopback_url(bound.salesman).parse()?;
    let token_origin = match settings.hana.webhook_token {
        Some(_) => TokenOrigin::Environment,
        None => {
            let path = data_folder(&settings.database_url).join(TOKEN_FILE);
            let (token, origin) = load_or_create_token(&path)?;
            settings.hana.webhook_token = Some(token);
            origin
        }
    };

    let gateway_config = leadrelay_gateway::GatewayConfig::from_settings(&settings)?;
    let store = leadrelay_orchestrator::open_store(&settings).await?;
    let policy = leadrelay_orchestrator::ingest_policy(&settings);
    let pollers = leadrelay_orchestrator::pollers(&settings);
    let database = store.database().to_owned();
    let mut services: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    {
        let shutdown = shutdown.clone();
        services.spawn(async move {
            let result =
                leadrelay_orchestrator::serve(store, policy, pollers, orchestrator, shutdown).await;
            ("orchestrator", result.map_err(anyhow::Error::from))
        });
    }
    {
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        services.spawn(async move {
            let result = leadrelay_hana::serve(&settings, hana, shutdown).await;
            ("hana-adapter", result.map_err(anyhow::Error::from))
        });
    }
    {
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        services.spawn(async move {
            let result = leadrelay_pipedrive::serve(&settings, pipedrive, shutdown).await;
            ("pipedrive-adapter", result.map_err(anyhow::Error::from))
        });
    }
    {
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        services.spawn(async move {
            let result = leadrelay_salesman::serve(&settings, salesman, shutdown).await;
            ("salesman-adapter", result.map_err(anyhow::Error::from))
        });
    }
    {
        let shutdown = shutdown.clone();
        services.spawn(async move {
            let result = leadrelay_gateway::serve(gateway_config, gateway, shutdown).await;
            ("gateway", result.map_err(anyhow::Error::from))
        });
    }
    {
        let shutdown = shutdown.clone();
        services.spawn(async move {
            let result = leadrelay_runtime::metrics::serve(metrics, shutdown).await;
            ("metrics", result.map_err(anyhow::Error::from))
        });
    }

    print_banner(&settings, &bound, &database, token_origin);

    // Any service ending on its own, before a stop signal, is a failure: stop the others and
    // report it. A service that ends because a stop signal has just arrived is not.
    let failure = tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        joined = services.join_next() => match joined {
            Some(Ok((_, Ok(())))) if shutdown.is_cancelled() => None,
            Some(Ok((name, result))) => {
                let error = result.err().unwrap_or_else(|| anyhow::anyhow!("stopped unexpectedly"));
                Some(error.context(format!("{name} failed")))
            }
            Some(Err(panic)) => Some(anyhow::Error::new(panic).context("a service task panicked")),
            None => None,
        },
    };
    shutdown.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_millis(500), async {
        while let Some(joined) = services.join_next().await {
            if let Ok((name, Err(error))) = joined {
                tracing::warn!(service = name, error = %format!("{error:#}"), "service stopped with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some services did not stop in time; exiting anyway");
    }
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("all services stopped");
            Ok(())
        }
    }
}

/// The addresses actually bound (a configured port 0 becomes a real one).
struct Bound {
    metrics: SocketAddr,
    gateway: SocketAddr,
    orchestrator: SocketAddr,
    hana: SocketAddr,
    pipedrive: SocketAddr,
    salesman: SocketAddr,
}

/// Where the Hana webhook token came from, which decides whether the banner may show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenOrigin {
    Environment,
    Generated,
    Loaded,
}

/// The folder holding the SQLite file, or `./data` with Postgres.
fn data_folder(database: &DatabaseUrl) -> PathBuf {
    match database {
        DatabaseUrl::Sqlite { path } => match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        },
        DatabaseUrl::Postgres { .. } => PathBuf::from("data"),
    }
}

/// Reads the token kept at `path`, or generates one and keeps it there (owner-only permissions).
fn load_or_create_token(path: &Path) -> anyhow::Result<(SecretString, TokenOrigin)> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => {
            return Ok((
                SecretString::from(text.trim().to_owned()),
                TokenOrigin::Loaded,
            ));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot read the webhook token at {}", path.display()));
        }
    }
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = bytes
        .iter()
        .fold(String::with_capacity(64), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        });
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write the webhook token to {}", path.display()))?;
    writeln!(file, "{token}")?;
    Ok((SecretString::from(token), TokenOrigin::Generated))
}

/// `host:port` a client on this machine dials: a wildcard bind is reached over loopback.
fn reachable(addr: SocketAddr) -> String {
    loopback_url(addr).trim_start_matches("http://").to_owned()
}

fn print_banner(settings: &Settings, bound: &Bound, database: &str, token_origin: TokenOrigin) {
    let adapter_note = |missing: Vec<&'static str>| {
        if missing.is_empty() {
            "configured".to_owned()
        } else {
            format!("off until {} set", missing.join(", "))
        }
    };
    let gateway_url = loopback_url(bound.gateway);
    let token = match (token_origin, &settings.hana.webhook_token) {
        (TokenOrigin::Environment, _) | (_, None) => "$LEADRELAY_HANA_WEBHOOK_TOKEN".to_owned(),
        (_, Some(token)) => token.expose_secret().to_owned(),
    };
    let token_note = match token_origin {
        TokenOrigin::Environment => "from LEADRELAY_HANA_WEBHOOK_TOKEN",
        TokenOrigin::Generated => "generated now and kept beside the database",
        TokenOrigin::Loaded => "kept beside the database since the first run",
    };
    let mut banner = String::new();
    let _ = writeln!(banner, "LeadRelay is up. Store: {database}");
    let _ = writeln!(banner, "  gateway            {gateway_url}  (HTTP)");
    let _ = writeln!(
        banner,
        "  orchestrator       {}  (gRPC)",
        reachable(bound.orchestrator)
    );
    let _ = writeln!(
        banner,
        "  hana-adapter       {}  (gRPC, {})",
        reachable(bound.hana),
        adapter_note(settings.hana_missing())
    );
    let _ = writeln!(
        banner,
        "  pipedrive-adapter  {}  (gRPC, {})",
        reachable(bound.pipedrive),
        adapter_note(settings.pipedrive_missing())
    );
    let _ = writeln!(
        banner,
        "  salesman-adapter   {}  (gRPC, {})",
        reachable(bound.salesman),
        adapter_note(settings.salesman_missing())
    );
    let _ = writeln!(
        banner,
        "  metrics            {}  (HTTP, GET /metrics)",
        loopback_url(bound.metrics)
    );
    let _ = writeln!(banner, "Hana webhook URL ({token_note}):");
    let _ = writeln!(
        banner,
        "  {gateway_url}/webhooks/hana/{{event}}?token={token}"
    );
    let _ = writeln!(
        banner,
        "  {{event}}: lead.created lead.updated lead.deleted opportunity.created opportunity.updated opportunity.deleted"
    );
    let _ = writeln!(banner, "Stop with Ctrl-C or SIGTERM.");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(banner.as_bytes());
    let _ = stdout.flush();
}
