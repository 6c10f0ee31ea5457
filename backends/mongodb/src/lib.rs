//! MongoDB state and upsert repositories for flows.
//!
//! One document per state (`_id` = the persistence id) in a collection of your choice;
//! reads are one `find` with `$in` per chunk of [`MAX_BATCH_SIZE`] ids; writes are one
//! `bulkWrite` per chunk, each write filtered on the version that was read (optimistic
//! concurrency: a stale instance's write matches nothing and is reported as a
//! conflict).
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_mongodb::{MongoStateRepository, MongoStore};
//! // The database is the URL's path (default `flows`).
//! let store = MongoStore::connect("mongodb://db.internal:27017/flows?replicaSet=rs0").await?;
//! let states = MongoStateRepository::new(store, "word_count_state").await?;
//! # Ok(()) }
//! ```
//!
//! # Atomicity
//! On a replica set or a sharded cluster (what [`MongoStore::connect`] detects with the
//! `hello` command) every `upsert_all` and every row batch runs in one multi-document
//! transaction: a stale version anywhere aborts all of it, and the repository declares
//! `atomic_batch_write`. On a standalone server, which has no transactions, or with
//! [`MongoStore::with_transactions(false)`](MongoStore::with_transactions), writes are
//! unordered bulk writes: a conflict leaves the conflicting states untouched and the
//! others of the batch written (their outputs are then replayed, never recomputed, by
//! the engine), and the repository declares `atomic_batch_write: false`.
//!
//! Requires MongoDB 8.0 or later (the `bulkWrite` command).
//!
//! # Storage layout
//! A state document holds `_id` (string), `content` (binary, or null before the first
//! content), `internal` (binary: progress and last results, versioned protobuf),
//! `version` (int64), `created_at` and `updated_at` (int64 microseconds since the Unix
//! epoch: BSON dates keep only milliseconds). The collection is created on start with
//! an index on `updated_at` (to find idle states).
//!
//! A row document holds every column under its name plus `_id`: the key column's value,
//! or for a composite key the JSON array text of the key values in key order
//! (`["eu",42]`; bytes as hex, timestamps as microseconds), so that every lookup stays
//! on the `_id` index. Column types map
//! to BSON boolean, int64, double, string, binary, int64 microseconds (timestamps) and
//! string (JSON, as its text, so that it round-trips exactly).

mod error;
mod state;
mod store;
mod upsert;

pub use state::MongoStateRepository;
pub use store::{DEFAULT_DATABASE, MongoStore};
pub use upsert::MongoUpsertRepository;

/// Default largest state (content plus internal bytes): 15 MiB, under MongoDB's 16 MiB
/// document limit with room for the other fields.
pub const DEFAULT_MAX_STATE_SIZE: usize = 15 * 1024 * 1024;

/// Documents per `find` or `bulkWrite` round trip.
pub const MAX_BATCH_SIZE: usize = 1_000;

flows_core::impl_backend!(
    MongoStore,
    schemes: ["mongodb", "mongodb+srv"],
    states: MongoStateRepository,
    rows: MongoUpsertRepository,
);
