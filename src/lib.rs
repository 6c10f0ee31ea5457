//! **flows**: declarative, functional dataflow on Kafka with pluggable state storage.
//!
//! This facade is the one crate an application depends on. It re-exports the core model
//! ([`Message`], [`Topic`], [`Format`]s, [`State`], the repository traits, function
//! types) and, behind feature flags, the backends:
//!
//! | feature | module | store |
//! |---|---|---|
//! | *(always)* | [`memory`] | in-memory (tests, demos) |
//! | `sqlite` *(default)* | [`sqlite`] | SQLite, embedded |
//! | `postgres` | [`postgres`] | PostgreSQL, the reference backend |
//! | `kafka` *(default)* | [`kafka`] | the engine on Kafka (rdkafka + tokio) |
//! | `http` *(default)* | [`http`] | the worker's HTTP face: health probes, metrics, topology, ingest routes |
//! | *(always)*; `otel` | [`telemetry`] | logs in one call; with `otel`, spans exported over OTLP |
//!
//! [`open_state_store`] and [`open_upsert_repository`] pick a backend from a URL
//! scheme, so one program runs against any store by configuration alone.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flows::RepositoryError> {
//! use flows::{PersistenceId, SingleStateRepository, State};
//!
//! let store = flows::open_state_store("memory://", "word_counts").await?;
//! let id = PersistenceId::new("fox").expect("valid id");
//! let fresh = store.get(&id).await?;
//! let written = store.upsert(&fresh.with_content(b"1".to_vec())).await?;
//! assert_eq!(written.version, 1);
//! # Ok(()) }
//! ```

pub use flows_core::*;

#[cfg(feature = "cassandra")]
#[doc(inline)]
pub use flows_cassandra as cassandra;

#[cfg(feature = "dynamodb")]
#[doc(inline)]
pub use flows_dynamodb as dynamodb;

#[cfg(feature = "mongodb")]
#[doc(inline)]
pub use flows_mongodb as mongodb;

#[cfg(feature = "postgres")]
#[doc(inline)]
pub use flows_postgres as postgres;

#[cfg(feature = "sqlite")]
#[doc(inline)]
pub use flows_sqlite as sqlite;

#[cfg(feature = "kafka")]
#[doc(inline)]
pub use flows_kafka as kafka;

/// A deterministic, broker-less driver for your pipelines, with crash injection (see
/// [`kafka::testing`]).
#[cfg(feature = "kafka")]
pub use flows_kafka::testing;

#[cfg(feature = "http")]
#[doc(inline)]
pub use flows_http as http;

pub mod telemetry;

use std::sync::Arc;

/// The backend a store URL names, by its scheme.
enum Backend {
    Memory,
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
    #[cfg(feature = "mongodb")]
    MongoDb,
    #[cfg(feature = "dynamodb")]
    DynamoDb,
    #[cfg(feature = "cassandra")]
    Cassandra,
}

/// The error for a URL scheme whose backend feature is off.
#[allow(dead_code)] // unused when every backend feature is on
fn feature_off(scheme: &str, feature: &str) -> RepositoryError {
    RepositoryError::Configuration(format!(
        "{scheme}:// URLs need the `{feature}` feature of flows"
    ))
}

impl Backend {
    fn of(url: &str) -> Result<Self, RepositoryError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "memory" => Ok(Self::Memory),
            #[cfg(feature = "sqlite")]
            "sqlite" => Ok(Self::Sqlite),
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Ok(Self::Postgres),
            #[cfg(feature = "mongodb")]
            "mongodb" | "mongodb+srv" => Ok(Self::MongoDb),
            #[cfg(feature = "dynamodb")]
            "dynamodb" => Ok(Self::DynamoDb),
            #[cfg(feature = "cassandra")]
            "cassandra" => Ok(Self::Cassandra),
            #[cfg(not(feature = "sqlite"))]
            "sqlite" => Err(feature_off("sqlite", "sqlite")),
            #[cfg(not(feature = "postgres"))]
            "postgres" | "postgresql" => Err(feature_off("postgres", "postgres")),
            #[cfg(not(feature = "mongodb"))]
            "mongodb" | "mongodb+srv" => Err(feature_off("mongodb", "mongodb")),
            #[cfg(not(feature = "dynamodb"))]
            "dynamodb" => Err(feature_off("dynamodb", "dynamodb")),
            #[cfg(not(feature = "cassandra"))]
            "cassandra" => Err(feature_off("cassandra", "cassandra")),
            other => Err(RepositoryError::Configuration(format!(
                "unsupported store URL scheme {other:?} (expected memory, sqlite, postgres, \
                 mongodb, dynamodb or cassandra)"
            ))),
        }
    }
}

