//! [`UpsertRepository`] on DynamoDB: `BatchWriteItem` in chunks of 25, unconditional.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use async_trait::async_trait;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, PutRequest, ScalarAttributeType, WriteRequest,
};
use chrono::{DateTime, Utc};
use flows_core::backend::{ChangeBatch, ValidChange, rows_in_request_order};
use flows_core::{
    Capabilities, Column, ColumnType, PrimaryKey, RepositoryError, Row, RowError, TableName,
    TableSchema, UpsertRepository, Value,
};

use crate::DEFAULT_MAX_STATE_SIZE;
use crate::batch::{self, Item, WRITE_CHUNK};
use crate::error::build_err;
use crate::store::{DynamoDbStore, TableMode};

/// The partition key attribute of a row item. Column names start with a letter, so it
/// cannot collide with a column.
pub const ROW_KEY_ATTRIBUTE: &str = "_pk";

/// Rows of type `T` in one DynamoDB table, upserted by primary key.
///
/// One item per row. The partition key [`ROW_KEY_ATTRIBUTE`] (`_pk`, a string) is the
/// JSON array of the primary key's values in key order (text as JSON strings, integers
/// and timestamps as numbers, bytes as lowercase hex strings, booleans as `true` or
/// `false`), e.g. `["tenant-a",42]`: unambiguous for composite keys because JSON
/// quotes and escapes every string. Every column, key columns included, is also stored
/// as its own attribute named after the column:
///
/// | column type | attribute |
/// |---|---|
/// | bool | `BOOL` |
/// | int64 | `N` |
/// | float64 | `S`, Rust's shortest exact decimal form (`N` cannot hold `f64::MAX` or `-0.0`) |
/// | text | `S` |
/// | bytes | `B` |
/// | timestamp | `N`, microseconds since the Unix epoch (UTC) |
/// | json | `S`, the JSON text |
///
/// Null values are absent attributes. Writes are unconditional and idempotent;
/// batches are not atomic (`BatchWriteItem` applies each request on its own), so a
/// failed batch may be partly applied, and applying it again completes it.
pub struct DynamoDbUpsertRepository<T> {
    store: DynamoDbStore,
    schema: TableSchema,
    _row: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for DynamoDbUpsertRepository<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbUpsertRepository")
            .field("table", self.schema.table())
            .finish()
    }
}

impl<T: Row> DynamoDbUpsertRepository<T> {
    /// Opens the table named by `T::schema()`, creating it if missing.
    pub async fn new(store: DynamoDbStore) -> Result<Self, RepositoryError> {
        Self::open_schema(store, T::schema(), TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under another name, creating it if missing.
    pub async fn with_table(store: DynamoDbStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s table under the name `table`, creating it or requiring it to exist
    /// per `mode`. An existing table must have the single partition key `_pk` (string).
    pub async fn open(
        store: DynamoDbStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        Self::open_schema(store, T::schema().with_table(table), mode).await
    }

    async fn open_schema(
        store: DynamoDbStore,
        schema: TableSchema,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        store
            .ensure_table(
                schema.table(),
                ROW_KEY_ATTRIBUTE,
                ScalarAttributeType::S,
                mode,
            )
            .await?;
        Ok(Self {
            store,
            schema,
            _row: PhantomData,
        })
    }
}

/// The partition key string of a primary key (already checked against the schema).
fn key_string(schema: &TableSchema, key: &[Value]) -> Result<String, RowError> {
    let parts = schema
        .key_columns()
        .zip(key)
        .map(|(column, value)| {
            Ok(match value {
                Value::Text(s) => serde_json::Value::String(s.clone()),
                Value::Int64(i) => serde_json::Value::from(*i),
                Value::Bool(b) => serde_json::Value::Bool(*b),
                Value::Bytes(b) => serde_json::Value::String(hex(b)),
                Value::Timestamp(t) => serde_json::Value::from(t.timestamp_micros()),
                other => {
                    return Err(RowError::Type {
                        column: column.name.to_string(),
                        expected: column.column_type.to_string(),
                        found: format!("{other:?}"),
                    });
                }
            })
        })
        .collect::<Result<Vec<_>, RowError>>()?;
    Ok(serde_json::Value::Array(parts).to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_item(schema: &TableSchema, key: &[Value]) -> Result<Item, RowError> {
    Ok(HashMap::from([(
        ROW_KEY_ATTRIBUTE.to_owned(),
        AttributeValue::S(key_string(schema, key)?),
    )]))
}

/// The attribute of one non-null value.
fn attribute(value: &Value) -> Option<AttributeValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Int64(i) => AttributeValue::N(i.to_string()),
        Value::Float64(f) => AttributeValue::S(format!("{f:?}")),
        Value::Text(s) => AttributeValue::S(s.clone()),
        Value::Bytes(b) => AttributeValue::B(Blob::new(b.clone())),
        Value::Timestamp(t) => AttributeValue::N(t.timestamp_micros().to_string()),
        Value::Json(j) => AttributeValue::S(j.to_string()),
    })
}

/// The item of a row (already checked against the schema).
fn row_item(schema: &TableSchema, values: &[Value]) -> Result<Item, RowError> {
    let key = schema.key_of(values);
    let mut item = key_item(schema, key.values())?;
    for (column, value) in schema.columns().iter().zip(values) {
        if let Some(attribute) = attribute(value) {
            item.insert(column.name.to_string(), attribute);
        }
    }
    Ok(item)
}

/// DynamoDB's largest item: 400 KB of attribute names and values.
const MAX_ITEM_SIZE: usize = 400 * 1024;

/// An item's size as DynamoDB counts it: each attribute's name and value, in bytes (a
/// number counts at most 21).
fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(s) => s.len(),
                    AttributeValue::B(b) => b.as_ref().len(),
                    AttributeValue::N(n) => n.len().min(21),
                    _ => 1,
                }
        })
        .sum()
}

