//! Ingest: store a call, the canonical entity it changes and the sync jobs it implies in one
//! transaction, then acknowledge it.
//!
//! Calls are committed in groups: one writer task takes every call waiting in its queue and
//! commits them together, so a durable commit (an fsync on SQLite) is paid once per group rather
//! than once per call. While one group commits, the next one gathers. A group whose transaction
//! fails is retried call by call, so one bad call cannot fail its neighbours.

use std::time::{SystemTime, UNIX_EPOCH};

use leadrelay_proto::v1::{
    ContactRef, Deal, DealStatus, HanaEventKind, HanaWebhook, Lead, SourceRef, System,
};
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{Any, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::{
    mapping::{self, Attributes},
    routes::{self, EntityType},
    store::{Backend, Store, StoreError},
};

/// Most calls committed in one transaction.
const MAX_GROUP: usize = 256;

/// Calls waiting for the writer; senders wait when it is full (back-pressure).
const QUEUE_DEPTH: usize = 4096;

/// One Hana webhook call as the gateway received it.
#[derive(Clone, Debug)]
pub struct HanaCall {
    /// The event kind the URL named.
    pub kind: HanaEventKind,
    /// The parsed body, or why it could not be parsed.
    pub body: Result<HanaWebhook, String>,
    /// The body exactly as received.
    pub raw_body: Vec<u8>,
    /// When the gateway received it, unix milliseconds.
    pub received_at_ms: i64,
    /// The W3C `traceparent` of the call, saved with the event and its jobs.
    pub trace_context: Option<String>,
}

/// What ingest did with a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The stored event's id (the first one's for a duplicate; the quarantine id when quarantined).
    pub event_id: String,
    /// The call repeated an event already stored; nothing was added.
    pub duplicate: bool,
    /// The call could not be used and was kept in quarantine.
    pub quarantined: bool,
}

/// Ingest failed: nothing was stored and the call must not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the orchestrator is shutting down).
    #[error("the orchestrator is shutting down")]
    Stopped,
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// Which calls are accepted.
#[derive(Clone, Debug, Default)]
pub struct IngestPolicy {
    /// Hana application ids accepted; empty accepts every application.
    pub hana_application_ids: Vec<String>,
}

/// The group-commit writer's handle.
#[derive(Clone, Debug)]
pub struct Ingester {
    queue: mpsc::Sender<Pending>,
}

struct Pending {
    call: HanaCall,
    reply: oneshot::Sender<Result<IngestOutcome, IngestError>>,
}

impl Ingester {
    /// Starts the writer task. It stops once every handle is dropped and the queue is drained.
    pub fn start(store: Store, policy: IngestPolicy) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_groups(store, policy, receiver));
        Self { queue }
    }

    /// Stores a call; returns once it is committed.
    pub async fn ingest(&self, call: HanaCall) -> Result<IngestOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { call, reply })
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer.await.map_err(|_| IngestError::Stopped)?
    }
}

async fn write_groups(store: Store, policy: IngestPolicy, mut receiver: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let calls: Vec<&HanaCall> = group.iter().map(|pending| &pending.call).collect();
        match commit_group(&store, &policy, &calls).await {
            Ok(outcomes) => {
                for (pending, outcome) in group.drain(..).zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::warn!(calls = group.len(), %error, "group commit failed; committing its calls one by one");
                for pending in group.drain(..) {
                    let outcome = commit_group(&store, &policy, &[&pending.call])
                        .await
                        .map(|mut outcomes| outcomes.remove(0));
                    let _ = pending.reply.send(outcome);
                }
            }
        }
    }
}

/// Stores every call in one transaction; the outcomes are in the calls' order.
async fn commit_group(
    store: &Store,
    policy: &IngestPolicy,
    calls: &[&HanaCall],
) -> Result<Vec<IngestOutcome>, IngestError> {
    let mut transaction = store.pool().begin().await?;
    let mut outcomes = Vec::with_capacity(calls.len());
    for call in calls {
        outcomes.push(store_call(&mut transaction, store.backend(), policy, call).await?);
    }
    transaction.commit().await?;
    Ok(outcomes)
}

