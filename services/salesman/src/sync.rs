//! `CrmSyncService` for SalesMan: a lead becomes a SalesMan lead ("заявка") once.
//!
//! The leads API v1 can add a lead and read it, nothing more: an update or a delete of a lead
//! already in SalesMan is answered `NOT_SUPPORTED` (with the link, so the orchestrator keeps or
//! closes it), never faked. Deals and activities are not SalesMan leads' business either.
//!
//! Once only: a lead already linked is not added again, and a lead added before a crash cut the
//! link's commit is found by LeadRelay's marker in its description among the newest leads.
//! Descriptions are compared as SalesMan stores them: it strips tags, quotes and « ».

use std::sync::Arc;

use leadrelay_proto::{
    salesman::v1::AddLeadRequest,
    v1::{
        AddActivityRequest, AddActivityResponse, DeleteDealRequest, DeleteDealResponse,
        DeleteLeadRequest, DeleteLeadResponse, ExternalRef, GetCapabilitiesRequest,
        GetCapabilitiesResponse, Lead, RemoteKind, SyncOutcome, System, UpsertDealRequest,
        UpsertDealResponse, UpsertLeadRequest, UpsertLeadResponse,
        crm_sync_service_server::CrmSyncService,
    },
};
use leadrelay_runtime::{
    adapter::{Abilities, Credentials, OneAtATime, external_ref, open_link},
    mappings::{FieldMapping, attribute_value, value_text},
};
use tonic::{Request, Response, Status};

use crate::client::{Direction, ListFilter, SalesManClient};

