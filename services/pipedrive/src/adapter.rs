//! `PipedriveAdapterService`: the connector's operations on API v2 (webhooks on v1).
//!
//! Requests are checked before anything is sent, so a call Pipedrive would refuse costs no part
//! of the budget: required fields, dates, the deal status rules (a lost reason only with "lost"),
//! a stage against its pipeline, an activity type against the account's types. Updates send only
//! the fields the caller set.

use std::sync::Arc;

use leadrelay_proto::{
    json::from_proto_struct,
    pipedrive::v1::{
        AddActivityRequest, AddActivityResponse, AddDealRequest, AddDealResponse,
        CreatePersonRequest, CreatePersonResponse, Deal, DealStatus, DeleteWebhookRequest,
        DeleteWebhookResponse, GetDealRequest, GetDealResponse, GetStageRequest, GetStageResponse,
        ListActivitiesRequest, ListActivitiesResponse, ListDealsRequest, ListDealsResponse,
        ListNewActivitiesRequest, ListNewActivitiesResponse, ListNewDealsRequest,
        ListNewDealsResponse, ListStagesRequest, ListStagesResponse, ListWebhooksRequest,
        ListWebhooksResponse, RegisterWebhookRequest, RegisterWebhookResponse,
        SearchPersonsRequest, SearchPersonsResponse, Stage, UpdateDealRequest, UpdateDealResponse,
        UpdateDealStageRequest, UpdateDealStageResponse, UpdateDealStatusRequest,
        UpdateDealStatusResponse, UpdatePersonRequest, UpdatePersonResponse,
        pipedrive_adapter_service_server::PipedriveAdapterService,
    },
};
use leadrelay_runtime::{
    Settings,
    adapter::Credentials,
    mappings::{FieldMapping, Mappings},
};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status};

use crate::{
    client::{MAX_PAGE, PipedriveClient, PipedriveError},
    wire::{
        self, PersonSearch, WireActivity, WireActivityType, WireDeal, WireField, WirePerson,
        WireStage, WireWebhook,
    },
};

/// What the adapter talks to Pipedrive with, once configured.
#[derive(Debug)]
pub struct PipedriveApi {
    client: PipedriveClient,
    webhook_user: Option<String>,
    webhook_password: Option<SecretString>,
    /// The account's activity type keys, read once and again when a type is not among them.
    activity_types: tokio::sync::Mutex<Option<Vec<String>>>,
    /// The key of the deal field that holds LeadRelay's deal id, found or added once; `None`
    /// when the token may not add it.
    deal_marker_key: tokio::sync::OnceCell<Option<String>>,
    /// Hana lead attributes → person custom fields (`[mappings.pipedrive.person]`).
    person_fields: Vec<FieldMapping>,
    /// Hana ticket attributes → deal custom fields (`[mappings.pipedrive.deal]`).
    deal_fields: Vec<FieldMapping>,
}

/// The name of the deal field LeadRelay marks the deals it creates with.
pub const DEAL_MARKER_FIELD: &str = "LeadRelay deal id";

