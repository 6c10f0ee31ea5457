//! The partition worker: one task per assigned partition, running the batch cycle
//! *collect → stage (state durable) → publish (acknowledged) → mark offset committable*
//! strictly one batch after the other, which is what the replay-aware fold requires.
//!
//! The worker takes its partition's messages from its feed ([`PartitionInput`]), which
//! the feeder thread refills only when it has room, so a busy partition's queue fills
//! up and librdkafka stops fetching it (bounded memory, no pause); other partitions go
//! on. It never commits: it publishes the next offset to commit in
//! its [`PartitionControl`], and the consumer thread commits it (G4: only offsets of
//! batches whose state is durable and whose outputs were acknowledged ever get there).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use flows_core::function::ErrorAction;
use flows_core::{EncodedRecord, ProcessError, RawMessage, TopicPartition};
use rdkafka::error::KafkaError;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{Backoff, BatchConfig};
use crate::delivery::{DeliveryFailure, classify, refused_alone};
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pipeline::{MessageFailed, Outputs, Pipeline, StageContext, StageError};
use crate::producer::OutputProducer;
use crate::trace_context::{batch_span, propagate_trace_context};
use flows_core::cache::StateCache;

/// Shared between a partition's worker and the consumer thread.
#[derive(Debug)]
pub(crate) struct PartitionControl {
    /// Cleared when the partition is revoked (or the engine stops).
    owned: AtomicBool,
    /// Set when the worker must give up its batch at the next step boundary.
    abandoned: AtomicBool,
    notify: Notify,
    /// Signalled when messages arrive in the partition's feed (or the worker must stop).
    input_ready: Notify,
    /// Offset after the last completed batch, or -1.
    next_offset: AtomicI64,
    /// Set while outputs are in the producer's hands: such a batch is not aborted when
    /// abandoned, but waited for until they are settled.
    sending: AtomicBool,
}

impl PartitionControl {
    pub(crate) fn new() -> Self {
        Self {
            owned: AtomicBool::new(true),
            abandoned: AtomicBool::new(false),
            notify: Notify::new(),
            input_ready: Notify::new(),
            next_offset: AtomicI64::new(-1),
            sending: AtomicBool::new(false),
        }
    }

    /// Whether the worker is waiting for the broker to settle outputs it sent.
    pub(crate) fn sending(&self) -> bool {
        self.sending.load(Ordering::SeqCst)
    }

    /// Marks outputs as in the producer's hands until the guard is dropped; `None` if
    /// the batch was abandoned (then nothing may be sent). Checked after the flag is
    /// set, and [`abandon`](Self::abandon) sets its flag before reading this one, so
    /// either the worker sees the abandon or the releaser sees the sending.
    fn start_sending(&self) -> Option<Sending<'_>> {
        self.sending.store(true, Ordering::SeqCst);
        let guard = Sending(self);
        (!self.abandoned()).then_some(guard)
    }

    pub(crate) fn owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// The partition is no longer ours: finish the batch in flight, start no other.
    pub(crate) fn release(&self) {
        self.owned.store(false, Ordering::Release);
        self.input_ready.notify_one();
    }

    /// Wakes the worker: its feed has messages.
    pub(crate) fn input_arrived(&self) {
        self.input_ready.notify_one();
    }

    /// Waits for input (or a stop) until `deadline`.
    async fn wait_for_input(&self, deadline: Instant) {
        let _ = tokio::time::timeout_at(deadline, self.input_ready.notified()).await;
    }

    pub(crate) fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
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

/// Outputs in the producer's hands (see [`PartitionControl::start_sending`]).
struct Sending<'a>(&'a PartitionControl);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sending.store(false, Ordering::SeqCst);
    }
}

/// Everything a worker needs, shared by the workers of one pipeline.
pub(crate) struct WorkerContext {
    pub(crate) pipeline: Pipeline,
    pub(crate) producer: OutputProducer,
    pub(crate) batch: BatchConfig,
    pub(crate) backoff: Backoff,
    pub(crate) metrics: Metrics,
    /// This run's cache of recently written states, shared by its partition workers.
    pub(crate) cache: Option<StateCache>,
}

impl WorkerContext {
    fn stage_context(&self) -> StageContext<'_> {
        StageContext {
            metrics: &self.metrics,
            cache: self.cache.as_ref(),
        }
    }
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

    /// Takes the messages of a finished batch, leaving `spent` empty: dropped where
    /// they were allocated, they are cheaper to free.
    fn give_back(&mut self, spent: &mut Vec<RawMessage>) {
        spent.clear();
    }
}

