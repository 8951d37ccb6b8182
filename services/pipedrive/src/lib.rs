//! The Pipedrive adapter: Pipedrive API v2 behind `leadrelay.pipedrive.v1.PipedriveAdapterService`
//! (the connector's whole operation set) and the canonical `leadrelay.v1.CrmSyncService`.

pub mod client;
pub mod pacing;
pub mod wire;

use leadrelay_proto::{
    pipedrive::v1::{
        AddActivityRequest, AddActivityResponse, AddDealRequest, AddDealResponse,
        CreatePersonRequest, CreatePersonResponse, DeleteWebhookRequest, DeleteWebhookResponse,
        GetDealRequest, GetDealResponse, GetStageRequest, GetStageResponse, ListActivitiesRequest,
        ListActivitiesResponse, ListDealsRequest, ListDealsResponse, ListNewActivitiesRequest,
        ListNewActivitiesResponse, ListNewDealsRequest, ListNewDealsResponse, ListStagesRequest,
        ListStagesResponse, ListWebhooksRequest, ListWebhooksResponse, RegisterWebhookRequest,
        RegisterWebhookResponse, SearchPersonsRequest, SearchPersonsResponse, UpdateDealRequest,
        UpdateDealResponse, UpdateDealStageRequest, UpdateDealStageResponse,
        UpdateDealStatusRequest, UpdateDealStatusResponse, UpdatePersonRequest,
        UpdatePersonResponse,
        pipedrive_adapter_service_server::{
            PipedriveAdapterService, PipedriveAdapterServiceServer,
        },
    },
    service_names,
    v1::{System, crm_sync_service_server::CrmSyncServiceServer},
};
use leadrelay_runtime::{
    Settings,
    adapter::{Credentials, PendingCrmSync, pending_adapter_rpc},
    grpc::{GrpcServer, GrpcServerError},
    pending_rpcs,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, service::Routes};

/// Pipedrive's native gRPC face.
#[derive(Clone, Debug)]
pub struct PipedriveAdapter {
    credentials: Credentials,
}

impl PipedriveAdapter {
    /// The adapter for the Pipedrive settings; without an API token every RPC answers
    /// FAILED_PRECONDITION naming `LEADRELAY_PIPEDRIVE_API_TOKEN`.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            credentials: Credentials::new("Pipedrive", settings.pipedrive_missing()),
        }
    }

    /// Whether the API token is set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The adapter's gRPC routes: its native service and `CrmSyncService`.
    pub fn routes(self) -> Routes {
        let sync = PendingCrmSync::new(System::Pipedrive, self.credentials.clone());
        Routes::new(PipedriveAdapterServiceServer::new(self))
            .add_service(CrmSyncServiceServer::new(sync))
    }

    fn pending<T>(&self, request: &Request<T>) -> Status {
        pending_adapter_rpc(&self.credentials, request)
    }
}

pending_rpcs! {
    impl PipedriveAdapterService for PipedriveAdapter {
        add_deal(AddDealRequest) -> AddDealResponse;
        get_deal(GetDealRequest) -> GetDealResponse;
        update_deal(UpdateDealRequest) -> UpdateDealResponse;
        update_deal_status(UpdateDealStatusRequest) -> UpdateDealStatusResponse;
        update_deal_stage(UpdateDealStageRequest) -> UpdateDealStageResponse;
        get_stage(GetStageRequest) -> GetStageResponse;
        list_stages(ListStagesRequest) -> ListStagesResponse;
        add_activity(AddActivityRequest) -> AddActivityResponse;
        list_new_deals(ListNewDealsRequest) -> ListNewDealsResponse;
        list_new_activities(ListNewActivitiesRequest) -> ListNewActivitiesResponse;
        search_persons(SearchPersonsRequest) -> SearchPersonsResponse;
        create_person(CreatePersonRequest) -> CreatePersonResponse;
        update_person(UpdatePersonRequest) -> UpdatePersonResponse;
        list_deals(ListDealsRequest) -> ListDealsResponse;
        list_activities(ListActivitiesRequest) -> ListActivitiesResponse;
        register_webhook(RegisterWebhookRequest) -> RegisterWebhookResponse;
        list_webhooks(ListWebhooksRequest) -> ListWebhooksResponse;
        delete_webhook(DeleteWebhookRequest) -> DeleteWebhookResponse;
    }
}

/// Serves the Pipedrive adapter on `listener` until `shutdown` is cancelled.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GrpcServerError> {
    let adapter = PipedriveAdapter::from_settings(settings);
    GrpcServer::new(
        "pipedrive-adapter",
        adapter.routes(),
        &[service_names::PIPEDRIVE_ADAPTER, service_names::CRM_SYNC],
    )
    .serve(listener, shutdown)
    .await
}