/// The value of `column` in a stored item; absent (or `NULL`) attributes are null.
fn read_value(column: &Column, item: &mut Item) -> Result<Value, RowError> {
    let invalid = |what: &str| RowError::Invalid {
        column: column.name.to_string(),
        message: format!("stored attribute is not {what}"),
    };
    let Some(attribute) = item.remove(column.name.as_str()) else {
        return Ok(Value::Null);
    };
    Ok(match (column.column_type, attribute) {
        (_, AttributeValue::Null(_)) => Value::Null,
        (ColumnType::Bool, AttributeValue::Bool(b)) => Value::Bool(b),
        (ColumnType::Int64, AttributeValue::N(n)) => {
            Value::Int64(n.parse().map_err(|_| invalid("a 64-bit integer"))?)
        }
        (ColumnType::Float64, AttributeValue::S(s)) => {
            Value::Float64(s.parse().map_err(|_| invalid("a float"))?)
        }
        (ColumnType::Text, AttributeValue::S(s)) => Value::Text(s),
        (ColumnType::Bytes, AttributeValue::B(b)) => Value::Bytes(b.into_inner()),
        (ColumnType::Timestamp, AttributeValue::N(n)) => Value::Timestamp(
            n.parse()
                .ok()
                .and_then(DateTime::<Utc>::from_timestamp_micros)
                .ok_or_else(|| invalid("a timestamp in microseconds"))?,
        ),
        (ColumnType::Json, AttributeValue::S(s)) => {
            Value::Json(serde_json::from_str(&s).map_err(|_| invalid("JSON text"))?)
        }
        (column_type, _) => return Err(invalid(&format!("of the {column_type} column's type"))),
    })
}

fn decode_row(schema: &TableSchema, mut item: Item) -> Result<Vec<Value>, RowError> {
    schema
        .columns()
        .iter()
        .map(|column| read_value(column, &mut item))
        .collect()
}

