//! The Hana adapter: Hana's update API (partner → Hana) behind `leadrelay.hana.v1.HanaAdapterService`
//! and the canonical `leadrelay.v1.CrmSyncService` (write-back of remote ids and status changes).

pub mod client;
pub mod sync;

use std::{collections::BTreeMap, sync::Arc};

use leadrelay_proto::{
    hana::v1::{
        UpdateLeadRequest, UpdateLeadResponse, UpdateOpportunityRequest, UpdateOpportunityResponse,
        hana_adapter_service_server::{HanaAdapterService, HanaAdapterServiceServer},
    },
    json::{from_proto_value, to_proto_value},
    service_names,
    v1::crm_sync_service_server::CrmSyncServiceServer,
};
use leadrelay_runtime::{
    Settings,
    adapter::Credentials,
    grpc::{GrpcServer, GrpcServerError},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, service::Routes};

use self::client::{DEFAULT_TIMEOUT, HanaClient, HanaError, Record};

/// Hana's native gRPC face.
#[derive(Clone, Debug)]
pub struct HanaAdapter {
    credentials: Credentials,
    client: Option<Arc<HanaClient>>,
    write_back: leadrelay_runtime::mappings::HanaWriteBack,
}

impl HanaAdapter {
    /// The adapter for the Hana settings; without an API URL and access token, write-back is off
    /// and every RPC answers FAILED_PRECONDITION naming what to set.
    pub fn from_settings(settings: &Settings) -> Result<Self, HanaError> {
        let client = match (&settings.hana.api_url, &settings.hana.access_token) {
            (Some(url), Some(token)) => Some(Arc::new(HanaClient::new(
                url.clone(),
                token.clone(),
                DEFAULT_TIMEOUT,
            )?)),
            _ => None,
        };
        Ok(Self {
            credentials: Credentials::new("Hana write-back", settings.hana_missing()),
            client,
            write_back: settings.mappings.hana.clone(),
        })
    }

    /// Whether the update API's URL and token are set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = sync::HanaSync::new(
            self.credentials.clone(),
            self.client.clone(),
            self.write_back.clone(),
        );
        Routes::new(HanaAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }

    async fn update(
        &self,
        record: Record,
        id: &str,
        attributes: BTreeMap<String, prost_types::Value>,
    ) -> Result<prost_types::Value, Status> {
        self.credentials.require()?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("Hana write-back is not configured"))?;
        let attributes = attributes
            .iter()
            .map(|(name, value)| (name.clone(), from_proto_value(value)))
            .collect();
        let answer = client.update(record, id, attributes).await?;
        Ok(to_proto_value(answer))
    }
}

#[tonic::async_trait]
impl HanaAdapterService for HanaAdapter {
    async fn update_lead(
        &self,
        request: Request<UpdateLeadRequest>,
    ) -> Result<Response<UpdateLeadResponse>, Status> {
        let request = request.into_inner();
        let attributes = request.attributes.into_iter().collect();
        let response = self.update(Record::Lead, &request.id, attributes).await?;
        Ok(Response::new(UpdateLeadResponse {
            response: Some(response),
        }))
    }

    async fn update_opportunity(
        &self,
        request: Request<UpdateOpportunityRequest>,
    ) -> Result<Response<UpdateOpportunityResponse>, Status> {
        let request = request.into_inner();
        let attributes = request.attributes.into_iter().collect();
        let response = self
            .update(Record::Opportunity, &request.id, attributes)
            .await?;
        Ok(Response::new(UpdateOpportunityResponse {
            response: Some(response),
        }))
    }
}

/// The Hana adapter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP client could not be built from the settings.
    #[error("cannot set up the Hana client: {0}")]
    Client(#[from] HanaError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcServerError),
}

/// Serves the Hana adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let adapter = HanaAdapter::from_settings(settings)?;
    GrpcServer::new(
        "hana-adapter",
        adapter.routes(),
        &[service_names::HANA_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await?;
    Ok(())
}
