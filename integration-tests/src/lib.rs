//! Helpers for the engine's end-to-end tests: test configuration, producing and
//! reading topics, a store that fails on command, and the word-count checkers that
//! turn the guarantees (G1 exact state, G2 identical replays, G3 per-key order) into
//! assertions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flows::backend::ChangeBatch;
use flows::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use flows::kafka::rdkafka::message::{Headers as _, Message as _};
use flows::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use flows::kafka::{Backoff, KafkaConfig, OutputProducer};
use flows::{
    Capabilities, EncodedRecord, Headers, PersistenceId, PrimaryKey, RawState, RepositoryError,
    Row, SingleStateRepository, TableSchema, UpsertRepository,
};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The longest a test batch waits to fill up.
pub const TEST_BATCH_DELAY: Duration = Duration::from_millis(20);

/// An engine configuration for tests: small batches, short waits, fast failure
/// detection (a dead member leaves the group after 6 s instead of 45 s).
pub fn test_config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .batch(100, TEST_BATCH_DELAY)
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "500")
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(500),
        })
        .drain_timeout(Duration::from_secs(10))
}

/// One record as read back from a topic.
#[derive(Clone, Debug, PartialEq)]
pub struct Consumed {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Headers,
}

impl Consumed {
    /// The key as UTF-8 (lossy).
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    /// The value as UTF-8 (lossy).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }

    /// The first value of header `key`, as UTF-8.
    pub fn header(&self, key: &str) -> Option<String> {
        self.headers
            .first(key)
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Publishes `records` and waits for their acknowledgements.
pub async fn produce(brokers: &str, records: &[EncodedRecord]) {
    let producer = OutputProducer::new(&KafkaConfig::new(brokers)).expect("producer");
    producer
        .send_all(records)
        .await
        .expect("records acknowledged");
}

/// A record with a UTF-8 key and value.
pub fn text_record(topic: &str, partition: Option<i32>, key: &str, value: &str) -> EncodedRecord {
    EncodedRecord {
        topic: topic.into(),
        partition,
        key: Some(key.as_bytes().to_vec()),
        value: Some(value.as_bytes().to_vec()),
        headers: Headers::new(),
        timestamp: None,
    }
}

/// Reads `topic` from the beginning until every partition is read up to its high
/// watermark and at least `at_least` records were seen (or `timeout` passes). Records
/// are in partition order, then offset order.
pub fn read_topic(brokers: &str, topic: &str, at_least: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "flows-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len() as i32);
        if count > 0 || Instant::now() > deadline {
            break count;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut records: BTreeMap<(i32, i64), Consumed> = BTreeMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    loop {
        let caught_up = (0..partitions).all(|p| {
            let high = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map_or(i64::MAX, |(_, high)| high);
            next.get(&p).copied().unwrap_or(0) >= high
        });
        if (caught_up && records.len() >= at_least) || Instant::now() > deadline {
            break;
        }
        while let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("message");
            let mut headers = Headers::new();
            if let Some(h) = message.headers() {
                for header in h.iter() {
                    headers.append(header.key, header.value.map(<[u8]>::to_vec));
                }
            }
            next.insert(message.partition(), message.offset() + 1);
            records.insert(
                (message.partition(), message.offset()),
                Consumed {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                },
            );
        }
    }
    records.into_values().collect()
}

/// The target directory of the running test or binary (`target/<profile>`): tests run
/// from `target/<profile>/deps`, binaries from `target/<profile>`.
fn profile_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("the executable's directory");
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().expect("target/<profile>"),
        _ => dir,
    }
    .to_path_buf()
}

/// The binary `name` of this crate (`src/bin`), which `cargo test` builds.
pub fn binary(name: &str) -> std::path::PathBuf {
    let binary = profile_dir().join(name);
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

/// The binary of the `flows` example `name`, next to the running test's in the target
/// directory (`cargo test` builds the examples before running tests).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let binary = profile_dir().join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build --examples --all-features` (scripts/test does)",
        binary.display()
    );
    binary
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether
/// it held.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks word-count outputs (key = word, value = count as text) against the expected
/// final counts: for every word the counts 1..=n first appear in ascending order (G3,
/// and G2's "every output is published"), every repeated count is a byte-identical copy
/// (value and headers) of its first appearance (G2: a replay, not a recomputation), and
/// no word is missing or extra. Returns how many duplicates were seen.
pub fn check_word_count_outputs(
    outputs: &[Consumed],
    expected: &HashMap<String, i64>,
) -> Result<usize, String> {
    check_sequenced_outputs(outputs, expected, |record| {
        record
            .value_str()
            .parse()
            .map_err(|_| format!("value {:?} is not a count", record.value_str()))
    })
}

