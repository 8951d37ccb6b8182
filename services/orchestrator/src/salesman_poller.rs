//! The SalesMan lead status poller: every `LEADRELAY_SALESMAN_POLL_INTERVAL` it lists the leads
//! through the SalesMan adapter and stores a `lead.status` event for each lead whose status
//! changed (open → in work → processed → closed) since it last looked.
//!
//! The last status seen of each lead is kept in the store and changed in the transaction that
//! stores the event, so a poller stopped at any point neither misses a change nor stores one
//! twice (the event's key, "lead:<id>:status:<status>", also makes a repeat a duplicate). A lead
//! seen for the first time is only recorded, unless LeadRelay linked it and it has already left
//! "open": that change happened while nobody was looking.

use leadrelay_proto::salesman::v1::{
    Lead, ListLeadsRequest, ListOrderDirection,
    sales_man_adapter_service_client::SalesManAdapterServiceClient,
};
use leadrelay_runtime::propagation::{TracedChannel, current_traceparent};
use sqlx::Row;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    ingest::{IngestError, new_id, now_ms},
    poller::{PollError, every, lazy_channel},
    store::Store,
};

/// The canonical sales status of a SalesMan status code.
fn sales_status(code: &str) -> &'static str {
    match code {
        "0" => "open",
        "1" => "in_work",
        "2" => "processed",
        "3" => "closed",
        _ => "",
    }
}

/// SalesMan's status names, by the numeric code it stores.
fn status_code(lead: &Lead) -> &'static str {
    use leadrelay_proto::salesman::v1::LeadStatus;
    match lead.status() {
        LeadStatus::Open => "0",
        LeadStatus::InWork => "1",
        LeadStatus::Processed => "2",
        LeadStatus::Closed => "3",
        LeadStatus::Unspecified => "",
    }
}

