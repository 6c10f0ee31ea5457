//! The consumer thread of a running pipeline: serves the consumer's events (rebalances,
//! errors), starts and stops partition workers and their feeds, and commits the offsets
//! they completed.
//!
//! Each assigned partition's messages are split into a queue of its own before the
//! partition is assigned. A feeder thread reads them all, in turn, and copies their
//! messages to each partition's [`Feed`], which holds about one batch; its worker takes
//! batches from there. A partition whose feed is full is not read, so librdkafka stops
//! fetching it when its queue is full (`queued.min.messages`,
//! `queued.max.messages.kbytes`): a slow partition holds back only itself, and memory
//! stays bounded. The feeder is not the consumer thread, so that a revoke blocking the
//! consumer thread (below) never starves the partitions that stay.
//!
//! It runs on its own OS thread because librdkafka calls the rebalance callback from
//! `poll`, and that callback must *block* until the revoked partitions' workers have
//! finished (or abandoned) their batch and their offsets are committed (G5); blocking a
//! runtime thread there could starve the very workers it waits for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use flows_core::{RawMessage, TopicPartition};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::EngineError;
use crate::feed::{Feed, FeedInput};
use crate::fetch_queue::FetchQueue;
use crate::metrics::PartitionStats;
use crate::worker::{PartitionControl, WorkerContext, run_partition};

/// How long `poll` blocks; also the latency of stop requests and commits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The longest the feeder thread sleeps with nothing to copy (a queue turning non-empty
/// or a full feed getting room wakes it sooner).
const FEEDER_IDLE: Duration = Duration::from_millis(50);
/// How often completed offsets are committed while running.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How often a running pipeline logs its counters.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// How long to wait for abandoned workers to notice before aborting them.
const ABANDON_GRACE: Duration = Duration::from_secs(5);
/// How much longer than the producer's `message.timeout.ms` an abandoned batch's
/// outputs are waited for: librdkafka reports every record by then.
const SETTLE_MARGIN: Duration = Duration::from_secs(5);
/// Attempts of a synchronous commit (revoke, shutdown), and the first wait between them.
const SYNC_COMMIT_ATTEMPTS: u32 = 4;
const SYNC_COMMIT_BACKOFF: Duration = Duration::from_millis(100);

/// First and longest wait of the commit thread after a failed commit (or until the
/// next rebalance, if sooner).
const COMMIT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(10);

/// How long the commit thread waits for a rebalance to end after a commit refused
/// because of it (the rebalance callback commits the partitions that move).
const COMMIT_RETRY_AFTER_REBALANCE: Duration = Duration::from_secs(30);

/// The longest a revoke can block the group's rebalance: the drain, the grace, then the
/// wait for an abandoned batch's outputs to settle (bounded by `delivery_timeout`, or by
/// the drain timeout again when records never time out). A member that blocks longer
/// than its group's rebalance timeout is dropped from the group while its outputs may
/// still be queued, and they could land after the next owner's.
pub(crate) fn longest_revoke(
    drain_timeout: Duration,
    delivery_timeout: Option<Duration>,
) -> Duration {
    drain_timeout + ABANDON_GRACE + delivery_timeout.map_or(drain_timeout, |t| t + SETTLE_MARGIN)
}

/// Whether a commit failed because the group is rebalancing (the member must rejoin).
fn is_rebalance_error(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(RebalanceInProgress | IllegalGeneration | UnknownMemberId)
    )
}

/// The consumer type of the engine.
pub(crate) type EngineConsumer = BaseConsumer<EngineContext>;

struct Slot {
    control: Arc<PartitionControl>,
    task: JoinHandle<()>,
    /// The offset the broker confirmed as committed (-1: none yet).
    confirmed: i64,
}

