//! Engine configuration: brokers, consumer group, batching, and tuned client settings.

use std::time::Duration;

/// How input is cut into batches. Per partition, a batch closes when it holds
/// `max_messages` messages or `max_bytes` of keys and values, or when `max_delay` has
/// passed since its first message.
///
/// Larger batches mean fewer store round trips and acknowledgement waits per message
/// (see the README's performance table) and more memory: each partition in flight holds
/// one batch, its states and its outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most messages in one batch (default 10,000).
    pub max_messages: usize,
    /// Most key and value bytes in one batch (default 4 MiB), so that large messages
    /// make smaller batches instead of large memory.
    pub max_bytes: usize,
    /// Longest wait for a batch to fill (default 50 ms: bounds the latency added).
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 4 * 1024 * 1024,
            max_delay: Duration::from_millis(50),
        }
    }
}

impl BatchConfig {
    /// The throughput-oriented defaults ([`Default`]): a batch waits up to 50 ms to
    /// fill, so under light load every message waits for the ones after it.
    pub fn throughput() -> Self {
        Self::default()
    }

    /// Latency first: a batch never waits to fill (`max_delay` zero), so a message
    /// arriving at an idle partition is processed at once; the producer does not linger
    /// and the consumer's fetches wait at most 5 ms for data (see
    /// [`KafkaConfig::producer_properties`] and [`KafkaConfig::consumer_properties`]). Under load, batches
    /// still grow to what arrived while the previous one was processed (up to the same
    /// `max_messages` and `max_bytes`): throughput stays close to the defaults', and
    /// what it costs is more store round trips and acknowledgement waits per message
    /// when input trickles in (docs/performance.md measures both).
    pub fn low_latency() -> Self {
        Self {
            max_delay: Duration::ZERO,
            ..Self::default()
        }
    }

    /// The preset named `throughput` or `low-latency` (as `FLOWS_BATCH_PRESET` names
    /// them).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "throughput" => Some(Self::throughput()),
            "low-latency" => Some(Self::low_latency()),
            _ => None,
        }
    }
}

