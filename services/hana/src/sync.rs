//! `CrmSyncService` for Hana: write-back. Hana is where leads and tickets come from, so syncing
//! "to Hana" means writing what the CRMs did back into attributes of the Hana lead or ticket:
//! the remote ids LeadRelay linked, a lead's sales status, and a deal's status, stage and lost
//! reason.
//!
//! The attributes written are [`WriteBack`]'s: custom `cf_string_…` attributes by default, others
//! as the config file's `[mappings.hana]` names them (an empty name writes nothing). Setting an
//! attribute is idempotent, so a retry is harmless. Hana's API can neither create nor delete a
//! lead or ticket: an entity that did not come from Hana, a delete or an activity is answered
//! `NOT_SUPPORTED` without a call.

use std::sync::Arc;

use leadrelay_proto::v1::{
    AddActivityRequest, AddActivityResponse, DealStatus, DeleteDealRequest, DeleteDealResponse,
    DeleteLeadRequest, DeleteLeadResponse, ExternalRef, GetCapabilitiesRequest,
    GetCapabilitiesResponse, RemoteKind, SourceRef, SyncOutcome, System, UpsertDealRequest,
    UpsertDealResponse, UpsertLeadRequest, UpsertLeadResponse,
    crm_sync_service_server::CrmSyncService,
};
use leadrelay_runtime::adapter::{Abilities, Credentials, external_ref, open_link};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::client::{HanaClient, Record};

/// Which Hana attribute receives what: the config file's `[mappings.hana]`.
pub use leadrelay_runtime::mappings::HanaWriteBack as WriteBack;

/// Hana's canonical face.
#[derive(Clone, Debug)]
pub struct HanaSync {
    credentials: Credentials,
    client: Option<Arc<HanaClient>>,
    write_back: WriteBack,
}

impl HanaSync {
    /// The sync over `client`, writing into `write_back`'s attributes.
    pub fn new(
        credentials: Credentials,
        client: Option<Arc<HanaClient>>,
        write_back: WriteBack,
    ) -> Self {
        Self {
            credentials,
            client,
            write_back,
        }
    }

    fn client(&self) -> Result<&HanaClient, Status> {
        self.credentials.require()?;
        self.client
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("Hana write-back is not configured"))
    }
}

/// The entity's Hana id: its link of `kind`, else its source when that is Hana.
fn hana_id(refs: &[ExternalRef], source: Option<&SourceRef>, kind: RemoteKind) -> Option<String> {
    open_link(refs, System::Hana, kind)
        .map(|link| link.remote_id.clone())
        .or_else(|| {
            source
                .filter(|source| source.system() == System::Hana)
                .map(|source| source.remote_id.clone())
        })
        .filter(|id| !id.trim().is_empty())
}

/// The open link of `kind` in `system`, if any.
fn remote_id(refs: &[ExternalRef], system: System, kind: RemoteKind) -> Option<String> {
    open_link(refs, system, kind).map(|link| link.remote_id.clone())
}

fn status_name(status: DealStatus) -> Option<&'static str> {
    match status {
        DealStatus::Open => Some("open"),
        DealStatus::Won => Some("won"),
        DealStatus::Lost => Some("lost"),
        DealStatus::Deleted => Some("deleted"),
        DealStatus::Unspecified => None,
    }
}

fn put(attributes: &mut Map<String, Value>, name: &str, value: Option<String>) {
    if let Some(value) = value.filter(|value| !value.trim().is_empty())
        && !name.trim().is_empty()
    {
        attributes.insert(name.to_owned(), Value::String(value));
    }
}

fn outcome_of(attributes: &Map<String, Value>) -> SyncOutcome {
    if attributes.is_empty() {
        SyncOutcome::Unchanged
    } else {
        SyncOutcome::Updated
    }
}

