//! The consumer thread of a running pipeline: polls Kafka, hands each message to its
//! partition's worker, commits the offsets workers completed, and handles rebalances.
//!
//! It runs on its own OS thread because librdkafka calls the rebalance callback from
//! `poll`, and that callback must *block* until the revoked partitions' workers have
//! finished (or abandoned) their batch and their offsets are committed (G5); blocking a
//! runtime thread there could starve the very workers it waits for.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flows_core::{Headers, RawMessage, TopicPartition};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

use crate::error::EngineError;
use crate::worker::{PartitionControl, WorkerContext, run_partition};

/// How long `poll` blocks; also the latency of stop requests and commits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often completed offsets are committed (asynchronously) while running.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How long to wait for an abandoned worker to notice before moving on.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

struct Slot {
    sender: mpsc::Sender<RawMessage>,
    /// Messages that did not fit in the worker's channel; the partition is paused
    /// while this is not empty, so it stays small.
    pending: VecDeque<RawMessage>,
    paused: bool,
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
}

impl Shared {
    pub(crate) fn new(worker: Arc<WorkerContext>, runtime: Handle, drain_timeout: Duration) -> Self {
        Self {
            worker,
            runtime,
            drain_timeout,
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
        }
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

    fn spawn_worker(self: &Arc<Self>, tp: &TopicPartition) -> Slot {
        let capacity = self.worker.batch.max_messages.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        let control = Arc::new(PartitionControl::new());
        let shared = Arc::clone(self);
        let task_control = Arc::clone(&control);
        let tp_owned = tp.clone();
        let context = Arc::clone(&self.worker);
        let task = self.runtime.spawn(async move {
            if let Err(error) = run_partition(context, tp_owned, task_control, receiver).await {
                shared.fail(error);
            }
        });
        tracing::debug!(pipeline = %self.worker.pipeline.name, %tp, "partition worker started");
        Slot {
            sender,
            pending: VecDeque::new(),
            paused: false,
            control,
            task,
            committed: -1,
        }
    }

    /// Hands `message` to its partition's worker, pausing the partition when the
    /// worker is behind.
    fn dispatch(self: &Arc<Self>, consumer: &BaseConsumer<EngineContext>, message: RawMessage) {
        let tp = message.topic_partition();
        let mut slots = self.slots();
        let slot = slots
            .entry(tp.clone())
            .or_insert_with(|| self.spawn_worker(&tp));
        if !slot.pending.is_empty() {
            slot.pending.push_back(message);
            return;
        }
        match slot.sender.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                slot.pending.push_back(message);
                if !slot.paused {
                    slot.paused = pause(consumer, &tp, true);
                }
            }
            // The worker stopped with an error; the pipeline is stopping and this
            // message is not committed.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Moves pending messages into workers' channels; resumes drained partitions.
    fn flush_pending(&self, consumer: &BaseConsumer<EngineContext>) {
        let mut slots = self.slots();
        for (tp, slot) in slots.iter_mut() {
            while let Some(message) = slot.pending.pop_front() {
                match slot.sender.try_send(message) {
                    Ok(()) => {}
                    Err(TrySendError::Full(message)) => {
                        slot.pending.push_front(message);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        slot.pending.clear();
                        break;
                    }
                }
            }
            if slot.pending.is_empty() && slot.paused {
                slot.paused = !pause(consumer, tp, false);
            }
        }
    }

    /// Commits the offsets of completed batches not committed yet.
    fn commit_completed(&self, consumer: &BaseConsumer<EngineContext>, mode: CommitMode) {
        let mut list = TopicPartitionList::new();
        let mut slots = self.slots();
        for (tp, slot) in slots.iter_mut() {
            if let Some(next) = slot.control.next_offset()
                && next > slot.committed
            {
                if list
                    .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
                    .is_ok()
                {
                    slot.committed = next;
                }
            }
        }
        drop(slots);
        commit(consumer, &list, mode);
    }

    /// Stops the workers of `partitions`: no new input, the in-flight batch finishes
    /// within the drain timeout or is abandoned; then their offsets are committed
    /// synchronously, before the partitions are released.
    fn release(&self, consumer: &BaseConsumer<EngineContext>, partitions: &[TopicPartition]) {
        let released: Vec<(TopicPartition, Slot)> = {
            let mut slots = self.slots();
            partitions
                .iter()
                .filter_map(|tp| slots.remove(tp).map(|slot| (tp.clone(), slot)))
                .collect()
        };
        if released.is_empty() {
            return;
        }
        let mut finishing = Vec::with_capacity(released.len());
        for (tp, slot) in released {
            slot.control.release();
            // Dropping the sender closes the channel: the worker finishes what it holds.
            let Slot {
                control,
                task,
                committed,
                ..
            } = slot;
            finishing.push((tp, control, task, committed));
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let mut list = TopicPartitionList::new();
        for (tp, control, mut task, committed) in finishing {
            let finished = self
                .runtime
                .block_on(async { tokio::time::timeout_at(deadline, &mut task).await.is_ok() });
            if !finished {
                tracing::warn!(pipeline = %self.worker.pipeline.name, %tp, "in-flight batch did not finish in time; abandoning it");
                control.abandon();
                let _ = self
                    .runtime
                    .block_on(async { tokio::time::timeout(ABANDON_GRACE, &mut task).await });
                task.abort();
            }
            if let Some(next) = control.next_offset()
                && next > committed
            {
                let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
            }
        }
        commit(consumer, &list, CommitMode::Sync);
    }

    fn owned_partitions(&self) -> Vec<TopicPartition> {
        self.slots().keys().cloned().collect()
    }
}

fn pause(consumer: &BaseConsumer<EngineContext>, tp: &TopicPartition, pause: bool) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(&tp.topic, tp.partition);
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%tp, %error, pause, "could not pause/resume partition");
            false
        }
    }
}

