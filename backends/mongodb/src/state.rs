//! [`SingleStateRepository`] on MongoDB.

use flows_core::backend::TableMode;
use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flows_core::backend::{
    PreparedWrite, decode_stored_state, distinct_ids, in_request_order, into_written,
    prepare_writes, write_time,
};
use flows_core::{
    Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository, TableName,
};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::options::{IndexOptions, InsertOneModel, ReplaceOneModel, WriteModel};
use mongodb::{Collection, IndexModel};

use crate::error::{malformed, map_err};
use crate::store::MongoStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// States in one MongoDB collection. Batch writes are atomic where the deployment has
/// transactions (see the crate documentation).
#[derive(Clone, Debug)]
pub struct MongoStateRepository {
    store: MongoStore,
    collection: Collection<Document>,
    capabilities: Capabilities,
}

impl MongoStateRepository {
    /// Opens the state collection `collection` (created with its index if missing). The
    /// name must be a valid [`TableName`].
    pub async fn new(store: MongoStore, collection: &str) -> Result<Self, RepositoryError> {
        Self::open(store, collection, TableMode::CreateIfMissing).await
    }

    /// Opens the state collection `collection`, creating it (with its index) or
    /// requiring it to exist per `mode`.
    pub async fn open(
        store: MongoStore,
        collection: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let name = TableName::new(collection)?;
        let capabilities = Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE)
            .with_atomic_batch_write(store.transactions());
        let repository = Self {
            collection: store.database().collection(name.as_str()),
            store,
            capabilities,
        };
        match mode {
            TableMode::RequireExisting => {
                repository
                    .store
                    .prepare_collection(name.as_str(), mode)
                    .await?
            }
            _ => repository.migrate().await?,
        }
        Ok(repository)
    }

    /// Changes the largest state accepted (default [`DEFAULT_MAX_STATE_SIZE`]; MongoDB
    /// documents are limited to 16 MiB).
    pub fn with_max_state_size(mut self, max_state_size: usize) -> Self {
        self.capabilities.max_state_size = max_state_size;
        self
    }

    /// Creates the collection and its `updated_at` index if missing. Idempotent.
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        self.store.create_collection(self.collection.name()).await?;
        let index = IndexModel::builder()
            .keys(doc! { "updated_at": 1 })
            .options(
                IndexOptions::builder()
                    .name("flows_updated_at".to_owned())
                    .build(),
            )
            .build();
        self.collection.create_index(index).await.map_err(map_err)?;
        Ok(())
    }

    /// The current version of each of `ids` that exists.
    async fn versions(
        &self,
        ids: &[&PersistenceId],
    ) -> Result<HashMap<PersistenceId, u64>, RepositoryError> {
        let mut versions = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_BATCH_SIZE) {
            let keys: Vec<&str> = chunk.iter().map(|id| id.as_str()).collect();
            let mut cursor = self
                .collection
                .find(doc! { "_id": { "$in": keys } })
                .projection(doc! { "version": 1 })
                .await
                .map_err(map_err)?;
            while cursor.advance().await.map_err(map_err)? {
                let document = cursor.deserialize_current().map_err(map_err)?;
                let id = stored_id(&document)?;
                versions.insert(id, version_of(&document)?);
            }
        }
        Ok(versions)
    }
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn document_of(write: &PreparedWrite<'_>) -> Document {
    doc! {
        "_id": write.id().as_str(),
        "content": write.content().map_or(Bson::Null, binary),
        "internal": binary(&write.internal),
        "version": write.new_version_i64(),
        "created_at": micros(write.created_at),
        "updated_at": micros(write.updated_at),
    }
}

fn stored_id(document: &Document) -> Result<PersistenceId, RepositoryError> {
    let id = document.get_str("_id").map_err(malformed)?;
    PersistenceId::new(id).map_err(|_| RepositoryError::Corrupt {
        id: id.to_owned(),
        source: flows_core::StateCodecError::Invalid("not a valid persistence id"),
    })
}

fn version_of(document: &Document) -> Result<u64, RepositoryError> {
    let version = document.get_i64("version").map_err(malformed)?;
    u64::try_from(version).map_err(|_| malformed("negative version"))
}

fn time_of(document: &Document, field: &str) -> Result<Option<DateTime<Utc>>, RepositoryError> {
    match document.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int64(us)) => Ok(DateTime::from_timestamp_micros(*us)),
        Some(other) => Err(malformed(format!("{field} is {other}"))),
    }
}

fn decode(mut document: Document) -> Result<RawState, RepositoryError> {
    let id = stored_id(&document)?;
    let version = document.get_i64("version").map_err(malformed)?;
    let (created_at, updated_at) = (
        time_of(&document, "created_at")?,
        time_of(&document, "updated_at")?,
    );
    // The binaries are moved out of the document, not copied.
    let content = match document.remove("content") {
        None | Some(Bson::Null) => None,
        Some(Bson::Binary(b)) => Some(b.bytes),
        Some(other) => return Err(malformed(format!("content is {other}"))),
    };
    let internal = match document.remove("internal") {
        Some(Bson::Binary(b)) => b.bytes,
        other => return Err(malformed(format!("internal is {other:?}"))),
    };
    decode_stored_state(id, content, internal, version, created_at, updated_at)
}

#[async_trait]
impl SingleStateRepository for MongoStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let distinct = distinct_ids(ids);
        let mut found = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(MAX_BATCH_SIZE) {
            let keys: Vec<&str> = chunk.iter().map(|id| id.as_str()).collect();
            let mut cursor = self
                .collection
                .find(doc! { "_id": { "$in": keys } })
                .await
                .map_err(map_err)?;
            while cursor.advance().await.map_err(map_err)? {
                let state = decode(cursor.deserialize_current().map_err(map_err)?)?;
                found.insert(state.id.clone(), state);
            }
        }
        Ok(in_request_order(ids, found))
    }

    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let writes = prepare_writes(&states, &self.capabilities)?;
        let namespace = self.collection.namespace();
        let models: Vec<WriteModel> = writes
            .iter()
            .map(|w| {
                let document = document_of(w);
                if w.expected_version == 0 {
                    // An existing `_id` fails the insert: someone else created it first.
                    InsertOneModel::builder()
                        .namespace(namespace.clone())
                        .document(document)
                        .build()
                        .into()
                } else {
                    ReplaceOneModel::builder()
                        .namespace(namespace.clone())
                        .filter(
                            doc! { "_id": w.id().as_str(), "version": w.expected_version_i64() },
                        )
                        .replacement(document)
                        .build()
                        .into()
                }
            })
            .collect();
        let rejections = self.store.bulk_write(models, true).await?;
        if rejections.is_empty() {
            let now = write_time(writes);
            return Ok(into_written(states, now));
        }
        // A transaction stops at the first rejection: name every stale id by reading
        // the versions now (versions only grow, so a stale write stays stale).
        let mut ids: Vec<PersistenceId> = rejections
            .into_sorted()
            .into_iter()
            .map(|i| writes[i].id().clone())
            .collect();
        if self.store.transactions() {
            let all: Vec<&PersistenceId> = writes.iter().map(PreparedWrite::id).collect();
            let stored = self.versions(&all).await?;
            let stale: Vec<PersistenceId> = writes
                .iter()
                .filter(|w| stored.get(w.id()).copied().unwrap_or(0) != w.expected_version)
                .map(|w| w.id().clone())
                .collect();
            if !stale.is_empty() {
                ids = stale;
            }
        }
        Err(RepositoryError::Conflict { ids })
    }
}
