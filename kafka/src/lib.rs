//! The flows engine on Kafka, built on `rdkafka` and `tokio` and generic over the state
//! store.
//!
//! This crate is being built up in layers; present today:
//! - [`KafkaConfig`]: brokers, group, batching, and the tuned librdkafka defaults the
//!   engine ships (manual commits, idempotent producer, large fetches and batches);
//! - [`OutputProducer`]: publishes encoded outputs and awaits every acknowledgement, the
//!   step that must complete before input offsets are committed;
//! - [`EmbeddedKafka`]: librdkafka's in-process mock cluster, for running pipelines and
//!   tests without servers.

mod config;
mod embedded;
mod error;
mod producer;

pub use config::{BatchConfig, KafkaConfig};
pub use embedded::EmbeddedKafka;
pub use error::EngineError;
pub use producer::OutputProducer;
pub use rdkafka;
