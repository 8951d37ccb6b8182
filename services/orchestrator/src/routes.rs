//! The default flows of DESIGN §4: which sync jobs an event implies.
//!
//! Hana lead created or updated → SalesMan lead and Pipedrive person; lead deleted → each CRM
//! told; ticket created → Pipedrive deal (with its person) and an activity carrying the
//! conversation link; ticket updated → the deal updated; ticket deleted → the deal marked lost.

use leadrelay_proto::v1::{HanaEventKind, JobOperation, System};

/// The kind of canonical entity an event or job is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntityType {
    /// A lead (Hana customer).
    Lead,
    /// A deal (Hana ticket).
    Deal,
}

impl EntityType {
    /// The entity a Hana event is about.
    pub fn of(kind: HanaEventKind) -> Self {
        match kind {
            HanaEventKind::OpportunityCreated
            | HanaEventKind::OpportunityUpdated
            | HanaEventKind::OpportunityDeleted => Self::Deal,
            HanaEventKind::Unspecified
            | HanaEventKind::LeadCreated
            | HanaEventKind::LeadUpdated
            | HanaEventKind::LeadDeleted => Self::Lead,
        }
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Deal => "deal",
        }
    }
}

/// A system jobs are sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target(pub System);

impl Target {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        system_name(self.0)
    }
}

/// The name a system is stored under.
pub fn system_name(system: System) -> &'static str {
    match system {
        System::Unspecified => "unspecified",
        System::Hana => "hana",
        System::Pipedrive => "pipedrive",
        System::Salesman => "salesman",
    }
}

/// The system stored under `name`.
pub fn system_from_name(name: &str) -> System {
    match name {
        "hana" => System::Hana,
        "pipedrive" => System::Pipedrive,
        "salesman" => System::Salesman,
        _ => System::Unspecified,
    }
}

/// A job operation, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation(pub JobOperation);

impl Operation {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            JobOperation::Unspecified => "unspecified",
            JobOperation::UpsertLead => "upsert_lead",
            JobOperation::DeleteLead => "delete_lead",
            JobOperation::UpsertDeal => "upsert_deal",
            JobOperation::DeleteDeal => "delete_deal",
            JobOperation::AddActivity => "add_activity",
        }
    }

    /// The operation stored under `name`.
    pub fn from_name(name: &str) -> JobOperation {
        [
            JobOperation::UpsertLead,
            JobOperation::DeleteLead,
            JobOperation::UpsertDeal,
            JobOperation::DeleteDeal,
            JobOperation::AddActivity,
        ]
        .into_iter()
        .find(|operation| Self(*operation).as_str() == name)
        .unwrap_or(JobOperation::Unspecified)
    }
}

/// One job an event implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedJob {
    /// Where it goes.
    pub target: Target,
    /// What it asks.
    pub operation: Operation,
}

const fn job(system: System, operation: JobOperation) -> PlannedJob {
    PlannedJob {
        target: Target(system),
        operation: Operation(operation),
    }
}

/// The jobs a Hana event implies: the default flows, kept to `targets` when the config file
/// routes the event (`None`: no route names it).
pub fn plan(
    kind: HanaEventKind,
    has_conversation_url: bool,
    targets: Option<&[String]>,
) -> Vec<PlannedJob> {
    let jobs = default_plan(kind, has_conversation_url);
    match targets {
        None => jobs,
        Some(targets) => jobs
            .into_iter()
            .filter(|job| targets.iter().any(|target| target == job.target.as_str()))
            .collect(),
    }
}

/// The jobs a Hana event implies under the default flows.
pub fn default_plan(kind: HanaEventKind, has_conversation_url: bool) -> Vec<PlannedJob> {
    match kind {
        HanaEventKind::LeadCreated | HanaEventKind::LeadUpdated => vec![
            job(System::Salesman, JobOperation::UpsertLead),
            job(System::Pipedrive, JobOperation::UpsertLead),
        ],
        HanaEventKind::LeadDeleted => vec![
            job(System::Salesman, JobOperation::DeleteLead),
            job(System::Pipedrive, JobOperation::DeleteLead),
        ],
        HanaEventKind::OpportunityCreated => {
            let mut jobs = vec![job(System::Pipedrive, JobOperation::UpsertDeal)];
            if has_conversation_url {
                jobs.push(job(System::Pipedrive, JobOperation::AddActivity));
            }
            jobs
        }
        HanaEventKind::OpportunityUpdated => vec![job(System::Pipedrive, JobOperation::UpsertDeal)],
        HanaEventKind::OpportunityDeleted => vec![job(System::Pipedrive, JobOperation::DeleteDeal)],
        HanaEventKind::Unspecified => Vec::new(),
    }
}
