//! Pipelines: what the engine runs, declared from the function types of `flows-core`.
//!
//! A [`Pipeline`] is a name (its consumer group), a function and an error policy. The
//! engine cuts each input partition into batches and hands every batch to the
//! pipeline's *stage*, which turns it into the records to publish:
//! - stateless: the function per message;
//! - stateful (and the stateful half of a join): [`apply_batch`](crate::apply_batch),
//!   one state read and one state write per batch;
//! - materialise: the mapper per message, then one batched write to the table.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use flows_core::backend::{ValidChange, write_isolating};
use flows_core::cache::{CachedStates, StateCache, StateCacheLimits};
use flows_core::function::{ErrorAction, StatefulProcessor, StatelessProcessor};
use flows_core::{
    EncodedRecord, FunctionError, Message, ProcessError, RawMessage, RepositoryError, Row,
    RowChange, SingleStateRepository, Topic, UpsertRepository,
};
use tracing::Instrument;

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::policy::{ErrorPolicy, Fallback};
use crate::stateful::{BatchBuffers, BatchError, apply_batch_with, replace_stored_outputs};

/// Decides what a failed message becomes (from the pipeline's [`ErrorPolicy`]).
pub(crate) type OnError<'a> = dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync + 'a;

/// Whether this instance still owns the partition being processed.
pub(crate) type StillOwner<'a> = dyn Fn() -> bool + Send + Sync + 'a;

/// The records a batch part publishes, each with the input message it came from (so
/// that an output the broker refuses is charged to its input).
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    pub(crate) records: Vec<EncodedRecord>,
    /// For each record, the index of its input message in the part.
    pub(crate) inputs: Vec<u32>,
}

impl Outputs {
    /// Appends `records`, the outputs of the part's message `input`.
    pub(crate) fn extend(
        &mut self,
        input: usize,
        records: impl IntoIterator<Item = EncodedRecord>,
    ) {
        self.records.extend(records);
        let input = u32::try_from(input).unwrap_or(u32::MAX);
        self.inputs.resize(self.records.len(), input);
    }

    pub(crate) fn clear(&mut self) {
        self.records.clear();
        self.inputs.clear();
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.records.reserve(additional);
        self.inputs.reserve(additional);
    }
}

/// What a stage works with inside one running pipeline: its counters, and its cache of
/// recently written states (each run's own: a `Pipeline` value holds no mutable state,
/// so two runs of one never share a cache).
pub(crate) struct StageContext<'a> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) cache: Option<&'a StateCache>,
}

/// Why a stage could not turn a batch into outputs.
#[derive(Debug)]
pub(crate) enum StageError {
    /// A message failed and the policy aborted the batch (to retry it or stop).
    Message(EngineError),
    /// The store is unavailable or busy: retry the batch after a backoff.
    Transient(RepositoryError),
    /// Another instance wrote these states after this one lost the partition.
    Fenced,
    /// Stop the pipeline.
    Fatal(EngineError),
}

impl From<RepositoryError> for StageError {
    fn from(error: RepositoryError) -> Self {
        if error.is_transient() {
            StageError::Transient(error)
        } else {
            StageError::Fatal(error.into())
        }
    }
}

impl From<BatchError> for StageError {
    fn from(error: BatchError) -> Self {
        use flows_core::function::FoldError;
        match error {
            BatchError::Fold(FoldError::Aborted { .. }) | BatchError::PersistenceId { .. } => {
                StageError::Message(EngineError::Message(Box::new(error)))
            }
            BatchError::Store(e) => e.into(),
            // Another writer keeps winning; back off and read again.
            BatchError::PersistentConflict { ids } => {
                StageError::Transient(RepositoryError::Conflict { ids })
            }
            BatchError::Fenced => StageError::Fenced,
            other => StageError::Fatal(EngineError::Message(Box::new(other))),
        }
    }
}

/// One kind of batch processing.
#[async_trait]
pub(crate) trait Stage: Send + Sync {
    /// Topics the stage reads.
    fn input_topics(&self) -> Vec<Arc<str>>;

