//! The store opens, creates and migrates both backends the same way.

use std::sync::atomic::{AtomicU32, Ordering};

use leadrelay_orchestrator::{Store, store::MigrationReport};
use leadrelay_runtime::config::DatabaseUrl;
use sqlx::{Connection, Executor, PgConnection};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The Postgres server tests use; each test gets a database of its own on it.
fn postgres_admin_url() -> String {
    std::env::var("LEADRELAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh Postgres database, dropped when the guard is.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Result<Self, Box<dyn std::error::Error>> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "leadrelay_store_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin_url = postgres_admin_url();
        let mut admin = PgConnection::connect(&admin_url).await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Ok(Self { name, url })
    }

    async fn drop_database(self) -> TestResult {
        let mut admin = PgConnection::connect(&postgres_admin_url()).await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn sqlite_file_and_folder_are_created_in_wal_mode() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("nested/state/leadrelay.db");
    let url: DatabaseUrl = format!("sqlite://{}", path.display()).parse()?;
    let store = Store::connect(&url).await?;

    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 1,
            version: 1
        }
    );
    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 0,
            version: 1
        }
    );
    assert!(path.exists());
    let Store::Sqlite { pool, .. } = &store else {
        return Err("expected an SQLite store".into());
    };
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await?;
    assert_eq!(journal, "wal");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'quarantine') ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    assert_eq!(tables, ["events", "quarantine"]);
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn postgres_is_migrated_once() -> TestResult {
    let database = TestDatabase::create().await?;
    let url: DatabaseUrl = database.url.parse()?;
    let store = Store::connect(&url).await?;

    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 1,
            version: 1
        }
    );
    assert_eq!(
        store.migrate().await?,
        MigrationReport {
            applied: 0,
            version: 1
        }
    );
    let Store::Postgres { pool, .. } = &store else {
        return Err("expected a Postgres store".into());
    };
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_name IN ('events', 'quarantine') ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    assert_eq!(tables, ["events", "quarantine"]);
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
