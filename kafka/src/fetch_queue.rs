//! A partition's own fetch queue in librdkafka, read many messages per call.
//!
//! rust-rdkafka's `PartitionQueue::poll` returns one message per call, each call a trip
//! through librdkafka's event API (a lock, clock reads, an event and an `Arc` per
//! message); the feeder thread takes every message of a pipeline, and that was about a
//! tenth of the word count's CPU time. librdkafka's `rd_kafka_consume_batch_queue`
//! takes up to a chunk of messages per call, dropping ops made outdated by a rebalance
//! or seek before it looks at them (transaction markers included, so a stale marker
//! never moves the read position past messages not yet read). rust-rdkafka does not
//! wrap it, so this module does. It holds half of the crate's `unsafe` code (the other
//! half is enqueue.rs): every call below is on a queue reference this type owns, while
//! the client it belongs to is kept alive.

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{CStr, CString, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::thread::Thread;

use flows_core::{Headers, RawMessage, TopicPartition};
use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;

use crate::worker::message_bytes;

/// The most messages one librdkafka call takes. A call may exceed the byte limit by
/// what its messages bring, so chunks shrink to what fits, judged by the largest
/// message this queue has seen.
const CHUNK: usize = 64;

/// An assigned partition's fetch queue, taken out of the consumer's queue: its messages
/// come only through [`take`](Self::take), and the waker thread is unparked whenever the
/// queue turns non-empty.
pub(crate) struct FetchQueue<C: ConsumerContext + 'static> {
    queue: NonNull<rdsys::rd_kafka_queue_t>,
    /// The thread librdkafka wakes (the callback's opaque): from `Box::into_raw`, freed
    /// in `drop` once the callback is disabled.
    waker: NonNull<Thread>,
    /// Keeps the client alive while the queue reference is.
    _consumer: Arc<BaseConsumer<C>>,
    tp: TopicPartition,
    /// The largest message (key and value bytes) taken so far.
    largest: usize,
}

// SAFETY: librdkafka's queue handles may be used from any thread, the waker is a
// `Thread` (itself `Send` and `Sync`), and the queue is only read through `&mut self`,
// so by one thread at a time.
unsafe impl<C: ConsumerContext + 'static> Send for FetchQueue<C> {}

/// What one [`FetchQueue::take`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Messages appended.
    pub(crate) messages: usize,
    /// Their key and value bytes.
    pub(crate) bytes: usize,
}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// The fetch queue of `tp` (assigned to `consumer`, or about to be), taken out of
    /// the consumer's queue; `None` if librdkafka gives no queue for it.
    pub(crate) fn split(
        consumer: &Arc<BaseConsumer<C>>,
        tp: &TopicPartition,
        waker: Thread,
    ) -> Option<Self> {
        let topic = CString::new(tp.topic.as_bytes()).ok()?;
        let client = consumer.client().native_ptr();
        // SAFETY: the client is alive (`consumer` is borrowed); the call returns a new
        // reference to the partition's fetch queue, or null.
        let queue = NonNull::new(unsafe {
            rdsys::rd_kafka_queue_get_partition(client, topic.as_ptr(), tp.partition)
        })?;
        let waker = NonNull::from(Box::leak(Box::new(waker)));
        // SAFETY: `queue` is the reference just taken. Forwarding to null keeps the
        // partition's messages out of the consumer's queue. The callback's opaque is
        // the leaked thread, freed only after `drop` has disabled the callback.
        unsafe {
            rdsys::rd_kafka_queue_forward(queue.as_ptr(), ptr::null_mut());
            rdsys::rd_kafka_queue_cb_event_enable(
                queue.as_ptr(),
                Some(wake),
                waker.as_ptr().cast(),
            );
        }
        // Messages queued before the callback was set fire no wake-up of their own.
        // SAFETY: the thread was just leaked and is freed only in `drop`.
        unsafe { waker.as_ref() }.unpark();
        Some(Self {
            queue,
            waker,
            _consumer: Arc::clone(consumer),
            // A copy of the topic's name for this partition alone: each of its messages
            // holds a reference, and one name shared by every partition made the feeder
            // and all the worker threads contend for a single reference count.
            tp: TopicPartition::new(&*tp.topic, tp.partition),
            largest: 1,
        })
    }

    /// Appends the messages queued now (waiting for none) to `out`, in offset order,
    /// until `max_messages` messages or `max_bytes` of keys and values are taken (the
    /// last chunk may exceed the bytes by a message, or by several when a message
    /// larger than any before comes). Errors queued among them (fetch errors, which
    /// librdkafka retries by itself) are logged.
    pub(crate) fn take(
        &mut self,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<RawMessage>,
    ) -> Taken {
        let mut taken = Taken::default();
        let mut chunk = [ptr::null_mut::<rdsys::rd_kafka_message_t>(); CHUNK];
        while taken.messages < max_messages && taken.bytes < max_bytes {
            let fits = (max_bytes - taken.bytes) / self.largest;
            let wanted = (max_messages - taken.messages).min(fits).clamp(1, CHUNK);
            // SAFETY: the queue reference is ours and the client alive; librdkafka
            // writes at most `wanted` message pointers into `chunk`, which has room.
            let got = unsafe {
                rdsys::rd_kafka_consume_batch_queue(
                    self.queue.as_ptr(),
                    0,
                    chunk.as_mut_ptr(),
                    wanted,
                )
            };
            let got = usize::try_from(got).unwrap_or(0).min(wanted);
            for &message in &chunk[..got] {
                // SAFETY: librdkafka handed this message over; it is copied, then
                // destroyed exactly once, and not used after.
                let raw = unsafe {
                    let raw = to_raw(message, &self.tp.topic);
                    rdsys::rd_kafka_message_destroy(message);
                    raw
                };
                match raw {
                    Ok(raw) => {
                        let bytes = message_bytes(&raw);
                        self.largest = self.largest.max(bytes);
                        taken.messages += 1;
                        taken.bytes += bytes;
                        out.push(raw);
                    }
                    Err(error) => {
                        tracing::warn!(tp = %self.tp, %error, "partition queue error");
                    }
                }
            }
            if got < wanted {
                break;
            }
        }
        taken
    }
}

