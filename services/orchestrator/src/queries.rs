//! Reads for the admin API: entities with their links, events, jobs, quarantine and counters.

use leadrelay_proto::v1::{
    Deal, Event, ExternalRef, Job, JobCount, JobState, Lead, QuarantinedCall, RemoteKind, System,
};
use sqlx::{AnyPool, Row, any::AnyRow};

use crate::{
    entity::CanonicalEntity,
    ingest::{source_key, source_key_tail, timestamp},
    routes::{EntityType, Operation, system_from_name, system_name},
    store::StoreError,
};

/// Largest page a list RPC returns.
pub const MAX_PAGE: u32 = 500;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 50;

/// How an entity is named.
#[derive(Clone, Debug)]
pub enum EntityKey {
    /// LeadRelay's id.
    Id(String),
    /// Any system's remote id.
    Remote {
        /// The system.
        system: System,
        /// The id there.
        remote_id: String,
    },
}

/// A page request, normalised.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    /// Rows to return.
    pub size: i64,
    /// Only rows with a lower `seq` (0 = from the newest).
    pub before_seq: i64,
}

impl Page {
    /// Reads a page size and token as the list RPCs take them.
    pub fn parse(page_size: u32, page_token: &str) -> Result<Self, String> {
        let size = match page_size {
            0 => DEFAULT_PAGE,
            size => size.min(MAX_PAGE),
        };
        let before_seq = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq > 0)
                .ok_or_else(|| format!("page_token '{page_token}' is not one this API returned"))?
        };
        Ok(Self {
            size: i64::from(size),
            before_seq,
        })
    }

    /// The token of the page after one whose last row has `last_seq`, empty after the last page.
    fn next_token(self, rows: usize, last_seq: Option<i64>) -> String {
        match last_seq {
            Some(seq) if i64::try_from(rows).unwrap_or(i64::MAX) >= self.size => seq.to_string(),
            _ => String::new(),
        }
    }
}

/// Returns a lead with its links.
pub async fn get_lead(pool: &AnyPool, key: &EntityKey) -> Result<Option<Lead>, StoreError> {
    get_entity(pool, key).await
}

/// Returns a deal with its links.
pub async fn get_deal(pool: &AnyPool, key: &EntityKey) -> Result<Option<Deal>, StoreError> {
    get_entity(pool, key).await
}

async fn get_entity<E: CanonicalEntity>(
    pool: &AnyPool,
    key: &EntityKey,
) -> Result<Option<E>, StoreError> {
    let Some(id) = resolve::<E>(pool, key).await? else {
        return Ok(None);
    };
    let body: Option<Vec<u8>> =
        sqlx::query_scalar(&format!("SELECT body FROM {} WHERE id = $1", E::TABLE))
            .bind(&id)
            .fetch_optional(pool)
            .await?;
    let Some(body) = body else { return Ok(None) };
    let mut entity =
        E::decode(body.as_slice()).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    entity.set_external_refs(links(pool, E::ENTITY_TYPE, &id).await?);
    Ok(Some(entity))
}

/// The entity linked to a record of a system other than Hana.
pub(crate) const ENTITY_BY_REMOTE_ID: &str = "SELECT entity_id FROM links \
     WHERE entity_type = $1 AND system = $2 AND remote_id = $3 AND system <> 'hana' \
     ORDER BY linked_at LIMIT 1";

/// The earliest entity of kind `E` stored under one of `keys`.
async fn entity_by_source_keys<E: CanonicalEntity>(
    pool: &AnyPool,
    keys: &[String],
) -> Result<Option<String>, sqlx::Error> {
    let sqlite = pool.connect_options().database_url.scheme() == "sqlite";
    let select = entity_by_source_keys_sql(E::TABLE, keys.len(), sqlite);
    let mut query = sqlx::query_scalar(&select);
    if sqlite {
        for key in keys {
            query = query.bind(source_key_tail(key));
        }
    }
    for key in keys {
        query = query.bind(key.as_str());
    }
    query.fetch_optional(pool).await
}

