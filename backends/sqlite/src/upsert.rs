//! [`UpsertRepository`] on SQLite.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use async_trait::async_trait;
use flows_core::backend::{ChangeBatch, TableMode, rows_in_request_order};
use flows_core::{
    Capabilities, ColumnType, PrimaryKey, RepositoryError, Row, RowError, TableName, TableSchema,
    UpsertRepository, Value,
};
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteRow};
use sqlx::{AssertSqlSafe, Row as _};

use crate::error::map_err;
use crate::state::micros_to_time;
use crate::store::{SqliteStore, placeholders};
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments>;

/// Rows of type `T` in one SQLite table, upserted by primary key. Batches are atomic.
pub struct SqliteUpsertRepository<T> {
    store: SqliteStore,
    schema: TableSchema,
    _row: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for SqliteUpsertRepository<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteUpsertRepository")
            .field("table", self.schema.table())
            .finish()
    }
}

fn sql_type(column_type: ColumnType) -> &'static str {
    match column_type {
        ColumnType::Bool | ColumnType::Int64 | ColumnType::Timestamp => "INTEGER",
        ColumnType::Float64 => "REAL",
        ColumnType::Text | ColumnType::Json => "TEXT",
        ColumnType::Bytes => "BLOB",
    }
}

fn quoted_list<'a>(names: impl Iterator<Item = &'a TableName>) -> String {
    names
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn bind<'q>(query: Query<'q>, value: &Value) -> Query<'q> {
    match value {
        Value::Null => query.bind(Option::<i64>::None),
        Value::Bool(b) => query.bind(*b),
        Value::Int64(i) => query.bind(*i),
        Value::Float64(f) => query.bind(*f),
        Value::Text(s) => query.bind(s.clone()),
        Value::Bytes(b) => query.bind(b.clone()),
        Value::Timestamp(t) => query.bind(t.timestamp_micros()),
        Value::Json(j) => query.bind(j.to_string()),
    }
}

fn read_value(
    row: &SqliteRow,
    index: usize,
    column: &flows_core::Column,
) -> Result<Value, RepositoryError> {
    let invalid = |message: String| {
        RepositoryError::Row(RowError::Invalid {
            column: column.name.to_string(),
            message,
        })
    };
    let value = match column.column_type {
        ColumnType::Bool => row
            .try_get::<Option<bool>, _>(index)
            .map(|v| v.map(Value::Bool)),
        ColumnType::Int64 => row
            .try_get::<Option<i64>, _>(index)
            .map(|v| v.map(Value::Int64)),
        ColumnType::Float64 => row
            .try_get::<Option<f64>, _>(index)
            .map(|v| v.map(Value::Float64)),
        ColumnType::Text => row
            .try_get::<Option<String>, _>(index)
            .map(|v| v.map(Value::Text)),
        ColumnType::Bytes => row
            .try_get::<Option<Vec<u8>>, _>(index)
            .map(|v| v.map(Value::Bytes)),
        ColumnType::Timestamp => {
            let micros = row.try_get::<Option<i64>, _>(index).map_err(map_err)?;
            return match micros {
                None => Ok(Value::Null),
                Some(m) => micros_to_time(m)
                    .map(Value::Timestamp)
                    .ok_or_else(|| invalid(format!("{m} µs is out of the timestamp range"))),
            };
        }
        ColumnType::Json => {
            let text = row.try_get::<Option<String>, _>(index).map_err(map_err)?;
            return match text {
                None => Ok(Value::Null),
                Some(t) => serde_json::from_str(&t)
                    .map(Value::Json)
                    .map_err(|e| invalid(format!("stored JSON is invalid: {e}"))),
            };
        }
    }
    .map_err(map_err)?;
    Ok(value.unwrap_or(Value::Null))
}

