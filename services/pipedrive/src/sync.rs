//! `CrmSyncService` for Pipedrive: canonical leads, deals and activities as persons, deals and
//! activities, found before they are created and patched with only what differs.
//!
//! - A lead becomes a person: found by its link, else by exact email, else by exact phone, else
//!   created. A found person is patched only where the lead adds something (its name, an email
//!   or phone the person lacks); when nothing differs nothing is sent.
//! - A deal becomes a deal linked to its contact's person (found or created the same way): found
//!   by its link and patched with the fields that differ, else created.
//! - A deleted deal is marked lost with the reason; Pipedrive keeps it for the sales team.
//! - An activity carries LeadRelay's marker (its idempotency key) in its note, so a retry finds
//!   the activity it already added instead of adding a second one.
//!
//! A deal carries LeadRelay's deal id in the "LeadRelay deal id" custom field (found or added
//! once), so a deal created before a lost answer is found among its person's deals instead of
//! being created again. Upserts run detached and one record at a time (`OneAtATime`), so a
//! caller killed mid-create, or two racing runs of one job, do not leave a second record.

use std::sync::Arc;

use leadrelay_proto::v1::{
    AddActivityRequest, AddActivityResponse, DealStatus, DeleteDealRequest, DeleteDealResponse,
    DeleteLeadRequest, DeleteLeadResponse, ExternalRef, GetCapabilitiesRequest,
    GetCapabilitiesResponse, Lead, RemoteKind, SyncOutcome, System, UpsertDealRequest,
    UpsertDealResponse, UpsertLeadRequest, UpsertLeadResponse,
    crm_sync_service_server::CrmSyncService,
};
use leadrelay_runtime::adapter::{Abilities, Credentials, OneAtATime, external_ref, open_link};
use leadrelay_runtime::mappings::{FieldMapping, attribute_value, value_text};
use reqwest::Method;
use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status};

use crate::{
    adapter::{PipedriveApi, amount, contacts},
    client::PipedriveError,
    wire::{WireActivity, WireDeal, WirePerson},
};

/// The reason a deal deleted at its source is marked lost with, when the request gives none.
const DELETED_REASON: &str = "deleted in Hana";

/// Pipedrive's canonical face.
#[derive(Clone, Debug)]
pub struct PipedriveSync {
    credentials: Credentials,
    api: Option<Arc<PipedriveApi>>,
    /// Upserts of leads and deals (find, else create) run detached, one record at a time: a
    /// caller killed mid-create leaves no half-noted record, and two racing runs of one job do
    /// not both create.
    one_at_a_time: OneAtATime,
}

impl PipedriveSync {
    /// The sync over `api`; without it every call but GetCapabilities answers
    /// FAILED_PRECONDITION naming what `credentials` lacks.
    pub fn new(credentials: Credentials, api: Option<Arc<PipedriveApi>>) -> Self {
        Self {
            credentials,
            api,
            one_at_a_time: OneAtATime::default(),
        }
    }

    /// The API, shared so that work can outlive the call.
    fn api(&self) -> Result<&Arc<PipedriveApi>, Status> {
        self.credentials.require()?;
        self.api
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("Pipedrive is not configured"))
    }
}

/// The open link of `kind` among `refs`, as a Pipedrive id.
fn linked(refs: &[ExternalRef], kind: RemoteKind) -> Option<i64> {
    open_link(refs, System::Pipedrive, kind)
        .and_then(|link| link.remote_id.trim().parse().ok())
        .filter(|id: &i64| *id > 0)
}

fn pipedrive_ref(kind: RemoteKind, id: i64) -> ExternalRef {
    external_ref(System::Pipedrive, kind, &id)
}

/// Whether `field` is to be synced: every field when the caller named none.
fn wanted(changed_fields: &[String], field: &str) -> bool {
    changed_fields.is_empty() || changed_fields.iter().any(|changed| changed == field)
}

/// Digits only, so "+84 978-712-200" and "84978712200" compare equal.
fn phone_key(phone: &str) -> String {
    phone.chars().filter(char::is_ascii_digit).collect()
}

/// What a person should hold: a name, emails, phones.
#[derive(Debug, Default)]
struct Contact {
    name: String,
    emails: Vec<String>,
    phones: Vec<String>,
    /// The person's custom fields as the config file maps the lead's attributes.
    custom_fields: Map<String, Value>,
}