/// State shared by the consumer thread, its rebalance callbacks and the handle.
pub(crate) struct Shared {
    pub(crate) worker: Arc<WorkerContext>,
    pub(crate) runtime: Handle,
    pub(crate) drain_timeout: Duration,
    pub(crate) stop: AtomicBool,
    fatal: Mutex<Option<EngineError>>,
    slots: Mutex<HashMap<TopicPartition, Slot>>,
    /// Held by every commit: a commit round in flight when partitions are revoked lands
    /// before the revoke's own commit, never after the next owner's.
    commit_lock: Mutex<()>,
    /// Set while a rebalance callback runs: the commit thread then leaves commits to it.
    rebalancing: AtomicBool,
    /// The assigned partitions' offsets and lag, from librdkafka's statistics.
    pub(crate) partition_stats: Mutex<Vec<PartitionStats>>,
    /// Rebalance callbacks so far: a failed commit is retried after the next one.
    rebalance_events: std::sync::atomic::AtomicU64,
    /// The consumer, for splitting partition queues inside rebalance callbacks.
    consumer: OnceLock<Weak<EngineConsumer>>,
    /// The assigned partitions' queues, read by the feeder thread; added and removed
    /// by rebalance callbacks.
    sources: Mutex<Vec<Source>>,
    /// The feeder thread, once started: woken when there is something to copy.
    feeder: OnceLock<std::thread::Thread>,
}

