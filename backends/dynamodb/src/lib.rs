//! DynamoDB state and upsert repositories for flows.
//!
//! Built on the AWS SDK for Rust. Endpoint, region and credentials come from the
//! standard AWS configuration chain; a `dynamodb://host:port` URL names an explicit
//! endpoint instead (DynamoDB Local, a VPC endpoint). Reads are strongly consistent
//! `BatchGetItem`s of up to 100 keys, so the version a write is conditioned on is the
//! latest one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_dynamodb::{DynamoDbStateRepository, DynamoDbStore, TableMode};
//! // Region and credentials from the environment, profile or instance role.
//! let store = DynamoDbStore::connect("dynamodb://?region=eu-west-1").await?;
//! let states =
//!     DynamoDbStateRepository::open(store, "word_count_state", TableMode::RequireExisting)
//!         .await?;
//! # Ok(()) }
//! ```
//!
//! # Storage layout
//! A state table has the partition key `id` (binary: the UTF-8 bytes of the persistence
//! id, stored byte for byte) and attributes `content` (binary, absent for no content),
//! `internal` (binary: progress and last results, versioned protobuf), `version`
//! (number), `created_at` and `updated_at` (numbers: microseconds since the Unix epoch,
//! UTC). Writes are conditional on `version` (`attribute_not_exists(id)` for a state
//! never written). See [`DynamoDbUpsertRepository`] for row tables. Tables are created
//! on demand with on-demand (`PAY_PER_REQUEST`) billing, or required to exist
//! ([`TableMode`]).
//!
//! # Batches and atomicity
//! DynamoDB has no transaction larger than [`MAX_BATCH_SIZE`] items (and 4 MB),
//! so no batch larger than that can be atomic, and the repositories declare
//! [`atomic_batch_write`](flows_core::Capabilities::atomic_batch_write) `false`. The
//! default [`WriteMode::Transactional`] still writes each chunk of up to 100 states as
//! one transaction (all or nothing, the stale ids named exactly);
//! [`WriteMode::ConditionalPuts`] writes state by state. Rows are written with
//! unconditional `BatchWriteItem`s of 25, which are idempotent but not atomic.
//!
//! # Limits
//! An item holds at most 400 KB, attribute names included: states are limited to
//! [`DEFAULT_MAX_STATE_SIZE`] bytes of content plus internal data and larger ones are rejected
//! with [`StateTooLarge`](flows_core::RepositoryError::StateTooLarge) before any call.
//! Table names need at least 3 characters. Throttling, server errors and connection
//! failures are [`Unavailable`](flows_core::RepositoryError::Unavailable) (transient);
//! validation errors are [`Backend`](flows_core::RepositoryError::Backend).

mod batch;
mod error;
mod state;
mod store;
mod upsert;

pub use error::DynamoDbError;
pub use state::{DynamoDbStateRepository, WriteMode};
pub use store::{DynamoDbStore, TableMode};
pub use upsert::{DynamoDbUpsertRepository, ROW_KEY_ATTRIBUTE};

/// Default largest state (content plus internal bytes), also the most DynamoDB allows:
/// its 400 KB item limit (409,600 bytes) less 4 KiB for the id (up to 1 KiB), the other
/// attributes and their names. Named as every backend names its default.
pub const DEFAULT_MAX_STATE_SIZE: usize = 400 * 1024 - 4 * 1024;

/// States per `TransactWriteItems` call (the service's limit): the batch size, named as
/// every backend names it.
pub const MAX_BATCH_SIZE: usize = 100;

flows_core::impl_backend!(
    DynamoDbStore,
    schemes: ["dynamodb"],
    states: DynamoDbStateRepository,
    rows: DynamoDbUpsertRepository,
);
