//! [`UpsertRepository`] on PostgreSQL: one `UNNEST` statement per chunk, one
//! transaction per batch.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use flows_core::backend::{ChangeBatch, TableMode, ValidChange, rows_in_request_order};
use flows_core::{
    Capabilities, Column, ColumnType, PrimaryKey, RepositoryError, Row, RowError, TableName,
    TableSchema, UpsertRepository, Value,
};
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::{AssertSqlSafe, Row as _};

use crate::error::map_err;
use crate::store::PostgresStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Rows of type `T` in one PostgreSQL table, upserted by primary key. Batches are atomic.
pub struct PostgresUpsertRepository<T> {
    store: PostgresStore,
    schema: TableSchema,
    sql: Statements,
    _row: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for PostgresUpsertRepository<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUpsertRepository")
            .field("table", self.schema.table())
            .finish()
    }
}

/// The column's SQL type.
fn sql_type(column_type: ColumnType) -> &'static str {
    match column_type {
        ColumnType::Bool => "BOOLEAN",
        ColumnType::Int64 => "BIGINT",
        ColumnType::Float64 => "DOUBLE PRECISION",
        ColumnType::Text => "TEXT",
        ColumnType::Bytes => "BYTEA",
        ColumnType::Timestamp => "TIMESTAMPTZ",
        ColumnType::Json => "JSONB",
    }
}

/// The array type a column's values are sent as (JSON travels as text and is cast).
fn wire_array_type(column_type: ColumnType) -> &'static str {
    match column_type {
        ColumnType::Bool => "bool[]",
        ColumnType::Int64 => "int8[]",
        ColumnType::Float64 => "float8[]",
        ColumnType::Text | ColumnType::Json => "text[]",
        ColumnType::Bytes => "bytea[]",
        ColumnType::Timestamp => "timestamptz[]",
    }
}

/// `UNNEST($1::t1[], $2::t2[], ...) AS alias(c1, c2, ...)` over `columns`, with JSON
/// columns cast back in `select`.
fn unnest<'a>(columns: impl Iterator<Item = &'a Column> + Clone, alias: &str) -> (String, String) {
    let arrays: Vec<String> = columns
        .clone()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, wire_array_type(c.column_type)))
        .collect();
    let names: Vec<String> = columns.clone().map(|c| format!("\"{}\"", c.name)).collect();
    let select: Vec<String> = columns
        .map(|c| match c.column_type {
            ColumnType::Json => format!("{alias}.\"{}\"::jsonb", c.name),
            _ => format!("{alias}.\"{}\"", c.name),
        })
        .collect();
    (
        format!(
            "UNNEST({}) AS {alias}({})",
            arrays.join(", "),
            names.join(", ")
        ),
        select.join(", "),
    )
}

#[derive(Debug)]
struct Statements {
    upsert: String,
    delete: String,
    select: String,
}

impl Statements {
    fn new(schema: &TableSchema) -> Self {
        let table = schema.table();
        let columns = schema.columns();
        let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
        let keys: Vec<String> = schema
            .key_columns()
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !c.primary_key)
            .map(|c| format!("\"{0}\" = EXCLUDED.\"{0}\"", c.name))
            .collect();
        let on_conflict = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        let (rows, row_select) = unnest(columns.iter(), "r");
        let (key_rows, _) = unnest(schema.key_columns(), "k");
        let key_match: Vec<String> = schema
            .key_columns()
            .map(|c| format!("t.\"{0}\" = k.\"{0}\"", c.name))
            .collect();
        let qualified: Vec<String> = columns
            .iter()
            .map(|c| format!("t.\"{}\"", c.name))
            .collect();
        Self {
            upsert: format!(
                "INSERT INTO \"{table}\" ({}) SELECT {row_select} FROM {rows} ON CONFLICT ({}) {on_conflict}",
                names.join(", "),
                keys.join(", ")
            ),
            delete: format!(
                "DELETE FROM \"{table}\" AS t USING {key_rows} WHERE {}",
                key_match.join(" AND ")
            ),
            select: format!(
                "SELECT {} FROM \"{table}\" AS t JOIN {key_rows} ON {}",
                qualified.join(", "),
                key_match.join(" AND ")
            ),
        }
    }
}

/// What PostgreSQL cannot store, rejected before sending: NUL in `text` or `jsonb`
/// strings, and timestamps before 4713 BC (PostgreSQL's earliest).
fn check_storable(column: &Column, value: &Value) -> Result<(), RowError> {
    let invalid = |message: &str| RowError::Invalid {
        column: column.name.to_string(),
        message: message.into(),
    };
    match value {
        Value::Text(s) if s.contains('\0') => {
            Err(invalid("PostgreSQL text cannot contain the NUL character"))
        }
        Value::Json(j) if j.to_string().contains("\\u0000") => {
            Err(invalid("PostgreSQL JSON cannot contain the NUL character"))
        }
        Value::Timestamp(t) if t.year() < -4712 => {
            Err(invalid("PostgreSQL timestamps start in 4713 BC"))
        }
        _ => Ok(()),
    }
}

