//! [`UpsertRepository`] on Cassandra / ScyllaDB: one row per primary key, every key
//! column part of the partition key.

use std::collections::HashMap;
use std::marker::PhantomData;

use async_trait::async_trait;
use chrono::DateTime;
use flows_core::backend::{ChangeBatch, TableMode, ValidChange, rows_in_request_order};
use flows_core::{
    Capabilities, Column, ColumnType, PrimaryKey, RepositoryError, Row, RowError, TableName,
    TableSchema, UpsertRepository, Value,
};
use futures::{StreamExt, TryStreamExt, stream};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row as CqlRow};

use crate::error::{malformed, map_execution};
use crate::store::CassandraStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// Rows of type `T` in one Cassandra table, upserted by primary key. Not atomic: every
/// change is its own statement (see the crate documentation).
pub struct CassandraUpsertRepository<T> {
    store: CassandraStore,
    schema: TableSchema,
    /// The `CREATE TABLE IF NOT EXISTS` statement of the table.
    ddl: String,
    select: PreparedStatement,
    insert: PreparedStatement,
    delete: PreparedStatement,
    _row: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for CassandraUpsertRepository<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraUpsertRepository")
            .field("keyspace", &self.store.keyspace())
            .field("table", &self.schema.table().as_str())
            .finish()
    }
}

/// The CQL type a column is stored as.
fn cql_type(column_type: ColumnType) -> &'static str {
    match column_type {
        ColumnType::Bool => "boolean",
        ColumnType::Int64 => "bigint",
        ColumnType::Float64 => "double",
        ColumnType::Text => "text",
        ColumnType::Bytes => "blob",
        // CQL `timestamp` keeps milliseconds; rows keep microseconds.
        ColumnType::Timestamp => "bigint",
        // As its text, which round-trips exactly.
        ColumnType::Json => "text",
    }
}

impl<T: Row> CassandraUpsertRepository<T> {
    /// Opens the table named by `T::schema()` in the store's keyspace (created if
    /// missing).
    pub async fn new(store: CassandraStore) -> Result<Self, RepositoryError> {
        Self::open_schema(store, T::schema(), TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s rows in another table (created if missing).
    pub async fn with_table(store: CassandraStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s rows in the table `table`, creating it or requiring it to exist per
    /// `mode`.
    pub async fn open(
        store: CassandraStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let name = TableName::new(table)?;
        Self::open_schema(store, T::schema().with_table(name), mode).await
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement of this table.
    pub fn ddl(&self) -> String {
        self.ddl.clone()
    }

    async fn open_schema(
        store: CassandraStore,
        schema: TableSchema,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = store.qualified(schema.table());
        let name = |c: &Column| c.name.as_str().to_ascii_lowercase();
        let columns: Vec<String> = schema.columns().iter().map(name).collect();
        let keys: Vec<String> = schema.key_columns().map(name).collect();
        let definitions: Vec<String> = schema
            .columns()
            .iter()
            .map(|c| format!("{} {}", name(c), cql_type(c.column_type)))
            .collect();
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY (({})))",
            definitions.join(", "),
            keys.join(", ")
        );
        store.prepare_table(&table, &ddl, mode).await?;
        let key_filter = keys
            .iter()
            .map(|k| format!("{k} = ?"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let select = store
            .prepare(
                format!(
                    "SELECT {} FROM {table} WHERE {key_filter}",
                    columns.join(", ")
                ),
                true,
            )
            .await?;
        // Every column is bound, nulls included (a null is a tombstone): an upsert
        // replaces the whole row.
        let insert = store
            .prepare(
                format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    columns.join(", "),
                    vec!["?"; columns.len()].join(", ")
                ),
                true,
            )
            .await?;
        let delete = store
            .prepare(format!("DELETE FROM {table} WHERE {key_filter}"), true)
            .await?;
        Ok(Self {
            store,
            schema,
            ddl,
            select,
            insert,
            delete,
            _row: PhantomData,
        })
    }

    /// Cassandra refuses an empty partition key; with a one-column key, an empty text
    /// or blob key is rejected here, typed, before anything is written.
    fn check_partition_key(&self, key: &[Value]) -> Result<(), RowError> {
        let empty = match key {
            [Value::Text(s)] => s.is_empty(),
            [Value::Bytes(b)] => b.is_empty(),
            _ => false,
        };
        if empty {
            let column = self
                .schema
                .key_columns()
                .next()
                .map(|c| c.name.to_string())
                .unwrap_or_default();
            return Err(RowError::Invalid {
                column,
                message: "Cassandra cannot store an empty partition key".into(),
            });
        }
        Ok(())
    }

    async fn read(&self, key: &PrimaryKey) -> Result<Option<Vec<Value>>, RepositoryError> {
        let bound: Vec<Option<CqlValue>> = key.values().iter().map(to_cql).collect();
        let result = self
            .store
            .session()
            .execute_unpaged(&self.select, bound)
            .await
            .map_err(map_execution)?;
        let rows = result
            .into_rows_result()
            .map_err(|e| malformed(format!("row read returned no rows result: {e}")))?;
        let Some(row) = rows
            .maybe_first_row::<CqlRow>()
            .map_err(|e| malformed(format!("row read returned an unexpected row: {e}")))?
        else {
            return Ok(None);
        };
        let values = self
            .schema
            .columns()
            .iter()
            .zip(row.columns)
            .map(|(column, value)| from_cql(column, value))
            .collect::<Result<Vec<_>, _>>()?;
        // Guards against a server that answers a key lookup with other rows.
        if &self.schema.key_of(&values) != key {
            return Err(malformed(
                "the server answered a key lookup with another row",
            ));
        }
        Ok(Some(values))
    }
}

fn to_cql(value: &Value) -> Option<CqlValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => CqlValue::Boolean(*b),
        Value::Int64(i) => CqlValue::BigInt(*i),
        Value::Float64(f) => CqlValue::Double(*f),
        Value::Text(s) => CqlValue::Text(s.clone()),
        Value::Bytes(b) => CqlValue::Blob(b.clone()),
        Value::Timestamp(t) => CqlValue::BigInt(t.timestamp_micros()),
        Value::Json(j) => CqlValue::Text(j.to_string()),
    })
}

