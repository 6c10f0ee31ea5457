//! The flows engine on Kafka, built on `rdkafka` and `tokio` and generic over the state
//! store.
//!
//! Declare a [`Pipeline`] from a function of `flows-core` (stateless, stateful, a
//! [`Join`], or a materialisation into an `UpsertRepository`), then run it with an
//! [`Engine`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), flows_kafka::EngineError> {
//! use flows_core::function::{PersistenceIdFn, StatefulFunction};
//! use flows_core::{Json, MemoryStateRepository, Record, Topic, Utf8};
//! use flows_kafka::{Engine, KafkaConfig, Pipeline};
//!
//! let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
//!     Topic::new("words", Utf8, Utf8),
//!     Topic::new("word-counts", Utf8, Json::<i64>::new()),
//!     PersistenceIdFn::key(),
//!     |count: Option<&i64>, word| {
//!         let count = count.copied().unwrap_or(0) + 1;
//!         Ok((count, Record::new(word.key, count)))
//!     },
//! );
//! let pipeline = Pipeline::stateful("word-count", count, MemoryStateRepository::new());
//! Engine::new(KafkaConfig::new("localhost:9092"))
//!     .run_until_signal(&[pipeline])
//!     .await
//! # }
//! ```
//!
//! # How a pipeline runs
//! One consumer per pipeline (group `{prefix}{name}`) on its own thread, one task per
//! assigned partition. Each partition is cut into batches (at most
//! [`BatchConfig::max_messages`] or [`BatchConfig::max_bytes`], at most
//! [`BatchConfig::max_delay`] of waiting), and
//! each batch goes through one cycle, strictly after the previous one of that
//! partition: *process* (for stateful pipelines one `get_all` of the states not in the
//! pipeline's cache of recently written ones, one fold per key, one `upsert_all`) →
//! *publish* every output and await every acknowledgement → mark the
//! offset after the batch committable. Partitions proceed concurrently.
//!
//! # Guarantees
//! - **G1 exactly-once state**: each message changes its state once, through crashes,
//!   restarts, rebalances and replays (offsets are recorded inside the state).
//! - **G2 at-least-once, identical outputs**: a replayed message re-emits its stored
//!   outputs byte for byte; the user function never runs twice for an applied message.
//! - **G3 per-key order**: one partition's batches run one after the other, in offset
//!   order.
//! - **G4**: an offset is committed only after its batch's state is durable and its
//!   outputs are acknowledged.
//! - **G5 rebalance safety**: revoked partitions finish (or abandon, after
//!   [`KafkaConfig::drain_timeout`]) their batch before release; a stale instance's
//!   write is rejected by the state's version check and its batch is dropped unpublished
//!   and uncommitted.
//! - **G6 no silent loss**: an unavailable store or broker is retried with
//!   [`Backoff`] (logged, counted in [`Metrics`], the partition counted as stalled
//!   while it waits); a failed message goes through the [`ErrorPolicy`] (retries, then
//!   dead-letter topic or stop). So does a message that only the store or the broker
//!   refuses: one that alone makes its state too large, one whose rows the table
//!   refuses (found by splitting the batch), one whose output the broker refuses for
//!   good. A hot key's batch is written in parts that fit the store ([`BatchOutput`]).
//!
//! Joins keep G1 and G2 across replays of their re-key step: each intermediate record
//! carries its source coordinates (see [`join`]). Stateless and materialise pipelines
//! keep no state: they are at least once (materialise with idempotent upserts).

mod acknowledgement;
mod config;
mod consumer;
mod delivery;
mod embedded;
mod engine;
mod enqueue;
mod error;
mod feed;
mod fetch_queue;
pub mod join;
mod metrics;
mod pipeline;
pub mod policy;
mod producer;
mod stateful;
pub mod testing;
mod trace_context;
mod worker;

pub use config::{Backoff, BatchConfig, KafkaConfig, is_secret_property};
pub use embedded::EmbeddedKafka;
pub use engine::{
    Engine, PipelineHandle, RunningPipeline, select, select_from_env, shutdown_signal,
};
pub use error::EngineError;
pub use flows_core::cache::StateCacheLimits;
pub use join::{Join, intermediate_record};
pub use metrics::{HistogramSnapshot, Histograms, Metrics, MetricsSnapshot, PartitionStats};
pub use pipeline::{MessageFailed, Pipeline};
pub use policy::{ErrorPolicy, Fallback, dead_letter_record};
pub use producer::{DeliveryFailures, OutputProducer, kafka_headers};
pub use rdkafka;
pub use stateful::{BatchError, BatchOutput, MAX_CONFLICT_RETRIES, apply_batch};
#[cfg(feature = "otel")]
pub use trace_context::otel::{remote_span_context, traceparent};