/// Checks outputs that number, per key, the inputs their state has applied (`sequence`
/// reads that number from a record): for every key the numbers 1..=n first appear in
/// ascending order, every repeat is a byte-identical copy (value and headers) of its
/// first appearance (a replay, not a recomputation), and the keys and their n are
/// exactly `expected`. Returns how many duplicates were seen.
pub fn check_sequenced_outputs(
    outputs: &[Consumed],
    expected: &HashMap<String, i64>,
    sequence: impl Fn(&Consumed) -> Result<i64, String>,
) -> Result<usize, String> {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for record in outputs {
        by_key.entry(record.key_str()).or_default().push(record);
    }
    let mut duplicates = 0;
    for (key, records) in &by_key {
        let Some(&last) = expected.get(key) else {
            return Err(format!("unexpected output for key {key:?}"));
        };
        let mut first: Vec<&Consumed> = Vec::new();
        for record in records {
            let n = sequence(record).map_err(|e| format!("{key}: {e}"))?;
            let seen = first.len() as i64;
            if n == seen + 1 {
                first.push(record);
            } else if n >= 1 && n <= seen {
                let original = first[(n - 1) as usize];
                if original.value != record.value || original.headers != record.headers {
                    return Err(format!(
                        "{key}: output {n} was published twice with different bytes \
                         (partition {} offsets {} and {}): recomputed, not replayed",
                        record.partition, original.offset, record.offset
                    ));
                }
                duplicates += 1;
            } else {
                return Err(format!(
                    "{key}: output {n} at offset {} after only {seen} (gap or regression)",
                    record.offset
                ));
            }
        }
        if first.len() as i64 != last {
            return Err(format!(
                "{key}: outputs reach {} but {last} were expected",
                first.len()
            ));
        }
    }
    if let Some(missing) = expected.keys().find(|k| !by_key.contains_key(*k)) {
        return Err(format!("no output at all for key {missing:?}"));
    }
    Ok(duplicates)
}

/// A broker in a process of its own (`embedded-kafka`: librdkafka's mock cluster), so
/// that workers can be killed and restarted against a broker that outlives them.
/// Dropping it (closing its standard input) ends it.
pub struct BrokerProcess {
    child: std::process::Child,
    /// Its `bootstrap.servers`.
    pub bootstrap: String,
}

impl BrokerProcess {
    /// Starts the broker with `topics` (name, partitions) created.
    pub fn start(topics: &[(&str, i32)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(binary("embedded-kafka"))
            .args(topics.iter().map(|(t, p)| format!("{t}:{p}")))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the broker process");
        let stdout = child.stdout.take().expect("broker stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("broker output");
        let bootstrap = line
            .trim()
            .strip_prefix("BOOTSTRAP=")
            .unwrap_or_else(|| panic!("unexpected broker output {line:?}"))
            .to_owned();
        Self { child, bootstrap }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker process: a binary with the test configuration of a long-lived worker
/// (`FLOWS_BROKERS`, 200-message batches, a 6 s session timeout, warnings logged).
pub struct WorkerProcess {
    child: std::process::Child,
}

impl WorkerProcess {
    /// Starts `binary` against `brokers` with `env` on top of the test configuration.
    pub fn start(binary: &std::path::Path, brokers: &str, env: &[(&str, &str)]) -> Self {
        let mut command = std::process::Command::new(binary);
        command
            .env("FLOWS_BROKERS", brokers)
            .env("FLOWS_BATCH_MAX_MESSAGES", "200")
            .env(
                "FLOWS_CONSUMER_PROPERTIES",
                "session.timeout.ms=6000,heartbeat.interval.ms=500",
            )
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start the worker");
        Self { child }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap the worker");
    }

    /// SIGTERM, then waits for the exit; whether the worker stopped cleanly.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "SIGTERM could not be sent");
        self.child.wait().expect("wait for the worker")
    }

    /// Whether the process has ended (it should not, while it has work).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum, over `topics` (name, partitions), of the offsets consumer group `group` has
/// committed (0 for a partition without a commit).
pub fn committed_total(brokers: &str, group: &str, topics: &[(&str, i32)]) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for partition in 0..*partitions {
            list.add_partition(topic, partition);
        }
    }
    let total = match consumer.committed_offsets(list, Duration::from_secs(10)) {
        Ok(committed) => {
            let total = committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(offset) => offset,
                    _ => 0,
                })
                .sum();
            // Drop the list before the consumer (a live list can hang the consumer's drop).
            drop(committed);
            total
        }
        Err(_) => 0,
    };
    drop(consumer);
    total
}