/// Binds column `index` of `rows` as one typed array.
fn bind_column<'q>(
    query: Query<'q>,
    column: &Column,
    rows: &[&[Value]],
    index: usize,
) -> Result<Query<'q>, RowError> {
    fn collect<T>(
        rows: &[&[Value]],
        index: usize,
        column: &Column,
        pick: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<Option<T>>, RowError> {
        rows.iter()
            .map(|row| {
                let value = &row[index];
                check_storable(column, value)?;
                match value {
                    Value::Null => Ok(None),
                    other => pick(other).map(Some).ok_or_else(|| RowError::Type {
                        column: column.name.to_string(),
                        expected: column.column_type.to_string(),
                        found: format!("{other:?}"),
                    }),
                }
            })
            .collect()
    }
    Ok(match column.column_type {
        ColumnType::Bool => query.bind(collect(rows, index, column, |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })?),
        ColumnType::Int64 => query.bind(collect(rows, index, column, |v| match v {
            Value::Int64(i) => Some(*i),
            _ => None,
        })?),
        ColumnType::Float64 => query.bind(collect(rows, index, column, |v| match v {
            Value::Float64(f) => Some(*f),
            _ => None,
        })?),
        ColumnType::Text => query.bind(collect(rows, index, column, |v| match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        })?),
        ColumnType::Bytes => query.bind(collect(rows, index, column, |v| match v {
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        })?),
        ColumnType::Timestamp => query.bind(collect(rows, index, column, |v| match v {
            Value::Timestamp(t) => Some(*t),
            _ => None,
        })?),
        ColumnType::Json => query.bind(collect(rows, index, column, |v| match v {
            Value::Json(j) => Some(j.to_string()),
            _ => None,
        })?),
    })
}

fn read_value(row: &PgRow, index: usize, column: &Column) -> Result<Value, RepositoryError> {
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
        ColumnType::Timestamp => row
            .try_get::<Option<DateTime<Utc>>, _>(index)
            .map(|v| v.map(Value::Timestamp)),
        ColumnType::Json => row
            .try_get::<Option<serde_json::Value>, _>(index)
            .map(|v| v.map(Value::Json)),
    }
    .map_err(map_err)?;
    Ok(value.unwrap_or(Value::Null))
}

impl<T: Row> PostgresUpsertRepository<T> {
    /// Opens the table named by `T::schema()` (created if missing).
    pub async fn new(store: PostgresStore) -> Result<Self, RepositoryError> {
        Self::open_schema(store, T::schema(), TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under another name (created if missing).
    pub async fn with_table(store: PostgresStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under the name `table`, creating it or requiring it to exist
    /// per `mode`.
    pub async fn open(
        store: PostgresStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        Self::open_schema(store, T::schema().with_table(table), mode).await
    }

    async fn open_schema(
        store: PostgresStore,
        schema: TableSchema,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let repository = Self {
            store,
            sql: Statements::new(&schema),
            schema,
            _row: PhantomData,
        };
        repository
            .store
            .prepare_table(repository.schema.table(), repository.ddl(), mode)
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
        let keys: Vec<String> = self
            .schema
            .key_columns()
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS \"{}\" ({}, PRIMARY KEY ({}))",
            self.schema.table(),
            columns.join(", "),
            keys.join(", ")
        )
    }

    /// Creates the table if it does not exist. Idempotent and safe to run concurrently.
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        self.store
            .create_table(self.schema.table(), self.ddl())
            .await
    }

    fn bind_keys<'q>(&self, sql: &str, keys: &[&PrimaryKey]) -> Result<Query<'q>, RowError> {
        let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
        let rows: Vec<&[Value]> = keys.iter().map(|k| k.values()).collect();
        for (i, column) in self.schema.key_columns().enumerate() {
            query = bind_column(query, column, &rows, i)?;
        }
        Ok(query)
    }
}

#[async_trait]
impl<T: Row> UpsertRepository<T> for PostgresUpsertRepository<T> {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE)
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        match change.values() {
            Some(values) => self
                .schema
                .columns()
                .iter()
                .zip(values)
                .try_for_each(|(column, value)| check_storable(column, value)),
            None => self
                .schema
                .key_columns()
                .zip(change.key().values())
                .try_for_each(|(column, value)| check_storable(column, value)),
        }
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Build (and validate) every statement before opening the transaction.
        let mut statements = Vec::new();
        for chunk in batch.deletes.chunks(MAX_BATCH_SIZE) {
            let keys: Vec<&PrimaryKey> = chunk.iter().collect();
            statements.push(self.bind_keys(&self.sql.delete, &keys)?);
        }
        for chunk in batch.upserts.chunks(MAX_BATCH_SIZE) {
            let rows: Vec<&[Value]> = chunk.iter().map(Vec::as_slice).collect();
            let mut query = sqlx::query(AssertSqlSafe(self.sql.upsert.clone()));
            for (i, column) in self.schema.columns().iter().enumerate() {
                query = bind_column(query, column, &rows, i)?;
            }
            statements.push(query);
        }
        let mut tx = self.store.pool().begin().await.map_err(map_err)?;
        for statement in statements {
            statement.execute(&mut *tx).await.map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        for key in keys {
            self.schema.check_key(key)?;
        }
        let mut seen = HashSet::with_capacity(keys.len());
        let distinct: Vec<&PrimaryKey> = keys.iter().filter(|k| seen.insert(*k)).collect();
        let columns = self.schema.columns();
        let mut found: HashMap<PrimaryKey, Vec<Value>> = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(MAX_BATCH_SIZE) {
            let rows = self
                .bind_keys(&self.sql.select, chunk)?
                .fetch_all(self.store.pool())
                .await
                .map_err(map_err)?;
            for row in &rows {
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| read_value(row, i, c))
                    .collect::<Result<Vec<_>, _>>()?;
                found.insert(self.schema.key_of(&values), values);
            }
        }
        rows_in_request_order(keys, &found)
    }
}
