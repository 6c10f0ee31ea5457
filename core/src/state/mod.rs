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
mod results;

use std::sync::Arc;

use prost::bytes::Bytes;

use chrono::{DateTime, SubsecRound, Utc};
use prost::Message as _;

use crate::id::PersistenceId;
use crate::message::{Headers, TopicPartition};
use partition_map::PartitionMap;

pub use results::{LastResults, PartitionResults};

/// An encoded output message, exactly as it is (or was) sent to Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EncodedRecord {
    /// Destination topic.
    pub topic: String,
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress(PartitionMap<i64>);

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
#[derive(Clone, Debug, PartialEq)]
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

    /// Encodes progress and last results as the versioned protobuf blob.
    pub fn encode_internal(&self) -> Vec<u8> {
        let v1 = proto::StoredInternalV1 {
            progress: self
                .progress
                .iter()
                .map(|(tp, offset)| proto::PartitionProgress {
                    topic: tp.topic.to_string(),
                    partition: tp.partition,
                    offset,
                })
                .collect(),
            results: self.results.to_stored(),
        };
        proto::StoredInternal {
            version: Some(proto::stored_internal::Version::V1(v1)),
        }
        .encode_to_vec()
    }
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
        let output = |n: u8| proto::OutputRecord {
            topic: "out".into(),
            partition: Some(i32::from(n)),
            key: Some(vec![n]),
            value: None,
            headers: vec![proto::Header {
                key: "h".into(),
                value: Some(vec![n]),
            }],
            timestamp: Some(-1),
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
                            outputs: vec![output(1)],
                        },
                        proto::InputResult {
                            offset: 9,
                            outputs: vec![output(2), output(3)],
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