/// Where and how the engine talks to Kafka: a builder from [`KafkaConfig::new`] (or
/// [`KafkaConfig::from_env`]), with `get_*` accessors.
///
/// ```
/// use std::time::Duration;
/// use flows_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("kafka:9092")
///     .group_prefix("prod-")
///     .batch(1_000, Duration::from_millis(10))
///     .drain_timeout(Duration::from_secs(10))
///     .producer_property("compression.type", "zstd");
/// assert_eq!(config.group_id("word-count"), "prod-word-count");
/// assert_eq!(config.get_batch().max_messages, 1_000);
/// ```
///
/// Its `Debug` output shows secret properties (see [`is_secret_property`]) as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub(crate) brokers: String,
    /// Prefix of consumer group ids: a pipeline named `n` consumes in group
    /// `{group_prefix}{n}` (default empty), so each pipeline has its own group and
    /// several deployments can share a cluster.
    pub(crate) group_prefix: String,
    /// Batching of input.
    pub(crate) batch: BatchConfig,
    /// Waits between retries of transient failures (store or broker unavailable).
    pub(crate) backoff: Backoff,
    /// Longest wait, when partitions are revoked or the engine shuts down, for in-flight
    /// batches to finish before they are abandoned (default 30 s). An abandoned batch
    /// is neither published nor committed; its messages are processed again by the next
    /// owner, replaying any stored outputs.
    pub(crate) drain_timeout: Duration,
    /// This worker's stable identity in its consumer groups (`group.instance.id`,
    /// default none): static membership. A worker restarted under the same identity
    /// within `session.timeout.ms` gets its partitions back at once, without a
    /// rebalance and without waiting for its old session to expire; the price is that
    /// a worker that leaves for good (or is not restarted) holds its partitions idle
    /// until that session timeout, and a clean shutdown does not hand them over either.
    /// Give every worker of a deployment its own identity (e.g. the pod name of a
    /// StatefulSet), and set `session.timeout.ms` to cover a restart.
    pub(crate) instance_id: Option<String>,
    /// Extra librdkafka consumer properties, applied after the defaults.
    pub(crate) consumer_overrides: Vec<(String, String)>,
    /// Extra librdkafka producer properties, applied after the defaults.
    pub(crate) producer_overrides: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A configuration for `brokers` (`bootstrap.servers`) with the tuned defaults.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_prefix: String::new(),
            batch: BatchConfig::default(),
            backoff: Backoff::default(),
            drain_timeout: Duration::from_secs(30),
            instance_id: None,
            consumer_overrides: Vec::new(),
            producer_overrides: Vec::new(),
        }
    }

    /// A configuration from the environment, or `None` when `FLOWS_BROKERS` is unset:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `FLOWS_BROKERS` | `bootstrap.servers` |
    /// | `FLOWS_GROUP_PREFIX` | consumer group prefix |
    /// | `FLOWS_INSTANCE_ID` | static group membership ([`KafkaConfig::instance_id`]) |
    /// | `FLOWS_BATCH_PRESET` | `throughput` (the default) or `low-latency` ([`BatchConfig::low_latency`]) |
    /// | `FLOWS_BATCH_MAX_MESSAGES`, `FLOWS_BATCH_MAX_BYTES`, `FLOWS_BATCH_MAX_DELAY_MS` | batching (after the preset) |
    /// | `FLOWS_CONSUMER_PROPERTIES`, `FLOWS_PRODUCER_PROPERTIES` | `key=value,key=value` librdkafka overrides |
    pub fn from_env() -> Result<Option<Self>, crate::EngineError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(brokers) = var("FLOWS_BROKERS") else {
            return Ok(None);
        };
        let mut config = Self::new(brokers.trim());
        if let Some(prefix) = var("FLOWS_GROUP_PREFIX") {
            config.group_prefix = prefix;
        }
        config.instance_id = var("FLOWS_INSTANCE_ID").map(|id| id.trim().to_owned());
        let number = |name: &str, value: String| {
            value.trim().parse::<u64>().map_err(|_| {
                crate::EngineError::Configuration(format!(
                    "{name} must be a whole number, not {value:?}"
                ))
            })
        };
        if let Some(value) = var("FLOWS_BATCH_PRESET") {
            config.batch = BatchConfig::preset(value.trim()).ok_or_else(|| {
                crate::EngineError::Configuration(format!(
                    "FLOWS_BATCH_PRESET is `{}`: expected `throughput` or `low-latency`",
                    value.trim()
                ))
            })?;
        }
        if let Some(value) = var("FLOWS_BATCH_MAX_MESSAGES") {
            config.batch.max_messages = number("FLOWS_BATCH_MAX_MESSAGES", value)?.max(1) as usize;
        }
        if let Some(value) = var("FLOWS_BATCH_MAX_BYTES") {
            config.batch.max_bytes = number("FLOWS_BATCH_MAX_BYTES", value)?.max(1) as usize;
        }
        if let Some(value) = var("FLOWS_BATCH_MAX_DELAY_MS") {
            config.batch.max_delay =
                Duration::from_millis(number("FLOWS_BATCH_MAX_DELAY_MS", value)?);
        }
        for (name, target) in [
            ("FLOWS_CONSUMER_PROPERTIES", &mut config.consumer_overrides),
            ("FLOWS_PRODUCER_PROPERTIES", &mut config.producer_overrides),
        ] {
            if let Some(list) = var(name) {
                target.extend(parse_properties(name, &list)?);
            }
        }
        Ok(Some(config))
    }

    /// Sets `bootstrap.servers`.
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// Sets the consumer group prefix: a pipeline named `n` consumes in group
    /// `{prefix}{n}` (default empty), so each pipeline has its own group and several
    /// deployments can share a cluster.
    pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// Makes this worker a static group member under `id` (`group.instance.id`, default
    /// none). A worker restarted under the same identity within `session.timeout.ms`
    /// gets its partitions back at once, without a rebalance; the price is that a
    /// worker that leaves for good holds its partitions idle until that session
    /// timeout, and a clean shutdown does not hand them over either. Give every worker
    /// of a deployment its own identity (e.g. the pod name of a StatefulSet), and set
    /// `session.timeout.ms` to cover a restart.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Sets the batching of input by message count and delay (keeping `max_bytes`).
    pub fn batch(mut self, max_messages: usize, max_delay: Duration) -> Self {
        self.batch.max_messages = max_messages.max(1);
        self.batch.max_delay = max_delay;
        self
    }

    /// Sets every batching limit.
    pub fn batch_config(mut self, batch: BatchConfig) -> Self {
        self.batch = batch;
        self
    }

    /// Sets the waits between retries of transient failures (store or broker
    /// unavailable).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the longest wait, when partitions are revoked or the engine shuts down, for
    /// in-flight batches to finish before they are abandoned (default 30 s). An
    /// abandoned batch is neither published nor committed; its messages are processed
    /// again by the next owner, replaying any stored outputs. A revoke must end within
    /// the group's rebalance timeout (`max.poll.interval.ms`), so the engine refuses a
    /// drain timeout that, with the producer's `message.timeout.ms`, could outlast it.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// `bootstrap.servers`.
    pub fn get_brokers(&self) -> &str {
        &self.brokers
    }

    /// The consumer group prefix.
    pub fn get_group_prefix(&self) -> &str {
        &self.group_prefix
    }

    /// The batching of input.
    pub fn get_batch(&self) -> &BatchConfig {
        &self.batch
    }

    /// The waits between retries of transient failures.
    pub fn get_backoff(&self) -> Backoff {
        self.backoff
    }

    /// The drain timeout.
    pub fn get_drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// The static group membership identity, if any.
    pub fn get_instance_id(&self) -> Option<&str> {
        self.instance_id.as_deref()
    }

    /// The librdkafka consumer properties set over the defaults.
    pub fn get_consumer_overrides(&self) -> &[(String, String)] {
        &self.consumer_overrides
    }

    /// The librdkafka producer properties set over the defaults.
    pub fn get_producer_overrides(&self) -> &[(String, String)] {
        &self.producer_overrides
    }

    /// The consumer group of the pipeline named `pipeline`.
    pub fn group_id(&self, pipeline: &str) -> String {
        format!("{}{}", self.group_prefix, pipeline)
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
    /// working, and a read-ahead of about one batch per partition, refilled without
    /// delay, so memory stays bounded whatever the backlog. `fetch.wait.max.ms` is twice
    /// the batch's `max_delay`, between 5 and 100 ms.
    pub fn consumer_properties(&self, group_id: &str) -> Vec<(String, String)> {
        let read_ahead = self.batch.max_messages.max(1).to_string();
        // A consumer whose batches may not wait for input should not wait for a fetch
        // either: twice the batch delay, 5 to 100 ms (100 at the default 50 ms).
        let fetch_wait = (self.batch.max_delay.as_millis() * 2)
            .clamp(5, 100)
            .to_string();
        let defaults = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("group.id", group_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("fetch.min.bytes", "1"),
            ("fetch.wait.max.ms", fetch_wait.as_str()),
            // Read-ahead per partition (each assigned partition has its own queue): one
            // batch, on top of the one its feed holds (consumer.rs). librdkafka keeps
            // fetching a partition while its queue holds fewer than
            // `queued.min.messages`, and every fetched message costs ~250 bytes of
            // bookkeeping on top of its payload, so for small messages the message
            // count, not the byte limit, is what bounds memory.
            ("queued.min.messages", read_ahead.as_str()),
            ("queued.max.messages.kbytes", "8192"),
            // A full queue postpones the partition's next fetch by this long; librdkafka's
            // default (1 s) leaves a fast worker idle for most of that second.
            ("fetch.queue.backoff.ms", "10"),
            // One fetch response adds up to this much on top of the queue, and what
            // bounds memory for small, well-compressed messages is their count (each
            // fetched message is an op of its own): 64 KiB of lz4-compressed words is
            // some 6,000 messages. With librdkafka's defaults (1 MiB per partition, 50 MiB
            // per response) a whole partition of 100,000s of messages arrived at once;
            // at 256/512 KiB a word count still held ~60 MB more of them than at 64/128
            // (the README's performance notes). A larger record batch is still returned
            // whole (the broker always sends the first one). `fetch.max.bytes` may not be
            // below `message.max.bytes`, which for a consumer only bounds its requests.
            // On a high-latency link, raise `fetch.max.bytes`: one response per round trip.
            ("max.partition.fetch.bytes", "65536"),
            // Per-partition committed offsets and lag for the metrics
            // (`PipelineHandle::partitions`): cheap at this interval.
            ("statistics.interval.ms", "5000"),
            ("fetch.max.bytes", "131072"),
            ("message.max.bytes", "131072"),
        ];
        let mut properties = merge(&defaults, &[]);
        if let Some(id) = &self.instance_id {
            properties.push(("group.instance.id".into(), id.clone()));
        }
        merge_into(&mut properties, &self.consumer_overrides);
        properties
    }

    /// Producer properties: idempotent (no duplicates from internal retries, order kept
    /// per partition), `acks=all`, and batching (`linger.ms`, `batch.size`) tuned for
    /// throughput; the engine awaits every acknowledgement before committing.
    /// `linger.ms` is 5, or the batch's `max_delay` when that is shorter: a batch that
    /// may not wait for input is not held back on its way out either.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let linger = self.batch.max_delay.as_millis().min(5).to_string();
        let defaults = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", linger.as_str()),
            ("batch.size", "1000000"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "200000"),
            ("queue.buffering.max.kbytes", "131072"),
            ("compression.type", "lz4"),
            // Every record is settled (delivered or failed) within this time. A revoke
            // waits that long at most for an abandoned batch's outputs, and it must end
            // within the group's rebalance timeout (`max.poll.interval.ms`, 300 s), or the
            // group drops the member while they can still land. A failed record is sent
            // again by the batch, so a shorter timeout loses nothing.
            ("message.timeout.ms", "120000"),
            // Java's partitioner (murmur2 of the key; keyless records spread randomly):
            // a key lands on the same partition as from Java producers and Kafka
            // Streams, so co-partitioned topics stay co-partitioned whoever writes them.
            // librdkafka's own default (CRC32) would scatter the same keys elsewhere.
            ("partitioner", "murmur2_random"),
        ];
        merge(&defaults, &self.producer_overrides)
    }
}

