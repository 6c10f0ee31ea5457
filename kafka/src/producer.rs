//! Publishing encoded outputs and awaiting their acknowledgements.

use std::time::Duration;

use flows_core::EncodedRecord;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::error::EngineError;

/// Sends batches of [`EncodedRecord`]s and resolves once the broker acknowledged all of
/// them. The producer is idempotent, so records to one partition keep their order.
#[derive(Clone)]
pub struct OutputProducer {
    producer: FutureProducer,
}

impl std::fmt::Debug for OutputProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputProducer")
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
            producer: client.create()?,
        })
    }

    /// Enqueues every record in order, then waits for all acknowledgements. A full local
    /// queue is waited out (back-pressure), never an error. Returns the first delivery
    /// failure, if any; records may then have been delivered partially, which is why
    /// callers commit input offsets only after this returns `Ok`.
    pub async fn send_all(&self, records: &[EncodedRecord]) -> Result<(), EngineError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let mut future_record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic);
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
                future_record = future_record.headers(headers);
            }
            if let Some(key) = &record.key {
                future_record = future_record.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                future_record = future_record.payload(value.as_slice());
            }
            if let Some(partition) = record.partition {
                future_record = future_record.partition(partition);
            }
            if let Some(timestamp) = record.timestamp {
                future_record = future_record.timestamp(timestamp);
            }
            loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        deliveries.push((record.topic.as_str(), delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        future_record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        return Err(EngineError::Delivery {
                            topic: record.topic.clone(),
                            source: error,
                        });
                    }
                }
            }
        }
        // Everything is enqueued; awaiting in order costs one wake-up per pending record
        // at most, less than polling them all as one set.
        for (topic, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((source, _))) => {
                    return Err(EngineError::Delivery {
                        topic: topic.to_owned(),
                        source,
                    });
                }
                Err(_canceled) => {
                    return Err(EngineError::Delivery {
                        topic: topic.to_owned(),
                        source: KafkaError::Canceled,
                    });
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for every in-flight record to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), EngineError> {
        Ok(self.producer.flush(timeout)?)
    }
}
