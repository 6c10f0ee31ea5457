//! Engine configuration: brokers, consumer group, batching, and tuned client settings.

use std::time::Duration;

/// How input is cut into batches. Per partition, a batch closes when it holds
/// `max_messages` messages or `max_delay` has passed since its first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most messages in one batch (default 1,000: one `get_all`/`upsert_all` of that
    /// many states is ~20× cheaper per state than single reads and writes on PostgreSQL).
    pub max_messages: usize,
    /// Longest wait for a batch to fill (default 50 ms: bounds the latency added).
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_messages: 1_000,
            max_delay: Duration::from_millis(50),
        }
    }
}

/// Where and how the engine talks to Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group id; one group per pipeline.
    pub group_id: String,
    /// Batching of input.
    pub batch: BatchConfig,
    /// Extra librdkafka consumer properties, applied after the defaults.
    pub consumer_overrides: Vec<(String, String)>,
    /// Extra librdkafka producer properties, applied after the defaults.
    pub producer_overrides: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A configuration for `brokers` and consumer group `group_id` with default batching.
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            batch: BatchConfig::default(),
            consumer_overrides: Vec::new(),
            producer_overrides: Vec::new(),
        }
    }

    /// Sets a librdkafka consumer property (e.g. `session.timeout.ms`).
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_overrides.push((key.into(), value.into()));
        self
    }

    /// Sets a librdkafka producer property (e.g. `compression.type`).
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_overrides.push((key.into(), value.into()));
        self
    }

    /// Consumer properties: manual commits only after outputs are acknowledged and state
    /// is durable (so `enable.auto.commit` and `enable.auto.offset.store` are off),
    /// read-committed isolation, cooperative rebalancing so unaffected partitions keep
    /// working, and fetch sizes that keep the consumer fed in large batches.
    pub fn consumer_properties(&self) -> Vec<(String, String)> {
        let defaults = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("group.id", self.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("fetch.min.bytes", "1"),
            ("fetch.wait.max.ms", "100"),
            ("queued.min.messages", "20000"),
            ("queued.max.messages.kbytes", "65536"),
        ];
        merge(&defaults, &self.consumer_overrides)
    }

    /// Producer properties: idempotent (no duplicates from internal retries, order kept
    /// per partition), `acks=all`, and batching (`linger.ms`, `batch.size`) tuned for
    /// throughput; the engine awaits every acknowledgement before committing.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let defaults = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("batch.size", "1000000"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "200000"),
            ("queue.buffering.max.kbytes", "131072"),
            ("compression.type", "lz4"),
            ("message.timeout.ms", "300000"),
        ];
        merge(&defaults, &self.producer_overrides)
    }
}

fn merge(defaults: &[(&str, &str)], overrides: &[(String, String)]) -> Vec<(String, String)> {
    let mut properties: Vec<(String, String)> = defaults
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (key, value) in overrides {
        match properties.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.clone(),
            None => properties.push((key.clone(), value.clone())),
        }
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(properties: &'a [(String, String)], key: &str) -> Option<&'a str> {
        properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn offsets_are_never_committed_automatically() {
        let config =
            KafkaConfig::new("b:9092", "g").consumer_property("enable.auto.commit", "true");
        let properties = config.consumer_properties();
        // An override is honoured (the user asked), but the default is manual.
        assert_eq!(get(&properties, "enable.auto.commit"), Some("true"));
        let defaults = KafkaConfig::new("b:9092", "g").consumer_properties();
        assert_eq!(get(&defaults, "enable.auto.commit"), Some("false"));
        assert_eq!(get(&defaults, "enable.auto.offset.store"), Some("false"));
        assert_eq!(get(&defaults, "group.id"), Some("g"));
    }

    #[test]
    fn producer_is_idempotent_and_overrides_replace_defaults() {
        let config = KafkaConfig::new("b:9092", "g")
            .producer_property("linger.ms", "20")
            .producer_property("client.id", "worker-1");
        let properties = config.producer_properties();
        assert_eq!(get(&properties, "enable.idempotence"), Some("true"));
        assert_eq!(get(&properties, "linger.ms"), Some("20"));
        assert_eq!(get(&properties, "client.id"), Some("worker-1"));
        assert_eq!(
            properties.iter().filter(|(k, _)| k == "linger.ms").count(),
            1
        );
    }
}
