//! [`UpsertRepository`] on MongoDB: one document per row, `_id` = the primary key.

use std::collections::HashMap;
use std::marker::PhantomData;

use async_trait::async_trait;
use chrono::DateTime;
use flows_core::backend::{ChangeBatch, TableMode, ValidChange, rows_in_request_order};
use flows_core::{
    Capabilities, Column, ColumnType, PrimaryKey, RepositoryError, Row, RowError, TableName,
    TableSchema, UpsertRepository, Value,
};
use mongodb::Collection;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::options::{DeleteOneModel, ReplaceOneModel, WriteModel};

use crate::error::map_err;
use crate::store::MongoStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// Rows of type `T` in one MongoDB collection, upserted by primary key. Batches are
/// atomic where the deployment has transactions.
pub struct MongoUpsertRepository<T> {
    store: MongoStore,
    collection: Collection<Document>,
    schema: TableSchema,
    _row: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for MongoUpsertRepository<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoUpsertRepository")
            .field("collection", &self.collection.name())
            .finish()
    }
}

impl<T: Row> MongoUpsertRepository<T> {
    /// Opens the collection named by `T::schema()` (created if missing).
    pub async fn new(store: MongoStore) -> Result<Self, RepositoryError> {
        Self::open_schema(store, T::schema(), TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s rows in another collection (created if missing).
    pub async fn with_table(store: MongoStore, collection: &str) -> Result<Self, RepositoryError> {
        Self::open(store, collection, TableMode::CreateIfMissing).await
    }

    /// Opens `T`'s rows in the collection `collection`, creating it or requiring it to
    /// exist per `mode`.
    pub async fn open(
        store: MongoStore,
        collection: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let name = TableName::new(collection)?;
        Self::open_schema(store, T::schema().with_table(name), mode).await
    }

    async fn open_schema(
        store: MongoStore,
        schema: TableSchema,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        store
            .prepare_collection(schema.table().as_str(), mode)
            .await?;
        Ok(Self {
            collection: store.database().collection(schema.table().as_str()),
            store,
            schema,
            _row: PhantomData,
        })
    }

    /// The `_id` of a key: the key column's value, or for a composite key the JSON
    /// array text of its values in key order.
    fn id_of(&self, key: &[Value]) -> Bson {
        match key {
            [single] => to_bson(single),
            many => Bson::String(composite_id(many)),
        }
    }

    fn document_of(&self, values: &[Value]) -> Document {
        let mut document = Document::new();
        let key: Vec<Value> = self.schema.key_of(values).into_values();
        document.insert("_id", self.id_of(&key));
        for (column, value) in self.schema.columns().iter().zip(values) {
            document.insert(column.name.as_str(), to_bson(value));
        }
        document
    }

    fn values_of(&self, document: &Document) -> Result<Vec<Value>, RepositoryError> {
        self.schema
            .columns()
            .iter()
            .map(|c| from_bson(c, document.get(c.name.as_str())))
            .collect()
    }
}

/// A composite key as one string, unambiguous because every position has a fixed
/// column type: `["eu",42]`. A string keeps lookups on the `_id` index everywhere (some
/// MongoDB-compatible servers cannot index document-valued `_id`s).
fn composite_id(values: &[Value]) -> String {
    let parts: Vec<serde_json::Value> = values
        .iter()
        .map(|value| match value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int64(i) => (*i).into(),
            Value::Float64(f) => (*f).into(),
            Value::Text(s) => s.as_str().into(),
            Value::Bytes(b) => b
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
                .into(),
            Value::Timestamp(t) => t.timestamp_micros().into(),
            Value::Json(j) => j.to_string().into(),
        })
        .collect();
    serde_json::Value::Array(parts).to_string()
}

fn to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Int64(i) => Bson::Int64(*i),
        Value::Float64(f) => Bson::Double(*f),
        Value::Text(s) => Bson::String(s.clone()),
        Value::Bytes(b) => Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: b.clone(),
        }),
        // BSON dates keep milliseconds; rows keep microseconds.
        Value::Timestamp(t) => Bson::Int64(t.timestamp_micros()),
        // As text: BSON cannot hold every JSON document exactly (u64 numbers, keys
        // starting with `$`), and the text round-trips.
        Value::Json(j) => Bson::String(j.to_string()),
    }
}