/// An assigned partition's queue in librdkafka and the feed its messages go to.
struct Source {
    tp: TopicPartition,
    queue: FetchQueue<EngineContext>,
    feed: Arc<Feed>,
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
            commit_lock: Mutex::new(()),
            rebalancing: AtomicBool::new(false),
            partition_stats: Mutex::new(Vec::new()),
            rebalance_events: std::sync::atomic::AtomicU64::new(0),
            consumer: OnceLock::new(),
            sources: Mutex::new(Vec::new()),
            feeder: OnceLock::new(),
        }
    }

    /// Registers the consumer (once, right after it is created).
    pub(crate) fn set_consumer(&self, consumer: &Arc<EngineConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn sources(&self) -> MutexGuard<'_, Vec<Source>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
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
        self.worker.metrics.changed();
    }

    fn take_fatal(&self) -> Option<EngineError> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Splits `tp` into its own queue, which the feeder reads, and starts its worker.
    /// Called before the partition is assigned, so no message of it reaches the
    /// consumer's main queue.
    fn start_worker(self: &Arc<Self>, tp: &TopicPartition) -> Result<Slot, EngineError> {
        let consumer = self
            .consumer
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| EngineError::Internal("consumer gone during rebalance".into()))?;
        let filler = self
            .feeder
            .get()
            .cloned()
            .ok_or_else(|| EngineError::Internal("no feeder thread".into()))?;
        let queue = FetchQueue::split(&consumer, tp, filler.clone())
            .ok_or_else(|| EngineError::Internal(format!("cannot split the queue of {tp}")))?;
        let control = Arc::new(PartitionControl::new());
        let feed = Arc::new(Feed::new(
            &self.worker.batch,
            Arc::clone(&control),
            filler,
            self.worker.metrics.clone(),
        ));
        self.sources().push(Source {
            tp: tp.clone(),
            queue,
            feed: Arc::clone(&feed),
        });
        let input = FeedInput(feed);
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
            confirmed: -1,
        })
    }

    /// Copies what the partitions' queues hold to their feeds, as far as each has room;
    /// returns whether anything was copied. `copied` is scratch space, left empty.
    fn fill_feeds(&self, copied: &mut Vec<RawMessage>) -> bool {
        let mut sources = self.sources();
        let mut moved = false;
        for source in sources.iter_mut() {
            let room = source.feed.room();
            source.queue.take(room.messages, room.bytes, copied);
            if !copied.is_empty() {
                moved = true;
                source.feed.extend(copied);
            }
        }
        moved
    }

    /// Commits the offsets of completed batches not confirmed yet, synchronously (on
    /// the commit thread), so that a failed commit is known and sent again next round.
    /// librdkafka reports the outcome of a manual asynchronous commit to no callback,
    /// so a fire-and-forget commit that failed would leave the group's offsets behind
    /// until a later batch, and a shutdown would never know.
    fn commit_completed(&self, consumer: &EngineConsumer) -> KafkaResult<()> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = TopicPartitionList::new();
        let mut sent: Vec<(TopicPartition, i64)> = Vec::new();
        for (tp, slot) in self.slots().iter() {
            if let Some(next) = slot.control.next_offset()
                && next > slot.confirmed
                && list
                    .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
                    .is_ok()
            {
                sent.push((tp.clone(), next));
            }
        }
        if sent.is_empty() {
            return Ok(());
        }
        match consumer.commit(&list, CommitMode::Sync) {
            Ok(()) => {
                let mut slots = self.slots();
                for (tp, next) in sent {
                    if let Some(slot) = slots.get_mut(&tp) {
                        slot.confirmed = slot.confirmed.max(next);
                    }
                }
                Ok(())
            }
            Err(error) => {
                self.worker.metrics.add_commit_failures(1);
                tracing::warn!(pipeline = %self.worker.pipeline.name, %error, partitions = sent.len(), "offset commit failed; retrying it");
                Err(error)
            }
        }
    }

    /// Commits `list` synchronously, retrying a failure a few times: revoke and
    /// shutdown must leave the group's offsets where processing got to, or the next
    /// owner replays (harmlessly, but needlessly) what was done.
    fn commit_sync(&self, consumer: &EngineConsumer, list: &TopicPartitionList) {
        if list.count() == 0 {
            return;
        }
        let _serial = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let name = &self.worker.pipeline.name;
        for attempt in 0..SYNC_COMMIT_ATTEMPTS {
            match consumer.commit(list, CommitMode::Sync) {
                Ok(()) => return,
                Err(error) => {
                    self.worker.metrics.add_commit_failures(1);
                    tracing::warn!(pipeline = %name, %error, attempt, "offset commit failed");
                    std::thread::sleep(SYNC_COMMIT_BACKOFF * (1 << attempt));
                }
            }
        }
        tracing::warn!(pipeline = %name, "offsets not committed; the next owner replays from the last committed ones (the states' progress makes that harmless)");
    }

    /// Stops the workers of `partitions`: they start no new batch, and the batches in
    /// flight get one common `drain_timeout` to finish. Those that do not are abandoned
    /// all at once: each stops at its next step, or is aborted after one common grace,
    /// except a batch whose outputs are in the producer's hands, which is waited for
    /// until they are settled (acknowledged or failed, within the producer's
    /// `message.timeout.ms`), so that none of them can land after the next owner's
    /// outputs. Then whatever completed and is not confirmed committed is committed
    /// synchronously, before the partitions are released.
    fn release(&self, consumer: &EngineConsumer, partitions: &[TopicPartition]) {
        let mut released: Vec<(TopicPartition, Slot)> = {
            let mut slots = self.slots();
            partitions
                .iter()
                .filter_map(|tp| slots.remove(tp).map(|slot| (tp.clone(), slot)))
                .collect()
        };
        // Their queues are dropped and their feeds emptied: what was fetched and not
        // taken is fetched again by the next owner, from the committed offset.
        self.sources().retain(|source| {
            let released = partitions.contains(&source.tp);
            if released {
                source.feed.clear();
            }
            !released
        });
        for (_, slot) in &released {
            slot.control.release();
        }
        let name = &self.worker.pipeline.name;
        let drain_deadline = tokio::time::Instant::now() + self.drain_timeout;
        self.wait_for_tasks(&mut released, drain_deadline);
        let stuck: Vec<&TopicPartition> = released
            .iter()
            .filter(|(_, slot)| !slot.task.is_finished())
            .map(|(tp, _)| tp)
            .collect();
        if !stuck.is_empty() {
            tracing::warn!(pipeline = %name, partitions = %list_partitions(&stuck), "in-flight batches did not finish in time; abandoning them");
            for (_, slot) in &released {
                slot.control.abandon();
            }
            // A batch already sending does not stop at a step (it waits below), so the
            // grace is only for the others: the group waits for this revoke.
            self.wait_for_tasks_where(
                &mut released,
                tokio::time::Instant::now() + ABANDON_GRACE,
                |control| !control.sending(),
            );
            // A batch whose outputs are queued in the producer is waited for until they
            // are settled; aborting it would leave them to land later.
            let settling: Vec<&TopicPartition> = released
                .iter()
                .filter(|(_, slot)| !slot.task.is_finished() && slot.control.sending())
                .map(|(tp, _)| tp)
                .collect();
            if !settling.is_empty() {
                let settle = self.worker.producer.delivery_timeout();
                tracing::warn!(pipeline = %name, partitions = %list_partitions(&settling), timeout = ?settle, "waiting for the outputs of abandoned batches to be settled");
                let deadline = tokio::time::Instant::now()
                    + settle.map_or(self.drain_timeout, |t| t + SETTLE_MARGIN);
                self.wait_for_tasks(&mut released, deadline);
            }
            for (tp, slot) in &mut released {
                if slot.task.is_finished() {
                    continue;
                }
                if slot.control.sending() {
                    tracing::warn!(pipeline = %name, %tp, "outputs of an abandoned batch are still unsettled; they may land after the next owner's");
                }
                slot.task.abort();
                // Wait for the abort, so that nothing of the worker outlives the revoke.
                let _ = self.runtime.block_on(&mut slot.task);
            }
        }
        let mut list = TopicPartitionList::new();
        for (tp, slot) in &released {
            if let Some(next) = slot.control.next_offset()
                && next > slot.confirmed
            {
                let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
            }
        }
        self.commit_sync(consumer, &list);
    }

    /// Waits until every task of `released` finished or `deadline` passed.
    fn wait_for_tasks(
        &self,
        released: &mut [(TopicPartition, Slot)],
        deadline: tokio::time::Instant,
    ) {
        self.wait_for_tasks_where(released, deadline, |_| true);
    }

    /// Waits until every task of `released` whose control passes `which` finished, or
    /// `deadline` passed.
    fn wait_for_tasks_where(
        &self,
        released: &mut [(TopicPartition, Slot)],
        deadline: tokio::time::Instant,
        which: impl Fn(&PartitionControl) -> bool,
    ) {
        self.runtime.block_on(async {
            for (_, slot) in released.iter_mut() {
                if !slot.task.is_finished() && which(&slot.control) {
                    let _ = tokio::time::timeout_at(deadline, &mut slot.task).await;
                }
            }
        });
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

/// The consumer's context: turns rebalance callbacks into worker starts and stops.
pub(crate) struct EngineContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for EngineContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut partitions: Vec<PartitionStats> = statistics
            .topics
            .values()
            .flat_map(|topic| {
                topic
                    .partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.desired)
                    .map(|p| PartitionStats {
                        topic: topic.topic.clone(),
                        partition: p.partition,
                        committed_offset: p.committed_offset,
                        end_offset: if p.ls_offset >= 0 {
                            p.ls_offset
                        } else {
                            p.hi_offset
                        },
                        lag: p.consumer_lag,
                    })
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        *self
            .shared
            .partition_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = partitions;
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        let name = &shared.worker.pipeline.name;
        shared.rebalancing.store(true, Ordering::Release);
        shared.rebalance_events.fetch_add(1, Ordering::AcqRel);
        let _done = RebalanceDone(shared);
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
                if shared.stop.load(Ordering::Acquire) {
                    // Closing the consumer can rejoin the group (a member dropped from it
                    // does) and be handed partitions it will give back in a moment: the
                    // consumer is going, so no worker is started for them.
                    tracing::info!(pipeline = %name, "stopping: partitions assigned during close are left to the group");
                } else {
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
            }
            Rebalance::Error(error) => {
                tracing::warn!(pipeline = %name, %error, "rebalance error");
            }
        }
        let assigned = shared.slots().len() as u64;
        shared.worker.metrics.set_assigned_partitions(assigned);
    }
}

