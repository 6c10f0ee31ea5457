//! SQLite state and upsert repositories for flows: the embedded default.
//!
//! One database file (or an in-memory database) per process, opened in WAL mode so reads
//! never wait for writes; writes take the database lock up front (`BEGIN IMMEDIATE`) so
//! concurrent tasks of one process queue instead of failing. Every batch write is atomic
//! (a savepoint); writes that queue behind each other share one transaction and one
//! commit (group commit), and each returns only once it is committed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_sqlite::{SqliteStateRepository, SqliteStore};
//! let store = SqliteStore::connect("sqlite://flows.db").await?;
//! let states = SqliteStateRepository::new(store, "word_count_state").await?;
//! # Ok(()) }
//! ```
//!
//! # Storage layout
//! States live in a table with columns `id BLOB PRIMARY KEY` (the UTF-8 bytes of the
//! persistence id), `content BLOB`, `internal BLOB` (progress and last results, versioned
//! protobuf), `version INTEGER`, `created_at` and `updated_at` (`INTEGER` microseconds
//! since the Unix epoch). Upsert tables get one column per [`Row`](flows_core::Row)
//! column: `INTEGER` (bool, int64, timestamp in microseconds), `REAL`, `TEXT` (text,
//! JSON) or `BLOB`.

mod error;
mod group;
mod state;
mod store;
mod upsert;

pub use state::SqliteStateRepository;
pub use store::SqliteStore;
pub use upsert::SqliteUpsertRepository;

/// Default largest state (content plus internal bytes): 16 MiB.
pub const DEFAULT_MAX_STATE_SIZE: usize = 16 * 1024 * 1024;

/// States or rows per statement: keeps every statement well under SQLite's limit of
/// 32,766 bound parameters.
pub const MAX_BATCH_SIZE: usize = 500;

flows_core::impl_backend!(
    SqliteStore,
    schemes: ["sqlite"],
    states: SqliteStateRepository,
    rows: SqliteUpsertRepository,
);