#[tonic::async_trait]
impl CrmSyncService for HanaSync {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        // Hana creates its own leads; LeadRelay only writes back into them.
        Ok(Response::new(self.credentials.capabilities(
            System::Hana,
            self.client.is_some(),
            Abilities {
                updates_leads: true,
                syncs_deals: true,
                ..Abilities::default()
            },
        )))
    }

    async fn upsert_lead(
        &self,
        request: Request<UpsertLeadRequest>,
    ) -> Result<Response<UpsertLeadResponse>, Status> {
        let client = self.client()?;
        let lead = request
            .into_inner()
            .lead
            .ok_or_else(|| Status::invalid_argument("lead is required"))?;
        let Some(id) = hana_id(
            &lead.external_refs,
            lead.source.as_ref(),
            RemoteKind::HanaLead,
        ) else {
            return Ok(Response::new(UpsertLeadResponse {
                outcome: SyncOutcome::NotSupported.into(),
                refs: Vec::new(),
            }));
        };
        let mut attributes = Map::new();
        let refs = &lead.external_refs;
        put(
            &mut attributes,
            &self.write_back.pipedrive_person_id,
            remote_id(refs, System::Pipedrive, RemoteKind::PipedrivePerson),
        );
        put(
            &mut attributes,
            &self.write_back.salesman_lead_id,
            remote_id(refs, System::Salesman, RemoteKind::SalesmanLead),
        );
        put(
            &mut attributes,
            &self.write_back.sales_status,
            Some(lead.sales_status.clone()).filter(|status| !status.is_empty()),
        );
        let outcome = outcome_of(&attributes);
        if !attributes.is_empty() {
            client.update(Record::Lead, &id, attributes).await?;
        }
        Ok(Response::new(UpsertLeadResponse {
            outcome: outcome.into(),
            refs: vec![external_ref(System::Hana, RemoteKind::HanaLead, &id)],
        }))
    }

    async fn delete_lead(
        &self,
        _request: Request<DeleteLeadRequest>,
    ) -> Result<Response<DeleteLeadResponse>, Status> {
        self.client()?;
        Ok(Response::new(DeleteLeadResponse {
            outcome: SyncOutcome::NotSupported.into(),
            refs: Vec::new(),
        }))
    }

    async fn upsert_deal(
        &self,
        request: Request<UpsertDealRequest>,
    ) -> Result<Response<UpsertDealResponse>, Status> {
        let client = self.client()?;
        let deal = request
            .into_inner()
            .deal
            .ok_or_else(|| Status::invalid_argument("deal is required"))?;
        let Some(id) = hana_id(
            &deal.external_refs,
            deal.source.as_ref(),
            RemoteKind::HanaOpportunity,
        ) else {
            return Ok(Response::new(UpsertDealResponse {
                outcome: SyncOutcome::NotSupported.into(),
                refs: Vec::new(),
            }));
        };
        let mut attributes = Map::new();
        put(
            &mut attributes,
            &self.write_back.pipedrive_deal_id,
            remote_id(
                &deal.external_refs,
                System::Pipedrive,
                RemoteKind::PipedriveDeal,
            ),
        );
        let status = deal.status();
        put(
            &mut attributes,
            &self.write_back.deal_status,
            status_name(status).map(str::to_owned),
        );
        if status == DealStatus::Lost {
            put(
                &mut attributes,
                &self.write_back.lost_reason,
                Some(deal.lost_reason.clone()),
            );
        }
        put(
            &mut attributes,
            &self.write_back.stage_id,
            Some(deal.stage_id.clone()),
        );
        let outcome = outcome_of(&attributes);
        if !attributes.is_empty() {
            client.update(Record::Opportunity, &id, attributes).await?;
        }
        Ok(Response::new(UpsertDealResponse {
            outcome: outcome.into(),
            refs: vec![external_ref(System::Hana, RemoteKind::HanaOpportunity, &id)],
        }))
    }

    async fn delete_deal(
        &self,
        _request: Request<DeleteDealRequest>,
    ) -> Result<Response<DeleteDealResponse>, Status> {
        self.client()?;
        Ok(Response::new(DeleteDealResponse {
            outcome: SyncOutcome::NotSupported.into(),
            refs: Vec::new(),
        }))
    }

    async fn add_activity(
        &self,
        _request: Request<AddActivityRequest>,
    ) -> Result<Response<AddActivityResponse>, Status> {
        self.client()?;
        Ok(Response::new(AddActivityResponse {
            outcome: SyncOutcome::NotSupported.into(),
            refs: Vec::new(),
        }))
    }
}
