//! [`SingleStateRepository`] on DynamoDB.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, Put, ScalarAttributeType, TransactWriteItem};
use chrono::{DateTime, Utc};
use flows_core::backend::{
    PreparedWrite, decode_stored_id, decode_stored_state, distinct_ids, in_request_order,
    into_written, prepare_writes, write_time,
};
use flows_core::{
    Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository, StateCodecError,
    TableName,
};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, stream};

use crate::batch::{self, Item, chunked_by_size};
use crate::error::{Backoff, Cancellation, build_err, classify_cancellation, map_sdk_err};
use crate::store::{DynamoDbStore, TableMode};
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// Attribute names of a state item.
mod attr {
    pub(super) const ID: &str = "id";
    pub(super) const CONTENT: &str = "content";
    pub(super) const INTERNAL: &str = "internal";
    pub(super) const VERSION: &str = "version";
    pub(super) const CREATED_AT: &str = "created_at";
    pub(super) const UPDATED_AT: &str = "updated_at";
}

/// Bytes of one `TransactWriteItems` call we fill at most: the service allows 4 MB in
/// all; the rest is headroom for attribute names and expressions.
const MAX_TRANSACTION_BYTES: usize = 3_800_000;

/// Conditional `PutItem`s in flight at once in [`WriteMode::ConditionalPuts`].
const PUT_CONCURRENCY: usize = 16;

/// How [`upsert_all`](SingleStateRepository::upsert_all) writes a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// `TransactWriteItems` per chunk of up to [`MAX_BATCH_SIZE`] states (and
    /// 4 MB), chunks one after another. A chunk is all or nothing: a stale version
    /// anywhere in it writes none of it. Chunks before a failed one stay written, later
    /// ones are not attempted, so a batch that fits one chunk is atomic and a larger one
    /// is not. A single state is a conditional `PutItem` (no transaction needed).
    #[default]
    Transactional,
    /// One conditional `PutItem` per state, many in flight. Cheaper (a transactional
    /// write costs twice the write units) and unaffected by transaction contention,
    /// but never atomic: every state whose version still matches is written, every
    /// stale one is left untouched and named in the
    /// [`Conflict`](RepositoryError::Conflict). `BatchWriteItem` is no option here: it
    /// takes no condition expressions, so it could not check versions.
    ConditionalPuts,
}

/// States of one DynamoDB table.
///
/// One item per state: partition key `id` (binary: the id's UTF-8 bytes, stored byte
/// for byte), `content` (binary, absent for no content), `internal` (binary: progress
/// and last results, versioned protobuf), `version` (number), `created_at` and
/// `updated_at` (numbers: microseconds since the Unix epoch, UTC). Reads are strongly
/// consistent; writes are conditional on `version` (`attribute_not_exists(id)` for
/// version 0).
#[derive(Clone, Debug)]
pub struct DynamoDbStateRepository {
    store: DynamoDbStore,
    table: TableName,
    capabilities: Capabilities,
    write_mode: WriteMode,
}

impl DynamoDbStateRepository {
    /// Opens the state table `table`, creating it if missing. The name must be a valid
    /// [`TableName`] of at least 3 characters.
    pub async fn new(store: DynamoDbStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens the state table `table`, creating it or requiring it to exist per `mode`.
    /// An existing table must have the single partition key `id` of type binary.
    pub async fn open(
        store: DynamoDbStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        store
            .ensure_table(&table, attr::ID, ScalarAttributeType::B, mode)
            .await?;
        Ok(Self {
            store,
            table,
            // Batches of more than one transaction are not atomic, so a store that
            // chunks cannot claim it (see `WriteMode::Transactional`).
            capabilities: Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE)
                .with_atomic_batch_write(false),
            write_mode: WriteMode::default(),
        })
    }

    /// Chooses how batches are written (default [`WriteMode::Transactional`]).
    pub fn with_write_mode(mut self, write_mode: WriteMode) -> Self {
        self.write_mode = write_mode;
        self
    }

