//! The gRPC server every LeadRelay service runs: its own services plus `grpc.health.v1.Health`
//! (SERVING per service while up, NOT_SERVING while draining) and server reflection v1 and
//! v1alpha (so every grpcurl works), with request spans that continue the caller's trace.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;
use tower_http::{classify::GrpcFailureClass, trace::TraceLayer};

use crate::{propagation::ServerSpan, shutdown::drain_bounded};

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// A gRPC server could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum GrpcServerError {
    /// The reflection descriptors could not be loaded (a build problem).
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// One service process's gRPC face.
pub struct GrpcServer {
    name: &'static str,
    routes: Routes,
    service_names: Vec<&'static str>,
}

impl GrpcServer {
    /// A server named `name` (for logs) serving `routes`, whose fully-qualified service names are
    /// `service_names`: they get a health status and are advertised by reflection.
    pub fn new(name: &'static str, routes: Routes, service_names: &[&'static str]) -> Self {
        Self {
            name,
            routes,
            service_names: service_names.to_vec(),
        }
    }

    /// Reflection that advertises this server's services, health and reflection itself, and can
    /// describe every LeadRelay message.
    fn reflection(&self) -> tonic_reflection::server::Builder<'static> {
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(leadrelay_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in
            self.service_names
                .iter()
                .chain(&[HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA])
        {
            reflection = reflection.with_service_name(*name);
        }
        reflection
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains in-flight calls for at most
    /// [`crate::shutdown::DRAIN_TIMEOUT`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), GrpcServerError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = self.reflection().build_v1()?;
        let reflection_v1alpha = self.reflection().build_v1alpha()?;

        // The empty name is the whole server's status, as `grpc_health_probe` asks by default.
        let health_names: Vec<&'static str> = std::iter::once("")
            .chain(self.service_names.iter().copied())
            .collect();
        for name in &health_names {
            health_reporter
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        tracing::info!(
            service = self.name,
            addr = %crate::telemetry::listening_addr(&listener),
            "gRPC server listening"
        );
        let routes = self
            .routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let draining = shutdown.clone();
        let serve = Server::builder()
            .layer(
                TraceLayer::new_for_grpc()
                    .make_span_with(ServerSpan::GRPC)
                    .on_failure(log_failed_call),
            )
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                draining.cancelled().await;
                for name in &health_names {
                    health_reporter
                        .set_service_status(*name, ServingStatus::NotServing)
                        .await;
                }
            });
        if let Some(result) = drain_bounded(serve, &shutdown, self.name).await {
            result?;
        }
        tracing::info!(service = self.name, "gRPC server stopped");
        Ok(())
    }
}

/// Logs a call answered with an error status at the level of what it says about this service:
/// ERROR for a fault here (internal, unknown, data loss, unimplemented), WARN for trouble the
/// caller retries (unavailable, deadline, rate limit, aborted), DEBUG for a refusal the caller
/// receives with its reason and handles (invalid argument, not found, permission denied, …).
/// The job runner already logs each failed job with the CRM's message once.
fn log_failed_call(failure: GrpcFailureClass, latency: std::time::Duration, span: &tracing::Span) {
    let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    match failure {
        GrpcFailureClass::Code(code) => match tonic::Code::from(code.get()) {
            code @ (tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::DataLoss
            | tonic::Code::Unimplemented) => {
                tracing::error!(parent: span, ?code, latency_ms, "call failed");
            }
            code @ (tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted) => {
                tracing::warn!(parent: span, ?code, latency_ms, "call failed; the caller may retry");
            }
            code => tracing::debug!(parent: span, ?code, latency_ms, "call refused"),
        },
        GrpcFailureClass::Error(error) => {
            tracing::error!(parent: span, %error, latency_ms, "call failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    use super::*;

    #[tokio::test]
    async fn health_is_serving_until_shutdown() -> Result<(), Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let server = GrpcServer::new("test", Routes::default(), &[]);
        let serving = tokio::spawn(server.serve(listener, shutdown.clone()));

        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = HealthClient::new(channel);
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let unknown = client
            .check(HealthCheckRequest {
                service: "no.such.Service".to_owned(),
            })
            .await;
        assert_eq!(
            unknown.err().map(|status| status.code()),
            Some(tonic::Code::NotFound)
        );

        shutdown.cancel();
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), serving).await???;
        Ok(())
    }
}
