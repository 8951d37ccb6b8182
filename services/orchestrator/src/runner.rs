//! The job runner: claims due sync jobs, calls the target adapter's `CrmSyncService`, and records
//! what came of it (links, or a retry, or a dead letter) in one transaction.
//!
//! - Order: of the unfinished jobs for one (target, entity), only the oldest may run, so a
//!   deal is created before its activity and updates land in the order they happened. A deal's
//!   jobs also wait for the earlier jobs of its contact lead on the same target: otherwise the
//!   deal's sync and the lead's sync would each look for the person, find none, and both create
//!   one.
//! - Coalescing: a pending upsert of the same (target, entity) queued behind the one being run,
//!   with no other kind of job between them, is marked `coalesced`: the upsert sends the entity's
//!   current state, which already holds the later change.
//! - Claiming is a conditional update (`pending` → `running`), so any number of runners on
//!   Postgres never run one job twice. A runner renews the lease of each job it holds every third
//!   of the lease (`LEADRELAY_JOB_LEASE`, [`DEFAULT_LEASE`]); a job whose runner died is taken
//!   again once its lease has passed, so the retry comes soon after the crash. Each claim carries
//!   a token of its own: a runner that lost its lease renews and records only while the row
//!   still holds its token, so it cannot overwrite the run of the runner that took the job over.
//! - Retries: transient failures (unavailable, deadline, rate limit, …) wait
//!   1 s · 2^attempts (at most 10 min, ±20% jitter), or the adapter's retry hint when longer;
//!   after [`MAX_ATTEMPTS`] attempts, or at once for a permanent error, the job is dead and keeps
//!   the CRM's message.
//! - Idempotency: the job id is the idempotency key of every call, so an adapter that sees a
//!   retry after a crash between its call and this commit finds what it made instead of making
//!   it again.
//! - A silent store: each store operation is given up after `STORE_DEADLINE` (15 s), so a statement
//!   caught in flight by a database host going silent holds neither the loop nor a job's slot.
//!   A job whose outcome could not be recorded stays `running` until its lease passes, then runs
//!   again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use leadrelay_proto::v1::{
    Activity, AddActivityRequest, DeleteDealRequest, DeleteLeadRequest, ExternalRef, JobOperation,
    RemoteKind, System, UpsertDealRequest, UpsertLeadRequest,
    crm_sync_service_client::CrmSyncServiceClient,
};
use leadrelay_runtime::propagation::{TracedChannel, continue_trace, current_traceparent};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument as _;

use crate::{
    ingest::{IngestError, now_ms},
    poller::lazy_channel,
    queries::{EntityKey, get_deal, get_lead},
    routes::{Operation, system_from_name, system_name},
    store::{STORE_DEADLINE, Store, StoreError},
};

/// Attempts before a job is dead.
pub const MAX_ATTEMPTS: i64 = 8;

/// How long a claimed job's runner may stay silent before another runner takes the job again,
/// unless set. A live runner renews the lease every third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Calls in flight per target. Pipedrive's pacing bounds its rate whatever this is.
const PER_TARGET: usize = 8;

/// How often an idle runner looks for due jobs.
const IDLE: Duration = Duration::from_millis(200);

/// The first retry delay, doubled per attempt.
const FIRST_RETRY_MS: i64 = 1000;

/// The longest retry delay.
const MAX_RETRY_MS: i64 = 10 * 60 * 1000;

/// The reason a deal deleted in Hana is closed with.
const DELETED_IN_HANA: &str = "deleted in Hana";

/// A claimed job.
#[derive(Clone, Debug)]
struct Claimed {
    id: String,
    event_id: String,
    target: System,
    operation: JobOperation,
    entity_id: String,
    attempts: i64,
    /// The `traceparent` of the call that queued the job: the job's span continues its trace.
    trace_context: Option<String>,
    /// This claim's token: the job's lease, renewal and outcome are this runner's only while the
    /// row still holds it.
    claim: String,
}