impl PipedriveApi {
    /// The API as the settings configure it, paced within the configured budget; `None` when
    /// no API token is set.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, PipedriveError> {
        let pipedrive = &settings.pipedrive;
        let Some(token) = pipedrive.api_token.clone() else {
            return Ok(None);
        };
        let client = PipedriveClient::new(&pipedrive.api_url, token, pipedrive.timeout)?
            .paced_with_search_limit(pipedrive.rate_limit, pipedrive.search_rate_limit);
        Ok(Some(
            Self::new(
                client,
                pipedrive.webhook_user.clone(),
                pipedrive.webhook_password.clone(),
            )
            .with_field_mappings(&settings.mappings),
        ))
    }

    /// The API over `client`; the webhook credentials are the defaults of RegisterWebhook.
    pub fn new(
        client: PipedriveClient,
        webhook_user: Option<String>,
        webhook_password: Option<SecretString>,
    ) -> Self {
        Self {
            client,
            webhook_user,
            webhook_password,
            activity_types: tokio::sync::Mutex::new(None),
            deal_marker_key: tokio::sync::OnceCell::new(),
            person_fields: Vec::new(),
            deal_fields: Vec::new(),
        }
    }

    /// The API filling person and deal custom fields from Hana attributes as `mappings` say.
    pub fn with_field_mappings(mut self, mappings: &Mappings) -> Self {
        self.person_fields.clone_from(&mappings.pipedrive_person);
        self.deal_fields.clone_from(&mappings.pipedrive_deal);
        self
    }

    /// The person custom fields the config file maps.
    pub(crate) fn person_fields(&self) -> &[FieldMapping] {
        &self.person_fields
    }

    /// The deal custom fields the config file maps.
    pub(crate) fn deal_fields(&self) -> &[FieldMapping] {
        &self.deal_fields
    }

    /// The key of the custom deal field [`DEAL_MARKER_FIELD`], added to the account when it is
    /// not there yet. Read once per process: field keys never change. `None` when the API token
    /// may not add deal fields: deals are then created without the marker (a warning says what
    /// that risks and how to fix it) rather than not at all.
    pub(crate) async fn deal_marker_key(&self) -> Result<Option<&str>, PipedriveError> {
        let key = self
            .deal_marker_key
            .get_or_try_init(|| async {
                let fields: Vec<WireField> = match self
                    .client
                    .v1::<Vec<WireField>, ()>(Method::GET, "dealFields", None)
                    .await
                {
                    Ok(fields) => fields.unwrap_or_default(),
                    Err(PipedriveError::Forbidden { message, .. }) => {
                        return Ok(without_marker(&message));
                    }
                    Err(error) => return Err(error),
                };
                if let Some(field) = fields.into_iter().find(|f| f.name == DEAL_MARKER_FIELD) {
                    return Ok(Some(field.key));
                }
                let body = json!({"name": DEAL_MARKER_FIELD, "field_type": "varchar"});
                match self
                    .client
                    .v1::<WireField, _>(Method::POST, "dealFields", Some(&body))
                    .await
                {
                    Ok(Some(added)) => Ok(Some(added.key)),
                    Ok(None) => Err(PipedriveError::Unexpected(
                        "adding a deal field returned no field".into(),
                    )),
                    Err(PipedriveError::Forbidden { message, .. }) => Ok(without_marker(&message)),
                    Err(error) => Err(error),
                }
            })
            .await?;
        Ok(key.as_deref())
    }

    /// The REST client.
    pub fn client(&self) -> &PipedriveClient {
        &self.client
    }

    /// Persons whose `field` ("email" or "phone") is exactly `term`, best match first.
    pub(crate) async fn search_persons(
        &self,
        field: &str,
        term: String,
    ) -> Result<Vec<WirePerson>, PipedriveError> {
        let query = [
            ("term", term),
            ("fields", field.to_owned()),
            ("exact_match", "true".to_owned()),
        ];
        let found: PersonSearch = self.client.get("persons/search", &query).await?;
        Ok(found.items.into_iter().map(|result| result.item).collect())
    }

    /// Refuses `kind` unless it is one of the account's active activity types.
    pub(crate) async fn check_activity_type(&self, kind: &str) -> Result<(), Status> {
        let mut known = self.activity_types.lock().await;
        if known
            .as_ref()
            .is_some_and(|types| types.iter().any(|t| t == kind))
        {
            return Ok(());
        }
        // Not known yet, or added since the last read: read the types again.
        let types: Vec<WireActivityType> = self
            .client
            .v1::<Vec<WireActivityType>, ()>(Method::GET, "activityTypes", None)
            .await?
            .unwrap_or_default();
        let types: Vec<String> = types
            .into_iter()
            .filter(WireActivityType::is_active)
            .filter_map(|t| t.key_string)
            .collect();
        let found = types.iter().any(|t| t == kind);
        let listed = types.join(", ");
        *known = Some(types);
        if found {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "activity type '{kind}' is not one of the account's active types ({listed})"
            )))
        }
    }
}

/// Warns that deals go without the marker field, and why; returns `None`.
fn without_marker(refusal: &str) -> Option<String> {
    tracing::warn!(
        refusal,
        "the API token may not add the '{DEAL_MARKER_FIELD}' deal field: deals are created without it, so a crash between creating a deal and storing its link can create it twice; add a text deal field named '{DEAL_MARKER_FIELD}' in Pipedrive, or use a token that may"
    );
    None
}

