//! The store counts through indexes, so a count costs no more the longer LeadRelay runs: a
//! metrics scrape reads the outstanding jobs only, and GetStats neither reads the events' rows
//! (which hold the bodies) nor sorts every job.

use leadrelay_orchestrator::{Store, queries};
use leadrelay_proto::v1::{JobCount, JobState, System};
use leadrelay_runtime::config::DatabaseUrl;
use leadrelay_testkit::{TestDatabase, query_plan};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Events and how often each was redelivered.
const EVENTS: [(&str, i64); 4] = [("evt_1", 0), ("evt_2", 2), ("evt_3", 0), ("evt_4", 1)];

/// Jobs per target and state: more done jobs than anything else, as in a store that has run.
/// `paused` is a state this version does not know, as a newer one might write.
const JOBS: [(&str, &str, usize); 8] = [
    ("pipedrive", "done", 6),
    ("pipedrive", "coalesced", 2),
    ("pipedrive", "pending", 3),
    ("pipedrive", "running", 1),
    ("pipedrive", "paused", 1),
    ("salesman", "done", 5),
    ("salesman", "dead", 2),
    ("salesman", "pending", 1),
];

/// A migrated store holding [`EVENTS`], one call in quarantine and [`JOBS`]; each job's
/// creation time is its number.
async fn seeded(store: &Store) -> TestResult {
    store.migrate().await?;
    for (id, redelivered) in EVENTS {
        sqlx::query(
            "INSERT INTO events (id, source, kind, dedupe_key, raw_body, received_at, duplicate_count) \
             VALUES ($1, 'hana', 'lead.created', $1, $2, 0, $3)",
        )
        .bind(id)
        .bind(b"{}".to_vec())
        .bind(redelivered)
        .execute(store.pool())
        .await?;
    }
    sqlx::query(
        "INSERT INTO quarantine (id, source, kind, reason, raw_body, received_at) \
         VALUES ('qtn_1', 'hana', 'lead.created', 'bad JSON', $1, 0)",
    )
    .bind(b"{".to_vec())
    .execute(store.pool())
    .await?;
    let mut number: i64 = 0;
    for (target, state, count) in JOBS {
        for _ in 0..count {
            number += 1;
            sqlx::query(
                "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, state, \
                 next_attempt_at, created_at, updated_at) \
                 VALUES ($1, 'evt_1', $2, 'upsert', 'lead', 'lea_1', $3, 0, $4, 0)",
            )
            .bind(format!("job_{number}"))
            .bind(target)
            .bind(state)
            .bind(number)
            .execute(store.pool())
            .await?;
        }
    }
    Ok(())
}

fn counts(read: &[JobCount]) -> Vec<(System, JobState, u64)> {
    read.iter()
        .map(|count| (count.target(), count.state(), count.count))
        .collect()
}

/// What a scrape and GetStats read from a [`seeded`] store.
async fn counts_are_right(store: &Store) -> TestResult {
    seeded(store).await?;
    let outstanding = counts(&queries::outstanding_job_counts(store.pool()).await?);
    assert_eq!(
        outstanding,
        [
            (System::Pipedrive, JobState::Pending, 3),
            (System::Pipedrive, JobState::Running, 1),
            (System::Salesman, JobState::Dead, 2),
            (System::Salesman, JobState::Pending, 1),
        ]
    );
    let stats = queries::stats(store.pool()).await?;
    assert_eq!(
        (stats.events, stats.duplicates, stats.quarantined),
        (4, 3, 1)
    );
    assert_eq!(
        counts(&stats.jobs),
        [
            (System::Pipedrive, JobState::Coalesced, 2),
            (System::Pipedrive, JobState::Done, 6),
            (System::Pipedrive, JobState::Pending, 3),
            (System::Pipedrive, JobState::Running, 1),
            (System::Pipedrive, JobState::Unspecified, 1),
            (System::Salesman, JobState::Dead, 2),
            (System::Salesman, JobState::Done, 5),
            (System::Salesman, JobState::Pending, 1),
        ]
    );
    // The first pending job is the ninth.
    assert_eq!(stats.oldest_pending_ms, Some(9));
    Ok(())
}

/// `query`'s plan, see [`query_plan`].
async fn plan(store: &Store, query: &str) -> TestResult<Vec<String>> {
    let mut connection = store.pool().acquire().await?;
    Ok(query_plan(&mut connection, query).await?)
}

/// On either engine, the redeliveries are summed over the events redelivered only.
async fn redeliveries_are_read_from_their_index(store: &Store) -> TestResult {
    let steps = plan(store, queries::DUPLICATE_COUNT).await?;
    assert!(
        steps.iter().any(|step| step.contains("events_redelivered")),
        "{steps:?}"
    );
    Ok(())
}

#[tokio::test]
async fn sqlite_counts_read_indexes_not_rows() -> TestResult {
    let folder = tempfile::tempdir()?;
    let url: DatabaseUrl = format!("sqlite://{}/counts.db", folder.path().display()).parse()?;
    let store = Store::connect(&url).await?;
    counts_are_right(&store).await?;
    let steps = plan(&store, queries::OUTSTANDING_JOB_COUNTS).await?;
    assert!(
        steps
            .iter()
            .any(|step| step.starts_with("SEARCH jobs USING") && step.contains("jobs_due")),
        "a scrape reads the outstanding jobs through jobs_due, not every job: {steps:?}"
    );
    for query in [
        queries::EVENT_COUNT,
        queries::DUPLICATE_COUNT,
        queries::JOB_COUNTS,
    ] {
        let steps = plan(&store, query).await?;
        assert!(
            steps.iter().all(|step| step.contains("COVERING INDEX")),
            "{query}\nreads rows: {steps:?}"
        );
        assert!(
            !steps.iter().any(|step| step.contains("TEMP B-TREE")),
            "{query}\nsorts every row: {steps:?}"
        );
    }
    redeliveries_are_read_from_their_index(&store).await?;
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn postgres_counts_read_the_redelivered_events_only() -> TestResult {
    let database = TestDatabase::create("counts").await?;
    let url: DatabaseUrl = database.url().parse()?;
    let store = Store::connect(&url).await?;
    counts_are_right(&store).await?;
    redeliveries_are_read_from_their_index(&store).await?;
    store.close().await;
    database.drop_database().await
}
