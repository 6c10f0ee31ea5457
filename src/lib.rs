//! **flows**: declarative, functional dataflow on Kafka with pluggable state storage.
//!
//! This facade is the one crate an application depends on: `use flows::prelude::*;`
//! brings what a pipeline is written with. The core model ([`Message`], [`Topic`],
//! [`Format`]s, [`State`], the repository traits, function types) is re-exported here,
//! and, behind feature flags, the engine and the backends:
//!
//! | feature | module | what |
//! |---|---|---|
//! | *(always)* | [`memory`] | in-memory stores (tests, demos) |
//! | `sqlite` *(default)* | [`sqlite`] | SQLite, embedded |
//! | `postgres` | [`postgres`] | PostgreSQL, the reference backend |
//! | `mongodb`, `dynamodb`, `cassandra` | [`mongodb`], [`dynamodb`], [`cassandra`] | the other backends |
//! | `kafka` *(default)* | [`kafka`], [`testing`] | the engine on Kafka (rdkafka + tokio); the test driver |
//! | `http` *(default)* | [`http`] | the worker's HTTP face: health probes, metrics, topology, ingest routes |
//! | *(always)*; `otel` | [`telemetry`] | logs in one call; with `otel`, spans exported over OTLP |
//!
//! [`Store::connect`] (and [`open_state_store`], [`open_upsert_repository`]) pick a
//! backend from a URL scheme, so one program runs against any store by configuration
//! alone. Writing a store of your own: [`backend`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flows::RepositoryError> {
//! use flows::{PersistenceId, SingleStateRepository};
//!
//! let store = flows::Store::connect("memory://").await?;
//! let counts = store.state_table("word_counts").await?;
//! let id = PersistenceId::new("fox").expect("valid id");
//! let fresh = counts.get(&id).await?;
//! let written = counts.upsert(&fresh.with_content(b"1".to_vec())).await?;
//! assert_eq!(written.version, 1);
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

use std::sync::Arc;

use flows_core::backend::Backend;

pub use flows_core::{
    BoxError, Bytes, Capabilities, Column, ColumnType, ColumnValue, EncodedRecord, Format,
    FormatError, FunctionError, Header, Headers, I64BigEndian, InvalidName, InvalidPersistenceId,
    Json, LastResults, MemoryStateRepository, MemoryUpsertRepository, Message, Nullable,
    PersistenceId, PrimaryKey, ProcessError, Progress, Protobuf, RawMessage, RawState,
    ReadStateError, Record, RepositoryError, Row, RowChange, RowError, SingleStateRepository,
    State, StateCodecError, StateReader, TableName, TableSchema, Topic, TopicPartition, Unit,
    UpsertRepository, Utf8, Value,
};
pub use flows_core::{
    backend, cache, format, function, id, memory, message, repository, row, state, topic,
};

/// What pipelines are written with: `use flows::prelude::*;`.
pub mod prelude {
    pub use flows_core::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
    pub use flows_core::{
        Bytes, FunctionError, Json, Message, Nullable, PersistenceId, Protobuf, Record, Row,
        RowChange, SingleStateRepository, StateReader, Topic, UpsertRepository, Utf8,
    };

    #[cfg(feature = "kafka")]
    #[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
    pub use flows_kafka::{Engine, ErrorPolicy, Join, KafkaConfig, Pipeline, RunningPipeline};

    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub use flows_http::{HttpServer, IngestRoute};

    pub use crate::Store;
}

#[cfg(feature = "cassandra")]
#[cfg_attr(docsrs, doc(cfg(feature = "cassandra")))]
#[doc(inline)]
pub use flows_cassandra as cassandra;

#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
#[doc(inline)]
pub use flows_dynamodb as dynamodb;

#[cfg(feature = "mongodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "mongodb")))]
#[doc(inline)]
pub use flows_mongodb as mongodb;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use flows_postgres as postgres;

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[doc(inline)]
pub use flows_sqlite as sqlite;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
#[doc(inline)]
pub use flows_kafka as kafka;

/// A deterministic, broker-less driver for your pipelines, with crash injection.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use flows_kafka::testing;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[doc(inline)]
pub use flows_http as http;

pub mod telemetry;

/// Every URL scheme flows knows, with the feature that brings its backend: the error for
/// a scheme whose feature is off names it.
const KNOWN_SCHEMES: [(&str, &str); 8] = [
    ("memory", "(none)"),
    ("sqlite", "sqlite"),
    ("postgres", "postgres"),
    ("postgresql", "postgres"),
    ("mongodb", "mongodb"),
    ("mongodb+srv", "mongodb"),
    ("dynamodb", "dynamodb"),
    ("cassandra", "cassandra"),
];