/// The objects a Pipedrive webhook can watch.
const WEBHOOK_OBJECTS: [&str; 11] = [
    "activity",
    "deal",
    "lead",
    "note",
    "organization",
    "person",
    "pipeline",
    "product",
    "stage",
    "user",
    "*",
];

/// Pipedrive's native gRPC face.
#[derive(Clone, Debug)]
pub struct PipedriveAdapter {
    credentials: Credentials,
    api: Option<Arc<PipedriveApi>>,
}

impl PipedriveAdapter {
    /// The adapter over `api`; without it every RPC answers FAILED_PRECONDITION naming what
    /// `credentials` lacks.
    pub fn new(credentials: Credentials, api: Option<Arc<PipedriveApi>>) -> Self {
        Self { credentials, api }
    }

    /// Whether the API token is set.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The shared API, for the canonical face.
    pub(crate) fn api_handle(&self) -> Option<Arc<PipedriveApi>> {
        self.api.clone()
    }

    fn api(&self) -> Result<&PipedriveApi, Status> {
        self.credentials.require()?;
        self.api
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("Pipedrive is not configured"))
    }
}

fn positive(id: i64, what: &str) -> Result<i64, Status> {
    if id > 0 {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!(
            "{what} is required (a positive Pipedrive id)"
        )))
    }
}

fn date(text: &str, what: &str) -> Result<String, Status> {
    chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map(|day| day.format("%Y-%m-%d").to_string())
        .map_err(|_| Status::invalid_argument(format!("{what} '{text}' is not a YYYY-MM-DD date")))
}

fn clock(text: &str, what: &str) -> Result<String, Status> {
    chrono::NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .map(|time| time.format("%H:%M").to_string())
        .map_err(|_| Status::invalid_argument(format!("{what} '{text}' is not an HH:MM time")))
}

/// A decimal string as the JSON number v2 requires (it refuses numeric strings).
pub(crate) fn amount(text: &str) -> Result<Value, Status> {
    let number: serde_json::Number = text
        .trim()
        .parse()
        .map_err(|_| Status::invalid_argument(format!("value '{text}' is not a decimal number")))?;
    Ok(Value::Number(number))
}

fn visibility(visible_to: i32) -> Result<Value, Status> {
    if [1, 3, 5, 7].contains(&visible_to) {
        Ok(json!(visible_to))
    } else {
        Err(Status::invalid_argument(format!(
            "visible_to {visible_to} is not one of 1 (owner), 3 (company), 5 (group), 7 (group and sub-groups)"
        )))
    }
}

fn currency(code: &str) -> Result<Value, Status> {
    let code = code.trim().to_ascii_uppercase();
    if code.len() == 3 && code.bytes().all(|byte| byte.is_ascii_alphabetic()) {
        Ok(Value::String(code))
    } else {
        Err(Status::invalid_argument(format!(
            "currency '{code}' is not a 3-letter ISO 4217 code"
        )))
    }
}

/// Puts `id` under `key` when it names a record.
fn put_id(body: &mut Map<String, Value>, key: &str, id: i64) {
    if id > 0 {
        body.insert(key.to_owned(), json!(id));
    }
}

/// Puts `fields` under `custom_fields` when there are any (keyed by the account's field keys).
fn put_custom_fields(body: &mut Map<String, Value>, fields: Option<&prost_types::Struct>) {
    if let Some(fields) = fields.filter(|fields| !fields.fields.is_empty()) {
        body.insert(
            "custom_fields".to_owned(),
            Value::Object(from_proto_struct(fields)),
        );
    }
}

/// Emails or phones as v2 persons take them, the first marked primary.
pub(crate) fn contacts(values: &[String], label: &str) -> Value {
    Value::Array(
        values
            .iter()
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
            .enumerate()
            .map(|(position, value)| json!({"value": value, "primary": position == 0, "label": label}))
            .collect(),
    )
}

fn deal_of(wire: WireDeal) -> Option<Deal> {
    Some(wire.into())
}

