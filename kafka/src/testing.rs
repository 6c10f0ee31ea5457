//! A deterministic, broker-less driver for your pipelines, and crash injection.
//!
//! [`TestDriver`] runs pipelines exactly as the engine's partition workers do (the same
//! stages, error policies, dead letters, stored outputs and trace headers), over
//! in-memory topics instead of Kafka: pipe typed input, [`run`](TestDriver::run) until
//! nothing is left to process, read typed outputs per topic, advance the clock. Like
//! Kafka Streams' `TopologyTestDriver`, but it can also crash a batch at each point of
//! the cycle (after the store write, after some outputs were published, before the
//! commit) and replay it, as a restarted worker would: [`assert_replays_exactly`]
//! checks that your function keeps exactly-once state and replays its outputs byte for
//! byte through every such crash.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flows_core::function::{PersistenceIdFn, StatefulFunction};
//! use flows_core::{Json, MemoryStateRepository, Record, Topic, Utf8};
//! use flows_kafka::Pipeline;
//! use flows_kafka::testing::TestDriver;
//!
//! let words = Topic::new("words", Utf8, Utf8);
//! let counts = Topic::new("counts", Utf8, Json::<i64>::new());
//! let count = StatefulFunction::new(Json::<i64>::new()).starting_from_default().one_to_one(
//!     words.clone(),
//!     counts.clone(),
//!     PersistenceIdFn::key(),
//!     |n: &i64, word| Ok((n + 1, Record::new(word.key, n + 1))),
//! );
//! let mut driver = TestDriver::new([Pipeline::stateful("count", count, MemoryStateRepository::new())]);
//! for word in ["fox", "hen", "fox"] {
//!     driver.pipe(&words, Record::new(word.to_owned(), word.to_owned()))?;
//! }
//! driver.run().await?;
//! let out: Vec<(String, i64)> = driver.read(&counts)?.into_iter().map(|m| (m.key, m.value)).collect();
//! assert_eq!(out, [("fox".into(), 1), ("hen".into(), 1), ("fox".into(), 2)]);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use flows_core::{EncodedRecord, Message, ProcessError, RawMessage, Record, Topic};

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pipeline::{Outputs, Pipeline, StageContext, StageError};
use crate::trace_context::propagate_trace_context;
use flows_core::cache::StateCache;

/// Where a batch crashes: what of its cycle happened before the worker died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrashPoint {
    /// The state or rows were written; no output was published, nothing committed.
    AfterStoreWrite,
    /// The first `n` outputs were published; nothing committed.
    AfterPublishing(usize),
    /// Every output was published; the offset commit was lost.
    BeforeCommit,
}

impl CrashPoint {
    /// One of each kind, for a batch with outputs (a crash after one output).
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::AfterStoreWrite,
        CrashPoint::AfterPublishing(1),
        CrashPoint::BeforeCommit,
    ];
}

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestDriverError {
    /// A record could not be encoded, or a message on a topic decoded, with the topic's
    /// formats.
    #[error(transparent)]
    Format(#[from] flows_core::topic::TopicFormatError),
    /// A pipeline stopped: a message failed under a stopping policy, or its store
    /// failed.
    #[error("pipeline {pipeline} stopped: {error}")]
    Stopped {
        /// The pipeline.
        pipeline: String,
        /// Why (boxed: the error stays small on the happy path).
        error: Box<EngineError>,
    },
    /// A stateful pipeline replayed a message with outputs other than those it
    /// published the first time: its replays are not byte for byte.
    #[error(
        "pipeline {pipeline} replayed {topic}/{partition}@{offset} with other outputs than the first time"
    )]
    ReplayDiffers {
        /// The pipeline.
        pipeline: String,
        /// The replayed message's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// `run` kept finding work after this many rounds: pipelines feeding each other
    /// in a loop.
    #[error("still processing after {0} rounds: do the pipelines feed each other in a loop?")]
    NoQuiescence(usize),
}

/// Where an output came from: its pipeline and its input message.
type Origin = (usize, Arc<str>, i32, i64);

