//! Helpers for LeadRelay's tests. Postgres tests use the server at `127.0.0.1:5432` (trust auth,
//! database `test`), or `LEADRELAY_TEST_POSTGRES_URL`; each test gets a database of its own.

pub mod openapi;
pub mod pipedrive;
pub mod relay;
pub mod salesman;

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{Connection, Executor, PgConnection};

/// Errors from the helpers.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The Postgres server tests use, as a URL of a database to connect to for administration.
pub fn postgres_admin_url() -> String {
    std::env::var("LEADRELAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh, empty Postgres database; dropped by [`TestDatabase::drop_database`].
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a database named after `purpose`, this process and a counter.
    pub async fn create(purpose: &str) -> Result<Self, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "leadrelay_{purpose}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin_url = postgres_admin_url();
        let mut admin = PgConnection::connect(&admin_url).await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
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

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The address of the server the database is on.
    pub async fn server_addr(&self) -> Result<std::net::SocketAddr, Error> {
        let url = url::Url::parse(&self.url)?;
        let host = url
            .host_str()
            .ok_or("the test database URL names no host")?;
        tokio::net::lookup_host((host, url.port().unwrap_or(5432)))
            .await?
            .next()
            .ok_or_else(|| format!("{host} has no address").into())
    }

    /// The database's URL with the server at `addr` instead, e.g. a [`relay::TcpRelay`].
    pub fn url_at(&self, addr: std::net::SocketAddr) -> Result<String, Error> {
        let mut url = url::Url::parse(&self.url)?;
        url.set_ip_host(addr.ip())
            .map_err(|()| "the test database URL cannot take an IP address")?;
        url.set_port(Some(addr.port()))
            .map_err(|()| "the test database URL cannot take a port")?;
        Ok(url.into())
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_database(self) -> Result<(), Error> {
        let mut admin = PgConnection::connect(&postgres_admin_url()).await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}

/// The steps of `query`'s plan, one line each, as the engine behind `connection` describes them:
/// on SQLite the details of `EXPLAIN QUERY PLAN`, on Postgres the lines of `EXPLAIN`, planned with
/// sequential scans switched off for the connection (on a nearly empty table a scan is always
/// cheapest, and a plan that cannot use an index would then still show one). Every parameter
/// (`$n`) is bound to a text.
pub async fn query_plan(
    connection: &mut sqlx::AnyConnection,
    query: &str,
) -> Result<Vec<String>, sqlx::Error> {
    // `EXPLAIN QUERY PLAN` rows are (id, parent, notused, detail).
    let (explain, column) = if connection.backend_name() == "SQLite" {
        ("EXPLAIN QUERY PLAN", 3)
    } else {
        connection.execute("SET enable_seqscan = off").await?;
        ("EXPLAIN", 0)
    };
    let text = format!("{explain} {query}");
    let mut statement = sqlx::query(&text);
    for _ in 0..query.matches('$').count() {
        statement = statement.bind("x");
    }
    statement
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| sqlx::Row::try_get::<String, _>(row, column))
        .collect()
}