async fn get<T: DeserializeOwned>(api: &PipedriveApi, path: &str) -> Result<T, Status> {
    Ok(api.client.get(path, &[]).await?)
}

async fn send<T: DeserializeOwned>(
    api: &PipedriveApi,
    method: Method,
    path: &str,
    body: &Map<String, Value>,
) -> Result<T, Status> {
    Ok(api.client.send(method, path, body).await?)
}

/// The newest records of `path` with an id above `after_id`, oldest first, at most `limit`;
/// with no watermark, the newest page only (to start one).
async fn new_since<W, T>(
    api: &PipedriveApi,
    path: &str,
    after_id: i64,
    limit: u32,
    id_of: impl Fn(&W) -> i64,
) -> Result<(Vec<T>, i64), Status>
where
    W: DeserializeOwned,
    T: From<W>,
{
    let limit = match limit {
        0 => 100,
        limit => limit.min(MAX_PAGE),
    };
    let query = [
        ("sort_by", "id".to_owned()),
        ("sort_direction", "desc".to_owned()),
    ];
    let mut newest_first: Vec<W> = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = api
            .client
            .list_page::<W>(path, &query, limit, cursor)
            .await?;
        let reached = page.iter().any(|item| id_of(item) <= after_id);
        newest_first.extend(page.into_iter().filter(|item| id_of(item) > after_id));
        if after_id == 0 || reached {
            break;
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    newest_first.sort_by_key(|item| id_of(item));
    // The oldest first, so that a watermark moved to the last one skips nothing.
    newest_first.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_after_id = newest_first.last().map_or(after_id, &id_of);
    Ok((
        newest_first.into_iter().map(T::from).collect(),
        next_after_id,
    ))
}

fn updated_since(
    at: Option<&prost_types::Timestamp>,
) -> Result<Vec<(&'static str, String)>, Status> {
    let mut query = vec![
        ("sort_by", "update_time".to_owned()),
        ("sort_direction", "asc".to_owned()),
    ];
    if let Some(at) = at {
        let text = wire::rfc3339(at)
            .ok_or_else(|| Status::invalid_argument("updated_since is not a valid time"))?;
        query.push(("updated_since", text));
    }
    Ok(query)
}

#[tonic::async_trait]
impl PipedriveAdapterService for PipedriveAdapter {
    async fn add_deal(
        &self,
        request: Request<AddDealRequest>,
    ) -> Result<Response<AddDealResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let title = request.title.trim();
        if title.is_empty() {
            return Err(Status::invalid_argument("title is required"));
        }
        let mut body = Map::new();
        body.insert("title".to_owned(), json!(title));
        put_id(&mut body, "owner_id", request.owner_id);
        put_id(&mut body, "person_id", request.person_id);
        put_id(&mut body, "org_id", request.org_id);
        put_id(&mut body, "pipeline_id", request.pipeline_id);
        put_id(&mut body, "stage_id", request.stage_id);
        if !request.value.trim().is_empty() {
            body.insert("value".to_owned(), amount(&request.value)?);
        }
        if !request.currency.trim().is_empty() {
            body.insert("currency".to_owned(), currency(&request.currency)?);
        }
        let status = request.status();
        if status == DealStatus::Deleted {
            return Err(Status::invalid_argument(
                "a new deal cannot be deleted; use open, won or lost",
            ));
        }
        if let Some(name) = wire::status_name(status) {
            body.insert("status".to_owned(), json!(name));
        }
        if !request.lost_reason.trim().is_empty() {
            if status != DealStatus::Lost {
                return Err(Status::invalid_argument(
                    "lost_reason can only be set with status lost",
                ));
            }
            body.insert("lost_reason".to_owned(), json!(request.lost_reason.trim()));
        }
        if !request.expected_close_date.trim().is_empty() {
            body.insert(
                "expected_close_date".to_owned(),
                json!(date(&request.expected_close_date, "expected_close_date")?),
            );
        }
        if request.visible_to != 0 {
            body.insert("visible_to".to_owned(), visibility(request.visible_to)?);
        }
        if !request.label_ids.is_empty() {
            body.insert("label_ids".to_owned(), json!(request.label_ids));
        }
        put_custom_fields(&mut body, request.custom_fields.as_ref());
        let deal: WireDeal = send(api, Method::POST, "deals", &body).await?;
        Ok(Response::new(AddDealResponse {
            deal: deal_of(deal),
        }))
    }

    async fn get_deal(
        &self,
        request: Request<GetDealRequest>,
    ) -> Result<Response<GetDealResponse>, Status> {
        let api = self.api()?;
        let id = positive(request.get_ref().id, "id")?;
        let deal: WireDeal = get(api, &format!("deals/{id}")).await?;
        Ok(Response::new(GetDealResponse {
            deal: deal_of(deal),
        }))
    }

    async fn update_deal(
        &self,
        request: Request<UpdateDealRequest>,
    ) -> Result<Response<UpdateDealResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let id = positive(request.id, "id")?;
        let mut body = Map::new();
        if let Some(title) = &request.title {
            if title.trim().is_empty() {
                return Err(Status::invalid_argument("title cannot be made empty"));
            }
            body.insert("title".to_owned(), json!(title.trim()));
        }
        for (key, id) in [
            ("owner_id", request.owner_id),
            ("person_id", request.person_id),
            ("org_id", request.org_id),
        ] {
            match id {
                // 0 unlinks (null); the owner cannot be removed.
                Some(0) if key != "owner_id" => {
                    body.insert(key.to_owned(), Value::Null);
                }
                Some(id) => {
                    body.insert(key.to_owned(), json!(positive(id, key)?));
                }
                None => {}
            }
        }
        if let Some(value) = &request.value {
            body.insert("value".to_owned(), amount(value)?);
        }
        if let Some(code) = &request.currency {
            body.insert("currency".to_owned(), currency(code)?);
        }
        if let Some(day) = &request.expected_close_date {
            let day = if day.trim().is_empty() {
                Value::Null
            } else {
                json!(date(day, "expected_close_date")?)
            };
            body.insert("expected_close_date".to_owned(), day);
        }
        if let Some(visible_to) = request.visible_to {
            body.insert("visible_to".to_owned(), visibility(visible_to)?);
        }
        put_custom_fields(&mut body, request.custom_fields.as_ref());
        if body.is_empty() {
            return Err(Status::invalid_argument(
                "nothing to change: set at least one field",
            ));
        }
        let deal: WireDeal = send(api, Method::PATCH, &format!("deals/{id}"), &body).await?;
        Ok(Response::new(UpdateDealResponse {
            deal: deal_of(deal),
        }))
    }

    async fn update_deal_status(
        &self,
        request: Request<UpdateDealStatusRequest>,
    ) -> Result<Response<UpdateDealStatusResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let id = positive(request.id, "id")?;
        let status = request.status();
        let lost_reason = request.lost_reason.trim();
        if !lost_reason.is_empty() && status != DealStatus::Lost {
            return Err(Status::invalid_argument(
                "lost_reason can only be set with status lost",
            ));
        }
        let path = format!("deals/{id}");
        if status == DealStatus::Deleted {
            // v2 has no "deleted" status: the deal is deleted, and answered as it was.
            let before: WireDeal = get(api, &path).await?;
            api.client.delete(&path).await?;
            let mut deal = Deal::from(before);
            deal.is_deleted = true;
            deal.set_status(DealStatus::Deleted);
            return Ok(Response::new(UpdateDealStatusResponse { deal: Some(deal) }));
        }
        let name = wire::status_name(status).ok_or_else(|| {
            Status::invalid_argument("status is required: open, won, lost or deleted")
        })?;
        let mut body = Map::new();
        body.insert("status".to_owned(), json!(name));
        if !lost_reason.is_empty() {
            body.insert("lost_reason".to_owned(), json!(lost_reason));
        }
        let deal: WireDeal = send(api, Method::PATCH, &path, &body).await?;
        Ok(Response::new(UpdateDealStatusResponse {
            deal: deal_of(deal),
        }))
    }

    async fn update_deal_stage(
        &self,
        request: Request<UpdateDealStageRequest>,
    ) -> Result<Response<UpdateDealStageResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let id = positive(request.id, "id")?;
        let stage_id = positive(request.stage_id, "stage_id")?;
        let close_date = if request.expected_close_date.trim().is_empty() {
            None
        } else {
            Some(date(&request.expected_close_date, "expected_close_date")?)
        };
        let stage: WireStage = get(api, &format!("stages/{stage_id}")).await?;
        let stage = Stage::from(stage);
        if request.pipeline_id != 0 && stage.pipeline_id != request.pipeline_id {
            return Err(Status::invalid_argument(format!(
                "stage {stage_id} ('{}') belongs to pipeline {}, not pipeline {}; the deal was not moved",
                stage.name, stage.pipeline_id, request.pipeline_id
            )));
        }
        let mut body = Map::new();
        body.insert("stage_id".to_owned(), json!(stage_id));
        body.insert("pipeline_id".to_owned(), json!(stage.pipeline_id));
        if let Some(day) = close_date {
            body.insert("expected_close_date".to_owned(), json!(day));
        }
        let deal: WireDeal = send(api, Method::PATCH, &format!("deals/{id}"), &body).await?;
        Ok(Response::new(UpdateDealStageResponse {
            deal: deal_of(deal),
        }))
    }

    async fn get_stage(
        &self,
        request: Request<GetStageRequest>,
    ) -> Result<Response<GetStageResponse>, Status> {
        let api = self.api()?;
        let id = positive(request.get_ref().id, "id")?;
        let stage: WireStage = get(api, &format!("stages/{id}")).await?;
        Ok(Response::new(GetStageResponse {
            stage: Some(stage.into()),
        }))
    }

    async fn list_stages(
        &self,
        request: Request<ListStagesRequest>,
    ) -> Result<Response<ListStagesResponse>, Status> {
        let api = self.api()?;
        let mut query = Vec::new();
        if request.get_ref().pipeline_id > 0 {
            query.push(("pipeline_id", request.get_ref().pipeline_id.to_string()));
        }
        let stages: Vec<WireStage> = api.client.list_all("stages", &query).await?;
        let mut stages: Vec<Stage> = stages.into_iter().map(Stage::from).collect();
        stages.sort_by_key(|stage| (stage.pipeline_id, stage.order_nr, stage.id));
        Ok(Response::new(ListStagesResponse { stages }))
    }

    async fn add_activity(
        &self,
        request: Request<AddActivityRequest>,
    ) -> Result<Response<AddActivityResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let subject = request.subject.trim();
        if subject.is_empty() {
            return Err(Status::invalid_argument("subject is required"));
        }
        let kind = match request.r#type.trim() {
            "" => "task",
            kind => kind,
        };
        let mut body = Map::new();
        body.insert("subject".to_owned(), json!(subject));
        body.insert("type".to_owned(), json!(kind));
        put_id(&mut body, "owner_id", request.owner_id);
        put_id(&mut body, "deal_id", request.deal_id);
        put_id(&mut body, "org_id", request.org_id);
        if request.person_id > 0 {
            // v2: `person_id` is read-only; the person is linked as the primary participant.
            body.insert(
                "participants".to_owned(),
                json!([{"person_id": request.person_id, "primary": true}]),
            );
        }
        if !request.due_date.trim().is_empty() {
            body.insert(
                "due_date".to_owned(),
                json!(date(&request.due_date, "due_date")?),
            );
        }
        if !request.due_time.trim().is_empty() {
            body.insert(
                "due_time".to_owned(),
                json!(clock(&request.due_time, "due_time")?),
            );
        }
        if !request.duration.trim().is_empty() {
            body.insert(
                "duration".to_owned(),
                json!(clock(&request.duration, "duration")?),
            );
        }
        if request.done {
            body.insert("done".to_owned(), json!(true));
        }
        if !request.note.trim().is_empty() {
            body.insert("note".to_owned(), json!(request.note));
        }
        // Checked last: it may cost a call, which a malformed request should not.
        api.check_activity_type(kind).await?;
        let activity: WireActivity = send(api, Method::POST, "activities", &body).await?;
        Ok(Response::new(AddActivityResponse {
            activity: Some(activity.into()),
        }))
    }

    async fn list_new_deals(
        &self,
        request: Request<ListNewDealsRequest>,
    ) -> Result<Response<ListNewDealsResponse>, Status> {
        let api = self.api()?;
        let ListNewDealsRequest { after_id, limit } = request.into_inner();
        let (deals, next_after_id) =
            new_since::<WireDeal, Deal>(api, "deals", after_id, limit, |deal| deal.id.0).await?;
        Ok(Response::new(ListNewDealsResponse {
            deals,
            next_after_id,
        }))
    }

    async fn list_new_activities(
        &self,
        request: Request<ListNewActivitiesRequest>,
    ) -> Result<Response<ListNewActivitiesResponse>, Status> {
        let api = self.api()?;
        let ListNewActivitiesRequest { after_id, limit } = request.into_inner();
        let (activities, next_after_id) =
            new_since::<WireActivity, _>(api, "activities", after_id, limit, |activity| {
                activity.id.0
            })
            .await?;
        Ok(Response::new(ListNewActivitiesResponse {
            activities,
            next_after_id,
        }))
    }

    async fn search_persons(
        &self,
        request: Request<SearchPersonsRequest>,
    ) -> Result<Response<SearchPersonsResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let (field, term) = match (request.email.trim(), request.phone.trim()) {
            // Pipedrive's exact match ignores case; lower case keeps what we store comparable.
            (email, "") if !email.is_empty() => ("email", email.to_lowercase()),
            ("", phone) if !phone.is_empty() => ("phone", phone.to_owned()),
            _ => {
                return Err(Status::invalid_argument(
                    "set exactly one of email and phone",
                ));
            }
        };
        let found = api.search_persons(field, term).await?;
        Ok(Response::new(SearchPersonsResponse {
            persons: found.into_iter().map(Into::into).collect(),
        }))
    }

    async fn create_person(
        &self,
        request: Request<CreatePersonRequest>,
    ) -> Result<Response<CreatePersonResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let name = request.name.trim();
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let mut body = Map::new();
        body.insert("name".to_owned(), json!(name));
        if !request.emails.is_empty() {
            body.insert("emails".to_owned(), contacts(&request.emails, "work"));
        }
        if !request.phones.is_empty() {
            body.insert("phones".to_owned(), contacts(&request.phones, "work"));
        }
        put_id(&mut body, "owner_id", request.owner_id);
        put_id(&mut body, "org_id", request.org_id);
        if request.visible_to != 0 {
            body.insert("visible_to".to_owned(), visibility(request.visible_to)?);
        }
        put_custom_fields(&mut body, request.custom_fields.as_ref());
        let person: WirePerson = send(api, Method::POST, "persons", &body).await?;
        Ok(Response::new(CreatePersonResponse {
            person: Some(person.into()),
        }))
    }

    async fn update_person(
        &self,
        request: Request<UpdatePersonRequest>,
    ) -> Result<Response<UpdatePersonResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let id = positive(request.id, "id")?;
        let mut body = Map::new();
        if let Some(name) = &request.name {
            if name.trim().is_empty() {
                return Err(Status::invalid_argument("name cannot be made empty"));
            }
            body.insert("name".to_owned(), json!(name.trim()));
        }
        if let Some(emails) = &request.emails {
            body.insert("emails".to_owned(), contacts(&emails.values, "work"));
        }
        if let Some(phones) = &request.phones {
            body.insert("phones".to_owned(), contacts(&phones.values, "work"));
        }
        if let Some(owner_id) = request.owner_id {
            body.insert(
                "owner_id".to_owned(),
                json!(positive(owner_id, "owner_id")?),
            );
        }
        put_custom_fields(&mut body, request.custom_fields.as_ref());
        if body.is_empty() {
            return Err(Status::invalid_argument(
                "nothing to change: set at least one field",
            ));
        }
        let person: WirePerson = send(api, Method::PATCH, &format!("persons/{id}"), &body).await?;
        Ok(Response::new(UpdatePersonResponse {
            person: Some(person.into()),
        }))
    }

    async fn list_deals(
        &self,
        request: Request<ListDealsRequest>,
    ) -> Result<Response<ListDealsResponse>, Status> {
        let api = self.api()?;
        let query = updated_since(request.get_ref().updated_since.as_ref())?;
        let deals: Vec<WireDeal> = api.client.list_all("deals", &query).await?;
        Ok(Response::new(ListDealsResponse {
            deals: deals.into_iter().map(Deal::from).collect(),
        }))
    }

    async fn list_activities(
        &self,
        request: Request<ListActivitiesRequest>,
    ) -> Result<Response<ListActivitiesResponse>, Status> {
        let api = self.api()?;
        let query = updated_since(request.get_ref().updated_since.as_ref())?;
        let activities: Vec<WireActivity> = api.client.list_all("activities", &query).await?;
        Ok(Response::new(ListActivitiesResponse {
            activities: activities.into_iter().map(Into::into).collect(),
        }))
    }

    async fn register_webhook(
        &self,
        request: Request<RegisterWebhookRequest>,
    ) -> Result<Response<RegisterWebhookResponse>, Status> {
        let api = self.api()?;
        let request = request.into_inner();
        let url = url::Url::parse(request.subscription_url.trim())
            .ok()
            .filter(|url| url.scheme() == "https" || url.scheme() == "http")
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "subscription_url '{}' is not an http(s) URL",
                    request.subscription_url
                ))
            })?;
        let action = request.event_action.trim();
        if !["create", "change", "delete", "*"].contains(&action) {
            return Err(Status::invalid_argument(format!(
                "event_action '{action}' is not one of create, change, delete, *"
            )));
        }
        let object = request.event_object.trim();
        if !WEBHOOK_OBJECTS.contains(&object) {
            return Err(Status::invalid_argument(format!(
                "event_object '{object}' is not one of {}",
                WEBHOOK_OBJECTS.join(", ")
            )));
        }
        let name = match request.name.trim() {
            "" => format!("LeadRelay {object} {action}"),
            name => name.chars().take(255).collect(),
        };
        let user = Some(request.http_auth_user.trim())
            .filter(|user| !user.is_empty())
            .map(str::to_owned)
            .or_else(|| api.webhook_user.clone());
        let password = Some(request.http_auth_password.as_str())
            .filter(|password| !password.is_empty())
            .map(str::to_owned)
            .or_else(|| {
                api.webhook_password
                    .as_ref()
                    .map(|password| password.expose_secret().to_owned())
            });
        let (Some(user), Some(password)) = (user, password) else {
            return Err(Status::invalid_argument(
                "webhooks are registered with Basic auth: set http_auth_user and http_auth_password, or LEADRELAY_PIPEDRIVE_WEBHOOK_USER and LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD",
            ));
        };
        let body = json!({
            "name": name,
            "subscription_url": url.as_str(),
            "event_action": action,
            "event_object": object,
            "version": "2.0",
            "http_auth_user": user,
            "http_auth_password": password,
        });
        let webhook: WireWebhook = api
            .client
            .v1(Method::POST, "webhooks", Some(&body))
            .await?
            .ok_or_else(|| {
                Status::internal("Pipedrive created the webhook but returned no data")
            })?;
        Ok(Response::new(RegisterWebhookResponse {
            webhook: Some(webhook.into()),
        }))
    }

    async fn list_webhooks(
        &self,
        _request: Request<ListWebhooksRequest>,
    ) -> Result<Response<ListWebhooksResponse>, Status> {
        let api = self.api()?;
        let webhooks: Vec<WireWebhook> = api
            .client
            .v1::<Vec<WireWebhook>, ()>(Method::GET, "webhooks", None)
            .await?
            .unwrap_or_default();
        Ok(Response::new(ListWebhooksResponse {
            webhooks: webhooks.into_iter().map(Into::into).collect(),
        }))
    }

    async fn delete_webhook(
        &self,
        request: Request<DeleteWebhookRequest>,
    ) -> Result<Response<DeleteWebhookResponse>, Status> {
        let api = self.api()?;
        let id = positive(request.get_ref().id, "id")?;
        api.client
            .v1::<Value, ()>(Method::DELETE, &format!("webhooks/{id}"), None)
            .await?;
        Ok(Response::new(DeleteWebhookResponse {}))
    }
}