/// The last value among `properties` of any of `keys`, as a whole number (librdkafka's
/// later settings win).
pub(crate) fn numeric_property(properties: &[(String, String)], keys: &[&str]) -> Option<u64> {
    properties
        .iter()
        .rev()
        .find(|(key, _)| keys.contains(&key.as_str()))
        .and_then(|(_, value)| value.trim().parse::<u64>().ok())
}

/// Parses `key=value,key=value` from the variable `name`. A malformed item may hold a
/// secret, so the error names its position, not its text.
fn parse_properties(name: &str, list: &str) -> Result<Vec<(String, String)>, crate::EngineError> {
    list.split(',')
        .enumerate()
        .filter(|(_, pair)| !pair.trim().is_empty())
        .map(|(index, pair)| {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                crate::EngineError::Configuration(format!(
                    "{name}: expected key=value pairs separated by commas; item {} is not one",
                    index + 1
                ))
            })?;
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &redact_url_credentials(&self.brokers))
            .field("group_prefix", &self.group_prefix)
            .field("batch", &self.batch)
            .field("backoff", &self.backoff)
            .field("drain_timeout", &self.drain_timeout)
            .field("instance_id", &self.instance_id)
            .field("consumer_overrides", &Redacted(&self.consumer_overrides))
            .field("producer_overrides", &Redacted(&self.producer_overrides))
            .finish()
    }
}

