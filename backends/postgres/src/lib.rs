//! PostgreSQL state and upsert repositories for flows: the reference backend.
//!
//! Built on sqlx with a connection pool. Every batch is one round trip per chunk of
//! [`MAX_BATCH_SIZE`] (`= ANY($1)` reads, `UNNEST` writes) inside one transaction, so
//! [`upsert_all`](flows_core::SingleStateRepository::upsert_all) is atomic and a stale
//! version anywhere in a batch rolls back all of it. Needs PostgreSQL 12 or later (a
//! state write sets `plan_cache_mode` for its transaction); tested against 15 and 16.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_postgres::{PostgresStateRepository, PostgresStore};
//! // TLS (`sslmode=require`, `sslrootcert=...`) and credentials come from the URL.
//! let store = PostgresStore::connect("postgres://flows@db.internal/flows?sslmode=require").await?;
//! let states = PostgresStateRepository::new(store, "word_count_state").await?;
//! # Ok(()) }
//! ```
//!
//! # TLS and large batches
//! sqlx 0.9.0 does not set `TCP_NODELAY` on its sockets (sqlx issue 4335). Over TLS a
//! large batch statement is written as several records, and Nagle's algorithm holds the
//! last one until the server's delayed acknowledgement: about 40 ms per batch. Measured
//! on loopback, 1,000-state batches ran at ~25,000 states/s with TLS against ~150,000
//! without. Prefer a Unix socket or an unencrypted trusted network where the deployment
//! allows it, until sqlx sets the option again.
//!
//! # Storage layout
//! A state table has columns `id BYTEA PRIMARY KEY` (the UTF-8 bytes of the persistence
//! id: PostgreSQL `text` cannot hold NUL, which persistence ids may contain; read it with
//! `convert_from(id, 'UTF8')`), `content BYTEA`, `internal BYTEA` (progress and last
//! results, versioned protobuf), `version BIGINT`, `created_at` and `updated_at`
//! (`TIMESTAMPTZ`). Tables are created on start (idempotent, serialised with an advisory
//! lock so many workers can start at once) or by an explicit `migrate()` call.
//!
//! Upsert tables map [`ColumnType`](flows_core::ColumnType)s to `BOOLEAN`, `BIGINT`,
//! `DOUBLE PRECISION`, `TEXT`, `BYTEA`, `TIMESTAMPTZ` and `JSONB`. Text and JSON strings
//! containing NUL are rejected with a typed [`RowError`](flows_core::RowError) before
//! reaching the server, which could not store them.

mod error;
mod state;
mod store;
mod upsert;

pub use state::PostgresStateRepository;
pub use store::PostgresStore;
pub use upsert::PostgresUpsertRepository;

/// Default largest state (content plus internal bytes): 16 MiB.
pub const DEFAULT_MAX_STATE_SIZE: usize = 16 * 1024 * 1024;

/// States or rows per statement.
pub const MAX_BATCH_SIZE: usize = 1_000;

flows_core::impl_backend!(
    PostgresStore,
    schemes: ["postgres", "postgresql"],
    states: PostgresStateRepository,
    rows: PostgresUpsertRepository,
);
