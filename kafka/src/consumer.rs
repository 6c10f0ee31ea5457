//! The consumer thread of a running pipeline: serves the consumer's events (rebalances,
//! errors), starts and stops partition workers, and commits the offsets they completed.
//!
//! Each assigned partition's messages are split into a queue of its own before the
//! partition is assigned, and its worker reads that queue directly: a slow partition
//! holds back only itself, and librdkafka stops fetching it when its queue is full
//! (`queued.min.messages`, `queued.max.messages.kbytes`), so memory stays bounded.
//!
//! It runs on its own OS thread because librdkafka calls the rebalance callback from
//! `poll`, and that callback must *block* until the revoked partitions' workers have
//! finished (or abandoned) their batch and their offsets are committed (G5); blocking a
//! runtime thread there could starve the very workers it waits for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use flows_core::{Headers, RawMessage, TopicPartition};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::EngineError;
use crate::worker::{Batch, PartitionControl, PartitionInput, WorkerContext, run_partition};

/// How long `poll` blocks; also the latency of stop requests and commits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often completed offsets are committed (asynchronously) while running.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How often a running pipeline logs its counters.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// How long to wait for an abandoned worker to notice before moving on.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// The consumer type of the engine.
pub(crate) type EngineConsumer = BaseConsumer<EngineContext>;

struct Slot {
    control: Arc<PartitionControl>,
    task: JoinHandle<()>,
    committed: i64,
}

/// State shared by the consumer thread, its rebalance callbacks and the handle.
pub(crate) struct Shared {
    pub(crate) worker: Arc<WorkerContext>,
    pub(crate) runtime: Handle,
    pub(crate) drain_timeout: Duration,
    pub(crate) stop: AtomicBool,
    fatal: Mutex<Option<EngineError>>,
    slots: Mutex<HashMap<TopicPartition, Slot>>,
    /// The consumer, for splitting partition queues inside rebalance callbacks.
    consumer: OnceLock<Weak<EngineConsumer>>,
}

