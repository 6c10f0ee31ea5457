//! [`SingleStateRepository`] on Cassandra / ScyllaDB: one row per state, per-key
//! prepared statements, lightweight transactions or write timestamps for fencing.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flows_core::backend::{
    PreparedWrite, TableMode, decode_stored_state, distinct_ids, in_request_order, into_written,
    prepare_writes, write_time,
};
use flows_core::state::StateCodecError;
use flows_core::{
    Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository, TableName,
};
use futures::{StreamExt, TryStreamExt, stream};
use scylla::response::query_result::QueryResult;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

use crate::error::{malformed, map_execution};
use crate::fencing::{Fencing, write_timestamp};
use crate::store::CassandraStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// States in one Cassandra table, fenced by lightweight transactions or by write
/// timestamps (see [`Fencing`] and the crate documentation).
#[derive(Clone, Debug)]
pub struct CassandraStateRepository {
    store: CassandraStore,
    /// The table, qualified by its keyspace.
    table: String,
    fencing: Fencing,
    capabilities: Capabilities,
    select: PreparedStatement,
    /// `INSERT ... IF NOT EXISTS` (LWT) or a plain `INSERT` (write timestamps).
    insert: PreparedStatement,
    /// `UPDATE ... IF version = ?` (LWT only).
    update: Option<PreparedStatement>,
    /// Whether the server declared the `IF version = ?` bind marker (a real server
    /// always does; see [`CassandraStore::accept_servers_without_lwt`]).
    condition_bound: bool,
}

/// The `CREATE TABLE IF NOT EXISTS` statement of the state table `table` (qualified).
fn state_ddl(table: &str) -> String {
    format!("CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, version bigint, state blob)")
}

impl CassandraStateRepository {
    /// The `CREATE TABLE IF NOT EXISTS` statement of this table.
    pub fn ddl(&self) -> String {
        state_ddl(&self.table)
    }

    /// Opens the state table `table` in the store's keyspace, creating it if missing,
    /// with the store's [`Fencing`]. The name must be a valid [`TableName`].
    pub async fn new(store: CassandraStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens the state table `table` with the store's [`Fencing`], creating it or
    /// requiring it to exist per `mode`.
    pub async fn open(
        store: CassandraStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let fencing = store.fencing();
        Self::open_with(store, table, fencing, mode).await
    }

    /// Opens the state table with an explicit [`Fencing`]. A table must be written in
    /// one mode only: write timestamps are far below wall-clock ones, so after
    /// lightweight transactions (wall-clock timestamps) they would not become visible.
    pub async fn with_fencing(
        store: CassandraStore,
        table: &str,
        fencing: Fencing,
    ) -> Result<Self, RepositoryError> {
        Self::open_with(store, table, fencing, TableMode::CreateIfMissing).await
    }

    async fn open_with(
        store: CassandraStore,
        table: &str,
        fencing: Fencing,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let name = TableName::new(table)?;
        let table = store.qualified(&name);
        store
            .prepare_table(&table, &state_ddl(&table), mode)
            .await?;
        let select = store
            .prepare(
                format!("SELECT id, version, state FROM {table} WHERE id = ?"),
                true,
            )
            .await?;
        let capabilities = Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE)
            .with_atomic_batch_write(false);
        let (insert, update, capabilities, condition_bound) = match fencing {
            Fencing::LightweightTransactions => {
                let insert = store
                    .prepare(
                        format!(
                            "INSERT INTO {table} (id, version, state) VALUES (?, ?, ?) IF NOT EXISTS"
                        ),
                        false,
                    )
                    .await?;
                let update = store
                    .prepare(
                        format!(
                            "UPDATE {table} SET version = ?, state = ? WHERE id = ? IF version = ?"
                        ),
                        false,
                    )
                    .await?;
                // A server that ignores the `IF` clause does not count its bind marker.
                let condition_bound = update.get_variable_col_specs().len() == 4;
                if !condition_bound && !store.accepts_servers_without_lwt() {
                    return Err(no_lwt());
                }
                (insert, Some(update), capabilities, condition_bound)
            }
            Fencing::WriteTimestamps => {
                let insert = store
                    .prepare(
                        format!("INSERT INTO {table} (id, version, state) VALUES (?, ?, ?)"),
                        // The timestamp makes a repeated write a no-op: safe to retry.
                        true,
                    )
                    .await?;
                let capabilities = capabilities
                    .with_conditional_write(false)
                    .with_versioned_last_write_wins(true);
                (insert, None, capabilities, false)
            }
        };
        Ok(Self {
            store,
            table,
            fencing,
            capabilities,
            select,
            insert,
            update,
            condition_bound,
        })
    }

    /// Changes the largest state accepted (default [`DEFAULT_MAX_STATE_SIZE`]; keep it
    /// well under half the commit log segment, Cassandra's largest mutation).
    pub fn with_max_state_size(mut self, max_state_size: usize) -> Self {
        self.capabilities.max_state_size = max_state_size;
        self
    }