    /// Lowers the largest state accepted (default and ceiling [`DEFAULT_MAX_STATE_SIZE`]: the
    /// DynamoDB item limit cannot be raised).
    pub fn with_max_state_size(mut self, max_state_size: usize) -> Self {
        self.capabilities.max_state_size = max_state_size.min(DEFAULT_MAX_STATE_SIZE);
        self
    }

    /// The table name.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The write mode.
    pub fn write_mode(&self) -> WriteMode {
        self.write_mode
    }

    /// Writes one state with a conditional `PutItem`: `Ok(false)` if its version no
    /// longer matches.
    async fn put_conditional(&self, write: &PreparedWrite<'_>) -> Result<bool, RepositoryError> {
        let (condition, names, values) = version_condition(write);
        let result = self
            .store
            .client()
            .put_item()
            .table_name(self.table.as_str())
            .set_item(Some(state_item(write)))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(values)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), PutItemError::ConditionalCheckFailedException(_)) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_sdk_err("PutItem", e)),
        }
    }

    /// Writes `writes` in one transaction; `Err(Conflict)` names exactly the states whose
    /// version no longer matches (and nothing is written).
    async fn transact(&self, writes: &[PreparedWrite<'_>]) -> Result<(), RepositoryError> {
        let items = writes
            .iter()
            .map(|write| {
                let (condition, names, values) = version_condition(write);
                let put = Put::builder()
                    .table_name(self.table.as_str())
                    .set_item(Some(state_item(write)))
                    .condition_expression(condition)
                    .set_expression_attribute_names(Some(names))
                    .set_expression_attribute_values(values)
                    .build()
                    .map_err(build_err)?;
                Ok(TransactWriteItem::builder().put(put).build())
            })
            .collect::<Result<Vec<_>, RepositoryError>>()?;
        let mut backoff = Backoff::new("TransactWriteItems");
        loop {
            // The token makes the SDK's own retries of this call idempotent: a retry
            // after a lost answer must not fail the version check against itself.
            let token = format!("{:032x}", rand::random::<u128>());
            let result = self
                .store
                .client()
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(token)
                .send()
                .await;
            let error = match result {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            let cancellation = match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                    classify_cancellation(
                        cancelled
                            .cancellation_reasons()
                            .iter()
                            .map(|reason| reason.code()),
                    )
                }
                _ => return Err(map_sdk_err("TransactWriteItems", error)),
            };
            match cancellation {
                Cancellation::Conflict(indices) => {
                    return Err(RepositoryError::Conflict {
                        ids: indices
                            .into_iter()
                            .filter_map(|i| writes.get(i))
                            .map(|w| w.id().clone())
                            .collect(),
                    });
                }
                // Nothing was written; another writer held one of the items.
                Cancellation::Transient => {
                    backoff
                        .wait(|| "transaction still contended or throttled".to_owned())
                        .await?;
                }
                Cancellation::Failed => return Err(map_sdk_err("TransactWriteItems", error)),
            }
        }
    }
}

/// The item stored for `write`.
fn state_item(write: &PreparedWrite<'_>) -> Item {
    let mut item = HashMap::with_capacity(6);
    item.insert(
        attr::ID.to_owned(),
        AttributeValue::B(Blob::new(write.id().as_str().as_bytes())),
    );
    if let Some(content) = write.content() {
        item.insert(
            attr::CONTENT.to_owned(),
            AttributeValue::B(Blob::new(content)),
        );
    }
    item.insert(
        attr::INTERNAL.to_owned(),
        AttributeValue::B(Blob::new(write.internal.clone())),
    );
    item.insert(
        attr::VERSION.to_owned(),
        AttributeValue::N(write.new_version.to_string()),
    );
    item.insert(
        attr::CREATED_AT.to_owned(),
        AttributeValue::N(write.created_at.timestamp_micros().to_string()),
    );
    item.insert(
        attr::UPDATED_AT.to_owned(),
        AttributeValue::N(write.updated_at.timestamp_micros().to_string()),
    );
    item
}

