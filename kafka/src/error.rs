//! Engine errors.

use flows_core::RepositoryError;
use rdkafka::error::KafkaError;

/// Why the engine stopped or an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] RepositoryError),
    /// An output was not acknowledged by the broker.
    #[error("output to {topic} was not delivered: {source}")]
    Delivery {
        /// The destination topic.
        topic: String,
        /// The broker's or client's error.
        #[source]
        source: KafkaError,
    },
    /// The engine was configured wrongly.
    #[error("invalid configuration: {0}")]
    Configuration(String),
}
