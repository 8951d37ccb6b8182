//! The Pipedrive adapter served over real gRPC on a random port, configured the way an operator
//! configures it, against a fake Pipedrive.

use std::collections::HashMap;

use leadrelay_runtime::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use wiremock::MockServer;

/// Starts the adapter against `fake` with `token` and budget `rate_limit`; returns a channel to
/// it and the token that stops it.
pub(crate) async fn serve(
    fake: &MockServer,
    token: &str,
    rate_limit: &str,
) -> (Channel, CancellationToken) {
    serve_with(fake, token, rate_limit, &[]).await
}

/// [`serve`] with more settings, as `(variable, value)`.
pub(crate) async fn serve_with(
    fake: &MockServer,
    token: &str,
    rate_limit: &str,
    more: &[(&'static str, &str)],
) -> (Channel, CancellationToken) {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("LEADRELAY_PIPEDRIVE_API_URL", fake.uri()),
        ("LEADRELAY_PIPEDRIVE_API_TOKEN", token.to_owned()),
        (
            "LEADRELAY_PIPEDRIVE_WEBHOOK_USER",
            "pipedrive-hook".to_owned(),
        ),
        (
            "LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD",
            "hook-secret-77".to_owned(),
        ),
        ("LEADRELAY_PIPEDRIVE_RATE_LIMIT", rate_limit.to_owned()),
    ]);
    vars.extend(
        more.iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    let settings = Settings::from_lookup(|name| vars.get(name).cloned()).expect("valid settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("its address");
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move { leadrelay_pipedrive::serve(&settings, listener, shutdown).await }
    });
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("the adapter answers");
    (channel, shutdown)
}
