//! Last results: the outputs of the inputs applied by a state's last write from each
//! topic-partition, kept in their stored protobuf form.
//!
//! They are read on every batch but needed only when a message is replayed after a
//! crash, so they stay encoded: reading a state costs one slice of the stored blob per
//! topic-partition, a write encodes the new outputs straight from the records about to
//! be published (no copies of them), and decoding happens only on replay.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use prost::bytes::{BufMut, Bytes};

use super::wire::{
    delimited_len, implicit_int_len, implicit_str_len, int_len, put_bytes, put_delimited_head,
    put_int, put_optional_int, put_str, str_len,
};

use crate::message::{Header, TopicPartition};
use crate::state::partition_map::PartitionMap;
use crate::state::{EncodedRecord, StateCodecError, proto};

/// The outputs of one topic-partition's inputs applied by the last write from it, as
/// the protobuf `PartitionResults` message the state stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionResults {
    encoded: Bytes,
}

impl PartitionResults {
    /// Encodes `inputs` (input offset and its outputs, in ascending offset order) as the
    /// results of `tp`. Inputs without outputs are left out: replaying them emits
    /// nothing either way.
    pub fn encode<'a, I>(tp: &TopicPartition, inputs: I) -> Self
    where
        I: IntoIterator<Item = (i64, &'a [EncodedRecord])>,
        I::IntoIter: Clone,
    {
        Self::encode_counted(tp, inputs).0
    }

    /// [`encode`](Self::encode), also returning how many inputs were written.
    fn encode_counted<'a, I>(tp: &TopicPartition, inputs: I) -> (Self, usize)
    where
        I: IntoIterator<Item = (i64, &'a [EncodedRecord])>,
        I::IntoIter: Clone,
    {
        // Two passes over the inputs, sizing then writing: one exactly sized buffer, and
        // nothing else allocated.
        let inputs = inputs
            .into_iter()
            .filter(|(_, outputs)| !outputs.is_empty());
        let mut previous = None;
        let size = implicit_str_len(1, &tp.topic)
            + implicit_int_len(2, i64::from(tp.partition))
            + inputs
                .clone()
                .map(|(offset, outputs)| {
                    delimited_len(3, input_len(offset, outputs, &mut previous))
                })
                .sum::<usize>();
        let mut buf = Vec::with_capacity(size);
        put_str(1, &tp.topic, &mut buf);
        put_int(2, i64::from(tp.partition), &mut buf);
        let mut written = 0;
        let mut previous = None;
        for (offset, outputs) in inputs {
            let mut sizing = previous;
            put_delimited_head(3, input_len(offset, outputs, &mut sizing), &mut buf);
            put_int(1, offset, &mut buf);
            for record in outputs {
                let topic = stored_topic(record, &mut previous);
                put_delimited_head(2, record_len(record, topic), &mut buf);
                put_record(record, topic, &mut buf);
            }
            written += 1;
        }
        debug_assert_eq!(buf.len(), size, "results sized up front");
        let results = Self {
            encoded: buf.into(),
        };
        (results, written)
    }

    /// Wraps a stored `PartitionResults` message, returning its topic-partition.
    fn from_stored(encoded: Bytes) -> Result<(TopicPartition, Self), StateCodecError> {
        // Decodes only the topic and partition; the inputs are skipped over.
        let head = proto::PartitionResultsHead::decode(encoded.clone())?;
        let tp = TopicPartition::new(Arc::<str>::from(head.topic), head.partition);
        Ok((tp, Self { encoded }))
    }

    /// The stored message, as written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.encoded
    }

    /// Decodes every input: input offset → its outputs.
    pub fn decode(&self) -> Result<BTreeMap<i64, Vec<EncodedRecord>>, StateCodecError> {
        let stored = proto::PartitionResults::decode(self.encoded.clone())?;
        let mut previous: Arc<str> = Arc::from("");
        Ok(stored
            .inputs
            .into_iter()
            .map(|input| {
                let outputs = input
                    .outputs
                    .into_iter()
                    .map(|record| record_from_proto(record, &mut previous))
                    .collect();
                (input.offset, outputs)
            })
            .collect())
    }
}

/// The outputs of the inputs applied by the last write from each topic-partition.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LastResults(PartitionMap<PartitionResults>);

impl Clone for LastResults {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }

    fn clone_from(&mut self, source: &Self) {
        self.0.clone_from(&source.0);
    }
}

impl LastResults {
    /// The stored outputs of input `offset` of `tp`, if it was applied by the last write
    /// from `tp` and had outputs. Decodes the results of `tp`.
    pub fn get(
        &self,
        tp: &TopicPartition,
        offset: i64,
    ) -> Result<Option<Vec<EncodedRecord>>, StateCodecError> {
        match self.0.get(tp) {
            Some(results) => Ok(results.decode()?.remove(&offset)),
            None => Ok(None),
        }
    }

    /// The results of `tp`, still encoded.
    pub fn partition(&self, tp: &TopicPartition) -> Option<&PartitionResults> {
        self.0.get(tp)
    }