impl Claimed {
    /// The span of one run of the job, a child of the call that queued it.
    fn span(&self) -> tracing::Span {
        let span = tracing::info_span!(
            "sync job",
            otel.name = %format_args!("sync {} {}", system_name(self.target), Operation(self.operation).as_str()),
            job_id = %self.id,
            event_id = %self.event_id,
            sync.target = system_name(self.target),
            operation = Operation(self.operation).as_str(),
            entity_id = %self.entity_id,
            attempt = self.attempts + 1,
            remote_ids = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        continue_trace(&span, self.trace_context.as_deref());
        span
    }
}

/// What a job's call came to.
enum Finished {
    /// The call succeeded; the links it reported.
    Done {
        refs: Vec<ExternalRef>,
        closes: bool,
        note: String,
    },
    /// Try again at this time.
    Retry { at_ms: i64, error: String },
    /// Give up.
    Dead(String),
}

/// A target's adapter.
type Target = CrmSyncServiceClient<TracedChannel>;

/// Runs the jobs of the configured targets.
#[derive(Clone, Debug)]
pub struct JobRunner {
    store: Store,
    adapters: Arc<HashMap<System, Target>>,
    lease_ms: i64,
    store_deadline: Duration,
}

impl JobRunner {
    /// A runner calling each configured target's adapter at its URL.
    pub fn new(
        store: Store,
        targets: &[(System, url::Url)],
    ) -> Result<Self, crate::poller::PollError> {
        let mut adapters = HashMap::new();
        for (system, url) in targets {
            adapters.insert(*system, CrmSyncServiceClient::new(lazy_channel(url)?));
        }
        Ok(Self {
            store,
            adapters: Arc::new(adapters),
            lease_ms: lease_ms(DEFAULT_LEASE),
            store_deadline: STORE_DEADLINE,
        })
    }

    /// The same runner, taking a dead runner's jobs again after `lease`.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease_ms = lease_ms(lease);
        self
    }

    /// The same runner, giving a store operation up after `deadline` instead of
    /// [`STORE_DEADLINE`].
    #[cfg(test)]
    fn with_store_deadline(mut self, deadline: Duration) -> Self {
        self.store_deadline = deadline;
        self
    }

    /// `operation`, given up after the store deadline (see [`Store::within`]).
    async fn within_deadline<T, E: From<StoreError>>(
        &self,
        operation: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.store.within(self.store_deadline, operation).await
    }