    /// The fencing mode of this repository.
    pub fn fencing(&self) -> Fencing {
        self.fencing
    }

    async fn read(&self, id: &PersistenceId) -> Result<Option<RawState>, RepositoryError> {
        let result = self
            .store
            .session()
            .execute_unpaged(&self.select, (id.as_str(),))
            .await
            .map_err(map_execution)?;
        let rows = result
            .into_rows_result()
            .map_err(|e| malformed(format!("state read returned no rows result: {e}")))?;
        let row = rows
            .maybe_first_row::<(String, Option<i64>, Option<Vec<u8>>)>()
            .map_err(|e| malformed(format!("state read returned an unexpected row: {e}")))?;
        let Some((stored_id, version, state)) = row else {
            return Ok(None);
        };
        // Guards against a server that answers a key lookup with other rows.
        if stored_id != id.as_str() {
            return Err(malformed(format!(
                "asked for state {id:?}, the server returned {stored_id:?}"
            )));
        }
        let corrupt = |why: &'static str| RepositoryError::Corrupt {
            id: stored_id.clone(),
            source: StateCodecError::Invalid(why),
        };
        let version = version.ok_or_else(|| corrupt("no version"))?;
        let state = state.ok_or_else(|| corrupt("no state blob"))?;
        let decoded = decode_state(&state).ok_or_else(|| corrupt("malformed state blob"))?;
        decode_stored_state(
            id.clone(),
            decoded.content,
            decoded.internal,
            version,
            Some(decoded.created_at),
            Some(decoded.updated_at),
        )
        .map(Some)
    }

    /// Writes one state with a lightweight transaction; `Ok(false)`: not applied.
    async fn write_conditionally(
        &self,
        write: &PreparedWrite<'_>,
    ) -> Result<bool, RepositoryError> {
        let state = encode_state(write);
        let session = self.store.session();
        let result = match (&self.update, write.expected_version) {
            (Some(update), 1..) if self.condition_bound => {
                session
                    .execute_unpaged(
                        update,
                        (
                            write.new_version_i64(),
                            state,
                            write.id().as_str(),
                            write.expected_version_i64(),
                        ),
                    )
                    .await
            }
            (Some(update), 1..) => {
                session
                    .execute_unpaged(
                        update,
                        (write.new_version_i64(), state, write.id().as_str()),
                    )
                    .await
            }
            _ => {
                session
                    .execute_unpaged(
                        &self.insert,
                        (write.id().as_str(), write.new_version_i64(), state),
                    )
                    .await
            }
        }
        .map_err(map_execution)?;
        match applied(result)? {
            Some(applied) => Ok(applied),
            None if self.store.accepts_servers_without_lwt() => Ok(true),
            None => Err(no_lwt()),
        }
    }

    /// Writes one state with its derived write timestamp (last-write-wins fencing).
    async fn write_timestamped(&self, write: &PreparedWrite<'_>) -> Result<(), RepositoryError> {
        let timestamp = write_timestamp(write).ok_or_else(|| {
            RepositoryError::Backend(
                format!(
                    "state {} reached version {}, above what write-timestamp fencing encodes",
                    write.id(),
                    write.new_version
                )
                .into(),
            )
        })?;
        let mut insert = self.insert.clone();
        insert.set_timestamp(Some(timestamp));
        self.store
            .session()
            .execute_unpaged(
                &insert,
                (
                    write.id().as_str(),
                    write.new_version_i64(),
                    encode_state(write),
                ),
            )
            .await
            .map_err(map_execution)?;
        Ok(())
    }
}

fn no_lwt() -> RepositoryError {
    RepositoryError::Configuration(
        "the server does not implement lightweight transactions (it ignored an IF clause); \
         use Fencing::WriteTimestamps or a real Cassandra/ScyllaDB cluster"
            .into(),
    )
}

/// The `[applied]` column of a conditional statement's answer; `None` if the server
/// sent none (it does not implement lightweight transactions).
fn applied(result: QueryResult) -> Result<Option<bool>, RepositoryError> {
    if !result.is_rows() {
        return Ok(None);
    }
    let rows = result
        .into_rows_result()
        .map_err(|e| malformed(format!("conditional write answer: {e}")))?;
    let Some((index, _)) = rows.column_specs().get_by_name("[applied]") else {
        return Ok(None);
    };
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| malformed(format!("conditional write answer: {e}")))?;
    match row.and_then(|mut row| row.columns.get_mut(index).and_then(Option::take)) {
        Some(CqlValue::Boolean(applied)) => Ok(Some(applied)),
        other => Err(malformed(format!(
            "conditional write answer has [applied] = {other:?}"
        ))),
    }
}

/// Format of the `state` blob, first byte.
const STATE_FORMAT: u8 = 1;