fn from_bson(column: &Column, value: Option<&Bson>) -> Result<Value, RepositoryError> {
    let mismatch = |found: &Bson| {
        RepositoryError::Row(RowError::Invalid {
            column: column.name.to_string(),
            message: format!("stored {found} is not a {:?}", column.column_type),
        })
    };
    let Some(value) = value else {
        return Ok(Value::Null);
    };
    Ok(match (column.column_type, value) {
        (_, Bson::Null) => Value::Null,
        (ColumnType::Bool, Bson::Boolean(b)) => Value::Bool(*b),
        (ColumnType::Int64, Bson::Int64(i)) => Value::Int64(*i),
        (ColumnType::Int64, Bson::Int32(i)) => Value::Int64(i64::from(*i)),
        (ColumnType::Float64, Bson::Double(f)) => Value::Float64(*f),
        (ColumnType::Text, Bson::String(s)) => Value::Text(s.clone()),
        (ColumnType::Bytes, Bson::Binary(b)) => Value::Bytes(b.bytes.clone()),
        (ColumnType::Timestamp, Bson::Int64(us)) => {
            Value::Timestamp(DateTime::from_timestamp_micros(*us).ok_or_else(|| mismatch(value))?)
        }
        (ColumnType::Json, Bson::String(s)) => {
            Value::Json(serde_json::from_str(s).map_err(|_| mismatch(value))?)
        }
        (_, other) => return Err(mismatch(other)),
    })
}

/// MongoDB's largest document (16 MiB), less room for the `_id` and its encoding.
const MAX_DOCUMENT_SIZE: usize = 16 * 1024 * 1024 - 16 * 1024;

#[async_trait]
impl<T: Row> UpsertRepository<T> for MongoUpsertRepository<T> {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE)
            .with_atomic_batch_write(self.store.transactions())
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        let Some(values) = change.values() else {
            return Ok(());
        };
        // A generous estimate of the document's BSON size (values plus a bound on
        // names and type tags), against MongoDB's 16 MiB document limit.
        let size: usize = values
            .iter()
            .map(|value| {
                let data = match value {
                    Value::Text(s) => s.len(),
                    Value::Bytes(b) => b.len(),
                    Value::Json(j) => j.to_string().len(),
                    _ => 8,
                };
                data + 80
            })
            .sum();
        if size > MAX_DOCUMENT_SIZE {
            return Err(RowError::Invalid {
                column: self.schema.table().to_string(),
                message: format!(
                    "a row of about {size} bytes exceeds MongoDB's document limit ({MAX_DOCUMENT_SIZE} bytes)"
                ),
            });
        }
        Ok(())
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        let namespace = self.collection.namespace();
        let mut models: Vec<WriteModel> =
            Vec::with_capacity(batch.upserts.len() + batch.deletes.len());
        for key in &batch.deletes {
            models.push(
                DeleteOneModel::builder()
                    .namespace(namespace.clone())
                    .filter(doc! { "_id": self.id_of(key.values()) })
                    .build()
                    .into(),
            );
        }
        for row in &batch.upserts {
            let document = self.document_of(row);
            models.push(
                ReplaceOneModel::builder()
                    .namespace(namespace.clone())
                    .filter(doc! { "_id": document.get("_id").cloned().unwrap_or(Bson::Null) })
                    .replacement(document)
                    .upsert(true)
                    .build()
                    .into(),
            );
        }
        let rejections = self.store.bulk_write(models, false).await?;
        if rejections.is_empty() {
            Ok(())
        } else {
            // Two concurrent upserts of a new key can race on the `_id`; the batch can
            // simply be applied again.
            Err(RepositoryError::Unavailable(
                "concurrent insert of the same row; retry the batch".into(),
            ))
        }
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        for key in keys {
            self.schema.check_key(key)?;
        }
        let mut found: HashMap<PrimaryKey, Vec<Value>> = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BATCH_SIZE) {
            let ids: Vec<Bson> = chunk.iter().map(|k| self.id_of(k.values())).collect();
            let mut cursor = self
                .collection
                .find(doc! { "_id": { "$in": ids } })
                .await
                .map_err(map_err)?;
            while cursor.advance().await.map_err(map_err)? {
                let document = cursor.deserialize_current().map_err(map_err)?;
                let values = self.values_of(&document)?;
                found.insert(self.schema.key_of(&values), values);
            }
        }
        rows_in_request_order(keys, &found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_bson() {
        for (column, value) in flows_conformance::one_value_of_each_type() {
            let bson = to_bson(&value);
            assert_eq!(from_bson(&column, Some(&bson)).unwrap(), value);
            assert_eq!(from_bson(&column, None).unwrap(), Value::Null);
        }
    }

    #[test]
    fn composite_ids_keep_values_apart() {
        let a = composite_id(&[Value::Text("a\",1".into()), Value::Int64(2)]);
        let b = composite_id(&[Value::Text("a".into()), Value::Int64(1)]);
        assert_ne!(a, b);
        assert_eq!(b, r#"["a",1]"#);
    }
}