/// A call that passed validation.
struct ValidCall<'a> {
    kind: HanaEventKind,
    webhook: &'a HanaWebhook,
    hana_id: String,
}

/// The event's kind name, e.g. `lead.created`.
pub fn kind_name(kind: HanaEventKind) -> &'static str {
    match kind {
        HanaEventKind::Unspecified => "unknown",
        HanaEventKind::LeadCreated => "lead.created",
        HanaEventKind::LeadUpdated => "lead.updated",
        HanaEventKind::LeadDeleted => "lead.deleted",
        HanaEventKind::OpportunityCreated => "opportunity.created",
        HanaEventKind::OpportunityUpdated => "opportunity.updated",
        HanaEventKind::OpportunityDeleted => "opportunity.deleted",
    }
}

/// The kind named by a body's `event_name`, in LeadRelay's words or with `ticket.` for
/// `opportunity.`.
fn kind_from_name(name: &str) -> Option<HanaEventKind> {
    let name = name
        .trim()
        .to_ascii_lowercase()
        .replace("ticket.", "opportunity.");
    [
        HanaEventKind::LeadCreated,
        HanaEventKind::LeadUpdated,
        HanaEventKind::LeadDeleted,
        HanaEventKind::OpportunityCreated,
        HanaEventKind::OpportunityUpdated,
        HanaEventKind::OpportunityDeleted,
    ]
    .into_iter()
    .find(|kind| kind_name(*kind) == name)
}

/// Decides whether a call can be used, and why not.
fn validate<'a>(call: &'a HanaCall, policy: &IngestPolicy) -> Result<ValidCall<'a>, String> {
    let webhook = call.body.as_ref().map_err(Clone::clone)?;
    // A body that names its event is more specific than the URL it was sent to.
    let kind = kind_from_name(&webhook.event_name).unwrap_or(call.kind);
    if kind == HanaEventKind::Unspecified {
        return Err(
            "no event kind: the URL names none and the body has no known `event_name`".to_owned(),
        );
    }
    if webhook.application_id.is_empty() {
        return Err("the body has no `application.id`".to_owned());
    }
    if !policy.hana_application_ids.is_empty()
        && !policy
            .hana_application_ids
            .contains(&webhook.application_id)
    {
        return Err(format!(
            "application id '{}' is not in LEADRELAY_HANA_APPLICATION_IDS",
            webhook.application_id
        ));
    }
    let (attributes, section) = match EntityType::of(kind) {
        EntityType::Lead => (&webhook.lead, "lead"),
        EntityType::Deal => (&webhook.opportunity, "opportunity"),
    };
    let hana_id = mapping::hana_id(attributes);
    if hana_id.is_empty() {
        return Err(format!(
            "{} without an id: `{section}.id` is missing",
            kind_name(kind)
        ));
    }
    Ok(ValidCall {
        kind,
        webhook,
        hana_id,
    })
}

/// The key redeliveries are recognised by: the source, the kind, the application and the body
/// with its keys sorted (so a re-serialised redelivery still matches).
fn dedupe_key(kind: HanaEventKind, webhook: &HanaWebhook, raw_body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(raw_body)
        .map(|json| canonical_json(&json))
        .unwrap_or_else(|_| String::from_utf8_lossy(raw_body).into_owned());
    let mut hasher = Sha256::new();
    for part in [
        kind_name(kind),
        webhook.application_id.as_str(),
        canonical.as_str(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// JSON with object keys sorted at every level.
fn canonical_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(fields) => {
            let mut names: Vec<&String> = fields.keys().collect();
            names.sort();
            let parts: Vec<String> = names
                .into_iter()
                .map(|name| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(name.clone()),
                        canonical_json(&fields[name])
                    )
                })
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", parts.join(","))
        }
        scalar => scalar.to_string(),
    }
}

/// A new public id: a prefix and a time-ordered UUID.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

