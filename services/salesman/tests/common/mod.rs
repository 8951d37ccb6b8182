//! The SalesMan adapter served over real gRPC on a random port, configured the way an operator
//! configures it, against a fake SalesMan.

use std::collections::HashMap;

use leadrelay_runtime::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Starts the adapter against the SalesMan at `api_url` as `login` with `api_key`; returns a
/// channel to it. The server runs until the test's runtime ends.
pub(crate) async fn serve(api_url: String, login: &str, api_key: &str) -> Channel {
    let vars: HashMap<&str, String> = HashMap::from([
        ("LEADRELAY_SALESMAN_API_URL", api_url),
        ("LEADRELAY_SALESMAN_LOGIN", login.to_owned()),
        ("LEADRELAY_SALESMAN_API_KEY", api_key.to_owned()),
    ]);
    let settings = Settings::from_lookup(|name| vars.get(name).cloned()).expect("valid settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        leadrelay_salesman::serve(&settings, listener, CancellationToken::new()).await
    });
    Channel::from_shared(format!("http://{address}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("the adapter answers")
}