impl Shared {
    pub(crate) fn new(
        worker: Arc<WorkerContext>,
        runtime: Handle,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            worker,
            runtime,
            drain_timeout,
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
            consumer: OnceLock::new(),
        }
    }

    /// Registers the consumer (once, right after it is created).
    pub(crate) fn set_consumer(&self, consumer: &Arc<EngineConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<TopicPartition, Slot>> {
        // A panic while holding the lock leaves the map usable; recover it.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the error that stops the pipeline (the first one wins) and stops.
    pub(crate) fn fail(&self, error: EngineError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(error);
        }
        self.stop.store(true, Ordering::Release);
    }

    fn take_fatal(&self) -> Option<EngineError> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Splits `tp` into its own queue and starts its worker. Called before the
    /// partition is assigned, so no message of it reaches the consumer's main queue.
    fn start_worker(self: &Arc<Self>, tp: &TopicPartition) -> Result<Slot, EngineError> {
        let consumer = self
            .consumer
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| EngineError::Internal("consumer gone during rebalance".into()))?;
        let mut queue = consumer
            .split_partition_queue(&tp.topic, tp.partition)
            .ok_or_else(|| EngineError::Internal(format!("cannot split the queue of {tp}")))?;
        let control = Arc::new(PartitionControl::new());
        let waker = Arc::clone(&control);
        queue.set_nonempty_callback(move || waker.input_arrived());
        let input = QueueInput {
            queue,
            topic: Arc::clone(&tp.topic),
        };
        let shared = Arc::clone(self);
        let task_control = Arc::clone(&control);
        let tp_owned = tp.clone();
        let context = Arc::clone(&self.worker);
        let task = self.runtime.spawn(async move {
            if let Err(error) = run_partition(context, tp_owned, task_control, input).await {
                shared.fail(error);
            }
        });
        tracing::debug!(pipeline = %self.worker.pipeline.name, %tp, "partition worker started");
        Ok(Slot {
            control,
            task,
            committed: -1,
        })
    }

    /// Commits the offsets of completed batches not committed yet.
    fn commit_completed(&self, consumer: &EngineConsumer, mode: CommitMode) {
        let mut list = TopicPartitionList::new();
        let mut slots = self.slots();
        for (tp, slot) in slots.iter_mut() {
            if let Some(next) = slot.control.next_offset()
                && next > slot.committed
                && list
                    .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
                    .is_ok()
            {
                slot.committed = next;
            }
        }
        drop(slots);
        commit(consumer, &list, mode);
    }

    /// Stops the workers of `partitions`: they start no new batch, the one in flight
    /// finishes within the drain timeout or is abandoned; then their offsets are
    /// committed synchronously, before the partitions are released.
    fn release(&self, consumer: &EngineConsumer, partitions: &[TopicPartition]) {
        let released: Vec<(TopicPartition, Slot)> = {
            let mut slots = self.slots();
            partitions
                .iter()
                .filter_map(|tp| slots.remove(tp).map(|slot| (tp.clone(), slot)))
                .collect()
        };
        for (_, slot) in &released {
            slot.control.release();
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let mut list = TopicPartitionList::new();
        for (tp, mut slot) in released {
            let finished = self.runtime.block_on(async {
                tokio::time::timeout_at(deadline, &mut slot.task)
                    .await
                    .is_ok()
            });
            if !finished {
                tracing::warn!(pipeline = %self.worker.pipeline.name, %tp, "in-flight batch did not finish in time; abandoning it");
                slot.control.abandon();
                let _ = self
                    .runtime
                    .block_on(async { tokio::time::timeout(ABANDON_GRACE, &mut slot.task).await });
                slot.task.abort();
                // Wait for the abort, so that the partition's queue is dropped.
                let _ = self.runtime.block_on(&mut slot.task);
            }
            if let Some(next) = slot.control.next_offset()
                && next > slot.committed
            {
                let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
            }
        }
        commit(consumer, &list, CommitMode::Sync);
    }

    /// Stops the pipeline if a worker ended while its partition is still assigned: that
    /// only happens when it panicked (a user function panicking, say), and its partition
    /// would otherwise stall silently.
    fn check_workers(&self) {
        let dead: Vec<TopicPartition> = self
            .slots()
            .iter()
            .filter(|(_, slot)| slot.task.is_finished() && slot.control.owned())
            .map(|(tp, _)| tp.clone())
            .collect();
        if let Some(tp) = dead.first() {
            self.fail(EngineError::Internal(format!(
                "the worker of {tp} ended unexpectedly (a panic in a user function?)"
            )));
        }
    }

    fn owned_partitions(&self) -> Vec<TopicPartition> {
        self.slots().keys().cloned().collect()
    }
}

/// A partition's own queue, read by its worker.
struct QueueInput {
    queue: PartitionQueue<EngineContext>,
    topic: Arc<str>,
}

impl PartitionInput for QueueInput {
    fn drain(&mut self, batch: &mut Batch) {
        while batch.has_room() {
            match self.queue.poll(Duration::ZERO) {
                Some(Ok(message)) => batch.push(to_raw(&message, &self.topic)),
                Some(Err(error)) => {
                    // Fetch errors are reported here; librdkafka retries by itself.
                    tracing::warn!(topic = %self.topic, %error, "partition queue error");
                }
                None => break,
            }
        }
    }
}

fn commit(consumer: &EngineConsumer, list: &TopicPartitionList, mode: CommitMode) {
    if list.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(list, mode) {
        // Not fatal: the batch is done; an uncommitted offset only means a replay,
        // which the state's progress makes harmless.
        tracing::warn!(%error, "offset commit failed; the next owner will replay from the last committed offset");
    }
}