/// Clears [`Shared::rebalancing`] when a rebalance callback ends.
struct RebalanceDone<'a>(&'a Shared);

impl Drop for RebalanceDone<'_> {
    fn drop(&mut self) {
        self.0.rebalancing.store(false, Ordering::Release);
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn list_partitions<T: std::fmt::Display>(partitions: &[T]) -> String {
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

/// Starts the thread that copies the partitions' messages to their feeds until the
/// pipeline stops (see the module docs).
fn start_feeder(shared: Arc<Shared>) -> Result<std::thread::JoinHandle<()>, EngineError> {
    let name = shared.worker.pipeline.name.clone();
    let thread_shared = Arc::clone(&shared);
    let handle = std::thread::Builder::new()
        .name(format!("flows-feed-{name}"))
        .spawn(move || {
            let mut copied = Vec::new();
            while !thread_shared.stop.load(Ordering::Acquire) {
                if !thread_shared.fill_feeds(&mut copied) {
                    std::thread::park_timeout(FEEDER_IDLE);
                }
            }
        })
        .map_err(|e| EngineError::Internal(format!("cannot start the feeder of {name}: {e}")))?;
    let _ = shared.feeder.set(handle.thread().clone());
    Ok(handle)
}

/// Empties [`Shared::sources`] when dropped.
struct ClearSources<'a>(&'a Shared);

impl Drop for ClearSources<'_> {
    fn drop(&mut self) {
        self.0.sources().clear();
    }
}

