//! The state model: per-key content plus the bookkeeping that makes replays safe.
//!
//! A [`State`] holds, besides the user's content:
//! - **progress** — the last applied offset per topic-partition. An input at or below
//!   it has already changed the state and must not change it again.
//! - **last results** — per topic-partition, the encoded outputs of every input applied
//!   by the last write from that partition, keyed by input offset. When such an input is
//!   replayed (the process died after the state write but before its outputs were
//!   acknowledged), its outputs are re-emitted byte for byte instead of recomputed.
//! - a **version** for optimistic concurrency: every write names the version it read.
//!
//! Progress and results are stored together as one versioned protobuf blob (see
//! [`proto`]): a `oneof` whose `v1` is today's layout, so the format can grow without
//! migrating stored data. An empty blob means "no progress", which is how a job is moved
//! to a mirrored Kafka cluster (stop, clear the internal column, start).

mod partition_map;
pub mod proto;
mod reader;
mod results;
mod wire;

use std::sync::Arc;

use prost::bytes::Bytes;

use chrono::{DateTime, SubsecRound, Utc};
use prost::Message as _;

use crate::id::PersistenceId;
use crate::message::{Headers, TopicPartition};
use partition_map::PartitionMap;

pub use reader::{ReadStateError, StateReader};
pub use results::{LastResults, PartitionResults, StoredInput, restore_from_input};

/// An encoded output message, exactly as it is (or was) sent to Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EncodedRecord {
    /// Destination topic (shared with the [`Topic`](crate::Topic) that encoded it, so
    /// an output costs no copy of its topic's name).
    pub topic: Arc<str>,
    /// Explicit partition, or `None` to partition by key.
    pub partition: Option<i32>,
    /// Encoded key (`None` is a null key).
    pub key: Option<Vec<u8>>,
    /// Encoded value (`None` is a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Headers,
    /// Timestamp in milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
}

impl EncodedRecord {
    /// Approximate size in bytes, for batching limits.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// Last applied offset per topic-partition.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress(PartitionMap<i64>);

impl Clone for Progress {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }

    fn clone_from(&mut self, source: &Self) {
        self.0.clone_from(&source.0);
    }
}

impl Progress {
    /// The last applied offset of `tp`, if any input from it was applied.
    pub fn get(&self, tp: &TopicPartition) -> Option<i64> {
        self.0.get(tp).copied()
    }

    /// Whether the input at `offset` of `tp` has already been applied.
    pub fn has_applied(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.get(tp).is_some_and(|last| offset <= last)
    }

    /// Records `offset` as the last applied offset of `tp`. Progress never moves back.
    pub fn record(&mut self, tp: TopicPartition, offset: i64) {
        let entry = self.0.get_or_insert_with(tp, || offset);
        *entry = (*entry).max(offset);
    }

    /// Iterates over `(topic-partition, last applied offset)`.
    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, i64)> {
        self.0.iter().map(|(tp, o)| (tp, *o))
    }

    /// Whether nothing was ever applied.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The stored internal part of a state could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateCodecError {
    /// The bytes are not a valid `Internal` protobuf message.
    #[error("internal state is not valid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A field had an impossible value.
    #[error("internal state is invalid: {0}")]
    Invalid(&'static str),
}

/// The state of one persistence id.
///
/// `S` is the content type: the user's type in functions, raw bytes ([`RawState`]) in
/// repositories.
#[derive(Debug, PartialEq)]
pub struct State<S> {
    /// The key of this state.
    pub id: PersistenceId,
    /// The user's content; `None` until the first write.
    pub content: Option<S>,
    /// Last applied offset per topic-partition.
    pub progress: Progress,
    /// Outputs of the inputs applied by the last write of each topic-partition.
    pub results: LastResults,
    /// Number of writes so far; `0` for a state that was never written. A write must
    /// name the version it read and fails with a conflict if the store holds another.
    pub version: u64,
    /// When the state was first written.
    pub created_at: Option<DateTime<Utc>>,
    /// When the state was last written.
    pub updated_at: Option<DateTime<Utc>>,
}

