//! Enqueueing records on librdkafka's producer through topic handles.
//!
//! rust-rdkafka's `send` names each record's topic by string: every call allocates a C
//! string, and librdkafka finds the topic under the client's lock, a lock every worker
//! thread takes for every record (3% of the word count's CPU samples; this path takes
//! a tenth less than `send` did, 2% of the whole). The records of
//! one batch nearly all go to one topic, so an [`Enqueuer`] takes a handle per topic
//! once per batch and enqueues with `rd_kafka_produceva`, which takes the handle. It
//! holds the crate's second and last `unsafe` code (the first is fetch_queue.rs): every
//! call is on the client of a producer the enqueuer borrows, so the client outlives
//! every handle.

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{CString, c_void};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use flows_core::{EncodedRecord, Headers};
use rdkafka::bindings as rdsys;
use rdkafka::bindings::rd_kafka_vtype_t as VType;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::IntoOpaque;

/// Enqueues records on one producer, holding a handle for each topic it has seen until
/// it is dropped.
pub(crate) struct Enqueuer<'p, C: ProducerContext + 'static> {
    client: NonNull<rdsys::rd_kafka_t>,
    /// Each topic's name and application reference (`rd_kafka_topic_new`), released on
    /// drop; the last one used first.
    topics: Vec<(Arc<str>, NonNull<rdsys::rd_kafka_topic_t>)>,
    /// The producer whose client `client` is: it must outlive the handles.
    _producer: PhantomData<&'p ThreadedProducer<C>>,
}

// SAFETY: librdkafka's client and topic handles may be used from any thread (they are
// reference-counted and locked inside librdkafka), and the enqueuer is only used through
// `&mut self`, so by one thread at a time.
unsafe impl<C: ProducerContext + 'static> Send for Enqueuer<'_, C> {}

impl<'p, C: ProducerContext + 'static> Enqueuer<'p, C> {
    /// An enqueuer for `producer`.
    pub(crate) fn new(producer: &'p ThreadedProducer<C>) -> Self {
        let client = NonNull::new(producer.client().native_ptr())
            .unwrap_or_else(|| unreachable!("a created producer has a client"));
        Self {
            client,
            topics: Vec::new(),
            _producer: PhantomData,
        }
    }

    /// Enqueues a copy of `record` with `opaque`, which its delivery report will carry.
    /// On failure (the local queue is full, the record is too large, no such
    /// partition, an invalid topic name) nothing was enqueued: the error comes back
    /// with the opaque.
    pub(crate) fn enqueue(
        &mut self,
        record: &EncodedRecord,
        opaque: C::DeliveryOpaque,
    ) -> Result<(), (KafkaError, C::DeliveryOpaque)> {
        let topic = match self.topic(&record.topic) {
            Ok(topic) => topic,
            Err(error) => return Err((error, opaque)),
        };
        let headers = NativeHeaders::of(&record.headers);
        let (key, key_len) = bytes(record.key.as_deref());
        let (value, value_len) = bytes(record.value.as_deref());
        let opaque = opaque.into_ptr();
        let memory = |ptr, size| Value {
            mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 { ptr, size },
        };
        let fields = [
            field(
                VType::RD_KAFKA_VTYPE_RKT,
                Value {
                    rkt: topic.as_ptr(),
                },
            ),
            // -1: RD_KAFKA_PARTITION_UA, the partitioner picks.
            field(
                VType::RD_KAFKA_VTYPE_PARTITION,
                Value {
                    i32_: record.partition.unwrap_or(-1),
                },
            ),
            field(
                VType::RD_KAFKA_VTYPE_MSGFLAGS,
                Value {
                    i: rdsys::RD_KAFKA_MSG_F_COPY,
                },
            ),
            field(VType::RD_KAFKA_VTYPE_VALUE, memory(value, value_len)),
            field(VType::RD_KAFKA_VTYPE_KEY, memory(key, key_len)),
            field(VType::RD_KAFKA_VTYPE_OPAQUE, Value { ptr: opaque }),
            // 0: librdkafka stamps the time of enqueueing.
            field(
                VType::RD_KAFKA_VTYPE_TIMESTAMP,
                Value {
                    i64_: record.timestamp.unwrap_or(0),
                },
            ),
            field(
                VType::RD_KAFKA_VTYPE_HEADERS,
                Value {
                    headers: headers.as_ref().map_or(ptr::null_mut(), |h| h.0.as_ptr()),
                },
            ),
        ];
        // SAFETY: the client is alive (its producer is borrowed for 'p), `topic` is an
        // application reference this enqueuer holds, and the fields point at `record`'s
        // key and value (copied: MSG_F_COPY) and at the header list, all alive during
        // the call. The call returns null or an error object we own.
        let error = unsafe {
            rdsys::rd_kafka_produceva(self.client.as_ptr(), fields.as_ptr(), fields.len())
        };
        match NonNull::new(error) {
            None => {
                // librdkafka now owns the header list and frees it with the message.
                std::mem::forget(headers);
                Ok(())
            }
            Some(error) => {
                // SAFETY: `error` is the error object just returned, destroyed once here.
                let (code, fatal) = unsafe {
                    let code = rdsys::rd_kafka_error_code(error.as_ptr());
                    let fatal = rdsys::rd_kafka_error_is_fatal(error.as_ptr()) != 0;
                    rdsys::rd_kafka_error_destroy(error.as_ptr());
                    (code, fatal)
                };
                // After a fatal error (of the idempotent producer) `produceva` refuses
                // every record with that error's own code and a fatal flag, where
                // `producev` said `__FATAL`: keep saying it, so the pipeline stops
                // instead of retrying a producer that will never send again.
                let code = if fatal {
                    RDKafkaErrorCode::Fatal
                } else {
                    RDKafkaErrorCode::from(code)
                };
                // SAFETY: the record was not enqueued, so no delivery report will carry
                // the opaque: this is its only owner, made by `into_ptr` above.
                let opaque = unsafe { C::DeliveryOpaque::from_ptr(opaque) };
                Err((KafkaError::MessageProduction(code), opaque))
            }
        }
    }

    /// The handle of `topic`, taken on first use.
    fn topic(&mut self, topic: &Arc<str>) -> Result<NonNull<rdsys::rd_kafka_topic_t>, KafkaError> {
        // Outputs of one topic share one name (`Topic::encode` clones it): compare
        // pointers first, names only when they differ.
        if let Some(&(ref name, handle)) = self.topics.first()
            && (Arc::ptr_eq(name, topic) || **name == **topic)
        {
            return Ok(handle);
        }
        if let Some(position) = self.topics.iter().position(|(name, _)| **name == **topic) {
            self.topics.swap(0, position);
            return Ok(self.topics[0].1);
        }
        let name = CString::new(topic.as_bytes())?;
        // SAFETY: the client is alive (its producer is borrowed for 'p); a null
        // configuration takes the client's default topic configuration, as naming the
        // topic in `rd_kafka_producev` does. The call returns a new application
        // reference, released in `drop`, or null.
        let handle = NonNull::new(unsafe {
            rdsys::rd_kafka_topic_new(self.client.as_ptr(), name.as_ptr(), ptr::null_mut())
        });
        let Some(handle) = handle else {
            // SAFETY: reads the calling thread's last librdkafka error; no arguments.
            let code = unsafe { rdsys::rd_kafka_last_error() };
            return Err(KafkaError::MessageProduction(RDKafkaErrorCode::from(code)));
        };
        self.topics.insert(0, (Arc::clone(topic), handle));
        Ok(handle)
    }
}

