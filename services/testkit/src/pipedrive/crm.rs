//! A Pipedrive that keeps state: persons, deals, activities and deal fields created through it
//! are there for the next call, found by search and by list filters, changed by PATCH. Sync
//! tests count what ended up in it — duplicates are records, not request counts.
//!
//! Faults are injected per call before the call is applied (HTTP 500, 429 with reset headers)
//! or after it (a write that happened but whose answer arrives too late: the caller times out
//! not knowing, as with a real network). Every answer is checked against the official documents;
//! breaches are collected and reported by [`Crm::problems`] rather than panicking inside the
//! server.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Map, Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::any};

use super::{activity_types, ok, page, spec_for};

/// What the fake does with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers normally.
    None,
    /// Answers HTTP 500 without applying the call.
    ServerError,
    /// Answers HTTP 429 (budget spent, reset in 1 s) without applying the call.
    RateLimited,
    /// Applies the call, then holds the answer back this long.
    SlowAnswer(Duration),
    /// Answers HTTP 400 with this error message without applying the call, as Pipedrive
    /// refuses a request it will never accept.
    Refused(&'static str),
}

/// Decides the fault of the `n`th call (from 0).
pub type FaultPlan = Box<dyn Fn(usize, &Request) -> Fault + Send + Sync>;

/// The records the fake holds.
#[derive(Debug, Default)]
pub struct Records {
    next_id: i64,
    /// Persons by id.
    pub persons: BTreeMap<i64, Value>,
    /// Deals by id.
    pub deals: BTreeMap<i64, Value>,
    /// Activities by id.
    pub activities: BTreeMap<i64, Value>,
    /// Custom deal fields added through the API.
    pub deal_fields: Vec<Value>,
    /// Every write applied, in order.
    pub writes: Vec<Write>,
}

/// A write the fake applied.
#[derive(Clone, Debug)]
pub struct Write {
    /// `METHOD /path`.
    pub call: String,
    /// When it arrived.
    pub at: std::time::Instant,
    /// Its JSON body.
    pub body: Value,
}

impl Records {
    fn new_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// How many applied writes were `method` on a path starting with `path_prefix`.
    pub fn count_writes(&self, method: &str, path_prefix: &str) -> usize {
        let wanted = format!("{method} {path_prefix}");
        self.writes
            .iter()
            .filter(|write| write.call.starts_with(&wanted))
            .count()
    }
}

/// The stateful fake; mount it with [`Crm::mount`].
pub struct Crm {
    records: Mutex<Records>,
    faults: FaultPlan,
    calls: AtomicUsize,
    failed: AtomicUsize,
    problems: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Crm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crm")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

const NOW: &str = "2026-11-20T10:00:00Z";

impl Crm {
    /// A fake that answers every call.
    pub fn new() -> Arc<Self> {
        Self::with_faults(Box::new(|_, _| Fault::None))
    }

    /// A fake that injects the faults `plan` decides.
    pub fn with_faults(plan: FaultPlan) -> Arc<Self> {
        Arc::new(Self {
            records: Mutex::new(Records::default()),
            faults: plan,
            calls: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            problems: Mutex::new(Vec::new()),
        })
    }

    /// Serves every request `server` receives.
    pub async fn mount(self: &Arc<Self>, server: &MockServer) {
        Mock::given(any())
            .respond_with(Shared(self.clone()))
            .mount(server)
            .await;
    }

    /// The records, locked.
    pub fn records(&self) -> MutexGuard<'_, Records> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many calls were answered with an injected fault (slow answers included).
    pub fn faults_injected(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Answers that broke the official documents; empty when the fake stayed true to them.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .map(|problems| problems.clone())
            .unwrap_or_default()
    }

    /// Seeds a person as if created in Pipedrive by hand; returns its id.
    pub fn add_person(&self, name: &str, email: &str) -> i64 {
        let mut records = self.records();
        let id = records.new_id();
        let person = person_record(
            id,
            &json!({"name": name, "emails": [{"value": email, "primary": true, "label": "work"}]}),
        );
        records.persons.insert(id, person);
        id
    }