    /// Runs due jobs until `shutdown`, then lets the jobs in flight finish.
    ///
    /// Each target runs up to [`PER_TARGET`] jobs at once, and the runner claims only what it
    /// can start at once: a claimed job never waits behind others while its lease runs, so after
    /// a crash only the calls really in flight are retried, one lease later. A finished job
    /// makes room at once and may let its entity's next job run; jobs queued by this process
    /// wake the runner; jobs queued by another replica are found within [`IDLE`].
    pub async fn run(self, shutdown: CancellationToken) {
        let mut running = tokio::task::JoinSet::new();
        let mut in_flight: HashMap<System, usize> = HashMap::new();
        loop {
            if let Err(error) = self.within_deadline(self.release_expired_leases()).await {
                tracing::warn!(%error, "the job runner could not take back the jobs of a dead runner; it tries again");
            }
            for target in self.adapters.keys().copied() {
                let busy = in_flight.get(&target).copied().unwrap_or(0);
                let room = PER_TARGET.saturating_sub(busy);
                if room == 0 {
                    continue;
                }
                match self.within_deadline(self.claim(target, room)).await {
                    Ok(claimed) => {
                        *in_flight.entry(target).or_default() += claimed.len();
                        for job in claimed {
                            let runner = self.clone();
                            let span = job.span();
                            running.spawn(
                                async move {
                                    let outcome = runner.execute(&job).await;
                                    (job.target, outcome)
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the job runner could not claim jobs; it tries again");
                    }
                }
            }
            let mut finished =
                |done: Result<(System, Result<(), IngestError>), tokio::task::JoinError>| {
                    if let Ok((target, _)) = &done
                        && let Some(busy) = in_flight.get_mut(target)
                    {
                        *busy = busy.saturating_sub(1);
                    }
                    report(done.map(|(_, outcome)| outcome));
                };
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    finished(done);
                    while let Some(done) = running.try_join_next() {
                        finished(done);
                    }
                }
                () = self.store.jobs_queued() => {}
                () = tokio::time::sleep(IDLE) => {}
            }
        }
        while let Some(done) = running.join_next().await {
            report(done.map(|(_, outcome)| outcome));
        }
    }

    /// Makes the jobs of a runner that died (its lease ran out) pending again, once per round
    /// for every target.
    async fn release_expired_leases(&self) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE jobs SET state = 'pending', claim = NULL, updated_at = $1 \
             WHERE state = 'running' AND updated_at < $2",
        )
        .bind(now)
        .bind(now - self.lease_ms)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Claims up to `limit` due jobs for `target` in one transaction.
    async fn claim(&self, target: System, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        let now = now_ms();
        let pool = self.store.pool();
        let query = sqlx::query(
            "SELECT seq, id, event_id, target, operation, entity_id, attempts, trace_context FROM jobs j \
             WHERE j.state = 'pending' AND j.next_attempt_at <= $1 AND j.target = $2 \
             AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.target = j.target AND k.entity_id = j.entity_id \
                             AND k.seq < j.seq AND k.state IN ('pending', 'running')) \
             AND NOT EXISTS (SELECT 1 FROM deals d JOIN jobs c ON c.entity_id = d.contact_lead_id \
                             WHERE j.entity_type = 'deal' AND d.id = j.entity_id AND c.target = j.target \
                             AND c.seq < j.seq AND c.state IN ('pending', 'running')) \
             ORDER BY j.seq LIMIT $3",
        )
        .bind(now)
        .bind(system_name(target))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = query.fetch_all(pool).await?;
        let mut claimed = Vec::new();
        if rows.is_empty() {
            return Ok(claimed);
        }
        let mut transaction = self.store.begin_write().await?;
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let job = Claimed {
                id: row.try_get("id")?,
                event_id: row.try_get("event_id")?,
                target: system_from_name(row.try_get::<String, _>("target")?.as_str()),
                operation: Operation::from_name(row.try_get::<String, _>("operation")?.as_str()),
                entity_id: row.try_get("entity_id")?,
                attempts: row.try_get("attempts")?,
                trace_context: row.try_get("trace_context")?,
                claim: crate::ingest::new_id("claim"),
            };
            let taken = sqlx::query(
                "UPDATE jobs SET state = 'running', claim = $3, updated_at = $1 \
                 WHERE id = $2 AND state = 'pending'",
            )
            .bind(now)
            .bind(&job.id)
            .bind(&job.claim)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if taken != 1 {
                // Another runner took it.
                continue;
            }
            if matches!(
                job.operation,
                JobOperation::UpsertLead | JobOperation::UpsertDeal
            ) {
                sqlx::query(
                    "UPDATE jobs SET state = 'coalesced', updated_at = $1 \
                     WHERE target = $2 AND entity_id = $3 AND operation = $4 AND state = 'pending' \
                     AND seq > $5 AND NOT EXISTS (SELECT 1 FROM jobs d WHERE d.target = jobs.target \
                         AND d.entity_id = jobs.entity_id AND d.seq > $5 AND d.seq < jobs.seq \
                         AND d.operation <> jobs.operation AND d.state = 'pending')",
                )
                .bind(now)
                .bind(system_name(job.target))
                .bind(&job.entity_id)
                .bind(Operation(job.operation).as_str())
                .bind(seq)
                .execute(&mut *transaction)
                .await?;
            }
            claimed.push(job);
        }
        transaction.commit().await?;
        Ok(claimed)
    }

    async fn execute(&self, job: &Claimed) -> Result<(), IngestError> {
        let Some(client) = self.adapters.get(&job.target) else {
            return Ok(());
        };
        // The lease is renewed while the call runs, so a slow call is never taken by a second
        // runner; only a dead runner's lease runs out.
        let finished = tokio::select! {
            called = self.call(client.clone(), job) => match called {
                Ok(finished) => finished,
                Err(status) => classify(job, &status),
            },
            () = self.renew_lease(job) => return Ok(()),
        };
        self.within_deadline(self.finish(job, finished)).await
    }

    /// Keeps `job`'s lease alive, renewing it every third of the lease; returns only if the job
    /// is no longer this runner's (another runner took it after a stall).
    async fn renew_lease(&self, job: &Claimed) {
        let job_id = job.id.as_str();
        let every = Duration::from_millis(u64::try_from(self.lease_ms / 3).unwrap_or(1).max(1));
        loop {
            tokio::time::sleep(every).await;
            let renew = sqlx::query(
                "UPDATE jobs SET updated_at = $1 WHERE id = $2 AND state = 'running' AND claim = $3",
            )
            .bind(now_ms())
            .bind(job_id)
            .bind(&job.claim)
            .execute(self.store.pool());
            let renewed = self
                .within_deadline(async { renew.await.map_err(StoreError::from) })
                .await;
            match renewed {
                Ok(result) if result.rows_affected() == 0 => {
                    tracing::warn!(
                        job = job_id,
                        "the job's lease was lost; another runner has it"
                    );
                    return;
                }
                Ok(_) => {}
                // The store is unreachable: the next renewal tries again, and if the lease runs
                // out meanwhile, the conditional finish keeps the outcomes from clashing.
                Err(error) => tracing::warn!(job = job_id, %error, "could not renew a job's lease"),
            }
        }
    }

    async fn call(&self, mut client: Target, job: &Claimed) -> Result<Finished, tonic::Status> {
        let pool = self.store.pool();
        let key = job.id.clone();
        let gone = || Finished::Dead(format!("entity {} no longer exists", job.entity_id));
        let store_error = |error: StoreError| tonic::Status::unavailable(error.to_string());
        let lead = || async {
            self.within_deadline(get_lead(pool, &EntityKey::Id(job.entity_id.clone())))
                .await
                .map_err(store_error)
        };
        let deal_and_contact = || async {
            let Some(deal) = self
                .within_deadline(get_deal(pool, &EntityKey::Id(job.entity_id.clone())))
                .await
                .map_err(store_error)?
            else {
                return Ok::<_, tonic::Status>(None);
            };
            let contact = match deal.contact.as_ref().map(|contact| contact.lead_id.clone()) {
                Some(lead_id) if !lead_id.is_empty() => self
                    .within_deadline(get_lead(pool, &EntityKey::Id(lead_id)))
                    .await
                    .map_err(store_error)?,
                _ => None,
            };
            Ok(Some((deal, contact)))
        };
        let done = |outcome: i32, refs: Vec<ExternalRef>, closes: bool| Finished::Done {
            note: if outcome == leadrelay_proto::v1::SyncOutcome::NotSupported as i32 {
                "the target cannot express this change".to_owned()
            } else {
                String::new()
            },
            refs,
            closes,
        };
        Ok(match job.operation {
            JobOperation::UpsertLead => {
                let Some(lead) = lead().await? else {
                    return Ok(gone());
                };
                let answer = client
                    .upsert_lead(UpsertLeadRequest {
                        lead: Some(lead),
                        changed_fields: Vec::new(),
                        idempotency_key: key,
                    })
                    .await?
                    .into_inner();
                done(answer.outcome, answer.refs, false)
            }
            JobOperation::DeleteLead => {
                let Some(lead) = lead().await? else {
                    return Ok(gone());
                };
                let answer = client
                    .delete_lead(DeleteLeadRequest {
                        lead: Some(lead),
                        idempotency_key: key,
                    })
                    .await?
                    .into_inner();
                done(answer.outcome, answer.refs, true)
            }
            JobOperation::UpsertDeal => {
                let Some((deal, contact)) = deal_and_contact().await? else {
                    return Ok(gone());
                };
                let answer = client
                    .upsert_deal(UpsertDealRequest {
                        deal: Some(deal),
                        contact,
                        changed_fields: Vec::new(),
                        idempotency_key: key,
                    })
                    .await?
                    .into_inner();
                done(answer.outcome, answer.refs, false)
            }
            JobOperation::DeleteDeal => {
                let Some((deal, _)) = deal_and_contact().await? else {
                    return Ok(gone());
                };
                let answer = client
                    .delete_deal(DeleteDealRequest {
                        deal: Some(deal),
                        reason: DELETED_IN_HANA.to_owned(),
                        idempotency_key: key,
                    })
                    .await?
                    .into_inner();
                done(answer.outcome, answer.refs, true)
            }
            JobOperation::AddActivity => {
                let Some((deal, contact)) = deal_and_contact().await? else {
                    return Ok(gone());
                };
                let answer = client
                    .add_activity(AddActivityRequest {
                        activity: Some(Activity {
                            subject: "Hana conversation".to_owned(),
                            ..Default::default()
                        }),
                        deal: Some(deal),
                        contact,
                        idempotency_key: key,
                    })
                    .await?
                    .into_inner();
                done(answer.outcome, answer.refs, false)
            }
            JobOperation::Unspecified => Finished::Dead("the job names no operation".to_owned()),
        })
    }

    async fn finish(&self, job: &Claimed, finished: Finished) -> Result<(), IngestError> {
        let now = now_ms();
        let (state, next_at, error) = match &finished {
            Finished::Done { note, .. } => ("done", now, note.clone()),
            Finished::Retry { at_ms, error } => ("pending", *at_ms, error.clone()),
            Finished::Dead(error) => ("dead", now, error.clone()),
        };
        let outcome = if state == "pending" { "retry" } else { state };
        let span = tracing::Span::current();
        span.record("outcome", outcome);
        if let Finished::Done { refs, .. } = &finished {
            let remote_ids: Vec<String> = refs
                .iter()
                .map(|link| format!("{}={}", link.kind().as_str_name(), link.remote_id))
                .collect();
            span.record("remote_ids", remote_ids.join(","));
        } else {
            span.record("otel.status_code", "ERROR");
        }
        if state != "done" {
            tracing::warn!(job = %job.id, target = system_name(job.target), state, error, "sync job failed");
        }
        let (lead_id, deal_id) = self.entities_of(job).await?;
        let mut transaction = self.store.begin_write().await?;
        let still_ours = sqlx::query(
            "UPDATE jobs SET state = $1, attempts = attempts + 1, next_attempt_at = $2, last_error = $3, \
             updated_at = $4 WHERE id = $5 AND state = 'running' AND claim = $6",
        )
        .bind(state)
        .bind(next_at)
        .bind(&error)
        .bind(now)
        .bind(&job.id)
        .bind(&job.claim)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if still_ours != 1 {
            // The lease expired and another runner took the job: its outcome counts.
            return Ok(());
        }
        if let Finished::Done { refs, closes, .. } = finished {
            let mut linked_anew = std::collections::BTreeSet::new();
            for link in refs {
                let entity = match link.kind() {
                    RemoteKind::HanaLead
                    | RemoteKind::PipedrivePerson
                    | RemoteKind::SalesmanLead => lead_id.as_deref().map(|id| ("lead", id)),
                    RemoteKind::HanaOpportunity
                    | RemoteKind::PipedriveDeal
                    | RemoteKind::PipedriveActivity => deal_id.as_deref().map(|id| ("deal", id)),
                    RemoteKind::Unspecified => None,
                };
                let Some((entity_type, entity_id)) = entity else {
                    continue;
                };
                let kind = crate::queries::remote_kind_name(link.kind());
                let system = system_name(link.system());
                if closes {
                    sqlx::query(
                        "UPDATE links SET closed_at = $1 WHERE entity_type = $2 AND entity_id = $3 \
                         AND system = $4 AND kind = $5 AND closed_at IS NULL",
                    )
                    .bind(now)
                    .bind(entity_type)
                    .bind(entity_id)
                    .bind(system)
                    .bind(kind)
                    .execute(&mut *transaction)
                    .await?;
                    continue;
                }
                let known: Option<String> = sqlx::query_scalar(
                    "SELECT remote_id FROM links WHERE entity_type = $1 AND entity_id = $2 \
                     AND system = $3 AND kind = $4 AND closed_at IS NULL",
                )
                .bind(entity_type)
                .bind(entity_id)
                .bind(system)
                .bind(kind)
                .fetch_optional(&mut *transaction)
                .await?;
                if known.as_deref() != Some(link.remote_id.as_str())
                    && link.system() != System::Hana
                {
                    linked_anew.insert((entity_type, entity_id.to_owned()));
                }
                sqlx::query(
                    "INSERT INTO links (entity_type, entity_id, system, kind, remote_id, linked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (entity_type, entity_id, system, kind) \
                     DO UPDATE SET remote_id = excluded.remote_id, closed_at = NULL",
                )
                .bind(entity_type)
                .bind(entity_id)
                .bind(system)
                .bind(kind)
                .bind(&link.remote_id)
                .bind(now)
                .execute(&mut *transaction)
                .await?;
            }
            if self.adapters.contains_key(&System::Hana) {
                for (entity_type, entity_id) in linked_anew {
                    queue_hana_write_back(&mut transaction, job, entity_type, &entity_id, now)
                        .await?;
                }
            }
        }
        transaction.commit().await?;
        // Counted once recorded: a run whose lease another runner took over, or whose outcome
        // the store could not record (the job runs again), is not an outcome.
        leadrelay_runtime::metrics::metrics().job_finished(system_name(job.target), outcome);
        Ok(())
    }

    /// The lead and the deal a job's links belong to: a lead job's lead; a deal job's deal and
    /// its contact lead.
    async fn entities_of(
        &self,
        job: &Claimed,
    ) -> Result<(Option<String>, Option<String>), StoreError> {
        match job.operation {
            JobOperation::UpsertLead | JobOperation::DeleteLead => {
                Ok((Some(job.entity_id.clone()), None))
            }
            _ => {
                let contact: Option<Option<String>> =
                    sqlx::query_scalar("SELECT contact_lead_id FROM deals WHERE id = $1")
                        .bind(&job.entity_id)
                        .fetch_optional(self.store.pool())
                        .await?;
                Ok((contact.flatten(), Some(job.entity_id.clone())))
            }
        }
    }
}