    /// Replaces everything stored for `tp` with `inputs` (input offset and its outputs,
    /// in ascending offset order).
    pub fn replace_partition<'a, I>(&mut self, tp: TopicPartition, inputs: I)
    where
        I: IntoIterator<Item = (i64, &'a [EncodedRecord])>,
        I::IntoIter: Clone,
    {
        let (results, written) = PartitionResults::encode_counted(&tp, inputs);
        if written > 0 {
            self.0.insert(tp, results);
        } else {
            self.0.remove(&tp);
        }
    }

    /// Iterates over topic-partitions and their results.
    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, &PartitionResults)> {
        self.0.iter()
    }

    /// Bytes of the stored results, all partitions together.
    pub fn encoded_len(&self) -> usize {
        self.0.values().map(|r| r.encoded.len()).sum()
    }

    /// Whether no results are stored.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The results of every topic-partition, as stored (for the state's internal blob).
    pub(crate) fn partitions(&self) -> impl Iterator<Item = &PartitionResults> {
        self.0.values()
    }

    /// Rebuilds the results from stored `PartitionResults` messages.
    pub(crate) fn from_stored(stored: Vec<Bytes>) -> Result<Self, StateCodecError> {
        let mut results = PartitionMap::default();
        for encoded in stored {
            let (tp, partition) = PartitionResults::from_stored(encoded)?;
            results.insert(tp, partition);
        }
        Ok(Self(results))
    }
}

// Encoding by hand, from borrowed records, so that storing outputs copies their bytes
// once instead of building owned protobuf structs first. Field for field the same as
// prost's encoding of `proto::PartitionResults` (a test checks it).
//
// A record's topic is written only on the first record and where it differs from the
// record's before it (in the same `PartitionResults`): nearly all outputs of a state go
// to one topic, and its name was the largest part of the stored results (about half of
// a word count's). An absent topic reads as the one before.

/// The topic to write for `record` (`None`: the same as the record before), advancing
/// `previous` to it.
fn stored_topic<'r>(record: &'r EncodedRecord, previous: &mut Option<&'r str>) -> Option<&'r str> {
    let topic: &str = &record.topic;
    if *previous == Some(topic) {
        None
    } else {
        *previous = Some(topic);
        Some(topic)
    }
}

fn header_len(header: &Header) -> usize {
    implicit_str_len(1, &header.key) + header.value.as_deref().map_or(0, |v| str_len(2, v))
}

fn record_len(r: &EncodedRecord, topic: Option<&str>) -> usize {
    topic.map_or(0, |topic| str_len(1, topic.as_bytes()))
        + r.partition.map_or(0, |p| int_len(2, i64::from(p)))
        + r.key.as_deref().map_or(0, |k| str_len(3, k))
        + r.value.as_deref().map_or(0, |v| str_len(4, v))
        + r.headers
            .iter()
            .map(|h| delimited_len(5, header_len(h)))
            .sum::<usize>()
        + r.timestamp.map_or(0, |t| int_len(6, t))
}

fn put_record(r: &EncodedRecord, topic: Option<&str>, buf: &mut impl BufMut) {
    if let Some(topic) = topic {
        put_bytes(1, topic.as_bytes(), buf);
    }
    if let Some(p) = r.partition {
        put_optional_int(2, i64::from(p), buf);
    }
    if let Some(key) = &r.key {
        put_bytes(3, key, buf);
    }
    if let Some(value) = &r.value {
        put_bytes(4, value, buf);
    }
    for h in r.headers.iter() {
        put_delimited_head(5, header_len(h), buf);
        put_str(1, &h.key, buf);
        if let Some(value) = &h.value {
            put_bytes(2, value, buf);
        }
    }
    if let Some(t) = r.timestamp {
        put_optional_int(6, t, buf);
    }
}

/// The encoded size of an input's results, advancing `previous` (see [`stored_topic`]).
fn input_len<'r>(
    offset: i64,
    outputs: &'r [EncodedRecord],
    previous: &mut Option<&'r str>,
) -> usize {
    implicit_int_len(1, offset)
        + outputs
            .iter()
            .map(|r| delimited_len(2, record_len(r, stored_topic(r, previous))))
            .sum::<usize>()
}

