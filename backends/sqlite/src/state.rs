//! [`SingleStateRepository`] on SQLite.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flows_core::backend::{
    PreparedWrite, TableMode, conflicting_ids, decode_stored_id, decode_stored_state, distinct_ids,
    in_request_order, into_written, prepare_writes, write_time,
};
use flows_core::{
    Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository, TableName,
};
use sqlx::{AssertSqlSafe, Row as _};

use crate::error::map_err;
use crate::group::GroupWrite;
use crate::store::{SqliteStore, placeholders};
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// States of one table of a SQLite database. Batch writes are atomic (one transaction).
#[derive(Clone, Debug)]
pub struct SqliteStateRepository {
    store: SqliteStore,
    table: TableName,
    capabilities: Capabilities,
}

impl SqliteStateRepository {
    /// Opens the state table `table` (created if missing). The name must be a valid
    /// [`TableName`].
    pub async fn new(store: SqliteStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens the state table `table`, creating it or requiring it to exist per `mode`.
    pub async fn open(
        store: SqliteStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        let repository = Self {
            store,
            table,
            capabilities: Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE),
        };
        repository
            .store
            .prepare_table(repository.table.as_str(), repository.ddl(), mode)
            .await?;
        Ok(repository)
    }

    /// Changes the largest state accepted (default [`DEFAULT_MAX_STATE_SIZE`]).
    pub fn with_max_state_size(mut self, max_state_size: usize) -> Self {
        self.capabilities.max_state_size = max_state_size;
        self
    }

    /// The table name.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement of this table.
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS \"{}\" (\
                id BLOB PRIMARY KEY NOT NULL, \
                content BLOB, \
                internal BLOB NOT NULL, \
                version INTEGER NOT NULL, \
                created_at INTEGER NOT NULL, \
                updated_at INTEGER NOT NULL\
            ) WITHOUT ROWID",
            self.table
        )
    }

    /// Creates the table if it does not exist. Idempotent; called by [`new`](Self::new).
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        let table = self.table.as_str();
        self.store
            .prepare_table(table, self.ddl(), TableMode::CreateIfMissing)
            .await
    }

    /// Writes `writes`, or fails with the ids whose version had changed (then the caller
    /// undoes what was written).
    ///
    /// Every row written is counted first, without returning its id: rows returned one
    /// by one cost the SQLite thread and the caller a message each (about a tenth of the
    /// SQLite word count's time). Only when fewer rows were written than asked (another
    /// writer changed some) is the write undone and repeated, returning the ids written,
    /// to name the conflicting ones.
    async fn write_states(
        &self,
        write: &mut GroupWrite,
        writes: &[PreparedWrite<'_>],
    ) -> Result<(), RepositoryError> {
        if self.write_chunks(write.connection()?, writes, None).await? {
            return Ok(());
        }
        write.undo().await?;
        let mut applied = HashSet::with_capacity(writes.len());
        self.write_chunks(write.connection()?, writes, Some(&mut applied))
            .await?;
        let conflicts = conflicting_ids(writes, &applied);
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err(RepositoryError::Conflict { ids: conflicts })
        }
    }

    /// Writes `writes` in statements of at most [`MAX_BATCH_SIZE`] rows; whether every
    /// one was written. Counting (`applied` is `None`) stops at the first statement that
    /// fell short; naming writes them all and records in `applied` the ids written.
    async fn write_chunks(
        &self,
        connection: &mut sqlx::SqliteConnection,
        writes: &[PreparedWrite<'_>],
        mut applied: Option<&mut HashSet<PersistenceId>>,
    ) -> Result<bool, RepositoryError> {
        for chunk in writes.chunks(MAX_BATCH_SIZE) {
            let (inserts, updates): (Vec<_>, Vec<_>) =
                chunk.iter().partition(|w| w.expected_version == 0);
            for group in [inserts, updates] {
                let naming = applied.as_deref_mut();
                let counting = naming.is_none();
                if !self.write_chunk(connection, &group, naming).await? && counting {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Writes one chunk of states, all new (`expected_version == 0`: insert if absent) or
    /// all existing (update where the version is still the one read); whether every one
    /// was written. With `applied`, records which ids were. Row values: id, content,
    /// internal, new version, then `created_at` for inserts or the expected version for
    /// updates, then `updated_at`.
    async fn write_chunk(
        &self,
        tx: &mut sqlx::SqliteConnection,
        writes: &[&PreparedWrite<'_>],
        applied: Option<&mut HashSet<PersistenceId>>,
    ) -> Result<bool, RepositoryError> {
        let Some(first) = writes.first() else {
            return Ok(true);
        };
        let rows = placeholders(writes.len(), 6);
        let returning = if applied.is_some() {
            " RETURNING id"
        } else {
            ""
        };
        let sql = if first.expected_version == 0 {
            format!(
                "INSERT INTO \"{}\" (id, content, internal, version, created_at, updated_at) VALUES {rows} \
                 ON CONFLICT (id) DO NOTHING{returning}",
                self.table
            )
        } else {
            format!(
                "UPDATE \"{}\" SET content = v.column2, internal = v.column3, version = v.column4, \
                 updated_at = v.column6 FROM (VALUES {rows}) AS v \
                 WHERE id = v.column1 AND version = v.column5{returning}",
                self.table
            )
        };
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for w in writes {
            let fifth = if w.expected_version == 0 {
                w.created_at.timestamp_micros()
            } else {
                w.expected_version_i64()
            };
            query = query
                .bind(w.id().as_str().as_bytes())
                .bind(w.content())
                .bind(w.internal.as_slice())
                .bind(w.new_version_i64())
                .bind(fifth)
                .bind(w.updated_at.timestamp_micros());
        }
        let Some(applied) = applied else {
            let written = query.execute(&mut *tx).await.map_err(map_err)?;
            return Ok(written.rows_affected() == writes.len() as u64);
        };
        let rows = query.fetch_all(&mut *tx).await.map_err(map_err)?;
        let all = rows.len() == writes.len();
        for row in rows {
            let bytes: Vec<u8> = row.try_get(0).map_err(map_err)?;
            applied.insert(decode_stored_id(bytes)?);
        }
        Ok(all)
    }
}

pub(crate) fn micros_to_time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

#[async_trait]
impl SingleStateRepository for SqliteStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let distinct = distinct_ids(ids);
        let mut found = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(MAX_BATCH_SIZE) {
            let sql = format!(
                "SELECT id, content, internal, version, created_at, updated_at FROM \"{}\" WHERE id IN ({})",
                self.table,
                vec!["?"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str().as_bytes());
            }
            let rows = query.fetch_all(self.store.pool()).await.map_err(map_err)?;
            for row in rows {
                let id = decode_stored_id(row.try_get(0).map_err(map_err)?)?;
                let internal: Vec<u8> = row.try_get(2).map_err(map_err)?;
                let state = decode_stored_state(
                    id.clone(),
                    row.try_get(1).map_err(map_err)?,
                    internal,
                    row.try_get(3).map_err(map_err)?,
                    micros_to_time(row.try_get(4).map_err(map_err)?),
                    micros_to_time(row.try_get(5).map_err(map_err)?),
                )?;
                found.insert(id, state);
            }
        }
        Ok(in_request_order(ids, found))
    }

    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let writes = prepare_writes(&states, &self.capabilities)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut write = self.store.join_write().await?;
        let outcome = self.write_states(&mut write, &writes).await;
        write.finish(outcome).await?;
        let now = write_time(writes);
        Ok(into_written(states, now))
    }
}