impl<S: Clone> Clone for State<S> {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            content: self.content.clone(),
            progress: self.progress.clone(),
            results: self.results.clone(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    // Field by field, reusing this state's buffers: overwriting a stored state with its
    // next version (same id, similar sizes) allocates nothing.
    fn clone_from(&mut self, source: &Self) {
        if self.id != source.id {
            self.id = source.id.clone();
        }
        self.content.clone_from(&source.content);
        self.progress.clone_from(&source.progress);
        self.results.clone_from(&source.results);
        self.version = source.version;
        self.created_at = source.created_at;
        self.updated_at = source.updated_at;
    }
}

/// A state whose content is encoded: what repositories store.
pub type RawState = State<Vec<u8>>;

impl<S> State<S> {
    /// A state that was never written.
    pub fn fresh(id: PersistenceId) -> Self {
        Self {
            id,
            content: None,
            progress: Progress::default(),
            results: LastResults::default(),
            version: 0,
            created_at: None,
            updated_at: None,
        }
    }

    /// Whether this state was ever written.
    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// Replaces the content type, keeping the bookkeeping.
    pub fn map_content<T>(self, f: impl FnOnce(S) -> T) -> State<T> {
        State {
            id: self.id,
            content: self.content.map(f),
            progress: self.progress,
            results: self.results,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// The same state with content `content`: convenient for building writes.
    pub fn with_content(mut self, content: S) -> Self {
        self.content = Some(content);
        self
    }

    /// Encodes progress and last results as the versioned protobuf blob
    /// (`proto::StoredInternal`), into one buffer of exactly
    /// [`encoded_internal_len`](Self::encoded_internal_len) bytes.
    pub fn encode_internal(&self) -> Vec<u8> {
        let v1 = self.internal_v1_len();
        let mut buf = Vec::with_capacity(wire::delimited_len(1, v1));
        wire::put_delimited_head(1, v1, &mut buf);
        for (tp, offset) in self.progress.iter() {
            wire::put_delimited_head(1, progress_len(tp, offset), &mut buf);
            wire::put_str(1, &tp.topic, &mut buf);
            wire::put_int(2, i64::from(tp.partition), &mut buf);
            wire::put_int(3, offset, &mut buf);
        }
        for results in self.results.partitions() {
            wire::put_bytes(2, results.as_bytes(), &mut buf);
        }
        debug_assert_eq!(buf.len(), self.encoded_internal_len());
        buf
    }

    /// The size of [`encode_internal`](Self::encode_internal)'s blob, without encoding
    /// it (stores check it against their size limit, see
    /// [`stored_size`](RawState::stored_size)).
    pub fn encoded_internal_len(&self) -> usize {
        wire::delimited_len(1, self.internal_v1_len())
    }

    fn internal_v1_len(&self) -> usize {
        let progress: usize = self
            .progress
            .iter()
            .map(|(tp, offset)| wire::delimited_len(1, progress_len(tp, offset)))
            .sum();
        let results: usize = self
            .results
            .partitions()
            .map(|results| wire::delimited_len(2, results.as_bytes().len()))
            .sum();
        progress + results
    }
}

/// The encoded length of one `proto::PartitionProgress`.
fn progress_len(tp: &TopicPartition, offset: i64) -> usize {
    wire::implicit_str_len(1, &tp.topic)
        + wire::implicit_int_len(2, i64::from(tp.partition))
        + wire::implicit_int_len(3, offset)
}

/// Decodes the blob written by [`State::encode_internal`]. Empty bytes decode to empty
/// progress and results. The results stay encoded (see [`PartitionResults`]).
pub fn decode_internal(
    bytes: impl Into<Bytes>,
) -> Result<(Progress, LastResults), StateCodecError> {
    let internal = proto::StoredInternal::decode(bytes.into())?;
    let mut progress = Progress::default();
    let mut results = LastResults::default();
    match internal.version {
        None => {}
        Some(proto::stored_internal::Version::V1(v1)) => {
            for p in v1.progress {
                progress.record(
                    TopicPartition::new(Arc::<str>::from(p.topic), p.partition),
                    p.offset,
                );
            }
            results = LastResults::from_stored(v1.results)?;
        }
    }
    Ok((progress, results))
}

impl RawState {
    /// The bytes a store holds for this state, content and internal blob, as checked
    /// against [`Capabilities::max_state_size`](crate::Capabilities::max_state_size).
    pub fn stored_size(&self) -> usize {
        self.encoded_internal_len() + self.content.as_ref().map_or(0, Vec::len)
    }

    /// Rebuilds a state from what a backend stored. Backends call this so every backend
    /// decodes the same way.
    pub fn from_stored(
        id: PersistenceId,
        content: Option<Vec<u8>>,
        internal: impl Into<Bytes>,
        version: i64,
        created_at: Option<DateTime<Utc>>,
        updated_at: Option<DateTime<Utc>>,
    ) -> Result<Self, StateCodecError> {
        let (progress, results) = decode_internal(internal)?;
        let version =
            u64::try_from(version).map_err(|_| StateCodecError::Invalid("negative version"))?;
        Ok(Self {
            id,
            content,
            progress,
            results,
            version,
            created_at,
            updated_at,
        })
    }
}

/// The current time at the precision every backend keeps (microseconds).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> EncodedRecord {
        EncodedRecord {
            topic: "out".into(),
            partition: if n.is_multiple_of(2) { Some(1) } else { None },
            key: Some(vec![n]),
            value: if n.is_multiple_of(3) {
                None
            } else {
                Some(vec![n, n])
            },
            headers: Headers::new().with("h", vec![n]).with("h", None),
            timestamp: Some(i64::from(n)),
        }
    }

