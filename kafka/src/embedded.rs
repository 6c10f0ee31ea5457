//! An in-process Kafka: librdkafka's mock cluster, for demos and tests with no servers.
//!
//! It speaks the Kafka protocol on loopback ports, so the engine (and external clients
//! such as kcat) use it exactly like a real cluster while the process lives. It supports
//! fault injection, which the engine's tests use. Nothing survives the process.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::error::EngineError;

/// A running in-process Kafka cluster.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKafka")
            .field("bootstrap_servers", &self.cluster.bootstrap_servers())
            .finish()
    }
}

impl EmbeddedKafka {
    /// Starts a cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> Result<Self, EngineError> {
        Ok(Self {
            cluster: MockCluster::new(brokers)?,
        })
    }

    /// The `bootstrap.servers` string of the cluster.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic. (The mock cluster does not serve the admin API's CreateTopics.)
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: i32,
    ) -> Result<(), EngineError> {
        Ok(self.cluster.create_topic(name, partitions, replication)?)
    }

    /// The underlying mock cluster, for fault injection (request errors, broker down/up,
    /// round-trip times).
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
