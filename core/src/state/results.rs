//! Last results: the outputs of the inputs applied by a state's last write from each
//! topic-partition, kept in their stored protobuf form.
//!
//! They are read on every batch but needed only when a message is replayed after a
//! crash, so they stay encoded: reading a state costs one slice of the stored blob per
//! topic-partition, a write encodes the new outputs straight from the records about to
//! be published (no copies of them), and decoding happens only on replay.
//!
//! An output's key, value or timestamp that is its input's (a keyed aggregate's key,
//! an inherited timestamp, a dead letter's payload) is not stored: a replay is of the
//! same input, so it is restored from there. A word count stores 40% less.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use prost::bytes::{BufMut, Bytes};
use smallvec::SmallVec;

use super::wire::{
    delimited_len, implicit_int_len, implicit_str_len, int_len, put_bytes, put_delimited_head,
    put_int, put_optional_int, put_str, str_len,
};

use crate::function::INPUT_PAYLOAD_HEADER;
use crate::message::{Header, RawMessage, TopicPartition};
use crate::state::partition_map::PartitionMap;
use crate::state::{EncodedRecord, StateCodecError, proto};

/// One input's outputs as stored: its offset, its outputs, and the input message when at
/// hand (what an output shares with it is then left out; see
/// [`PartitionResults::encode_with_inputs`]).
pub type StoredInput<'a> = (i64, &'a [EncodedRecord], Option<&'a RawMessage>);

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
        Self::encode_counted(
            tp,
            inputs
                .into_iter()
                .map(|(offset, outputs)| (offset, outputs, None)),
        )
        .0
    }

    /// Encodes `inputs` as [`encode`](Self::encode) does, each with the input message
    /// it came from: an output's key, value or timestamp equal to its input's is left
    /// out and marked, to be restored from the input on replay
    /// ([`restore_from_input`]). `None`: nothing is left out but what is marked already.
    ///
    /// An input must be the message a replay will present again: the same Kafka record,
    /// or a copy made the same way (see
    /// [`StatefulProcessor::origin`](crate::function::StatefulProcessor::origin)).
    pub fn encode_with_inputs<'a, I>(tp: &TopicPartition, inputs: I) -> Self
    where
        I: IntoIterator<Item = StoredInput<'a>>,
        I::IntoIter: Clone,
    {
        Self::encode_counted(tp, inputs).0
    }

    /// [`encode_with_inputs`](Self::encode_with_inputs), also returning how many inputs
    /// were written.
    fn encode_counted<'a, I>(tp: &TopicPartition, inputs: I) -> (Self, usize)
    where
        I: IntoIterator<Item = StoredInput<'a>>,
        I::IntoIter: Clone,
    {
        // Two passes over the inputs, sizing then writing: one exactly sized buffer. What
        // each record shares with its input, and its length, are worked out once, in the
        // sizing pass (comparing with the input reads its bytes, which are seldom still
        // in cache); the common case (one output per input, a few inputs) allocates
        // nothing for them.
        let inputs = inputs
            .into_iter()
            .filter(|(_, outputs, _)| !outputs.is_empty());
        let mut records: SmallVec<[(u8, usize); 4]> = SmallVec::new();
        let mut input_lens: SmallVec<[usize; 4]> = SmallVec::new();
        let mut previous = None;
        let mut size =
            implicit_str_len(1, &tp.topic) + implicit_int_len(2, i64::from(tp.partition));
        for (offset, outputs, input) in inputs.clone() {
            let mut len = implicit_int_len(1, offset);
            for record in outputs {
                let topic = stored_topic(record, &mut previous);
                let shared = shared_with_input(record, input);
                let record_len = record_len(record, topic, shared);
                records.push((shared, record_len));
                len += delimited_len(2, record_len);
            }
            input_lens.push(len);
            size += delimited_len(3, len);
        }
        let mut buf = Vec::with_capacity(size);
        put_str(1, &tp.topic, &mut buf);
        put_int(2, i64::from(tp.partition), &mut buf);
        let mut written = 0;
        let mut previous = None;
        let mut records = records.iter();
        for ((offset, outputs, _), &len) in inputs.zip(&input_lens) {
            put_delimited_head(3, len, &mut buf);
            put_int(1, offset, &mut buf);
            // `zip` asks `outputs` first: it stops at this input's last record.
            for (record, &(shared, record_len)) in outputs.iter().zip(records.by_ref()) {
                let topic = stored_topic(record, &mut previous);
                put_delimited_head(2, record_len, &mut buf);
                put_record(record, topic, shared, &mut buf);
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
        stored
            .inputs
            .into_iter()
            .map(|input| {
                let outputs = input
                    .outputs
                    .into_iter()
                    .map(|record| record_from_proto(record, &mut previous))
                    .collect::<Result<_, _>>()?;
                Ok((input.offset, outputs))
            })
            .collect()
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
        self.replace_partition_with_inputs(
            tp,
            inputs
                .into_iter()
                .map(|(offset, outputs)| (offset, outputs, None)),
        );
    }

    /// [`replace_partition`](Self::replace_partition), each input with the message it
    /// came from: what an output shares with its input is left out (see
    /// [`PartitionResults::encode_with_inputs`]).
    pub fn replace_partition_with_inputs<'a, I>(&mut self, tp: TopicPartition, inputs: I)
    where
        I: IntoIterator<Item = StoredInput<'a>>,
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

/// Which of an output's fields are its input's (bits of `OutputRecord.from_input`).
const SHARED_KEY: u8 = 1;
const SHARED_VALUE: u8 = 2;
const SHARED_TIMESTAMP: u8 = 4;
/// What a marker without a value stands for: stored by earlier versions for a dead
/// letter repeating its input's key and value.
const SHARED_PAYLOAD: u8 = SHARED_KEY | SHARED_VALUE;

/// The fields `record` shares with its input and leaves out: as its marker says (a
/// record decoded from stored results), or those present and equal to `input`'s.
fn shared_with_input(record: &EncodedRecord, input: Option<&RawMessage>) -> u8 {
    if let Some(marked) = shared_marker(record) {
        return marked;
    }
    let Some(input) = input else {
        return 0;
    };
    let mut shared = 0;
    if record.key.is_some() && record.key == input.key {
        shared |= SHARED_KEY;
    }
    if record.value.is_some() && record.value == input.value {
        shared |= SHARED_VALUE;
    }
    if record.timestamp.is_some() && record.timestamp == input.timestamp {
        shared |= SHARED_TIMESTAMP;
    }
    shared
}

/// The fields a decoded record's [`INPUT_PAYLOAD_HEADER`] marks as left out, if it has
/// one.
fn shared_marker(record: &EncodedRecord) -> Option<u8> {
    record
        .headers
        .iter()
        .find(|h| h.key == INPUT_PAYLOAD_HEADER)
        .map(|h| match h.value.as_deref() {
            Some([bits, ..]) => *bits,
            _ => SHARED_PAYLOAD,
        })
}

/// Restores what stored outputs left out of `input`'s fields (see
/// [`PartitionResults::encode_with_inputs`]) from `input`, the message being
/// replayed, and drops their markers: the outputs as first published.
pub fn restore_from_input(outputs: &mut [EncodedRecord], input: &RawMessage) {
    for record in outputs {
        let Some(shared) = shared_marker(record) else {
            continue;
        };
        record.headers = record
            .headers
            .iter()
            .filter(|h| h.key != INPUT_PAYLOAD_HEADER)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        if shared & SHARED_KEY != 0 {
            record.key.clone_from(&input.key);
        }
        if shared & SHARED_VALUE != 0 {
            record.value.clone_from(&input.value);
        }
        if shared & SHARED_TIMESTAMP != 0 {
            record.timestamp = input.timestamp;
        }
    }
}

/// The stored headers of a record (its marker is written as `from_input` instead).
fn stored_headers(r: &EncodedRecord) -> impl Iterator<Item = &Header> {
    r.headers.iter().filter(|h| h.key != INPUT_PAYLOAD_HEADER)
}

fn record_len(r: &EncodedRecord, topic: Option<&str>, shared: u8) -> usize {
    let unless = |bit: u8, len: usize| if shared & bit == 0 { len } else { 0 };
    topic.map_or(0, |topic| str_len(1, topic.as_bytes()))
        + r.partition.map_or(0, |p| int_len(2, i64::from(p)))
        + unless(SHARED_KEY, r.key.as_deref().map_or(0, |k| str_len(3, k)))
        + unless(
            SHARED_VALUE,
            r.value.as_deref().map_or(0, |v| str_len(4, v)),
        )
        + stored_headers(r)
            .map(|h| delimited_len(5, header_len(h)))
            .sum::<usize>()
        + unless(SHARED_TIMESTAMP, r.timestamp.map_or(0, |t| int_len(6, t)))
        + implicit_int_len(7, i64::from(shared))
}

fn put_record(r: &EncodedRecord, topic: Option<&str>, shared: u8, buf: &mut impl BufMut) {
    if let Some(topic) = topic {
        put_bytes(1, topic.as_bytes(), buf);
    }
    if let Some(p) = r.partition {
        put_optional_int(2, i64::from(p), buf);
    }
    if let Some(key) = r.key.as_ref().filter(|_| shared & SHARED_KEY == 0) {
        put_bytes(3, key, buf);
    }
    if let Some(value) = r.value.as_ref().filter(|_| shared & SHARED_VALUE == 0) {
        put_bytes(4, value, buf);
    }
    for h in stored_headers(r) {
        put_delimited_head(5, header_len(h), buf);
        put_str(1, &h.key, buf);
        if let Some(value) = &h.value {
            put_bytes(2, value, buf);
        }
    }
    if let Some(t) = r.timestamp.filter(|_| shared & SHARED_TIMESTAMP == 0) {
        put_optional_int(6, t, buf);
    }
    put_int(7, i64::from(shared), buf);
}

/// A stored record, its absent topic read as `previous` (the record before's), which
/// it then becomes.
fn record_from_proto(
    r: proto::OutputRecord,
    previous: &mut Arc<str>,
) -> Result<EncodedRecord, StateCodecError> {
    if let Some(topic) = r.topic {
        *previous = Arc::from(topic);
    }
    let mut headers: Vec<Header> = r
        .headers
        .into_iter()
        .map(|h| Header {
            key: h.key,
            value: h.value,
        })
        .collect();
    // Fields left out because they are the input's: marked until a replay restores them.
    if r.from_input != 0 {
        // Unknown bits name fields this version cannot restore.
        let shared = u8::try_from(r.from_input)
            .ok()
            .filter(|bits| bits & !(SHARED_KEY | SHARED_VALUE | SHARED_TIMESTAMP) == 0)
            .ok_or(StateCodecError::Invalid(
                "a stored output leaves out fields this version does not know",
            ))?;
        headers.push(Header {
            key: INPUT_PAYLOAD_HEADER.to_owned(),
            value: Some(vec![shared]),
        });
    }
    Ok(EncodedRecord {
        topic: Arc::clone(previous),
        partition: r.partition,
        key: r.key,
        value: r.value,
        headers: headers.into(),
        timestamp: r.timestamp,
    })
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
            from_input: 0,
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
        let every_topic = outputs
            .iter()
            .map(|r| record_to_proto(r, &mut None))
            .collect();
        assert_eq!(stored(7, every_topic).decode().unwrap()[&7], outputs);
    }

    /// Results of input `offset` holding `outputs` as given, as a writer of any version
    /// may have stored them.
    fn stored(offset: i64, outputs: Vec<proto::OutputRecord>) -> PartitionResults {
        let encoded = proto::PartitionResults {
            topic: "words".into(),
            partition: 0,
            inputs: vec![proto::InputResult { offset, outputs }],
        }
        .encode_to_vec();
        PartitionResults::from_stored(encoded.into()).unwrap().1
    }

    /// A record that may share its key, value and timestamp with `input`'s.
    fn records_sharing_with(
        input: &RawMessage,
    ) -> impl Strategy<Value = Vec<EncodedRecord>> + use<> {
        let (key, value, timestamp) = (input.key.clone(), input.value.clone(), input.timestamp);
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4));
        let record = (
            (any::<bool>(), bytes()),
            (any::<bool>(), bytes()),
            (any::<bool>(), proptest::option::of(any::<i64>())),
            proptest::option::of(("[a-z]{0,3}", bytes())),
        )
            .prop_map(move |((k, own_key), (v, own_value), (t, own_ts), header)| {
                let headers = header
                    .into_iter()
                    .fold(Headers::new(), |h, (name, value)| h.with(name, value));
                EncodedRecord {
                    topic: "out".into(),
                    partition: None,
                    key: if k { key.clone() } else { own_key },
                    value: if v { value.clone() } else { own_value },
                    headers,
                    timestamp: if t { timestamp } else { own_ts },
                }
            });
        proptest::collection::vec(record, 0..3)
    }

    fn input_message() -> impl Strategy<Value = RawMessage> {
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4));
        (bytes(), bytes(), proptest::option::of(any::<i64>())).prop_map(|(key, value, ts)| {
            RawMessage {
                key,
                value,
                timestamp: ts,
                ..RawMessage::raw("in", 0, 7, None, None)
            }
        })
    }

    proptest! {
        /// Outputs stored with their input leave out what they share with it, and read
        /// back, restored from that input, as they were; stored again from their
        /// decoded form (marks kept, no input at hand), they read the same.
        #[test]
        fn what_outputs_share_with_their_input_is_restored_from_it(
            (input, outputs) in input_message()
                .prop_flat_map(|input| (Just(input.clone()), records_sharing_with(&input))),
        ) {
            let tp = TopicPartition::new("in", 0);
            let stored =
                PartitionResults::encode_with_inputs(&tp, [(7, &outputs[..], Some(&input))]);
            let plain = PartitionResults::encode(&tp, [(7, &outputs[..])]);
            prop_assert!(stored.as_bytes().len() <= plain.as_bytes().len() + 2 * outputs.len());
            let mut decoded = stored.decode().unwrap().remove(&7).unwrap_or_default();
            let again = PartitionResults::encode(&tp, [(7, &decoded[..])]);
            prop_assert_eq!(again.as_bytes(), stored.as_bytes());
            restore_from_input(&mut decoded, &input);
            prop_assert_eq!(decoded, outputs);
        }
    }

    /// A word count's output repeats its input's key and timestamp: neither is stored.
    #[test]
    fn a_keyed_output_stores_neither_its_inputs_key_nor_its_timestamp() {
        let input = RawMessage {
            timestamp: Some(1_700_000_000_000),
            ..RawMessage::raw("words", 0, 3, Some(b"kafka"), Some(b"kafka"))
        };
        let output = EncodedRecord {
            topic: "counts".into(),
            partition: None,
            key: Some(b"kafka".to_vec()),
            value: Some(b"42".to_vec()),
            headers: Headers::new(),
            timestamp: Some(1_700_000_000_000),
        };
        let tp = TopicPartition::new("words", 0);
        let outputs = std::slice::from_ref(&output);
        let stored = PartitionResults::encode_with_inputs(&tp, [(3, outputs, Some(&input))]);
        let plain = PartitionResults::encode(&tp, [(3, outputs)]);
        let bytes = String::from_utf8_lossy(stored.as_bytes()).into_owned();
        assert_eq!(bytes.matches("kafka").count(), 0, "{bytes:?}");
        assert!(stored.as_bytes().len() + 10 < plain.as_bytes().len());
        let mut replayed = stored.decode().unwrap().remove(&3).unwrap();
        restore_from_input(&mut replayed, &input);
        assert_eq!(replayed, [output]);
    }

    /// Earlier versions marked a dead letter that repeats its input's key and value
    /// with a header without a value: such results restore both.
    #[test]
    fn dead_letters_stored_by_earlier_versions_restore_their_payload() {
        let input = RawMessage::raw("words", 0, 5, Some(b"k"), Some(b"poison"));
        let old = proto::OutputRecord {
            topic: Some("dlq".into()),
            headers: vec![
                proto::Header {
                    key: "error".into(),
                    value: Some(b"boom".to_vec()),
                },
                proto::Header {
                    key: INPUT_PAYLOAD_HEADER.into(),
                    value: None,
                },
            ],
            timestamp: Some(9),
            ..Default::default()
        };
        let mut replayed = stored(5, vec![old]).decode().unwrap().remove(&5).unwrap();
        restore_from_input(&mut replayed, &input);
        assert_eq!(
            replayed,
            [EncodedRecord {
                topic: "dlq".into(),
                partition: None,
                key: Some(b"k".to_vec()),
                value: Some(b"poison".to_vec()),
                headers: Headers::new().with("error", b"boom".to_vec()),
                timestamp: Some(9),
            }]
        );
    }

    /// A stored output naming fields this version does not know is refused, not
    /// replayed without them.
    #[test]
    fn unknown_fields_left_out_are_an_error() {
        let future = proto::OutputRecord {
            topic: Some("out".into()),
            from_input: 8,
            ..Default::default()
        };
        assert!(matches!(
            stored(1, vec![future]).decode(),
            Err(StateCodecError::Invalid(_))
        ));
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
