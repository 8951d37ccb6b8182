//! The store opens, creates and migrates both backends the same way.

use leadrelay_orchestrator::{
    Store,
    store::{Backend, MigrationReport},
};
use leadrelay_runtime::config::DatabaseUrl;
use leadrelay_testkit::TestDatabase;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const TABLES: [&str; 9] = [
    "deals",
    "events",
    "hana_applications",
    "jobs",
    "leads",
    "links",
    "poll_watermarks",
    "quarantine",
    "salesman_lead_status",
];

/// The first migration applies the schema; the second finds nothing to do.
async fn migrates_once(store: &Store) -> TestResult {
    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 6,
            version: 6
        }
    );
    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 0,
            version: 6
        }
    );
    Ok(())
}

#[tokio::test]
async fn sqlite_file_and_folder_are_created_in_wal_mode() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("nested/state/leadrelay.db");
    let url: DatabaseUrl = format!("sqlite://{}", path.display()).parse()?;
    let store = Store::connect(&url).await?;

    migrates_once(&store).await?;
    assert!(path.exists());
    assert_eq!(store.backend(), Backend::Sqlite);
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await?;
    assert_eq!(journal, "wal");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(store.pool())
        .await?;
    assert_eq!(synchronous, 2, "synchronous = FULL");
    // The ingest writer's thread copies the log once a lap; a pooled connection checkpoints only
    // a log past the lap's limit (24,576 frames), not SQLite's default 1000.
    let autocheckpoint: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
        .fetch_one(store.pool())
        .await?;
    assert_eq!(autocheckpoint, 24_576);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\' \
         AND name <> 'sqlite_sequence' ORDER BY name",
    )
    .fetch_all(store.pool())
    .await?;
    assert_eq!(tables, TABLES);
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn postgres_is_migrated_once() -> TestResult {
    let database = TestDatabase::create("store").await?;
    let url: DatabaseUrl = database.url().parse()?;
    let store = Store::connect(&url).await?;

    migrates_once(&store).await?;
    assert_eq!(store.backend(), Backend::Postgres);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_%' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await?;
    assert_eq!(tables, TABLES);
    store.close().await;
    database.drop_database().await
}

#[tokio::test]
async fn an_unreachable_postgres_names_the_database_without_its_password() -> TestResult {
    let url: DatabaseUrl = "postgres://lead:hunter2@127.0.0.1:1/leadrelay".parse()?;
    let error = Store::connect(&url)
        .await
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("cannot open the database postgres://lead:***@127.0.0.1:1/leadrelay"),
        "{error}"
    );
    assert!(!error.contains("hunter2"));
    Ok(())
}
