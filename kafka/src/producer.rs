//! Publishing encoded outputs and awaiting their acknowledgements.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flows_core::EncodedRecord;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::acknowledgement::{PendingBatch, RecordTicket};
use crate::config::{KafkaConfig, client_error, numeric_property};
use crate::enqueue::Enqueuer;
use crate::error::EngineError;

/// Sends batches of [`EncodedRecord`]s and resolves once the broker acknowledged all of
/// them. The producer is idempotent, so records to one partition keep their order.
#[derive(Clone)]
pub struct OutputProducer {
    producer: Arc<ThreadedProducer<AcknowledgingContext>>,
    /// A producer that sends every record in a request batch of its own (created when
    /// first needed): a broker refuses a whole batch for one bad record, so a record is
    /// found to be refused for good only when sent alone.
    alone: Arc<OnceLock<ThreadedProducer<AcknowledgingContext>>>,
    properties: Arc<Vec<(String, String)>>,
}

impl std::fmt::Debug for OutputProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputProducer")
    }
}

/// Routes each delivery report (on the producer's polling thread) to its batch.
struct AcknowledgingContext;

impl ClientContext for AcknowledgingContext {}

impl ProducerContext for AcknowledgingContext {
    type DeliveryOpaque = RecordTicket;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: RecordTicket) {
        ticket.acknowledge(result.as_ref().err().map(|(error, _)| error.clone()));
    }
}

/// Records of one [`OutputProducer::send_each`] that were not delivered.
#[derive(Debug, Default)]
pub struct DeliveryFailures {
    /// Each failed record's index in the batch, with the client's or broker's error, in
    /// index order.
    pub failures: Vec<(usize, KafkaError)>,
    /// The indices of the failed records the client refused before queueing them (too
    /// large, no such partition): refused on their own, not with a batch of others.
    pub not_queued: Vec<usize>,
}

impl DeliveryFailures {
    /// Whether every record was delivered.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

impl OutputProducer {
    /// A producer with the engine's tuned properties.
    pub fn new(config: &KafkaConfig) -> Result<Self, EngineError> {
        let properties = config.producer_properties();
        Ok(Self {
            producer: Arc::new(Self::create(&properties)?),
            alone: Arc::new(OnceLock::new()),
            properties: Arc::new(properties),
        })
    }

    fn create(
        properties: &[(String, String)],
    ) -> Result<ThreadedProducer<AcknowledgingContext>, EngineError> {
        let mut client = ClientConfig::new();
        for (key, value) in properties {
            client.set(key, value);
        }
        client
            .create_with_context(AcknowledgingContext)
            .map_err(|e| client_error(e, properties))
    }

    /// Like [`send_each`](Self::send_each), but every record travels in a request batch
    /// of its own, so that a broker refusing a batch refuses exactly the record it
    /// names. Slow: for isolating refused records, not for the normal path.
    pub async fn send_each_alone(
        &self,
        records: &[EncodedRecord],
    ) -> Result<DeliveryFailures, EngineError> {
        if self.alone.get().is_none() {
            let mut properties = (*self.properties).clone();
            properties.push(("batch.num.messages".into(), "1".into()));
            properties.push(("linger.ms".into(), "0".into()));
            // Another worker may have created it meanwhile; either one will do.
            let _ = self.alone.set(Self::create(&properties)?);
        }
        let Some(alone) = self.alone.get() else {
            return Err(EngineError::Internal(
                "the one-record producer is missing".into(),
            ));
        };
        Ok(send_with(alone, records).await)
    }

    /// Enqueues every record in order, then waits for all acknowledgements. A full local
    /// queue is waited out (back-pressure), never an error. Returns the first delivery
    /// failure, if any; records may then have been delivered partially, which is why
    /// callers commit input offsets only after this returns `Ok`.
    pub async fn send_all(&self, records: &[EncodedRecord]) -> Result<(), EngineError> {
        let failures = self.send_each(records).await;
        match failures.failures.into_iter().next() {
            None => Ok(()),
            Some((index, source)) => Err(EngineError::Delivery {
                topic: records[index].topic.to_string(),
                source,
            }),
        }
    }

    /// Enqueues every record in order and waits for every acknowledgement; reports
    /// each record that was not delivered, with its error (refused when enqueued, or by
    /// the broker). The others are delivered, in order per partition.
    pub async fn send_each(&self, records: &[EncodedRecord]) -> DeliveryFailures {
        send_with(&self.producer, records).await
    }

    /// How long librdkafka may take to settle a record (deliver it or report its
    /// failure): `message.timeout.ms` (alias `delivery.timeout.ms`); `None` when it is 0,
    /// which means forever.
    pub fn delivery_timeout(&self) -> Option<Duration> {
        let millis = numeric_property(
            &self.properties,
            &["message.timeout.ms", "delivery.timeout.ms"],
        )
        .unwrap_or(300_000); // librdkafka's default
        (millis > 0).then(|| Duration::from_millis(millis))
    }

    /// Waits up to `timeout` for every in-flight record to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), EngineError> {
        Ok(self.producer.flush(timeout)?)
    }
}

/// `headers` as librdkafka's, or `None` when there are none: librdkafka allocates a
/// header list, so one is only built when needed.
pub fn kafka_headers(headers: &flows_core::Headers) -> Option<OwnedHeaders> {
    (!headers.is_empty()).then(|| {
        headers
            .iter()
            .fold(OwnedHeaders::new_with_capacity(headers.len()), |list, h| {
                list.insert(Header {
                    key: &h.key,
                    value: h.value.as_deref(),
                })
            })
    })
}

/// Enqueues `records` on `producer` in order and waits for every acknowledgement.
async fn send_with(
    producer: &ThreadedProducer<AcknowledgingContext>,
    records: &[EncodedRecord],
) -> DeliveryFailures {
    if records.is_empty() {
        return DeliveryFailures::default();
    }
    let (batch, mut tickets) = PendingBatch::issue(records.len());
    let mut not_queued = Vec::new();
    let mut enqueuer = Enqueuer::new(producer);
    for ((index, record), mut ticket) in records.iter().enumerate().zip(&mut tickets) {
        loop {
            match enqueuer.enqueue(record, ticket) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    ticket = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, returned)) => {
                    // Refused before it was queued (too large, no such partition):
                    // it will not report; account for it here and go on.
                    not_queued.push(index);
                    returned.acknowledge(Some(error));
                    break;
                }
            }
        }
    }
    // The topic handles go before the wait: enqueued records hold their own.
    drop(enqueuer);
    DeliveryFailures {
        failures: batch.wait().await,
        not_queued,
    }
}
