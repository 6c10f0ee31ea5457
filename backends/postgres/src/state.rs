//! [`SingleStateRepository`] on PostgreSQL.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use flows_core::backend::{
    PreparedWrite, TableMode, conflicting_ids, decode_stored_id, decode_stored_state, distinct_ids,
    in_request_order, into_written, prepare_writes, write_time,
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
    insert: Write,
    update: Write,
}

/// One write statement, in two forms: counting the rows it changed (the usual case) or
/// naming them (after a count fell short, to tell which ids conflicted).
#[derive(Clone, Debug)]
struct Write {
    counting: String,
    naming: String,
}

impl Write {
    fn new(statement: String, returning: &str) -> Self {
        Self {
            naming: format!("{statement} RETURNING {returning}"),
            counting: statement,
        }
    }
}

impl Statements {
    fn new(table: &TableName) -> Self {
        Self {
            select: format!(
                "SELECT id, content, internal, version, created_at, updated_at FROM \"{table}\" WHERE id = ANY($1)"
            ),
            // Version 0 writes: insert if absent; an existing row means a conflict.
            insert: Write::new(
                format!(
                    "INSERT INTO \"{table}\" (id, content, internal, version, created_at, updated_at) \
                     SELECT u.*, $6::timestamptz FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::int8[], $5::timestamptz[]) AS u \
                     ON CONFLICT (id) DO NOTHING"
                ),
                "id",
            ),
            // Later writes: update only where the stored version is the one that was read.
            // Under READ COMMITTED a concurrent committed update makes the re-checked
            // condition false, so the row is not changed and the write is a conflict.
            update: Write::new(
                format!(
                    "UPDATE \"{table}\" AS t SET content = u.content, internal = u.internal, version = u.version, \
                     updated_at = $6::timestamptz \
                     FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::int8[], $5::int8[]) \
                     AS u(id, content, internal, version, expected) \
                     WHERE t.id = u.id AND t.version = u.expected"
                ),
                "t.id",
            ),
        }
    }
}

/// Starts a write's transaction, planning its statements once per connection.
///
/// PostgreSQL plans the first five executions of a statement on each connection for
/// the values at hand. Knowing that a batch covers much of a small table, it joined the
/// batch by hashing the whole table (a sequential scan per write, about twice the time
/// of looking each id up in the primary key), and re-planned every time (a few
/// milliseconds of server CPU per write). The generic plan looks ids up in the primary
/// key whatever the batch's size. `SET LOCAL` ends with the transaction, so a pool
/// shared with other code (`PostgresStore::from_pool`) keeps its own setting.
const BEGIN_WITH_GENERIC_PLANS: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// How one attempt at writing a batch ended.
enum Attempt {
    /// Every write applied; committed.
    Committed,
    /// These writes did not apply (rolled back).
    Conflicts(Vec<PersistenceId>),
    /// Some write did not apply, which one unknown (counting statements; rolled back).
    FellShort,
}

impl PostgresStateRepository {
    /// Opens the state table `table` (created if missing). The name must be a valid
    /// [`TableName`].
    pub async fn new(store: PostgresStore, table: &str) -> Result<Self, RepositoryError> {
        Self::open(store, table, TableMode::CreateIfMissing).await
    }

