//! The flows engine on Kafka, built on `rdkafka` and `tokio` and generic over the state
//! store.
//!
//! This crate is being built up in layers; present today:
//! - [`KafkaConfig`]: brokers, group, batching, and the tuned librdkafka defaults the
//!   engine ships (manual commits, idempotent producer, large fetches and batches);
//! - [`OutputProducer`]: publishes encoded outputs and awaits every acknowledgement, the
//!   step that must complete before input offsets are committed;
//! - [`EmbeddedKafka`]: librdkafka's in-process mock cluster, for running pipelines and
//!   tests without servers;
//! - [`apply_batch`]: the store half of a stateful batch (one `get_all`, one fold per
//!   key, one `upsert_all`, conflicts re-read and re-folded), outputs in input order.

mod config;
mod embedded;
mod error;
mod producer;
mod stateful;

pub use config::{BatchConfig, KafkaConfig};
pub use embedded::EmbeddedKafka;
pub use error::EngineError;
pub use producer::OutputProducer;
pub use rdkafka;
pub use stateful::{BatchError, MAX_CONFLICT_RETRIES, apply_batch};