/// Properties shown with their secret values as `***`.
struct Redacted<'a>(&'a [(String, String)]);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(key, value)| {
                let shown = if is_secret_property(key) {
                    "***".to_owned()
                } else {
                    redact_url_credentials(value)
                };
                (key, shown)
            }))
            .finish()
    }
}

/// Whether the librdkafka property `key` holds a secret (a password, a private key, an
/// OAuth secret or token), which the engine never shows in `Debug` output, logs or
/// errors.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "sasl.oauthbearer.config"]
        .iter()
        .any(|word| key.contains(word))
        || (key.starts_with("ssl.key") && !key.ends_with(".location"))
        || key.starts_with("ssl_key")
}

/// `text` with the credentials of any URL in it (`scheme://user:password@host`)
/// replaced by `***`.
pub(crate) fn redact_url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        out.push_str(before);
        let authority_end = after
            .find(['/', ' ', ',', '"', '\''])
            .unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &after[at..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// `text` with every secret value of `properties` replaced by `***`, and URL
/// credentials too: for errors of librdkafka, which may quote a value it rejects.
pub(crate) fn redact(text: &str, properties: &[(String, String)]) -> String {
    let mut text = redact_url_credentials(text);
    for (key, value) in properties {
        if is_secret_property(key) && !value.is_empty() {
            text = text.replace(value.as_str(), "***");
        }
    }
    text
}

/// The error of creating a client with `properties`, with their secrets redacted.
pub(crate) fn client_error(
    error: rdkafka::error::KafkaError,
    properties: &[(String, String)],
) -> crate::EngineError {
    let text = error.to_string();
    let redacted = redact(&text, properties);
    if redacted == text {
        crate::EngineError::Kafka(error)
    } else {
        crate::EngineError::Configuration(redacted)
    }
}

/// Exponential backoff between retries of a transient failure: `initial`, doubled per
/// attempt up to `max`, retried for as long as the failure lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First wait (default 100 ms).
    pub initial: Duration,
    /// Longest wait (default 10 s).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

fn merge(defaults: &[(&str, &str)], overrides: &[(String, String)]) -> Vec<(String, String)> {
    let mut properties: Vec<(String, String)> = defaults
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    merge_into(&mut properties, overrides);
    properties
}

/// Applies `overrides` to `properties`: replaces a key's value, or adds the key.
fn merge_into(properties: &mut Vec<(String, String)>, overrides: &[(String, String)]) {
    for (key, value) in overrides {
        match properties.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.clone(),
            None => properties.push((key.clone(), value.clone())),
        }
    }
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
        let config = KafkaConfig::new("b:9092").consumer_property("enable.auto.commit", "true");
        let properties = config.consumer_properties("g");
        // An override is honoured (the user asked), but the default is manual.
        assert_eq!(get(&properties, "enable.auto.commit"), Some("true"));
        let defaults = KafkaConfig::new("b:9092")
            .group_prefix("p.")
            .consumer_properties("p.g");
        assert_eq!(get(&defaults, "enable.auto.commit"), Some("false"));
        assert_eq!(get(&defaults, "enable.auto.offset.store"), Some("false"));
        assert_eq!(get(&defaults, "group.id"), Some("p.g"));
        assert_eq!(
            KafkaConfig::new("b").group_prefix("p.").group_id("g"),
            "p.g"
        );
    }

    #[test]
    fn producer_is_idempotent_and_overrides_replace_defaults() {
        let config = KafkaConfig::new("b:9092")
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

    #[test]
    fn default_properties_are_accepted_by_librdkafka() {
        // librdkafka validates combinations (e.g. `fetch.max.bytes` >= `message.max.bytes`)
        // when a client is created, which needs no broker.
        let config = KafkaConfig::new("127.0.0.1:1");
        let mut consumer = rdkafka::ClientConfig::new();
        for (key, value) in config.consumer_properties("g") {
            consumer.set(key, value);
        }
        let created: Result<rdkafka::consumer::BaseConsumer, _> = consumer.create();
        assert!(
            created.is_ok(),
            "consumer defaults rejected: {:?}",
            created.err()
        );
        let mut producer = rdkafka::ClientConfig::new();
        for (key, value) in config.producer_properties() {
            producer.set(key, value);
        }
        let created: Result<rdkafka::producer::BaseProducer, _> = producer.create();
        assert!(
            created.is_ok(),
            "producer defaults rejected: {:?}",
            created.err()
        );
    }

    #[test]
    fn read_ahead_is_bounded_and_refilled_promptly() {
        let properties = KafkaConfig::new("b").consumer_properties("g");
        let number = |key: &str| get(&properties, key).and_then(|v| v.parse::<u64>().ok());
        // Per partition: one batch queued, plus one bounded fetch.
        assert_eq!(
            number("queued.min.messages"),
            Some(BatchConfig::default().max_messages as u64)
        );
        let larger = KafkaConfig::new("b")
            .batch(20_000, Duration::from_millis(50))
            .consumer_properties("g");
        assert_eq!(get(&larger, "queued.min.messages"), Some("20000"));
        assert!(number("fetch.max.bytes") <= Some(1024 * 1024));
        assert!(number("max.partition.fetch.bytes") <= number("fetch.max.bytes"));
        // librdkafka's default of 1,000 ms stalls a partition whose queue was full.
        assert!(number("fetch.queue.backoff.ms") <= Some(50));
    }

    #[test]
    fn debug_output_and_errors_never_show_secrets() {
        let config = KafkaConfig::new("b:9092")
            .consumer_property("sasl.password", "hunter2")
            .consumer_property("sasl.username", "alice")
            .producer_property("ssl.key.password", "pem-pass")
            .producer_property("ssl.keystore.password", "store-pass")
            .producer_property("sasl.oauthbearer.client.secret", "oauth-secret")
            .producer_property("sasl.oauthbearer.token.endpoint.url", "https://u:tok@idp/x");
        let shown = format!("{config:?}");
        for secret in ["hunter2", "pem-pass", "store-pass", "oauth-secret", "tok@"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("alice"), "non-secrets stay visible: {shown}");
        assert!(!is_secret_property("ssl.key.location"));
        assert!(is_secret_property("ssl.key.pem"));

        let error = rdkafka::error::KafkaError::ClientCreation(
            "Invalid value \"hunter2\" for configuration property \"sasl.password\"".into(),
        );
        let text = client_error(error, &config.consumer_properties("g")).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("sasl.password"), "{text}");
        assert_eq!(
            redact_url_credentials("postgres://user:pw@db:5432/x and mongodb://h/y"),
            "postgres://***@db:5432/x and mongodb://h/y"
        );
    }

    #[test]
    fn a_malformed_property_list_does_not_echo_its_values() {
        let name = "FLOWS_CONSUMER_PROPERTIES";
        let list = "client.id=a,sasl.password:hunter2";
        let error = parse_properties(name, list).map(|_| ()).unwrap_err();
        let text = error.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("item 2"), "{text}");
    }

    #[test]
    fn an_instance_id_makes_a_static_member() {
        let dynamic = KafkaConfig::new("b").consumer_properties("g");
        assert_eq!(get(&dynamic, "group.instance.id"), None);
        let fixed = KafkaConfig::new("b")
            .instance_id("worker-3")
            .consumer_properties("g");
        assert_eq!(get(&fixed, "group.instance.id"), Some("worker-3"));
    }

    #[test]
    fn the_low_latency_preset_neither_waits_for_input_nor_lingers_on_output() {
        let preset = BatchConfig::preset("low-latency").expect("a preset");
        assert_eq!(preset, BatchConfig::low_latency());
        assert_eq!(preset.max_delay, Duration::ZERO);
        assert_eq!(preset.max_messages, BatchConfig::default().max_messages);
        let config = KafkaConfig::new("b").batch_config(preset);
        assert_eq!(get(&config.producer_properties(), "linger.ms"), Some("0"));
        let consumer = config.consumer_properties("g");
        assert_eq!(get(&consumer, "fetch.wait.max.ms"), Some("5"));
        let defaults = KafkaConfig::new("b").consumer_properties("g");
        assert_eq!(get(&defaults, "fetch.wait.max.ms"), Some("100"));
        let throughput = KafkaConfig::new("b").batch_config(BatchConfig::throughput());
        assert_eq!(
            get(&throughput.producer_properties(), "linger.ms"),
            Some("5")
        );
        let short = KafkaConfig::new("b").batch(100, Duration::from_millis(2));
        assert_eq!(get(&short.producer_properties(), "linger.ms"), Some("2"));
        // An explicit linger still wins.
        let lingering = config.producer_property("linger.ms", "10");
        assert_eq!(
            get(&lingering.producer_properties(), "linger.ms"),
            Some("10")
        );
        assert_eq!(BatchConfig::preset("fast"), None);
    }

    #[test]
    fn keys_are_partitioned_as_java_clients_do() {
        let properties = KafkaConfig::new("b").producer_properties();
        assert_eq!(get(&properties, "partitioner"), Some("murmur2_random"));
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(backoff.delay(0), Duration::from_millis(100));
        assert_eq!(backoff.delay(2), Duration::from_millis(400));
        assert_eq!(backoff.delay(4), Duration::from_secs(1));
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }
}
