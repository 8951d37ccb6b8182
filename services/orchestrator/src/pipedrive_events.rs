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

/// The deal linked to a Pipedrive deal (`system <> 'hana'` lets SQLite use the link index).
pub(crate) const DEAL_BY_PIPEDRIVE_ID: &str = "SELECT entity_id FROM links \
     WHERE entity_type = 'deal' AND system = 'pipedrive' AND kind = 'pipedrive_deal' \
     AND remote_id = $1 AND closed_at IS NULL AND system <> 'hana'";

/// The reverse flow of a Pipedrive deal change: when the deal is linked to a canonical deal and
/// its status, lost reason or stage differ from what LeadRelay holds, the canonical deal takes
/// them and a job writes them back to Hana, in the transaction that stores the event.
async fn follow_deal_change(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    request: &IngestPipedriveEventRequest,
    event_id: &str,
    trace_context: Option<&str>,
    now: i64,
) -> Result<(), IngestError> {
    use leadrelay_proto::v1::{Deal, DealStatus};
    use prost::Message;

    let Some(data) = request.data.as_ref().map(from_proto_struct) else {
        return Ok(());
    };
    let remote_id = match request.entity_id.trim() {
        "" => match data.get("id") {
            Some(serde_json::Value::Number(id)) => id.to_string(),
            Some(serde_json::Value::String(id)) => id.clone(),
            _ => return Ok(()),
        },
        id => id.to_owned(),
    };
    let deal_id: Option<String> = sqlx::query_scalar(DEAL_BY_PIPEDRIVE_ID)
        .bind(&remote_id)
        .fetch_optional(&mut **transaction)
        .await?;
    let Some(deal_id) = deal_id else {
        return Ok(());
    };
    let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM deals WHERE id = $1")
        .bind(&deal_id)
        .fetch_optional(&mut **transaction)
        .await?;
    let Some(body) = body else { return Ok(()) };
    let mut deal =
        Deal::decode(body.as_slice()).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    let before = deal.clone();
    match data.get("status").and_then(serde_json::Value::as_str) {
        Some("won") => deal.set_status(DealStatus::Won),
        Some("lost") => deal.set_status(DealStatus::Lost),
        Some("open") => deal.set_status(DealStatus::Open),
        _ => {}
    }
    deal.lost_reason = if deal.status() == DealStatus::Lost {
        data.get("lost_reason")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    } else {
        String::new()
    };
    for (key, field) in [
        ("stage_id", &mut deal.stage_id),
        ("pipeline_id", &mut deal.pipeline_id),
    ] {
        if let Some(serde_json::Value::Number(id)) = data.get(key) {
            *field = id.to_string();
        }
    }
    if deal == before {
        return Ok(());
    }
    deal.updated_at = Some(crate::ingest::timestamp(now));
    sqlx::query("UPDATE deals SET body = $1, updated_at = $2 WHERE id = $3")
        .bind(deal.encode_to_vec())
        .bind(now)
        .bind(&deal_id)
        .execute(&mut **transaction)
        .await?;
    sqlx::query(
        "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, trace_context, \
         next_attempt_at, created_at, updated_at, state, attempts, last_error) \
         VALUES ($1, $2, 'hana', 'upsert_deal', 'deal', $3, $4, $5, $5, $5, 'pending', 0, '')",
    )
    .bind(new_id("job"))
    .bind(event_id)
    .bind(&deal_id)
    .bind(trace_context)
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    tracing::info!(deal = %deal_id, pipedrive_deal = %remote_id, "pipedrive deal change goes back to hana");
    Ok(())
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

/// A poller's position, advanced in the transaction that stores the change it covers, so that a
/// poller stopped at any point resumes exactly after the last change it stored.
#[derive(Clone, Copy, Debug)]
pub struct Watermark<'a> {
    /// The system polled, e.g. "pipedrive".
    pub system: &'a str,
    /// The stream polled, e.g. "deals".
    pub stream: &'a str,
    /// The position after this change.
    pub value: &'a str,
}

/// A poller's stored position, if it has one.
pub async fn watermark(
    store: &Store,
    system: &str,
    stream: &str,
) -> Result<Option<String>, StoreError> {
    let row =
        sqlx::query("SELECT watermark FROM poll_watermarks WHERE system = $1 AND stream = $2")
            .bind(system)
            .bind(stream)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// Sets a poller's position without an event (its first position).
pub async fn set_watermark(store: &Store, watermark: Watermark<'_>) -> Result<(), StoreError> {
    let mut connection = store.pool().acquire().await?;
    save_watermark(&mut connection, watermark).await?;
    Ok(())
}

async fn save_watermark(
    connection: &mut sqlx::AnyConnection,
    watermark: Watermark<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO poll_watermarks (system, stream, watermark, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (system, stream) DO UPDATE SET watermark = excluded.watermark, updated_at = excluded.updated_at",
    )
    .bind(watermark.system)
    .bind(watermark.stream)
    .bind(watermark.value)
    .bind(now_ms())
    .execute(connection)
    .await?;
    Ok(())
}

/// Stores one change; returns once it is committed. With a `watermark`, the poller's position
/// moves in the same transaction.
pub async fn ingest_pipedrive(
    store: &Store,
    request: &IngestPipedriveEventRequest,
    trace_context: Option<&str>,
    watermark: Option<Watermark<'_>>,
) -> Result<IngestOutcome, IngestError> {
    // When LeadRelay received it; Pipedrive's own time stays in the body.
    let received_at = now_ms();
    let kind = format!("{}.{}", request.entity.trim(), request.action.trim());
    let body = stored_body(request);
    let mut transaction = store.begin_write().await?;
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
        if let Some(watermark) = watermark {
            save_watermark(&mut transaction, watermark).await?;
        }
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
        if request.entity.trim() == "deal" && matches!(request.action.trim(), "create" | "change") {
            follow_deal_change(&mut transaction, request, &id, trace_context, received_at).await?;
        }
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
    if let Some(watermark) = watermark {
        save_watermark(&mut transaction, watermark).await?;
    }
    transaction.commit().await?;
    Ok(outcome)
}
