//! A partition's feed: the messages the feeder thread took from the partition's queue
//! for its worker, at most about one batch of them.
//!
//! One thread (the feeder, see consumer.rs) takes every partition's messages from
//! librdkafka and copies them here; each partition's worker takes them from its own
//! feed. A feed with no room is not refilled, so its partition's queue in librdkafka
//! fills up and librdkafka stops fetching that partition: a slow partition holds back
//! only itself, and memory stays bounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;

use flows_core::RawMessage;

use crate::config::BatchConfig;
use crate::metrics::Metrics;
use crate::worker::{Batch, PartitionControl, PartitionInput, message_bytes};

/// The messages waiting for one partition's worker.
pub(crate) struct Feed {
    queue: Mutex<Queued>,
    /// Woken when messages arrive.
    control: Arc<PartitionControl>,
    /// The feeder thread, woken when a full feed gets room.
    filler: Thread,
    max_messages: usize,
    max_bytes: usize,
    metrics: Metrics,
}

#[derive(Default)]
struct Queued {
    messages: VecDeque<RawMessage>,
    /// Key and value bytes of `messages`.
    bytes: usize,
    /// The messages of the worker's last finished batch, for the feeder to drop: it
    /// allocated them, and a thread frees its own allocations for less (freed on the
    /// worker's thread they took mimalloc's cross-thread path). When empty, a vector
    /// with room for a batch, which the worker takes in exchange.
    spent: Vec<RawMessage>,
}

impl Queued {
    fn is_full(&self, feed: &Feed) -> bool {
        self.messages.len() >= feed.max_messages || self.bytes >= feed.max_bytes
    }
}

/// How much more a feed takes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Room {
    /// Messages.
    pub(crate) messages: usize,
    /// Key and value bytes (the last message taken may exceed them).
    pub(crate) bytes: usize,
}