/// Opens the state table `table` in the store named by `url`; the scheme picks the
/// backend:
///
/// - `memory://` — a new in-memory store (nothing persists);
/// - `sqlite://path/to/file.db`, `sqlite::memory:` — SQLite (feature `sqlite`);
/// - `postgres://...`, `postgresql://...` — PostgreSQL (feature `postgres`);
/// - `mongodb://...`, `mongodb+srv://...` — MongoDB, database from the path (feature
///   `mongodb`);
/// - `dynamodb://` (the AWS configuration chain) or `dynamodb://host:port?region=…&tls=false`
///   (an explicit endpoint) — DynamoDB (feature `dynamodb`);
/// - `cassandra://host1:9042,host2/keyspace?replication_factor=3&fencing=lwt|timestamps`
///   — Cassandra / ScyllaDB (feature `cassandra`).
///
/// A scheme whose feature is not enabled is a [`RepositoryError::Configuration`] naming
/// the feature.
pub async fn open_state_store(
    url: &str,
    table: &str,
) -> Result<Arc<dyn SingleStateRepository>, RepositoryError> {
    match Backend::of(url)? {
        Backend::Memory => Ok(Arc::new(MemoryStateRepository::new())),
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let store = flows_sqlite::SqliteStore::connect(url).await?;
            Ok(Arc::new(
                flows_sqlite::SqliteStateRepository::new(store, table).await?,
            ))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let store = flows_postgres::PostgresStore::connect(url).await?;
            Ok(Arc::new(
                flows_postgres::PostgresStateRepository::new(store, table).await?,
            ))
        }
        #[cfg(feature = "mongodb")]
        Backend::MongoDb => {
            let store = flows_mongodb::MongoStore::connect(url).await?;
            Ok(Arc::new(
                flows_mongodb::MongoStateRepository::new(store, table).await?,
            ))
        }
        #[cfg(feature = "dynamodb")]
        Backend::DynamoDb => {
            let store = flows_dynamodb::DynamoDbStore::connect(url).await?;
            Ok(Arc::new(
                flows_dynamodb::DynamoDbStateRepository::new(store, table).await?,
            ))
        }
        #[cfg(feature = "cassandra")]
        Backend::Cassandra => {
            let store = flows_cassandra::CassandraStore::connect(url).await?;
            Ok(Arc::new(
                flows_cassandra::CassandraStateRepository::new(store, table).await?,
            ))
        }
    }
}

/// Opens the table of row type `T` (named by `T::schema()`, created if missing) in the
/// store named by `url`, with the schemes of [`open_state_store`].
pub async fn open_upsert_repository<T: Row>(
    url: &str,
) -> Result<Arc<dyn UpsertRepository<T>>, RepositoryError> {
    match Backend::of(url)? {
        Backend::Memory => Ok(Arc::new(MemoryUpsertRepository::<T>::new())),
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let store = flows_sqlite::SqliteStore::connect(url).await?;
            Ok(Arc::new(
                flows_sqlite::SqliteUpsertRepository::<T>::new(store).await?,
            ))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let store = flows_postgres::PostgresStore::connect(url).await?;
            Ok(Arc::new(
                flows_postgres::PostgresUpsertRepository::<T>::new(store).await?,
            ))
        }
        #[cfg(feature = "mongodb")]
        Backend::MongoDb => {
            let store = flows_mongodb::MongoStore::connect(url).await?;
            Ok(Arc::new(
                flows_mongodb::MongoUpsertRepository::<T>::new(store).await?,
            ))
        }
        #[cfg(feature = "dynamodb")]
        Backend::DynamoDb => {
            let store = flows_dynamodb::DynamoDbStore::connect(url).await?;
            Ok(Arc::new(
                flows_dynamodb::DynamoDbUpsertRepository::<T>::new(store).await?,
            ))
        }
        #[cfg(feature = "cassandra")]
        Backend::Cassandra => {
            let store = flows_cassandra::CassandraStore::connect(url).await?;
            Ok(Arc::new(
                flows_cassandra::CassandraUpsertRepository::<T>::new(store).await?,
            ))
        }
    }
}