/// One driven pipeline and its committed offsets.
struct Driven {
    pipeline: Pipeline,
    /// The run's cache of recently written states (a crash loses it).
    cache: Option<StateCache>,
    committed: HashMap<(Arc<str>, i32), i64>,
    /// Batches processed so far (crashed ones included).
    batches: usize,
}

/// Runs pipelines over in-memory topics; see the [module documentation](self).
pub struct TestDriver {
    driven: Vec<Driven>,
    topics: BTreeMap<Arc<str>, Vec<Vec<RawMessage>>>,
    partitions: i32,
    batch_size: usize,
    clock_ms: i64,
    metrics: Metrics,
    crash: Option<(usize, usize, CrashPoint)>,
    /// Every publication's outputs per input, in order (a replay adds another).
    published: HashMap<Origin, Vec<Vec<EncodedRecord>>>,
}

impl std::fmt::Debug for TestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDriver")
            .field(
                "pipelines",
                &self
                    .driven
                    .iter()
                    .map(|d| d.pipeline.name())
                    .collect::<Vec<_>>(),
            )
            .field("topics", &self.topics.keys().collect::<Vec<_>>())
            .field("clock_ms", &self.clock_ms)
            .finish()
    }
}

/// The first clock reading: 2026-01-01T00:00:00Z, so timestamps are realistic and fixed.
const START_MS: i64 = 1_767_225_600_000;

/// Most rounds [`TestDriver::run`] makes before it reports a loop.
const MAX_ROUNDS: usize = 10_000;

impl TestDriver {
    /// A driver for `pipelines` (they may feed each other: one's output topic another's
    /// input), every topic with one partition, batches of up to 1,000 messages, the
    /// clock at 2026-01-01T00:00:00Z.
    pub fn new(pipelines: impl IntoIterator<Item = Pipeline>) -> Self {
        Self {
            driven: pipelines
                .into_iter()
                .map(|pipeline| Driven {
                    cache: pipeline.new_state_cache(),
                    pipeline,
                    committed: HashMap::new(),
                    batches: 0,
                })
                .collect(),
            topics: BTreeMap::new(),
            partitions: 1,
            batch_size: 1_000,
            clock_ms: START_MS,
            metrics: Metrics::new(),
            crash: None,
            published: HashMap::new(),
        }
    }

    /// Gives every topic `n` partitions (at least 1): records go to their own
    /// partition, else to one chosen by a fixed hash of their key (not Kafka's
    /// partitioner: the driver tests logic, not partition assignment).
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Processes at most `n` messages (at least 1) per batch: small batches put crash
    /// points between messages.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The time of the driver's clock, in milliseconds since the Unix epoch: the
    /// timestamp of the next piped record that has none.
    pub fn now_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Moves the clock forward.
    pub fn advance_time(&mut self, by: Duration) {
        self.clock_ms += i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
    }

    /// Appends `record` to `topic`, encoded with the topic's formats.
    pub fn pipe<K, V>(
        &mut self,
        topic: &Topic<K, V>,
        record: Record<K, V>,
    ) -> Result<(), TestDriverError> {
        let encoded = topic.encode(record, Some(self.clock_ms))?;
        self.append(encoded);
        Ok(())
    }

    /// Appends encoded records, as an upstream producer would.
    pub fn pipe_raw(&mut self, records: impl IntoIterator<Item = EncodedRecord>) {
        for record in records {
            self.append(record);
        }
    }

    /// Every message on `topic`, decoded, partition by partition in offset order.
    pub fn read<K, V>(&self, topic: &Topic<K, V>) -> Result<Vec<Message<K, V>>, TestDriverError> {
        self.read_raw(topic.name())
            .iter()
            .map(|m| topic.decode(m).map_err(TestDriverError::from))
            .collect()
    }