impl<C: ProducerContext + 'static> Drop for Enqueuer<'_, C> {
    fn drop(&mut self) {
        for (_, handle) in self.topics.drain(..) {
            // SAFETY: each handle is an application reference taken by `topic`, released
            // once here while the client is alive; enqueued records hold their own.
            unsafe { rdsys::rd_kafka_topic_destroy(handle.as_ptr()) };
        }
    }
}

/// A header list of librdkafka's, destroyed on drop unless a record took it.
struct NativeHeaders(NonNull<rdsys::rd_kafka_headers_t>);

impl NativeHeaders {
    /// `headers` as librdkafka's, or `None` when there are none (librdkafka allocates a
    /// list, so one is only made when needed).
    fn of(headers: &Headers) -> Option<Self> {
        if headers.is_empty() {
            return None;
        }
        // SAFETY: allocates an empty list, which this value owns. librdkafka aborts
        // rather than return null when memory runs out, so the list is never missing.
        let list = NonNull::new(unsafe { rdsys::rd_kafka_headers_new(headers.len()) })
            .unwrap_or_else(|| unreachable!("librdkafka allocates or aborts"));
        let list = Self(list);
        for header in headers.iter() {
            let (value, size) = bytes(header.value.as_deref());
            // SAFETY: the list is ours; the name and value are copied, their lengths
            // given (a null value is a header without one).
            unsafe {
                rdsys::rd_kafka_header_add(
                    list.0.as_ptr(),
                    header.key.as_ptr().cast(),
                    header.key.len() as isize,
                    value,
                    size as isize,
                );
            }
        }
        Some(list)
    }
}

impl Drop for NativeHeaders {
    fn drop(&mut self) {
        // SAFETY: the list is ours (a record that took it was forgotten instead).
        unsafe { rdsys::rd_kafka_headers_destroy(self.0.as_ptr()) };
    }
}

/// A pointer and length for librdkafka: null and 0 for no bytes.
fn bytes(bytes: Option<&[u8]>) -> (*mut c_void, usize) {
    bytes.map_or((ptr::null_mut(), 0), |b| {
        (b.as_ptr().cast_mut().cast::<c_void>(), b.len())
    })
}

/// The value of one field of `rd_kafka_produceva` (librdkafka reads the member its
/// type names, so only that one is set).
type Value = rdsys::rd_kafka_vu_s__bindgen_ty_1;

