//! What every adapter shares before its system-specific logic runs: the check that its
//! credentials are set, the capabilities it reports, and the links it reads and returns.

use leadrelay_proto::v1::{ExternalRef, GetCapabilitiesResponse, RemoteKind, System};
use tonic::Status;

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

/// What an adapter's `CrmSyncService` can do once it is configured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Abilities {
    /// It creates records for leads.
    pub creates_leads: bool,
    /// It updates records it made for leads.
    pub updates_leads: bool,
    /// It creates and updates deals.
    pub syncs_deals: bool,
    /// It adds activities.
    pub adds_activities: bool,
}

impl Credentials {
    /// The `GetCapabilities` answer of `system`'s adapter: `abilities` while it is configured
    /// (its credentials set and its client `ready`), none otherwise.
    pub fn capabilities(
        &self,
        system: System,
        ready: bool,
        abilities: Abilities,
    ) -> GetCapabilitiesResponse {
        let configured = self.is_configured() && ready;
        GetCapabilitiesResponse {
            system: system.into(),
            configured,
            missing_settings: self.missing.iter().map(|name| (*name).to_owned()).collect(),
            creates_leads: configured && abilities.creates_leads,
            updates_leads: configured && abilities.updates_leads,
            syncs_deals: configured && abilities.syncs_deals,
            adds_activities: configured && abilities.adds_activities,
        }
    }
}

/// The open link of `kind` in `system` among `refs`, if it names a record.
pub fn open_link(refs: &[ExternalRef], system: System, kind: RemoteKind) -> Option<&ExternalRef> {
    refs.iter().find(|link| {
        link.system() == system
            && link.kind() == kind
            && link.closed_at.is_none()
            && !link.remote_id.trim().is_empty()
    })
}

/// A link an adapter reports: `remote_id` of `kind` in `system` (the orchestrator dates it).
pub fn external_ref(system: System, kind: RemoteKind, remote_id: &impl ToString) -> ExternalRef {
    ExternalRef {
        system: system.into(),
        kind: kind.into(),
        remote_id: remote_id.to_string(),
        linked_at: None,
        closed_at: None,
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
        let status = credentials.require().expect_err("not configured");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "SalesMan is not configured: set LEADRELAY_SALESMAN_API_URL, LEADRELAY_SALESMAN_API_KEY"
        );
        assert!(Credentials::new("Pipedrive", Vec::new()).require().is_ok());
    }
}
