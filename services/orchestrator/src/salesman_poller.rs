//! The SalesMan lead status poller: every `LEADRELAY_SALESMAN_POLL_INTERVAL` it lists the leads
//! through the SalesMan adapter and stores a `lead.status` event for each lead whose status
//! changed (open → in work → processed → closed) since it last looked.
//!
//! The last status seen of each lead is kept in the store and changed in the transaction that
//! stores the event, so a poller stopped at any point neither misses a change nor stores one
//! twice (the event's key, "lead:<id>:status:<status>", also makes a repeat a duplicate). A lead
//! seen for the first time is only recorded, unless LeadRelay linked it and it has already left
//! "open": that change happened while nobody was looking.
//!
//! Recording a lead is given up after `STORE_DEADLINE` (15 s), as in the Pipedrive poller: a
//! database host going silent fails the poll instead of holding its loop for the TCP timeout.

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
    store::{STORE_DEADLINE, Store},
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
    /// How long recording one lead may take (see [`STORE_DEADLINE`]).
    store_deadline: std::time::Duration,
}

impl SalesManPoller {
    /// A poller over `store`, reaching the adapter at `adapter_url` (connected on first use).
    pub fn new(store: Store, adapter_url: &url::Url) -> Result<Self, PollError> {
        Ok(Self {
            store,
            adapter: SalesManAdapterServiceClient::new(lazy_channel(adapter_url)?),
            running: std::sync::Arc::default(),
            store_deadline: STORE_DEADLINE,
        })
    }

    /// The same poller, giving recording a lead up after `deadline` instead of
    /// [`STORE_DEADLINE`].
    #[cfg(test)]
    fn with_store_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.store_deadline = deadline;
        self
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
            if self
                .store
                .within(self.store_deadline, self.record(&lead))
                .await?
            {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use leadrelay_proto::salesman::v1::{
        AddLeadRequest, AddLeadResponse, GetLeadRequest, GetLeadResponse, GetLeadStatsRequest,
        GetLeadStatsResponse, LeadStatus, ListLeadsResponse,
        sales_man_adapter_service_server::{SalesManAdapterService, SalesManAdapterServiceServer},
    };
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::store::{StoreError, testing::RelayedDatabase};

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// A SalesMan adapter whose CRM holds one lead, in work.
    struct OneLeadInWork;

    #[tonic::async_trait]
    impl SalesManAdapterService for OneLeadInWork {
        async fn add_lead(
            &self,
            _: Request<AddLeadRequest>,
        ) -> Result<Response<AddLeadResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn get_lead(
            &self,
            _: Request<GetLeadRequest>,
        ) -> Result<Response<GetLeadResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type ListLeadsStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<ListLeadsResponse, Status>>>;

        async fn list_leads(
            &self,
            _: Request<ListLeadsRequest>,
        ) -> Result<Response<Self::ListLeadsStream>, Status> {
            let lead = Lead {
                id: 7,
                status: LeadStatus::InWork.into(),
                ..Lead::default()
            };
            Ok(Response::new(tokio_stream::iter(vec![Ok(
                ListLeadsResponse {
                    lead: Some(lead),
                    page: 0,
                },
            )])))
        }

        async fn get_lead_stats(
            &self,
            _: Request<GetLeadStatsRequest>,
        ) -> Result<Response<GetLeadStatsResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves [`OneLeadInWork`] on a free loopback port; returns its URL.
    async fn start_adapter() -> Result<url::Url, Box<dyn std::error::Error + Send + Sync>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?).parse()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SalesManAdapterServiceServer::new(OneLeadInWork))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(url)
    }

    /// Recording a lead caught in flight by a database host going silent is given up at the
    /// store deadline, and the next poll records it; without the deadline the poll waits for the
    /// system's TCP timeout (~15 min).
    #[tokio::test]
    async fn a_database_that_goes_silent_mid_statement_fails_the_poll_instead_of_holding_it()
    -> TestResult {
        let database = RelayedDatabase::create("salesman_poller_silence").await?;
        // Another session holds the statuses: recording the lead waits in Postgres, in flight,
        // until the relay goes silent.
        let holder = database.hold("salesman_lead_status").await?;
        let poller = SalesManPoller::new(database.relayed.clone(), &start_adapter().await?)?
            .with_store_deadline(Duration::from_secs(1));
        let polled = database
            .silence_mid_statement(holder, "SELECT status FROM salesman_lead_status", {
                let poller = poller.clone();
                async move { poller.poll_once().await }
            })
            .await?;
        assert!(
            matches!(
                polled,
                Err(PollError::Ingest(IngestError::Store(
                    StoreError::Unanswered { .. }
                )))
            ),
            "{polled:?}"
        );

        // Once the database answers again, the next poll records the lead.
        database
            .restore_until(|| async {
                let polled = poller.poll_once().await;
                let seen: Option<String> = sqlx::query_scalar(
                    "SELECT status FROM salesman_lead_status WHERE lead_id = '7'",
                )
                .fetch_optional(database.direct.pool())
                .await?;
                Ok((seen.as_deref() != Some("1"))
                    .then(|| format!("the lead is not recorded; the poll: {polled:?}")))
            })
            .await?;
        database.drop_database().await?;
        Ok(())
    }
}