    /// Every message on the topic named `topic`, as bytes.
    pub fn read_raw(&self, topic: &str) -> Vec<RawMessage> {
        self.topics
            .get(topic)
            .map(|partitions| partitions.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// The counters of everything run so far, as the engine's metrics count them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Makes batch number `batch` (0-based, counting every batch it runs) of the
    /// pipeline named `pipeline` crash at `point`; the next [`run`](Self::run) then
    /// replays from the last committed offsets, as a restarted worker does.
    pub fn crash_at(&mut self, pipeline: &str, batch: usize, point: CrashPoint) {
        if let Some(index) = self
            .driven
            .iter()
            .position(|d| d.pipeline.name() == pipeline)
        {
            self.crash = Some((index, batch, point));
        }
    }

    /// Runs every pipeline until none has anything left to process. Stateful replays
    /// are checked as they happen: a replay whose outputs differ is an error.
    pub async fn run(&mut self) -> Result<(), TestDriverError> {
        for _ in 0..MAX_ROUNDS {
            let mut progressed = false;
            for index in 0..self.driven.len() {
                progressed |= self.step(index).await?;
            }
            if !progressed {
                return Ok(());
            }
        }
        Err(TestDriverError::NoQuiescence(MAX_ROUNDS))
    }

    /// Runs one batch per input partition of pipeline `index` that has input; whether
    /// any did.
    async fn step(&mut self, index: usize) -> Result<bool, TestDriverError> {
        let mut progressed = false;
        let inputs = self.driven[index].pipeline.stage.input_topics();
        for topic in inputs {
            for partition in 0..self.partitions {
                let from = self.driven[index]
                    .committed
                    .get(&(Arc::clone(&topic), partition))
                    .copied()
                    .unwrap_or(0);
                let batch: Vec<RawMessage> = self
                    .topics
                    .get(&topic)
                    .and_then(|p| p.get(partition as usize))
                    .map(|log| {
                        log.iter()
                            .skip(usize::try_from(from).unwrap_or(0))
                            .take(self.batch_size)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if batch.is_empty() {
                    continue;
                }
                progressed = true;
                self.batch(index, &topic, partition, &batch).await?;
            }
        }
        Ok(progressed)
    }

    /// One batch through the cycle: process (in parts, as the worker does), publish,
    /// commit; or a crash at the armed point.
    async fn batch(
        &mut self,
        index: usize,
        topic: &Arc<str>,
        partition: i32,
        batch: &[RawMessage],
    ) -> Result<(), TestDriverError> {
        let number = self.driven[index].batches;
        self.driven[index].batches += 1;
        let crash = match self.crash {
            Some((i, n, point)) if i == index && n == number => {
                self.crash = None;
                Some(point)
            }
            _ => None,
        };
        let mut rest = batch;
        let mut outputs = Outputs::default();
        while !rest.is_empty() {
            let processed = self.process(index, rest, &mut outputs).await?;
            let part = &rest[..processed];
            propagate_trace_context(part, &mut outputs);
            let publish = match crash {
                Some(CrashPoint::AfterStoreWrite) => 0,
                Some(CrashPoint::AfterPublishing(n)) => n.min(outputs.records.len()),
                _ => outputs.records.len(),
            };
            self.publish(index, part, &outputs, publish)?;
            if crash.is_some() {
                // The worker died: nothing of this batch is committed, and what it kept
                // in memory is gone.
                let driven = &mut self.driven[index];
                driven.cache = driven.pipeline.new_state_cache();
                return Ok(());
            }
            if let Some(last) = part.last() {
                self.driven[index]
                    .committed
                    .insert((Arc::clone(topic), partition), last.offset + 1);
            }
            self.metrics.add_committed(part.len() as u64);
            outputs.clear();
            rest = &rest[processed..];
        }
        Ok(())
    }

    /// Runs the stage over `batch` with the pipeline's error policy (retries without
    /// waiting); how many messages it processed.
    async fn process(
        &self,
        index: usize,
        batch: &[RawMessage],
        outputs: &mut Outputs,
    ) -> Result<usize, TestDriverError> {
        let driven = &self.driven[index];
        let pipeline = &driven.pipeline;
        let context = StageContext {
            metrics: &self.metrics,
            cache: driven.cache.as_ref(),
        };
        let stopped = |error: EngineError| TestDriverError::Stopped {
            pipeline: pipeline.name().to_owned(),
            error: Box::new(error),
        };
        let mut attempt = 0;
        loop {
            outputs.clear();
            let on_error = |message: &RawMessage, error: &ProcessError| {
                pipeline
                    .policy
                    .action(attempt, &pipeline.name, message, error)
            };
            let still_owner = || true;
            match pipeline
                .stage
                .run(batch, &on_error, &still_owner, outputs, &context)
                .await
            {
                Ok(processed) => return Ok(processed.clamp(1, batch.len())),
                Err(StageError::Message(_)) if attempt < pipeline.policy.retries => {
                    self.metrics.add_function_retries(1);
                    attempt += 1;
                }
                Err(StageError::Message(error)) | Err(StageError::Fatal(error)) => {
                    return Err(stopped(error));
                }
                Err(StageError::Transient(error)) => return Err(stopped(error.into())),
                Err(StageError::Fenced) => {
                    return Err(stopped(EngineError::Internal(
                        "fenced, though the driver runs one instance".into(),
                    )));
                }
            }
        }
    }

    /// Publishes the first `count` outputs of `part`, recording them per input and
    /// checking a stateful pipeline's replays against their first publication.
    fn publish(
        &mut self,
        index: usize,
        part: &[RawMessage],
        outputs: &Outputs,
        count: usize,
    ) -> Result<(), TestDriverError> {
        let mut by_input: BTreeMap<u32, Vec<EncodedRecord>> = BTreeMap::new();
        for (record, &input) in outputs.records.iter().zip(&outputs.inputs).take(count) {
            by_input.entry(input).or_default().push(record.clone());
            self.append(record.clone());
        }
        self.metrics.add_published(count as u64);
        let stateful = self.driven[index].pipeline.kind() == "stateful";
        for (input, records) in by_input {
            let Some(message) = part.get(input as usize) else {
                continue;
            };
            let origin = (
                index,
                Arc::clone(&message.topic),
                message.partition,
                message.offset,
            );
            let earlier = self.published.entry(origin).or_default();
            if stateful
                && let Some(first) = earlier.first()
                && !first.starts_with(&records)
                && !records.starts_with(first)
            {
                return Err(TestDriverError::ReplayDiffers {
                    pipeline: self.driven[index].pipeline.name().to_owned(),
                    topic: message.topic.to_string(),
                    partition: message.partition,
                    offset: message.offset,
                });
            }
            earlier.push(records);
        }
        Ok(())
    }

    /// Appends a record to its topic's partition at the next offset.
    fn append(&mut self, record: EncodedRecord) {
        let partitions = self.partitions;
        let log = self
            .topics
            .entry(Arc::clone(&record.topic))
            .or_insert_with(|| vec![Vec::new(); partitions as usize]);
        let partition = match record.partition {
            Some(p) if (0..partitions).contains(&p) => p,
            _ => match &record.key {
                Some(key) => {
                    let hash = foldhash::fast::FixedState::with_seed(0).hash_one(key);
                    (hash % partitions as u64) as i32
                }
                None => 0,
            },
        };
        let log = &mut log[partition as usize];
        log.push(RawMessage {
            topic: Arc::clone(&record.topic),
            partition,
            offset: log.len() as i64,
            key: record.key,
            value: record.value,
            headers: record.headers,
            timestamp: record.timestamp.or(Some(self.clock_ms)),
        });
    }

    /// Each input's outputs of pipeline `pipeline` as last published, by input.
    fn last_outputs(&self, pipeline: usize) -> BTreeMap<(Arc<str>, i32, i64), Vec<EncodedRecord>> {
        self.published
            .iter()
            .filter(|((p, ..), _)| *p == pipeline)
            .filter_map(|((_, topic, partition, offset), all)| {
                // The longest publication: a crash may have cut the last one short.
                let longest = all.iter().max_by_key(|r| r.len())?;
                Some(((Arc::clone(topic), *partition, *offset), longest.clone()))
            })
            .collect()
    }
}

/// Runs the scenario `feed` (piping input into a driver) through pipelines from `build`
/// once without a crash, then again with a crash at every [`CrashPoint`] in every batch
/// of every pipeline (batches of `batch_size` messages), and checks, for the crashed
/// pipeline, that each input's outputs after the replay are those of the run without a
/// crash, byte for byte, and that a stateful pipeline replayed the very bytes it
/// published first. With a stateful function, an input applied twice would change the
/// outputs of the inputs after it: this is exactly-once state, seen from outside.
///
/// `build` must make fresh pipelines with fresh, empty stores on every call.
///
/// # Panics
///
/// On the first difference, naming the pipeline, the crash, the input and both outputs.
pub async fn assert_replays_exactly(
    build: impl Fn() -> Vec<Pipeline>,
    batch_size: usize,
    feed: impl Fn(&mut TestDriver) -> Result<(), TestDriverError>,
) {
    let fresh = || {
        let mut driver = TestDriver::new(build()).batch_size(batch_size);
        if let Err(error) = feed(&mut driver) {
            panic!("feeding the driver failed: {error}");
        }
        driver
    };
    let mut reference = fresh();
    if let Err(error) = reference.run().await {
        panic!("the run without a crash failed: {error}");
    }
    for (index, driven) in reference.driven.iter().enumerate() {
        let expected = reference.last_outputs(index);
        let name = driven.pipeline.name();
        for batch in 0..driven.batches {
            for point in CrashPoint::ALL {
                let mut crashed = fresh();
                crashed.crash_at(name, batch, point);
                if let Err(error) = crashed.run().await {
                    panic!("{name}, crash {point:?} in batch {batch}: {error}");
                }
                let got = crashed.last_outputs(index);
                for (input, outputs) in &expected {
                    let replayed = got.get(input);
                    assert!(
                        replayed == Some(outputs),
                        "{name}, crash {point:?} in batch {batch}: input {}/{}@{} gave {replayed:?} after the replay, {outputs:?} without a crash",
                        input.0,
                        input.1,
                        input.2,
                    );
                }
                assert_eq!(
                    got.len(),
                    expected.len(),
                    "{name}, crash {point:?} in batch {batch}: outputs for other inputs than without a crash"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use flows_core::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
    use flows_core::{
        Capabilities, FunctionError, Json, MemoryStateRepository, PersistenceId, RawState,
        RepositoryError, SingleStateRepository, Utf8,
    };

    use super::*;
    use crate::{ErrorPolicy, Join};

    fn words() -> Topic<String, String> {
        Topic::new("words", Utf8, Utf8)
    }

    fn counts() -> Topic<String, i64> {
        Topic::new("counts", Utf8, Json::<i64>::new())
    }

    fn count_with(store: impl SingleStateRepository + 'static) -> Pipeline {
        let count = StatefulFunction::new(Json::<i64>::new())
            .starting_from_default()
            .one_to_one(words(), counts(), PersistenceIdFn::key(), |n: &i64, w| {
                if w.value == "boom" {
                    return Err(FunctionError::new("boom"));
                }
                Ok((n + 1, Record::new(w.key, n + 1)))
            });
        Pipeline::stateful("count", count, store).on_error(ErrorPolicy::dead_letter("dlq"))
    }

    fn feed(driver: &mut TestDriver) -> Result<(), TestDriverError> {
        for w in ["fox", "hen", "fox", "boom", "fox", "hen", "owl"] {
            driver.pipe(&words(), Record::new(w.to_owned(), w.to_owned()))?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_chain_of_pipelines_runs_to_the_end_with_dead_letters_and_time() {
        let shout =
            StatelessFunction::one_to_one(Topic::new("raw-words", Utf8, Utf8), words(), |m| {
                Ok(Record::new(m.key.to_lowercase(), m.value.to_lowercase()))
            });
        let mut driver = TestDriver::new([
            Pipeline::stateless("lower", shout),
            count_with(MemoryStateRepository::new()),
        ])
        .partitions(3);
        let raw = Topic::new("raw-words", Utf8, Utf8);
        driver
            .pipe(&raw, Record::new("Fox".into(), "Fox".into()))
            .unwrap();
        driver.advance_time(Duration::from_secs(60));
        for w in ["FOX", "boom"] {
            driver.pipe(&raw, Record::new(w.into(), w.into())).unwrap();
        }
        driver.run().await.unwrap();
        let mut out: Vec<(String, i64, Option<i64>)> = driver
            .read(&counts())
            .unwrap()
            .into_iter()
            .map(|m| (m.key, m.value, m.timestamp))
            .collect();
        out.sort();
        let start = START_MS;
        assert_eq!(
            out,
            [
                ("fox".into(), 1, Some(start)),
                ("fox".into(), 2, Some(start + 60_000))
            ]
        );
        let dead = driver.read_raw("dlq");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key.as_deref(), Some(&b"boom"[..]));
        assert_eq!(driver.metrics().snapshot().committed, 6);
    }

    #[tokio::test]
    async fn every_crash_point_replays_a_stateful_function_exactly() {
        assert_replays_exactly(|| vec![count_with(MemoryStateRepository::new())], 2, feed).await;
    }

    #[tokio::test]
    async fn a_crash_before_the_commit_replays_the_stored_outputs() {
        let mut driver = TestDriver::new([count_with(MemoryStateRepository::new())]).batch_size(3);
        feed(&mut driver).unwrap();
        driver.crash_at("count", 0, CrashPoint::BeforeCommit);
        driver.run().await.unwrap();
        let out: Vec<i64> = driver
            .read(&counts())
            .unwrap()
            .iter()
            .map(|m| m.value)
            .collect();
        // The first batch (fox, hen, fox) is published twice, identically; then the rest.
        assert_eq!(out, [1, 1, 2, 1, 1, 2, 3, 2, 1]);
    }

    #[tokio::test]
    async fn a_join_through_its_intermediate_topic_survives_every_crash() {
        let build = || {
            let cards = Topic::new("cards", Utf8, Utf8);
            let f = StatefulFunction::new(Json::<Vec<String>>::new())
                .starting_from_default()
                .one_to_one(
                    words(),
                    cards.clone(),
                    PersistenceIdFn::key(),
                    |seen: &Vec<String>, m| {
                        let mut seen = seen.clone();
                        seen.push(format!("word {}", m.value));
                        let text = seen.join(", ");
                        Ok((seen, Record::new(m.key, text)))
                    },
                )
                .one_to_one(
                    Topic::new("notes", Utf8, Utf8),
                    cards,
                    PersistenceIdFn::key(),
                    |seen: &Vec<String>, m| {
                        let mut seen = seen.clone();
                        seen.push(format!("note {}", m.value));
                        let text = seen.join(", ");
                        Ok((seen, Record::new(m.key, text)))
                    },
                );
            let join = Join::new("join", "join-intermediate", f);
            vec![
                join.rekey_pipeline(),
                join.stateful_pipeline(MemoryStateRepository::new()),
            ]
        };
        assert_replays_exactly(build, 2, |driver| {
            let notes = Topic::new("notes", Utf8, Utf8);
            driver.pipe(&words(), Record::new("fox".into(), "fox".into()))?;
            driver.pipe(&notes, Record::new("fox".into(), "quick".into()))?;
            driver.pipe(&words(), Record::new("fox".into(), "fox".into()))?;
            driver.pipe(&notes, Record::new("hen".into(), "red".into()))?;
            Ok(())
        })
        .await;
    }

    /// A store that loses what the engine records in a state beside its content (its
    /// progress and outputs kept for replay): replays apply messages twice.
    struct Forgetful(MemoryStateRepository);

    #[async_trait]
    impl SingleStateRepository for Forgetful {
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
            let mut states = self.0.get_all(ids).await?;
            for state in &mut states {
                state.progress = Default::default();
                state.results = Default::default();
            }
            Ok(states)
        }
        async fn upsert_all(
            &self,
            states: Vec<RawState>,
        ) -> Result<Vec<RawState>, RepositoryError> {
            self.0.upsert_all(states).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "crash AfterStoreWrite in batch 0")]
    async fn a_store_that_forgets_progress_is_caught_by_the_crash_check() {
        assert_replays_exactly(
            || vec![count_with(Forgetful(MemoryStateRepository::new()))],
            2,
            feed,
        )
        .await;
    }
}
