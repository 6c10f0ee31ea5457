//! Publishing encoded outputs and awaiting their acknowledgements.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flows_core::EncodedRecord;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;

use crate::config::KafkaConfig;
use crate::error::EngineError;

/// Sends batches of [`EncodedRecord`]s and resolves once the broker acknowledged all of
/// them. The producer is idempotent, so records to one partition keep their order.
#[derive(Clone)]
pub struct OutputProducer {
    producer: Arc<ThreadedProducer<AcknowledgingContext>>,
}

impl std::fmt::Debug for OutputProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputProducer")
    }
}

/// The acknowledgements still awaited for one `send_all`, shared by its records: one
/// counter per batch instead of a channel and a future per record.
#[derive(Default)]
struct PendingBatch {
    remaining: AtomicUsize,
    /// The first delivery failure: its topic and error.
    failure: Mutex<Option<(String, KafkaError)>>,
    done: Notify,
}

impl PendingBatch {
    fn acknowledge(&self, failure: Option<(String, KafkaError)>) {
        if let Some(failure) = failure {
            let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(failure);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A stored permit: the waiter cannot miss it, however late it starts waiting.
            self.done.notify_one();
        }
    }

    async fn wait(&self) -> Result<(), EngineError> {
        while self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some((topic, source)) => Err(EngineError::Delivery { topic, source }),
            None => Ok(()),
        }
    }
}

/// Routes each delivery report (on the producer's polling thread) to its batch.
struct AcknowledgingContext;

impl ClientContext for AcknowledgingContext {}

impl ProducerContext for AcknowledgingContext {
    type DeliveryOpaque = Arc<PendingBatch>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<PendingBatch>) {
        let failure = match result {
            Ok(_) => None,
            Err((error, message)) => Some((message.topic().to_owned(), error.clone())),
        };
        batch.acknowledge(failure);
    }
}

impl OutputProducer {
    /// A producer with the engine's tuned properties.
    pub fn new(config: &KafkaConfig) -> Result<Self, EngineError> {
        let mut client = ClientConfig::new();
        for (key, value) in config.producer_properties() {
            client.set(key, value);
        }
        Ok(Self {
            producer: Arc::new(client.create_with_context(AcknowledgingContext)?),
        })
    }

    /// Enqueues every record in order, then waits for all acknowledgements. A full local
    /// queue is waited out (back-pressure), never an error. Returns the first delivery
    /// failure, if any; records may then have been delivered partially, which is why
    /// callers commit input offsets only after this returns `Ok`.
    pub async fn send_all(&self, records: &[EncodedRecord]) -> Result<(), EngineError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = Arc::new(PendingBatch {
            remaining: AtomicUsize::new(records.len()),
            ..PendingBatch::default()
        });
        for record in records {
            let mut base: BaseRecord<'_, [u8], [u8], Arc<PendingBatch>> =
                BaseRecord::with_opaque_to(&record.topic, Arc::clone(&batch));
            // Header lists are allocated by librdkafka: only build one when needed.
            if !record.headers.is_empty() {
                let headers = record.headers.iter().fold(
                    OwnedHeaders::new_with_capacity(record.headers.len()),
                    |headers, h| {
                        headers.insert(Header {
                            key: &h.key,
                            value: h.value.as_deref(),
                        })
                    },
                );
                base = base.headers(headers);
            }
            if let Some(key) = &record.key {
                base = base.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                base = base.payload(value.as_slice());
            }
            if let Some(partition) = record.partition {
                base = base.partition(partition);
            }
            if let Some(timestamp) = record.timestamp {
                base = base.timestamp(timestamp);
            }
            loop {
                match self.producer.send(base) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        base = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        // Records already enqueued still report to `batch`; nobody waits.
                        return Err(EngineError::Delivery {
                            topic: record.topic.to_string(),
                            source: error,
                        });
                    }
                }
            }
        }
        batch.wait().await
    }

    /// Waits up to `timeout` for every in-flight record to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), EngineError> {
        Ok(self.producer.flush(timeout)?)
    }
}