/// One field of `rd_kafka_produceva`: its type and its value.
fn field(vtype: rdsys::rd_kafka_vtype_t, u: Value) -> rdsys::rd_kafka_vu_t {
    rdsys::rd_kafka_vu_t { vtype, u }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use flows_core::RawMessage;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers as _, Message as _};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::config::KafkaConfig;
    use crate::delivery::{DeliveryFailure, classify};
    use crate::producer::OutputProducer;

    fn record(topic: &Arc<str>, key: Option<&[u8]>, value: Option<&[u8]>) -> EncodedRecord {
        EncodedRecord {
            topic: Arc::clone(topic),
            partition: Some(0),
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers: Headers::new(),
            timestamp: None,
        }
    }

    /// Everything on `topic`/0 of `cluster`, in offset order, once `count` arrived.
    fn read(
        cluster: &MockCluster<'static, DefaultProducerContext>,
        topic: &str,
        count: usize,
    ) -> Vec<RawMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "enqueue-test")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut read = Vec::new();
        while read.len() < count && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.unwrap();
            let mut raw = RawMessage::raw(
                topic,
                message.partition(),
                message.offset(),
                message.key(),
                message.payload(),
            );
            raw.timestamp = message.timestamp().to_millis();
            if let Some(headers) = message.headers() {
                for header in headers.iter() {
                    raw.headers
                        .append(header.key, header.value.map(<[u8]>::to_vec));
                }
            }
            read.push(raw);
        }
        read
    }

    /// Records alternating between two topics arrive whole (key, value, headers, one
    /// without a value, timestamp) and in order; records librdkafka refuses before
    /// queueing (too large, a topic name it cannot take) are reported as not queued,
    /// by index, and the others still go.
    #[tokio::test]
    async fn records_arrive_whole_and_refused_ones_are_reported_by_index() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        cluster.create_topic("u", 1, 1).unwrap();
        let producer = OutputProducer::new(&KafkaConfig::new(cluster.bootstrap_servers())).unwrap();
        let (t, u): (Arc<str>, Arc<str>) = ("t".into(), "u".into());

        let mut first = record(&t, Some(b"k1"), Some(b"v1"));
        first.headers = Headers::new()
            .with("trace", b"t-1".to_vec())
            .with("empty", None);
        first.timestamp = Some(1_234);
        let too_large = vec![0u8; 2 << 20];
        let records = [
            first,
            record(&u, Some(b"k2"), Some(b"v2")),
            record(&t, None, Some(b"")),
            record(&t, Some(b"big"), Some(&too_large)),
            // The same name, another allocation: the handle is found by name.
            record(&"u".into(), Some(b"k3"), None),
            record(&"bad\0name".into(), Some(b"k4"), Some(b"v4")),
            record(&t, Some(b"k5"), Some(b"v5")),
        ];
        let failures = producer.send_each(&records).await;
        let failed: Vec<usize> = failures.failures.iter().map(|(i, _)| *i).collect();
        assert_eq!(failed, [3, 5]);
        assert_eq!(failures.not_queued, [3, 5]);
        assert!(
            matches!(
                failures.failures[0].1,
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
            ),
            "{:?}",
            failures.failures[0].1
        );

        let on_t = read(&cluster, "t", 3);
        let keys: Vec<Option<&[u8]>> = on_t.iter().map(|m| m.key.as_deref()).collect();
        assert_eq!(keys, [Some(&b"k1"[..]), None, Some(&b"k5"[..])]);
        assert_eq!(on_t[0].value.as_deref(), Some(&b"v1"[..]));
        assert_eq!(on_t[0].timestamp, Some(1_234));
        assert_eq!(on_t[0].headers.first("trace"), Some(Some(&b"t-1"[..])));
        assert_eq!(on_t[0].headers.first("empty"), Some(None));
        assert_eq!(on_t[0].headers.len(), 2);
        assert_eq!(on_t[1].value.as_deref(), Some(&b""[..]));
        assert!(on_t[1].headers.is_empty());
        assert!(on_t[1].timestamp.is_some(), "stamped when enqueued");

        let on_u = read(&cluster, "u", 2);
        let keys: Vec<Option<&[u8]>> = on_u.iter().map(|m| m.key.as_deref()).collect();
        let values: Vec<Option<&[u8]>> = on_u.iter().map(|m| m.value.as_deref()).collect();
        assert_eq!(keys, [Some(&b"k2"[..]), Some(&b"k3"[..])]);
        assert_eq!(values, [Some(&b"v2"[..]), None]);
    }

    /// After a fatal error of the producer, every record is refused as `Fatal`, which
    /// stops the pipeline, not with the fatal error's own code (a retried one here).
    #[test]
    fn records_refused_after_a_fatal_error_are_fatal() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        let reason = CString::new("test").unwrap();
        // SAFETY: the client is alive; librdkafka's own hook for testing fatal errors.
        let raised = unsafe {
            rdsys::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        assert_eq!(
            raised,
            rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );

        let mut enqueuer = Enqueuer::new(&producer);
        let (error, ()) = enqueuer
            .enqueue(&record(&"t".into(), Some(b"k"), Some(b"v")), ())
            .unwrap_err();
        assert!(
            matches!(
                error,
                KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)
            ),
            "{error:?}"
        );
        assert!(matches!(classify(&error), DeliveryFailure::Fatal));
    }
}