/// Approximate stored size of `write`'s item, for filling transactions.
fn item_size(write: &PreparedWrite<'_>) -> usize {
    write.id().as_str().len() + write.content().map_or(0, <[u8]>::len) + write.internal.len() + 128
}

/// The condition that fences a stale writer: the item must not exist (version 0) or
/// must still hold the version that was read.
fn version_condition(
    write: &PreparedWrite<'_>,
) -> (
    &'static str,
    HashMap<String, String>,
    Option<HashMap<String, AttributeValue>>,
) {
    if write.expected_version == 0 {
        (
            "attribute_not_exists(#id)",
            HashMap::from([("#id".to_owned(), attr::ID.to_owned())]),
            None,
        )
    } else {
        (
            "#version = :expected",
            HashMap::from([("#version".to_owned(), attr::VERSION.to_owned())]),
            Some(HashMap::from([(
                ":expected".to_owned(),
                AttributeValue::N(write.expected_version.to_string()),
            )])),
        )
    }
}

fn key_of(id: &PersistenceId) -> Item {
    HashMap::from([(
        attr::ID.to_owned(),
        AttributeValue::B(Blob::new(id.as_str().as_bytes())),
    )])
}

/// Decodes a stored item; anything malformed is a [`RepositoryError::Corrupt`].
fn decode_item(mut item: Item) -> Result<RawState, RepositoryError> {
    let id = match item.remove(attr::ID) {
        Some(AttributeValue::B(bytes)) => decode_stored_id(bytes.into_inner())?,
        _ => {
            return Err(RepositoryError::Corrupt {
                id: String::new(),
                source: StateCodecError::Invalid("item has no binary id"),
            });
        }
    };
    let corrupt = |why: &'static str| RepositoryError::Corrupt {
        id: id.to_string(),
        source: StateCodecError::Invalid(why),
    };
    let content = match item.remove(attr::CONTENT) {
        None | Some(AttributeValue::Null(_)) => None,
        Some(AttributeValue::B(bytes)) => Some(bytes.into_inner()),
        Some(_) => return Err(corrupt("content is not binary")),
    };
    let internal = match item.remove(attr::INTERNAL) {
        Some(AttributeValue::B(bytes)) => bytes.into_inner(),
        _ => return Err(corrupt("internal is missing or not binary")),
    };
    let number = |item: &mut Item, name: &str, why: &'static str| -> Result<i64, RepositoryError> {
        match item.remove(name) {
            Some(AttributeValue::N(n)) => n.parse().map_err(|_| corrupt(why)),
            _ => Err(corrupt(why)),
        }
    };
    let version = number(
        &mut item,
        attr::VERSION,
        "version is missing or not an integer",
    )?;
    let micros =
        |n: i64, why| DateTime::<Utc>::from_timestamp_micros(n).ok_or_else(|| corrupt(why));
    let created_at = micros(
        number(
            &mut item,
            attr::CREATED_AT,
            "created_at is missing or not an integer",
        )?,
        "created_at is out of range",
    )?;
    let updated_at = micros(
        number(
            &mut item,
            attr::UPDATED_AT,
            "updated_at is missing or not an integer",
        )?,
        "updated_at is out of range",
    )?;
    decode_stored_state(
        id,
        content,
        internal,
        version,
        Some(created_at),
        Some(updated_at),
    )
}