/// The consumer's context: turns rebalance callbacks into worker starts and stops.
pub(crate) struct EngineContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for EngineContext {}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        let name = &shared.worker.pipeline.name;
        match rebalance {
            Rebalance::Revoke(list) => {
                shared.worker.metrics.add_rebalances(1);
                let partitions = partitions_of(list);
                tracing::info!(pipeline = %name, revoked = %list_partitions(&partitions), "partitions revoked");
                shared.release(consumer, &partitions);
            }
            Rebalance::Assign(list) => {
                shared.worker.metrics.add_rebalances(1);
                let partitions = partitions_of(list);
                tracing::info!(pipeline = %name, assigned = %list_partitions(&partitions), "partitions assigned");
                for tp in partitions {
                    if shared.slots().contains_key(&tp) {
                        continue;
                    }
                    match shared.start_worker(&tp) {
                        Ok(slot) => {
                            shared.slots().insert(tp, slot);
                        }
                        Err(error) => shared.fail(error),
                    }
                }
            }
            Rebalance::Error(error) => {
                tracing::warn!(pipeline = %name, %error, "rebalance error");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(pipeline = %self.shared.worker.pipeline.name, %error, "offset commit failed");
        }
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn list_partitions(partitions: &[TopicPartition]) -> String {
    let names: Vec<String> = partitions.iter().map(ToString::to_string).collect();
    names.join(", ")
}

/// How long closing the consumer (leaving the group) may take before it is left behind.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the consumer (leaves the group) on a thread of its own, waiting at most
/// [`CLOSE_TIMEOUT`]. librdkafka can block forever in a close that follows an eviction
/// from the group (`max.poll.interval.ms` exceeded); nothing is left to commit by then,
/// and the broker expires the member by its session timeout, so the stop goes on.
fn close(consumer: Arc<EngineConsumer>, pipeline: &str) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("flows-close-{pipeline}"))
        .spawn(move || {
            drop(consumer);
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(_) => {
            if done_rx.recv_timeout(CLOSE_TIMEOUT).is_err() {
                tracing::warn!(%pipeline, "the consumer did not close in time; leaving it to the session timeout");
            }
        }
        Err(error) => {
            tracing::warn!(%pipeline, %error, "cannot close the consumer on its own thread")
        }
    }
}

/// Converts a consumed message into an owned [`RawMessage`].
fn to_raw(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> RawMessage {
    let mut headers = Headers::new();
    if let Some(borrowed) = message.headers() {
        for header in borrowed.iter() {
            headers.append(header.key, header.value.map(<[u8]>::to_vec));
        }
    }
    RawMessage {
        topic: Arc::clone(topic),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: message.timestamp().to_millis(),
    }
}

/// The consumer thread's body: serve events and commit completed offsets until
/// stopped; then release every partition (finishing in-flight batches) and close.
pub(crate) fn poll_loop(
    consumer: Arc<EngineConsumer>,
    shared: Arc<Shared>,
) -> Result<(), EngineError> {
    let mut last_commit = std::time::Instant::now();
    let mut last_progress_log = std::time::Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        match consumer.poll(POLL_INTERVAL) {
            Some(Ok(message)) => {
                // Every assigned partition has its own queue; a message here means that
                // invariant broke. Stop rather than risk committing past it.
                shared.fail(EngineError::Internal(format!(
                    "message {}/{}@{} arrived outside its partition queue",
                    message.topic(),
                    message.partition(),
                    message.offset()
                )));
            }
            Some(Err(error)) => {
                // librdkafka reconnects by itself; errors here are informational.
                tracing::warn!(pipeline = %shared.worker.pipeline.name, %error, "consumer error");
            }
            None => {}
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            shared.check_workers();
            shared.commit_completed(&consumer, CommitMode::Async);
            last_commit = std::time::Instant::now();
        }
        if last_progress_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            let m = shared.worker.metrics.snapshot();
            tracing::info!(
                pipeline = %shared.worker.pipeline.name,
                committed = m.committed,
                published = m.published,
                dead_lettered = m.dead_lettered,
                transient_retries = m.transient_retries,
                states_read = m.states_read,
                state_cache_hits = m.state_cache_hits,
                partitions = shared.owned_partitions().len(),
                "progress"
            );
            last_progress_log = std::time::Instant::now();
        }
    }
    tracing::info!(pipeline = %shared.worker.pipeline.name, "stopping: finishing in-flight batches");
    let owned = shared.owned_partitions();
    shared.release(&consumer, &owned);
    consumer.unsubscribe();
    close(consumer, &shared.worker.pipeline.name);
    match shared.take_fatal() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
