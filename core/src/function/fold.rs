//! The replay-aware fold: applies a batch of messages of one persistence id to its state.
//!
//! For each message, by its topic-partition `tp` and offset:
//! - **newer than the state's progress** for `tp`: apply it (one state decode and one
//!   encode for the whole batch) and record its outputs in the state's last results;
//! - **already applied, and its outputs are in the last results**: it was applied by the
//!   last write but its outputs may never have reached Kafka, so re-emit the stored
//!   outputs byte for byte, without running the user function;
//! - **already applied, outputs not stored**: an earlier batch, whose outputs were
//!   acknowledged before the state was written again: skip it.
//!
//! A write replaces the last results of each topic-partition it applied messages from
//! with the outputs of *every* message of this batch from that partition, replayed ones
//! included, so a crash right after this write still finds them all.
//!
//! **Caller invariant.** For a given topic-partition, the state produced by a fold must
//! not be written before every output of the previous fold from that partition has been
//! acknowledged by the broker (process a partition's batches one after the other).
//! Otherwise the results of the earlier batch could be replaced before they were sent.

use std::collections::BTreeMap;
use std::ops::Range;

use foldhash::HashSet;

// A fold's per-message bookkeeping usually holds one or two entries (one message of a
// key per batch is the common case): inline, it costs no allocation.
use smallvec::SmallVec;

use crate::function::stateful::StatefulProcessor;
use crate::function::{FunctionError, ProcessError};
use crate::id::PersistenceId;
use crate::message::{RawMessage, TopicPartition};
use crate::state::{EncodedRecord, RawState, StateCodecError, StoredInput, restore_from_input};

/// What to do with a message whose processing failed (the engine's error policy).
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorAction {
    /// Count the message as applied without changing the state, and emit these records
    /// (typically one dead-letter record) as its outputs. They are stored in the last
    /// results like any output, so a replay re-emits them identically.
    DeadLetter(Vec<EncodedRecord>),
    /// Stop: the fold fails and nothing of it may be written or committed.
    Abort,
}

/// What happened to one message of a fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Applied by an earlier batch whose outputs were already acknowledged: nothing to do.
    Skipped,
    /// Applied by the last write: its stored outputs are re-emitted.
    Replayed,
    /// Applied now.
    Applied,
    /// Failed now and handled by [`ErrorAction::DeadLetter`].
    DeadLettered,
    /// A copy of a message earlier in this batch (see [`StatefulProcessor::origin`]):
    /// that one's outputs stand for both.
    Duplicate,
}

/// The outcome of one message of a fold.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageOutcome {
    /// Where the message came from.
    pub topic_partition: TopicPartition,
    /// Its offset.
    pub offset: i64,
    /// What happened.
    pub kind: OutcomeKind,
    /// Where the records to publish for it are in [`FoldOutcome::records`], in order.
    pub outputs: Range<usize>,
}

/// The outcome of a fold.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldOutcome {
    /// The state to write (still carrying the version that was read), or `None` when
    /// the batch changed nothing (only skips and replays).
    pub write: Option<RawState>,
    /// One outcome per input message, in input order.
    pub messages: Vec<MessageOutcome>,
    /// Every message's records, each message's at its [`MessageOutcome::outputs`]
    /// (after whatever the vector given to [`fold_into`] held). One vector for all of
    /// them, not one per message; not necessarily in message order:
    /// [`outputs`](Self::outputs) is.
    pub records: Vec<EncodedRecord>,
}

impl FoldOutcome {
    /// Every record to publish, in message order.
    pub fn outputs(&self) -> impl Iterator<Item = &EncodedRecord> {
        self.messages
            .iter()
            .flat_map(|m| &self.records[m.outputs.clone()])
    }

    /// The records to publish for input message `index`.
    pub fn outputs_of(&self, index: usize) -> &[EncodedRecord] {
        &self.records[self.messages[index].outputs.clone()]
    }
}

/// Why a fold failed. Nothing of a failed fold may be written, published or committed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// A message failed and the error policy said [`ErrorAction::Abort`].
    #[error("message {topic_partition}@{offset} failed: {source}")]
    Aborted {
        /// Where the message came from.
        topic_partition: TopicPartition,
        /// Its offset.
        offset: i64,
        /// Why it failed.
        #[source]
        source: ProcessError,
    },
    /// The state itself is unusable (its content cannot be decoded or encoded).
    #[error(transparent)]
    State(ProcessError),
    /// The stored outputs a replay needs cannot be decoded.
    #[error("state {id}: stored outputs cannot be decoded: {source}")]
    CorruptResults {
        /// The state's id.
        id: PersistenceId,
        /// Why.
        #[source]
        source: StateCodecError,
    },
    /// Messages of one topic-partition were not in strictly ascending offset order.
    #[error("messages of {topic_partition} are not in ascending offset order at offset {offset}")]
    OutOfOrder {
        /// The topic-partition.
        topic_partition: TopicPartition,
        /// The offending offset.
        offset: i64,
    },
}