/// Text as SalesMan keeps a lead field: tags stripped, and `" ' \ ` « » < >` removed (its
/// `untag()`), whitespace trimmed.
pub fn normalize(text: &str) -> String {
    let mut without_tags = String::with_capacity(text.len());
    let mut in_tag = false;
    for character in text.chars() {
        match character {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if in_tag => {}
            other => without_tags.push(other),
        }
    }
    without_tags
        .chars()
        .filter(|character| !matches!(character, '"' | '\'' | '\\' | '`' | '«' | '»' | '<' | '>'))
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The marker LeadRelay leaves in a lead's description, found again on a retry.
fn marker(lead_id: &str) -> String {
    format!("LeadRelay {lead_id}")
}

/// SalesMan's canonical face.
#[derive(Clone, Debug)]
pub struct SalesManSync {
    credentials: Credentials,
    client: Option<Arc<SalesManClient>>,
    fields: Vec<FieldMapping>,
    added: Arc<std::sync::Mutex<RecentlyAdded>>,
    /// Finding-or-adding a lead runs detached, one lead at a time.
    adding: OneAtATime,
}

/// The SalesMan ids of the leads this adapter added lately, by LeadRelay lead id.
///
/// SalesMan's v1 `list` shows only the newest 200 leads, so the marker search finds a lead added
/// before an orchestrator crash only until 200 more arrive; a retry that comes later (a job
/// orphaned several times in a row) would add the lead again. The orchestrator's crash does not
/// stop this adapter, so the retry finds the id here first. The marker search still covers a
/// restart of the adapter itself.
#[derive(Debug, Default)]
struct RecentlyAdded {
    ids: std::collections::HashMap<String, i64>,
    order: std::collections::VecDeque<String>,
}

/// Leads remembered by [`RecentlyAdded`]: a day of a busy account's leads, a few MiB.
const REMEMBERED: usize = 50_000;

impl RecentlyAdded {
    fn get(&self, lead_id: &str) -> Option<i64> {
        self.ids.get(lead_id).copied()
    }

    fn insert(&mut self, lead_id: &str, id: i64) {
        if self.ids.insert(lead_id.to_owned(), id).is_none() {
            self.order.push_back(lead_id.to_owned());
        }
        while self.order.len() > REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

impl SalesManSync {
    /// The sync over `client`; without it every call but GetCapabilities answers
    /// FAILED_PRECONDITION naming what `credentials` lacks.
    /// `fields` copies Hana attributes into lead parameters (`[mappings.salesman]`).
    pub fn new(
        credentials: Credentials,
        client: Option<Arc<SalesManClient>>,
        fields: Vec<FieldMapping>,
    ) -> Self {
        Self {
            credentials,
            client,
            fields,
            added: Arc::default(),
            adding: OneAtATime::default(),
        }
    }

    /// The client, shared so that work can outlive the call.
    fn client(&self) -> Result<&Arc<SalesManClient>, Status> {
        self.credentials.require()?;
        self.client
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("SalesMan is not configured"))
    }
}

fn linked(lead: &Lead) -> Option<ExternalRef> {
    open_link(
        &lead.external_refs,
        System::Salesman,
        RemoteKind::SalesmanLead,
    )
    .cloned()
}

fn lead_ref(id: i64) -> ExternalRef {
    external_ref(System::Salesman, RemoteKind::SalesmanLead, &id)
}

/// The `add` request a canonical lead becomes, with the mapped attributes in their parameters.
fn add_request(lead: &Lead, fields: &[FieldMapping]) -> AddLeadRequest {
    let mut description = Vec::new();
    if !lead.conversation_url.trim().is_empty() {
        description.push(format!("Hana: {}", lead.conversation_url.trim()));
    }
    if !lead.source_channels.is_empty() {
        description.push(lead.source_channels.join(", "));
    }
    description.push(marker(&lead.id));
    let mut request = AddLeadRequest {
        title: lead.name.trim().to_owned(),
        email: lead.emails.first().cloned().unwrap_or_default(),
        phone: lead.phones.first().cloned().unwrap_or_default(),
        description: description.join("\n"),
        path: lead.source_type.trim().to_owned(),
        utm_source: "hana".to_owned(),
        ..Default::default()
    };
    for mapping in fields {
        let Some(value) = attribute_value(&lead.raw, &mapping.attribute) else {
            continue;
        };
        let parameter = match mapping.field.as_str() {
            "company" => &mut request.company,
            "ip" => &mut request.ip,
            "country" => &mut request.country,
            "city" => &mut request.city,
            "partner" => &mut request.partner,
            "user" => &mut request.user,
            "utm_medium" => &mut request.utm_medium,
            "utm_campaign" => &mut request.utm_campaign,
            "utm_term" => &mut request.utm_term,
            "utm_content" => &mut request.utm_content,
            // The config file accepts no other parameter.
            _ => continue,
        };
        *parameter = value_text(&value);
    }
    request
}

fn not_supported<T>(
    refs: Vec<ExternalRef>,
    wrap: impl FnOnce(i32, Vec<ExternalRef>) -> T,
) -> Response<T> {
    Response::new(wrap(SyncOutcome::NotSupported.into(), refs))
}

#[tonic::async_trait]
impl CrmSyncService for SalesManSync {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        // The leads API v1 adds leads; it has no update, and no deals or activities.
        Ok(Response::new(self.credentials.capabilities(
            System::Salesman,
            self.client.is_some(),
            Abilities {
                creates_leads: true,
                ..Abilities::default()
            },
        )))
    }

    async fn upsert_lead(
        &self,
        request: Request<UpsertLeadRequest>,
    ) -> Result<Response<UpsertLeadResponse>, Status> {
        let client = Arc::clone(self.client()?);
        let lead = request
            .into_inner()
            .lead
            .ok_or_else(|| Status::invalid_argument("lead is required"))?;
        if let Some(link) = linked(&lead) {
            // Already in SalesMan: v1 cannot change it.
            return Ok(not_supported(vec![link], |outcome, refs| {
                UpsertLeadResponse { outcome, refs }
            }));
        }
        let add = add_request(&lead, &self.fields);
        if [&add.title, &add.email, &add.phone]
            .iter()
            .all(|value| value.trim().is_empty())
        {
            return Err(Status::invalid_argument(format!(
                "lead {} has no name, email or phone for SalesMan",
                lead.id
            )));
        }
        // Finding or adding runs in a task of its own, one lead at a time (see `OneAtATime`):
        // a lead SalesMan created for a caller that went away must still be remembered, or the
        // retry, which may come after more than 200 newer leads, would add it again.
        let added = Arc::clone(&self.added);
        let lead_id = lead.id.clone();
        let found_or_added = self.adding.run(&lead.id, async move {
            let remember = || {
                added
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            // Added before, with the link lost to a crash? This adapter remembers the leads it
            // added lately; SalesMan has LeadRelay's marker in the description of each.
            if let Some(id) = remember().get(&lead_id) {
                return Ok::<_, Status>((SyncOutcome::Unchanged, id));
            }
            let wanted = normalize(&marker(&lead_id));
            let newest = client
                .list_page(
                    0,
                    &ListFilter {
                        direction: Direction::NewestFirst,
                        ..ListFilter::default()
                    },
                )
                .await?;
            if let Some(found) = newest
                .iter()
                .find(|existing| normalize(&existing.content).contains(&wanted))
            {
                return Ok((SyncOutcome::Unchanged, found.id));
            }
            let (id, _) = client.add(&add).await?;
            remember().insert(&lead_id, id);
            Ok((SyncOutcome::Created, id))
        });
        let (outcome, id) = found_or_added.await?;
        Ok(Response::new(UpsertLeadResponse {
            outcome: outcome.into(),
            refs: vec![lead_ref(id)],
        }))
    }

    async fn delete_lead(
        &self,
        request: Request<DeleteLeadRequest>,
    ) -> Result<Response<DeleteLeadResponse>, Status> {
        self.client()?;
        let refs = request
            .into_inner()
            .lead
            .as_ref()
            .and_then(linked)
            .into_iter()
            .collect();
        Ok(not_supported(refs, |outcome, refs| DeleteLeadResponse {
            outcome,
            refs,
        }))
    }

    async fn upsert_deal(
        &self,
        _request: Request<UpsertDealRequest>,
    ) -> Result<Response<UpsertDealResponse>, Status> {
        self.client()?;
        Ok(not_supported(Vec::new(), |outcome, refs| {
            UpsertDealResponse { outcome, refs }
        }))
    }

    async fn delete_deal(
        &self,
        _request: Request<DeleteDealRequest>,
    ) -> Result<Response<DeleteDealResponse>, Status> {
        self.client()?;
        Ok(not_supported(Vec::new(), |outcome, refs| {
            DeleteDealResponse { outcome, refs }
        }))
    }

    async fn add_activity(
        &self,
        _request: Request<AddActivityRequest>,
    ) -> Result<Response<AddActivityResponse>, Status> {
        self.client()?;
        Ok(not_supported(Vec::new(), |outcome, refs| {
            AddActivityResponse { outcome, refs }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_normalised_as_salesman_stores_it() {
        assert_eq!(
            normalize("  <b>Компания «Рога и копыта»</b> "),
            "Компания Рога и копыта"
        );
        assert_eq!(normalize(r#"He said "hi" it's \ok"#), "He said hi its ok");
        assert_eq!(normalize("LeadRelay lead_1"), "LeadRelay lead_1");
    }
}