/// The statement of [`entity_by_source_keys`] for `keys` keys. SQLite finds a key by its last 16
/// characters as well, which its index holds (see [`crate::ingest::SQLITE_BY_SOURCE_KEY`]): it
/// binds every key's tail, then every key.
pub(crate) fn entity_by_source_keys_sql(table: &str, keys: usize, sqlite: bool) -> String {
    let numbered = |from: usize| -> String {
        (from..from + keys)
            .map(|number| format!("${number}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let condition = if sqlite {
        format!(
            "substr(source_key, -16) IN ({}) AND source_key IN ({})",
            numbered(1),
            numbered(keys + 1)
        )
    } else {
        format!("source_key IN ({})", numbered(1))
    };
    // Ids are time-ordered: they break a tie within one millisecond.
    format!("SELECT id FROM {table} WHERE {condition} ORDER BY created_at, id LIMIT 1")
}

/// The id of the entity of kind `E` that `key` names, if any.
async fn resolve<E: CanonicalEntity>(
    pool: &AnyPool,
    key: &EntityKey,
) -> Result<Option<String>, StoreError> {
    match key {
        EntityKey::Id(id) => Ok(Some(id.clone())),
        // Hana records are left out of the link index (migration 0004): the entity a Hana record
        // created is under its source key, which names the application as well as the id.
        EntityKey::Remote {
            system: System::Hana,
            remote_id,
        } => {
            let applications: Vec<String> =
                sqlx::query_scalar("SELECT application_id FROM hana_applications")
                    .fetch_all(pool)
                    .await?;
            if applications.is_empty() {
                return Ok(None);
            }
            let keys: Vec<String> = applications
                .iter()
                .map(|application_id| source_key(application_id, remote_id))
                .collect();
            Ok(entity_by_source_keys::<E>(pool, &keys).await?)
        }
        EntityKey::Remote { system, remote_id } => Ok(sqlx::query_scalar(ENTITY_BY_REMOTE_ID)
            .bind(E::ENTITY_TYPE.as_str())
            .bind(system_name(*system))
            .bind(remote_id)
            .fetch_optional(pool)
            .await?),
    }
}

async fn links(
    pool: &AnyPool,
    entity_type: EntityType,
    id: &str,
) -> Result<Vec<ExternalRef>, StoreError> {
    let rows = sqlx::query(
        "SELECT system, kind, remote_id, linked_at, closed_at FROM links \
         WHERE entity_type = $1 AND entity_id = $2 ORDER BY linked_at, system, kind",
    )
    .bind(entity_type.as_str())
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let kind: String = row.try_get("kind")?;
            Ok(ExternalRef {
                system: system_from_name(row.try_get::<String, _>("system")?.as_str()).into(),
                kind: remote_kind(&kind).into(),
                remote_id: row.try_get("remote_id")?,
                linked_at: Some(timestamp(row.try_get("linked_at")?)),
                closed_at: row.try_get::<Option<i64>, _>("closed_at")?.map(timestamp),
            })
        })
        .collect()
}

/// The name a remote kind is stored under.
pub fn remote_kind_name(kind: RemoteKind) -> &'static str {
    match kind {
        RemoteKind::HanaLead => "hana_lead",
        RemoteKind::HanaOpportunity => "hana_opportunity",
        RemoteKind::PipedrivePerson => "pipedrive_person",
        RemoteKind::PipedriveDeal => "pipedrive_deal",
        RemoteKind::PipedriveActivity => "pipedrive_activity",
        RemoteKind::SalesmanLead => "salesman_lead",
        RemoteKind::Unspecified => "unspecified",
    }
}

/// The remote kind stored under `name`.
pub fn remote_kind(name: &str) -> RemoteKind {
    match name {
        "hana_lead" => RemoteKind::HanaLead,
        "hana_opportunity" => RemoteKind::HanaOpportunity,
        "pipedrive_person" => RemoteKind::PipedrivePerson,
        "pipedrive_deal" => RemoteKind::PipedriveDeal,
        "pipedrive_activity" => RemoteKind::PipedriveActivity,
        "salesman_lead" => RemoteKind::SalesmanLead,
        _ => RemoteKind::Unspecified,
    }
}

const EVENT_COLUMNS: &str =
    "seq, id, source, kind, application_id, dedupe_key, raw_body, received_at, duplicate_count";

fn event_from_row(row: &AnyRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: row.try_get("id")?,
        source: system_from_name(row.try_get::<String, _>("source")?.as_str()).into(),
        kind: row.try_get("kind")?,
        application_id: row.try_get("application_id")?,
        dedupe_key: row.try_get("dedupe_key")?,
        received_at: Some(timestamp(row.try_get("received_at")?)),
        raw_body: row.try_get("raw_body")?,
        duplicate_count: u32::try_from(row.try_get::<i64, _>("duplicate_count")?)
            .unwrap_or(u32::MAX),
    })
}