enum Plan {
    Skip,
    Duplicate,
    Replay(Vec<EncodedRecord>),
    Apply,
    /// The message carries no valid origin ([`StatefulProcessor::origin`]).
    NoOrigin(ProcessError),
}

/// Applies `messages` (all of `state.id`, in offset order per topic-partition) to
/// `state`. `on_error` decides what a failed message becomes.
///
/// Messages are recorded under their [origin](StatefulProcessor::origin): their own
/// coordinates, which must ascend per topic-partition, or the coordinates a copy
/// carries, which may repeat (a repeat within the batch is a
/// [`Duplicate`](OutcomeKind::Duplicate)) and come out of order.
pub fn fold<P: StatefulProcessor + ?Sized>(
    processor: &P,
    state: RawState,
    messages: &[&RawMessage],
    on_error: impl FnMut(&RawMessage, &ProcessError) -> ErrorAction,
) -> Result<FoldOutcome, FoldError> {
    fold_into(processor, state, messages, on_error, Vec::new())
}

/// [`fold`], appending the records to `records` (returned as
/// [`FoldOutcome::records`]): an engine folding many states of a batch passes one
/// vector from fold to fold, so a batch's outputs take one allocation.
pub fn fold_into<P: StatefulProcessor + ?Sized>(
    processor: &P,
    state: RawState,
    messages: &[&RawMessage],
    mut on_error: impl FnMut(&RawMessage, &ProcessError) -> ErrorAction,
    mut records: Vec<EncodedRecord>,
) -> Result<FoldOutcome, FoldError> {
    // Per topic-partition of this batch, its last offset (a state's messages nearly
    // always come from one partition, so a short list beats a map), and stored results
    // decoded on the first replay that needs them.
    let mut last_offset: SmallVec<[(TopicPartition, i64); 1]> = SmallVec::new();
    // Carried origins seen in this batch, by index into `last_offset`; only copies need it.
    let mut carried_seen: Option<HashSet<(usize, i64)>> = None;
    let mut replayable: Vec<(TopicPartition, BTreeMap<i64, Vec<EncodedRecord>>)> = Vec::new();
    let mut plans: SmallVec<[(TopicPartition, i64, Plan); 2]> =
        SmallVec::with_capacity(messages.len());
    let mut new_messages: SmallVec<[&RawMessage; 2]> = SmallVec::with_capacity(messages.len());
    let mut carried_any = false;
    for message in messages {
        let (tp, offset, carried) = match processor.origin(message) {
            Ok(None) => (message.topic_partition(), message.offset, false),
            Ok(Some(origin)) => (origin.topic_partition, origin.offset, true),
            Err(error) => {
                plans.push((
                    message.topic_partition(),
                    message.offset,
                    Plan::NoOrigin(error),
                ));
                continue;
            }
        };
        let index = match last_offset.iter().position(|(seen, _)| *seen == tp) {
            Some(index) => index,
            None => {
                last_offset.push((tp.clone(), i64::MIN));
                last_offset.len() - 1
            }
        };
        let previous = &mut last_offset[index].1;
        if carried {
            carried_any = true;
            if !carried_seen
                .get_or_insert_with(HashSet::default)
                .insert((index, offset))
            {
                plans.push((tp, offset, Plan::Duplicate));
                continue;
            }
            *previous = (*previous).max(offset);
        } else if *previous >= offset {
            return Err(FoldError::OutOfOrder {
                topic_partition: tp,
                offset,
            });
        } else {
            *previous = offset;
        }
        let plan = if state.progress.has_applied(&tp, offset) {
            let index = match replayable.iter().position(|(seen, _)| *seen == tp) {
                Some(index) => index,
                None => {
                    let decoded = match state.results.partition(&tp) {
                        Some(results) => {
                            results
                                .decode()
                                .map_err(|source| FoldError::CorruptResults {
                                    id: state.id.clone(),
                                    source,
                                })?
                        }
                        None => BTreeMap::new(),
                    };
                    replayable.push((tp.clone(), decoded));
                    replayable.len() - 1
                }
            };
            // Each offset is planned once (own offsets ascend, repeated copies are
            // duplicates), so each stored result is taken at most once.
            match replayable[index].1.remove(&offset) {
                Some(outputs) => Plan::Replay(outputs),
                None => Plan::Skip,
            }
        } else {
            new_messages.push(*message);
            Plan::Apply
        };
        plans.push((tp, offset, plan));
    }
    drop(replayable);

    let mut applied_content = None;
    let mut applied_outcomes = Vec::new().into_iter();
    // The applied messages' records come first, in their order; `next_applied` walks them.
    let mut next_applied = records.len();
    if !new_messages.is_empty() {
        let applied = processor
            .apply(
                &state.id,
                state.content.as_deref(),
                &new_messages,
                &mut records,
            )
            .map_err(FoldError::State)?;
        let counted: usize = applied.outcomes.iter().flatten().sum();
        if next_applied + counted != records.len() {
            return Err(FoldError::State(ProcessError::Function(
                FunctionError::new("processor's outcomes do not count the records it appended"),
            )));
        }
        applied_content = applied.content;
        applied_outcomes = applied.outcomes.into_iter();
    }

    let mut outcomes = Vec::with_capacity(messages.len());
    // Per topic-partition recorded by this fold, its highest offset.
    let mut changed: SmallVec<[(TopicPartition, i64); 1]> = SmallVec::new();
    for ((tp, offset, plan), message) in plans.into_iter().zip(messages) {
        let end = records.len();
        let (kind, outputs, recorded) = match plan {
            Plan::Skip => (OutcomeKind::Skipped, end..end, false),
            Plan::Duplicate => (OutcomeKind::Duplicate, end..end, false),
            Plan::Replay(mut outputs) => {
                restore_from_input(&mut outputs, message);
                (
                    OutcomeKind::Replayed,
                    appended(&mut records, outputs),
                    false,
                )
            }
            Plan::NoOrigin(error) => match on_error(message, &error) {
                // Without an origin there is nothing to record it under: a replay
                // dead-letters it again.
                ErrorAction::DeadLetter(dead) => (
                    OutcomeKind::DeadLettered,
                    appended(&mut records, dead),
                    false,
                ),
                ErrorAction::Abort => {
                    return Err(FoldError::Aborted {
                        topic_partition: tp,
                        offset,
                        source: error,
                    });
                }
            },
            Plan::Apply => match applied_outcomes.next() {
                Some(Ok(count)) => {
                    let start = next_applied;
                    next_applied += count;
                    (OutcomeKind::Applied, start..next_applied, true)
                }
                Some(Err(error)) => match on_error(message, &error) {
                    ErrorAction::DeadLetter(dead) => (
                        OutcomeKind::DeadLettered,
                        appended(&mut records, dead),
                        true,
                    ),
                    ErrorAction::Abort => {
                        return Err(FoldError::Aborted {
                            topic_partition: tp,
                            offset,
                            source: error,
                        });
                    }
                },
                None => {
                    return Err(FoldError::State(ProcessError::Function(
                        FunctionError::new("processor returned fewer outcomes than messages"),
                    )));
                }
            },
        };
        if recorded {
            match changed.iter_mut().find(|(seen, _)| *seen == tp) {
                Some((_, last)) => *last = (*last).max(offset),
                None => changed.push((tp.clone(), offset)),
            }
        }
        outcomes.push(MessageOutcome {
            topic_partition: tp,
            offset,
            kind,
            outputs,
        });
    }
    if changed.is_empty() {
        // Only skips, duplicates, replays and unrecorded failures: nothing to write.
        return Ok(FoldOutcome {
            write: None,
            messages: outcomes,
            records,
        });
    }

    let mut write = state;
    if let Some(content) = applied_content {
        write.content = Some(content);
    }
    // Results of partitions with new messages are replaced by this batch's outputs,
    // replayed ones included; partitions with only replays keep theirs. What an output
    // shares with its input (key, value, timestamp) is left out of them: a replay
    // presents the same input again (a copy carries the same fields), which restores it.
    for (tp, last) in changed {
        let mut inputs: SmallVec<[StoredInput<'_>; 4]> = SmallVec::new();
        for (o, message) in outcomes.iter().zip(messages) {
            let stored = o.topic_partition == tp
                && matches!(
                    o.kind,
                    OutcomeKind::Replayed | OutcomeKind::Applied | OutcomeKind::DeadLettered
                );
            if stored {
                inputs.push((o.offset, &records[o.outputs.clone()], Some(*message)));
            }
        }
        if carried_any {
            // Copies may come out of order; results are stored by ascending offset.
            inputs.sort_unstable_by_key(|(offset, _, _)| *offset);
        }
        write
            .results
            .replace_partition_with_inputs(tp.clone(), inputs);
        write.progress.record(tp, last);
    }
    Ok(FoldOutcome {
        write: Some(write),
        messages: outcomes,
        records,
    })
}

/// Appends `more` to `records`; where they landed.
fn appended(records: &mut Vec<EncodedRecord>, more: Vec<EncodedRecord>) -> Range<usize> {
    let start = records.len();
    records.extend(more);
    start..records.len()
}

/// Replaces the outputs stored for replay of input `offset` of `tp` (applied by the
/// state's last write from `tp`) with `outputs`, as if the fold had produced them:
/// a replay of `input` then re-emits these. Whether the input was stored there.
///
/// The engine uses it when the broker refuses an output for good: the input's stored
/// outputs become its dead letter, so a replay does not repeat the refusal.
pub fn replace_outputs(
    state: &mut RawState,
    tp: &TopicPartition,
    offset: i64,
    input: &RawMessage,
    outputs: &[EncodedRecord],
) -> Result<bool, StateCodecError> {
    let Some(results) = state.results.partition(tp) else {
        return Ok(false);
    };
    let mut inputs = results.decode()?;
    if !inputs.contains_key(&offset) {
        return Ok(false);
    }
    // The other inputs' outputs keep the marks of what they left out; the new outputs
    // leave out what they share with `input`.
    inputs.insert(offset, outputs.to_vec());
    state.results.replace_partition_with_inputs(
        tp.clone(),
        inputs.iter().map(|(&stored, records)| {
            let from = (stored == offset).then_some(input);
            (stored, records.as_slice(), from)
        }),
    );
    Ok(true)
}

/// Header marking a decoded stored output that left out fields it shares with its
/// input (its value names which: see [`restore_from_input`]); a replay restores them
/// from the input and drops the header. Never published, never stored as a header.
pub const INPUT_PAYLOAD_HEADER: &str = "flows.stored.input-payload";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Json, Utf8};
    use crate::function::FunctionError;
    use crate::function::stateful::{PersistenceIdFn, StatefulFunction};
    use crate::id::PersistenceId;
    use crate::message::Record;
    use crate::state::State;
    use crate::topic::Topic;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Word count whose outputs carry the count, plus a header that differs on every
    /// run of the function: a recomputation instead of a replay would be detected.
    fn counter() -> StatefulFunction<i64> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static RUNS: AtomicU64 = AtomicU64::new(0);
        StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::key(),
            |count, word| {
                if word.value == "poison" {
                    return Err(FunctionError::new("poison"));
                }
                let count = count.copied().unwrap_or(0) + 1;
                let run = RUNS.fetch_add(1, Ordering::Relaxed);
                Ok((
                    count,
                    Record::new(word.key, count).with_header("run", run.to_string()),
                ))
            },
        )
    }

    /// A message with a timestamp, which outputs inherit (and results leave out).
    fn word(partition: i32, offset: i64, key: &str, value: &str) -> RawMessage {
        RawMessage {
            timestamp: Some(1_700_000_000_000 + offset),
            ..RawMessage::raw(
                "words",
                partition,
                offset,
                Some(key.as_bytes()),
                Some(value.as_bytes()),
            )
        }
    }

    fn fresh() -> RawState {
        State::fresh(PersistenceId::new("a").unwrap())
    }

    fn abort(_: &RawMessage, _: &ProcessError) -> ErrorAction {
        ErrorAction::Abort
    }

    fn value(r: &EncodedRecord) -> i64 {
        serde_json::from_slice(r.value.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn new_messages_are_applied_and_recorded() {
        let f = counter();
        let (m0, m1) = (word(0, 10, "a", "a"), word(0, 11, "a", "a"));
        let out = fold(&f, fresh(), &[&m0, &m1], abort).unwrap();
        let state = out.write.clone().unwrap();
        assert_eq!(state.content.as_deref(), Some(&b"2"[..]));
        let tp = m0.topic_partition();
        assert_eq!(state.progress.get(&tp), Some(11));
        assert_eq!(state.results.get(&tp, 10).unwrap().unwrap().len(), 1);
        assert_eq!(out.outputs().map(value).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn replayed_messages_re_emit_stored_outputs_without_running_the_function() {
        let f = counter();
        let (m0, m1, m2) = (
            word(0, 0, "a", "a"),
            word(0, 1, "a", "a"),
            word(0, 2, "a", "a"),
        );
        let first = fold(&f, fresh(), &[&m0, &m1], abort).unwrap();
        let stored = first.write.clone().unwrap();
        // Crash before the outputs were acknowledged: the batch is consumed again.
        let replay = fold(&f, stored.clone(), &[&m0, &m1], abort).unwrap();
        assert!(replay.write.is_none(), "a pure replay must not write");
        assert_eq!(
            replay.outputs().collect::<Vec<_>>(),
            first.outputs().collect::<Vec<_>>(),
            "replayed outputs must be byte-identical"
        );
        // Replay plus new messages: replayed outputs are carried into the new results.
        let mixed = fold(&f, stored, &[&m1, &m2], abort).unwrap();
        let kinds: Vec<_> = mixed.messages.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec![OutcomeKind::Replayed, OutcomeKind::Applied]);
        let state = mixed.write.unwrap();
        let tp = m0.topic_partition();
        let mut carried = state.results.get(&tp, 1).unwrap().unwrap();
        restore_from_input(&mut carried, &m1);
        assert_eq!(carried, first.outputs_of(1));
        assert!(
            state.results.get(&tp, 0).unwrap().is_none(),
            "m0 was acknowledged: not carried"
        );
        assert!(state.results.get(&tp, 2).unwrap().is_some());
    }

    #[test]
    fn messages_older_than_the_last_write_are_skipped() {
        let f = counter();
        let (m0, m1) = (word(0, 0, "a", "a"), word(0, 1, "a", "a"));
        let s1 = fold(&f, fresh(), &[&m0], abort).unwrap().write.unwrap();
        let s2 = fold(&f, s1, &[&m1], abort).unwrap().write.unwrap();
        let out = fold(&f, s2, &[&m0], abort).unwrap();
        assert_eq!(out.messages[0].kind, OutcomeKind::Skipped);
        assert!(out.outputs().next().is_none());
    }

    #[test]
    fn progress_is_per_topic_partition() {
        let f = counter();
        let (p0, p1) = (word(0, 5, "a", "a"), word(1, 5, "a", "a"));
        let s = fold(&f, fresh(), &[&p0], abort).unwrap().write.unwrap();
        let out = fold(&f, s, &[&p1], abort).unwrap();
        assert_eq!(out.messages[0].kind, OutcomeKind::Applied);
        let s = out.write.unwrap();
        assert_eq!(s.content.as_deref(), Some(&b"2"[..]));
        // Partition 0's results survive a write from partition 1.
        assert!(s.results.get(&p0.topic_partition(), 5).unwrap().is_some());
    }

    #[test]
    fn dead_lettered_messages_advance_progress_and_replay_identically() {
        let f = counter();
        let (m0, bad, m2) = (
            word(0, 0, "a", "a"),
            word(0, 1, "a", "poison"),
            word(0, 2, "a", "a"),
        );
        let dlq = |m: &RawMessage, e: &ProcessError| {
            ErrorAction::DeadLetter(vec![EncodedRecord {
                topic: "dlq".into(),
                partition: None,
                key: m.key.clone(),
                value: m.value.clone(),
                headers: crate::message::Headers::new().with("error", e.to_string().into_bytes()),
                timestamp: m.timestamp,
            }])
        };
        let out = fold(&f, fresh(), &[&m0, &bad, &m2], dlq).unwrap();
        let kinds: Vec<_> = out.messages.iter().map(|m| m.kind).collect();
        assert_eq!(
            kinds,
            vec![
                OutcomeKind::Applied,
                OutcomeKind::DeadLettered,
                OutcomeKind::Applied
            ]
        );
        let state = out.write.clone().unwrap();
        assert_eq!(state.content.as_deref(), Some(&b"2"[..]));
        // Stored without the input's key and value, which it repeats.
        let stored = state
            .results
            .get(&bad.topic_partition(), 1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored[0].key.as_ref(), stored[0].value.as_ref()),
            (None, None)
        );
        assert!(stored[0].headers.first(INPUT_PAYLOAD_HEADER).is_some());
        let replay = fold(&f, state, &[&m0, &bad, &m2], abort).unwrap();
        assert_eq!(replay.outputs_of(1), out.outputs_of(1));
    }

    #[test]
    fn abort_fails_the_whole_fold() {
        let f = counter();
        let (m0, bad) = (word(0, 0, "a", "a"), word(0, 1, "a", "poison"));
        let err = fold(&f, fresh(), &[&m0, &bad], abort).unwrap_err();
        assert!(matches!(err, FoldError::Aborted { offset: 1, .. }), "{err}");
    }

    #[test]
    fn out_of_order_input_is_rejected() {
        let f = counter();
        let (m0, m1) = (word(0, 3, "a", "a"), word(0, 2, "a", "a"));
        assert!(matches!(
            fold(&f, fresh(), &[&m0, &m1], abort),
            Err(FoldError::OutOfOrder { offset: 2, .. })
        ));
    }

    /// The stateful half of a join, in miniature: reads copies of `counter()`'s input
    /// ("words") from an intermediate topic, each carrying its source partition and
    /// offset in headers (an absent header: no origin).
    struct Copies(StatefulFunction<i64>);

    impl Copies {
        fn source(m: &RawMessage) -> Option<(i32, i64)> {
            let number = |name| {
                std::str::from_utf8(m.headers.first(name)??)
                    .ok()?
                    .parse::<i64>()
                    .ok()
            };
            Some((i32::try_from(number("src-p")?).ok()?, number("src-o")?))
        }
    }

    impl StatefulProcessor for Copies {
        fn input_topics(&self) -> Vec<std::sync::Arc<str>> {
            vec!["mid".into()]
        }
        fn persistence_id(&self, m: &RawMessage) -> Result<PersistenceId, ProcessError> {
            Ok(PersistenceId::from_utf8(
                m.key.as_deref().unwrap_or_default(),
            )?)
        }
        fn origin(&self, m: &RawMessage) -> Result<Option<crate::function::Origin>, ProcessError> {
            let (partition, offset) =
                Self::source(m).ok_or_else(|| ProcessError::Origin("no src".into()))?;
            Ok(Some(crate::function::Origin {
                topic_partition: TopicPartition::new("words", partition),
                offset,
            }))
        }
        fn apply(
            &self,
            id: &PersistenceId,
            content: Option<&[u8]>,
            messages: &[&RawMessage],
            outputs: &mut Vec<EncodedRecord>,
        ) -> Result<crate::function::stateful::Applied, ProcessError> {
            let restored: Vec<RawMessage> = messages
                .iter()
                .map(|m| {
                    let (partition, offset) = Self::source(m).unwrap();
                    RawMessage {
                        topic: "words".into(),
                        partition,
                        offset,
                        ..(*m).clone()
                    }
                })
                .collect();
            let refs: Vec<&RawMessage> = restored.iter().collect();
            self.0.apply(id, content, &refs, outputs)
        }
    }

    /// A copy, at `offset` of the intermediate topic, of the message at `source` of
    /// "words" partition `partition`.
    fn copy(offset: i64, partition: i32, source: i64, key: &str) -> RawMessage {
        let mut m = RawMessage::raw("mid", 0, offset, Some(key.as_bytes()), Some(key.as_bytes()));
        m.headers
            .append("src-p", Some(partition.to_string().into_bytes()));
        m.headers
            .append("src-o", Some(source.to_string().into_bytes()));
        m
    }

    fn kinds(out: &FoldOutcome) -> Vec<OutcomeKind> {
        out.messages.iter().map(|m| m.kind).collect()
    }

    #[test]
    fn copies_of_one_source_message_change_the_state_once() {
        use OutcomeKind::*;
        let f = Copies(counter());
        let src = TopicPartition::new("words", 3);
        // The re-key step published sources 0 and 1, crashed, and published them again.
        let batch = [
            copy(0, 3, 0, "a"),
            copy(1, 3, 1, "a"),
            copy(2, 3, 0, "a"),
            copy(3, 3, 1, "a"),
        ];
        let refs: Vec<&RawMessage> = batch.iter().collect();
        let first = fold(&f, fresh(), &refs, abort).unwrap();
        assert_eq!(kinds(&first), [Applied, Applied, Duplicate, Duplicate]);
        assert_eq!(first.outputs().map(value).collect::<Vec<_>>(), [1, 2]);
        let state = first.write.clone().unwrap();
        assert_eq!(state.content.as_deref(), Some(&b"2"[..]));
        assert_eq!(state.progress.get(&src), Some(1));
        assert_eq!(state.progress.get(&TopicPartition::new("mid", 0)), None);

        // The stateful half crashed before its outputs were acknowledged: the same
        // copies, at other intermediate offsets, with a new source message.
        let again = [copy(7, 3, 0, "a"), copy(8, 3, 1, "a"), copy(9, 3, 2, "a")];
        let refs: Vec<&RawMessage> = again.iter().collect();
        let second = fold(&f, state, &refs, abort).unwrap();
        assert_eq!(kinds(&second), [Replayed, Replayed, Applied]);
        assert_eq!(
            second.outputs().take(2).collect::<Vec<_>>(),
            first.outputs().collect::<Vec<_>>(),
            "replayed byte for byte"
        );
        let state = second.write.unwrap();
        assert_eq!(state.content.as_deref(), Some(&b"3"[..]));

        // More copies, with another duplicate: the last write applied (or replayed)
        // sources 0, 1 and 2, so they replay again; nothing is written.
        let more = [
            copy(20, 3, 0, "a"),
            copy(21, 3, 2, "a"),
            copy(22, 3, 2, "a"),
        ];
        let refs: Vec<&RawMessage> = more.iter().collect();
        let third = fold(&f, state.clone(), &refs, abort).unwrap();
        assert_eq!(kinds(&third), [Replayed, Replayed, Duplicate]);
        assert!(third.write.is_none());

        // After a write of source 3 alone, copies of the earlier ones are skipped.
        let next = fold(&f, state, &[&copy(30, 3, 3, "a")], abort).unwrap();
        let state = next.write.unwrap();
        let late = [copy(40, 3, 0, "a"), copy(41, 3, 3, "a")];
        let refs: Vec<&RawMessage> = late.iter().collect();
        let fourth = fold(&f, state, &refs, abort).unwrap();
        assert_eq!(kinds(&fourth), [Skipped, Replayed]);
    }

    #[test]
    fn copies_out_of_order_are_applied_not_lost() {
        use OutcomeKind::*;
        let f = Copies(counter());
        let batch = [
            copy(0, 0, 7, "a"),
            copy(1, 0, 8, "a"),
            copy(2, 0, 5, "a"),
            copy(3, 1, 1, "a"),
        ];
        let refs: Vec<&RawMessage> = batch.iter().collect();
        let out = fold(&f, fresh(), &refs, abort).unwrap();
        assert_eq!(kinds(&out), [Applied, Applied, Applied, Applied]);
        let state = out.write.clone().unwrap();
        assert_eq!(
            state.progress.get(&TopicPartition::new("words", 0)),
            Some(8)
        );
        assert_eq!(
            state.progress.get(&TopicPartition::new("words", 1)),
            Some(1)
        );
        // Every one of them replays its own outputs.
        let replay = fold(&f, state, &[&batch[2], &batch[0]], abort).unwrap();
        assert_eq!(kinds(&replay), [Replayed, Replayed]);
        assert_eq!(replay.outputs_of(0), out.outputs_of(2));
        assert_eq!(replay.outputs_of(1), out.outputs_of(0));
    }

    #[test]
    fn a_copy_without_origin_fails_alone_and_is_not_recorded() {
        use OutcomeKind::*;
        let f = Copies(counter());
        let mut orphan = copy(1, 0, 0, "a");
        orphan.headers = crate::message::Headers::new();
        let batch = [copy(0, 0, 4, "a"), orphan, copy(2, 0, 5, "a")];
        let refs: Vec<&RawMessage> = batch.iter().collect();
        let dead = |m: &RawMessage, e: &ProcessError| {
            assert_eq!(e.kind(), "origin");
            ErrorAction::DeadLetter(vec![EncodedRecord {
                topic: "dlq".into(),
                partition: None,
                key: m.key.clone(),
                value: m.value.clone(),
                headers: crate::message::Headers::new(),
                timestamp: None,
            }])
        };
        let out = fold(&f, fresh(), &refs, dead).unwrap();
        assert_eq!(kinds(&out), [Applied, DeadLettered, Applied]);
        let state = out.write.unwrap();
        assert_eq!(state.content.as_deref(), Some(&b"2"[..]));
        assert_eq!(state.progress.get(&TopicPartition::new("mid", 0)), None);
        assert!(matches!(
            fold(&f, fresh(), &refs, abort),
            Err(FoldError::Aborted { offset: 1, .. })
        ));
    }

    /// A simulated join: a re-key step copies two source partitions into one
    /// intermediate partition in batches, crashing at random (then publishing the batch
    /// again: all of it, or after a prefix of it got through), and a stateful half
    /// reads the intermediate partition with its own batches and crashes (see
    /// [`run_with_crashes`]). Returns the final counts and every published output.
    fn run_join_with_crashes(
        sources: &[Vec<u8>; 2],
        rekey: &[(u8, usize, usize)],
        batches: &[usize],
        crashes: &[u8],
    ) -> (HashMap<String, i64>, Vec<EncodedRecord>) {
        // The re-key step: (source partition, batch size, delivered prefix or all).
        let mut intermediate: Vec<RawMessage> = Vec::new();
        let mut committed = [0usize; 2];
        let mut step = 0;
        while committed[0] < sources[0].len() || committed[1] < sources[1].len() {
            // Once the planned steps are used up, no more crashes: the work ends.
            let (pick, size, prefix) =
                rekey
                    .get(step)
                    .copied()
                    .unwrap_or((rekey[step % rekey.len()].0, 4, 0));
            step += 1;
            let p = usize::from(pick % 2);
            let p = if committed[p] < sources[p].len() {
                p
            } else {
                1 - p
            };
            let end = (committed[p] + size.max(1)).min(sources[p].len());
            // prefix 0: everything delivered and committed; otherwise a crash after
            // `prefix` records were delivered (the batch is published again later).
            let delivered = if prefix == 0 {
                end - committed[p]
            } else {
                prefix.min(end - committed[p])
            };
            let copies = sources[p]
                .iter()
                .enumerate()
                .skip(committed[p])
                .take(delivered);
            for (source, word) in copies {
                let key = format!("w{word}");
                let offset = intermediate.len() as i64;
                intermediate.push(copy(offset, p as i32, source as i64, &key));
            }
            if prefix == 0 {
                committed[p] = end;
            }
        }

        let f = Copies(counter());
        let mut store: HashMap<PersistenceId, RawState> = HashMap::new();
        let mut published: Vec<EncodedRecord> = Vec::new();
        let mut done = 0usize;
        let mut attempt = 0usize;
        while done < intermediate.len() {
            let crash = crashes.get(attempt).copied().unwrap_or(0);
            let batch = batches[attempt % batches.len()];
            attempt += 1;
            let end = (done + batch).min(intermediate.len());
            let mut by_key: Vec<(PersistenceId, Vec<&RawMessage>)> = Vec::new();
            for m in &intermediate[done..end] {
                let id = f.persistence_id(m).unwrap();
                match by_key.iter_mut().find(|(k, _)| *k == id) {
                    Some((_, ms)) => ms.push(m),
                    None => by_key.push((id, vec![m])),
                }
            }
            let mut outputs: BTreeMap<i64, Vec<EncodedRecord>> = BTreeMap::new();
            for (id, ms) in &by_key {
                let state = store
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| State::fresh(id.clone()));
                let out = fold(&f, state, ms, abort).unwrap();
                if let Some(mut w) = out.write.clone() {
                    w.version += 1;
                    store.insert(id.clone(), w);
                }
                for (i, m) in ms.iter().enumerate() {
                    outputs.insert(m.offset, out.outputs_of(i).to_vec());
                }
            }
            if crash == 1 {
                continue;
            }
            let outputs: Vec<_> = outputs.into_values().flatten().collect();
            if crash == 2 {
                published.extend(outputs.iter().take(outputs.len() / 2).cloned());
                continue;
            }
            published.extend(outputs);
            if crash == 3 {
                continue;
            }
            done = end;
        }
        let counts = store
            .into_iter()
            .map(|(id, s)| {
                (
                    id.to_string(),
                    serde_json::from_slice(&s.content.unwrap()).unwrap(),
                )
            })
            .collect();
        (counts, published)
    }

    /// Every count 1..=n of every key is published, first appearances in ascending
    /// order, every duplicate byte-identical to the first; the highest counts are
    /// `expected`.
    fn check_outputs(
        published: &[EncodedRecord],
        expected: &HashMap<String, i64>,
    ) -> Result<(), TestCaseError> {
        let mut first_seen: HashMap<(String, i64), &EncodedRecord> = HashMap::new();
        let mut max_seen: HashMap<String, i64> = HashMap::new();
        for r in published {
            let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
            let n = value(r);
            match first_seen.get(&(key.clone(), n)) {
                Some(first) => prop_assert_eq!(*first, r, "duplicate differs from first attempt"),
                None => {
                    let max = max_seen.entry(key.clone()).or_default();
                    prop_assert_eq!(n, *max + 1, "first appearance out of order for {}", key);
                    *max = n;
                    first_seen.insert((key, n), r);
                }
            }
        }
        prop_assert_eq!(&max_seen, expected);
        Ok(())
    }

    fn tally(words: impl IntoIterator<Item = u8>) -> HashMap<String, i64> {
        let mut expected: HashMap<String, i64> = HashMap::new();
        for w in words {
            *expected.entry(format!("w{w}")).or_default() += 1;
        }
        expected
    }

    /// A simulated engine over one partition: batches whose sizes vary between attempts
    /// (as they do when messages arrive at different times), one fold
    /// and one state write per key per batch, outputs "published" after the write,
    /// offsets committed after publication. `crashes` lists, per batch attempt, where the
    /// process dies: 0 none, 1 after the state write, 2 after publishing half the outputs,
    /// 3 after publishing all outputs (before the commit).
    fn run_with_crashes(
        words: &[u8],
        batches: &[usize],
        crashes: &[u8],
    ) -> (HashMap<String, i64>, Vec<EncodedRecord>) {
        let f = counter();
        let messages: Vec<RawMessage> = words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let key = format!("w{w}");
                word(0, i as i64, &key, &key)
            })
            .collect();
        let mut store: HashMap<PersistenceId, RawState> = HashMap::new();
        let mut published: Vec<EncodedRecord> = Vec::new();
        let mut committed = 0usize;
        let mut attempt = 0usize;
        while committed < messages.len() {
            let crash = crashes.get(attempt).copied().unwrap_or(0);
            let batch = batches[attempt % batches.len()];
            attempt += 1;
            let end = (committed + batch).min(messages.len());
            let chunk = &messages[committed..end];
            // Group by key, keeping offset order within each key.
            let mut by_key: Vec<(PersistenceId, Vec<&RawMessage>)> = Vec::new();
            for m in chunk {
                let id = f.persistence_id(m).unwrap();
                match by_key.iter_mut().find(|(k, _)| *k == id) {
                    Some((_, ms)) => ms.push(m),
                    None => by_key.push((id, vec![m])),
                }
            }
            let mut outputs_by_offset: BTreeMap<i64, Vec<EncodedRecord>> = BTreeMap::new();
            for (id, ms) in &by_key {
                let state = store
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| State::fresh(id.clone()));
                let out = fold(&f, state, ms, abort).unwrap();
                if let Some(mut w) = out.write.clone() {
                    w.version += 1;
                    store.insert(id.clone(), w);
                }
                for (i, m) in out.messages.iter().enumerate() {
                    outputs_by_offset.insert(m.offset, out.outputs_of(i).to_vec());
                }
            }
            if crash == 1 {
                continue;
            }
            let outputs: Vec<_> = outputs_by_offset.into_values().flatten().collect();
            if crash == 2 {
                published.extend(outputs.iter().take(outputs.len() / 2).cloned());
                continue;
            }
            published.extend(outputs);
            if crash == 3 {
                continue;
            }
            committed = end;
        }
        let counts = store
            .into_iter()
            .map(|(id, s)| {
                (
                    id.to_string(),
                    serde_json::from_slice(&s.content.unwrap()).unwrap(),
                )
            })
            .collect();
        (counts, published)
    }

    proptest! {
        /// G1 and G2 at the level of the pure logic: whatever the crash points, every
        /// count is exact, every count 1..=n of every key is published with first
        /// appearances in ascending order, and every duplicate is byte-identical.
        #[test]
        fn crashes_never_double_apply_or_lose_outputs(
            words in proptest::collection::vec(0u8..6, 1..120),
            batches in proptest::collection::vec(1usize..17, 1..8),
            crashes in proptest::collection::vec(0u8..4, 0..40),
        ) {
            let (counts, published) = run_with_crashes(&words, &batches, &crashes);
            let expected = tally(words.iter().copied());
            prop_assert_eq!(&counts, &expected);
            check_outputs(&published, &expected)?;
        }

        /// G1 and G2 for a join: however often and wherever the re-key step crashes and
        /// publishes copies again, and wherever the stateful half crashes, every source
        /// message changes its state once and every output is replayed, not recomputed.
        #[test]
        fn join_copies_never_double_apply_or_lose_outputs(
            left in proptest::collection::vec(0u8..5, 0..60),
            right in proptest::collection::vec(0u8..5, 0..60),
            rekey in proptest::collection::vec((0u8..2, 1usize..9, 0usize..6), 1..40),
            batches in proptest::collection::vec(1usize..17, 1..8),
            crashes in proptest::collection::vec(0u8..4, 0..40),
        ) {
            let sources = [left, right];
            let (counts, published) = run_join_with_crashes(&sources, &rekey, &batches, &crashes);
            let expected = tally(sources.iter().flatten().copied());
            prop_assert_eq!(&counts, &expected);
            check_outputs(&published, &expected)?;
        }
    }
}
