//! The partition worker: one task per assigned partition, running the batch cycle
//! *collect → stage (state durable) → publish (acknowledged) → mark offset committable*
//! strictly one batch after the other, which is what the replay-aware fold requires.
//!
//! The worker reads its partition's own queue ([`PartitionInput`]), so a busy partition
//! simply stops being read and librdkafka stops fetching it (bounded memory, no pause);
//! other partitions go on. It never commits: it publishes the next offset to commit in
//! its [`PartitionControl`], and the consumer thread commits it (G4: only offsets of
//! batches whose state is durable and whose outputs were acknowledged ever get there).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use flows_core::{EncodedRecord, RawMessage, TopicPartition};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Backoff, BatchConfig};
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, StageError};
use crate::producer::OutputProducer;

/// Shared between a partition's worker and the consumer thread.
#[derive(Debug)]
pub(crate) struct PartitionControl {
    /// Cleared when the partition is revoked (or the engine stops).
    owned: AtomicBool,
    /// Set when the worker must give up its batch at the next step boundary.
    abandoned: AtomicBool,
    notify: Notify,
    /// Signalled when the partition's queue becomes non-empty (or the worker must stop).
    input_ready: Notify,
    /// Offset after the last completed batch, or -1.
    next_offset: AtomicI64,
}

impl PartitionControl {
    pub(crate) fn new() -> Self {
        Self {
            owned: AtomicBool::new(true),
            abandoned: AtomicBool::new(false),
            notify: Notify::new(),
            input_ready: Notify::new(),
            next_offset: AtomicI64::new(-1),
        }
    }

    pub(crate) fn owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// The partition is no longer ours: finish the batch in flight, start no other.
    pub(crate) fn release(&self) {
        self.owned.store(false, Ordering::Release);
        self.input_ready.notify_one();
    }

    /// Wakes the worker: its input queue has messages.
    pub(crate) fn input_arrived(&self) {
        self.input_ready.notify_one();
    }

    /// Waits for input (or a stop) until `deadline`.
    async fn wait_for_input(&self, deadline: Instant) {
        let _ = tokio::time::timeout_at(deadline, self.input_ready.notified()).await;
    }

    pub(crate) fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The offset to commit, if a batch completed.
    pub(crate) fn next_offset(&self) -> Option<i64> {
        let offset = self.next_offset.load(Ordering::Acquire);
        (offset >= 0).then_some(offset)
    }

    /// Sleeps `duration`, waking early if the batch is abandoned.
    async fn sleep(&self, duration: Duration) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.abandoned() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = notified => {}
        }
    }
}

/// Everything a worker needs, shared by the workers of one pipeline.
pub(crate) struct WorkerContext {
    pub(crate) pipeline: Pipeline,
    pub(crate) producer: OutputProducer,
    pub(crate) batch: BatchConfig,
    pub(crate) backoff: Backoff,
    pub(crate) metrics: Metrics,
}

/// How a batch ended.
enum BatchEnd {
    Completed,
    Abandoned,
}

/// The messages of one partition, in offset order.
pub(crate) trait PartitionInput: Send {
    /// Moves available messages into `batch` without waiting, until it is full.
    fn drain(&mut self, batch: &mut Batch);
}