    /// Opens the state table `table`, creating it or requiring it to exist per `mode`
    /// (for a schema managed separately, apply [`ddl`](Self::ddl) yourself).
    pub async fn open(
        store: PostgresStore,
        table: &str,
        mode: TableMode,
    ) -> Result<Self, RepositoryError> {
        let table = TableName::new(table)?;
        let repository = Self {
            store,
            sql: Statements::new(&table),
            table,
            capabilities: Capabilities::new(DEFAULT_MAX_STATE_SIZE, MAX_BATCH_SIZE),
        };
        repository
            .store
            .prepare_table(&repository.table, repository.ddl(), mode)
            .await?;
        Ok(repository)
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
    ///
    /// States are rewritten all the time, so pages are left half free
    /// (`fillfactor = 50`): the new version of a row then fits beside the old one, a
    /// heap-only update that leaves the id index alone. At 100 (PostgreSQL's default)
    /// every state write also inserted an index entry and the server spent about 60%
    /// more CPU per write in the engine benchmark. A table created by an earlier
    /// version keeps its setting: `ALTER TABLE ... SET (fillfactor = 50)` changes it
    /// for pages written from then on.
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS \"{}\" (\
                id BYTEA PRIMARY KEY, \
                content BYTEA, \
                internal BYTEA NOT NULL, \
                version BIGINT NOT NULL, \
                created_at TIMESTAMPTZ NOT NULL, \
                updated_at TIMESTAMPTZ NOT NULL) \
             WITH (fillfactor = 50)",
            self.table
        )
    }

    /// Creates the table if it does not exist. Idempotent and safe to run from many
    /// workers at once.
    pub async fn migrate(&self) -> Result<(), RepositoryError> {
        self.store.create_table(&self.table, self.ddl()).await
    }

    /// Writes `ordered` in one transaction, committed only if every write applied.
    /// Counting statements are cheaper for both sides (no row per write comes back);
    /// naming ones tell which writes conflicted.
    async fn attempt(
        &self,
        writes: &[PreparedWrite<'_>],
        ordered: &[&PreparedWrite<'_>],
        naming: bool,
    ) -> Result<Attempt, RepositoryError> {
        let mut tx = self
            .store
            .pool()
            .begin_with(BEGIN_WITH_GENERIC_PLANS)
            .await
            .map_err(map_err)?;
        let mut applied = HashSet::with_capacity(if naming { writes.len() } else { 0 });
        for chunk in ordered.chunks(MAX_BATCH_SIZE) {
            let (inserts, updates): (Vec<_>, Vec<_>) =
                chunk.iter().partition(|w| w.expected_version == 0);
            for (statement, group) in [(&self.sql.insert, inserts), (&self.sql.update, updates)] {
                if group.is_empty() {
                    continue;
                }
                if naming {
                    let rows = write_query(&statement.naming, &group)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(map_err)?;
                    for row in rows {
                        applied.insert(decode_stored_id(row.try_get(0).map_err(map_err)?)?);
                    }
                } else {
                    let done = write_query(&statement.counting, &group)
                        .execute(&mut *tx)
                        .await
                        .map_err(map_err)?;
                    // Ids are distinct (checked), so each write changes at most one row.
                    if done.rows_affected() != group.len() as u64 {
                        tx.rollback().await.map_err(map_err)?;
                        return Ok(Attempt::FellShort);
                    }
                }
            }
        }
        if naming {
            let conflicts = conflicting_ids(writes, &applied);
            if !conflicts.is_empty() {
                tx.rollback().await.map_err(map_err)?;
                return Ok(Attempt::Conflicts(conflicts));
            }
        }
        tx.commit().await.map_err(map_err)?;
        Ok(Attempt::Committed)
    }
}

/// The write statement `sql` bound to `writes` (all inserts or all updates, see
/// [`Statements`]).
fn write_query<'q>(
    sql: &str,
    writes: &[&'q PreparedWrite<'_>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let ids: Vec<&[u8]> = writes.iter().map(|w| w.id().as_str().as_bytes()).collect();
    let contents: Vec<Option<&[u8]>> = writes.iter().map(|w| w.content()).collect();
    let internals: Vec<&[u8]> = writes.iter().map(|w| w.internal.as_slice()).collect();
    let versions: Vec<i64> = writes.iter().map(|w| w.new_version_i64()).collect();
    // One write time for the whole batch (`prepare_writes`), bound once.
    let now = writes.first().map(|w| w.updated_at);
    let query = sqlx::query(AssertSqlSafe(sql.to_owned()))
        .bind(ids)
        .bind(contents)
        .bind(internals)
        .bind(versions);
    // Inserts bind each created_at, updates the expected version (see `Statements`).
    let query = if writes.first().is_some_and(|w| w.expected_version == 0) {
        query.bind(writes.iter().map(|w| w.created_at).collect::<Vec<_>>())
    } else {
        query.bind(
            writes
                .iter()
                .map(|w| w.expected_version_i64())
                .collect::<Vec<_>>(),
        )
    };
    query.bind(now)
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
        // Counting first; a conflict (rare: a rebalance, a stale cached state) is then
        // written again naming the applied ids, to report the ones that conflicted.
        let mut attempt = self.attempt(&writes, &ordered, false).await?;
        if matches!(attempt, Attempt::FellShort) {
            attempt = self.attempt(&writes, &ordered, true).await?;
        }
        match attempt {
            Attempt::Committed => {
                let now = write_time(writes);
                Ok(into_written(states, now))
            }
            Attempt::Conflicts(ids) => Err(RepositoryError::Conflict { ids }),
            Attempt::FellShort => Err(RepositoryError::Backend(
                "a naming write reported no conflict but fell short".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use flows_core::{PersistenceId, RawState, SingleStateRepository, State};

    use super::*;

    fn url() -> String {
        std::env::var("FLOWS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".to_owned())
    }

    /// How many sequential scans of `table` the server has counted, including those of
    /// the last statement on this pool's one connection.
    async fn sequential_scans(repository: &PostgresStateRepository) -> i64 {
        let pool = repository.store.pool();
        // Statistics reach the shared counters when a connection goes idle, at most
        // once a second unless told otherwise (PostgreSQL 15 and later).
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await
            .expect("flush statistics");
        sqlx::query_scalar("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = $1")
            .bind(repository.table().as_str())
            .fetch_one(pool)
            .await
            .expect("table statistics")
    }

    /// A batch covering much of a small table was joined by hashing the whole table
    /// (PostgreSQL's plan for the first five writes on every connection, when it
    /// plans for the batch at hand) instead of looking its ids up in the primary key.
    #[tokio::test]
    async fn a_state_write_looks_its_ids_up_in_the_index_however_much_of_the_table_it_covers() {
        // One connection: the statistics flushed are those of the writes.
        let store = PostgresStore::connect_with_pool_size(&url(), 1)
            .await
            .expect("the test PostgreSQL server (scripts/test starts it)");
        let table = format!("plan_{}", std::process::id());
        let repository = PostgresStateRepository::new(store, &table)
            .await
            .expect("state table");
        let states: Vec<RawState> = (0..2_000)
            .map(|i| {
                let id = PersistenceId::new(format!("word{i}")).expect("valid id");
                State::fresh(id).with_content(vec![b'x'; 3])
            })
            .collect();
        let mut written = repository.upsert_all(states).await.expect("inserted");
        sqlx::query(AssertSqlSafe(format!("ANALYZE \"{table}\"")))
            .execute(repository.store.pool())
            .await
            .expect("analyze");
        let before = sequential_scans(&repository).await;
        written.truncate(1_500);
        let rewritten = repository.upsert_all(written).await.expect("updated");
        let after = sequential_scans(&repository).await;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE \"{table}\"")))
            .execute(repository.store.pool())
            .await
            .expect("drop");
        assert_eq!(rewritten.len(), 1_500);
        assert_eq!(after - before, 0, "the update scanned the whole table");
    }
}