impl<T: Row> SqliteUpsertRepository<T> {
    /// Applies `batch`'s deletes, then its upserts.
    async fn write_changes(
        &self,
        connection: &mut sqlx::SqliteConnection,
        batch: &ChangeBatch,
    ) -> Result<(), RepositoryError> {
        let table = self.schema.table();
        let key_columns = self.schema.key_indices().len();
        for chunk in batch.deletes.chunks(self.rows_per_statement()) {
            let sql = format!(
                "DELETE FROM \"{table}\" WHERE ({}) IN (VALUES {})",
                self.key_list(),
                placeholders(chunk.len(), key_columns)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for key in chunk {
                for value in key.values() {
                    query = bind(query, value);
                }
            }
            query.execute(&mut *connection).await.map_err(map_err)?;
        }
        let columns = self.schema.columns();
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !c.primary_key)
            .map(|c| format!("\"{0}\" = excluded.\"{0}\"", c.name))
            .collect();
        let on_conflict = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        for chunk in batch.upserts.chunks(self.rows_per_statement()) {
            let sql = format!(
                "INSERT INTO \"{table}\" ({}) VALUES {} ON CONFLICT ({}) {on_conflict}",
                quoted_list(columns.iter().map(|c| &c.name)),
                placeholders(chunk.len(), columns.len()),
                self.key_list(),
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for row in chunk {
                for value in row {
                    query = bind(query, value);
                }
            }
            query.execute(&mut *connection).await.map_err(map_err)?;
        }
        Ok(())
    }

    /// Opens the table named by `T::schema()` (created if missing).
    pub async fn new(store: SqliteStore) -> Result<Self, RepositoryError> {
        Self::open_schema(store, T::schema(), TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under another name (created if missing).
    pub async fn with_table(store: SqliteStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under the name `table`, creating it or requiring it to exist
    /// per `mode`.
    pub async fn open(
        store: SqliteStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        Self::open_schema(store, T::schema().with_table(table), mode).await
    }

    async fn open_schema(
        store: SqliteStore,
        schema: TableSchema,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let repository = Self {
            store,
            schema,
            _row: PhantomData,
        };
        let table = repository.schema.table().as_str();
        repository
            .store
            .prepare_table(table, repository.ddl(), mode)
            .await?;
        Ok(repository)
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement of this table.
    pub fn ddl(&self) -> String {
        let columns: Vec<String> = self
            .schema
            .columns()
            .iter()
            .map(|c| {
                format!(
                    "\"{}\" {}{}",
                    c.name,
                    sql_type(c.column_type),
                    if c.nullable { "" } else { " NOT NULL" }
                )
            })
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS \"{}\" ({}, PRIMARY KEY ({}))",
            self.schema.table(),
            columns.join(", "),
            quoted_list(self.schema.key_columns().map(|c| &c.name))
        )
    }

    /// Creates the table if it does not exist. Idempotent; called on construction.
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        let table = self.schema.table().as_str();
        self.store
            .prepare_table(table, self.ddl(), TableMode::CreateIfMissing)
            .await
    }

    fn rows_per_statement(&self) -> usize {
        (30_000 / self.schema.columns().len()).clamp(1, MAX_BATCH_SIZE)
    }

    fn key_list(&self) -> String {
        quoted_list(self.schema.key_columns().map(|c| &c.name))
    }
}

#[async_trait]
impl<T: Row> UpsertRepository<T> for SqliteUpsertRepository<T> {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, self.rows_per_statement())
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut write = self.store.join_write().await?;
        let outcome = match write.connection() {
            Ok(connection) => self.write_changes(connection, &batch).await,
            Err(error) => Err(error),
        };
        write.finish(outcome).await
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        for key in keys {
            self.schema.check_key(key)?;
        }
        let mut seen = HashSet::with_capacity(keys.len());
        let distinct: Vec<&PrimaryKey> = keys.iter().filter(|k| seen.insert(*k)).collect();
        let columns = self.schema.columns();
        let mut found: HashMap<PrimaryKey, Vec<Value>> = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(self.rows_per_statement()) {
            let sql = format!(
                "SELECT {} FROM \"{}\" WHERE ({}) IN (VALUES {})",
                quoted_list(columns.iter().map(|c| &c.name)),
                self.schema.table(),
                self.key_list(),
                placeholders(chunk.len(), self.schema.key_indices().len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for key in chunk {
                for value in key.values() {
                    query = bind(query, value);
                }
            }
            for row in query.fetch_all(self.store.pool()).await.map_err(map_err)? {
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| read_value(&row, i, c))
                    .collect::<Result<Vec<_>, _>>()?;
                found.insert(self.schema.key_of(&values), values);
            }
        }
        rows_in_request_order(keys, &found)
    }
}