#[async_trait]
impl SingleStateRepository for DynamoDbStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let keys: Vec<Item> = distinct_ids(ids).into_iter().map(key_of).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let items = batch::get_items(self.store.client(), self.table.as_str(), keys).await?;
        let mut found = HashMap::with_capacity(items.len());
        for item in items {
            let state = decode_item(item)?;
            found.insert(state.id.clone(), state);
        }
        Ok(in_request_order(ids, found))
    }

    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let writes = prepare_writes(&states, &self.capabilities)?;
        match self.write_mode {
            WriteMode::Transactional => {
                for chunk in
                    chunked_by_size(&writes, MAX_BATCH_SIZE, MAX_TRANSACTION_BYTES, item_size)
                {
                    if let [single] = chunk {
                        if !self.put_conditional(single).await? {
                            return Err(RepositoryError::Conflict {
                                ids: vec![single.id().clone()],
                            });
                        }
                    } else {
                        self.transact(chunk).await?;
                    }
                }
            }
            WriteMode::ConditionalPuts => {
                // Boxed so the stream's type names no closure over the writes' lifetimes
                // (which the `async_trait` future could not prove `Send` for).
                let puts: Vec<BoxFuture<'_, Result<bool, RepositoryError>>> = writes
                    .iter()
                    .map(|write| self.put_conditional(write).boxed())
                    .collect();
                let outcomes: Vec<Result<bool, RepositoryError>> =
                    stream::iter(puts).buffered(PUT_CONCURRENCY).collect().await;
                let mut conflicts = Vec::new();
                for (write, outcome) in writes.iter().zip(outcomes) {
                    if !outcome? {
                        conflicts.push(write.id().clone());
                    }
                }
                if !conflicts.is_empty() {
                    return Err(RepositoryError::Conflict { ids: conflicts });
                }
            }
        }
        let now = write_time(writes);
        Ok(into_written(states, now))
    }
}

#[cfg(test)]
mod tests {
    use flows_core::{State, TopicPartition};

    use super::*;

    fn id(s: &str) -> PersistenceId {
        PersistenceId::new(s).expect("valid id")
    }

    #[test]
    fn items_round_trip_at_microsecond_precision() {
        let mut state = State::fresh(id("nul\0id 🦀")).with_content(vec![0, 255, 1]);
        state.progress.record(TopicPartition::new("t", 3), 42);
        state.version = 4;
        let states = [state];
        let caps = Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE);
        let writes = prepare_writes(&states, &caps).expect("prepare");
        let item = state_item(&writes[0]);
        assert_eq!(
            item.get(attr::VERSION),
            Some(&AttributeValue::N("5".into()))
        );
        let back = decode_item(item).expect("decodes");
        assert_eq!(back, writes[0].written());
    }

    #[test]
    fn absent_content_is_no_attribute_and_empty_content_is_empty() {
        let none = [
            State::fresh(id("a")),
            State::fresh(id("b")).with_content(Vec::new()),
        ];
        let caps = Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE);
        let writes = prepare_writes(&none, &caps).expect("prepare");
        assert!(!state_item(&writes[0]).contains_key(attr::CONTENT));
        let back = decode_item(state_item(&writes[1])).expect("decodes");
        assert_eq!(back.content, Some(Vec::new()));
    }

    #[test]
    fn conditions_fence_inserts_and_updates() {
        let mut existing = State::fresh(id("x"));
        existing.version = 7;
        let states = [State::fresh(id("new")), existing];
        let caps = Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE);
        let writes = prepare_writes(&states, &caps).expect("prepare");
        let (insert, _, values) = version_condition(&writes[0]);
        assert_eq!(insert, "attribute_not_exists(#id)");
        assert!(values.is_none());
        let (update, names, values) = version_condition(&writes[1]);
        assert_eq!(update, "#version = :expected");
        assert_eq!(names.get("#version").map(String::as_str), Some("version"));
        assert_eq!(
            values.and_then(|v| v.get(":expected").cloned()),
            Some(AttributeValue::N("7".into()))
        );
    }

    #[test]
    fn malformed_items_are_corrupt() {
        let mut item = key_of(&id("k"));
        item.insert(
            attr::INTERNAL.into(),
            AttributeValue::B(Blob::new(Vec::new())),
        );
        item.insert(attr::VERSION.into(), AttributeValue::S("1".into()));
        assert!(matches!(
            decode_item(item),
            Err(RepositoryError::Corrupt { ref id, .. }) if id == "k"
        ));
        assert!(matches!(
            decode_item(HashMap::new()),
            Err(RepositoryError::Corrupt { .. })
        ));
    }
}