/// Lists events, newest first; returns the events and the next page token.
pub async fn list_events(
    pool: &AnyPool,
    source: System,
    page: Page,
) -> Result<(Vec<Event>, String), StoreError> {
    let source_filter = match source {
        System::Unspecified => String::new(),
        system => system_name(system).to_owned(),
    };
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE ($1 = '' OR source = $1) AND ($2 = 0 OR seq < $2) \
         ORDER BY seq DESC LIMIT $3"
    ))
    .bind(source_filter)
    .bind(page.before_seq)
    .bind(page.size)
    .fetch_all(pool)
    .await?;
    let events = rows
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let last_seq = rows
        .last()
        .map(|row| row.try_get::<i64, _>("seq"))
        .transpose()?;
    Ok((events, page.next_token(rows.len(), last_seq)))
}

/// Returns an event and its jobs.
pub async fn get_event(pool: &AnyPool, id: &str) -> Result<Option<(Event, Vec<Job>)>, StoreError> {
    let row = sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let event = event_from_row(&row)?;
    let jobs = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE event_id = $1 ORDER BY seq"
    ))
    .bind(id)
    .fetch_all(pool)
    .await?
    .iter()
    .map(job_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((event, jobs)))
}

const JOB_COLUMNS: &str = "id, event_id, target, operation, entity_id, state, attempts, \
     next_attempt_at, last_error, created_at, updated_at";

/// The job state stored under `name`.
pub fn job_state(name: &str) -> JobState {
    match name {
        "pending" => JobState::Pending,
        "running" => JobState::Running,
        "done" => JobState::Done,
        "dead" => JobState::Dead,
        "coalesced" => JobState::Coalesced,
        _ => JobState::Unspecified,
    }
}

fn job_from_row(row: &AnyRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.try_get("id")?,
        event_id: row.try_get("event_id")?,
        target: system_from_name(row.try_get::<String, _>("target")?.as_str()).into(),
        operation: Operation::from_name(row.try_get::<String, _>("operation")?.as_str()).into(),
        entity_id: row.try_get("entity_id")?,
        state: job_state(row.try_get::<String, _>("state")?.as_str()).into(),
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
        next_attempt_at: Some(timestamp(row.try_get("next_attempt_at")?)),
        last_error: row.try_get("last_error")?,
        created_at: Some(timestamp(row.try_get("created_at")?)),
        updated_at: Some(timestamp(row.try_get("updated_at")?)),
    })
}

/// The name a job state is stored under; empty for "any".
pub fn job_state_name(state: JobState) -> &'static str {
    match state {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Dead => "dead",
        JobState::Coalesced => "coalesced",
        JobState::Unspecified => "",
    }
}

/// The creation time (unix milliseconds) of the oldest pending job of each target that has one.
pub async fn oldest_pending_by_target(pool: &AnyPool) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT target, MIN(created_at) AS oldest FROM jobs WHERE state = 'pending' GROUP BY target",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("target")?, row.try_get("oldest")?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Lists jobs in `state` for `target` (empty: any), oldest first, after the job with sequence
/// `after_seq`; returns them and the next page token.
pub async fn list_jobs(
    pool: &AnyPool,
    state: &str,
    target: &str,
    size: i64,
    after_seq: i64,
) -> Result<(Vec<Job>, String), StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT seq, {JOB_COLUMNS} FROM jobs WHERE ($1 = '' OR state = $1) AND ($2 = '' OR target = $2) \
         AND seq > $3 ORDER BY seq LIMIT $4"
    ))
    .bind(state)
    .bind(target)
    .bind(after_seq)
    .bind(size)
    .fetch_all(pool)
    .await?;
    let jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = match rows.last() {
        Some(row) if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= size => {
            row.try_get::<i64, _>("seq")?.to_string()
        }
        _ => String::new(),
    };
    Ok((jobs, next))
}