async fn store_call(
    transaction: &mut Transaction<'static, Any>,
    backend: Backend,
    policy: &IngestPolicy,
    call: &HanaCall,
) -> Result<IngestOutcome, IngestError> {
    let valid = match validate(call, policy) {
        Ok(valid) => valid,
        Err(reason) => return quarantine(transaction, call, &reason).await,
    };
    let kind = kind_name(valid.kind);
    let event_id = new_id("evt");
    let dedupe_key = dedupe_key(valid.kind, valid.webhook, &call.raw_body);
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, received_at, trace_context) \
         VALUES ($1, 'hana', $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id",
    )
    .bind(&event_id)
    .bind(kind)
    .bind(&valid.webhook.application_id)
    .bind(&dedupe_key)
    .bind(call.raw_body.as_slice())
    .bind(call.received_at_ms)
    .bind(call.trace_context.as_deref())
    .fetch_optional(&mut **transaction)
    .await?;
    if inserted.is_none() {
        let first: String = sqlx::query_scalar(
            "UPDATE events SET duplicate_count = duplicate_count + 1 \
             WHERE source = 'hana' AND dedupe_key = $1 RETURNING id",
        )
        .bind(&dedupe_key)
        .fetch_one(&mut **transaction)
        .await?;
        return Ok(IngestOutcome {
            event_id: first,
            duplicate: true,
            quarantined: false,
        });
    }

    let now = now_ms();
    let (entity_type, entity_id) = match EntityType::of(valid.kind) {
        EntityType::Lead => {
            let lead_id = upsert_lead(transaction, backend, &valid, now).await?;
            (EntityType::Lead, lead_id)
        }
        EntityType::Deal => {
            let deal_id = upsert_deal(transaction, backend, &valid, now).await?;
            (EntityType::Deal, deal_id)
        }
    };
    let has_conversation = !valid.webhook.conversation_url.is_empty();
    for planned in routes::default_plan(valid.kind, has_conversation) {
        sqlx::query(
            "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, state, \
             attempts, next_attempt_at, last_error, trace_context, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, '', $8, $7, $7)",
        )
        .bind(new_id("job"))
        .bind(&event_id)
        .bind(planned.target.as_str())
        .bind(planned.operation.as_str())
        .bind(entity_type.as_str())
        .bind(&entity_id)
        .bind(now)
        .bind(call.trace_context.as_deref())
        .execute(&mut **transaction)
        .await?;
    }
    Ok(IngestOutcome {
        event_id,
        duplicate: false,
        quarantined: false,
    })
}

