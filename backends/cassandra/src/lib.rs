//! Cassandra and ScyllaDB state and upsert repositories for flows, on the `scylla`
//! driver.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_cassandra::{CassandraStateRepository, CassandraStore};
//! // Contact points, keyspace, replication of the keyspace if it is created.
//! let store = CassandraStore::connect(
//!     "cassandra://app:secret@cass1:9042,cass2:9042/flows?dc=dc1:3&dc=dc2:3&local_dc=dc1",
//! )
//! .await?;
//! let states = CassandraStateRepository::new(store, "word_count_state").await?;
//! # Ok(()) }
//! ```
//!
//! # URL
//! `cassandra://[user:password@]host[:port][,host[:port]...][/keyspace][?options]`;
//! the port defaults to 9042 and the keyspace to `flows`. The keyspace is created if
//! missing (`CREATE KEYSPACE IF NOT EXISTS`; an existing keyspace is left as it is):
//! - `replication_factor=N` alone: `SimpleStrategy` with `N` replicas (default 1, for
//!   development; use 3 in production);
//! - `dc=NAME` or `dc=NAME:N`, repeated: `NetworkTopologyStrategy` with `N` (or
//!   `replication_factor`) replicas in each named data center;
//! - `local_dc=NAME`: the data center whose nodes the driver prefers;
//! - `fencing=lwt|timestamps`: the [`Fencing`] of state repositories (default `lwt`);
//! - `await_schema_agreement=false`: do not wait for all nodes to agree on the schema
//!   after `CREATE` statements. Keep the default (`true`) on a real cluster, where a
//!   statement prepared on a node that has not seen the new table yet fails; turn it off
//!   only for servers without the `system.peers` schema versions the wait polls (the
//!   in-memory kassandra used by this crate's tests).
//!
//! # Storage layout
//! A state table has columns `id text PRIMARY KEY` (the persistence id), `version bigint`
//! and `state blob`: format byte 1, `created_at` and `updated_at` (i64 big-endian
//! microseconds since the Unix epoch), a content flag byte and, if set, the content
//! length (u64 big-endian) and bytes, then the internal blob (progress and last results,
//! versioned protobuf). Everything but the version is one cell so that last-write-wins
//! can never mix the columns of two writes (see below).
//!
//! An upsert table gets one column per schema column (names lower case: CQL folds
//! unquoted names) and every primary key column in a compound partition key, `PRIMARY
//! KEY ((tenant, id))`: rows are only ever read and written by full key, so every row
//! is its own partition, spread evenly over the ring, and lookups stay token-aware. (A
//! partition + clustering key would group a tenant's rows into one partition, which
//! only pays off for range scans flows never does.) Types: `boolean`, `bigint`,
//! `double`, `text`, `blob`, timestamps as `bigint` microseconds (CQL `timestamp` keeps
//! milliseconds), JSON as `text`. Cassandra cannot store an empty partition key: with a
//! one-column key, an empty text or blob key is rejected with a typed
//! [`RowError`](flows_core::RowError).
//!
//! # Reads and writes
//! Every statement but the `CREATE ... IF NOT EXISTS` of start-up is prepared once per
//! repository, so the driver routes each to a replica of its key (token-aware). Reads are one `SELECT ... WHERE id = ?` per
//! distinct key, [`MAX_BATCH_SIZE`] in flight, never `IN` (which makes one coordinator fan
//! out to every partition and wait for the slowest). Writes are one statement per
//! state or row, [`MAX_BATCH_SIZE`] in flight; nothing is atomic across keys, so every
//! repository declares `atomic_batch_write: false`.
//!
//! A row upsert binds every column: a null is written as a cell tombstone (purged after
//! the table's `gc_grace_seconds`), which is what makes an upsert replace the whole
//! row. Row writes carry client-side timestamps that never go backwards within one
//! process, so a delete and a later upsert of the same key keep their order whichever
//! coordinators handle them; between processes, last-write-wins follows their clocks.
//!
//! # Testing
//! `tests/` runs the conformance suite against kassandra, an in-memory imitation of a
//! CQL server started inside the test process, or against a real cluster when
//! `FLOWS_TEST_CASSANDRA_URL` is set. kassandra ignores lightweight transactions, write
//! timestamps, null bindings and `IN`; the cases that need them are ignored as
//! "real-server-only" and run with
//! `FLOWS_TEST_CASSANDRA_URL=cassandra://127.0.0.1:9042/flows_test cargo test -p
//! flows-cassandra -- --include-ignored`.
//!
//! # Fencing
//! [`Fencing::LightweightTransactions`] (the default) makes every state write a Paxos
//! round: `INSERT ... IF NOT EXISTS` for a new state, `UPDATE ... IF version = ?`
//! otherwise, `[applied]` read back. A stale write is a
//! [`Conflict`](flows_core::RepositoryError::Conflict), as on every other backend
//! (`conditional_write: true`); in a batch, conflicting states are untouched and the
//! others written. The cost is four round trips between coordinator and replicas per
//! write instead of one, at the serial consistency (the driver's default
//! `LOCAL_SERIAL`: set `SERIAL` in the session's execution profile if ownership of a
//! key can move between data centers), plus retries on contended keys. Choose it
//! unless write latency or throughput rules it out.
//!
//! [`Fencing::WriteTimestamps`] writes plainly (one round trip, no Paxos) with the
//! write timestamp [`write_timestamp`] derives from the new version and the time since
//! the state that was read was written, so that Cassandra's last-write-wins keeps the
//! right state. It declares `conditional_write: false` and
//! `versioned_last_write_wins: true`, and never reports a conflict: a stale write
//! succeeds and simply never becomes visible. Exactly:
//! - a write of version `v` never becomes visible over a state of a higher version,
//!   whichever reaches the replicas first: a stale instance that read version `n`
//!   loses to the new owner as soon as that one has written `n + 2`;
//! - two writers that read the same version `n` and both write `n + 1` (the stale
//!   instance and the new owner, each reading before the other wrote): the write made
//!   first by the wall clock wins, the same one a lightweight transaction would have
//!   let through; the other is silently lost instead of conflicting, so its writer
//!   (it is not told) carries on from a state that was never stored. The flows engine
//!   reads states afresh for every batch, so the loser's next batch starts from the
//!   stored state; its outputs for the lost batch were published all the same. "First"
//!   is measured by the writers' clocks, relative to the read state's `updated_at`:
//!   clock skew between instances larger than the gap between the two writes can pick
//!   the later one;
//! - two writers that both create a state (both read it absent) write the same
//!   timestamp; Cassandra then keeps the larger `state` cell: one whole write wins, not
//!   necessarily the first;
//! - a write claiming a version higher than stored (which flows never makes) wins;
//! - a table must stay in one mode: lightweight transactions and plain writes without
//!   a timestamp use wall-clock microseconds (about 2^50), far above derived
//!   timestamps, so timestamped writes to a table once written with LWT would not
//!   become visible until version 2^27. Versions above [`MAX_TIMESTAMPED_VERSION`]
//!   (2^40 - 1) are refused.
//!
//! Choose write timestamps when writes must be cheap and something else already keeps
//! two instances from processing the same key at once (Kafka's cooperative rebalancing
//! with prompt revocation, transactional producers that fence zombies' outputs), so
//! that the rare same-version race costs at most one batch of a zombie's work.

mod error;
pub mod fencing;
mod state;
mod store;
mod upsert;

pub use fencing::{Fencing, MAX_TIMESTAMPED_VERSION, write_timestamp};
pub use state::CassandraStateRepository;
pub use store::{CassandraConfig, CassandraStore, DEFAULT_KEYSPACE, DEFAULT_PORT, Replication};
pub use upsert::CassandraUpsertRepository;

/// Default largest state (content plus internal bytes): 8 MiB, under Cassandra's and
/// ScyllaDB's default largest mutation (half of a 32 MiB commit log segment) with room
/// for the other cells.
pub const DEFAULT_MAX_STATE_SIZE: usize = 8 * 1024 * 1024;

/// Statements in flight at once for one `get_all`, `upsert_all` or row batch; also
/// declared as the batch size.
pub const MAX_BATCH_SIZE: usize = 64;

flows_core::impl_backend!(
    CassandraStore,
    schemes: ["cassandra"],
    states: CassandraStateRepository,
    rows: CassandraUpsertRepository,
);
