//! Ingest: store a call, the canonical entity it changes and the sync jobs it implies in one
//! transaction, then acknowledge it.
//!
//! Calls are committed in groups: one writer task takes every call waiting in its queue and
//! commits them together, so a durable commit (an fsync on SQLite) is paid once per group rather
//! than once per call. While one group commits, the next one gathers. A group whose transaction
//! fails is retried call by call, so one bad call cannot fail its neighbours.

mod group;

use std::time::{SystemTime, UNIX_EPOCH};

use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::{
    mapping,
    routes::EntityType,
    store::{Store, StoreError},
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
    /// Another orchestrator replica created an entity this group creates; retrying finds it.
    #[error("another orchestrator replica wrote the same entity at the same time")]
    Conflict,
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
    policy: std::sync::Arc<IngestPolicy>,
}

struct Pending {
    checked: CheckedCall,
    reply: oneshot::Sender<Result<IngestOutcome, IngestError>>,
}

/// A call whose validation is already decided. Deciding it (validation, the dedupe hash) happens
/// in the caller's task, in parallel, so the serial writer does only database work.
struct CheckedCall {
    call: HanaCall,
    verdict: Verdict,
}

/// What validation decided.
enum Verdict {
    /// The call is usable: its kind, the id of the entity it is about and its dedupe key.
    Accept {
        kind: HanaEventKind,
        hana_id: String,
        dedupe_key: String,
    },
    /// The call goes to quarantine, for this reason.
    Quarantine(String),
}

impl CheckedCall {
    fn new(call: HanaCall, policy: &IngestPolicy) -> Self {
        let verdict = match validate(&call, policy) {
            Ok(valid) => Verdict::Accept {
                kind: valid.kind,
                dedupe_key: dedupe_key(valid.kind, valid.webhook, &call.raw_body),
                hana_id: valid.hana_id,
            },
            Err(reason) => Verdict::Quarantine(reason),
        };
        Self { call, verdict }
    }
}

impl Ingester {
    /// Starts the writer task. It stops once every handle is dropped and the queue is drained.
    pub fn start(store: Store, policy: IngestPolicy) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_groups(store, receiver));
        Self {
            queue,
            policy: std::sync::Arc::new(policy),
        }
    }

    /// Stores a call; returns once it is committed.
    pub async fn ingest(&self, call: HanaCall) -> Result<IngestOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        let checked = CheckedCall::new(call, &self.policy);
        self.queue
            .send(Pending { checked, reply })
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer.await.map_err(|_| IngestError::Stopped)?
    }
}

async fn write_groups(store: Store, mut receiver: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let calls: Vec<&CheckedCall> = group.iter().map(|pending| &pending.checked).collect();
        match commit(&store, &calls).await {
            Ok(outcomes) => {
                for (pending, outcome) in group.drain(..).zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::warn!(calls = group.len(), %error, "group commit failed; committing its calls one by one");
                for pending in group.drain(..) {
                    let outcome = commit(&store, &[&pending.checked])
                        .await
                        .map(|mut outcomes| outcomes.remove(0));
                    let _ = pending.reply.send(outcome);
                }
            }
        }
    }
}

/// Commits a group, retrying when another replica created one of its entities first (the retry
/// reads that entity and applies the group on top of it).
async fn commit(store: &Store, calls: &[&CheckedCall]) -> Result<Vec<IngestOutcome>, IngestError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match group::commit_group(store, calls).await {
            Err(IngestError::Conflict) if attempt < ATTEMPTS => attempt += 1,
            outcome => return outcome,
        }
    }
}

/// The key an entity first captured in Hana is stored under: the application and the Hana id,
/// length-prefixed so that no two pairs share a key.
pub(crate) fn source_key(application_id: &str, hana_id: &str) -> String {
    format!("hana:{}:{application_id}:{hana_id}", application_id.len())
}

/// A call that passed validation.
struct ValidCall<'a> {
    kind: HanaEventKind,
    webhook: &'a HanaWebhook,
    hana_id: String,
}

/// The kind named by a body's `event_name`: as the URLs spell it, but forgiving of case and
/// surrounding blanks.
fn kind_from_name(name: &str) -> Option<HanaEventKind> {
    HanaEventKind::from_event_name(&name.trim().to_ascii_lowercase())
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
            kind.event_name()
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
        kind.event_name(),
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

/// Unix milliseconds from a protobuf timestamp.
pub(crate) fn millis(at: &prost_types::Timestamp) -> i64 {
    at.seconds * 1000 + i64::from(at.nanos / 1_000_000)
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