impl<C: ConsumerContext + 'static> Drop for FetchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: the queue reference is ours. librdkafka calls the callback under the
        // queue's lock, and swaps it under that lock, so once it is disabled the thread
        // is no longer used and can be freed; the reference is released last.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, ptr::null_mut());
            drop(Box::from_raw(self.waker.as_ptr()));
            rdsys::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// Called by librdkafka (on one of its threads) when the queue turns non-empty.
unsafe extern "C" fn wake(_client: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the thread of a live `FetchQueue` (see `split` and `drop`).
    let thread = unsafe { &*opaque.cast::<Thread>() };
    thread.unpark();
}

/// The error of a consumed message, with librdkafka's description.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({reason})")]
struct QueueError {
    error: KafkaError,
    reason: String,
}

/// Copies a consumed message into an owned [`RawMessage`], or its error.
///
/// # Safety
/// `message` must be a consumed message librdkafka handed over and has not destroyed.
unsafe fn to_raw(
    message: *mut rdsys::rd_kafka_message_t,
    topic: &Arc<str>,
) -> Result<RawMessage, QueueError> {
    // SAFETY: a valid message (the caller's contract); its fields are read in place.
    let (err, key, key_len, payload, len, partition, offset) = unsafe {
        let m = &*message;
        (
            m.err,
            m.key,
            m.key_len,
            m.payload,
            m.len,
            m.partition,
            m.offset,
        )
    };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: a valid message; librdkafka's description of its error.
        let reason = unsafe { CStr::from_ptr(rdsys::rd_kafka_message_errstr(message)) };
        return Err(QueueError {
            error: KafkaError::MessageConsumption(err.into()),
            reason: reason.to_string_lossy().into_owned(),
        });
    }
    // SAFETY: librdkafka's key and payload pointers, with their lengths, or null.
    let (key, value) = unsafe { (bytes(key, key_len), bytes(payload, len)) };
    let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    // SAFETY: a valid message (the caller's contract).
    let timestamp = unsafe { rdsys::rd_kafka_message_timestamp(message, &mut kind) };
    let timestamp = (timestamp != -1
        && kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
        .then_some(timestamp);
    Ok(RawMessage {
        topic: Arc::clone(topic),
        partition,
        offset,
        key,
        value,
        // SAFETY: a valid message (the caller's contract).
        headers: unsafe { headers(message) },
        timestamp,
    })
}

/// A copy of `len` bytes at `data`; `None` if `data` is null.
///
/// # Safety
/// `data`, if not null, must point to `len` readable bytes.
unsafe fn bytes(data: *const c_void, len: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the caller's contract.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec())
}

