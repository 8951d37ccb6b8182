//! The durable store: SQLite (embedded default, one replica) or Postgres (any number of
//! replicas), with the same schema and migrations embedded in the binary.

use std::{path::Path, time::Duration};

use leadrelay_runtime::config::DatabaseUrl;
use sqlx::{
    AnyPool, ConnectOptions as _, Executor,
    any::{AnyPoolOptions, install_default_drivers},
    migrate::Migrator,
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Settings every SQLite connection gets. WAL lets readers run beside the writer;
/// `synchronous = FULL` makes an acknowledged event survive power loss, not only a crash.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

/// How long a background loop's store operation (the job runner's, the pollers') may take before
/// it is given up (a transaction given up rolls back). A statement in flight when the database's
/// host goes silent (a failover to another address, a partition) would otherwise wait for the
/// system's TCP timeout, ~15 min on Linux, and hold the loop as long. Above any wait a store that
/// answers makes: 5 s for a pooled connection, then up to 5 s for SQLite's write lock.
pub(crate) const STORE_DEADLINE: Duration = Duration::from_secs(15);

/// How long a Postgres connection is waited for: one from the pool, or a new one of the ingest
/// writer's own (see [`Store::open_connection`]).
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The SQLite ingest writer's own connection failed.
    #[error("database error: {0}")]
    Sqlite(#[from] crate::ingest::SqliteError),
    /// Making a commit durable failed.
    #[error("cannot make the commit durable: {0}")]
    Sync(std::io::Error),
    /// The ingest writer's thread could not be started.
    #[error("cannot start the ingest writer: {0}")]
    Writer(std::io::Error),
    /// The database did not finish a transaction in time; its connection was given up.
    #[error(
        "the database {database} did not answer within {} s; its connection was dropped",
        .after.as_secs()
    )]
    Unanswered {
        /// The database, without its password.
        database: String,
        /// How long it had.
        after: Duration,
    },
    /// A stored row could not be decoded.
    #[error("a stored record could not be decoded: {0}")]
    Corrupt(String),
}

/// What `migrate` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations applied by this call.
    pub applied: usize,
    /// The schema version after the call.
    pub version: i64,
}

/// Which database engine a store runs on; the SQL differs only where the engines do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite in WAL mode: one orchestrator replica.
    Sqlite,
    /// Postgres: any number of orchestrator replicas.
    Postgres,
}

impl Backend {
    /// The engine's name, as the ingest metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The orchestrator's database. Queries are written once, with `$N` placeholders, which both
/// engines understand.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    database: String,
    sqlite_path: Option<std::path::PathBuf>,
    /// Woken when this process queues sync jobs, so the runner need not wait for its next look.
    jobs_queued: std::sync::Arc<tokio::sync::Notify>,
}