    #[test]
    fn internal_blob_round_trips() {
        let mut state: RawState = State::fresh(PersistenceId::new("k").unwrap());
        let a = TopicPartition::new("in", 0);
        let b = TopicPartition::new("other", 7);
        state.progress.record(a.clone(), 41);
        state.progress.record(b.clone(), 3);
        let (r1, r23) = (vec![record(1)], vec![record(2), record(3)]);
        state
            .results
            .replace_partition(a.clone(), [(40, r1.as_slice()), (41, r23.as_slice())]);
        state.results.replace_partition(b, [(3, &[][..])]);
        let (progress, results) = decode_internal(state.encode_internal()).unwrap();
        assert_eq!(progress, state.progress);
        assert_eq!(results, state.results);
        assert_eq!(results.get(&a, 41).unwrap(), Some(r23));
        assert_eq!(results.get(&a, 39).unwrap(), None);
    }

    /// The stored layout is the one `proto::Internal` describes: a blob written by the
    /// fully typed messages reads back the same, and the other way round.
    #[test]
    fn stored_layout_is_the_documented_schema() {
        // The first output names its topic; the others, to the same topic, leave it out.
        let output = |n: u8, topic: Option<&str>| proto::OutputRecord {
            topic: topic.map(str::to_owned),
            partition: Some(i32::from(n)),
            key: Some(vec![n]),
            value: None,
            headers: vec![proto::Header {
                key: "h".into(),
                value: Some(vec![n]),
            }],
            timestamp: Some(-1),
            from_input: 0,
        };
        let typed = proto::Internal {
            version: Some(proto::internal::Version::V1(proto::InternalV1 {
                progress: vec![proto::PartitionProgress {
                    topic: "in".into(),
                    partition: 2,
                    offset: 9,
                }],
                results: vec![proto::PartitionResults {
                    topic: "in".into(),
                    partition: 2,
                    inputs: vec![
                        proto::InputResult {
                            offset: 8,
                            outputs: vec![output(1, Some("out"))],
                        },
                        proto::InputResult {
                            offset: 9,
                            outputs: vec![output(2, None), output(3, None)],
                        },
                    ],
                }],
            })),
        }
        .encode_to_vec();
        let (progress, results) = decode_internal(typed.clone()).unwrap();
        let tp = TopicPartition::new("in", 2);
        assert_eq!(progress.get(&tp), Some(9));
        let nine = results.get(&tp, 9).unwrap().unwrap();
        assert_eq!(nine.len(), 2);
        assert_eq!(nine[1].partition, Some(3));
        let mut state: RawState = State::fresh(PersistenceId::new("k").unwrap());
        state.progress = progress;
        state.results = results;
        assert_eq!(state.encode_internal(), typed);
    }

