//! Graceful shutdown: the first SIGINT or SIGTERM asks every server and worker to drain; a second
//! one exits at once.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// How long servers may take to finish in-flight calls after a stop signal, and to see clients
/// close their connections. Kubernetes gives a pod 30 s by default; LeadRelay stops inside the 5 s
/// operators expect even when a client ignores the server's GOAWAY. Work cut off here is not lost:
/// nothing is acknowledged before it is committed, and jobs are retried.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits for SIGINT or SIGTERM and returns the signal's name.
pub async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            },
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the process");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Returns a token cancelled by the first stop signal; a second signal exits the process at once
/// with code 130.
pub fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(
            signal,
            drain_timeout_s = DRAIN_TIMEOUT.as_secs(),
            "stopping: draining in-flight calls"
        );
        cancel.cancel();
        let signal = wait_for_signal().await;
        tracing::warn!(signal, "second stop signal: exiting without draining");
        std::process::exit(130);
    });
    token
}

/// Runs a server future that stops by itself once `shutdown` is cancelled, but gives it at most
/// [`DRAIN_TIMEOUT`] from then on. Returns `None` when the drain was cut short.
pub async fn drain_bounded<F: Future>(
    server: F,
    shutdown: &CancellationToken,
    service: &'static str,
) -> Option<F::Output> {
    tokio::select! {
        output = server => Some(output),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!(service, "in-flight calls did not finish in time; closing them");
            None
        }
    }
}