fn from_cql(column: &Column, value: Option<CqlValue>) -> Result<Value, RepositoryError> {
    let mismatch = |found: &CqlValue| {
        RepositoryError::Row(RowError::Invalid {
            column: column.name.to_string(),
            message: format!("stored {found:?} is not a {:?}", column.column_type),
        })
    };
    let Some(value) = value else {
        return Ok(Value::Null);
    };
    Ok(match (column.column_type, value) {
        (ColumnType::Bool, CqlValue::Boolean(b)) => Value::Bool(b),
        (ColumnType::Int64, CqlValue::BigInt(i)) => Value::Int64(i),
        (ColumnType::Float64, CqlValue::Double(f)) => Value::Float64(f),
        (ColumnType::Text, CqlValue::Text(s) | CqlValue::Ascii(s)) => Value::Text(s),
        (ColumnType::Bytes, CqlValue::Blob(b)) => Value::Bytes(b),
        (ColumnType::Timestamp, CqlValue::BigInt(us)) => Value::Timestamp(
            DateTime::from_timestamp_micros(us).ok_or_else(|| mismatch(&CqlValue::BigInt(us)))?,
        ),
        (ColumnType::Json, CqlValue::Text(s)) => match serde_json::from_str(&s) {
            Ok(json) => Value::Json(json),
            Err(_) => return Err(mismatch(&CqlValue::Text(s))),
        },
        (_, other) => return Err(mismatch(&other)),
    })
}

#[async_trait]
impl<T: Row> UpsertRepository<T> for CassandraUpsertRepository<T> {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE).with_atomic_batch_write(false)
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        match change.values() {
            Some(values) => self.check_partition_key(self.schema.key_of(values).values()),
            None => self.check_partition_key(change.key().values()),
        }
    }

    /// Every upsert and delete is its own prepared statement, [`MAX_BATCH_SIZE`] at a
    /// time: a batch holds at most one change per key, and every row is its own
    /// partition, so there is nothing to group (an unlogged batch of several partitions
    /// only moves the fan-out to a coordinator). Not atomic: after an error part of the
    /// batch may be written; applying it again is idempotent.
    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        // Checked before anything is sent, so that a rejected batch writes nothing.
        for key in &batch.deletes {
            self.check_partition_key(key.values())?;
        }
        for row in &batch.upserts {
            self.check_partition_key(self.schema.key_of(row).values())?;
        }
        let session = self.store.session();
        let bound: Vec<(&PreparedStatement, Vec<Option<CqlValue>>)> = batch
            .deletes
            .iter()
            .map(|key| (&self.delete, key.values().iter().map(to_cql).collect()))
            .chain(
                batch
                    .upserts
                    .iter()
                    .map(|row| (&self.insert, row.iter().map(to_cql).collect())),
            )
            .collect();
        // Futures built before streaming (see `get_all`).
        let calls: Vec<_> = bound
            .into_iter()
            .map(|(statement, values)| session.execute_unpaged(statement, values))
            .collect();
        let results: Vec<_> = stream::iter(calls)
            .buffer_unordered(MAX_BATCH_SIZE)
            .collect()
            .await;
        for result in results {
            result.map_err(map_execution)?;
        }
        Ok(())
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        let mut distinct: Vec<&PrimaryKey> = Vec::with_capacity(keys.len());
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for key in keys {
            self.schema.check_key(key)?;
            if seen.insert(key) {
                distinct.push(key);
            }
        }
        // Futures built before streaming: closures inside the stream would not be
        // provably `Send` for every lifetime in an `async_trait` method.
        let reads: Vec<_> = distinct
            .into_iter()
            .map(|key| async move { Ok::<_, RepositoryError>((key, self.read(key).await?)) })
            .collect();
        let read: Vec<(&PrimaryKey, Option<Vec<Value>>)> = stream::iter(reads)
            .buffer_unordered(MAX_BATCH_SIZE)
            .try_collect()
            .await?;
        let found: HashMap<PrimaryKey, Vec<Value>> = read
            .into_iter()
            .filter_map(|(key, row)| row.map(|r| (key.clone(), r)))
            .collect();
        rows_in_request_order(keys, &found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_cql_values() {
        for (column, value) in flows_conformance::one_value_of_each_type() {
            assert_eq!(from_cql(&column, to_cql(&value)).unwrap(), value);
            assert_eq!(from_cql(&column, None).unwrap(), Value::Null);
        }
    }
}