    fn answer(&self, request: &Request) -> ResponseTemplate {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let fault = (self.faults)(call, request);
        match fault {
            Fault::None => {}
            Fault::ServerError => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return ResponseTemplate::new(500)
                    .set_body_json(json!({"success": false, "error": "Internal server error"}));
            }
            Fault::RateLimited => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return ResponseTemplate::new(429)
                    .insert_header("x-ratelimit-limit", "100")
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-reset", "1")
                    .set_body_json(json!({"success": false, "error": "Request over limit"}));
            }
            Fault::SlowAnswer(_) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
            Fault::Refused(message) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return ResponseTemplate::new(400).set_body_json(json!({
                    "success": false, "error": message, "error_info": "Please check developers.pipedrive.com",
                    "data": null, "additional_data": null
                }));
            }
        }
        let method = request.method.as_str().to_owned();
        let path = request.url.path().to_owned();
        let (status, body) = self.apply(&method, &path, request);
        let template = if status == 404 {
            ResponseTemplate::new(404).set_body_json(body)
        } else {
            let problems = spec_for(&path).check_response(&method, &path, status, &body);
            if !problems.is_empty()
                && let Ok(mut all) = self.problems.lock()
            {
                all.extend(problems);
            }
            ResponseTemplate::new(status).set_body_json(body)
        };
        match fault {
            Fault::SlowAnswer(delay) => template.set_delay(delay),
            _ => template,
        }
    }

    /// Applies one call to the records; returns the status and body to answer.
    fn apply(&self, method: &str, path: &str, request: &Request) -> (u16, Value) {
        let query: BTreeMap<String, String> = request
            .url
            .query_pairs()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let arrived = std::time::Instant::now();
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let request_body = body.clone();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut records = self.records();
        let id_of = |segment: &str| segment.parse::<i64>().ok();
        let answer = match (method, segments.as_slice()) {
            ("GET", ["api", "v2", "persons", "search"]) => Some(search_persons(&records, &query)),
            ("POST", ["api", "v2", "persons"]) => {
                let id = records.new_id();
                let person = person_record(id, &body);
                records.persons.insert(id, person.clone());
                Some((200, ok(person)))
            }
            ("GET", ["api", "v2", "persons", id]) => id_of(id)
                .and_then(|id| records.persons.get(&id))
                .map(|person| (200, ok(person.clone()))),
            ("PATCH", ["api", "v2", "persons", id]) => id_of(id)
                .and_then(|id| records.persons.get_mut(&id))
                .map(|person| {
                    merge(person, &body);
                    (200, ok(person.clone()))
                }),
            ("GET", ["api", "v2", "deals"]) => Some((200, list_deals(&records, &query))),
            ("POST", ["api", "v2", "deals"]) => {
                let id = records.new_id();
                let deal = deal_record(id, &body);
                records.deals.insert(id, deal.clone());
                Some((200, ok(deal)))
            }
            ("GET", ["api", "v2", "deals", id]) => id_of(id)
                .and_then(|id| records.deals.get(&id))
                .map(|deal| (200, ok(deal.clone()))),
            ("PATCH", ["api", "v2", "deals", id]) => id_of(id)
                .and_then(|id| records.deals.get_mut(&id))
                .map(|deal| {
                    merge(deal, &body);
                    (200, ok(deal.clone()))
                }),
            ("GET", ["api", "v2", "activities"]) => {
                let matches = |activity: &&Value| {
                    ["deal_id", "person_id"].iter().all(|filter| {
                        query
                            .get(*filter)
                            .is_none_or(|wanted| same_id(&activity[*filter], wanted))
                    })
                };
                let found: Vec<Value> = records
                    .activities
                    .values()
                    .filter(matches)
                    .cloned()
                    .collect();
                Some((200, page(Value::Array(found), None)))
            }
            ("POST", ["api", "v2", "activities"]) => {
                let id = records.new_id();
                let activity = activity_record(id, &body);
                records.activities.insert(id, activity.clone());
                Some((200, ok(activity)))
            }
            ("GET", ["api", "v1", "activityTypes"]) => Some((200, activity_types_with_task())),
            ("GET", ["api", "v1", "dealFields"]) => Some((
                200,
                json!({"success": true, "data": records.deal_fields.clone(),
                       "additional_data": {"start": 0, "limit": 500, "more_items_in_collection": false}}),
            )),
            ("POST", ["api", "v1", "dealFields"]) => {
                let id = records.new_id();
                let field = json!({
                    "id": id,
                    // Pipedrive keys custom fields by a random 40-character hash.
                    "key": format!("{id:0>40x}"),
                    "name": body["name"].as_str().unwrap_or_default(),
                    "field_type": body["field_type"].as_str().unwrap_or("varchar"),
                    "add_time": NOW, "active_flag": true, "edit_flag": true,
                });
                records.deal_fields.push(field.clone());
                Some((200, json!({"success": true, "data": field})))
            }
            _ => None,
        };
        match answer {
            Some((status, body)) => {
                if method != "GET" {
                    records.writes.push(Write {
                        call: format!("{method} {path}"),
                        at: arrived,
                        body: request_body,
                    });
                }
                (status, body)
            }
            None => (
                404,
                json!({"success": false, "error": format!("{method} {path}: not found")}),
            ),
        }
    }
}

/// Lets the server share the fake with the test that reads its records.
struct Shared(Arc<Crm>);

impl Respond for Shared {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.answer(request)
    }
}