/// A copy of the message's headers (names not in UTF-8 are converted lossily).
///
/// # Safety
/// `message` must be a consumed message librdkafka has not destroyed.
unsafe fn headers(message: *mut rdsys::rd_kafka_message_t) -> Headers {
    let mut headers = Headers::new();
    let mut list = ptr::null_mut();
    // SAFETY: a valid message; `list` is owned by it (not to be freed here).
    let found = unsafe { rdsys::rd_kafka_message_headers(message, &mut list) };
    if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || list.is_null() {
        return headers;
    }
    for index in 0.. {
        let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0);
        // SAFETY: `list` is the message's header list; the outputs are written on
        // success only, and point into it.
        let found = unsafe {
            rdsys::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size)
        };
        if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: a header's name is NUL-terminated; its value has `size` bytes or is null.
        let (name, value) = unsafe { (CStr::from_ptr(name), bytes(value, size)) };
        headers.append(name.to_string_lossy().into_owned(), value);
    }
    headers
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use rdkafka::ClientConfig;
    use rdkafka::config::FromClientConfig;
    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;

    /// A mock cluster holding `t`/0: keyed with headers (one without a value) and a
    /// timestamp, then without a key and with an empty value, then with a key and
    /// without a value.
    fn cluster() -> MockCluster<'static, DefaultProducerContext> {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some("t-1"),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            });
        let records = [
            BaseRecord::<[u8], [u8]>::to("t")
                .partition(0)
                .key(b"a")
                .payload(b"one")
                .headers(headers)
                .timestamp(1_234),
            BaseRecord::to("t").partition(0).payload(b""),
            BaseRecord::to("t").partition(0).key(b"c"),
        ];
        for record in records {
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        cluster
    }

    /// A consumer assigned `t`/0 from the beginning, and that partition's fetch queue
    /// (split first, as the engine does, so no message reaches the consumer's queue).
    fn assigned_queue(
        cluster: &MockCluster<'static, DefaultProducerContext>,
    ) -> (Arc<BaseConsumer>, FetchQueue<DefaultConsumerContext>) {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "fetch-queue-test")
            .set("enable.auto.commit", "false");
        let consumer = Arc::new(BaseConsumer::from_config(&config).unwrap());
        let tp = TopicPartition::new("t", 0);
        let queue = FetchQueue::split(&consumer, &tp, std::thread::current()).unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("t", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        (consumer, queue)
    }

    /// Takes from `queue` with these limits until something comes (10 s at most).
    fn take_some(
        consumer: &BaseConsumer,
        queue: &mut FetchQueue<DefaultConsumerContext>,
        max_messages: usize,
        max_bytes: usize,
        out: &mut Vec<RawMessage>,
    ) -> Taken {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let taken = queue.take(max_messages, max_bytes, out);
            if taken.messages > 0 || Instant::now() > deadline {
                return taken;
            }
            let _ = consumer.poll(Duration::ZERO);
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_fetch_queue_hands_over_messages_in_order_within_the_limits_and_whole() {
        let cluster = cluster();
        let (consumer, mut queue) = assigned_queue(&cluster);

        let mut out = Vec::new();
        // A byte limit of one stops after the first message.
        let taken = take_some(&consumer, &mut queue, 100, 1, &mut out);
        assert_eq!(
            taken,
            Taken {
                messages: 1,
                bytes: 4
            }
        );
        // The rest, in order, until none is left.
        while out.len() < 3 {
            let before = out.len();
            let taken = take_some(&consumer, &mut queue, 100, 1 << 20, &mut out);
            assert!(taken.messages > 0, "no more messages after {before}");
        }
        assert_eq!(queue.take(100, 1 << 20, &mut out), Taken::default());

        let offsets: Vec<i64> = out.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [0, 1, 2]);
        let first = &out[0];
        assert_eq!((&*first.topic, first.partition), ("t", 0));
        assert_eq!(first.key.as_deref(), Some(&b"a"[..]));
        assert_eq!(first.value.as_deref(), Some(&b"one"[..]));
        assert_eq!(first.timestamp, Some(1_234));
        assert_eq!(first.headers.first("trace"), Some(Some(&b"t-1"[..])));
        assert_eq!(first.headers.first("empty"), Some(None));
        assert_eq!(first.headers.len(), 2);
        assert_eq!(
            (out[1].key.as_deref(), out[1].value.as_deref()),
            (None, Some(&b""[..]))
        );
        assert!(out[1].headers.is_empty());
        assert!(out[1].timestamp.is_some(), "the producer's create time");
        assert_eq!(
            (out[2].key.as_deref(), out[2].value.as_deref()),
            (Some(&b"c"[..]), None)
        );
    }

    #[test]
    fn a_message_limit_leaves_the_rest_queued_in_order() {
        let cluster = cluster();
        let (consumer, mut queue) = assigned_queue(&cluster);

        let mut out = Vec::new();
        while out.len() < 3 {
            let taken = take_some(&consumer, &mut queue, 1, 1 << 20, &mut out);
            assert_eq!(taken.messages, 1, "one at a time, after {}", out.len());
        }
        let offsets: Vec<i64> = out.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [0, 1, 2]);
    }
}