/// A batch being collected, with its limits.
pub(crate) struct Batch {
    pub(crate) messages: Vec<RawMessage>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Batch {
    fn new(config: &BatchConfig) -> Self {
        let max_messages = config.max_messages.max(1);
        Self {
            messages: Vec::with_capacity(max_messages.min(16_384)),
            bytes: 0,
            max_messages,
            max_bytes: config.max_bytes.max(1),
        }
    }

    /// Whether another message may be added.
    pub(crate) fn has_room(&self) -> bool {
        self.messages.len() < self.max_messages && self.bytes < self.max_bytes
    }

    /// Adds a message (a batch may exceed `max_bytes` by its last message).
    pub(crate) fn push(&mut self, message: RawMessage) {
        self.bytes +=
            message.key.as_ref().map_or(0, Vec::len) + message.value.as_ref().map_or(0, Vec::len);
        self.messages.push(message);
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.bytes = 0;
    }
}

/// Longest wait for input before looking again (a safety net; arrivals wake the worker).
const INPUT_RECHECK: Duration = Duration::from_millis(100);

/// Runs the worker of `tp` until the partition is released (revoke or shutdown) or its
/// batch is abandoned; returns the error that must stop the pipeline, if any.
pub(crate) async fn run_partition(
    context: Arc<WorkerContext>,
    tp: TopicPartition,
    control: Arc<PartitionControl>,
    mut input: impl PartitionInput,
) -> Result<(), EngineError> {
    let mut collected = Batch::new(&context.batch);
    // The outputs of one batch after another: kept, so no batch allocates it afresh.
    let mut outputs = Vec::new();
    loop {
        collected.clear();
        loop {
            if !control.owned() || control.abandoned() {
                return Ok(());
            }
            input.drain(&mut collected);
            if !collected.messages.is_empty() {
                break;
            }
            control.wait_for_input(Instant::now() + INPUT_RECHECK).await;
        }
        let deadline = Instant::now() + context.batch.max_delay;
        while collected.has_room() && control.owned() {
            if Instant::now() >= deadline {
                break;
            }
            control
                .wait_for_input(deadline.min(Instant::now() + INPUT_RECHECK))
                .await;
            input.drain(&mut collected);
        }
        let batch = &collected.messages;
        context.metrics.add_consumed(batch.len() as u64);
        let started = Instant::now();
        let end = process_batch(&context, &tp, &control, batch, &mut outputs).await?;
        tracing::debug!(pipeline = %context.pipeline.name, %tp, messages = batch.len(), elapsed = ?started.elapsed(), "batch done");
        match end {
            BatchEnd::Completed => {}
            BatchEnd::Abandoned => {
                context.metrics.add_abandoned_batches(1);
                tracing::info!(pipeline = %context.pipeline.name, %tp, messages = batch.len(), "batch abandoned");
                return Ok(());
            }
        }
    }
}

/// Runs `batch` through the stage, publishes its outputs and marks its offsets
/// committable: in one cycle, or in several when the stage processes it in parts.
async fn process_batch(
    context: &WorkerContext,
    tp: &TopicPartition,
    control: &PartitionControl,
    batch: &[RawMessage],
    outputs: &mut Vec<EncodedRecord>,
) -> Result<BatchEnd, EngineError> {
    let mut rest = batch;
    while !rest.is_empty() {
        let processed = match stage_part(context, tp, control, rest, outputs).await? {
            Some(processed) => processed.clamp(1, rest.len()),
            None => return Ok(BatchEnd::Abandoned),
        };
        let part = &rest[..processed];
        if !publish(context, tp, control, outputs).await? {
            return Ok(BatchEnd::Abandoned);
        }
        let pipeline = &context.pipeline;
        let dead_letters = pipeline
            .dead_letter_topic()
            .map_or(0, |dlq| outputs.iter().filter(|r| *r.topic == *dlq).count());
        if let Some(last) = part.last() {
            control
                .next_offset
                .store(last.offset + 1, Ordering::Release);
        }
        let metrics = &context.metrics;
        metrics.add_published(outputs.len() as u64);
        metrics.add_dead_lettered(dead_letters as u64);
        metrics.add_committed(part.len() as u64);
        metrics.add_batches(1);
        // Published: the records go now, the vector's room stays for the next batch.
        outputs.clear();
        rest = &rest[processed..];
    }
    Ok(BatchEnd::Completed)
}

/// Runs the stage over `batch` until it succeeds, retrying by policy and backoff;
/// returns how many messages it processed, or `None` if the batch was abandoned or
/// fenced.
async fn stage_part(
    context: &WorkerContext,
    tp: &TopicPartition,
    control: &PartitionControl,
    batch: &[RawMessage],
    outputs: &mut Vec<EncodedRecord>,
) -> Result<Option<usize>, EngineError> {
    let pipeline = &context.pipeline;
    let mut attempt: u32 = 0;
    let mut transient: u32 = 0;
    loop {
        outputs.clear();
        if control.abandoned() {
            return Ok(None);
        }
        let on_error = |message: &RawMessage, error: &flows_core::ProcessError| {
            pipeline
                .policy
                .action(attempt, &pipeline.name, message, error)
        };
        let still_owner = || control.owned();
        match pipeline
            .stage
            .run(batch, &on_error, &still_owner, outputs, &context.metrics)
            .await
        {
            Ok(processed) => return Ok(Some(processed)),
            Err(StageError::Message(error)) if attempt < pipeline.policy.retries => {
                tracing::warn!(pipeline = %pipeline.name, %tp, attempt, %error, "message failed; retrying the batch");
                context.metrics.add_function_retries(1);
                control.sleep(pipeline.policy.retry_delay).await;
                attempt += 1;
            }
            Err(StageError::Message(error)) | Err(StageError::Fatal(error)) => {
                tracing::error!(pipeline = %pipeline.name, %tp, %error, "stopping the pipeline");
                return Err(error);
            }
            Err(StageError::Transient(error)) => {
                let delay = context.backoff.delay(transient);
                tracing::warn!(pipeline = %pipeline.name, %tp, %error, retry_in = ?delay, "store unavailable; retrying the batch");
                context.metrics.add_transient_retries(1);
                control.sleep(delay).await;
                transient = transient.saturating_add(1);
            }
            Err(StageError::Fenced) => {
                tracing::warn!(pipeline = %pipeline.name, %tp, "another instance owns these states now; dropping the batch");
                context.metrics.add_conflicts_fenced(1);
                return Ok(None);
            }
        }
    }
}

/// Publishes `outputs` until every one is acknowledged, retrying transient failures;
/// `false` if the batch was abandoned first.
async fn publish(
    context: &WorkerContext,
    tp: &TopicPartition,
    control: &PartitionControl,
    outputs: &[EncodedRecord],
) -> Result<bool, EngineError> {
    let pipeline = &context.pipeline;
    let mut transient: u32 = 0;
    loop {
        if control.abandoned() {
            // States are written; the next owner replays the stored outputs.
            return Ok(false);
        }
        match context.producer.send_all(outputs).await {
            Ok(()) => return Ok(true),
            Err(EngineError::Delivery { topic, source }) if !is_permanent(&source) => {
                let delay = context.backoff.delay(transient);
                tracing::warn!(pipeline = %pipeline.name, %tp, %topic, error = %source, retry_in = ?delay, "publishing failed; retrying");
                context.metrics.add_transient_retries(1);
                control.sleep(delay).await;
                transient = transient.saturating_add(1);
            }
            Err(error) => {
                tracing::error!(pipeline = %pipeline.name, %tp, %error, "stopping the pipeline");
                return Err(error);
            }
        }
    }
}

/// Delivery errors that retrying cannot fix.
fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | InvalidRecord
                | InvalidTopic
        )
    )
}
