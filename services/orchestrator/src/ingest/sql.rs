//! The statements a group commit runs, over either engine's connection.
//!
//! Postgres is driven through sqlx's Postgres driver (not `Any`: the writer binds arrays, which
//! only the Postgres driver can). SQLite is driven synchronously through rusqlite on the
//! writer's own thread: sqlx runs every SQLite statement on a worker thread and hands each result
//! back through the async runtime, and on a busy runtime those hand-offs, not SQLite, were what
//! bounded the write rate (a one-call group took ~3 ms). Both share the same group logic through
//! [`GroupTransaction`]; only the way a statement is executed differs.

use std::future::Future;

use sqlx::{Postgres, Row, Transaction, postgres::PgRow};

use super::IngestError;
use crate::store::StoreError;

/// A statement parameter: a value, or (Postgres only) a column of values bound as one array.
#[derive(Clone, Debug)]
pub(super) enum Param<'a> {
    Text(&'a str),
    OptionalText(Option<&'a str>),
    Blob(&'a [u8]),
    Int(i64),
    OptionalInt(Option<i64>),
    /// `text[]`.
    TextArray(Vec<Option<&'a str>>),
    /// `bytea[]`.
    BlobArray(Vec<&'a [u8]>),
    /// `int8[]`.
    IntArray(Vec<Option<i64>>),
}

impl<'a> Param<'a> {
    /// A one-element array column of this value's type, to which [`Param::push_onto`] adds the
    /// same column's values from the following rows.
    pub(super) fn into_array(self) -> Self {
        match self {
            Self::Text(text) => Self::TextArray(vec![Some(text)]),
            Self::OptionalText(text) => Self::TextArray(vec![text]),
            Self::Blob(bytes) => Self::BlobArray(vec![bytes]),
            Self::Int(number) => Self::IntArray(vec![Some(number)]),
            Self::OptionalInt(number) => Self::IntArray(vec![number]),
            array @ (Self::TextArray(_) | Self::BlobArray(_) | Self::IntArray(_)) => array,
        }
    }

    /// Adds `self`, a value, to `array`, an array column of its type; false when the types
    /// differ (then nothing is added).
    pub(super) fn push_onto(self, array: &mut Self) -> bool {
        match (array, self) {
            (Self::TextArray(values), Self::Text(text)) => values.push(Some(text)),
            (Self::TextArray(values), Self::OptionalText(text)) => values.push(text),
            (Self::BlobArray(values), Self::Blob(bytes)) => values.push(bytes),
            (Self::IntArray(values), Self::Int(number)) => values.push(Some(number)),
            (Self::IntArray(values), Self::OptionalInt(number)) => values.push(number),
            _ => return false,
        }
        true
    }

    /// The value as a statement would return it; `None` for a number, a missing value or an
    /// array.
    pub(super) fn returned(&self) -> Option<Cell> {
        match self {
            Self::Text(text) | Self::OptionalText(Some(text)) => {
                Some(Cell::Text((*text).to_owned()))
            }
            Self::Blob(bytes) => Some(Cell::Blob(bytes.to_vec())),
            Self::OptionalText(None)
            | Self::Int(_)
            | Self::OptionalInt(_)
            | Self::TextArray(_)
            | Self::BlobArray(_)
            | Self::IntArray(_) => None,
        }
    }

    /// The Postgres type of an array column; `None` for a value.
    pub(super) fn array_type(&self) -> Option<&'static str> {
        match self {
            Self::TextArray(_) => Some("text[]"),
            Self::BlobArray(_) => Some("bytea[]"),
            Self::IntArray(_) => Some("int8[]"),
            Self::Text(_)
            | Self::OptionalText(_)
            | Self::Blob(_)
            | Self::Int(_)
            | Self::OptionalInt(_) => None,
        }
    }
}

/// The type of a column a statement returns.
#[derive(Clone, Copy, Debug)]
pub(super) enum Column {
    Text,
    Blob,
}

/// A returned value: text or bytes, as its [`Column`] said.
#[derive(Clone, Debug)]
pub(super) enum Cell {
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    /// The text of a text column.
    pub(super) fn into_text(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Blob(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// The bytes of a blob column.
    pub(super) fn into_blob(self) -> Vec<u8> {
        match self {
            Self::Text(text) => text.into_bytes(),
            Self::Blob(bytes) => bytes,
        }
    }
}

/// An open transaction the group logic writes through. Its futures run on the writer's own
/// thread (`block_on`), so they need not be `Send`: SQLite's prepared statements are not.
pub(super) trait GroupTransaction {
    /// Runs a statement that returns nothing; returns how many rows it changed.
    fn execute(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<u64, IngestError>>;

    /// Runs a statement and returns its rows, each with `columns.len()` cells.
    fn fetch(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        columns: &[Column],
    ) -> impl Future<Output = Result<Vec<Vec<Cell>>, IngestError>>;
}

/// A transaction on the Postgres writer's connection.
pub(super) struct PostgresTransaction<'c>(pub(super) Transaction<'c, Postgres>);

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    params: &[Param<'q>],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for param in params {
        query = match param {
            Param::Text(text) => query.bind(*text),
            Param::OptionalText(text) => query.bind(*text),
            Param::Blob(bytes) => query.bind(*bytes),
            Param::Int(number) => query.bind(*number),
            Param::OptionalInt(number) => query.bind(*number),
            // A copy of the column's references, not of the values: sqlx keeps what it binds
            // for the query's lifetime, longer than this borrow of `params`.
            Param::TextArray(values) => query.bind(values.clone()),
            Param::BlobArray(values) => query.bind(values.clone()),
            Param::IntArray(values) => query.bind(values.clone()),
        };
    }
    query
}

fn postgres_cells(row: &PgRow, columns: &[Column]) -> Result<Vec<Cell>, sqlx::Error> {
    columns
        .iter()
        .enumerate()
        .map(|(index, column)| {
            Ok(match column {
                Column::Text => Cell::Text(row.try_get(index)?),
                Column::Blob => Cell::Blob(row.try_get(index)?),
            })
        })
        .collect()
}

impl GroupTransaction for PostgresTransaction<'_> {
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, IngestError> {
        let done = bind_all(sqlx::query(sql), params)
            .execute(&mut *self.0)
            .await?;
        Ok(done.rows_affected())
    }

    async fn fetch(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        columns: &[Column],
    ) -> Result<Vec<Vec<Cell>>, IngestError> {
        let rows = bind_all(sqlx::query(sql), params)
            .fetch_all(&mut *self.0)
            .await?;
        Ok(rows
            .iter()
            .map(|row| postgres_cells(row, columns))
            .collect::<Result<_, _>>()?)
    }
}

/// SQLite failed under the writer's own connection.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SqliteError(#[from] rusqlite::Error);

impl From<rusqlite::Error> for IngestError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Store(StoreError::Sqlite(SqliteError(error)))
    }
}

/// A transaction on the writer's own SQLite connection. Statements run synchronously: the
/// futures are ready when first polled, and the writer owns its thread.
///
/// A group runs a handful of statements, each once per row, so each is taken from the
/// connection's statement cache once per group and kept here until the group ends. Taken from the
/// cache for every row, its text was hashed twice per row (looked up, then put back) and its
/// bindings cleared. Counted by callgrind in the webhook benchmark (16 connections, ~7 webhooks a
/// group, the writer's thread alone): 169k instructions per webhook instead of 177k (-4.7%).
pub(super) struct SqliteTransaction<'c> {
    connection: &'c rusqlite::Connection,
    /// The statements the group ran so far, by text: a few, so a scan finds one.
    prepared: Vec<(String, rusqlite::CachedStatement<'c>)>,
}

impl<'c> SqliteTransaction<'c> {
    pub(super) fn new(connection: &'c rusqlite::Connection) -> Self {
        Self {
            connection,
            prepared: Vec::new(),
        }
    }

    /// The prepared statement of `sql` with `params` bound to every one of its parameters.
    fn statement(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> rusqlite::Result<&mut rusqlite::CachedStatement<'c>> {
        let index = match self.prepared.iter().position(|(text, _)| text == sql) {
            Some(index) => index,
            None => {
                let statement = self.connection.prepare_cached(sql)?;
                self.prepared.push((sql.to_owned(), statement));
                self.prepared.len() - 1
            }
        };
        let statement = &mut self.prepared[index].1;
        // Every parameter is bound anew, so no value of the statement's previous row is left.
        if params.len() != statement.parameter_count() {
            return Err(rusqlite::Error::InvalidParameterCount(
                params.len(),
                statement.parameter_count(),
            ));
        }
        for (index, param) in params.iter().enumerate() {
            let position = index + 1;
            match param {
                Param::Text(text) => statement.raw_bind_parameter(position, text)?,
                Param::OptionalText(text) => statement.raw_bind_parameter(position, text)?,
                Param::Blob(bytes) => statement.raw_bind_parameter(position, bytes)?,
                Param::Int(number) => statement.raw_bind_parameter(position, number)?,
                Param::OptionalInt(number) => statement.raw_bind_parameter(position, number)?,
                // The group logic gives SQLite one row per statement, never a column.
                Param::TextArray(_) | Param::BlobArray(_) | Param::IntArray(_) => {
                    return Err(rusqlite::Error::ToSqlConversionFailure(
                        format!("parameter {position} is an array, which SQLite cannot bind")
                            .into(),
                    ));
                }
            }
        }
        Ok(statement)
    }

    fn fetch_now(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        columns: &[Column],
    ) -> rusqlite::Result<Vec<Vec<Cell>>> {
        let statement = self.statement(sql, params)?;
        // The rows reset the statement when dropped, so it can run again later in the group.
        let mut rows = statement.raw_query();
        let mut cells = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns.len());
            for (index, column) in columns.iter().enumerate() {
                values.push(match column {
                    Column::Text => Cell::Text(row.get(index)?),
                    Column::Blob => Cell::Blob(row.get(index)?),
                });
            }
            cells.push(values);
        }
        Ok(cells)
    }
}

