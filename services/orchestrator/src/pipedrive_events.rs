//! Pipedrive changes (webhooks and polls) stored as events, once per event key: a webhook's
//! `meta.id`, or a poll's "<entity>:<id>:<update time>". A change that cannot be used (no key,
//! no entity, an unknown action, a body that is not JSON) is kept in quarantine with the reason.
//!
//! Pipedrive changes arrive at the pace of a sales team, not of a chatbot, so each is committed
//! on its own through the pool rather than through the Hana group writer.
//!
//! The jobs a change implies (the reverse flows to Hana) belong to the sync engine; until it
//! lands, a change is stored and nothing more.

use leadrelay_proto::{json::from_proto_struct, v1::IngestPipedriveEventRequest};
use sqlx::Row;

use crate::{
    ingest::{IngestError, IngestOutcome, new_id, now_ms},
    store::{Store, StoreError},
};

/// The actions a Pipedrive change can have.
const ACTIONS: [&str; 3] = ["create", "change", "delete"];

/// Why a change cannot be used, if it cannot.
fn unusable(request: &IngestPipedriveEventRequest) -> Option<String> {
    if request.event_key.trim().is_empty() {
        if !request.raw_body.is_empty()
            && let Err(error) = serde_json::from_slice::<serde_json::Value>(&request.raw_body)
        {
            return Some(format!("the body is not JSON: {error}"));
        }
        return Some(
            "no event key: a Pipedrive webhook (version 2.0) carries it in `meta.id`".to_owned(),
        );
    }
    if request.entity.trim().is_empty() {
        return Some("no entity: `meta.entity` is missing".to_owned());
    }
    if !ACTIONS.contains(&request.action.as_str()) {
        return Some(format!(
            "unknown action '{}': expected create, change or delete (webhooks version 2.0)",
            request.action
        ));
    }
    None
}

/// The body kept for an event: as received, or for a poll the record's state as JSON.
fn stored_body(request: &IngestPipedriveEventRequest) -> Vec<u8> {
    if !request.raw_body.is_empty() {
        return request.raw_body.clone();
    }
    let data = request
        .data
        .as_ref()
        .map(|data| serde_json::Value::Object(from_proto_struct(data)))
        .unwrap_or_default();
    serde_json::to_vec(&serde_json::json!({
        "data": data,
        "meta": {
            "id": request.event_key,
            "entity": request.entity,
            "action": request.action,
            "entity_id": request.entity_id,
        }
    }))
    .unwrap_or_default()
}

/// Stores one change; returns once it is committed.
pub async fn ingest_pipedrive(
    store: &Store,
    request: &IngestPipedriveEventRequest,
    trace_context: Option<&str>,
) -> Result<IngestOutcome, IngestError> {
    // When LeadRelay received it; Pipedrive's own time stays in the body.
    let received_at = now_ms();
    let kind = format!("{}.{}", request.action.trim(), request.entity.trim());
    let body = stored_body(request);
    let mut transaction = store.pool().begin().await?;
    if let Some(reason) = unusable(request) {
        let id = new_id("qtn");
        sqlx::query(
            "INSERT INTO quarantine (id, source, kind, reason, raw_body, received_at) \
             VALUES ($1, 'pipedrive', $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(&kind)
        .bind(&reason)
        .bind(&body)
        .bind(received_at)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        tracing::info!(quarantine_id = %id, reason, "pipedrive change kept in quarantine");
        return Ok(IngestOutcome {
            event_id: id,
            duplicate: false,
            quarantined: true,
        });
    }
    let event_key = request.event_key.trim();
    let id = new_id("evt");
    let inserted = sqlx::query(
        "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, received_at, trace_context) \
         VALUES ($1, 'pipedrive', $2, '', $3, $4, $5, $6) \
         ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id",
    )
    .bind(&id)
    .bind(&kind)
    .bind(event_key)
    .bind(&body)
    .bind(received_at)
    .bind(trace_context)
    .fetch_optional(&mut *transaction)
    .await?;
    let outcome = if inserted.is_some() {
        IngestOutcome {
            event_id: id,
            duplicate: false,
            quarantined: false,
        }
    } else {
        let first = sqlx::query(
            "UPDATE events SET duplicate_count = duplicate_count + 1 \
             WHERE source = 'pipedrive' AND dedupe_key = $1 RETURNING id",
        )
        .bind(event_key)
        .fetch_optional(&mut *transaction)
        .await?
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the Pipedrive event {event_key} vanished during ingest"
            ))
        })?;
        IngestOutcome {
            event_id: first.try_get(0)?,
            duplicate: true,
            quarantined: false,
        }
    };
    transaction.commit().await?;
    Ok(outcome)
}
