//! The job counts a metrics scrape reads cover the outstanding jobs only, through an index, so a
//! scrape costs the same however many jobs are done.

use leadrelay_orchestrator::{Store, queries};
use leadrelay_proto::v1::JobCount;
use leadrelay_proto::v1::{JobState, System};
use leadrelay_runtime::config::DatabaseUrl;
use leadrelay_testkit::TestDatabase;
use sqlx::Row as _;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Jobs per target and state: more done jobs than anything else, as in a store that has run.
const SEEDED: [(&str, &str, usize); 7] = [
    ("pipedrive", "done", 6),
    ("pipedrive", "coalesced", 2),
    ("pipedrive", "pending", 3),
    ("pipedrive", "running", 1),
    ("salesman", "done", 5),
    ("salesman", "dead", 2),
    ("salesman", "pending", 1),
];

async fn seed_jobs(store: &Store) -> TestResult {
    sqlx::query(
        "INSERT INTO events (id, source, kind, dedupe_key, raw_body, received_at) \
         VALUES ('evt_1', 'hana', 'lead.created', 'key-1', $1, 0)",
    )
    .bind(b"{}".to_vec())
    .execute(store.pool())
    .await?;
    let mut number = 0;
    for (target, state, count) in SEEDED {
        for _ in 0..count {
            number += 1;
            sqlx::query(
                "INSERT INTO jobs (id, event_id, target, operation, entity_type, entity_id, state, \
                 next_attempt_at, created_at, updated_at) \
                 VALUES ($1, 'evt_1', $2, 'upsert', 'lead', 'lea_1', $3, 0, 0, 0)",
            )
            .bind(format!("job_{number}"))
            .bind(target)
            .bind(state)
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

async fn counts_are_read_by_state(store: &Store) -> TestResult {
    store.migrate().await?;
    seed_jobs(store).await?;
    let outstanding = counts(&queries::outstanding_job_counts(store.pool()).await?);
    assert_eq!(
        outstanding,
        vec![
            (System::Pipedrive, JobState::Pending, 3),
            (System::Pipedrive, JobState::Running, 1),
            (System::Salesman, JobState::Dead, 2),
            (System::Salesman, JobState::Pending, 1),
        ]
    );
    // GetStats, read on request, still counts every state.
    let every = counts(&queries::job_counts(store.pool()).await?);
    assert_eq!(every.len(), SEEDED.len());
    assert!(every.contains(&(System::Pipedrive, JobState::Done, 6)));
    assert!(every.contains(&(System::Pipedrive, JobState::Coalesced, 2)));
    Ok(())
}

#[tokio::test]
async fn sqlite_scrapes_count_outstanding_jobs_through_the_due_index() -> TestResult {
    let folder = tempfile::tempdir()?;
    let url: DatabaseUrl = format!("sqlite://{}/jobs.db", folder.path().display()).parse()?;
    let store = Store::connect(&url).await?;
    counts_are_read_by_state(&store).await?;
    let plan = explain(&store).await?;
    assert!(
        plan.iter()
            .any(|step| step.starts_with("SEARCH jobs USING") && step.contains("jobs_due")),
        "the count reads the outstanding jobs through jobs_due, not every job: {plan:?}"
    );
    store.close().await;
    Ok(())
}

/// The steps of the count's query plan, as SQLite describes them.
async fn explain(store: &Store) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "EXPLAIN QUERY PLAN {}",
        queries::OUTSTANDING_JOB_COUNTS
    ))
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(|row| row.try_get::<String, _>(3)).collect()
}

#[tokio::test]
async fn postgres_scrapes_count_outstanding_jobs() -> TestResult {
    let database = TestDatabase::create("job_counts").await?;
    let url: DatabaseUrl = database.url().parse()?;
    let store = Store::connect(&url).await?;
    counts_are_read_by_state(&store).await?;
    store.close().await;
    database.drop_database().await
}