/// Merges a PATCH body into a record: custom fields key by key, every other field replaced.
fn merge(record: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        return;
    };
    for (key, value) in patch {
        if key == "custom_fields"
            && let (Some(current), Some(update)) = (record[key].as_object_mut(), value.as_object())
        {
            current.extend(update.clone());
        } else if key == "participants" {
            // An activity's primary participant is its person.
            if let Some(person) = primary_participant(value) {
                record["person_id"] = json!(person);
            }
        } else {
            record[key] = value.clone();
        }
    }
    record["update_time"] = json!("2026-11-21T10:00:00Z");
}

fn primary_participant(participants: &Value) -> Option<i64> {
    participants
        .as_array()?
        .iter()
        .find(|participant| participant["primary"] == json!(true))
        .or_else(|| participants.as_array()?.first())?["person_id"]
        .as_i64()
}

fn person_record(id: i64, body: &Value) -> Value {
    let mut person = json!({
        "id": id, "name": "", "owner_id": 1, "add_time": NOW, "update_time": NOW,
        "emails": [], "phones": [], "is_deleted": false, "visible_to": 3, "custom_fields": {}
    });
    merge(&mut person, body);
    person["update_time"] = json!(NOW);
    person
}

fn deal_record(id: i64, body: &Value) -> Value {
    let mut deal = json!({
        "id": id, "title": "", "owner_id": 1, "pipeline_id": 1, "stage_id": 1, "value": 0,
        "currency": "USD", "add_time": NOW, "update_time": NOW, "is_deleted": false,
        "is_archived": false, "status": "open", "visible_to": 3, "label_ids": [],
        "custom_fields": {}
    });
    merge(&mut deal, body);
    deal["update_time"] = json!(NOW);
    deal
}

fn activity_record(id: i64, body: &Value) -> Value {
    let mut activity = json!({
        "id": id, "subject": "", "type": "task", "owner_id": 1, "is_deleted": false,
        "add_time": NOW, "update_time": NOW, "done": false
    });
    merge(&mut activity, body);
    activity["update_time"] = json!(NOW);
    activity
}

/// `GET /api/v2/persons/search`: exact matches on emails or phones (case-insensitive, as the
/// document says of `exact_match`), or on names.
fn search_persons(records: &Records, query: &BTreeMap<String, String>) -> (u16, Value) {
    let term = query
        .get("term")
        .map(|term| term.to_lowercase())
        .unwrap_or_default();
    let fields = query.get("fields").cloned().unwrap_or_default();
    let values = |person: &Value, field: &str| -> Vec<String> {
        match field {
            "email" | "phone" => person[format!("{field}s")]
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter_map(|entry| entry["value"].as_str())
                        .map(str::to_lowercase)
                        .collect()
                })
                .unwrap_or_default(),
            "name" => vec![person["name"].as_str().unwrap_or_default().to_lowercase()],
            _ => Vec::new(),
        }
    };
    let items: Vec<Value> = records
        .persons
        .values()
        .filter(|person| {
            fields
                .split(',')
                .any(|field| values(person, field).contains(&term))
        })
        .map(|person| {
            let plain = |field: &str| -> Vec<Value> {
                person[field]
                    .as_array()
                    .map(|all| all.iter().map(|entry| entry["value"].clone()).collect())
                    .unwrap_or_default()
            };
            json!({"result_score": 1.0, "item": {
                "id": person["id"], "type": "person", "name": person["name"],
                "phones": plain("phones"), "emails": plain("emails"), "visible_to": 3,
                "owner": {"id": 1}, "custom_fields": [], "notes": []
            }})
        })
        .collect();
    (
        200,
        json!({"success": true, "data": {"items": items}, "additional_data": {}}),
    )
}

/// `GET /api/v2/deals`: filtered by person and status; without a status, every deal not deleted.
fn list_deals(records: &Records, query: &BTreeMap<String, String>) -> Value {
    let found: Vec<Value> = records
        .deals
        .values()
        .filter(|deal| {
            query
                .get("person_id")
                .is_none_or(|wanted| same_id(&deal["person_id"], wanted))
        })
        .filter(|deal| match query.get("status") {
            Some(status) => deal["status"] == json!(status),
            None => deal["is_deleted"] != json!(true),
        })
        .cloned()
        .collect();
    page(Value::Array(found), None)
}

/// Whether a record's id field holds the id a query names.
fn same_id(held: &Value, wanted: &str) -> bool {
    held.as_i64()
        .is_some_and(|held| wanted.parse::<i64>() == Ok(held))
}

/// The account's activity types: call and task.
fn activity_types_with_task() -> Value {
    let mut types = activity_types();
    if let Some(all) = types["data"].as_array_mut() {
        let mut task = all.first().cloned().unwrap_or_else(|| json!({}));
        if let Some(fields) = task.as_object_mut() {
            let overrides: Map<String, Value> = serde_json::from_value(json!({
                "id": 2, "order_nr": 2, "name": "Task", "key_string": "task", "icon_key": "task"
            }))
            .unwrap_or_default();
            fields.extend(overrides);
        }
        all.push(task);
    }
    types
}