/// Queues the write-back of new remote ids into the Hana record of an entity that came from
/// Hana.
async fn queue_hana_write_back(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    job: &Claimed,
    entity_type: &str,
    entity_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    let from_hana = sqlx::query(
        "SELECT 1 FROM links WHERE entity_type = $1 AND entity_id = $2 AND system = 'hana' \
         AND closed_at IS NULL",
    )
    .bind(entity_type)
    .bind(entity_id)
    .fetch_optional(&mut **transaction)
    .await?
    .is_some();
    if !from_hana {
        return Ok(());
    }
    let operation = if entity_type == "lead" {
        "upsert_lead"
    } else {
        "upsert_deal"
    };
    sqlx::query(
        "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, trace_context, \
         next_attempt_at, created_at, updated_at, state, attempts, last_error) \
         VALUES ($1, $2, 'hana', $3, $4, $5, $7, $6, $6, $6, 'pending', 0, '')",
    )
    .bind(crate::ingest::new_id("job"))
    .bind(&job.event_id)
    .bind(operation)
    .bind(entity_type)
    .bind(entity_id)
    .bind(now)
    // The write-back continues the trace of the job that learned the remote id.
    .bind(current_traceparent())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// Logs a job whose outcome could not be stored.
fn report(finished: Result<Result<(), IngestError>, tokio::task::JoinError>) {
    match finished {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "a job's outcome could not be stored; its lease will expire and it runs again");
        }
        Err(error) => {
            tracing::warn!(%error, "a job's task failed; its lease will expire and it runs again")
        }
    }
}