/// The sum of the high watermarks of `topic`'s `partitions` partitions: how many
/// records were ever written to it.
pub fn high_watermark_total(brokers: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

/// Sets the committed offsets of consumer group `group` (whose pipeline must be
/// stopped) to the beginning of every partition of `topics`: what a crash of its
/// pipeline after publishing and before committing leaves behind, at its worst. Joins
/// the group to do so, as `kafka-consumer-groups --reset-offsets` would (the mock
/// cluster accepts commits from members only).
pub fn rewind_group(brokers: &str, group: &str, topics: &[(&str, i32)]) {
    use flows::kafka::rdkafka::consumer::CommitMode;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    let names: Vec<&str> = topics.iter().map(|(t, _)| *t).collect();
    consumer.subscribe(&names).expect("subscribe");
    let mut list = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for partition in 0..*partitions {
            list.add_partition_offset(topic, partition, Offset::Offset(0))
                .expect("partition");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Polling serves the group protocol; messages are not consumed further.
        let _ = consumer.poll(Duration::from_millis(100));
        let assigned = consumer.assignment().map_or(0, |a| a.count());
        if assigned == list.count() {
            match consumer.commit(&list, CommitMode::Sync) {
                Ok(()) => break,
                Err(error) => assert!(Instant::now() < deadline, "rewind {group}: {error}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "rewind {group}: {assigned} of {} partitions assigned",
            list.count()
        );
    }
    consumer.unsubscribe();
}

/// Reads the count (JSON integer) of every word from `store`.
pub async fn stored_counts(
    store: &dyn SingleStateRepository,
    words: impl IntoIterator<Item = String>,
) -> HashMap<String, i64> {
    let ids: Vec<PersistenceId> = words
        .into_iter()
        .map(|w| PersistenceId::new(w).expect("valid id"))
        .collect();
    store
        .get_all(&ids)
        .await
        .expect("read states")
        .into_iter()
        .map(|s| {
            let count = s
                .content
                .as_deref()
                .map_or(0, |c| serde_json::from_slice(c).expect("count"));
            (s.id.as_str().to_owned(), count)
        })
        .collect()
}

/// The multiset of `words` as counts.
pub fn tally<'a>(words: impl IntoIterator<Item = &'a str>) -> HashMap<String, i64> {
    let mut counts = HashMap::new();
    for word in words {
        *counts.entry(word.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// An outage on command: while on, every check fails as [`RepositoryError::Unavailable`].
#[derive(Debug, Default)]
struct Outage {
    on: AtomicBool,
    failures: AtomicU64,
}

impl Outage {
    fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    fn check(&self, what: &str) -> Result<(), RepositoryError> {
        if self.on.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(RepositoryError::Unavailable(
                format!("injected: {what} is down").into(),
            ));
        }
        Ok(())
    }
}

/// A store wrapper that fails (as unavailable) on command, and can hold writes until
/// released, for fault-injection tests.
#[derive(Debug)]
pub struct FaultyStore<R> {
    inner: R,
    outage: Outage,
    hold_writes: AtomicBool,
    released: tokio::sync::Notify,
    held: AtomicU64,
    log: Mutex<Vec<&'static str>>,
}

impl<R> FaultyStore<R> {
    /// Wraps `inner`, healthy.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            outage: Outage::default(),
            hold_writes: AtomicBool::new(false),
            released: tokio::sync::Notify::new(),
            held: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Makes every call fail with [`RepositoryError::Unavailable`] (or heal).
    pub fn set_failing(&self, failing: bool) {
        self.outage.set(failing);
    }

    /// Makes writes wait until [`release_writes`](Self::release_writes).
    pub fn hold_writes(&self) {
        self.hold_writes.store(true, Ordering::SeqCst);
    }

    /// Lets held and future writes through.
    pub fn release_writes(&self) {
        self.hold_writes.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// How many calls failed on command.
    pub fn failures(&self) -> u64 {
        self.outage.failures()
    }

    /// How many writes are or were held.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// The outcomes of writes, in order (`"ok"`, `"conflict"`, `"error"`).
    pub fn write_log(&self) -> Vec<&'static str> {
        self.log.lock().expect("log").clone()
    }
}

#[async_trait]
impl<R: SingleStateRepository> SingleStateRepository for FaultyStore<R> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        self.outage.check("store")?;
        self.inner.get_all(ids).await
    }

    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        self.outage.check("store")?;
        if self.hold_writes.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.hold_writes.load(Ordering::SeqCst) {
                released.await;
            }
        }
        let result = self.inner.upsert_all(states).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RepositoryError::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        self.log.lock().expect("log").push(outcome);
        result
    }
}

/// A table wrapper that fails (as unavailable) on command, for fault-injection tests of
/// materialisation.
pub struct FaultyTable<R> {
    inner: R,
    outage: Outage,
}

impl<R> FaultyTable<R> {
    /// Wraps `inner`, healthy.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            outage: Outage::default(),
        }
    }

    /// Makes every call fail with [`RepositoryError::Unavailable`] (or heal).
    pub fn set_failing(&self, failing: bool) {
        self.outage.set(failing);
    }

    /// How many calls failed on command.
    pub fn failures(&self) -> u64 {
        self.outage.failures()
    }
}

#[async_trait]
impl<T: Row, R: UpsertRepository<T>> UpsertRepository<T> for FaultyTable<R> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn schema(&self) -> &TableSchema {
        self.inner.schema()
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        self.outage.check("table")?;
        self.inner.write(batch).await
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        self.outage.check("table")?;
        self.inner.get_all(keys).await
    }
}