    proptest::proptest! {
        /// The hand-written internal blob is exactly prost's encoding of
        /// `proto::StoredInternal`, its announced length is exact, and it reads back.
        #[test]
        fn internal_blob_is_prosts_encoding(
            progress in proptest::collection::vec(("[a-z]{0,3}", proptest::num::i32::ANY, proptest::num::i64::ANY), 0..4),
            results in proptest::collection::vec(
                ("[a-z]{0,3}", proptest::num::i32::ANY, proptest::collection::vec((proptest::num::i64::ANY, 0u8..4), 0..3)),
                0..3,
            ),
        ) {
            let mut state: RawState = State::fresh(PersistenceId::new("k").unwrap());
            for (topic, partition, offset) in &progress {
                state.progress.record(TopicPartition::new(topic.as_str(), *partition), *offset);
            }
            for (topic, partition, inputs) in results {
                let mut inputs: Vec<(i64, Vec<EncodedRecord>)> = inputs
                    .into_iter()
                    .map(|(offset, n)| (offset, (0..n).map(record).collect()))
                    .collect();
                inputs.sort_by_key(|(offset, _)| *offset);
                inputs.dedup_by_key(|(offset, _)| *offset);
                state.results.replace_partition(
                    TopicPartition::new(topic.as_str(), partition),
                    inputs.iter().map(|(offset, records)| (*offset, records.as_slice())),
                );
            }
            let theirs = proto::StoredInternal {
                version: Some(proto::stored_internal::Version::V1(proto::StoredInternalV1 {
                    progress: state
                        .progress
                        .iter()
                        .map(|(tp, offset)| proto::PartitionProgress {
                            topic: tp.topic.to_string(),
                            partition: tp.partition,
                            offset,
                        })
                        .collect(),
                    results: state
                        .results
                        .partitions()
                        .map(|r| Bytes::copy_from_slice(r.as_bytes()))
                        .collect(),
                })),
            }
            .encode_to_vec();
            let ours = state.encode_internal();
            proptest::prop_assert_eq!(&ours, &theirs);
            proptest::prop_assert_eq!(state.encoded_internal_len(), ours.len());
            let (progress, results) = decode_internal(ours).unwrap();
            proptest::prop_assert_eq!(progress, state.progress);
            proptest::prop_assert_eq!(results, state.results);
        }
    }

    #[test]
    fn empty_blob_is_empty_progress() {
        let (progress, results) = decode_internal(Vec::new()).unwrap();
        assert!(progress.is_empty() && results.is_empty());
    }

    #[test]
    fn garbage_blob_is_a_typed_error() {
        assert!(matches!(
            decode_internal(vec![0x0a, 0xff, 0xff]),
            Err(StateCodecError::Protobuf(_))
        ));
    }

    #[test]
    fn progress_never_moves_back() {
        let mut progress = Progress::default();
        let tp = TopicPartition::new("t", 0);
        progress.record(tp.clone(), 10);
        progress.record(tp.clone(), 4);
        assert_eq!(progress.get(&tp), Some(10));
        assert!(progress.has_applied(&tp, 10));
        assert!(!progress.has_applied(&tp, 11));
    }
}