impl Store {
    /// Opens the database, creating an SQLite file and its folder when missing.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        install_default_drivers();
        let database = url.to_string();
        let connect_error = |source| StoreError::Connect {
            database: database.clone(),
            source,
        };
        let sqlite_path = match url {
            DatabaseUrl::Sqlite { path } => Some(path.clone()),
            DatabaseUrl::Postgres { .. } => None,
        };
        let (pool, backend) = match url {
            DatabaseUrl::Sqlite { path } => {
                create_parent_folder(path)?;
                let pool = AnyPoolOptions::new()
                    // One writer at a time is SQLite's model; the others serve reads.
                    .max_connections(4)
                    .after_connect(|connection, _| {
                        Box::pin(async move {
                            connection.execute(SQLITE_PRAGMAS).await?;
                            // The ingest writer's thread checkpoints the log once a lap (see
                            // `ingest::checkpoint`); these connections only when it grew past
                            // what that thread lets it reach.
                            connection
                                .execute(&*format!(
                                    "PRAGMA wal_autocheckpoint = {}",
                                    crate::ingest::LOG_FRAMES_LIMIT
                                ))
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&format!("{}?mode=rwc", url.connection_string()))
                    .await
                    .map_err(connect_error)?;
                (pool, Backend::Sqlite)
            }
            DatabaseUrl::Postgres { .. } => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(POSTGRES_CONNECT_TIMEOUT)
                    .connect(&url.connection_string())
                    .await
                    .map_err(connect_error)?;
                (pool, Backend::Postgres)
            }
        };
        Ok(Self {
            pool,
            backend,
            database,
            sqlite_path,
            jobs_queued: std::sync::Arc::default(),
        })
    }

    /// Tells this process's job runner that jobs were committed.
    pub fn notify_jobs_queued(&self) {
        self.jobs_queued.notify_one();
    }

    /// Resolves when [`Store::notify_jobs_queued`] is next called (or was, since the last wait).
    pub async fn jobs_queued(&self) {
        self.jobs_queued.notified().await;
    }

    /// Applies the migrations that are not applied yet.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let migrations = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let before = self.schema_version().await.unwrap_or(0);
        migrations
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                database: self.database.clone(),
                source,
            })?;
        let version = self.schema_version().await?;
        let applied = migrations
            .iter()
            .filter(|migration| migration.version > before && migration.version <= version)
            .count();
        if applied > 0 && matches!(self.backend, Backend::Sqlite) {
            // A migration that rewrites a table (0006) leaves a write-ahead log as large as the
            // table, and SQLite keeps the file at the largest size it reached: the log is copied
            // into the database and the file cut back to nothing. Another process reading the
            // store keeps its part of the log; then the file stays as it is.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        Ok(MigrationReport { applied, version })
    }

    /// The highest applied migration version, 0 on an empty database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = TRUE",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(version)
    }

    /// A new Postgres connection of its own, outside the pool, with the pool's settings; opened
    /// on the caller's runtime, which then drives its socket. A server that does not answer
    /// fails it within [`POSTGRES_CONNECT_TIMEOUT`], as it fails a wait for a pooled connection,
    /// instead of after the system's TCP timeout. It speaks Postgres's own driver, not `Any`:
    /// the ingest writer binds arrays.
    pub(crate) async fn open_postgres_connection(&self) -> Result<sqlx::PgConnection, StoreError> {
        let failed = |source| StoreError::Connect {
            database: self.database.clone(),
            source,
        };
        let options =
            sqlx::postgres::PgConnectOptions::from_url(&self.pool.connect_options().database_url)
                .map_err(failed)?;
        match tokio::time::timeout(POSTGRES_CONNECT_TIMEOUT, options.connect()).await {
            Ok(connected) => connected.map_err(failed),
            Err(_) => Err(failed(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection within {} s",
                    POSTGRES_CONNECT_TIMEOUT.as_secs()
                ),
            )))),
        }
    }

    /// `operation` on this store, or [`StoreError::Unanswered`] once it has taken longer than
    /// `deadline`. A statement in flight when the database's host goes silent (a failover to
    /// another address, a partition) never fails by itself: it waits for the system's TCP
    /// timeout, ~15 min on Linux. Dropping `operation` drops its connection unanswered.
    pub(crate) async fn within<T, E: From<StoreError>>(
        &self,
        deadline: Duration,
        operation: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        match tokio::time::timeout(deadline, operation).await {
            Ok(done) => done,
            Err(_) => Err(StoreError::Unanswered {
                database: self.database.clone(),
                after: deadline,
            }
            .into()),
        }
    }

    /// The database, without its password.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The engine the store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The SQLite file, when the store is SQLite.
    pub fn sqlite_path(&self) -> Option<&Path> {
        self.sqlite_path.as_deref()
    }

    /// A transaction that writes. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`):
    /// a deferred transaction that reads first must upgrade its lock later, and fails at once
    /// with "database is locked" when another writer committed in between.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes every connection, waiting for queries in flight.
    pub async fn close(&self) {
        self.pool.close().await;
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

/// Helpers for tests that catch a statement in flight when the database's host goes silent.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, Instant};

    use leadrelay_testkit::{TestDatabase, relay::TcpRelay};

    use super::Store;

    type Error = Box<dyn std::error::Error + Send + Sync>;

    /// A migrated Postgres test database, reached by the code under test through a relay the
    /// test can silence, and by the test directly.
    pub(crate) struct RelayedDatabase {
        database: TestDatabase,
        pub(crate) relay: TcpRelay,
        /// The store through the relay: the one the code under test gets.
        pub(crate) relayed: Store,
        /// The store reached directly: for setting up, holding locks and checking.
        pub(crate) direct: Store,
    }

    impl RelayedDatabase {
        pub(crate) async fn create(purpose: &str) -> Result<Self, Error> {
            let database = TestDatabase::create(purpose).await?;
            let relay = TcpRelay::start(database.server_addr().await?).await?;
            let relayed = Store::connect(&database.url_at(relay.addr())?.parse()?).await?;
            let direct = Store::connect(&database.url().parse()?).await?;
            direct.migrate().await?;
            Ok(Self {
                database,
                relay,
                relayed,
                direct,
            })
        }

        /// Locks `table` from a session of its own until the returned transaction ends, so that
        /// a statement on it waits in Postgres, in flight.
        pub(crate) async fn hold(
            &self,
            table: &str,
        ) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
            let mut holder = self.direct.pool().begin().await?;
            sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
                .execute(&mut *holder)
                .await?;
            Ok(holder)
        }

        /// Waits until a statement starting with `statement_start` waits for a lock. Asked
        /// through the direct store's pool, outside any transaction holding the lock: Postgres
        /// shows a transaction the activity it saw at its first look.
        pub(crate) async fn until_waiting(&self, statement_start: &str) -> Result<(), Error> {
            let since = Instant::now();
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND starts_with(query, $1)",
                )
                .bind(statement_start)
                .fetch_one(self.direct.pool())
                .await?;
                if waiting > 0 {
                    return Ok(());
                }
                if since.elapsed() > Duration::from_secs(10) {
                    return Err(
                        format!("no statement '{statement_start}…' waited for the lock").into(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Runs `operation` until a statement starting with `statement_start` waits for the
        /// lock `holder` holds, then silences the relay and lets the lock go: the statement runs,
        /// and its answer never arrives. Returns what `operation` returned; fails when it has not
        /// returned within 30 s.
        pub(crate) async fn silence_mid_statement<T: Send + 'static>(
            &self,
            holder: sqlx::Transaction<'static, sqlx::Any>,
            statement_start: &str,
            operation: impl std::future::Future<Output = T> + Send + 'static,
        ) -> Result<T, Error> {
            let running = tokio::spawn(operation);
            self.until_waiting(statement_start).await?;
            self.relay.cut();
            holder.rollback().await?;
            Ok(tokio::time::timeout(Duration::from_secs(30), running)
                .await
                .map_err(|_| "still waiting for the statement the silence caught")??)
        }

        /// Lets the relay pass traffic again and polls `check` every 100 ms until the code under
        /// test has reached the store again. `check` answers `None` once it has, or what it
        /// saw instead; the last of those is in the error when 30 s pass without it.
        pub(crate) async fn restore_until<F, Fut>(&self, mut check: F) -> Result<(), Error>
        where
            F: FnMut() -> Fut,
            Fut: std::future::Future<Output = Result<Option<String>, Error>>,
        {
            const WITHIN: Duration = Duration::from_secs(30);
            self.relay.restore();
            let restored_at = Instant::now();
            loop {
                let Some(seen) = check().await? else {
                    return Ok(());
                };
                if restored_at.elapsed() > WITHIN {
                    return Err(format!(
                        "{} s after the database answered again, still: {seen}",
                        WITHIN.as_secs()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        pub(crate) async fn drop_database(self) -> Result<(), Error> {
            self.direct.close().await;
            // The relay goes first: a connection that was open at the cut stays silent until the
            // relay drops it, and closing the pool waits for every connection, that one too. The
            // other way round, the test hung whenever the code under test had given up such a
            // connection while the pool still counted it as in use.
            drop(self.relay);
            self.relayed.close().await;
            self.database.drop_database().await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use leadrelay_testkit::query_plan;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    async fn sqlite_store(
        folder: &tempfile::TempDir,
    ) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
        let url = format!("sqlite://{}/store.db", folder.path().display()).parse()?;
        Ok(Store::connect(&url).await?)
    }

    /// The four lookups by remote id that the link index serves.
    const LOOKUPS_BY_REMOTE_ID: [&str; 4] = [
        crate::queries::ENTITY_BY_REMOTE_ID,
        crate::pipedrive_events::DEAL_BY_PIPEDRIVE_ID,
        crate::salesman_poller::SALESMAN_LEAD_IS_LINKED,
        crate::salesman_poller::LEAD_BY_SALESMAN_ID,
    ];

    /// Hana records left the link index (migration 0004), so it is partial, and SQLite uses a
    /// partial index only for a query that repeats its condition: one that forgot it would scan
    /// every link.
    #[tokio::test]
    async fn every_lookup_by_remote_id_uses_the_link_index_on_sqlite() -> TestResult {
        let queries =
            LOOKUPS_BY_REMOTE_ID.map(|query| (query.to_owned(), "links_by_remote".to_owned()));
        assert_sqlite_plans_use(&queries).await
    }

    /// Asserts that SQLite plans each query, on a migrated store, with the index named beside it.
    async fn assert_sqlite_plans_use(queries: &[(String, String)]) -> TestResult {
        let folder = tempfile::tempdir()?;
        let store = sqlite_store(&folder).await?;
        store.migrate().await?;
        let mut connection = store.pool().acquire().await?;
        for (query, index) in queries {
            let plan = query_plan(&mut connection, query).await?;
            assert!(
                plan.iter().any(|step| step.contains(index.as_str())),
                "{query}\nis planned as {plan:?}"
            );
        }
        drop(connection);
        store.close().await;
        Ok(())
    }

    /// Postgres proves more than SQLite does, but the queries must hold there too (planned with
    /// scans off, see [`query_plan`]).
    #[tokio::test]
    async fn every_lookup_by_remote_id_uses_the_link_index_on_postgres() -> TestResult {
        let database = leadrelay_testkit::TestDatabase::create("link_index").await?;
        let store = Store::connect(&database.url().parse()?).await?;
        store.migrate().await?;
        let mut connection = store.pool().acquire().await?;
        for query in LOOKUPS_BY_REMOTE_ID {
            let plan = query_plan(&mut connection, query).await?;
            assert!(
                plan.iter().any(|step| step.contains("links_by_remote")),
                "{query}\nis planned as {plan:?}"
            );
        }
        drop(connection);
        store.close().await;
        database.drop_database().await?;
        Ok(())
    }

    /// A SQLite store in a folder of its own, migrated up to (not including) `version`.
    async fn sqlite_store_before(
        version: i64,
    ) -> Result<(tempfile::TempDir, Store), Box<dyn std::error::Error + Send + Sync>> {
        let folder = tempfile::tempdir()?;
        let store = sqlite_store(&folder).await?;
        let older = Migrator {
            migrations: std::borrow::Cow::Owned(
                SQLITE_MIGRATIONS
                    .iter()
                    .filter(|migration| migration.version < version)
                    .cloned()
                    .collect(),
            ),
            ..Migrator::DEFAULT
        };
        older.run(store.pool()).await?;
        Ok((folder, store))
    }

    /// Every lookup of a lead or deal by source key on SQLite goes through the index of the keys'
    /// tails (migration 0006): without the tail in its condition it would read every row.
    #[tokio::test]
    async fn every_lookup_by_source_key_uses_the_tail_index_on_sqlite() -> TestResult {
        let mut queries = Vec::new();
        for table in ["leads", "deals"] {
            let index = format!("{table}_by_source_key_tail");
            // The ingest writer's.
            let writer = format!(
                "SELECT source_key, id, body FROM {table} WHERE {}",
                crate::ingest::SQLITE_BY_SOURCE_KEY
            );
            queries.push((writer, index.clone()));
            // GetLead and GetDeal by Hana id, under two applications.
            queries.push((
                crate::queries::entity_by_source_keys_sql(table, 2, true),
                index,
            ));
        }
        assert_sqlite_plans_use(&queries).await
    }

    /// The tail a lookup binds is the one SQLite indexed: the same characters, multi-byte ones
    /// too.
    #[tokio::test]
    async fn source_key_tails_are_cut_as_sqlite_cuts_them() -> TestResult {
        let folder = tempfile::tempdir()?;
        let store = sqlite_store(&folder).await?;
        for key in [
            "",
            "short",
            "exactly-16-chars",
            "hana:5:app-1:e734c76a-52ca-44f0-a21e8e1fe627c308",
            "hana:5:app-1:ĐàNẵng-ký-tự-có-dấu-😀-1",
        ] {
            let indexed: String = sqlx::query_scalar("SELECT substr($1, -16)")
                .bind(key)
                .fetch_one(store.pool())
                .await?;
            assert_eq!(crate::ingest::source_key_tail(key), indexed, "{key}");
        }
        store.close().await;
        Ok(())
    }

    /// Migration 0006 rebuilds the leads and deals tables without the UNIQUE of their source key:
    /// every row stays as it was, is found by its Hana id, and the log the rebuild wrote is
    /// copied and its file emptied.
    #[tokio::test]
    async fn leads_and_deals_keep_every_row_through_the_source_key_migration() -> TestResult {
        let (folder, store) = sqlite_store_before(6).await?;
        sqlx::query("INSERT INTO hana_applications (application_id) VALUES ('app-1')")
            .execute(store.pool())
            .await?;
        let hana_ids = [
            "short",
            "e734c76a-52ca-44f0-a21e8e1fe627c308",
            "ĐàNẵng-ký-tự-có-dấu-1",
        ];
        for (number, hana_id) in (1..).zip(hana_ids) {
            sqlx::query(
                "INSERT INTO leads (id, source_key, body, created_at, updated_at, deleted_at) \
                 VALUES ($1, $2, x'', $3, $3, NULL)",
            )
            .bind(format!("lead_{number}"))
            .bind(crate::ingest::source_key("app-1", hana_id))
            .bind(number)
            .execute(store.pool())
            .await?;
        }
        sqlx::query(
            "INSERT INTO deals (id, source_key, body, contact_lead_id, created_at, updated_at, \
             deleted_at) VALUES ('deal_1', $1, x'', 'lead_2', 7, 8, 9)",
        )
        .bind(crate::ingest::source_key("app-1", hana_ids[1]))
        .execute(store.pool())
        .await?;
        let rows = "SELECT id, source_key, created_at FROM leads ORDER BY id";
        let leads_before: Vec<(String, String, i64)> =
            sqlx::query_as(rows).fetch_all(store.pool()).await?;
        let deal = "SELECT id, source_key, contact_lead_id, created_at, updated_at, deleted_at \
                    FROM deals";
        let deal_before: (String, String, String, i64, i64, i64) =
            sqlx::query_as(deal).fetch_one(store.pool()).await?;

        assert_eq!(store.migrate().await?.applied, 1);
        let wal = folder.path().join("store.db-wal");
        assert_eq!(
            std::fs::metadata(&wal)?.len(),
            0,
            "the log was left in its file"
        );
        let leads_after: Vec<(String, String, i64)> =
            sqlx::query_as(rows).fetch_all(store.pool()).await?;
        assert_eq!(leads_after, leads_before);
        let deal_after: (String, String, String, i64, i64, i64) =
            sqlx::query_as(deal).fetch_one(store.pool()).await?;
        assert_eq!(deal_after, deal_before);
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'leads' ORDER BY name",
        )
        .fetch_all(store.pool())
        .await?;
        assert_eq!(
            indexes,
            ["leads_by_source_key_tail", "sqlite_autoindex_leads_1"],
            "the index of whole keys is gone, the primary key's stays"
        );
        for (number, hana_id) in (1..).zip(hana_ids) {
            let key = crate::queries::EntityKey::Remote {
                system: leadrelay_proto::v1::System::Hana,
                remote_id: hana_id.to_owned(),
            };
            let found = crate::queries::get_lead(store.pool(), &key).await?;
            assert!(
                found.is_some(),
                "lead {number} ({hana_id}) is not found by its Hana id"
            );
        }
        let key = crate::queries::EntityKey::Remote {
            system: leadrelay_proto::v1::System::Hana,
            remote_id: hana_ids[1].to_owned(),
        };
        assert!(
            crate::queries::get_deal(store.pool(), &key)
                .await?
                .is_some()
        );
        store.close().await;
        Ok(())
    }

    /// A store migrated before 0004 learns the Hana applications of the events it holds.
    #[tokio::test]
    async fn hana_applications_are_filled_from_stored_events() -> TestResult {
        let (_folder, store) = sqlite_store_before(4).await?;
        for (id, source, application_id, key) in [
            ("evt_1", "hana", "app-1", "k1"),
            ("evt_2", "hana", "app-1", "k2"),
            ("evt_3", "hana", "app-2", "k3"),
            ("evt_4", "pipedrive", "", "k4"),
        ] {
            sqlx::query(
                "INSERT INTO events (id, source, kind, application_id, dedupe_key, raw_body, \
                 received_at) VALUES ($1, $2, 'lead.created', $3, $4, x'7b7d', 0)",
            )
            .bind(id)
            .bind(source)
            .bind(application_id)
            .bind(key)
            .execute(store.pool())
            .await?;
        }
        assert_eq!(store.migrate().await?.applied, 3);
        let applications: Vec<String> = sqlx::query_scalar(
            "SELECT application_id FROM hana_applications ORDER BY application_id",
        )
        .fetch_all(store.pool())
        .await?;
        assert_eq!(applications, ["app-1", "app-2"]);
        store.close().await;
        Ok(())
    }
}