    /// What kind of pipeline runs this stage: `stateless`, `stateful` or `materialise`.
    fn kind(&self) -> &'static str;

    /// Topics the stage writes, as its function declares them.
    fn output_topics(&self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// Turns a batch (one partition, offset order) into the records to publish,
    /// appended to `outputs` (empty on entry), after making any state or table change
    /// durable. Returns how many messages, from the first, it processed: a stateful
    /// stage may process a batch in parts ([`BatchOutput`](crate::BatchOutput)), and is
    /// called again with the rest once the outputs are published. On an error,
    /// `outputs` holds nothing to publish and is cleared by the caller.
    async fn run(
        &self,
        batch: &[RawMessage],
        on_error: &OnError<'_>,
        still_owner: &StillOwner<'_>,
        outputs: &mut Outputs,
        context: &StageContext<'_>,
    ) -> Result<usize, StageError>;

    /// Replaces what is stored for replay as the outputs of some messages of a part
    /// already processed (`(message, its new outputs)`), for stages that store outputs:
    /// outputs the broker refused for good are replaced by their dead letters, so that
    /// a replay does not send them into the same refusal again.
    async fn replace_outputs(
        &self,
        _replacements: &[(&RawMessage, Vec<EncodedRecord>)],
        _still_owner: &StillOwner<'_>,
        _context: &StageContext<'_>,
    ) -> Result<(), StageError> {
        Ok(())
    }

    /// A new cache of recently written states within `limits`, for stages that can use
    /// one (`None`: no cache).
    fn state_cache(&self, _limits: StateCacheLimits) -> Option<StateCache> {
        None
    }

    /// The state of `id` as the store holds it now; `None` for stages without state.
    async fn read_state(
        &self,
        _id: &flows_core::PersistenceId,
    ) -> Option<Result<flows_core::RawState, RepositoryError>> {
        None
    }
}

/// A message that failed inside a stateless or materialise stage under a stopping
/// policy.
#[derive(Debug, thiserror::Error)]
#[error("message {topic}/{partition}@{offset}: {source}")]
pub struct MessageFailed {
    /// Topic of the message.
    pub topic: String,
    /// Partition of the message.
    pub partition: i32,
    /// Offset of the message.
    pub offset: i64,
    /// Why it failed.
    #[source]
    pub source: ProcessError,
}

/// Applies the policy to a failed message: its dead-letter records, or the abort error.
fn handle_failure(
    message: &RawMessage,
    error: ProcessError,
    on_error: &OnError<'_>,
) -> Result<Vec<EncodedRecord>, StageError> {
    match on_error(message, &error) {
        ErrorAction::DeadLetter(records) => Ok(records),
        ErrorAction::Abort => Err(StageError::Message(EngineError::Message(Box::new(
            MessageFailed {
                topic: message.topic.to_string(),
                partition: message.partition,
                offset: message.offset,
                source: error,
            },
        )))),
    }
}

struct StatelessStage<F>(F);

#[async_trait]
impl<F: StatelessProcessor> Stage for StatelessStage<F> {
    fn kind(&self) -> &'static str {
        "stateless"
    }

    fn output_topics(&self) -> Vec<Arc<str>> {
        self.0.output_topics()
    }

    fn input_topics(&self) -> Vec<Arc<str>> {
        self.0.input_topics()
    }

    async fn run(
        &self,
        batch: &[RawMessage],
        on_error: &OnError<'_>,
        _still_owner: &StillOwner<'_>,
        outputs: &mut Outputs,
        context: &StageContext<'_>,
    ) -> Result<usize, StageError> {
        let started = Instant::now();
        outputs.reserve(batch.len());
        for (index, message) in batch.iter().enumerate() {
            match self.0.process(message) {
                Ok(records) => outputs.extend(index, records),
                Err(error) => outputs.extend(index, handle_failure(message, error, on_error)?),
            }
        }
        context.metrics.observe_stage(started.elapsed(), None, None);
        Ok(batch.len())
    }
}