fn commit(consumer: &BaseConsumer<EngineContext>, list: &TopicPartitionList, mode: CommitMode) {
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
        if let Rebalance::Revoke(list) = rebalance {
            self.shared.worker.metrics.add_rebalances(1);
            let partitions = partitions_of(list);
            tracing::info!(pipeline = %self.shared.worker.pipeline.name, revoked = ?partitions, "partitions revoked");
            self.shared.release(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.shared.worker.metrics.add_rebalances(1);
                let partitions = partitions_of(list);
                tracing::info!(pipeline = %self.shared.worker.pipeline.name, assigned = ?partitions, "partitions assigned");
                let mut slots = self.shared.slots();
                for tp in partitions {
                    if !slots.contains_key(&tp) {
                        let slot = self.shared.spawn_worker(&tp);
                        slots.insert(tp, slot);
                    }
                }
            }
            Rebalance::Error(error) => {
                tracing::warn!(pipeline = %self.shared.worker.pipeline.name, %error, "rebalance error");
            }
            Rebalance::Revoke(_) => {}
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

/// Converts a consumed message into an owned [`RawMessage`], sharing topic names.
fn to_raw(message: &BorrowedMessage<'_>, topics: &mut HashMap<String, Arc<str>>) -> RawMessage {
    let topic = match topics.get(message.topic()) {
        Some(topic) => Arc::clone(topic),
        None => {
            let topic: Arc<str> = Arc::from(message.topic());
            topics.insert(message.topic().to_owned(), Arc::clone(&topic));
            topic
        }
    };
    let mut headers = Headers::new();
    if let Some(borrowed) = message.headers() {
        for header in borrowed.iter() {
            headers.append(header.key, header.value.map(<[u8]>::to_vec));
        }
    }
    RawMessage {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: message.timestamp().to_millis(),
    }
}

/// The consumer thread's body: poll, dispatch, commit, until stopped; then release
/// every partition (finishing in-flight batches) and close the consumer.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<EngineContext>,
    shared: Arc<Shared>,
) -> Result<(), EngineError> {
    let mut topics = HashMap::new();
    let mut last_commit = std::time::Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        match consumer.poll(POLL_INTERVAL) {
            Some(Ok(message)) => {
                let raw = to_raw(&message, &mut topics);
                drop(message);
                shared.worker.metrics.add_consumed(1);
                shared.dispatch(&consumer, raw);
            }
            Some(Err(error)) => {
                // librdkafka reconnects by itself; errors here are informational.
                tracing::warn!(pipeline = %shared.worker.pipeline.name, %error, "consumer error");
            }
            None => {}
        }
        shared.flush_pending(&consumer);
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            shared.commit_completed(&consumer, CommitMode::Async);
            last_commit = std::time::Instant::now();
        }
    }
    tracing::info!(pipeline = %shared.worker.pipeline.name, "stopping: finishing in-flight batches");
    let owned = shared.owned_partitions();
    shared.release(&consumer, &owned);
    consumer.unsubscribe();
    drop(consumer);
    match shared.take_fatal() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