fn unknown_scheme(scheme: &str) -> RepositoryError {
    let message = match KNOWN_SCHEMES.iter().find(|(known, _)| *known == scheme) {
        Some((_, feature)) => format!("{scheme}:// URLs need the `{feature}` feature of flows"),
        None => format!(
            "unsupported store URL scheme {scheme:?} (expected memory, sqlite, postgres, \
             mongodb, dynamodb or cassandra)"
        ),
    };
    RepositoryError::Configuration(message)
}

/// Declares the backends, each behind its feature: the one place a new backend is added.
macro_rules! backends {
    ($($(#[$cfg:meta])* $variant:ident($backend:ty)),* $(,)?) => {
        /// The backend a [`Store`] is connected to.
        #[derive(Clone)]
        enum Connection {
            $($(#[$cfg])* $variant($backend),)*
        }

        impl Store {
            /// Connects to the store `url` names; the scheme picks the backend:
            ///
            /// - `memory://` — in-memory (every table new and empty, nothing persists);
            /// - `sqlite://path/to/file.db`, `sqlite::memory:` — SQLite (feature `sqlite`);
            /// - `postgres://...`, `postgresql://...` — PostgreSQL (feature `postgres`);
            /// - `mongodb://...`, `mongodb+srv://...` — MongoDB, database from the path
            ///   (feature `mongodb`);
            /// - `dynamodb://` (the AWS configuration chain) or
            ///   `dynamodb://host:port?region=…&tls=false` (an explicit endpoint) —
            ///   DynamoDB (feature `dynamodb`);
            /// - `cassandra://host1:9042,host2/keyspace?replication_factor=3&fencing=lwt|timestamps`
            ///   — Cassandra / ScyllaDB (feature `cassandra`).
            ///
            /// A scheme whose feature is not enabled is a
            /// [`RepositoryError::Configuration`] naming the feature.
            pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
                let scheme = url.split(':').next().unwrap_or_default();
                $(
                    $(#[$cfg])*
                    if <$backend as Backend>::SCHEMES.contains(&scheme) {
                        let connection = <$backend as Backend>::connect(url).await?;
                        return Ok(Store(Connection::$variant(connection)));
                    }
                )*
                Err(unknown_scheme(scheme))
            }

            /// Opens the state table `table`, creating it if missing.
            pub async fn state_table(
                &self,
                table: &str,
            ) -> Result<Arc<dyn SingleStateRepository>, RepositoryError> {
                match &self.0 {
                    $($(#[$cfg])* Connection::$variant(backend) => backend.state_table(table).await,)*
                }
            }

            /// Opens the table of `T` (named by `T::schema()`), creating it if missing.
            pub async fn row_table<T: Row>(
                &self,
            ) -> Result<Arc<dyn UpsertRepository<T>>, RepositoryError> {
                match &self.0 {
                    $($(#[$cfg])* Connection::$variant(backend) => backend.row_table::<T>().await,)*
                }
            }
        }
    };
}

backends! {
    Memory(flows_core::memory::MemoryBackend),
    #[cfg(feature = "sqlite")]
    Sqlite(flows_sqlite::SqliteStore),
    #[cfg(feature = "postgres")]
    Postgres(flows_postgres::PostgresStore),
    #[cfg(feature = "mongodb")]
    MongoDb(flows_mongodb::MongoStore),
    #[cfg(feature = "dynamodb")]
    DynamoDb(flows_dynamodb::DynamoDbStore),
    #[cfg(feature = "cassandra")]
    Cassandra(flows_cassandra::CassandraStore),
}

/// A connection to a store of any backend, chosen by URL ([`Store::connect`]): state
/// tables and row tables open on the one connection. Cheap to clone.
#[derive(Clone)]
pub struct Store(Connection);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Connections hold credentials; the kind is enough.
        f.write_str("Store")
    }
}

/// Opens the state table `table` in the store named by `url` ([`Store::connect`], then
/// [`Store::state_table`]).
pub async fn open_state_store(
    url: &str,
    table: &str,
) -> Result<Arc<dyn SingleStateRepository>, RepositoryError> {
    Store::connect(url).await?.state_table(table).await
}

/// Opens the table of row type `T` (named by `T::schema()`, created if missing) in the
/// store named by `url` ([`Store::connect`], then [`Store::row_table`]).
pub async fn open_upsert_repository<T: Row>(
    url: &str,
) -> Result<Arc<dyn UpsertRepository<T>>, RepositoryError> {
    Store::connect(url).await?.row_table::<T>().await
}
