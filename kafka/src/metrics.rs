//! Counters of what a running pipeline did, readable at any time.
//!
//! Every counter is also visible in the logs (`tracing`), but numbers are what
//! dashboards, tests and the examples need: [`Metrics::snapshot`] reads them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histograms' buckets.
const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Upper bounds of the batch size histogram's buckets, in messages.
const SIZE_BOUNDS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 50_000.0,
];

/// A histogram with fixed buckets: one atomic counter per bucket, no lock.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; 13],
    /// Sum of the observations, in millionths (microseconds for latencies).
    sum_millionths: AtomicU64,
}

impl Histogram {
    fn observe(&self, bounds: &[f64; 12], value: f64) {
        let bucket = bounds.iter().position(|&b| value <= b).unwrap_or(12);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_millionths
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    fn snapshot(&self, bounds: &[f64; 12]) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(13);
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((bounds.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        HistogramSnapshot {
            buckets,
            count: cumulative,
            sum: self.sum_millionths.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram at one moment, as Prometheus renders it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, cumulative; the last bound is
    /// infinity.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations.
    pub sum: f64,
}

/// The distributions of a pipeline's batches.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Histograms {
    /// Messages per batch part (state written and outputs published together).
    pub batch_messages: HistogramSnapshot,
    /// Seconds processing a part: reading states, folding, writing states or rows
    /// (retries included).
    pub process_seconds: HistogramSnapshot,
    /// Seconds publishing a part's outputs until every one is acknowledged.
    pub publish_seconds: HistogramSnapshot,
    /// Seconds in the pipeline's functions and the engine's own work on a part
    /// (decoding, folding, encoding), store calls excluded.
    pub fold_seconds: HistogramSnapshot,
    /// Seconds reading a part's states from the store (stateful pipelines; cache hits
    /// cost nothing here).
    pub store_read_seconds: HistogramSnapshot,
    /// Seconds writing a part's states or rows to the store (stateful and materialise
    /// pipelines), conflicting attempts included.
    pub store_write_seconds: HistogramSnapshot,
}

/// Live counters of one pipeline run; cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    consumed: AtomicU64,
    committed: AtomicU64,
    published: AtomicU64,
    batches: AtomicU64,
    dead_lettered: AtomicU64,
    transient_retries: AtomicU64,
    function_retries: AtomicU64,
    abandoned_batches: AtomicU64,
    conflicts_fenced: AtomicU64,
    rebalances: AtomicU64,
    states_read: AtomicU64,
    state_cache_hits: AtomicU64,
    batches_split: AtomicU64,
    unpublishable: AtomicU64,
    stalled_partitions: AtomicU64,
    commit_failures: AtomicU64,
    state_conflicts: AtomicU64,
    assigned_partitions: AtomicU64,
    buffered_messages: AtomicU64,
    batch_messages: Histogram,
    process_seconds: Histogram,
    publish_seconds: Histogram,
    fold_seconds: Histogram,
    store_read_seconds: Histogram,
    store_write_seconds: Histogram,
    /// Woken when the pipeline made progress or changed course (see `wait_for`).
    changed: tokio::sync::Notify,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Messages received from Kafka (including ones received again after a retry).
    pub consumed: u64,
    /// Messages whose batch completed: state written, outputs acknowledged, offset
    /// committed (or handed to the commit; see G4 in the crate docs).
    pub committed: u64,
    /// Output records acknowledged by the broker (dead letters included).
    pub published: u64,
    /// Batches completed.
    pub batches: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Retries after a transient failure (store or broker unavailable).
    pub transient_retries: u64,
    /// Retries of a batch after a message failed, under a retrying error policy.
    pub function_retries: u64,
    /// Batches abandoned (not published, not committed) on revoke or shutdown.
    pub abandoned_batches: u64,
    /// Batches dropped because another instance had written the same states after the
    /// partition was taken away (the version check fenced this instance).
    pub conflicts_fenced: u64,
    /// Rebalance events seen (assignments and revocations).
    pub rebalances: u64,
    /// States read from the store by stateful batches (new keys, cache misses, and
    /// every state of a batch retried after a conflict or a failure).
    pub states_read: u64,
    /// States a stateful batch found in the pipeline's cache of recently written ones
    /// instead of reading them: with `states_read`, how well
    /// [`StateCacheLimits`](crate::StateCacheLimits) fit the hot keys.
    pub state_cache_hits: u64,
    /// Batches processed in parts: a state would otherwise have grown past the store's
    /// limit (a hot key's outputs kept for replay), or another writer of the same
    /// states kept the parts small (see `state_conflicts`).
    pub batches_split: u64,
    /// Outputs the broker or client refused for good (too large, no such partition, a
    /// timestamp or policy the broker rejects): their inputs went through the error
    /// policy.
    pub unpublishable: u64,
    /// Partitions waiting right now on something outside the engine: retrying a store
    /// or broker failure, or still awaiting acknowledgements after a while (a gauge;
    /// each stall is also logged, with its reason, as it goes on).
    pub stalled_partitions: u64,
    /// Offset commits the broker refused or did not answer; each is retried (the next
    /// commit carries the same or a later offset), and revoke and shutdown commit what
    /// is outstanding synchronously.
    pub commit_failures: u64,
    /// State writes that conflicted with another writer of the same states (another
    /// partition writing the same ids, or a former owner): each retries the first half
    /// of its batch, down to one message, so every writer makes progress.
    pub state_conflicts: u64,
    /// Partitions assigned to this pipeline right now (a gauge).
    pub assigned_partitions: u64,
    /// Messages taken from Kafka and waiting for their partition's worker right now (a
    /// gauge): about a batch per partition at most.
    pub buffered_messages: u64,
}

macro_rules! counter {
    ($($(#[$attr:meta])* $name:ident => $field:ident),* $(,)?) => {
        impl Metrics {
            $(
                $(#[$attr])*
                pub(crate) fn $name(&self, n: u64) {
                    self.inner.$field.fetch_add(n, Ordering::Relaxed);
                }
            )*

            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($field: self.inner.$field.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counter! {
    /// Adds consumed messages.
    add_consumed => consumed,
    /// Adds committed messages.
    add_committed => committed,
    /// Adds published records.
    add_published => published,
    /// Adds completed batches.
    add_batches => batches,
    /// Adds dead-lettered messages.
    add_dead_lettered => dead_lettered,
    /// Adds transient retries.
    add_transient_retries => transient_retries,
    /// Adds function retries.
    add_function_retries => function_retries,
    /// Adds abandoned batches.
    add_abandoned_batches => abandoned_batches,
    /// Adds fenced batches.
    add_conflicts_fenced => conflicts_fenced,
    /// Adds rebalance events.
    add_rebalances => rebalances,
    /// Adds states read from the store.
    add_states_read => states_read,
    /// Adds states served by the state cache.
    add_state_cache_hits => state_cache_hits,
    /// Adds batches processed in parts.
    add_batches_split => batches_split,
    /// Adds outputs refused for good.
    add_unpublishable => unpublishable,
    /// Adds stalled partitions (a gauge: see `Stall`).
    add_stalled_partitions => stalled_partitions,
    /// Adds failed offset commits.
    add_commit_failures => commit_failures,
    /// Adds conflicting state writes.
    add_state_conflicts => state_conflicts,
    /// Adds assigned partitions (a gauge, normally set: see `set_assigned_partitions`).
    #[allow(dead_code)]
    add_assigned_partitions => assigned_partitions,
    /// Adds messages waiting for their worker (a gauge: see `sub_buffered_messages`).
    add_buffered_messages => buffered_messages,
}

impl Metrics {
    /// New counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a completed part: its size and how long processing and publishing took.
    pub(crate) fn observe_part(&self, messages: usize, process: Duration, publish: Duration) {
        let inner = &self.inner;
        inner.batch_messages.observe(&SIZE_BOUNDS, messages as f64);
        inner
            .process_seconds
            .observe(&LATENCY_BOUNDS, process.as_secs_f64());
        inner
            .publish_seconds
            .observe(&LATENCY_BOUNDS, publish.as_secs_f64());
    }

    /// Records where a stage's time on a part went: its functions (`fold`), and the
    /// store's reads and writes for stages that call a store.
    pub(crate) fn observe_stage(
        &self,
        fold: Duration,
        store_read: Option<Duration>,
        store_write: Option<Duration>,
    ) {
        let inner = &self.inner;
        inner
            .fold_seconds
            .observe(&LATENCY_BOUNDS, fold.as_secs_f64());
        if let Some(read) = store_read {
            inner
                .store_read_seconds
                .observe(&LATENCY_BOUNDS, read.as_secs_f64());
        }
        if let Some(write) = store_write {
            inner
                .store_write_seconds
                .observe(&LATENCY_BOUNDS, write.as_secs_f64());
        }
    }

    /// The batch distributions.
    pub fn histograms(&self) -> Histograms {
        let inner = &self.inner;
        Histograms {
            batch_messages: inner.batch_messages.snapshot(&SIZE_BOUNDS),
            process_seconds: inner.process_seconds.snapshot(&LATENCY_BOUNDS),
            publish_seconds: inner.publish_seconds.snapshot(&LATENCY_BOUNDS),
            fold_seconds: inner.fold_seconds.snapshot(&LATENCY_BOUNDS),
            store_read_seconds: inner.store_read_seconds.snapshot(&LATENCY_BOUNDS),
            store_write_seconds: inner.store_write_seconds.snapshot(&LATENCY_BOUNDS),
        }
    }

    /// Wakes everyone in [`Metrics::wait_for`]: a batch completed, a rebalance happened,
    /// or the pipeline is stopping.
    pub(crate) fn changed(&self) {
        self.inner.changed.notify_waiters();
    }

    /// Waits until `condition` holds for the counters, checked now and again whenever
    /// the pipeline completes a batch, sees a rebalance or stops; returns the counters
    /// that satisfied it. It waits forever if the condition never holds: bound it with
    /// `tokio::time::timeout`, or use [`RunningPipeline::wait_for`](crate::RunningPipeline::wait_for),
    /// which also returns when the pipeline stops.
    pub async fn wait_for(
        &self,
        mut condition: impl FnMut(&MetricsSnapshot) -> bool,
    ) -> MetricsSnapshot {
        loop {
            // Registered before the check, so a change between the two is not missed.
            let notified = self.inner.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let snapshot = self.snapshot();
            if condition(&snapshot) {
                return snapshot;
            }
            notified.await;
        }
    }

    /// Removes messages from the waiting ones (taken by a worker, or dropped on revoke).
    pub(crate) fn sub_buffered_messages(&self, n: u64) {
        self.inner.buffered_messages.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets the number of partitions assigned right now.
    pub(crate) fn set_assigned_partitions(&self, n: u64) {
        self.inner.assigned_partitions.store(n, Ordering::Relaxed);
        self.changed();
    }

    /// Counts a partition as stalled until the returned guard is dropped.
    pub(crate) fn stall(&self) -> Stall {
        self.add_stalled_partitions(1);
        Stall {
            metrics: self.clone(),
        }
    }
}

/// Where one assigned partition stands, from librdkafka's statistics (refreshed every
/// `statistics.interval.ms`, 5 s by default).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (-1: none yet).
    pub committed_offset: i64,
    /// The partition's end: the high watermark, or the last stable offset for the
    /// engine's read-committed consumers (-1: not known yet).
    pub end_offset: i64,
    /// Messages not committed yet: `end_offset - committed_offset` (-1: not known yet).
    pub lag: i64,
}

/// A partition counted in [`MetricsSnapshot::stalled_partitions`] while this lives.
#[derive(Debug)]
pub(crate) struct Stall {
    metrics: Metrics,
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.metrics
            .inner
            .stalled_partitions
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_each_part_once_in_cumulative_buckets() {
        let metrics = Metrics::new();
        metrics.observe_part(3, Duration::from_millis(2), Duration::from_millis(7));
        metrics.observe_part(10_000, Duration::from_secs(20), Duration::from_millis(1));
        let h = metrics.histograms();
        assert_eq!(h.batch_messages.count, 2);
        // 3 messages: first in the `<= 5` bucket; 10,000 in `<= 10,000`.
        let at = |s: &HistogramSnapshot, bound: f64| {
            s.buckets.iter().find(|(b, _)| *b == bound).map(|(_, c)| *c)
        };
        assert_eq!(at(&h.batch_messages, 2.0), Some(0));
        assert_eq!(at(&h.batch_messages, 5.0), Some(1));
        assert_eq!(at(&h.batch_messages, 10_000.0), Some(2));
        assert_eq!(
            at(&h.process_seconds, 10.0),
            Some(1),
            "20 s is above every bound"
        );
        assert_eq!(at(&h.process_seconds, f64::INFINITY), Some(2));
        assert!((h.process_seconds.sum - 20.002).abs() < 1e-6);
        assert_eq!(at(&h.publish_seconds, 0.001), Some(1));
        assert_eq!(h.publish_seconds.count, 2);
    }

    /// A waiter wakes on the change that satisfies it, not before and without polling.
    #[tokio::test]
    async fn wait_for_wakes_when_the_condition_holds() {
        let metrics = Metrics::new();
        let waiter = tokio::spawn({
            let metrics = metrics.clone();
            async move { metrics.wait_for(|m| m.committed >= 3).await }
        });
        tokio::task::yield_now().await;
        metrics.add_committed(2);
        metrics.changed();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        metrics.add_committed(1);
        metrics.changed();
        let snapshot = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(snapshot.committed, 3);
    }

    #[test]
    fn stage_timings_observe_the_store_only_where_it_was_called() {
        let metrics = Metrics::new();
        metrics.observe_stage(Duration::from_millis(3), None, None);
        metrics.observe_stage(
            Duration::from_millis(1),
            Some(Duration::from_millis(4)),
            Some(Duration::from_millis(30)),
        );
        let h = metrics.histograms();
        assert_eq!(h.fold_seconds.count, 2);
        assert_eq!(h.store_read_seconds.count, 1);
        assert_eq!(h.store_write_seconds.count, 1);
        assert!((h.store_write_seconds.sum - 0.030).abs() < 1e-6);
    }
}
