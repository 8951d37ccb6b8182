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

/// Finds-or-creates of one record, one at a time and detached from their callers.
///
/// A find-or-create (search, then create when nothing is found) goes wrong in two ways that a
/// crash makes likely:
/// - the caller goes away mid-call (its orchestrator was killed, so its stream is reset and the
///   handler's future is dropped) after the outside system has created the record but before
///   the adapter noted it; the retry may then no longer find it;
/// - two runs of one job race (a runner that lost its lease, and its successor): both search,
///   both find nothing, and both create.
///
/// [`OneAtATime::run`] runs the work in a task of its own, which finishes whatever happens to
/// the caller, after the earlier work on the same key. Keys share 64 stripes, so work on
/// different records goes on in parallel.
#[derive(Clone, Debug)]
pub struct OneAtATime {
    stripes: std::sync::Arc<[std::sync::Arc<tokio::sync::Mutex<()>>; STRIPES]>,
}

/// Stripes of [`OneAtATime`].
const STRIPES: usize = 64;

impl Default for OneAtATime {
    fn default() -> Self {
        Self {
            stripes: std::sync::Arc::new(std::array::from_fn(|_| std::sync::Arc::default())),
        }
    }
}

impl OneAtATime {
    /// Runs `work` in a task of its own once the earlier work on `key` is done; returns its
    /// result, or INTERNAL if the task panicked.
    pub async fn run<T, W>(&self, key: &str, work: W) -> Result<T, Status>
    where
        T: Send + 'static,
        W: std::future::Future<Output = Result<T, Status>> + Send + 'static,
    {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        let turn = std::sync::Arc::clone(&self.stripes[stripe]);
        // The task stays in the caller's span, so its calls out belong to the caller's trace.
        let work = tracing::Instrument::in_current_span(async move {
            let _turn = turn.lock_owned().await;
            work.await
        });
        tokio::spawn(work).await.map_err(|error| {
            Status::internal(format!("the call to the outside system failed: {error}"))
        })?
    }
}

#[cfg(test)]
mod one_at_a_time_tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// Work on one key never overlaps, and it finishes even when its caller goes away.
    #[tokio::test]
    async fn work_on_one_key_runs_alone_and_outlives_its_caller() -> Result<(), Status> {
        let turns = OneAtATime::default();
        let (running, most, finished) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let work = || {
            let (running, most, finished) = (running.clone(), most.clone(), finished.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Status>(())
            }
        };
        let gone =
            tokio::time::timeout(Duration::from_millis(5), turns.run("lead_1", work())).await;
        assert!(gone.is_err(), "the caller gave up");
        let (first, second) =
            tokio::join!(turns.run("lead_1", work()), turns.run("lead_1", work()));
        first?;
        second?;
        assert_eq!(
            finished.load(Ordering::SeqCst),
            3,
            "the abandoned work finished too"
        );
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "never two at once on one key"
        );
        Ok(())
    }
}
