//! The canonical entities as the store keeps them: the same steps for leads and deals, with the
//! differences (table, link kind, delete semantics, contact) in one trait.

use leadrelay_proto::v1::{
    ContactRef, Deal, DealStatus, ExternalRef, HanaEventKind, HanaWebhook, Lead, SourceRef, System,
};

use crate::{
    ingest::{millis, timestamp},
    mapping,
    routes::EntityType,
};

/// A canonical entity that Hana events create and change.
pub(crate) trait CanonicalEntity: prost::Message + Default {
    /// The entity type stored on jobs and links.
    const ENTITY_TYPE: EntityType;
    /// The table holding it.
    const TABLE: &'static str;
    /// The prefix of its ids.
    const ID_PREFIX: &'static str;
    /// The kind of its Hana link.
    const HANA_LINK_KIND: &'static str;
    /// Whether its table has a `contact_lead_id` column.
    const HAS_CONTACT: bool;

    /// Applies one event on top of the entity as stored (or a default one when new).
    fn apply(&mut self, event: &EventFacts<'_>);

    /// When the entity was deleted, unix milliseconds.
    fn deleted_at_ms(&self) -> Option<i64>;

    /// The lead the entity belongs to, for deals.
    fn contact_lead_id(&self) -> Option<String>;

    /// Sets the entity's links, read from the links table.
    fn set_external_refs(&mut self, refs: Vec<ExternalRef>);
}

/// What an event says about one entity.
pub(crate) struct EventFacts<'a> {
    pub(crate) id: &'a str,
    pub(crate) is_new: bool,
    pub(crate) kind: HanaEventKind,
    pub(crate) webhook: &'a HanaWebhook,
    pub(crate) hana_id: &'a str,
    pub(crate) contact_lead_id: Option<&'a str>,
    pub(crate) now: i64,
}

impl EventFacts<'_> {
    fn source(&self) -> SourceRef {
        SourceRef {
            system: System::Hana.into(),
            app_id: self.webhook.application_id.clone(),
            remote_id: self.hana_id.to_owned(),
        }
    }
}

impl CanonicalEntity for Lead {
    const ENTITY_TYPE: EntityType = EntityType::Lead;
    const TABLE: &'static str = "leads";
    const ID_PREFIX: &'static str = "lead";
    const HANA_LINK_KIND: &'static str = "hana_lead";
    const HAS_CONTACT: bool = false;

    fn apply(&mut self, event: &EventFacts<'_>) {
        let mut attributes = std::mem::take(&mut self.raw);
        mapping::merge(&mut attributes, &event.webhook.lead);
        mapping::map_lead(self, attributes, &event.webhook.conversation_url);
        event.id.clone_into(&mut self.id);
        self.source = Some(event.source());
        match event.kind {
            HanaEventKind::LeadDeleted => self.deleted_at = Some(timestamp(event.now)),
            // A lead created again after a delete is alive again.
            HanaEventKind::LeadCreated => self.deleted_at = None,
            _ => {}
        }
        self.updated_at = Some(timestamp(event.now));
        if event.is_new {
            self.created_at = Some(timestamp(event.now));
        }
    }

    fn deleted_at_ms(&self) -> Option<i64> {
        self.deleted_at.as_ref().map(millis)
    }

    fn contact_lead_id(&self) -> Option<String> {
        None
    }

    fn set_external_refs(&mut self, refs: Vec<ExternalRef>) {
        self.external_refs = refs;
    }
}

impl CanonicalEntity for Deal {
    const ENTITY_TYPE: EntityType = EntityType::Deal;
    const TABLE: &'static str = "deals";
    const ID_PREFIX: &'static str = "deal";
    const HANA_LINK_KIND: &'static str = "hana_opportunity";
    const HAS_CONTACT: bool = true;

    fn apply(&mut self, event: &EventFacts<'_>) {
        let mut attributes = std::mem::take(&mut self.raw);
        mapping::merge(&mut attributes, &event.webhook.opportunity);
        mapping::map_deal(self, attributes, &event.webhook.conversation_url);
        if let Some(lead_id) = event.contact_lead_id {
            lead_id.clone_into(&mut self.contact.get_or_insert_with(ContactRef::default).lead_id);
        }
        event.id.clone_into(&mut self.id);
        self.source = Some(event.source());
        match event.kind {
            HanaEventKind::OpportunityDeleted => {
                self.status = DealStatus::Deleted.into();
                self.deleted_at = Some(timestamp(event.now));
            }
            // A ticket created again after a delete is open again.
            HanaEventKind::OpportunityCreated if self.deleted_at.is_some() => {
                self.status = DealStatus::Open.into();
                self.deleted_at = None;
            }
            _ => {}
        }
        self.updated_at = Some(timestamp(event.now));
        if event.is_new {
            self.created_at = Some(timestamp(event.now));
        }
    }

    fn deleted_at_ms(&self) -> Option<i64> {
        self.deleted_at.as_ref().map(millis)
    }

    fn contact_lead_id(&self) -> Option<String> {
        self.contact
            .as_ref()
            .map(|contact| contact.lead_id.clone())
            .filter(|lead_id| !lead_id.is_empty())
    }

    fn set_external_refs(&mut self, refs: Vec<ExternalRef>) {
        self.external_refs = refs;
    }
}
