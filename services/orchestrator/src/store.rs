//! The durable store: SQLite (embedded default, one replica) or Postgres (any number of
//! replicas), with the same schema and migrations embedded in the binary.

use std::{path::Path, str::FromStr, time::Duration};

use leadrelay_runtime::config::DatabaseUrl;
use sqlx::{
    PgPool, SqlitePool,
    migrate::Migrator,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The SQLite file's folder could not be created.
    #[error("cannot create the database folder {path}: {source}")]
    CreateFolder {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be reached or opened.
    #[error("cannot open the database {database}: {source}")]
    Connect {
        /// The database, without its password.
        database: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("cannot migrate the database {database}: {source}")]
    Migrate {
        /// The database, without its password.
        database: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// What `migrate` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations applied by this call.
    pub applied: usize,
    /// The schema version after the call.
    pub version: i64,
}

/// The orchestrator's database.
#[derive(Clone, Debug)]
pub enum Store {
    /// SQLite in WAL mode.
    Sqlite {
        /// The pool.
        pool: SqlitePool,
        /// The database, for messages.
        database: String,
    },
    /// Postgres.
    Postgres {
        /// The pool.
        pool: PgPool,
        /// The database without its password, for messages.
        database: String,
    },
}

impl Store {
    /// Opens the database, creating an SQLite file and its folder when missing.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        let database = url.to_string();
        match url {
            DatabaseUrl::Sqlite { path } => {
                create_parent_folder(path)?;
                let options = SqliteConnectOptions::from_str(&url.connection_string())
                    .map_err(|source| StoreError::Connect {
                        database: database.clone(),
                        source,
                    })?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // An acknowledged event must survive power loss, not only a crash.
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await
                    .map_err(|source| StoreError::Connect {
                        database: database.clone(),
                        source,
                    })?;
                Ok(Self::Sqlite { pool, database })
            }
            DatabaseUrl::Postgres { .. } => {
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&url.connection_string())
                    .await
                    .map_err(|source| StoreError::Connect {
                        database: database.clone(),
                        source,
                    })?;
                Ok(Self::Postgres { pool, database })
            }
        }
    }

    /// Applies the migrations that are not applied yet.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let before = self.schema_version().await.unwrap_or(0);
        let result = match self {
            Self::Sqlite { pool, .. } => SQLITE_MIGRATIONS.run(pool).await,
            Self::Postgres { pool, .. } => POSTGRES_MIGRATIONS.run(pool).await,
        };
        result.map_err(|source| StoreError::Migrate {
            database: self.database().to_owned(),
            source,
        })?;
        let version = self.schema_version().await?;
        let migrations = match self {
            Self::Sqlite { .. } => &SQLITE_MIGRATIONS,
            Self::Postgres { .. } => &POSTGRES_MIGRATIONS,
        };
        let applied = migrations
            .iter()
            .filter(|migration| migration.version > before && migration.version <= version)
            .count();
        Ok(MigrationReport { applied, version })
    }

    /// The highest applied migration version, 0 on an empty database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        const QUERY: &str =
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = TRUE";
        let version = match self {
            Self::Sqlite { pool, .. } => sqlx::query_scalar(QUERY).fetch_one(pool).await?,
            Self::Postgres { pool, .. } => sqlx::query_scalar(QUERY).fetch_one(pool).await?,
        };
        Ok(version)
    }

    /// The database, without its password.
    pub fn database(&self) -> &str {
        match self {
            Self::Sqlite { database, .. } | Self::Postgres { database, .. } => database,
        }
    }

    /// Closes every connection, waiting for queries in flight.
    pub async fn close(&self) {
        match self {
            Self::Sqlite { pool, .. } => pool.close().await,
            Self::Postgres { pool, .. } => pool.close().await,
        }
    }
}

fn create_parent_folder(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => {
            std::fs::create_dir_all(folder).map_err(|source| StoreError::CreateFolder {
                path: folder.display().to_string(),
                source,
            })
        }
        _ => Ok(()),
    }
}