/// A stored record, its absent topic read as `previous` (the record before's), which
/// it then becomes.
fn record_from_proto(r: proto::OutputRecord, previous: &mut Arc<str>) -> EncodedRecord {
    if let Some(topic) = r.topic {
        *previous = Arc::from(topic);
    }
    EncodedRecord {
        topic: Arc::clone(previous),
        partition: r.partition,
        key: r.key,
        value: r.value,
        headers: r
            .headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect::<Vec<_>>()
            .into(),
        timestamp: r.timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Headers;
    use proptest::prelude::*;

    /// `r` as stored: its topic left out when it is `previous`'s.
    fn record_to_proto(r: &EncodedRecord, previous: &mut Option<String>) -> proto::OutputRecord {
        let topic = Some(r.topic.to_string());
        let topic = if *previous == topic {
            None
        } else {
            previous.clone_from(&topic);
            topic
        };
        proto::OutputRecord {
            topic,
            partition: r.partition,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r
                .headers
                .iter()
                .map(|h| proto::Header {
                    key: h.key.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            timestamp: r.timestamp,
        }
    }

    fn records() -> impl Strategy<Value = Vec<EncodedRecord>> {
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8));
        let header = ("[a-z]{0,3}", bytes());
        let record = (
            "[a-z.-]{0,6}",
            proptest::option::of(any::<i32>()),
            bytes(),
            bytes(),
            proptest::collection::vec(header, 0..3),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(topic, partition, key, value, headers, timestamp)| {
                let headers = headers
                    .into_iter()
                    .fold(Headers::new(), |h, (k, v)| h.with(k, v));
                EncodedRecord {
                    topic: topic.into(),
                    partition,
                    key,
                    value,
                    headers,
                    timestamp,
                }
            });
        proptest::collection::vec(record, 0..3)
    }

    proptest! {
        /// The hand-written encoder writes exactly what prost writes for the same
        /// message, and what it writes decodes back to the same records.
        #[test]
        fn hand_encoding_is_prosts_encoding(
            topic in "[a-z]{0,4}",
            partition in any::<i32>(),
            inputs in proptest::collection::vec((any::<i64>(), records()), 0..4),
        ) {
            let tp = TopicPartition::new(topic.as_str(), partition);
            let mut inputs = inputs;
            inputs.sort_by_key(|(offset, _)| *offset);
            inputs.dedup_by_key(|(offset, _)| *offset);
            let ours = PartitionResults::encode(
                &tp,
                inputs.iter().map(|(o, r)| (*o, r.as_slice())),
            );
            let mut previous = None;
            let theirs = proto::PartitionResults {
                topic: topic.clone(),
                partition,
                inputs: inputs
                    .iter()
                    .filter(|(_, r)| !r.is_empty())
                    .map(|(offset, outputs)| proto::InputResult {
                        offset: *offset,
                        outputs: outputs
                            .iter()
                            .map(|r| record_to_proto(r, &mut previous))
                            .collect(),
                    })
                    .collect(),
            }
            .encode_to_vec();
            prop_assert_eq!(ours.as_bytes(), theirs.as_slice());
            let decoded = ours.decode().unwrap();
            let expected: BTreeMap<i64, Vec<EncodedRecord>> = inputs
                .into_iter()
                .filter(|(_, r)| !r.is_empty())
                .collect();
            prop_assert_eq!(decoded, expected);
            let (read_tp, _) = PartitionResults::from_stored(ours.encoded.clone()).unwrap();
            prop_assert_eq!(read_tp, tp);
        }
    }

    fn record(topic: &str, value: &[u8]) -> EncodedRecord {
        EncodedRecord {
            topic: topic.into(),
            partition: None,
            key: Some(b"k".to_vec()),
            value: Some(value.to_vec()),
            headers: Headers::new(),
            timestamp: Some(1),
        }
    }

    #[test]
    fn a_topic_is_stored_once_per_run_of_records_to_it() {
        let tp = TopicPartition::new("in", 0);
        let first = [record("out-topic", b"1"), record("out-topic", b"2")];
        let second = [record("out-topic", b"3"), record("other", b"4")];
        let third = [record("out-topic", b"5")];
        let inputs = [(1, &first[..]), (2, &second[..]), (3, &third[..])];
        let results = PartitionResults::encode(&tp, inputs);
        let stored = String::from_utf8_lossy(results.as_bytes()).into_owned();
        assert_eq!(stored.matches("out-topic").count(), 2, "{stored:?}");
        assert_eq!(stored.matches("other").count(), 1, "{stored:?}");
        let decoded = results.decode().unwrap();
        assert_eq!(decoded[&1], first);
        assert_eq!(decoded[&2], second);
        assert_eq!(decoded[&3], third);
    }

    /// Results written before topics were left out (every record's spelled out) read
    /// the same, and a record to the empty topic stays there.
    #[test]
    fn results_with_every_topic_written_read_the_same() {
        let outputs = [record("out", b"1"), record("out", b"2"), record("", b"3")];
        let every_topic = proto::PartitionResults {
            topic: "in".into(),
            partition: 0,
            inputs: vec![proto::InputResult {
                offset: 7,
                outputs: outputs
                    .iter()
                    .map(|r| record_to_proto(r, &mut None))
                    .collect(),
            }],
        }
        .encode_to_vec();
        let (_, results) = PartitionResults::from_stored(every_topic.into()).unwrap();
        assert_eq!(results.decode().unwrap()[&7], outputs);
    }

    #[test]
    fn a_partition_without_outputs_is_not_kept() {
        let mut results = LastResults::default();
        let tp = TopicPartition::new("t", 0);
        results.replace_partition(tp.clone(), [(5, &[][..])]);
        assert!(results.is_empty());
        let record = EncodedRecord {
            topic: "o".into(),
            partition: None,
            key: None,
            value: Some(b"v".to_vec()),
            headers: Headers::new(),
            timestamp: None,
        };
        results.replace_partition(tp.clone(), [(0, std::slice::from_ref(&record))]);
        assert_eq!(results.get(&tp, 0).unwrap(), Some(vec![record]));
        results.replace_partition(tp.clone(), []);
        assert!(results.is_empty());
    }
}
