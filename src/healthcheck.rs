//! `leadrelay healthcheck ADDR`: a gRPC health probe for images without extra tools.

use std::{process::ExitCode, time::Duration};

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Arguments of `leadrelay healthcheck`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service's address: `host:port` or `http://host:port`.
    addr: String,
    /// The gRPC service to ask about; empty asks about the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// How long to wait for an answer, in seconds.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

/// Prints the serving status and exits 0 only when it is SERVING.
pub(crate) async fn run(args: Args) -> ExitCode {
    let url = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(endpoint) => endpoint.connect_timeout(timeout).timeout(timeout),
        Err(error) => {
            eprintln!("error: '{}' is not an address: {error}", args.addr);
            return ExitCode::from(2);
        }
    };
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("NOT_REACHABLE: cannot connect to {url}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await;
    match answer.map(|response| response.into_inner().status()) {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(status) => {
            eprintln!(
                "health check of {url} failed: {:?}: {}",
                status.code(),
                status.message()
            );
            ExitCode::FAILURE
        }
    }
}