impl GroupTransaction for SqliteTransaction<'_> {
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, IngestError> {
        let changed = self.statement(sql, params)?.raw_execute()?;
        Ok(u64::try_from(changed).unwrap_or(u64::MAX))
    }

    async fn fetch(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        columns: &[Column],
    ) -> Result<Vec<Vec<Cell>>, IngestError> {
        Ok(self.fetch_now(sql, params, columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{Cell, Column, GroupTransaction as _, Param, SqliteTransaction};

    fn texts(rows: Vec<Vec<Cell>>) -> Vec<String> {
        rows.into_iter().flatten().map(Cell::into_text).collect()
    }

    /// A statement kept for the group runs once per row with that row's values, a query runs
    /// again after its rows were read, and the transaction commits with the statements back in
    /// the connection's cache.
    #[tokio::test]
    async fn statements_kept_for_a_group_run_once_per_row() -> Result<(), Box<dyn std::error::Error>>
    {
        let connection = rusqlite::Connection::open_in_memory()?;
        connection.execute_batch("CREATE TABLE t (key TEXT NOT NULL, note TEXT); BEGIN")?;
        let (insert, select) = (
            "INSERT INTO t (key, note) VALUES (?, ?)",
            "SELECT key FROM t WHERE note IS ? ORDER BY key",
        );
        let mut transaction = SqliteTransaction::new(&connection);
        transaction
            .execute(insert, &[Param::Text("a"), Param::OptionalText(Some("x"))])
            .await?;
        // The second row binds no note: none is left from the first.
        transaction
            .execute(insert, &[Param::Text("b"), Param::OptionalText(None)])
            .await?;
        let noted = transaction
            .fetch(select, &[Param::Text("x")], &[Column::Text])
            .await?;
        transaction
            .execute(insert, &[Param::Text("c"), Param::OptionalText(Some("x"))])
            .await?;
        let noted_later = transaction
            .fetch(select, &[Param::Text("x")], &[Column::Text])
            .await?;
        let unnoted = transaction
            .fetch("SELECT key FROM t WHERE note IS NULL", &[], &[Column::Text])
            .await?;
        // A row whose values do not fill the statement is refused, not run with stale ones.
        let short_row = transaction.execute(insert, &[Param::Text("d")]).await;
        drop(transaction);
        connection.execute_batch("COMMIT")?;

        assert_eq!(texts(noted), ["a"]);
        assert_eq!(texts(noted_later), ["a", "c"]);
        assert_eq!(texts(unnoted), ["b"]);
        assert!(short_row.is_err(), "{short_row:?}");
        let stored: i64 = connection.query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))?;
        assert_eq!(stored, 3);
        Ok(())
    }
}
