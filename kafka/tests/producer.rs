//! The output producer against the in-process mock cluster: every record arrives byte
//! for byte, in order per partition, also when the broker rejects produce requests for
//! a while (fault injection).

use std::time::Duration;

use flows_core::{EncodedRecord, Headers};
use flows_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use flows_kafka::rdkafka::message::{Headers as _, Message as _};
use flows_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use flows_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use flows_kafka::{EmbeddedKafka, KafkaConfig, OutputProducer};

fn record(topic: &str, i: usize) -> EncodedRecord {
    EncodedRecord {
        topic: topic.into(),
        partition: Some((i % 3) as i32),
        key: (!i.is_multiple_of(5)).then(|| format!("key-{i}").into_bytes()),
        value: (!i.is_multiple_of(7)).then(|| vec![(i % 256) as u8; i % 50]),
        headers: Headers::new()
            .with("seq", i.to_string().into_bytes())
            .with("seq", None)
            .with("ü", Vec::new()),
        timestamp: Some(1_700_000_000_000 + i as i64),
    }
}

/// Reads every record of `topic` (3 partitions) back as `EncodedRecord`s, per partition.
fn read_back(brokers: &str, topic: &str, expected: usize) -> Vec<EncodedRecord> {
    read_partitions(brokers, topic, 3, expected)
}

/// Reads every record of `topic`'s `partitions` back as `EncodedRecord`s.
fn read_partitions(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> Vec<EncodedRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "verify")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while records.len() < expected && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("message");
        let mut headers = Headers::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                headers.append(header.key, header.value.map(<[u8]>::to_vec));
            }
        }
        records.push(EncodedRecord {
            topic: message.topic().into(),
            partition: Some(message.partition()),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: message.timestamp().to_millis(),
        });
    }
    records
}

fn assert_same_per_partition(sent: &[EncodedRecord], received: &[EncodedRecord]) {
    assert_eq!(received.len(), sent.len(), "records lost or duplicated");
    for partition in 0..3 {
        let of = |records: &[EncodedRecord]| -> Vec<EncodedRecord> {
            records
                .iter()
                .filter(|r| r.partition == Some(partition))
                .cloned()
                .collect()
        };
        assert_eq!(of(received), of(sent), "partition {partition} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_byte_for_byte_in_order() {
    let kafka = EmbeddedKafka::start(1).expect("mock cluster");
    kafka.create_topic("out", 3, 1).expect("topic");
    let producer =
        OutputProducer::new(&KafkaConfig::new(kafka.bootstrap_servers())).expect("producer");
    let records: Vec<_> = (0..2_000).map(|i| record("out", i)).collect();
    producer.send_all(&records).await.expect("all acknowledged");
    let brokers = kafka.bootstrap_servers();
    let received = tokio::task::spawn_blocking(move || read_back(&brokers, "out", 2_000))
        .await
        .expect("reader");
    assert_same_per_partition(&records, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_produce_errors_are_retried_without_duplicates() {
    let kafka = EmbeddedKafka::start(1).expect("mock cluster");
    kafka.create_topic("flaky", 3, 1).expect("topic");
    // The next produce requests fail with retriable errors; the idempotent producer
    // retries them and must neither lose nor duplicate records.
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let config =
        KafkaConfig::new(kafka.bootstrap_servers()).producer_property("retry.backoff.ms", "10");
    let producer = OutputProducer::new(&config).expect("producer");
    let records: Vec<_> = (0..500).map(|i| record("flaky", i)).collect();
    producer
        .send_all(&records)
        .await
        .expect("acknowledged after retries");
    let brokers = kafka.bootstrap_servers();
    let received = tokio::task::spawn_blocking(move || read_back(&brokers, "flaky", 500))
        .await
        .expect("reader");
    assert_same_per_partition(&records, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retriable_rejection_is_reported_not_swallowed() {
    let kafka = EmbeddedKafka::start(1).expect("mock cluster");
    kafka.create_topic("strict", 1, 1).expect("topic");
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 4],
    );
    let producer =
        OutputProducer::new(&KafkaConfig::new(kafka.bootstrap_servers())).expect("producer");
    let mut single = record("strict", 1);
    single.partition = Some(0);
    let err = producer
        .send_all(&[single])
        .await
        .expect_err("rejection must surface");
    assert!(err.to_string().contains("strict"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rejected_record_fails_its_whole_batch_and_the_next_batch_is_independent() {
    let kafka = EmbeddedKafka::start(1).expect("mock cluster");
    kafka.create_topic("mixed", 3, 1).expect("topic");
    let producer =
        OutputProducer::new(&KafkaConfig::new(kafka.bootstrap_servers())).expect("producer");
    // Nothing to publish is acknowledged at once.
    producer.send_all(&[]).await.expect("empty batch");

    // A record to a partition that does not exist fails the batch, although records
    // before it may be delivered (the engine then commits nothing of the batch). The
    // broker-side rejection path is the test above.
    let mut records: Vec<_> = (0..300).map(|i| record("mixed", i)).collect();
    records[150].partition = Some(7);
    let err = producer
        .send_all(&records)
        .await
        .expect_err("the rejected record must fail the batch");
    assert!(err.to_string().contains("mixed"), "{err}");

    // The failure belonged to that batch only.
    let next: Vec<_> = (0..300).map(|i| record("mixed", i)).collect();
    producer.send_all(&next).await.expect("next batch");
}

/// Keys land where Java producers and Kafka Streams put them: murmur2 of the key, made
/// positive, modulo the partition count. The hashes are the Java client's own test
/// vectors (`org.apache.kafka.common.utils.UtilsTest.testMurmur2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_partitions_java_clients_choose() {
    const JAVA_MURMUR2: [(&str, i32); 6] = [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ];
    let kafka = EmbeddedKafka::start(1).expect("mock cluster");
    let brokers = kafka.bootstrap_servers();
    let producer = OutputProducer::new(&KafkaConfig::new(&brokers)).expect("producer");
    for partitions in [7, 12, 31] {
        let topic = format!("keyed-{partitions}");
        kafka.create_topic(&topic, partitions, 1).expect("topic");
        let records: Vec<EncodedRecord> = JAVA_MURMUR2
            .iter()
            .map(|(key, _)| EncodedRecord {
                topic: topic.as_str().into(),
                partition: None,
                key: Some(key.as_bytes().to_vec()),
                value: Some(b"v".to_vec()),
                headers: Headers::new(),
                timestamp: None,
            })
            .collect();
        producer.send_all(&records).await.expect("acknowledged");
        let reader_brokers = brokers.clone();
        let reader_topic = topic.clone();
        let received = tokio::task::spawn_blocking(move || {
            read_partitions(
                &reader_brokers,
                &reader_topic,
                partitions,
                JAVA_MURMUR2.len(),
            )
        })
        .await
        .expect("reader");
        assert_eq!(received.len(), JAVA_MURMUR2.len());
        for (key, hash) in JAVA_MURMUR2 {
            let java = (hash & 0x7fff_ffff) % partitions;
            let landed = received
                .iter()
                .find(|r| r.key.as_deref() == Some(key.as_bytes()))
                .and_then(|r| r.partition);
            assert_eq!(landed, Some(java), "{key:?} over {partitions} partitions");
        }
    }
}