/// What a failed call means for its job.
fn classify(job: &Claimed, status: &tonic::Status) -> Finished {
    let message = format!("{:?}: {}", status.code(), status.message());
    let transient = matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
    );
    if !transient || job.attempts + 1 >= MAX_ATTEMPTS {
        return Finished::Dead(message);
    }
    let hinted = <tonic::Status as tonic_types::StatusExt>::get_error_details(status)
        .retry_info()
        .and_then(|info| info.retry_delay)
        .map_or(0, |delay| {
            i64::try_from(delay.as_millis()).unwrap_or(MAX_RETRY_MS)
        });
    Finished::Retry {
        at_ms: now_ms() + backoff_ms(job.attempts, &job.id).max(hinted),
        error: message,
    }
}

/// 1 s · 2^attempts, at most 10 min, with ±20% jitter drawn from the job id (so retries of many
/// jobs failed together spread out).
fn backoff_ms(attempts: i64, job_id: &str) -> i64 {
    let exponent = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    let base = FIRST_RETRY_MS
        .saturating_mul(1_i64 << exponent)
        .min(MAX_RETRY_MS);
    let spread: i64 = job_id.bytes().map(i64::from).sum::<i64>() % 41 - 20;
    base + base * spread / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with one pending Pipedrive job, `job_1`, due now.
    async fn store_with_a_job(
        folder: &std::path::Path,
    ) -> Result<Store, Box<dyn std::error::Error>> {
        let url: leadrelay_runtime::config::DatabaseUrl =
            format!("sqlite://{}/runner.db", folder.display()).parse()?;
        let store = Store::connect(&url).await?;
        add_a_job(&store).await?;
        Ok(store)
    }

    /// Migrates `store` and adds a pending Pipedrive job, `job_1`, due now.
    async fn add_a_job(store: &Store) -> Result<(), StoreError> {
        store.migrate().await?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO events (id, source, kind, dedupe_key, raw_body, received_at) \
             VALUES ('evt_1', 'hana', 'lead.created', 'key_1', $1, $2)",
        )
        .bind(b"{}".to_vec())
        .bind(now)
        .execute(store.pool())
        .await?;
        add_pending_job(store, "job_1", "lead_1", now).await
    }

    /// Adds a pending Pipedrive job `id` of `evt_1` for the lead `lead_id`, due at `now`.
    async fn add_pending_job(
        store: &Store,
        id: &str,
        lead_id: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, \
             next_attempt_at, created_at, updated_at, state, attempts, last_error) \
             VALUES ($1, 'evt_1', 'pipedrive', 'upsert_lead', 'lead', $2, $3, $3, $3, 'pending', 0, '')",
        )
        .bind(id)
        .bind(lead_id)
        .bind(now)
        .execute(store.pool())
        .await?;
        Ok(())
    }

    type BoxedError = Box<dyn std::error::Error + Send + Sync>;

    /// A claim takes no more jobs than the room it is given, the oldest first: `job_1` and four
    /// more pending jobs of other leads, all due, claimed 3 and then 8 at a time.
    async fn claims_take_at_most_the_room(store: &Store) -> Result<(), BoxedError> {
        add_a_job(store).await?;
        let now = now_ms();
        for number in 2..=5 {
            add_pending_job(
                store,
                &format!("job_{number}"),
                &format!("lead_{number}"),
                now,
            )
            .await?;
        }
        let runner = JobRunner::new(
            store.clone(),
            &[(System::Pipedrive, "http://127.0.0.1:9".parse()?)],
        )?;
        let ids = |claimed: Vec<Claimed>| -> Vec<String> {
            claimed.into_iter().map(|job| job.id).collect()
        };
        assert_eq!(
            ids(runner.claim(System::Pipedrive, 3).await?),
            ["job_1", "job_2", "job_3"]
        );
        assert_eq!(
            ids(runner.claim(System::Pipedrive, 8).await?),
            ["job_4", "job_5"]
        );
        Ok(())
    }

    #[tokio::test]
    async fn sqlite_claims_take_at_most_the_room() -> Result<(), BoxedError> {
        let folder = tempfile::tempdir()?;
        let url: leadrelay_runtime::config::DatabaseUrl =
            format!("sqlite://{}/runner.db", folder.path().display()).parse()?;
        let store = Store::connect(&url).await?;
        claims_take_at_most_the_room(&store).await?;
        store.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn postgres_claims_take_at_most_the_room() -> Result<(), BoxedError> {
        let database = leadrelay_testkit::TestDatabase::create("claim_room").await?;
        let store = Store::connect(&database.url().parse()?).await?;
        claims_take_at_most_the_room(&store).await?;
        store.close().await;
        database.drop_database().await?;
        Ok(())
    }

    async fn state_of(store: &Store) -> Result<String, sqlx::Error> {
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = 'job_1'")
            .fetch_one(store.pool())
            .await
    }

    /// A runner that lost its lease (it could not reach the store for a whole lease) and comes
    /// back neither keeps renewing nor records its outcome over the run of the runner that took
    /// the job over.
    #[tokio::test]
    async fn a_runner_that_lost_its_lease_cannot_overwrite_the_new_claim()
    -> Result<(), Box<dyn std::error::Error>> {
        let folder = tempfile::tempdir()?;
        let store = store_with_a_job(folder.path()).await?;
        let adapter: url::Url = "http://127.0.0.1:9".parse()?;
        let targets = [(System::Pipedrive, adapter)];
        let stalled =
            JobRunner::new(store.clone(), &targets)?.with_lease(Duration::from_millis(30));
        let successor =
            JobRunner::new(store.clone(), &targets)?.with_lease(Duration::from_millis(30));

        let first = stalled.claim(System::Pipedrive, 8).await?;
        assert_eq!(first.len(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        successor.release_expired_leases().await?;
        let second = successor.claim(System::Pipedrive, 8).await?;
        assert_eq!(
            second.len(),
            1,
            "the expired lease was taken back and claimed again"
        );
        assert_ne!(first[0].claim, second[0].claim);

        // The stalled runner notices at its next renewal that the job is no longer its own.
        tokio::time::timeout(Duration::from_secs(5), stalled.renew_lease(&first[0])).await?;
        stalled
            .finish(&first[0], Finished::Dead("the stale run failed".to_owned()))
            .await?;
        assert_eq!(
            state_of(&store).await?,
            "running",
            "the stale outcome is ignored"
        );

        successor
            .finish(
                &second[0],
                Finished::Done {
                    refs: Vec::new(),
                    closes: false,
                    note: String::new(),
                },
            )
            .await?;
        assert_eq!(state_of(&store).await?, "done");
        Ok(())
    }

    /// A statement in flight when the database's host goes silent (a failover to another
    /// address, a partition) never gets its answer. The runner gives it up at its store deadline
    /// and goes on, and runs the job once the database can be reached again; without the
    /// deadline its loop waits for the system's TCP timeout (~15 min).
    #[tokio::test]
    async fn a_database_that_goes_silent_mid_statement_does_not_hold_the_runner()
    -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let database = crate::store::testing::RelayedDatabase::create("runner_silence").await?;
        let store = database.relayed.clone();
        add_a_job(&store).await?;
        // Another session holds the jobs table: the runner's first statement waits in Postgres,
        // in flight, until the relay goes silent.
        let holder = database.hold("jobs").await?;
        let adapter: url::Url = "http://127.0.0.1:9".parse()?;
        let runner = JobRunner::new(store.clone(), &[(System::Pipedrive, adapter)])?
            .with_store_deadline(Duration::from_secs(1));
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(runner.run(shutdown.clone()));

        database.until_waiting("UPDATE jobs").await?;
        database.relay.cut();
        holder.rollback().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The adapter is not there, so running the job records a retry.
        database
            .restore_until(|| async {
                let attempts: i64 =
                    sqlx::query_scalar("SELECT attempts FROM jobs WHERE id = 'job_1'")
                        .fetch_one(database.direct.pool())
                        .await?;
                Ok((attempts < 1).then(|| {
                    "no attempt recorded: the runner waits for the statement the silence caught"
                        .to_owned()
                }))
            })
            .await?;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), running).await??;
        database.drop_database().await?;
        Ok(())
    }

    #[test]
    fn retries_back_off_exponentially_within_bounds() {
        assert!((800..=1200).contains(&backoff_ms(0, "job_a")));
        assert!((3200..=4800).contains(&backoff_ms(2, "job_a")));
        assert!(backoff_ms(30, "job_a") <= MAX_RETRY_MS * 12 / 10);
        assert!(backoff_ms(30, "job_a") >= MAX_RETRY_MS * 8 / 10);
    }

    #[test]
    fn permanent_errors_and_exhausted_retries_are_dead() {
        let job = |attempts| Claimed {
            id: "job_1".to_owned(),
            event_id: "evt_1".to_owned(),
            target: System::Pipedrive,
            operation: JobOperation::UpsertLead,
            entity_id: "lead_1".to_owned(),
            attempts,
            trace_context: None,
            claim: "claim_1".to_owned(),
        };
        assert!(matches!(
            classify(&job(0), &tonic::Status::invalid_argument("Validation failed: title")),
            Finished::Dead(message) if message.contains("Validation failed")
        ));
        assert!(matches!(
            classify(&job(0), &tonic::Status::unavailable("down")),
            Finished::Retry { .. }
        ));
        assert!(matches!(
            classify(&job(MAX_ATTEMPTS - 1), &tonic::Status::unavailable("down")),
            Finished::Dead(_)
        ));
    }
}