/// Why a job cannot be retried.
#[derive(Debug)]
pub enum RetryRefusal {
    /// No such job.
    NotFound,
    /// The job is in this state, which a retry cannot change.
    State(&'static str),
}

/// Makes a dead or waiting job due now; returns it.
pub async fn retry_job(
    pool: &AnyPool,
    id: &str,
    now: i64,
) -> Result<Result<Job, RetryRefusal>, StoreError> {
    let changed = sqlx::query(
        "UPDATE jobs SET state = 'pending', next_attempt_at = $1, updated_at = $1 \
         WHERE id = $2 AND state IN ('dead', 'pending')",
    )
    .bind(now)
    .bind(id)
    .execute(pool)
    .await?
    .rows_affected();
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(Err(RetryRefusal::NotFound));
    };
    let job = job_from_row(&row)?;
    if changed == 1 {
        Ok(Ok(job))
    } else {
        Ok(Err(RetryRefusal::State(job_state_name(job.state()))))
    }
}

/// Makes dead jobs (of `target`, empty: all) due now, at most `limit` (0: all), oldest first;
/// returns how many.
pub async fn replay_dead_letters(
    pool: &AnyPool,
    target: &str,
    limit: i64,
    now: i64,
) -> Result<u64, StoreError> {
    let limit = if limit <= 0 { i64::MAX } else { limit };
    let replayed = sqlx::query(
        "UPDATE jobs SET state = 'pending', next_attempt_at = $1, updated_at = $1 WHERE id IN \
         (SELECT id FROM jobs WHERE state = 'dead' AND ($2 = '' OR target = $2) ORDER BY seq LIMIT $3)",
    )
    .bind(now)
    .bind(target)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(replayed)
}