/// The custom fields `mappings` fill from `raw` attributes, by Pipedrive field key. Text and
/// numbers go as they are; a list (e.g. several sources) becomes comma-separated text.
fn mapped_custom_fields(
    raw: &std::collections::BTreeMap<String, leadrelay_proto::v1::RawAttribute>,
    mappings: &[FieldMapping],
) -> Map<String, Value> {
    mappings
        .iter()
        .filter_map(|mapping| {
            let value = match attribute_value(raw, &mapping.attribute)? {
                value @ (Value::String(_) | Value::Number(_)) => value,
                other => Value::String(value_text(&other)),
            };
            Some((mapping.field.clone(), value))
        })
        .collect()
}

/// The entries of `wanted` that `current` (a record's `custom_fields`) does not hold already.
fn custom_fields_patch(current: Option<&Value>, wanted: &Map<String, Value>) -> Map<String, Value> {
    wanted
        .iter()
        .filter(|(key, value)| {
            let held = current.and_then(|fields| fields.get(key.as_str()));
            match (held, value) {
                (Some(Value::Number(held)), Value::Number(value)) => {
                    held.as_f64() != value.as_f64()
                }
                (held, value) => held != Some(*value),
            }
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

impl Contact {
    fn of_lead(lead: &Lead, mappings: &[FieldMapping]) -> Self {
        let emails: Vec<String> = lead
            .emails
            .iter()
            .map(|email| email.trim().to_lowercase())
            .filter(|email| !email.is_empty())
            .collect();
        let phones: Vec<String> = lead
            .phones
            .iter()
            .map(|phone| phone.trim().to_owned())
            .filter(|phone| !phone.is_empty())
            .collect();
        Self {
            name: lead.name.trim().to_owned(),
            emails,
            phones,
            custom_fields: mapped_custom_fields(&lead.raw, mappings),
        }
    }

    /// The name a new person gets: Pipedrive requires one.
    fn display_name(&self) -> String {
        [
            Some(self.name.as_str()),
            self.emails.first().map(String::as_str),
            self.phones.first().map(String::as_str),
        ]
        .into_iter()
        .flatten()
        .find(|name| !name.is_empty())
        .unwrap_or("Lead from Hana")
        .to_owned()
    }

    fn is_empty(&self) -> bool {
        self.name.is_empty() && self.emails.is_empty() && self.phones.is_empty()
    }
}

/// Finds or creates the person for `contact`; with `changed_fields`, also patches a found person
/// where `contact` adds something to those fields. Returns its id and what happened.
async fn sync_person(
    api: &PipedriveApi,
    link: Option<i64>,
    contact: &Contact,
    changed_fields: Option<&[String]>,
) -> Result<(i64, SyncOutcome), Status> {
    if let (Some(id), None) = (link, changed_fields) {
        // Only the id is needed: the link is trusted, which saves a call per deal.
        return Ok((id, SyncOutcome::Unchanged));
    }
    let existing = match link {
        Some(id) => match api
            .client()
            .get::<WirePerson>(&format!("persons/{id}"), &[])
            .await
        {
            Ok(person) => Some(person),
            // Deleted in Pipedrive since: found or created anew below.
            Err(PipedriveError::NotFound { .. }) => None,
            Err(error) => return Err(error.into()),
        },
        None => None,
    };
    let existing = match existing {
        Some(person) => Some(person),
        None => find_person(api, contact).await?,
    };
    let Some(person) = existing else {
        let mut body = Map::new();
        body.insert("name".to_owned(), json!(contact.display_name()));
        if !contact.emails.is_empty() {
            body.insert("emails".to_owned(), contacts(&contact.emails, "work"));
        }
        if !contact.phones.is_empty() {
            body.insert("phones".to_owned(), contacts(&contact.phones, "work"));
        }
        if !contact.custom_fields.is_empty() {
            body.insert(
                "custom_fields".to_owned(),
                Value::Object(contact.custom_fields.clone()),
            );
        }
        let created: WirePerson = api.client().send(Method::POST, "persons", &body).await?;
        return Ok((created.id.0, SyncOutcome::Created));
    };
    let id = person.id.0;
    let Some(changed_fields) = changed_fields else {
        return Ok((id, SyncOutcome::Unchanged));
    };
    let mut patch = Map::new();
    let custom = custom_fields_patch(person.custom_fields.as_ref(), &contact.custom_fields);
    if !custom.is_empty() {
        patch.insert("custom_fields".to_owned(), Value::Object(custom));
    }
    let current = leadrelay_proto::pipedrive::v1::Person::from(person);
    if wanted(changed_fields, "name") && !contact.name.is_empty() && contact.name != current.name {
        patch.insert("name".to_owned(), json!(contact.name));
    }
    if wanted(changed_fields, "emails") {
        let known: Vec<String> = current
            .emails
            .iter()
            .map(|email| email.to_lowercase())
            .collect();
        let added: Vec<&String> = contact
            .emails
            .iter()
            .filter(|email| !known.contains(email))
            .collect();
        if !added.is_empty() {
            let mut all = current.emails.clone();
            all.extend(added.into_iter().cloned());
            patch.insert("emails".to_owned(), contacts(&all, "work"));
        }
    }
    if wanted(changed_fields, "phones") {
        let known: Vec<String> = current
            .phones
            .iter()
            .map(|phone| phone_key(phone))
            .collect();
        let added: Vec<&String> = contact
            .phones
            .iter()
            .filter(|phone| !known.contains(&phone_key(phone)))
            .collect();
        if !added.is_empty() {
            let mut all = current.phones.clone();
            all.extend(added.into_iter().cloned());
            patch.insert("phones".to_owned(), contacts(&all, "work"));
        }
    }
    if patch.is_empty() {
        return Ok((id, SyncOutcome::Unchanged));
    }
    let _: WirePerson = api
        .client()
        .send(Method::PATCH, &format!("persons/{id}"), &patch)
        .await?;
    Ok((id, SyncOutcome::Updated))
}

/// The deal of `person_id` that carries `canonical_id` in the marker field `key`, with its id.
/// Listing the person's deals reads what Pipedrive holds now; a search could miss a deal created
/// seconds ago, before the search index has it.
async fn find_marked_deal(
    api: &PipedriveApi,
    key: &str,
    canonical_id: &str,
    person_id: i64,
) -> Result<Option<(i64, Value)>, Status> {
    let deals: Vec<Value> = api
        .client()
        .list_all(
            "deals",
            &[
                ("person_id", person_id.to_string()),
                ("custom_fields", key.to_owned()),
            ],
        )
        .await?;
    Ok(deals.into_iter().find_map(|deal| {
        let marked = deal.pointer(&format!("/custom_fields/{key}"))? == canonical_id;
        let id = deal.get("id")?.as_i64()?;
        marked.then_some((id, deal))
    }))
}

/// A person with one of `contact`'s emails, else one of its phones, exactly.
async fn find_person(api: &PipedriveApi, contact: &Contact) -> Result<Option<WirePerson>, Status> {
    let terms = contact
        .emails
        .iter()
        .map(|email| ("email", email.clone()))
        .chain(contact.phones.iter().map(|phone| ("phone", phone.clone())));
    for (field, term) in terms {
        if let Some(first) = api.search_persons(field, term).await?.into_iter().next() {
            return Ok(Some(first));
        }
    }
    Ok(None)
}

fn status_name(status: DealStatus) -> &'static str {
    match status {
        DealStatus::Won => "won",
        DealStatus::Lost | DealStatus::Deleted => "lost",
        DealStatus::Open | DealStatus::Unspecified => "open",
    }
}

/// The fields a deal should hold in Pipedrive, as v2 takes them.
fn deal_fields(
    deal: &leadrelay_proto::v1::Deal,
    person_id: Option<i64>,
) -> Result<Map<String, Value>, Status> {
    let mut fields = Map::new();
    let title = match deal.title.trim() {
        "" => "Deal from Hana",
        title => title,
    };
    fields.insert("title".to_owned(), json!(title));
    if let Some(money) = &deal.value
        && !money.amount.trim().is_empty()
    {
        fields.insert("value".to_owned(), amount(&money.amount)?);
        let code = money.currency_code.trim().to_ascii_uppercase();
        if code.len() == 3 {
            fields.insert("currency".to_owned(), json!(code));
        }
    }
    let status = deal.status();
    fields.insert("status".to_owned(), json!(status_name(status)));
    if matches!(status, DealStatus::Lost | DealStatus::Deleted) {
        let reason = match deal.lost_reason.trim() {
            "" if status == DealStatus::Deleted => DELETED_REASON,
            reason => reason,
        };
        if !reason.is_empty() {
            fields.insert("lost_reason".to_owned(), json!(reason));
        }
    }
    if let Some(date) = &deal.expected_close_date
        && let Some(day) = chrono::NaiveDate::from_ymd_opt(
            date.year,
            u32::try_from(date.month).unwrap_or(0),
            u32::try_from(date.day).unwrap_or(0),
        )
    {
        fields.insert(
            "expected_close_date".to_owned(),
            json!(day.format("%Y-%m-%d").to_string()),
        );
    }
    for (key, id) in [
        ("pipeline_id", &deal.pipeline_id),
        ("stage_id", &deal.stage_id),
    ] {
        if let Ok(id) = id.trim().parse::<i64>()
            && id > 0
        {
            fields.insert(key.to_owned(), json!(id));
        }
    }
    if let Some(person_id) = person_id {
        fields.insert("person_id".to_owned(), json!(person_id));
    }
    Ok(fields)
}

/// The canonical field a Pipedrive deal field comes from, for `changed_fields`.
fn canonical_field(key: &str) -> &'static str {
    match key {
        "title" => "title",
        "value" | "currency" => "value",
        "status" | "lost_reason" => "status",
        "expected_close_date" => "expected_close_date",
        "pipeline_id" | "stage_id" => "stage_id",
        "person_id" => "contact",
        _ => "",
    }
}

/// The fields of `wanted` whose value differs from the deal as Pipedrive holds it.
fn deal_patch(
    current: &Value,
    wanted_fields: Map<String, Value>,
    changed_fields: &[String],
) -> Map<String, Value> {
    wanted_fields
        .into_iter()
        .filter(|(key, _)| wanted(changed_fields, canonical_field(key)) || key == "person_id")
        .filter(|(key, value)| {
            let held = current.get(key).unwrap_or(&Value::Null);
            match (held, value) {
                // 120.5 and 120.50 are the same amount.
                (Value::Number(held), Value::Number(value)) => held.as_f64() != value.as_f64(),
                (held, value) => held != value,
            }
        })
        .collect()
}

/// `upsert_lead`, once its turn has come (see `PipedriveSync::one_at_a_time`).
async fn upsert_lead_now(
    api: &PipedriveApi,
    request: UpsertLeadRequest,
) -> Result<UpsertLeadResponse, Status> {
    let lead = request
        .lead
        .ok_or_else(|| Status::invalid_argument("lead is required"))?;
    let contact = Contact::of_lead(&lead, api.person_fields());
    let link = linked(&lead.external_refs, RemoteKind::PipedrivePerson);
    if contact.is_empty() && link.is_none() {
        return Err(Status::invalid_argument(format!(
            "lead {} has no name, email or phone to make a Pipedrive person of",
            lead.id
        )));
    }
    let (id, outcome) = sync_person(api, link, &contact, Some(&request.changed_fields)).await?;
    Ok(UpsertLeadResponse {
        outcome: outcome.into(),
        refs: vec![pipedrive_ref(RemoteKind::PipedrivePerson, id)],
    })
}

/// `upsert_deal`, once its turn has come (see `PipedriveSync::one_at_a_time`).
async fn upsert_deal_now(
    api: &PipedriveApi,
    request: UpsertDealRequest,
) -> Result<UpsertDealResponse, Status> {
    let deal = request
        .deal
        .ok_or_else(|| Status::invalid_argument("deal is required"))?;
    // The contact: the known lead, else the contact details on the deal.
    let (person_link, contact) = match &request.contact {
        Some(lead) => (
            linked(&lead.external_refs, RemoteKind::PipedrivePerson),
            Contact::of_lead(lead, api.person_fields()),
        ),
        None => {
            let given = deal.contact.clone().unwrap_or_default();
            let contact = Contact {
                name: given.name.trim().to_owned(),
                emails: Some(given.email.trim().to_lowercase())
                    .filter(|email| !email.is_empty())
                    .into_iter()
                    .collect(),
                phones: Some(given.phone.trim().to_owned())
                    .filter(|phone| !phone.is_empty())
                    .into_iter()
                    .collect(),
                custom_fields: Map::new(),
            };
            (None, contact)
        }
    };
    let mut refs = Vec::new();
    let person_id = if contact.is_empty() && person_link.is_none() {
        None
    } else {
        // The deal's sync does not rewrite the contact: only a missing person is created.
        let (id, _) = sync_person(api, person_link, &contact, None).await?;
        refs.push(pipedrive_ref(RemoteKind::PipedrivePerson, id));
        Some(id)
    };
    let mut fields = deal_fields(&deal, person_id)?;
    let current = match linked(&deal.external_refs, RemoteKind::PipedriveDeal) {
        Some(id) => match api.client().get::<Value>(&format!("deals/{id}"), &[]).await {
            Ok(current) => Some((id, current)),
            Err(PipedriveError::NotFound { .. }) => None,
            Err(error) => return Err(error.into()),
        },
        None => None,
    };
    // Not linked (or gone): a deal this one created earlier, whose link was lost to a crash
    // or a timed-out answer, is found by the marker it was created with.
    let marker = match deal.id.trim() {
        "" => None,
        id => api.deal_marker_key().await?.map(|key| (key, id)),
    };
    let current = match (current, marker, person_id) {
        (None, Some((key, id)), Some(person_id)) => {
            find_marked_deal(api, key, id, person_id).await?
        }
        (current, _, _) => current,
    };

    let custom = mapped_custom_fields(&deal.raw, api.deal_fields());
    let outcome = match current {
        Some((id, current)) => {
            refs.push(pipedrive_ref(RemoteKind::PipedriveDeal, id));
            let mut patch = deal_patch(&current, fields, &request.changed_fields);
            let custom = custom_fields_patch(current.get("custom_fields"), &custom);
            if !custom.is_empty() {
                patch.insert("custom_fields".to_owned(), Value::Object(custom));
            }
            if patch.is_empty() {
                SyncOutcome::Unchanged
            } else {
                let _: WireDeal = api
                    .client()
                    .send(Method::PATCH, &format!("deals/{id}"), &patch)
                    .await?;
                SyncOutcome::Updated
            }
        }
        None => {
            let mut custom = custom;
            if let Some((key, id)) = marker {
                custom.insert(key.to_owned(), json!(id));
            }
            if !custom.is_empty() {
                fields.insert("custom_fields".to_owned(), Value::Object(custom));
            }
            let created: WireDeal = api.client().send(Method::POST, "deals", &fields).await?;
            refs.push(pipedrive_ref(RemoteKind::PipedriveDeal, created.id.0));
            SyncOutcome::Created
        }
    };
    Ok(UpsertDealResponse {
        outcome: outcome.into(),
        refs,
    })
}

#[tonic::async_trait]
impl CrmSyncService for PipedriveSync {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(self.credentials.capabilities(
            System::Pipedrive,
            self.api.is_some(),
            Abilities {
                creates_leads: true,
                updates_leads: true,
                syncs_deals: true,
                adds_activities: true,
            },
        )))
    }

    async fn upsert_lead(
        &self,
        request: Request<UpsertLeadRequest>,
    ) -> Result<Response<UpsertLeadResponse>, Status> {
        let api = Arc::clone(self.api()?);
        let request = request.into_inner();
        let key = request
            .lead
            .as_ref()
            .map(|lead| lead.id.clone())
            .unwrap_or_default();
        self.one_at_a_time
            .run(&key, async move { upsert_lead_now(&api, request).await })
            .await
            .map(Response::new)
    }

    async fn delete_lead(
        &self,
        request: Request<DeleteLeadRequest>,
    ) -> Result<Response<DeleteLeadResponse>, Status> {
        self.api()?;
        // Pipedrive keeps the person: it belongs to the sales team's history. LeadRelay only
        // closes its link.
        let refs = request
            .into_inner()
            .lead
            .and_then(|lead| linked(&lead.external_refs, RemoteKind::PipedrivePerson))
            .map(|id| vec![pipedrive_ref(RemoteKind::PipedrivePerson, id)])
            .unwrap_or_default();
        Ok(Response::new(DeleteLeadResponse {
            outcome: SyncOutcome::NotSupported.into(),
            refs,
        }))
    }

    async fn upsert_deal(
        &self,
        request: Request<UpsertDealRequest>,
    ) -> Result<Response<UpsertDealResponse>, Status> {
        let api = Arc::clone(self.api()?);
        let request = request.into_inner();
        let key = request
            .deal
            .as_ref()
            .map(|deal| deal.id.clone())
            .unwrap_or_default();
        self.one_at_a_time
            .run(&key, async move { upsert_deal_now(&api, request).await })
            .await
            .map(Response::new)
    }

    async fn delete_deal(
        &self,
        request: Request<DeleteDealRequest>,
    ) -> Result<Response<DeleteDealResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let Some(id) = request
            .deal
            .as_ref()
            .and_then(|deal| linked(&deal.external_refs, RemoteKind::PipedriveDeal))
        else {
            // Never synced to Pipedrive: nothing to close.
            return Ok(Response::new(DeleteDealResponse {
                outcome: SyncOutcome::Unchanged.into(),
                refs: Vec::new(),
            }));
        };
        let reason = match request.reason.trim() {
            "" => DELETED_REASON,
            reason => reason,
        };
        let current: Value = match api.client().get(&format!("deals/{id}"), &[]).await {
            Ok(current) => current,
            Err(PipedriveError::NotFound { .. }) => {
                return Ok(Response::new(DeleteDealResponse {
                    outcome: SyncOutcome::Unchanged.into(),
                    refs: vec![pipedrive_ref(RemoteKind::PipedriveDeal, id)],
                }));
            }
            Err(error) => return Err(error.into()),
        };
        let outcome = if current.get("status") == Some(&json!("lost")) {
            SyncOutcome::Unchanged
        } else {
            let patch = json!({"status": "lost", "lost_reason": reason});
            let _: WireDeal = api
                .client()
                .send(Method::PATCH, &format!("deals/{id}"), &patch)
                .await?;
            SyncOutcome::Updated
        };
        Ok(Response::new(DeleteDealResponse {
            outcome: outcome.into(),
            refs: vec![pipedrive_ref(RemoteKind::PipedriveDeal, id)],
        }))
    }

    async fn add_activity(
        &self,
        request: Request<AddActivityRequest>,
    ) -> Result<Response<AddActivityResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let activity = request
            .activity
            .ok_or_else(|| Status::invalid_argument("activity is required"))?;
        let key = request.idempotency_key.trim();
        if key.is_empty() {
            return Err(Status::invalid_argument("idempotency_key is required"));
        }
        let deal_id = request
            .deal
            .as_ref()
            .and_then(|deal| linked(&deal.external_refs, RemoteKind::PipedriveDeal));
        let person_id = request
            .contact
            .as_ref()
            .and_then(|lead| linked(&lead.external_refs, RemoteKind::PipedrivePerson));
        let (scope, id) = match (deal_id, person_id) {
            (Some(deal_id), _) => ("deal_id", deal_id),
            (None, Some(person_id)) => ("person_id", person_id),
            (None, None) => {
                return Err(Status::failed_precondition(
                    "the activity's deal and contact are not in Pipedrive yet; sync them first",
                ));
            }
        };
        let marker = format!("LeadRelay: {key}");
        // A retry finds the activity it already added by the marker in its note.
        let existing: Vec<WireActivity> = api
            .client()
            .list_all("activities", &[(scope, id.to_string())])
            .await?;
        if let Some(found) = existing.into_iter().find(|activity| {
            activity
                .note
                .as_deref()
                .is_some_and(|note| note.contains(&marker))
        }) {
            return Ok(Response::new(AddActivityResponse {
                outcome: SyncOutcome::Unchanged.into(),
                refs: vec![pipedrive_ref(RemoteKind::PipedriveActivity, found.id.0)],
            }));
        }
        let kind = match activity.r#type.trim() {
            "" => "task",
            kind => kind,
        };
        api.check_activity_type(kind).await?;
        let mut body = Map::new();
        let subject = match activity.subject.trim() {
            "" => "Hana conversation",
            subject => subject,
        };
        body.insert("subject".to_owned(), json!(subject));
        body.insert("type".to_owned(), json!(kind));
        if let Some(deal_id) = deal_id {
            body.insert("deal_id".to_owned(), json!(deal_id));
        }
        if let Some(person_id) = person_id {
            body.insert(
                "participants".to_owned(),
                json!([{"person_id": person_id, "primary": true}]),
            );
        }
        // The Hana conversation link is the point of the activity when the caller gave no note.
        let conversation = request
            .deal
            .as_ref()
            .map(|deal| deal.conversation_url.trim())
            .filter(|url| !url.is_empty())
            .or_else(|| {
                request
                    .contact
                    .as_ref()
                    .map(|lead| lead.conversation_url.trim())
                    .filter(|url| !url.is_empty())
            });
        let note = match (activity.note.trim(), conversation) {
            ("", Some(url)) => format!(
                "<p>Hana conversation: <a href=\"{}\">{}</a></p><p>{marker}</p>",
                html_escape(url),
                html_escape(url)
            ),
            ("", None) => format!("<p>{marker}</p>"),
            (note, _) => format!("{note}<p>{marker}</p>"),
        };
        body.insert("note".to_owned(), json!(note));
        if activity.done {
            body.insert("done".to_owned(), json!(true));
        }
        let created: WireActivity = api.client().send(Method::POST, "activities", &body).await?;
        Ok(Response::new(AddActivityResponse {
            outcome: SyncOutcome::Created.into(),
            refs: vec![pipedrive_ref(RemoteKind::PipedriveActivity, created.id.0)],
        }))
    }
}

/// Text safe inside HTML, attribute values included.
fn html_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}