/// A batch being collected, with its limits.
pub(crate) struct Batch {
    pub(crate) messages: Vec<RawMessage>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Batch {
    pub(crate) fn new(config: &BatchConfig) -> Self {
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
        self.bytes += message_bytes(&message);
        self.messages.push(message);
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.bytes = 0;
    }
}

/// Key and value bytes of a message: what batch and feed byte limits count.
pub(crate) fn message_bytes(message: &RawMessage) -> usize {
    message.key.as_ref().map_or(0, Vec::len) + message.value.as_ref().map_or(0, Vec::len)
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
    let mut outputs = Outputs::default();
    loop {
        input.give_back(&mut collected.messages);
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
        let span = batch_span(&context.pipeline.name, &tp, batch);
        let end = process_batch(&context, &tp, &control, batch, &mut outputs)
            .instrument(span)
            .await?;
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
    outputs: &mut Outputs,
) -> Result<BatchEnd, EngineError> {
    let mut rest = batch;
    while !rest.is_empty() {
        let started = Instant::now();
        let processed = match stage_part(context, tp, control, rest, outputs).await? {
            Some(processed) => processed.clamp(1, rest.len()),
            None => return Ok(BatchEnd::Abandoned),
        };
        let part = &rest[..processed];
        let processing = started.elapsed();
        let publishing = Instant::now();
        if !publish(context, tp, control, part, outputs).await? {
            return Ok(BatchEnd::Abandoned);
        }
        let pipeline = &context.pipeline;
        let dead_letters = pipeline.dead_letter_topic().map_or(0, |dlq| {
            outputs.records.iter().filter(|r| *r.topic == *dlq).count()
        });
        if let Some(last) = part.last() {
            control
                .next_offset
                .store(last.offset + 1, Ordering::Release);
        }
        let metrics = &context.metrics;
        metrics.add_published(outputs.records.len() as u64);
        metrics.add_dead_lettered(dead_letters as u64);
        metrics.add_committed(part.len() as u64);
        metrics.add_batches(1);
        metrics.changed();
        metrics.observe_part(part.len(), processing, publishing.elapsed());
        // Published: the records go now, the vectors' room stays for the next batch.
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
    outputs: &mut Outputs,
) -> Result<Option<usize>, EngineError> {
    let pipeline = &context.pipeline;
    let mut attempt: u32 = 0;
    let mut transient: u32 = 0;
    let mut _stall = None;
    loop {
        outputs.clear();
        if control.abandoned() {
            return Ok(None);
        }
        let on_error = |message: &RawMessage, error: &ProcessError| {
            pipeline
                .policy
                .action(attempt, &pipeline.name, message, error)
        };
        let still_owner = || control.owned();
        match pipeline
            .stage
            .run(
                batch,
                &on_error,
                &still_owner,
                outputs,
                &context.stage_context(),
            )
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
                _stall.get_or_insert_with(|| context.metrics.stall());
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

/// How long a batch may wait for its acknowledgements before the wait is logged and
/// its partition counted as stalled (and again at this interval while it lasts).
const ACK_WAIT_WARNING: Duration = Duration::from_secs(10);

/// Publishes the outputs of `part` until every one is acknowledged or, if the broker
/// refused it for good, replaced by its input's dead letter (by policy); `false` if
/// the batch was abandoned first.
///
/// Transient failures are retried with backoff, resending from the first failed record
/// on (so each partition's records keep their order). A broker refuses a whole request
/// batch for one bad record, so records refused in a batch are sent again one per
/// batch, in order, and only those refused alone are charged to their inputs: the error
/// policy makes each such input's dead letter (headers say which output failed and
/// why) or stops; a stateful pipeline first replaces the input's outputs stored for
/// replay with what was published and the dead letter, so a replay does not repeat the
/// refusal. Configuration errors (no such topic, no permission) and an unusable
/// producer stop.
async fn publish(
    context: &WorkerContext,
    tp: &TopicPartition,
    control: &PartitionControl,
    part: &[RawMessage],
    outputs: &mut Outputs,
) -> Result<bool, EngineError> {
    let pipeline = &context.pipeline;
    propagate_trace_context(part, outputs);
    // Records still to deliver, by index into `outputs`; records from `replacements_from`
    // on are dead letters of refused outputs, which must not be refused in turn.
    let mut pending: Vec<usize> = (0..outputs.records.len()).collect();
    let replacements_from = outputs.records.len();
    let mut refusals = Refusals::default();
    // Whether records go one per request batch (after a refusal).
    let mut alone = false;
    let mut transient: u32 = 0;
    let mut _stall = None;
    while !pending.is_empty() {
        let failures = {
            // States are written; if abandoned, the next owner replays the stored outputs.
            let Some(_sending) = control.start_sending() else {
                return Ok(false);
            };
            // All of them (the usual case), or copies of those left.
            let copies: Vec<EncodedRecord>;
            let records = if pending.len() == outputs.records.len() {
                &outputs.records[..]
            } else {
                copies = pending
                    .iter()
                    .map(|&i| outputs.records[i].clone())
                    .collect();
                &copies[..]
            };
            let producer = &context.producer;
            let send = async {
                if alone {
                    producer.send_each_alone(records).await
                } else {
                    Ok(producer.send_each(records).await)
                }
            };
            tokio::pin!(send);
            loop {
                match tokio::time::timeout(ACK_WAIT_WARNING, &mut send).await {
                    Ok(failures) => break failures?,
                    Err(_) => {
                        tracing::warn!(pipeline = %pipeline.name, %tp, records = records.len(), "still waiting for the broker to acknowledge outputs (is it reachable?)");
                        _stall.get_or_insert_with(|| context.metrics.stall());
                    }
                }
            }
        };
        if failures.is_empty() {
            break;
        }
        let mut refused: Vec<(usize, KafkaError)> = Vec::new();
        let mut isolate = false;
        // The first failure to send again from, and the first transient error.
        let mut resend_from: Option<usize> = None;
        let mut first_transient: Option<(usize, KafkaError)> = None;
        for (position, error) in failures.failures {
            let index = pending[position];
            let record = &outputs.records[index];
            // Refused before it was queued, or by the client: on its own, no other
            // record with it.
            let on_its_own =
                alone || failures.not_queued.contains(&position) || refused_alone(&error);
            match classify(&error) {
                DeliveryFailure::Transient => {
                    resend_from.get_or_insert(position);
                    first_transient.get_or_insert((position, error));
                }
                DeliveryFailure::Record if !on_its_own => {
                    // Perhaps only refused with the rest of its batch: send it alone.
                    resend_from.get_or_insert(position);
                    isolate = true;
                    tracing::info!(pipeline = %pipeline.name, %tp, topic = %record.topic, %error, "a batch of outputs was refused; sending its records one by one to find the refused ones");
                }
                DeliveryFailure::Record if index < replacements_from => {
                    refused.push((index, error))
                }
                DeliveryFailure::Record | DeliveryFailure::Fatal => {
                    let what = if index >= replacements_from {
                        "the dead letter of a refused output cannot be published either"
                    } else {
                        "outputs cannot be published (configuration or producer failure)"
                    };
                    tracing::error!(pipeline = %pipeline.name, %tp, topic = %record.topic, %error, "{what}; stopping the pipeline");
                    return Err(EngineError::Delivery {
                        topic: record.topic.to_string(),
                        source: error,
                    });
                }
            }
        }
        alone |= isolate;
        let mut next: Vec<usize> = match resend_from {
            // From the first failure on, in order, except records refused for good.
            Some(position) => pending[position..]
                .iter()
                .copied()
                .filter(|i| !refused.iter().any(|(r, _)| r == i))
                .collect(),
            None => Vec::new(),
        };
        if !refused.is_empty() {
            let added = outputs.records.len();
            if !dead_letter_refused(context, tp, control, part, outputs, &mut refusals, refused)
                .await?
            {
                return Ok(false);
            }
            next.extend(added..outputs.records.len());
        }
        if let Some((position, error)) = first_transient {
            let delay = context.backoff.delay(transient);
            let topic = &outputs.records[pending[position]].topic;
            tracing::warn!(pipeline = %pipeline.name, %tp, %topic, %error, records = next.len(), retry_in = ?delay, "publishing failed; retrying");
            context.metrics.add_transient_retries(1);
            _stall.get_or_insert_with(|| context.metrics.stall());
            control.sleep(delay).await;
            transient = transient.saturating_add(1);
        }
        pending = next;
    }
    // Refused records were never published: only the others count.
    if !refusals.records.is_empty() {
        let mut index = 0;
        let refused = &refusals.records;
        outputs.records.retain(|_| {
            let kept = !refused.contains(&index);
            index += 1;
            kept
        });
        outputs.inputs.clear();
    }
    Ok(true)
}

/// The refusals of one part's publication, over all its rounds.
#[derive(Debug, Default)]
struct Refusals {
    /// Records refused for good, by index into the part's outputs.
    records: Vec<usize>,
    /// Inputs that got their dead letter (one each, however many outputs were refused).
    dead_lettered: Vec<usize>,
}

/// What a replay of `input` re-emits once some of its outputs were refused: its
/// outputs that were not refused (dead letters appended for it included), in order.
fn stored_after_refusals(outputs: &Outputs, input: usize, refused: &[usize]) -> Vec<EncodedRecord> {
    outputs
        .records
        .iter()
        .zip(&outputs.inputs)
        .enumerate()
        .filter(|(i, (_, from))| **from as usize == input && !refused.contains(i))
        .map(|(_, (record, _))| record.clone())
        .collect()
}

/// Hands each input of a `refused` output that has no dead letter yet to the error
/// policy: its dead letter is appended to `outputs`, or the pipeline stops. Then every
/// input concerned gets its stored outputs replaced (for stages that store them) by
/// what was published for it and its dead letter. `false` if the batch was abandoned
/// or fenced meanwhile.
async fn dead_letter_refused(
    context: &WorkerContext,
    tp: &TopicPartition,
    control: &PartitionControl,
    part: &[RawMessage],
    outputs: &mut Outputs,
    refusals: &mut Refusals,
    refused: Vec<(usize, KafkaError)>,
) -> Result<bool, EngineError> {
    let pipeline = &context.pipeline;
    context.metrics.add_unpublishable(refused.len() as u64);
    let mut concerned: Vec<usize> = Vec::new();
    for (index, error) in refused {
        refusals.records.push(index);
        let input = outputs.inputs[index] as usize;
        if !concerned.contains(&input) {
            concerned.push(input);
        }
        if refusals.dead_lettered.contains(&input) {
            continue;
        }
        refusals.dead_lettered.push(input);
        let message = &part[input];
        let record = &outputs.records[index];
        tracing::warn!(pipeline = %pipeline.name, %tp, topic = %record.topic, %error, offset = message.offset, "an output was refused for good; its input goes through the error policy");
        let error = ProcessError::Unpublishable {
            topic: record.topic.to_string(),
            reason: error.to_string(),
        };
        // No retries: the broker said no for good.
        match pipeline
            .policy
            .action(pipeline.policy.retries, &pipeline.name, message, &error)
        {
            ErrorAction::DeadLetter(records) => outputs.extend(input, records),
            ErrorAction::Abort => {
                tracing::error!(pipeline = %pipeline.name, %tp, offset = message.offset, %error, "stopping the pipeline");
                return Err(EngineError::Message(Box::new(MessageFailed {
                    topic: message.topic.to_string(),
                    partition: message.partition,
                    offset: message.offset,
                    source: error,
                })));
            }
        }
    }
    let replacements: Vec<(&RawMessage, Vec<EncodedRecord>)> = concerned
        .iter()
        .map(|&input| {
            (
                &part[input],
                stored_after_refusals(outputs, input, &refusals.records),
            )
        })
        .collect();
    let mut transient: u32 = 0;
    let still_owner = || control.owned();
    loop {
        if control.abandoned() {
            return Ok(false);
        }
        match pipeline
            .stage
            .replace_outputs(&replacements, &still_owner, &context.stage_context())
            .await
        {
            Ok(()) => return Ok(true),
            Err(StageError::Transient(error)) => {
                let delay = context.backoff.delay(transient);
                tracing::warn!(pipeline = %pipeline.name, %tp, %error, retry_in = ?delay, "store unavailable; retrying");
                context.metrics.add_transient_retries(1);
                control.sleep(delay).await;
                transient = transient.saturating_add(1);
            }
            Err(StageError::Fenced) => {
                context.metrics.add_conflicts_fenced(1);
                return Ok(false);
            }
            Err(StageError::Message(error)) | Err(StageError::Fatal(error)) => return Err(error),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An output record with `value` on topic `out`.
    pub(crate) fn record(value: &str) -> EncodedRecord {
        EncodedRecord {
            topic: "out".into(),
            partition: None,
            key: None,
            value: Some(value.as_bytes().to_vec()),
            headers: flows_core::Headers::new(),
            timestamp: None,
        }
    }

    /// Input 0's outputs r1 and r2 are refused in two rounds of one publication, and
    /// its dead letter was appended after the first: a replay re-emits what was
    /// published for it and the dead letter, never a refused record.
    #[test]
    fn what_a_replay_re_emits_leaves_out_every_refused_output() {
        let mut outputs = Outputs::default();
        outputs.extend(0, [record("r1"), record("r2"), record("r3")]);
        outputs.extend(1, [record("other")]);
        outputs.extend(0, [record("dead letter")]);
        let values = |records: Vec<EncodedRecord>| -> Vec<String> {
            records
                .iter()
                .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into())
                .collect()
        };
        assert_eq!(
            values(stored_after_refusals(&outputs, 0, &[0])),
            ["r2", "r3", "dead letter"]
        );
        assert_eq!(
            values(stored_after_refusals(&outputs, 0, &[0, 1])),
            ["r3", "dead letter"]
        );
        assert_eq!(
            values(stored_after_refusals(&outputs, 1, &[0, 1])),
            ["other"]
        );
    }
}
