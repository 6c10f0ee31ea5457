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
    /// A message could not be processed and the error policy stops the pipeline.
    #[error(transparent)]
    Message(Box<dyn std::error::Error + Send + Sync>),
    /// An engine thread or task ended unexpectedly.
    #[error("engine failure: {0}")]
    Internal(String),
    /// The engine was configured wrongly.
    #[error("invalid configuration: {0}")]
    Configuration(String),
}
