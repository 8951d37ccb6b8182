//! What every adapter shares before its system-specific logic runs: the check that its
//! credentials are set, and honest answers for RPCs whose logic is not built yet.

use leadrelay_proto::v1::{
    AddActivityRequest, AddActivityResponse, DeleteDealRequest, DeleteDealResponse,
    DeleteLeadRequest, DeleteLeadResponse, GetCapabilitiesRequest, GetCapabilitiesResponse, System,
    UpsertDealRequest, UpsertDealResponse, UpsertLeadRequest, UpsertLeadResponse,
    crm_sync_service_server::CrmSyncService,
};
use tonic::{Request, Response, Status};

use crate::grpc::RpcPath;

/// Whether an adapter's credentials are set, and which variables are missing if not.
#[derive(Clone, Debug)]
pub struct Credentials {
    system_name: &'static str,
    missing: Vec<&'static str>,
}

impl Credentials {
    /// Credentials of `system_name` ("Pipedrive", …) with the given variables missing.
    pub fn new(system_name: &'static str, missing: Vec<&'static str>) -> Self {
        Self {
            system_name,
            missing,
        }
    }

    /// Whether every required variable is set.
    pub fn is_configured(&self) -> bool {
        self.missing.is_empty()
    }

    /// The variables still missing.
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }

    /// FAILED_PRECONDITION naming the missing variables, when any is missing.
    pub fn require(&self) -> Result<(), Status> {
        if self.is_configured() {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "{} is not configured: set {}",
            self.system_name,
            self.missing.join(", ")
        )))
    }
}

/// The answer of an RPC whose logic is not built yet: UNIMPLEMENTED naming the RPC, never a fake
/// success.
pub fn not_implemented<T>(request: &Request<T>) -> Status {
    let rpc = request
        .extensions()
        .get::<RpcPath>()
        .map_or("this RPC", RpcPath::rpc);
    Status::unimplemented(format!("{rpc} is not implemented in this LeadRelay build"))
}

/// The answer of an adapter RPC whose logic is not built yet: FAILED_PRECONDITION while the
/// adapter's credentials are missing (that is what the operator must fix first), UNIMPLEMENTED
/// otherwise.
pub fn pending_adapter_rpc<T>(credentials: &Credentials, request: &Request<T>) -> Status {
    match credentials.require() {
        Err(status) => status,
        Ok(()) => not_implemented(request),
    }
}

/// Implements every listed RPC of a generated service trait as "not built yet", by calling
/// `self.pending(&request)` (which the type defines) for the status to answer. The trait must be
/// in scope by its bare name.
#[macro_export]
macro_rules! pending_rpcs {
    (impl $service:ident for $ty:ty { $($method:ident($request:ty) -> $response:ty;)* }) => {
        #[tonic::async_trait]
        impl $service for $ty {
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$request>,
                ) -> Result<tonic::Response<$response>, tonic::Status> {
                    Err(self.pending(&request))
                }
            )*
        }
    };
}

/// The canonical `CrmSyncService` of an adapter whose sync logic is not built yet. It reports its
/// capabilities truthfully (configured or not, and able to do nothing yet) and answers every other
/// RPC as [`pending_adapter_rpc`] does.
#[derive(Clone, Debug)]
pub struct PendingCrmSync {
    system: System,
    credentials: Credentials,
}

impl PendingCrmSync {
    /// The canonical face of the adapter for `system`.
    pub fn new(system: System, credentials: Credentials) -> Self {
        Self {
            system,
            credentials,
        }
    }

    fn pending<T>(&self, request: &Request<T>) -> Status {
        pending_adapter_rpc(&self.credentials, request)
    }
}

#[tonic::async_trait]
impl CrmSyncService for PendingCrmSync {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(GetCapabilitiesResponse {
            system: self.system.into(),
            configured: self.credentials.is_configured(),
            missing_settings: self
                .credentials
                .missing()
                .iter()
                .map(|name| (*name).to_owned())
                .collect(),
            creates_leads: false,
            updates_leads: false,
            syncs_deals: false,
            adds_activities: false,
        }))
    }

    async fn upsert_lead(
        &self,
        request: Request<UpsertLeadRequest>,
    ) -> Result<Response<UpsertLeadResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn delete_lead(
        &self,
        request: Request<DeleteLeadRequest>,
    ) -> Result<Response<DeleteLeadResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn upsert_deal(
        &self,
        request: Request<UpsertDealRequest>,
    ) -> Result<Response<UpsertDealResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn delete_deal(
        &self,
        request: Request<DeleteDealRequest>,
    ) -> Result<Response<DeleteDealResponse>, Status> {
        Err(self.pending(&request))
    }

    async fn add_activity(
        &self,
        request: Request<AddActivityRequest>,
    ) -> Result<Response<AddActivityResponse>, Status> {
        Err(self.pending(&request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_credentials_name_the_variables() {
        let credentials = Credentials::new(
            "SalesMan",
            vec!["LEADRELAY_SALESMAN_API_URL", "LEADRELAY_SALESMAN_API_KEY"],
        );
        let status = pending_adapter_rpc(&credentials, &Request::new(()));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "SalesMan is not configured: set LEADRELAY_SALESMAN_API_URL, LEADRELAY_SALESMAN_API_KEY"
        );
    }

    #[test]
    fn configured_adapters_say_what_is_not_built() {
        let credentials = Credentials::new("Pipedrive", Vec::new());
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(RpcPath::new("/leadrelay.v1.CrmSyncService/UpsertLead"));
        let status = pending_adapter_rpc(&credentials, &request);
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(
            status
                .message()
                .starts_with("leadrelay.v1.CrmSyncService/UpsertLead")
        );
    }
}