async fn quarantine(
    transaction: &mut Transaction<'static, Any>,
    call: &HanaCall,
    reason: &str,
) -> Result<IngestOutcome, IngestError> {
    let id = new_id("qtn");
    sqlx::query(
        "INSERT INTO quarantine (id, source, kind, reason, raw_body, received_at) \
         VALUES ($1, 'hana', $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(kind_name(call.kind))
    .bind(reason)
    .bind(call.raw_body.as_slice())
    .bind(call.received_at_ms)
    .execute(&mut **transaction)
    .await?;
    tracing::info!(quarantine_id = %id, reason, "webhook kept in quarantine");
    Ok(IngestOutcome {
        event_id: id,
        duplicate: false,
        quarantined: true,
    })
}

/// Reads a stored entity for update: on Postgres the row stays locked until commit, so replicas
/// ingesting updates of the same entity apply them one after the other.
fn select_for_update(table: &str, backend: Backend) -> String {
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    format!("SELECT id, body FROM {table} WHERE source_key = $1{lock}")
}

/// Creates or changes the lead a lead event is about; returns its id.
async fn upsert_lead(
    transaction: &mut Transaction<'static, Any>,
    backend: Backend,
    valid: &ValidCall<'_>,
    now: i64,
) -> Result<String, IngestError> {
    let webhook = valid.webhook;
    let source_key = format!("hana:{}:{}", webhook.application_id, valid.hana_id);
    loop {
        let stored: Option<(String, Vec<u8>)> =
            sqlx::query_as(&select_for_update("leads", backend))
                .bind(&source_key)
                .fetch_optional(&mut **transaction)
                .await?;
        let is_new = stored.is_none();
        let (id, mut lead) = match stored {
            Some((id, body)) => (id, Lead::decode(body.as_slice()).unwrap_or_default()),
            None => (new_id("lead"), Lead::default()),
        };
        let mut attributes: Attributes = std::mem::take(&mut lead.raw);
        mapping::merge(&mut attributes, &webhook.lead);
        mapping::map_lead(&mut lead, &attributes, &webhook.conversation_url);
        lead.id.clone_from(&id);
        lead.source = Some(SourceRef {
            system: System::Hana.into(),
            app_id: webhook.application_id.clone(),
            remote_id: valid.hana_id.clone(),
        });
        lead.deleted_at = match valid.kind {
            HanaEventKind::LeadDeleted => Some(timestamp(now)),
            // A lead created again after a delete is alive again.
            HanaEventKind::LeadCreated => None,
            _ => lead.deleted_at,
        };
        lead.updated_at = Some(timestamp(now));
        if is_new {
            lead.created_at = Some(timestamp(now));
        }
        let deleted_at = lead.deleted_at.as_ref().map(|_| now);
        let body = lead.encode_to_vec();
        if is_new {
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO leads (id, source_key, body, created_at, updated_at, deleted_at) \
                 VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (source_key) DO NOTHING RETURNING id",
            )
            .bind(&id)
            .bind(&source_key)
            .bind(body)
            .bind(now)
            .bind(deleted_at)
            .fetch_optional(&mut **transaction)
            .await?;
            if inserted.is_none() {
                // Another replica created it first: apply this call on top of theirs.
                continue;
            }
            link(
                transaction,
                EntityType::Lead,
                &id,
                "hana_lead",
                &valid.hana_id,
                now,
            )
            .await?;
        } else {
            sqlx::query(
                "UPDATE leads SET body = $1, updated_at = $2, deleted_at = $3 WHERE id = $4",
            )
            .bind(body)
            .bind(now)
            .bind(deleted_at)
            .bind(&id)
            .execute(&mut **transaction)
            .await?;
        }
        return Ok(id);
    }
}

