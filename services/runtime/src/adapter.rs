//! What every service shares before its system-specific logic runs: the check that an
//! adapter's credentials are set, and the honest answer of an RPC whose logic is not built yet.

use tonic::{Request, Status};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_credentials_name_the_variables() {
        let credentials = Credentials::new(
            "SalesMan",
            vec!["LEADRELAY_SALESMAN_API_URL", "LEADRELAY_SALESMAN_API_KEY"],
        );
        let status = credentials.require().expect_err("not configured");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "SalesMan is not configured: set LEADRELAY_SALESMAN_API_URL, LEADRELAY_SALESMAN_API_KEY"
        );
        assert!(Credentials::new("Pipedrive", Vec::new()).require().is_ok());
    }

    #[test]
    fn rpcs_not_built_yet_name_themselves() {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(RpcPath::new("/leadrelay.v1.OrchestratorService/ListJobs"));
        let status = not_implemented(&request);
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(
            status
                .message()
                .starts_with("leadrelay.v1.OrchestratorService/ListJobs")
        );
    }
}