struct StatefulStage<F, R> {
    function: F,
    store: R,
    /// Buffers of finished batches, taken by the next ones (at most one set per
    /// partition worker running at once).
    buffers: Mutex<Vec<BatchBuffers>>,
}

impl<F, R: SingleStateRepository> StatefulStage<F, R> {
    fn new(function: F, store: R) -> Self {
        Self {
            function,
            store,
            buffers: Mutex::new(Vec::new()),
        }
    }

    fn buffers(&self) -> MutexGuard<'_, Vec<BatchBuffers>> {
        // Buffers hold no invariant between batches: a poisoned pool is still usable.
        self.buffers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store behind the run's state cache, if it has one.
    fn layered<'a>(&'a self, context: &StageContext<'a>) -> CachedStates<'a, R> {
        match context.cache {
            Some(cache) => cache.layer(&self.store),
            None => CachedStates::uncached(&self.store),
        }
    }
}

#[async_trait]
impl<F: StatefulProcessor, R: SingleStateRepository> Stage for StatefulStage<F, R> {
    fn kind(&self) -> &'static str {
        "stateful"
    }

    fn output_topics(&self) -> Vec<Arc<str>> {
        self.function.output_topics()
    }

    async fn read_state(
        &self,
        id: &flows_core::PersistenceId,
    ) -> Option<Result<flows_core::RawState, RepositoryError>> {
        Some(self.store.get(id).await)
    }

    fn input_topics(&self) -> Vec<Arc<str>> {
        self.function.input_topics()
    }

    async fn run(
        &self,
        batch: &[RawMessage],
        on_error: &OnError<'_>,
        still_owner: &StillOwner<'_>,
        outputs: &mut Outputs,
        context: &StageContext<'_>,
    ) -> Result<usize, StageError> {
        let metrics = context.metrics;
        let store = self.layered(context);
        let mut buffers = self.buffers().pop().unwrap_or_default();
        let result = apply_batch_with(
            &self.function,
            &store,
            batch,
            on_error,
            still_owner,
            &mut buffers,
            outputs,
        )
        .await;
        let reads = buffers.reads;
        metrics.add_state_cache_hits(store.hits());
        metrics.add_states_read(store.misses());
        metrics.add_state_conflicts(reads.conflicts);
        metrics.observe_stage(
            reads.fold_time,
            Some(reads.read_time),
            Some(reads.write_time),
        );
        self.buffers().push(buffers);
        let processed = result?;
        if processed < batch.len() {
            metrics.add_batches_split(1);
        }
        Ok(processed)
    }

    async fn replace_outputs(
        &self,
        replacements: &[(&RawMessage, Vec<EncodedRecord>)],
        still_owner: &StillOwner<'_>,
        context: &StageContext<'_>,
    ) -> Result<(), StageError> {
        replace_stored_outputs(
            &self.function,
            &self.layered(context),
            replacements,
            still_owner,
        )
        .await
        .map_err(StageError::from)
    }

    /// None when disabled. (Over a store that fences by last-write-wins the layer
    /// keeps nothing: see `StateCache::layer`.)
    fn state_cache(&self, limits: StateCacheLimits) -> Option<StateCache> {
        let cache = StateCache::new(limits);
        cache.is_enabled().then_some(cache)
    }
}

/// A user function mapping a message to changes of a materialised table.
type RowMapper<T> = dyn Fn(&RawMessage) -> Result<Vec<RowChange<T>>, ProcessError> + Send + Sync;

struct MaterialiseStage<T, R> {
    input: Arc<str>,
    mapper: Box<RowMapper<T>>,
    repository: R,
}