/// Starts the thread that commits completed offsets every [`COMMIT_INTERVAL`] until
/// the pipeline stops. Commits are synchronous, to know their outcome, and on a thread
/// of their own so that a slow coordinator delays neither rebalances nor stop requests.
fn start_committer(
    consumer: Arc<EngineConsumer>,
    shared: Arc<Shared>,
) -> Option<std::thread::JoinHandle<()>> {
    let name = shared.worker.pipeline.name.clone();
    let shared_on_error = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name(format!("flows-commit-{name}"))
        .spawn(move || {
            // After a failed commit: the rebalance count then, and until when to wait
            // for it to change. A commit sent while the group rebalances is held until
            // the rebalance ends, and librdkafka holds the rebalance until outstanding
            // commits end: retrying at once would stretch every rebalance.
            let mut paused: Option<(u64, std::time::Instant)> = None;
            let mut failures: u32 = 0;
            while !shared.stop.load(Ordering::Acquire) {
                std::thread::sleep(COMMIT_INTERVAL);
                if shared.rebalancing.load(Ordering::Acquire) {
                    continue;
                }
                let events = shared.rebalance_events.load(Ordering::Acquire);
                if let Some((at, until)) = paused {
                    if at == events && std::time::Instant::now() < until {
                        continue;
                    }
                    paused = None;
                }
                match shared.commit_completed(&consumer) {
                    Ok(()) => failures = 0,
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        // The group is rebalancing: its callback commits what matters.
                        let wait = if is_rebalance_error(&error) {
                            COMMIT_RETRY_AFTER_REBALANCE
                        } else {
                            COMMIT_RETRY_BACKOFF
                                .saturating_mul(1 << (failures - 1).min(4))
                                .min(COMMIT_RETRY_MAX)
                        };
                        paused = Some((events, std::time::Instant::now() + wait));
                    }
                }
            }
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(error) => {
            shared_on_error.fail(EngineError::Internal(format!(
                "cannot start the commit thread of {name}: {error}"
            )));
            None
        }
    }
}

/// The consumer thread's body: serve events and commit completed offsets until
/// stopped; then release every partition (finishing in-flight batches) and close.
pub(crate) fn poll_loop(
    consumer: Arc<EngineConsumer>,
    shared: Arc<Shared>,
) -> Result<(), EngineError> {
    // Partition queues hold the consumer: none may outlive this function, however it
    // ends, or the consumer would never be closed.
    let sources = ClearSources(&shared);
    let feeder = start_feeder(Arc::clone(&shared))?;
    let committer = start_committer(Arc::clone(&consumer), Arc::clone(&shared));
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
    // Release first: the workers stop at once, and the commit thread, which sees the
    // stop, commits nothing of the released partitions after their final commit.
    let owned = shared.owned_partitions();
    shared.release(&consumer, &owned);
    shared.worker.metrics.set_assigned_partitions(0);
    if feeder.join().is_err() {
        tracing::warn!(pipeline = %shared.worker.pipeline.name, "the feeder thread panicked");
    }
    drop(sources);
    if let Some(committer) = committer
        && committer.join().is_err()
    {
        tracing::warn!(pipeline = %shared.worker.pipeline.name, "the commit thread panicked");
    }
    consumer.unsubscribe();
    close(consumer, &shared.worker.pipeline.name);
    match shared.take_fatal() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