impl Feed {
    /// A feed holding up to one batch of `batch`'s size; `filler` is the thread that
    /// fills it.
    pub(crate) fn new(
        batch: &BatchConfig,
        control: Arc<PartitionControl>,
        filler: Thread,
        metrics: Metrics,
    ) -> Self {
        let queued = Queued {
            spent: Vec::with_capacity(batch.max_messages.clamp(1, 16_384)),
            ..Queued::default()
        };
        Self {
            queue: Mutex::new(queued),
            control,
            filler,
            max_messages: batch.max_messages.max(1),
            max_bytes: batch.max_bytes.max(1),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        // Nothing a panic could leave half-done is kept under this lock; recover it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much more the feed takes now (nothing when full). A feed may exceed its
    /// byte limit by the last message added, as a batch does. Called by the feeder,
    /// which drops the messages the worker gave back meanwhile.
    pub(crate) fn room(&self) -> Room {
        let (room, spent) = {
            let mut queued = self.lock();
            let room = if queued.is_full(self) {
                Room {
                    messages: 0,
                    bytes: 0,
                }
            } else {
                Room {
                    messages: self.max_messages - queued.messages.len(),
                    bytes: self.max_bytes - queued.bytes,
                }
            };
            let spent = (!queued.spent.is_empty()).then(|| std::mem::take(&mut queued.spent));
            (room, spent)
        };
        if let Some(mut spent) = spent {
            // Outside the lock: the worker may be taking its next batch meanwhile.
            spent.clear();
            let mut queued = self.lock();
            // Unless the worker gave back another batch meanwhile (then it got the
            // empty placeholder, and the next exchange sets this right).
            if queued.spent.capacity() == 0 {
                queued.spent = spent;
            }
        }
        room
    }

    /// Adds `messages` (emptying the vector) and wakes the worker.
    pub(crate) fn extend(&self, messages: &mut Vec<RawMessage>) {
        if messages.is_empty() {
            return;
        }
        // Counted before a worker can take them, so the gauge never goes below zero.
        self.metrics.add_buffered_messages(messages.len() as u64);
        {
            let mut queued = self.lock();
            for message in messages.drain(..) {
                queued.bytes += message_bytes(&message);
                queued.messages.push_back(message);
            }
        }
        self.control.input_arrived();
    }

    /// Drops what is queued: the partition is no longer this worker's.
    pub(crate) fn clear(&self) {
        let dropped = {
            let mut queued = self.lock();
            queued.bytes = 0;
            std::mem::take(&mut queued.messages).len()
        };
        self.metrics.sub_buffered_messages(dropped as u64);
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A worker's end of its partition's feed.
pub(crate) struct FeedInput(pub(crate) Arc<Feed>);

impl PartitionInput for FeedInput {
    fn give_back(&mut self, spent: &mut Vec<RawMessage>) {
        {
            let mut queued = self.0.lock();
            // The feeder has dropped the batch before (or never had one): exchange the
            // full vector for its emptied one.
            if queued.spent.is_empty() && queued.spent.capacity() > 0 {
                std::mem::swap(&mut queued.spent, spent);
            }
        }
        // Not exchanged (the feeder has not been round yet): dropped here.
        spent.clear();
    }

    fn drain(&mut self, batch: &mut Batch) {
        let feed = &self.0;
        let (taken, was_full) = {
            let mut queued = feed.lock();
            let was_full = queued.is_full(feed);
            let mut taken = 0;
            while batch.has_room() {
                let Some(message) = queued.messages.pop_front() else {
                    break;
                };
                queued.bytes -= message_bytes(&message);
                batch.push(message);
                taken += 1;
            }
            (taken, was_full)
        };
        if taken > 0 {
            feed.metrics.sub_buffered_messages(taken as u64);
            if was_full {
                feed.filler.unpark();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn feed(max_messages: usize, max_bytes: usize) -> (Arc<Feed>, Metrics) {
        let batch = BatchConfig {
            max_messages,
            max_bytes,
            ..BatchConfig::default()
        };
        let metrics = Metrics::new();
        let control = Arc::new(PartitionControl::new());
        let feed = Feed::new(&batch, control, std::thread::current(), metrics.clone());
        (Arc::new(feed), metrics)
    }

    fn messages(offsets: std::ops::Range<i64>, value: &[u8]) -> Vec<RawMessage> {
        offsets
            .map(|offset| RawMessage::raw("t", 0, offset, None, Some(value)))
            .collect()
    }

    #[test]
    fn a_feed_takes_up_to_a_batch_and_hands_messages_over_in_order() {
        let (feed, metrics) = feed(10, 1 << 20);
        assert_eq!(feed.room().messages, 10);
        feed.extend(&mut messages(0..4, b"x"));
        assert_eq!(
            feed.room(),
            Room {
                messages: 6,
                bytes: (1 << 20) - 4
            }
        );
        feed.extend(&mut messages(4..10, b"x"));
        assert_eq!(feed.room().messages, 0, "full at one batch");
        assert_eq!(metrics.snapshot().buffered_messages, 10);

        let mut batch = Batch::new(&BatchConfig {
            max_messages: 4,
            ..BatchConfig::default()
        });
        FeedInput(Arc::clone(&feed)).drain(&mut batch);
        let offsets: Vec<i64> = batch.messages.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            [0, 1, 2, 3],
            "a batch takes what fits, oldest first"
        );
        assert_eq!(feed.room().messages, 4);
        assert_eq!(metrics.snapshot().buffered_messages, 6);
    }

    #[test]
    fn a_feed_is_full_at_its_byte_limit_too() {
        let (feed, _) = feed(1_000, 10);
        feed.extend(&mut messages(0..1, b"12345"));
        assert_eq!(
            feed.room(),
            Room {
                messages: 999,
                bytes: 5
            }
        );
        feed.extend(&mut messages(1..2, b"12345"));
        assert_eq!(
            feed.room(),
            Room {
                messages: 0,
                bytes: 0
            },
            "10 bytes queued"
        );
    }

    /// The worker gives its finished batch back for the feeder, which allocated its
    /// messages, to drop on its next round; the worker gets an empty vector with room
    /// for its next batch in exchange.
    #[test]
    fn a_finished_batch_is_given_back_and_dropped_by_the_feeder() {
        let (feed, metrics) = feed(10, 1 << 20);
        let topic: Arc<str> = "t".into();
        // Batches, as a worker's: with room for a batch.
        let spent = |offsets: std::ops::Range<i64>| -> Vec<RawMessage> {
            let mut batch = Vec::with_capacity(10);
            batch.extend(offsets.map(|offset| {
                let mut message = RawMessage::raw("t", 0, offset, None, Some(b"x"));
                message.topic = Arc::clone(&topic);
                message
            }));
            batch
        };
        let mut input = FeedInput(Arc::clone(&feed));
        let mut batch = spent(0..3);
        input.give_back(&mut batch);
        assert!(batch.is_empty());
        assert!(batch.capacity() >= 10, "exchanged for a vector with room");
        assert_eq!(Arc::strong_count(&topic), 4, "kept for the feeder");
        assert_eq!(feed.room().messages, 10, "given-back messages take no room");
        assert_eq!(Arc::strong_count(&topic), 1, "dropped by the feeder");

        let mut next = spent(3..5);
        input.give_back(&mut next);
        assert!(next.is_empty() && next.capacity() >= 10);
        // Given back again before the feeder came round: dropped by the worker.
        let mut another = spent(5..6);
        input.give_back(&mut another);
        assert!(another.is_empty());
        assert_eq!(
            Arc::strong_count(&topic),
            3,
            "the first of the two is still kept"
        );
        feed.room();
        assert_eq!(Arc::strong_count(&topic), 1);
        assert_eq!(metrics.snapshot().buffered_messages, 0);
    }

    #[test]
    fn clearing_a_feed_drops_its_messages_and_their_count() {
        let (feed, metrics) = feed(10, 1 << 20);
        feed.extend(&mut messages(0..7, b"x"));
        feed.clear();
        assert_eq!(feed.room().messages, 10);
        assert_eq!(metrics.snapshot().buffered_messages, 0);
        feed.extend(&mut messages(7..9, b"x"));
        drop(feed);
        assert_eq!(
            metrics.snapshot().buffered_messages,
            0,
            "dropped with the feed"
        );
    }
}
