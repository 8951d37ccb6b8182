//! Graceful shutdown: the first SIGINT or SIGTERM asks every server and worker to drain; a second
//! one exits at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long servers may take to finish in-flight calls after a stop signal. Kubernetes gives a pod
/// 30 s by default; LeadRelay stops well inside that, and inside the 5 s operators expect.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

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