/// `created_at` and `updated_at` (i64 big-endian microseconds), whether there is content
/// (one byte) and its length (u64 big-endian) and bytes, then the internal blob. One
/// cell, so that last-write-wins can never combine the columns of two writes.
fn encode_state(write: &PreparedWrite<'_>) -> Vec<u8> {
    let content = write.content();
    let mut out = Vec::with_capacity(
        1 + 8 + 8 + 1 + 8 + content.map_or(0, <[u8]>::len) + write.internal.len(),
    );
    out.push(STATE_FORMAT);
    out.extend_from_slice(&write.created_at.timestamp_micros().to_be_bytes());
    out.extend_from_slice(&write.updated_at.timestamp_micros().to_be_bytes());
    match content {
        Some(content) => {
            out.push(1);
            out.extend_from_slice(&(content.len() as u64).to_be_bytes());
            out.extend_from_slice(content);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&write.internal);
    out
}

struct DecodedState {
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    content: Option<Vec<u8>>,
    internal: Vec<u8>,
}

fn decode_state(bytes: &[u8]) -> Option<DecodedState> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    fn i64_of(bytes: &mut &[u8]) -> Option<i64> {
        Some(i64::from_be_bytes(take(bytes, 8)?.try_into().ok()?))
    }
    let mut rest = bytes;
    if take(&mut rest, 1)? != [STATE_FORMAT] {
        return None;
    }
    let created_at = DateTime::from_timestamp_micros(i64_of(&mut rest)?)?;
    let updated_at = DateTime::from_timestamp_micros(i64_of(&mut rest)?)?;
    let content = match take(&mut rest, 1)? {
        [0] => None,
        [1] => {
            let len = usize::try_from(i64_of(&mut rest)?).ok()?;
            Some(take(&mut rest, len)?.to_vec())
        }
        _ => return None,
    };
    Some(DecodedState {
        created_at,
        updated_at,
        content,
        internal: rest.to_vec(),
    })
}

#[async_trait]
impl SingleStateRepository for CassandraStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    /// One prepared `SELECT ... WHERE id = ?` per distinct id, [`MAX_BATCH_SIZE`] at a
    /// time: token-aware, each read goes straight to a replica of its key. (`IN` would
    /// make one coordinator fan out to every partition and wait for the slowest.)
    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        // Futures built before streaming: closures inside the stream would not be
        // provably `Send` for every lifetime in an `async_trait` method.
        let reads: Vec<_> = distinct_ids(ids)
            .into_iter()
            .map(|id| async move { Ok::<_, RepositoryError>((id, self.read(id).await?)) })
            .collect();
        let read: Vec<(&PersistenceId, Option<RawState>)> = stream::iter(reads)
            .buffer_unordered(MAX_BATCH_SIZE)
            .try_collect()
            .await?;
        let found: HashMap<PersistenceId, RawState> = read
            .into_iter()
            .filter_map(|(id, state)| state.map(|s| (id.clone(), s)))
            .collect();
        Ok(in_request_order(ids, found))
    }

    /// Every state is its own statement, [`MAX_BATCH_SIZE`] at a time; not atomic: with
    /// lightweight transactions, a conflict leaves the conflicting states untouched and
    /// the others written, and is reported naming every conflicting id.
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let writes = prepare_writes(&states, &self.capabilities)?;
        match self.fencing {
            Fencing::LightweightTransactions => {
                let calls: Vec<_> = writes.iter().map(|w| self.write_conditionally(w)).collect();
                let outcomes: Vec<bool> = stream::iter(calls)
                    .buffered(MAX_BATCH_SIZE)
                    .try_collect()
                    .await?;
                let conflicts: Vec<PersistenceId> = writes
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, applied)| !**applied)
                    .map(|(write, _)| write.id().clone())
                    .collect();
                if !conflicts.is_empty() {
                    return Err(RepositoryError::Conflict { ids: conflicts });
                }
            }
            Fencing::WriteTimestamps => {
                let calls: Vec<_> = writes.iter().map(|w| self.write_timestamped(w)).collect();
                stream::iter(calls)
                    .buffer_unordered(MAX_BATCH_SIZE)
                    .try_collect::<()>()
                    .await?;
            }
        }
        let now = write_time(writes);
        Ok(into_written(states, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_core::State;

    #[test]
    fn state_blob_round_trips_and_rejects_garbage() {
        let caps = Capabilities::new(1 << 20, 10);
        for content in [None, Some(Vec::new()), Some(vec![0, 1, 255])] {
            let mut state: RawState = State::fresh(PersistenceId::new("x").unwrap());
            state.content = content.clone();
            let states = [state];
            let writes = prepare_writes(&states, &caps).unwrap();
            let blob = encode_state(&writes[0]);
            let decoded = decode_state(&blob).unwrap();
            assert_eq!(decoded.content, content);
            assert_eq!(decoded.internal, writes[0].internal);
            assert_eq!(decoded.updated_at, writes[0].updated_at);
            assert_eq!(decoded.created_at, writes[0].created_at);
            for cut in 0..18 {
                assert!(decode_state(&blob[..cut]).is_none(), "cut at {cut}");
            }
        }
        assert!(decode_state(&[2; 40]).is_none());
    }
}