/// Polls SalesMan through its adapter.
#[derive(Clone, Debug)]
pub struct SalesManPoller {
    store: Store,
    adapter: SalesManAdapterServiceClient<TracedChannel>,
    running: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl SalesManPoller {
    /// A poller over `store`, reaching the adapter at `adapter_url` (connected on first use).
    pub fn new(store: Store, adapter_url: &url::Url) -> Result<Self, PollError> {
        Ok(Self {
            store,
            adapter: SalesManAdapterServiceClient::new(lazy_channel(adapter_url)?),
            running: std::sync::Arc::default(),
        })
    }

    /// Lists the leads once; returns how many status changes were stored.
    pub async fn poll_once(&self) -> Result<u32, PollError> {
        let _running = self.running.lock().await;
        let mut stream = self
            .adapter
            .clone()
            .list_leads(ListLeadsRequest {
                direction: ListOrderDirection::NewestFirst.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut stored = 0;
        while let Some(item) = stream.next().await {
            let Some(lead) = item?.lead else { continue };
            if self.record(&lead).await? {
                stored += 1;
            }
        }
        Ok(stored)
    }

    /// Records `lead`'s status; returns whether a change was stored as an event.
    async fn record(&self, lead: &Lead) -> Result<bool, IngestError> {
        let status = status_code(lead);
        if status.is_empty() {
            return Ok(false);
        }
        let lead_id = lead.id.to_string();
        // It reads the last status, then writes: the write lock is taken up front.
        let mut transaction = self.store.begin_write().await?;
        let known: Option<String> =
            sqlx::query("SELECT status FROM salesman_lead_status WHERE lead_id = $1")
                .bind(&lead_id)
                .fetch_optional(&mut *transaction)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
        let changed = match known.as_deref() {
            Some(known) => known != status,
            None => {
                status != "0"
                    && sqlx::query(SALESMAN_LEAD_IS_LINKED)
                        .bind(&lead_id)
                        .fetch_optional(&mut *transaction)
                        .await?
                        .is_some()
            }
        };
        if known.as_deref() == Some(status) {
            return Ok(false);
        }
        if changed {
            let event_id = new_id("evt");
            let body = serde_json::json!({
                "id": lead.id, "status": status, "statusName": lead.status_name,
                "previous_status": known, "result": lead.result_name,
                "clid": lead.client_id, "pid": lead.person_id, "did": lead.deal_id,
                "datum_do": lead.datum_do,
            });
            let stored = sqlx::query(
                "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, received_at) \
                 VALUES ($1, 'salesman', 'lead.status', '', $2, $3, $4) \
                 ON CONFLICT (source, dedupe_key) DO NOTHING",
            )
            .bind(&event_id)
            .bind(format!("lead:{lead_id}:status:{status}"))
            .bind(serde_json::to_vec(&body).unwrap_or_default())
            .bind(now_ms())
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if stored == 1 {
                follow_status_change(&mut transaction, &lead_id, status, &event_id).await?;
            }
        }
        sqlx::query(
            "INSERT INTO salesman_lead_status (lead_id, status, seen_at) VALUES ($1, $2, $3) \
             ON CONFLICT (lead_id) DO UPDATE SET status = excluded.status, seen_at = excluded.seen_at",
        )
        .bind(&lead_id)
        .bind(status)
        .bind(now_ms())
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        if changed {
            tracing::info!(lead = %lead_id, from = ?known, to = status, "salesman lead status changed");
        }
        Ok(changed)
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(self, interval: std::time::Duration, shutdown: CancellationToken) {
        every(interval, shutdown, "salesman", || self.poll_once()).await;
    }
}

/// Whether a SalesMan lead is linked to one of ours (`system <> 'hana'` lets SQLite use the link
/// index).
pub(crate) const SALESMAN_LEAD_IS_LINKED: &str =
    "SELECT 1 FROM links WHERE system = 'salesman' AND remote_id = $1 AND system <> 'hana'";

/// The lead linked to a SalesMan lead.
pub(crate) const LEAD_BY_SALESMAN_ID: &str = "SELECT entity_id FROM links \
     WHERE entity_type = 'lead' AND system = 'salesman' AND kind = 'salesman_lead' \
     AND remote_id = $1 AND closed_at IS NULL AND system <> 'hana'";

/// Sets the sales status of the canonical lead linked to SalesMan lead `lead_id` and queues the
/// Hana write-back, in the transaction that stores the status event. A SalesMan lead LeadRelay
/// did not create (or whose lead did not come from Hana) changes nothing.
async fn follow_status_change(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    lead_id: &str,
    code: &str,
    event_id: &str,
) -> Result<(), IngestError> {
    use prost::Message;

    let entity_id: Option<String> = sqlx::query_scalar(LEAD_BY_SALESMAN_ID)
        .bind(lead_id)
        .fetch_optional(&mut **transaction)
        .await?;
    let Some(entity_id) = entity_id else {
        return Ok(());
    };
    let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM leads WHERE id = $1")
        .bind(&entity_id)
        .fetch_optional(&mut **transaction)
        .await?;
    let Some(body) = body else { return Ok(()) };
    let mut lead = leadrelay_proto::v1::Lead::decode(body.as_slice())
        .map_err(|error| crate::store::StoreError::Corrupt(error.to_string()))?;
    let status = sales_status(code);
    if lead.sales_status == status {
        return Ok(());
    }
    let now = now_ms();
    lead.sales_status = status.to_owned();
    lead.updated_at = Some(crate::ingest::timestamp(now));
    sqlx::query("UPDATE leads SET body = $1, updated_at = $2 WHERE id = $3")
        .bind(lead.encode_to_vec())
        .bind(now)
        .bind(&entity_id)
        .execute(&mut **transaction)
        .await?;
    let from_hana = sqlx::query(
        "SELECT 1 FROM links WHERE entity_type = 'lead' AND entity_id = $1 AND system = 'hana' \
         AND closed_at IS NULL",
    )
    .bind(&entity_id)
    .fetch_optional(&mut **transaction)
    .await?
    .is_some();
    if from_hana {
        sqlx::query(
            "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, trace_context, \
             next_attempt_at, created_at, updated_at, state, attempts, last_error) \
             VALUES ($1, $2, 'hana', 'upsert_lead', 'lead', $3, $5, $4, $4, $4, 'pending', 0, '')",
        )
        .bind(new_id("job"))
        .bind(event_id)
        .bind(&entity_id)
        .bind(now)
        .bind(current_traceparent())
        .execute(&mut **transaction)
        .await?;
        tracing::info!(lead = %entity_id, salesman_lead = %lead_id, status, "salesman status goes back to hana");
    }
    Ok(())
}