/// Lists quarantined calls, newest first; returns them and the next page token.
pub async fn list_quarantined(
    pool: &AnyPool,
    page: Page,
) -> Result<(Vec<QuarantinedCall>, String), StoreError> {
    let rows = sqlx::query(
        "SELECT seq, id, source, kind, reason, raw_body, received_at FROM quarantine \
         WHERE ($1 = 0 OR seq < $1) ORDER BY seq DESC LIMIT $2",
    )
    .bind(page.before_seq)
    .bind(page.size)
    .fetch_all(pool)
    .await?;
    let calls = rows
        .iter()
        .map(|row| {
            Ok(QuarantinedCall {
                id: row.try_get("id")?,
                source: system_from_name(row.try_get::<String, _>("source")?.as_str()).into(),
                kind: row.try_get("kind")?,
                reason: row.try_get("reason")?,
                raw_body: row.try_get("raw_body")?,
                received_at: Some(timestamp(row.try_get("received_at")?)),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let last_seq = rows
        .last()
        .map(|row| row.try_get::<i64, _>("seq"))
        .transpose()?;
    Ok((calls, page.next_token(rows.len(), last_seq)))
}

/// Jobs by target and state, every state: for [`stats`], read on request.
pub async fn job_counts(pool: &AnyPool) -> Result<Vec<JobCount>, StoreError> {
    let rows = sqlx::query(JOB_COUNTS).fetch_all(pool).await?;
    let count = |value: i64| u64::try_from(value).unwrap_or_default();
    let mut counts = Vec::new();
    for row in &rows {
        let target = system_from_name(row.try_get::<String, _>("target")?.as_str());
        let mut counted = 0;
        for state in COUNTED_STATES {
            let jobs: i64 = row.try_get(state)?;
            counted += jobs;
            if jobs > 0 {
                counts.push(JobCount {
                    target: target.into(),
                    state: job_state(state).into(),
                    count: count(jobs),
                });
            }
        }
        // Jobs in a state this version does not know (written by a newer one) still count.
        let unknown = row.try_get::<i64, _>("total")? - counted;
        if unknown > 0 {
            counts.push(JobCount {
                target: target.into(),
                state: JobState::Unspecified.into(),
                count: count(unknown),
            });
        }
    }
    Ok(counts)
}

/// The states [`JOB_COUNTS`] counts, in the order [`job_counts`] lists them.
const COUNTED_STATES: [&str; 5] = ["coalesced", "dead", "done", "pending", "running"];

/// The statement of [`job_counts`]: a row per target with a count per state, in one pass over
/// `jobs_by_entity`, which starts with the target. Grouped by target and state, every job went
/// through a sort first (540 ms at two million jobs on SQLite, against 185 ms). Public so that a
/// test can check its plan.
#[doc(hidden)]
pub const JOB_COUNTS: &str = "SELECT target, COUNT(*) AS total, \
     COUNT(*) FILTER (WHERE state = 'coalesced') AS coalesced, \
     COUNT(*) FILTER (WHERE state = 'dead') AS dead, \
     COUNT(*) FILTER (WHERE state = 'done') AS done, \
     COUNT(*) FILTER (WHERE state = 'pending') AS pending, \
     COUNT(*) FILTER (WHERE state = 'running') AS running \
     FROM jobs GROUP BY target ORDER BY target";

/// Jobs by target and state for the jobs still outstanding: pending, running, and dead (waiting
/// for an operator). The metrics read this at every scrape, so it must not cost more the longer
/// LeadRelay runs: done and coalesced jobs grow by two with every webhook, and counting them read
/// every job (350 ms per scrape at a million jobs on SQLite). The `jobs_due` index, which starts
/// with the state, finds the outstanding ones without reading the others (0.8 ms at that size).
/// Jobs that finish are counted as they finish, by `leadrelay_jobs_finished_total`.
pub async fn outstanding_job_counts(pool: &AnyPool) -> Result<Vec<JobCount>, StoreError> {
    counted_jobs(pool, OUTSTANDING_JOB_COUNTS).await
}

/// The statement of [`outstanding_job_counts`]; public so that a test can check its plan.
#[doc(hidden)]
pub const OUTSTANDING_JOB_COUNTS: &str = "SELECT target, state, COUNT(*) AS n FROM jobs \
     WHERE state IN ('pending', 'running', 'dead') GROUP BY target, state ORDER BY target, state";

/// Runs a count of jobs that selects `target`, `state` and `n`.
async fn counted_jobs(pool: &AnyPool, count: &str) -> Result<Vec<JobCount>, StoreError> {
    let rows = sqlx::query(count).fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            Ok(JobCount {
                target: system_from_name(row.try_get::<String, _>("target")?.as_str()).into(),
                state: job_state(row.try_get::<String, _>("state")?.as_str()).into(),
                count: u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Counters for `GetStats`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Events stored.
    pub events: u64,
    /// Redeliveries answered as duplicates.
    pub duplicates: u64,
    /// Calls in quarantine.
    pub quarantined: u64,
    /// Jobs by target and state.
    pub jobs: Vec<JobCount>,
    /// Creation time of the oldest pending job, unix milliseconds.
    pub oldest_pending_ms: Option<i64>,
}

/// Counts the events [`stats`] reports: through an index, without reading their rows, which
/// hold the bodies. Public so that a test can check its plan.
#[doc(hidden)]
pub const EVENT_COUNT: &str = "SELECT COUNT(*) FROM events";

/// Sums the redeliveries [`stats`] reports, through `events_redelivered`, which holds only the
/// events redelivered at least once: summed over every event, this read each event's whole row,
/// body included (470 ms at a million events against 0.5 ms). The condition repeats the index's:
/// SQLite uses a partial index only then. Public so that a test can check its plan.
#[doc(hidden)]
pub const DUPLICATE_COUNT: &str = "SELECT CAST(COALESCE(SUM(duplicate_count), 0) AS BIGINT) \
     FROM events WHERE duplicate_count > 0";

/// Reads the counters. The events and the jobs are counted in indexes, without reading their
/// rows (only the pending jobs' are read, for the oldest): at a million events and two million
/// jobs on SQLite the whole read took 0.2 s, against 1.0–1.1 s when it read every row.
pub async fn stats(pool: &AnyPool) -> Result<Stats, StoreError> {
    let count = |value: i64| u64::try_from(value).unwrap_or_default();
    let events: i64 = sqlx::query_scalar(EVENT_COUNT).fetch_one(pool).await?;
    let duplicates: i64 = sqlx::query_scalar(DUPLICATE_COUNT).fetch_one(pool).await?;
    let quarantined: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quarantine")
        .fetch_one(pool)
        .await?;
    let jobs = job_counts(pool).await?;
    let oldest_pending_ms: Option<i64> =
        sqlx::query_scalar("SELECT MIN(created_at) FROM jobs WHERE state = 'pending'")
            .fetch_one(pool)
            .await?;
    Ok(Stats {
        events: count(events),
        duplicates: count(duplicates),
        quarantined: count(quarantined),
        jobs,
        oldest_pending_ms,
    })
}