#[async_trait]
impl<T: Row> UpsertRepository<T> for DynamoDbUpsertRepository<T> {
    /// Not atomic, and writes carry no condition (rows are replaced by key).
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, WRITE_CHUNK)
            .with_atomic_batch_write(false)
            .with_conditional_write(false)
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        let Some(values) = change.values() else {
            return Ok(());
        };
        let size = item_size(&row_item(&self.schema, values)?);
        if size > MAX_ITEM_SIZE {
            return Err(RowError::Invalid {
                column: self.schema.table().to_string(),
                message: format!(
                    "a row of {size} bytes exceeds DynamoDB's item limit ({MAX_ITEM_SIZE} bytes)"
                ),
            });
        }
        Ok(())
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Build (and validate) every request before sending any.
        let mut requests = Vec::with_capacity(batch.deletes.len() + batch.upserts.len());
        for key in &batch.deletes {
            let delete = DeleteRequest::builder()
                .set_key(Some(key_item(&self.schema, key.values())?))
                .build()
                .map_err(build_err)?;
            requests.push(WriteRequest::builder().delete_request(delete).build());
        }
        for values in &batch.upserts {
            let put = PutRequest::builder()
                .set_item(Some(row_item(&self.schema, values)?))
                .build()
                .map_err(build_err)?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        // A compacted batch touches each key once, so chunks may run in any order.
        batch::write_items(self.store.client(), self.schema.table().as_str(), requests).await
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        for key in keys {
            self.schema.check_key(key)?;
        }
        let mut seen = HashSet::with_capacity(keys.len());
        let items = keys
            .iter()
            .filter(|k| seen.insert(*k))
            .map(|k| key_item(&self.schema, k.values()))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let found_items =
            batch::get_items(self.store.client(), self.schema.table().as_str(), items).await?;
        let mut found = HashMap::with_capacity(found_items.len());
        for item in found_items {
            let values = decode_row(&self.schema, item)?;
            found.insert(self.schema.key_of(&values), values);
        }
        rows_in_request_order(keys, &found)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn schema() -> TableSchema {
        TableSchema::builder("rows")
            .key("tenant", ColumnType::Text)
            .key("id", ColumnType::Int64)
            .column("amount", ColumnType::Float64)
            .nullable("doc", ColumnType::Json)
            .column("at", ColumnType::Timestamp)
            .column("payload", ColumnType::Bytes)
            .column("active", ColumnType::Bool)
            .build()
            .expect("schema")
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        let schema = schema();
        let a = key_string(&schema, &[Value::Text("a\",\"b".into()), Value::Int64(1)]);
        let b = key_string(&schema, &[Value::Text("a".into()), Value::Int64(1)]);
        assert_eq!(a.as_deref(), Ok(r#"["a\",\"b",1]"#));
        assert_eq!(b.as_deref(), Ok(r#"["a",1]"#));
        let bytes = TableSchema::builder("b")
            .key("k", ColumnType::Bytes)
            .key("t", ColumnType::Timestamp)
            .key("f", ColumnType::Bool)
            .build()
            .expect("schema");
        let at = Utc.timestamp_micros(-1).single().expect("timestamp");
        assert_eq!(
            key_string(
                &bytes,
                &[
                    Value::Bytes(vec![0, 255]),
                    Value::Timestamp(at),
                    Value::Bool(false)
                ]
            )
            .as_deref(),
            Ok(r#"["00ff",-1,false]"#)
        );
    }

    #[test]
    fn rows_round_trip_through_items() {
        let schema = schema();
        let at = Utc
            .timestamp_micros(-62_135_596_800_000_000 + 1)
            .single()
            .expect("timestamp");
        for (amount, doc) in [
            (
                f64::MAX,
                Value::Json(serde_json::json!({"n": [1, "x", null]})),
            ),
            (-0.0, Value::Null),
            (1.25e-300, Value::Json(serde_json::json!("\u{0}"))),
        ] {
            let values = vec![
                Value::Text("nul\0 key".into()),
                Value::Int64(i64::MIN),
                Value::Float64(amount),
                doc,
                Value::Timestamp(at),
                Value::Bytes(Vec::new()),
                Value::Bool(true),
            ];
            let item = row_item(&schema, &values).expect("item");
            assert!(item.contains_key(ROW_KEY_ATTRIBUTE));
            if values[3] == Value::Null {
                assert!(!item.contains_key("doc"), "null is an absent attribute");
            }
            assert_eq!(decode_row(&schema, item).expect("decodes"), values);
        }
    }

    #[test]
    fn wrongly_typed_attributes_are_row_errors() {
        let schema = schema();
        let mut item = HashMap::from([("amount".to_owned(), AttributeValue::N("1".into()))]);
        assert!(matches!(
            read_value(&schema.columns()[2], &mut item),
            Err(RowError::Invalid { ref column, .. }) if column == "amount"
        ));
    }
}