#[async_trait]
impl<T: Row, R: UpsertRepository<T>> Stage for MaterialiseStage<T, R> {
    fn kind(&self) -> &'static str {
        "materialise"
    }

    fn input_topics(&self) -> Vec<Arc<str>> {
        vec![Arc::clone(&self.input)]
    }

    async fn run(
        &self,
        batch: &[RawMessage],
        on_error: &OnError<'_>,
        _still_owner: &StillOwner<'_>,
        outputs: &mut Outputs,
        context: &StageContext<'_>,
    ) -> Result<usize, StageError> {
        let mapping = Instant::now();
        let schema = self.repository.schema();
        // Each message's changes, checked against the table's schema: a row that does
        // not fit fails its own message (policy), not the whole batch's write.
        let mut sources: Vec<Vec<ValidChange>> = Vec::with_capacity(batch.len());
        let mut from: Vec<usize> = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let checked = (self.mapper)(message).and_then(|rows| {
                rows.iter()
                    .map(|change| {
                        ValidChange::new(schema, change.into())
                            .map_err(|e| ProcessError::Function(FunctionError::from_error(e)))
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
            match checked {
                Ok(valid) if valid.is_empty() => {}
                Ok(valid) => {
                    sources.push(valid);
                    from.push(index);
                }
                Err(error) => outputs.extend(index, handle_failure(message, error, on_error)?),
            }
        }
        // One batched write; rows the store refuses are charged to their messages, the
        // rest written (upserts are idempotent and applied in offset order, so a
        // replayed batch leaves the table as the first attempt did).
        let fold = mapping.elapsed();
        let writing = Instant::now();
        let rows = sources.iter().map(Vec::len).sum::<usize>() as i64;
        let written = write_isolating(&self.repository, &sources)
            .instrument(tracing::info_span!("flows.store.write", rows))
            .await;
        context
            .metrics
            .observe_stage(fold, None, Some(writing.elapsed()));
        let refused = written?;
        for (source, error) in refused {
            let index = from[source];
            let message = &batch[index];
            tracing::warn!(topic = %message.topic, partition = message.partition, offset = message.offset, %error, "the table refused a message's rows");
            let error = ProcessError::Rejected(error.to_string());
            outputs.extend(index, handle_failure(message, error, on_error)?);
        }
        Ok(batch.len())
    }
}

/// A named unit of work for the engine: a function over input topics, its consumer
/// group (the name, see [`KafkaConfig::group_id`](crate::KafkaConfig::group_id)) and
/// its [`ErrorPolicy`].
///
/// ```
/// use flows_core::function::StatelessFunction;
/// use flows_core::{Record, Topic, Utf8};
/// use flows_kafka::{ErrorPolicy, Pipeline};
///
/// let upper = StatelessFunction::one_to_one(
///     Topic::new("words", Utf8, Utf8),
///     Topic::new("shouted-words", Utf8, Utf8),
///     |m| Ok(Record::new(m.key, m.value.to_uppercase())),
/// );
/// let pipeline = Pipeline::stateless("shout", upper).on_error(ErrorPolicy::dead_letter("shout-dlq"));
/// assert_eq!(pipeline.name(), "shout");
/// assert_eq!(pipeline.input_topics(), vec!["words".to_owned()]);
/// ```
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) name: String,
    pub(crate) stage: Arc<dyn Stage>,
    pub(crate) policy: ErrorPolicy,
    /// Limits of each run's cache of recently written states.
    pub(crate) cache_limits: StateCacheLimits,
    /// librdkafka producer properties of this pipeline, over the engine's.
    pub(crate) producer_overrides: Vec<(String, String)>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name)
            .field("inputs", &self.input_topics())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Pipeline {
    fn with_stage(name: impl Into<String>, stage: Arc<dyn Stage>) -> Self {
        Self {
            name: name.into(),
            stage,
            policy: ErrorPolicy::default(),
            cache_limits: StateCacheLimits::default(),
            producer_overrides: Vec::new(),
        }
    }

    /// A stateless pipeline (filter, map, one-to-two, explode, merge): outputs are
    /// published at least once; there is no state.
    pub fn stateless(name: impl Into<String>, function: impl StatelessProcessor + 'static) -> Self {
        Self::with_stage(name, Arc::new(StatelessStage(function)))
    }

    /// A stateful pipeline: per-key state in `store`, exactly-once state changes,
    /// outputs published at least once and identical on replay.
    pub fn stateful(
        name: impl Into<String>,
        function: impl StatefulProcessor + 'static,
        store: impl SingleStateRepository + 'static,
    ) -> Self {
        Self::with_stage(name, Arc::new(StatefulStage::new(function, store)))
    }

    /// A materialisation: every message of `input` is mapped by `f` to row changes,
    /// upserted (or deleted) in `repository` in one batched write per batch.
    pub fn materialise<K, V, T, R>(
        name: impl Into<String>,
        input: Topic<K, V>,
        repository: R,
        f: impl Fn(Message<K, V>) -> Result<Vec<RowChange<T>>, FunctionError> + Send + Sync + 'static,
    ) -> Self
    where
        K: 'static,
        V: 'static,
        T: Row,
        R: UpsertRepository<T> + 'static,
    {
        let decoder = input.clone();
        let mapper: Box<RowMapper<T>> = Box::new(move |raw: &RawMessage| {
            let message = decoder.decode(raw)?;
            Ok(f(message)?)
        });
        Self::with_stage(
            name,
            Arc::new(MaterialiseStage {
                input: input.shared_name(),
                mapper,
                repository,
            }),
        )
    }

    /// Sets the limits of a stateful pipeline's cache of recently written states
    /// (default [`StateCacheLimits::default`]; [`StateCacheLimits::disabled`] reads
    /// every batch's states from the store). A cached state saves the next batch of its
    /// key a store read; it can never be stale unnoticed, because every write is
    /// conditional on the version it was read at, and a conflict re-reads the store.
    /// Stores that fence by last-write-wins get no cache. Each run of the pipeline has
    /// a cache of its own.
    pub fn state_cache(mut self, limits: StateCacheLimits) -> Self {
        self.cache_limits = limits;
        self
    }

    /// A new, empty cache for one run of this pipeline, if it keeps one.
    pub(crate) fn new_state_cache(&self) -> Option<StateCache> {
        self.stage.state_cache(self.cache_limits)
    }

    /// Sets a librdkafka property of this pipeline's producer, over the engine's
    /// ([`KafkaConfig::producer_property`](crate::KafkaConfig::producer_property)).
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_overrides.push((key.into(), value.into()));
        self
    }

    /// Sets the error policy (default: [`ErrorPolicy::stop`]).
    pub fn on_error(mut self, policy: ErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The pipeline's name (and consumer group, after the configured prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topics the pipeline reads, sorted.
    pub fn input_topics(&self) -> Vec<String> {
        sorted_names(self.stage.input_topics())
    }

    /// What kind of pipeline this is: `stateless`, `stateful` or `materialise` (a
    /// join is a stateless re-key pipeline and a stateful one).
    pub fn kind(&self) -> &'static str {
        self.stage.kind()
    }

    /// The topics the pipeline writes, as its function declares them, sorted (the
    /// dead-letter topic aside).
    pub fn output_topics(&self) -> Vec<String> {
        sorted_names(self.stage.output_topics())
    }

    /// The error policy.
    pub fn policy(&self) -> &ErrorPolicy {
        &self.policy
    }

    /// The dead-letter topic of its error policy, if it has one.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        match &self.policy.fallback {
            Fallback::DeadLetter(topic) => Some(topic),
            Fallback::Stop => None,
        }
    }
}

/// Topic names, sorted, each once.
fn sorted_names(topics: Vec<Arc<str>>) -> Vec<String> {
    let mut names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use flows_core::function::StatefulFunction;
    use flows_core::{Json, MemoryStateRepository};

    use super::*;

    #[test]
    fn each_run_gets_its_own_cache_unless_it_is_disabled() {
        let function = || StatefulFunction::new(Json::<i64>::new());
        let cached = Pipeline::stateful("a", function(), MemoryStateRepository::new());
        assert!(cached.new_state_cache().is_some());
        let disabled = cached.clone().state_cache(StateCacheLimits::disabled());
        assert!(disabled.new_state_cache().is_none());
        // A value: the clone it came from keeps its cache.
        assert!(cached.new_state_cache().is_some());
    }
}