/// Creates or changes the deal an opportunity event is about; returns its id.
async fn upsert_deal(
    transaction: &mut Transaction<'static, Any>,
    backend: Backend,
    valid: &ValidCall<'_>,
    now: i64,
) -> Result<String, IngestError> {
    let webhook = valid.webhook;
    let source_key = format!("hana:{}:{}", webhook.application_id, valid.hana_id);
    // A ticket may carry its lead too: that lead is the deal's contact.
    let contact_lead_id = contact_lead(transaction, &webhook.application_id, &webhook.lead).await?;
    loop {
        let stored: Option<(String, Vec<u8>)> =
            sqlx::query_as(&select_for_update("deals", backend))
                .bind(&source_key)
                .fetch_optional(&mut **transaction)
                .await?;
        let is_new = stored.is_none();
        let (id, mut deal) = match stored {
            Some((id, body)) => (id, Deal::decode(body.as_slice()).unwrap_or_default()),
            None => (new_id("deal"), Deal::default()),
        };
        let mut attributes: Attributes = std::mem::take(&mut deal.raw);
        mapping::merge(&mut attributes, &webhook.opportunity);
        mapping::map_deal(&mut deal, &attributes, &webhook.conversation_url);
        if let Some(lead_id) = &contact_lead_id {
            let contact = deal.contact.get_or_insert_with(ContactRef::default);
            contact.lead_id.clone_from(lead_id);
        }
        deal.id.clone_from(&id);
        deal.source = Some(SourceRef {
            system: System::Hana.into(),
            app_id: webhook.application_id.clone(),
            remote_id: valid.hana_id.clone(),
        });
        match valid.kind {
            HanaEventKind::OpportunityDeleted => {
                deal.status = DealStatus::Deleted.into();
                deal.deleted_at = Some(timestamp(now));
            }
            HanaEventKind::OpportunityCreated if deal.deleted_at.is_some() => {
                deal.status = DealStatus::Open.into();
                deal.deleted_at = None;
            }
            _ => {}
        }
        deal.updated_at = Some(timestamp(now));
        if is_new {
            deal.created_at = Some(timestamp(now));
        }
        let deleted_at = deal.deleted_at.as_ref().map(|_| now);
        let contact = deal
            .contact
            .as_ref()
            .map(|contact| contact.lead_id.clone())
            .filter(|lead_id| !lead_id.is_empty());
        let body = deal.encode_to_vec();
        if is_new {
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO deals (id, source_key, body, contact_lead_id, created_at, updated_at, deleted_at) \
                 VALUES ($1, $2, $3, $4, $5, $5, $6) ON CONFLICT (source_key) DO NOTHING RETURNING id",
            )
            .bind(&id)
            .bind(&source_key)
            .bind(body)
            .bind(contact)
            .bind(now)
            .bind(deleted_at)
            .fetch_optional(&mut **transaction)
            .await?;
            if inserted.is_none() {
                continue;
            }
            link(
                transaction,
                EntityType::Deal,
                &id,
                "hana_opportunity",
                &valid.hana_id,
                now,
            )
            .await?;
        } else {
            sqlx::query(
                "UPDATE deals SET body = $1, contact_lead_id = $2, updated_at = $3, deleted_at = $4 WHERE id = $5",
            )
            .bind(body)
            .bind(contact)
            .bind(now)
            .bind(deleted_at)
            .bind(&id)
            .execute(&mut **transaction)
            .await?;
        }
        return Ok(id);
    }
}

/// The id of the lead a ticket's `lead` section names, when that lead is already stored.
async fn contact_lead(
    transaction: &mut Transaction<'static, Any>,
    application_id: &str,
    lead: &Attributes,
) -> Result<Option<String>, IngestError> {
    let hana_id = mapping::hana_id(lead);
    if hana_id.is_empty() {
        return Ok(None);
    }
    let id = sqlx::query_scalar("SELECT id FROM leads WHERE source_key = $1")
        .bind(format!("hana:{application_id}:{hana_id}"))
        .fetch_optional(&mut **transaction)
        .await?;
    Ok(id)
}

async fn link(
    transaction: &mut Transaction<'static, Any>,
    entity_type: EntityType,
    entity_id: &str,
    kind: &str,
    remote_id: &str,
    now: i64,
) -> Result<(), IngestError> {
    sqlx::query(
        "INSERT INTO links (entity_type, entity_id, system, kind, remote_id, linked_at) \
         VALUES ($1, $2, 'hana', $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(entity_type.as_str())
    .bind(entity_id)
    .bind(kind)
    .bind(remote_id)
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// A protobuf timestamp from unix milliseconds.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_keys_ignore_key_order_and_whitespace() {
        let webhook = HanaWebhook {
            application_id: "app".to_owned(),
            ..Default::default()
        };
        let a = dedupe_key(
            HanaEventKind::LeadCreated,
            &webhook,
            br#"{"a":1,"b":{"c":[1,2]}}"#,
        );
        let b = dedupe_key(
            HanaEventKind::LeadCreated,
            &webhook,
            b"{ \"b\": {\"c\": [1, 2]}, \"a\": 1 }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            dedupe_key(
                HanaEventKind::LeadUpdated,
                &webhook,
                br#"{"a":1,"b":{"c":[1,2]}}"#
            )
        );
    }

    #[test]
    fn event_names_in_the_body_are_understood() {
        assert_eq!(
            kind_from_name("ticket.updated"),
            Some(HanaEventKind::OpportunityUpdated)
        );
        assert_eq!(
            kind_from_name("Lead.Created"),
            Some(HanaEventKind::LeadCreated)
        );
        assert_eq!(kind_from_name("update_customer_info"), None);
    }
}
