//! The connection pool shared by the repositories of one database.

use std::str::FromStr;
use std::time::Duration;

use flows_core::RepositoryError;
use flows_core::backend::{TableMode, missing_table};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::map_err;
use crate::group::{GroupCommit, GroupWrite};

impl SqliteStore {
    /// Whether the table `table` exists.
    pub(crate) async fn has_table(&self, table: &str) -> Result<bool, RepositoryError> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(table)
                .fetch_optional(self.pool())
                .await
                .map_err(map_err)?;
        Ok(found.is_some())
    }

    /// Creates the table with `ddl` or, under [`TableMode::RequireExisting`], checks that
    /// it exists.
    pub(crate) async fn prepare_table(
        &self,
        table: &str,
        ddl: String,
        mode: TableMode,
    ) -> Result<(), RepositoryError> {
        if mode == TableMode::RequireExisting {
            return match self.has_table(table).await? {
                true => Ok(()),
                false => Err(missing_table("SQLite", table)),
            };
        }
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(self.pool())
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// Attempts at opening a database that another connection is switching to WAL.
const OPEN_ATTEMPTS: u32 = 20;

/// Connections to a database file. SQLite takes one writer at a time, and in WAL mode a
/// connection discards its page cache whenever another connection has written: with
/// several, every batch read its pages again (through `pread`). One connection keeps
/// its cache warm; in the engine benchmark's word count it used 10–15% less CPU and
/// 20 MB less memory than four (which peaked at 204–223 MB, eight at 236–248 MB).
const MAX_FILE_CONNECTIONS: u32 = 1;

/// A SQLite database opened for flows: a pool configured for one process with many
/// tasks. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The write transaction its writers share (see [`GroupCommit`]).
    pub(crate) group: GroupCommit,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`: `sqlite://path/to/file.db`,
    /// `sqlite:relative.db`, or `sqlite::memory:` for a private in-memory database.
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| RepositoryError::Configuration(format!("invalid SQLite URL: {e}")))?;
        Self::connect_with(options).await
    }

    /// A private in-memory database (gone when the store is dropped).
    pub async fn in_memory() -> Result<Self, RepositoryError> {
        Self::connect("sqlite::memory:").await
    }

    /// Opens a database from explicit options; WAL mode, `synchronous = NORMAL` (durable
    /// across process crashes; across power loss the last transactions may roll back),
    /// a 30 s busy timeout and foreign keys are applied on top. A file is read through a
    /// memory map (up to 256 MiB) with a 16 MiB page cache, and its WAL is checkpointed
    /// every 10,000 pages instead of 1,000: batches rewrite the same pages, and each
    /// checkpoint copies and syncs them. Temporary data is kept in memory: the old copies
    /// of the pages a write's savepoint changes (freed when it ends; a batch that
    /// rewrites many large states holds as many pages), and any sort or temporary table.
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self, RepositoryError> {
        let in_memory = options
            .get_filename()
            .to_string_lossy()
            .starts_with("file:sqlx-in-memory")
            || options.get_filename().as_os_str() == ":memory:";
        let options = options
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
            // Batched statements differ by their number of rows, and each prepared one
            // holds its program per connection: keep few (the full 500-row chunks are
            // the ones that repeat).
            .statement_cache_capacity(16);
        let options = if in_memory {
            options
        } else {
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .pragma("mmap_size", "268435456")
                .pragma("cache_size", "-16384")
                .pragma("wal_autocheckpoint", "10000")
                // Every write runs in a savepoint (see `group`), whose undo copies of
                // the pages it changes spill to a temporary file beyond 64 KiB, a write
                // system call per page: a batch of states changes far more.
                .pragma("temp_store", "memory")
        };
        // An in-memory database lives in one connection: a pool of one keeps every task
        // on the same data (and avoids shared-cache table locks).
        let max_connections = if in_memory { 1 } else { MAX_FILE_CONNECTIONS };
        let pool_options = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if in_memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .acquire_timeout(Duration::from_secs(60));
        // Switching a new file to WAL takes an exclusive lock that SQLite does not wait
        // for (no busy handler on that path), so processes or tasks opening the same
        // fresh file at once can see "database is locked": retry the first connection.
        let mut attempt = 0;
        let pool = loop {
            match pool_options.clone().connect_with(options.clone()).await {
                Ok(pool) => break pool,
                Err(error) => match map_err(error) {
                    RepositoryError::Unavailable(_) if attempt < OPEN_ATTEMPTS => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    }
                    other => return Err(other),
                },
            }
        };
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool (the caller chose its options).
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            group: GroupCommit::default(),
        }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Waits for a turn in the write transaction its writers share: write through
    /// [`GroupWrite::connection`], then [`GroupWrite::finish`], which returns once the
    /// write is committed. Concurrent writers share one commit (one WAL append of the
    /// pages they dirtied), each in a savepoint of its own.
    pub(crate) async fn join_write(&self) -> Result<GroupWrite, RepositoryError> {
        self.group.join(&self.pool).await
    }
}

/// `(?, ?, ...), (?, ?, ...)`: `rows` tuples of `columns` placeholders.
pub(crate) fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}
