//! [`SingleStateRepository`] on PostgreSQL.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flows_core::repository::{
    PreparedWrite, conflicting_ids, decode_stored_id, decode_stored_state, distinct_ids,
    in_request_order, prepare_writes,
};
use flows_core::{
    Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository, TableName,
};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row as _};

use crate::error::map_err;
use crate::store::PostgresStore;
use crate::{DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE};

/// States of one PostgreSQL table. Batch writes are atomic (one transaction).
#[derive(Clone, Debug)]
pub struct PostgresStateRepository {
    store: PostgresStore,
    table: TableName,
    capabilities: Capabilities,
    sql: Statements,
}

/// The statements of one table, built once (the table name is validated).
#[derive(Clone, Debug)]
struct Statements {
    select: String,
    insert: String,
    update: String,
}

impl Statements {
    fn new(table: &TableName) -> Self {
        Self {
            select: format!(
                "SELECT id, content, internal, version, created_at, updated_at FROM \"{table}\" WHERE id = ANY($1)"
            ),
            // Version 0 writes: insert if absent; an existing row means a conflict.
            insert: format!(
                "INSERT INTO \"{table}\" (id, content, internal, version, created_at, updated_at) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::int8[], $5::timestamptz[], $6::timestamptz[]) \
                 ON CONFLICT (id) DO NOTHING RETURNING id"
            ),
            // Later writes: update only where the stored version is the one that was read.
            // Under READ COMMITTED a concurrent committed update makes the re-checked
            // condition false, so the row is not returned and the write is a conflict.
            update: format!(
                "UPDATE \"{table}\" AS t SET content = u.content, internal = u.internal, version = u.version, \
                 updated_at = u.updated_at \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::int8[], $5::int8[], $6::timestamptz[]) \
                 AS u(id, content, internal, version, expected, updated_at) \
                 WHERE t.id = u.id AND t.version = u.expected RETURNING t.id"
            ),
        }
    }
}

impl PostgresStateRepository {
    /// Opens the state table `table` (created if missing). The name must be a valid
    /// [`TableName`].
    pub async fn new(store: PostgresStore, table: &str) -> Result<Self, RepositoryError> {
        let repository = Self::without_migration(store, table)?;
        repository.migrate().await?;
        Ok(repository)
    }

    /// Opens the state table `table` without creating it, for deployments where the
    /// schema is managed separately (call [`migrate`](Self::migrate) or apply
    /// [`ddl`](Self::ddl) yourself).
    pub fn without_migration(store: PostgresStore, table: &str) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        Ok(Self {
            store,
            sql: Statements::new(&table),
            table,
            capabilities: Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE),
        })
    }

    /// Changes the largest state accepted (default [`DEFAULT_MAX_STATE_SIZE`]; PostgreSQL
    /// itself allows up to 1 GB per `bytea` value).
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
                id BYTEA PRIMARY KEY, \
                content BYTEA, \
                internal BYTEA NOT NULL, \
                version BIGINT NOT NULL, \
                created_at TIMESTAMPTZ NOT NULL, \
                updated_at TIMESTAMPTZ NOT NULL)",
            self.table
        )
    }

    /// Creates the table if it does not exist. Idempotent and safe to run from many
    /// workers at once.
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        self.store.create_table(&self.table, self.ddl()).await
    }

    async fn write_chunk(
        &self,
        tx: &mut sqlx::PgConnection,
        sql: &str,
        writes: &[&PreparedWrite<'_>],
        applied: &mut HashSet<PersistenceId>,
    ) -> Result<(), RepositoryError> {
        if writes.is_empty() {
            return Ok(());
        }
        let ids: Vec<&[u8]> = writes.iter().map(|w| w.id().as_str().as_bytes()).collect();
        let contents: Vec<Option<&[u8]>> = writes.iter().map(|w| w.content()).collect();
        let internals: Vec<&[u8]> = writes.iter().map(|w| w.internal.as_slice()).collect();
        let versions: Vec<i64> = writes.iter().map(|w| w.new_version_i64()).collect();
        let updated: Vec<DateTime<Utc>> = writes.iter().map(|w| w.updated_at).collect();
        let query = sqlx::query(AssertSqlSafe(sql.to_owned()))
            .bind(ids)
            .bind(contents)
            .bind(internals)
            .bind(versions);
        // Inserts bind created_at then updated_at; updates bind the expected version then
        // updated_at (see `Statements`).
        let query = if writes[0].expected_version == 0 {
            query.bind(writes.iter().map(|w| w.created_at).collect::<Vec<_>>())
        } else {
            query.bind(
                writes
                    .iter()
                    .map(|w| w.expected_version_i64())
                    .collect::<Vec<_>>(),
            )
        };
        let rows = query
            .bind(updated)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        for row in rows {
            applied.insert(decode_stored_id(row.try_get(0).map_err(map_err)?)?);
        }
        Ok(())
    }
}

fn decode_row(row: &PgRow) -> Result<RawState, RepositoryError> {
    let id = decode_stored_id(row.try_get(0).map_err(map_err)?)?;
    let internal: Vec<u8> = row.try_get(2).map_err(map_err)?;
    decode_stored_state(
        id,
        row.try_get(1).map_err(map_err)?,
        internal,
        row.try_get(3).map_err(map_err)?,
        row.try_get(4).map_err(map_err)?,
        row.try_get(5).map_err(map_err)?,
    )
}

#[async_trait]
impl SingleStateRepository for PostgresStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let distinct = distinct_ids(ids);
        let mut found = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(MAX_BATCH_SIZE) {
            let keys: Vec<&[u8]> = chunk.iter().map(|id| id.as_str().as_bytes()).collect();
            let rows = sqlx::query(AssertSqlSafe(self.sql.select.clone()))
                .bind(keys)
                .fetch_all(self.store.pool())
                .await
                .map_err(map_err)?;
            for row in &rows {
                let state = decode_row(row)?;
                found.insert(state.id.clone(), state);
            }
        }
        Ok(in_request_order(ids, found))
    }

    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let writes = prepare_writes(&states, &self.capabilities)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        // Rows are locked in id order, so two batches over overlapping ids cannot deadlock.
        let mut ordered: Vec<&PreparedWrite<'_>> = writes.iter().collect();
        ordered.sort_by(|a, b| a.id().cmp(b.id()));
        let mut tx = self.store.pool().begin().await.map_err(map_err)?;
        let mut applied = HashSet::with_capacity(writes.len());
        for chunk in ordered.chunks(MAX_BATCH_SIZE) {
            let (inserts, updates): (Vec<_>, Vec<_>) =
                chunk.iter().partition(|w| w.expected_version == 0);
            self.write_chunk(&mut tx, &self.sql.insert, &inserts, &mut applied)
                .await?;
            self.write_chunk(&mut tx, &self.sql.update, &updates, &mut applied)
                .await?;
        }
        let conflicts = conflicting_ids(&writes, &applied);
        if !conflicts.is_empty() {
            tx.rollback().await.map_err(map_err)?;
            return Err(RepositoryError::Conflict { ids: conflicts });
        }
        tx.commit().await.map_err(map_err)?;
        Ok(writes.iter().map(PreparedWrite::written).collect())
    }
}
