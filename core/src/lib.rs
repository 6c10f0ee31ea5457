//! The core model of **flows**: everything that does not talk to Kafka or to a database.
//!
//! | module | what it holds |
//! |---|---|
//! | [`message`] | [`Message`] (what a function receives), [`Record`] (what it emits), [`Headers`] |
//! | [`format`](mod@format) | [`Format`]: typed encode/decode — bytes, UTF-8, JSON, protobuf |
//! | [`topic`] | [`Topic`]: a name plus a key format and a value format |
//! | [`id`] | [`PersistenceId`] (validated state keys) and [`TableName`] |
//! | [`state`] | [`State`]: content, offset progress and last results, versioned |
//! | [`repository`] | the [`SingleStateRepository`] trait, [`Capabilities`], [`RepositoryError`] |
//! | [`row`] | [`Row`] and the [`UpsertRepository`] trait for materialisation |
//! | [`cache`] | [`StateCache`](cache::StateCache): recently written states, as a layer over any store |
//! | [`memory`] | in-memory stores: the reference model for tests and demos |
//! | [`function`] | stateless and stateful function types and the replay-aware [`fold`](mod@function::fold) |
//!
//! Backends (`flows-postgres`, `flows-sqlite`, ...) implement the traits; the Kafka
//! engine drives the functions. Both depend on this crate and nothing here depends on
//! them, so a new backend or engine never changes the core.

// `#[derive(Row)]` names this crate `::flows_core`, in its own tests too.
extern crate self as flows_core;

pub mod backend;
pub mod cache;
pub mod format;
pub mod function;
pub mod id;
pub mod memory;
pub mod message;
pub mod repository;
pub mod row;
pub mod state;
pub mod topic;

/// `#[derive(Row)]`: a struct's schema and conversions from its fields (see
/// [`flows_macros`]).
pub use flows_macros::Row;
pub use format::{Bytes, Format, FormatError, I64BigEndian, Json, Nullable, Protobuf, Unit, Utf8};
pub use function::{FunctionError, ProcessError};
pub use id::{InvalidName, InvalidPersistenceId, PersistenceId, TableName};
pub use memory::{MemoryStateRepository, MemoryUpsertRepository};
pub use message::{Header, Headers, Message, RawMessage, Record, TopicPartition};
pub use repository::{BoxError, Capabilities, RepositoryError, SingleStateRepository};
pub use row::{
    Column, ColumnType, ColumnValue, PrimaryKey, Row, RowChange, RowError, TableSchema,
    UpsertRepository, Value,
};
pub use state::{
    EncodedRecord, LastResults, Progress, RawState, ReadStateError, State, StateCodecError,
    StateReader,
};
pub use topic::Topic;
