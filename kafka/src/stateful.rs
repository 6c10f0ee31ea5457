//! One batch of a stateful pipeline against the store: one `get_all`, one fold per
//! persistence id, one `upsert_all`; outputs in input order. The engine's store is
//! layered with the run's [`StateCache`](flows_core::cache::StateCache), so hot keys'
//! reads skip the database.
//!
//! This is the store half of a partition worker's cycle (read states → fold → write
//! states → publish outputs → commit offsets), kept free of Kafka so it can be tested
//! with any store.

// foldhash: keys come from input messages, hashed per message; a seeded fast hash.
use foldhash::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use tracing::Instrument;

use flows_core::function::stateful::Applied;
use flows_core::function::{
    ErrorAction, FoldError, Origin, StatefulProcessor, fold, fold_into, replace_outputs,
};
use flows_core::{
    EncodedRecord, PersistenceId, ProcessError, RawMessage, RawState, RepositoryError,
    SingleStateRepository,
};

use crate::pipeline::Outputs;

/// How many times a batch re-reads and re-folds the states whose write conflicted
/// before giving up (a conflict means another writer changed the state in between).
pub const MAX_CONFLICT_RETRIES: usize = 8;

/// A part limit after conflicts (see `BatchBuffers::part_limit`) that has doubled up to
/// this many messages no longer limits.
const MAX_PART_LIMIT: usize = 1 << 20;

/// Why a stateful batch failed. Nothing of a failed batch may be published or committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// A message failed and the error policy stops the pipeline.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// The persistence id of a message could not be computed and the policy stops.
    #[error("message {topic}/{partition}@{offset}: {source}")]
    PersistenceId {
        /// Topic of the message.
        topic: String,
        /// Partition of the message.
        partition: i32,
        /// Offset of the message.
        offset: i64,
        /// Why.
        #[source]
        source: ProcessError,
    },
    /// The store failed (transient failures are worth retrying the whole batch).
    #[error(transparent)]
    Store(#[from] RepositoryError),
    /// Writes kept conflicting with another writer.
    #[error("state writes still conflict after {MAX_CONFLICT_RETRIES} retries: {ids:?}")]
    PersistentConflict {
        /// The ids that conflicted last.
        ids: Vec<PersistenceId>,
    },
    /// A write conflicted and this instance no longer owns the partition: the new owner
    /// wrote these states, so this batch must be neither published nor committed.
    #[error("state write fenced: the partition now belongs to another instance")]
    Fenced,
}

/// What a stateful batch did: the first `processed` messages are applied (their states
/// are written), and `outputs` are their outputs, in input order.
///
/// A batch is processed in parts when a state would otherwise grow past the store's
/// limit (a hot key folding thousands of messages keeps all their outputs for replay):
/// publish `outputs`, then call again with the messages after `processed`. The parts
/// must not be written before the outputs of the earlier ones are acknowledged.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// How many messages, from the first, were processed.
    pub processed: usize,
    /// Their outputs, in input order.
    pub outputs: Vec<EncodedRecord>,
}

/// Applies `messages` (in offset order per partition) to their states in `store` and
/// returns the outputs to publish, in input order.
///
/// States are written before this returns; the caller publishes the outputs and only
/// then commits the offsets. Replayed messages re-emit their stored outputs and are not
/// applied again, so calling this again with the same messages after a crash is safe.
/// Only a prefix of `messages` may have been processed ([`BatchOutput`]).
pub async fn apply_batch<P, R>(
    processor: &P,
    store: &R,
    messages: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
) -> Result<BatchOutput, BatchError>
where
    P: StatefulProcessor + ?Sized,
    R: SingleStateRepository + ?Sized,
{
    let mut outputs = Outputs::default();
    let mut buffers = BatchBuffers::default();
    let processed = apply_batch_with(
        processor,
        store,
        messages,
        on_error,
        &|| true,
        &mut buffers,
        &mut outputs,
    )
    .await?;
    Ok(BatchOutput {
        processed,
        outputs: outputs.records,
    })
}

/// Buffers of a stateful batch kept for the next one. Each is about as large as a
/// batch (hundreds of KiB at the default 10,000 messages): allocated afresh for every
/// batch, they cost the allocator fresh pages, which the kernel zeroes (a tenth of a
/// word count's CPU time when measured).
#[derive(Default)]
pub(crate) struct BatchBuffers {
    groups: Groups,
    /// The batch's outputs, in the order they were made: the dead letters of messages
    /// without an id first, then state after state as folded.
    records: Vec<EncodedRecord>,
    /// Each message's outputs in `records`, by message index.
    spans: Vec<Range<usize>>,
    /// Working buffer of [`append_in_input_order`].
    destinations: Vec<usize>,
    /// The states to write (`write_all` hands the vector back emptied).
    writes: Vec<RawState>,
    /// Where the last batch's time went.
    pub(crate) reads: StateReads,
    /// After write conflicts: how many messages to process at most, the size that last
    /// got through; doubled after every batch written without a conflict until it no
    /// longer limits. Batches keep small while another writer contends for their
    /// states, instead of growing back and conflicting again.
    part_limit: Option<usize>,
}

/// Where a batch's time went, over all its attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StateReads {
    /// Writes that conflicted with another writer's.
    pub(crate) conflicts: u64,
    /// Time in the function and the engine's grouping, folding and encoding.
    pub(crate) fold_time: Duration,
    /// Time reading states (cache and store).
    pub(crate) read_time: Duration,
    /// Time writing states, conflicting attempts included.
    pub(crate) write_time: Duration,
}

/// [`apply_batch`] for the engine: after a write conflict the batch is retried only if
/// `still_owner()` holds, otherwise it fails with [`BatchError::Fenced`] (the version
/// check rejected this stale instance's write); `buffers` are an earlier batch's, and
/// the outputs are appended to `outputs`. Returns how many messages, from the first, it
/// processed (see [`BatchOutput`]).
pub(crate) async fn apply_batch_with<P, R>(
    processor: &P,
    store: &R,
    messages: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
    still_owner: &(dyn Fn() -> bool + Send + Sync),
    buffers: &mut BatchBuffers,
    outputs: &mut Outputs,
) -> Result<usize, BatchError>
where
    P: StatefulProcessor + ?Sized,
    R: SingleStateRepository + ?Sized,
{
    let BatchBuffers {
        groups,
        records,
        spans,
        destinations,
        writes,
        reads,
        part_limit,
    } = buffers;
    *reads = StateReads::default();
    let max_state_size = store.capabilities().max_state_size;
    // Shortened when a state would outgrow the store (see `Oversized`) or after a
    // write conflict.
    let mut messages = match *part_limit {
        Some(limit) if limit < messages.len() => &messages[..limit.max(1)],
        _ => messages,
    };
    let mut refuse_first: Option<TooLarge> = None;
    let mut probe = false;
    let mut conflicts = 0;
    let mut group: Vec<&RawMessage> = Vec::new();
    let mut regroup = true;
    // How many of `records` are dead letters of messages without an id (made when
    // grouping, kept when the states are folded again).
    let mut unfolded = 0;
    loop {
        if regroup {
            let grouping = Instant::now();
            records.clear();
            spans.clear();
            spans.resize(messages.len(), 0..0);
            let grouped = groups.fill(processor, messages, on_error, records, spans)?;
            unfolded = records.len();
            reads.fold_time += grouping.elapsed();
            if !grouped {
                append_in_input_order(records, spans, destinations, outputs);
                return Ok(messages.len());
            }
            regroup = false;
        }
        let reading = Instant::now();
        // `get_all` answers in request order, one state per id. A state read again
        // after a conflict or a cut is not in the cache any more (a read takes it out).
        let states = store
            .get_all(&groups.ids)
            .instrument(tracing::info_span!(
                "flows.store.read",
                states = groups.ids.len() as i64
            ))
            .await?;
        if states.len() != groups.ids.len() {
            return Err(RepositoryError::Backend(
                format!(
                    "get_all returned {} states for {} ids",
                    states.len(),
                    groups.ids.len()
                )
                .into(),
            )
            .into());
        }
        reads.read_time += reading.elapsed();
        let folding = Instant::now();
        writes.clear();
        records.truncate(unfolded);
        let mut oversized = Oversized::None;
        for (state, members) in states.into_iter().zip(groups.members()) {
            group.clear();
            group.extend(members.iter().map(|&i| &messages[i]));
            // While probing, a copy of the state as read: the fold consumes it.
            let original = probe.then(|| state.clone());
            let taken = std::mem::take(records);
            let mut outcome = match &refuse_first {
                Some(too_large) => {
                    let refuse = Refuse {
                        inner: processor,
                        too_large,
                    };
                    fold_into(&refuse, state, &group, |m, e| on_error(m, e), taken)?
                }
                None => fold_into(processor, state, &group, |m, e| on_error(m, e), taken)?,
            };
            *records = std::mem::take(&mut outcome.records);
            for (message, &index) in outcome.messages.iter().zip(members) {
                spans[index] = message.outputs.clone();
            }
            if let Some(write) = &mut outcome.write
                && write.stored_size() > max_state_size
            {
                if refuse_first.is_some() {
                    // Even the dead letter does not fit beside the state: keep the
                    // progress (the message must not be applied later), publish the
                    // dead letter once without storing it for replay.
                    tracing::warn!(id = %write.id, size = write.stored_size(), max = max_state_size, "a dead letter too large to keep for replay is published once");
                    for message in &outcome.messages {
                        write
                            .results
                            .replace_partition(message.topic_partition.clone(), []);
                    }
                } else {
                    match original {
                        None => oversized = Oversized::Probe,
                        Some(original) => {
                            let cut = fitting_prefix(
                                processor,
                                original,
                                &group,
                                max_state_size,
                                on_error,
                            )?;
                            oversized = oversized.min_with(match cut {
                                Fit::Prefix(fitting) => Oversized::Cut(members[fitting]),
                                Fit::None { .. } if members[0] > 0 => Oversized::Cut(members[0]),
                                Fit::None { size } => Oversized::Refuse(TooLarge {
                                    id: write.id.clone(),
                                    size,
                                    max: max_state_size,
                                }),
                            });
                        }
                    }
                }
            }
            writes.extend(outcome.write);
        }
        reads.fold_time += folding.elapsed();
        match oversized {
            Oversized::None => {}
            Oversized::Probe => {
                // Fold again from the states as stored, keeping copies to find how much
                // of the batch fits.
                probe = true;
                continue;
            }
            Oversized::Cut(end) => {
                tracing::info!(
                    messages = messages.len(),
                    first = end,
                    "a state would outgrow the store: writing the batch in parts"
                );
                messages = &messages[..end];
                regroup = true;
                continue;
            }
            Oversized::Refuse(too_large) => {
                tracing::warn!(error = %too_large.error(), "the first message of the batch makes its state too large: it fails alone, through the error policy");
                messages = &messages[..1];
                refuse_first = Some(too_large);
                regroup = true;
                continue;
            }
        }
        let writing = Instant::now();
        let writes_len = writes.len();
        let result = store
            .write_all(std::mem::take(writes))
            .instrument(tracing::info_span!(
                "flows.store.write",
                states = writes_len as i64
            ))
            .await;
        reads.write_time += writing.elapsed();
        match result {
            Ok(emptied) => {
                *writes = emptied;
                append_in_input_order(records, spans, destinations, outputs);
                *part_limit = if reads.conflicts > 0 {
                    Some(messages.len())
                } else {
                    part_limit
                        .map(|l| l.saturating_mul(2))
                        .filter(|&l| l < MAX_PART_LIMIT)
                };
                return Ok(messages.len());
            }
            Err(RepositoryError::Conflict { ids }) => {
                if !still_owner() {
                    return Err(BatchError::Fenced);
                }
                reads.conflicts += 1;
                // Another partition writes some of these states too (ids computed from
                // values, or several topics into one state). Retrying the whole batch
                // would re-read and re-fold all of it, and a writer slower than its
                // rival could conflict forever: halve it instead, down to one message,
                // so the window between read and write shrinks to the rival's, and the
                // rest follows in the next part. Only one message conflicting again
                // and again counts against the limit.
                if messages.len() > 1 {
                    tracing::debug!(
                        conflicts = ids.len(),
                        messages = messages.len(),
                        "state write conflicted; retrying the first half of the batch"
                    );
                    messages = &messages[..messages.len() / 2];
                    regroup = true;
                } else {
                    conflicts += 1;
                    if conflicts > MAX_CONFLICT_RETRIES {
                        return Err(BatchError::PersistentConflict { ids });
                    }
                }
                // Out of step with the rival, which may be retrying too.
                tokio::time::sleep(conflict_pause(reads.conflicts)).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
}

/// A short pause before retrying after the `n`th conflict: up to a millisecond per
/// conflict (at most 20 ms), spread by the clock's nanoseconds, so two writers of one
/// state do not retry in lockstep.
fn conflict_pause(n: u64) -> std::time::Duration {
    let spread = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let max_micros = n.min(20) * 1_000;
    std::time::Duration::from_micros(spread % max_micros.max(1))
}

/// What to do about states that a fold made larger than the store accepts.
enum Oversized {
    /// Nothing: every state fits.
    None,
    /// Fold again, keeping copies of the states read, to find what fits.
    Probe,
    /// Process only the messages before this index now (the rest in the next part).
    Cut(usize),
    /// The first message alone makes its state too large: it fails (through the error
    /// policy), alone in its part.
    Refuse(TooLarge),
}

/// A message that makes its state too large.
struct TooLarge {
    id: PersistenceId,
    /// The state's size with the message applied.
    size: usize,
    max: usize,
}

impl TooLarge {
    fn error(&self) -> ProcessError {
        ProcessError::StateTooLarge {
            id: self.id.clone(),
            size: self.size,
            max: self.max,
        }
    }
}

impl Oversized {
    /// The stricter of two findings: the earliest cut.
    fn min_with(self, other: Oversized) -> Oversized {
        match (self, other) {
            (Oversized::Refuse(e), _) | (_, Oversized::Refuse(e)) => Oversized::Refuse(e),
            (Oversized::Cut(a), Oversized::Cut(b)) => Oversized::Cut(a.min(b)),
            (Oversized::Cut(a), _) | (_, Oversized::Cut(a)) => Oversized::Cut(a),
            (a, _) => a,
        }
    }
}

/// How much of a state's group fits the store.
enum Fit {
    /// The first this many messages (at least one).
    Prefix(usize),
    /// Not even the first: with it the state would be `size` bytes.
    None { size: usize },
}

/// The longest prefix of `group` whose fold of `state` fits in `max` bytes, knowing the
/// whole group does not. Folds O(log n) prefixes of copies of `state`.
fn fitting_prefix<P: StatefulProcessor + ?Sized>(
    processor: &P,
    state: RawState,
    group: &[&RawMessage],
    max: usize,
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
) -> Result<Fit, BatchError> {
    // Invariant: a fold of `fits` messages fits, one of `exceeds` does not.
    let (mut fits, mut exceeds, mut exceeding_size) = (0, group.len(), usize::MAX);
    while exceeds - fits > 1 {
        let middle = fits + (exceeds - fits) / 2;
        let outcome = fold(processor, state.clone(), &group[..middle], |m, e| {
            on_error(m, e)
        })?;
        match outcome.write.map(|w| w.stored_size()) {
            Some(size) if size > max => (exceeds, exceeding_size) = (middle, size),
            _ => fits = middle,
        }
    }
    if fits > 0 {
        return Ok(Fit::Prefix(fits));
    }
    if exceeding_size == usize::MAX {
        // The group is one message: measure it alone.
        let outcome = fold(processor, state, group, |m, e| on_error(m, e))?;
        exceeding_size = outcome.write.map_or(0, |w| w.stored_size());
    }
    Ok(Fit::None {
        size: exceeding_size,
    })
}

/// A processor that refuses every message it is asked to apply, as making its state
/// too large, applying none: what the error policy sees for such a message.
struct Refuse<'a, P: ?Sized> {
    inner: &'a P,
    too_large: &'a TooLarge,
}

impl<P: StatefulProcessor + ?Sized> StatefulProcessor for Refuse<'_, P> {
    fn input_topics(&self) -> Vec<std::sync::Arc<str>> {
        self.inner.input_topics()
    }

    fn persistence_id(&self, message: &RawMessage) -> Result<PersistenceId, ProcessError> {
        self.inner.persistence_id(message)
    }

    fn id_is_key<'m>(&self, message: &'m RawMessage) -> Option<&'m [u8]> {
        self.inner.id_is_key(message)
    }

    fn origin(&self, message: &RawMessage) -> Result<Option<Origin>, ProcessError> {
        self.inner.origin(message)
    }

    fn apply(
        &self,
        _id: &PersistenceId,
        _content: Option<&[u8]>,
        messages: &[&RawMessage],
        _outputs: &mut Vec<EncodedRecord>,
    ) -> Result<Applied, ProcessError> {
        Ok(Applied {
            content: None,
            outcomes: messages
                .iter()
                .map(|_| Err(self.too_large.error()))
                .collect(),
        })
    }
}

/// Moves `records` to `outputs` in input order: message after message, each message's
/// records being `records[spans[message]]`, which cover all of them once.
///
/// The records are permuted where they are (each swap puts one in its place), not
/// moved one by one into a vector per message: a word count's batch is nearly in input
/// order already (states are folded in order of first appearance), so most stay put.
fn append_in_input_order(
    records: &mut Vec<EncodedRecord>,
    spans: &[Range<usize>],
    destinations: &mut Vec<usize>,
    outputs: &mut Outputs,
) {
    destinations.clear();
    destinations.resize(records.len(), usize::MAX);
    outputs.inputs.reserve(records.len());
    let mut next = 0;
    for (index, span) in spans.iter().enumerate() {
        for destination in &mut destinations[span.clone()] {
            *destination = next;
            next += 1;
        }
        let input = u32::try_from(index).unwrap_or(u32::MAX);
        outputs
            .inputs
            .extend(std::iter::repeat_n(input, span.len()));
    }
    assert_eq!(
        next,
        records.len(),
        "every output belongs to one message of the batch"
    );
    for position in 0..records.len() {
        loop {
            let destination = destinations[position];
            if destination == position {
                break;
            }
            records.swap(position, destination);
            destinations.swap(position, destination);
        }
    }
    if outputs.records.is_empty() {
        // The usual case (one part per batch): hand the vector over instead of copying
        // a batch of records; `records` keeps the emptied one's room for the next batch.
        std::mem::swap(&mut outputs.records, records);
    } else {
        outputs.records.append(records);
    }
}

/// Replaces the outputs stored for replay of each message of `replacements` (all
/// applied by the last write of their state) with its new outputs, conditionally on
/// the versions read, re-reading after a conflict. Messages without a state are
/// skipped.
pub(crate) async fn replace_stored_outputs<P, R>(
    processor: &P,
    store: &R,
    replacements: &[(&RawMessage, Vec<EncodedRecord>)],
    still_owner: &(dyn Fn() -> bool + Send + Sync),
) -> Result<(), BatchError>
where
    P: StatefulProcessor + ?Sized,
    R: SingleStateRepository + ?Sized,
{
    let mut targets = Vec::new();
    for (message, outputs) in replacements {
        let (Ok(id), Ok(origin)) = (processor.persistence_id(message), processor.origin(message))
        else {
            continue;
        };
        let (tp, offset) = match origin {
            Some(origin) => (origin.topic_partition, origin.offset),
            None => (message.topic_partition(), message.offset),
        };
        targets.push((id, tp, offset, *message, outputs));
    }
    if targets.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<PersistenceId> = targets.iter().map(|t| t.0.clone()).collect();
    ids.sort();
    ids.dedup();
    let max_state_size = store.capabilities().max_state_size;
    for _ in 0..=MAX_CONFLICT_RETRIES {
        let mut states = store.get_all(&ids).await?;
        let mut changed = Vec::new();
        for mut state in states.drain(..) {
            let mut replaced = false;
            let id = state.id.clone();
            let corrupt = |source| FoldError::CorruptResults {
                id: id.clone(),
                source,
            };
            for (_, tp, offset, message, outputs) in targets.iter().filter(|t| t.0 == id) {
                replaced |=
                    replace_outputs(&mut state, tp, *offset, message, outputs).map_err(corrupt)?;
                if state.stored_size() > max_state_size {
                    // The dead letter does not fit beside the state: keep nothing for
                    // this input (it stays applied), publish its dead letter once.
                    tracing::warn!(%id, size = state.stored_size(), max = max_state_size, "a dead letter too large to keep for replay is published once");
                    replace_outputs(&mut state, tp, *offset, message, &[]).map_err(corrupt)?;
                }
            }
            if replaced {
                changed.push(state);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        match store.upsert_all(changed).await {
            Ok(_) => return Ok(()),
            Err(RepositoryError::Conflict { .. }) if still_owner() => continue,
            Err(RepositoryError::Conflict { .. }) => return Err(BatchError::Fenced),
            Err(other) => return Err(other.into()),
        }
    }
    Err(BatchError::PersistentConflict { ids })
}

/// A batch's messages grouped by persistence id: one group per distinct id, in order of
/// first appearance, each group's messages in batch (offset) order. Kept from batch to
/// batch with its working buffers ([`BatchBuffers`]).
#[derive(Default)]
struct Groups {
    /// The distinct ids.
    ids: Vec<PersistenceId>,
    /// Message indices, group after group.
    order: Vec<usize>,
    /// Where each group's indices end in `order`.
    ends: Vec<usize>,
    /// Working buffers of [`fill`](Self::fill), empty between batches.
    group_of: HashMap<PersistenceId, usize>,
    group_of_message: Vec<usize>,
    next_slot: Vec<usize>,
    by_group: Vec<(usize, PersistenceId)>,
}

impl Groups {
    /// Groups `messages`; a message whose id cannot be computed gets its dead-letter
    /// records appended to `records` (at `spans[message]`) or fails the batch, by
    /// policy. `false` when no message has an id. One map entry per distinct id and
    /// flat vectors: no allocation per group.
    fn fill<P: StatefulProcessor + ?Sized>(
        &mut self,
        processor: &P,
        messages: &[RawMessage],
        on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
        records: &mut Vec<EncodedRecord>,
        spans: &mut [Range<usize>],
    ) -> Result<bool, BatchError> {
        const NO_ID: usize = usize::MAX;
        let Self {
            ids,
            order,
            ends,
            group_of,
            group_of_message,
            next_slot,
            by_group,
        } = self;
        ids.clear();
        group_of.clear();
        group_of_message.clear();
        for (index, message) in messages.iter().enumerate() {
            // When the id is the key, a repeated key is found without building its id.
            let key = processor
                .id_is_key(message)
                .and_then(|key| std::str::from_utf8(key).ok());
            if let Some(&group) = key.and_then(|key| group_of.get(key)) {
                group_of_message.push(group);
                continue;
            }
            // A new key is already known to be UTF-8: no second validation. An invalid
            // id (empty, too long) goes the general way, for its error.
            let id = match key.map(PersistenceId::new) {
                Some(Ok(id)) => Ok(id),
                _ => processor.persistence_id(message),
            };
            match id {
                Ok(id) => {
                    let next = group_of.len();
                    group_of_message.push(*group_of.entry(id).or_insert(next));
                }
                Err(source) => {
                    group_of_message.push(NO_ID);
                    match on_error(message, &source) {
                        ErrorAction::DeadLetter(dead) => {
                            let start = records.len();
                            records.extend(dead);
                            spans[index] = start..records.len();
                        }
                        ErrorAction::Abort => {
                            return Err(BatchError::PersistenceId {
                                topic: message.topic.to_string(),
                                partition: message.partition,
                                offset: message.offset,
                                source,
                            });
                        }
                    }
                }
            }
        }
        if group_of.is_empty() {
            return Ok(false);
        }
        // A counting sort of message indices by group keeps offset order within groups.
        ends.clear();
        ends.resize(group_of.len(), 0);
        for &group in group_of_message.iter().filter(|&&g| g != NO_ID) {
            ends[group] += 1;
        }
        next_slot.clear();
        let mut total = 0;
        for count in ends.iter_mut() {
            next_slot.push(total);
            total += *count;
            *count = total;
        }
        order.clear();
        order.resize(total, 0);
        for (index, &group) in group_of_message.iter().enumerate() {
            if group != NO_ID {
                order[next_slot[group]] = index;
                next_slot[group] += 1;
            }
        }
        by_group.clear();
        by_group.extend(group_of.drain().map(|(id, group)| (group, id)));
        by_group.sort_unstable_by_key(|(group, _)| *group);
        ids.extend(by_group.drain(..).map(|(_, id)| id));
        Ok(true)
    }

    /// Each group's message indices, in the order of `ids`.
    fn members(&self) -> impl Iterator<Item = &[usize]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.order[start..end])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use flows_core::function::{PersistenceIdFn, StatefulFunction};
    use flows_core::{Capabilities, Json, MemoryStateRepository, Record, Topic, Utf8};

    use std::sync::Mutex;

    use flows_core::cache::{StateCache, StateCacheLimits};

    use super::*;

    fn counter() -> StatefulFunction<i64> {
        StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::key(),
            |count, word| {
                let count = count.copied().unwrap_or(0) + 1;
                Ok((count, Record::new(word.key, count)))
            },
        )
    }

    fn words(first_offset: i64, words: &[&str]) -> Vec<RawMessage> {
        words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let bytes = Some(w.as_bytes());
                RawMessage::raw("words", 0, first_offset + i as i64, bytes, bytes)
            })
            .collect()
    }

    fn counts(outputs: &[EncodedRecord]) -> Vec<i64> {
        outputs
            .iter()
            .map(|r| serde_json::from_slice(r.value.as_deref().unwrap_or_default()).unwrap_or(-1))
            .collect()
    }

    /// The in-memory store, recording the ids it is asked to read and failing the next
    /// write on demand.
    #[derive(Default)]
    struct Spy {
        inner: MemoryStateRepository,
        reads: Mutex<Vec<String>>,
        fail_next_write: AtomicBool,
    }

    impl Spy {
        fn reads(&self) -> Vec<String> {
            std::mem::take(&mut *lock_reads(&self.reads))
        }
    }

    fn lock_reads(reads: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
        reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[async_trait]
    impl SingleStateRepository for Spy {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
            lock_reads(&self.reads).extend(ids.iter().map(|id| id.as_str().to_owned()));
            self.inner.get_all(ids).await
        }
        async fn upsert_all(
            &self,
            states: Vec<RawState>,
        ) -> Result<Vec<RawState>, RepositoryError> {
            if self.fail_next_write.swap(false, Ordering::SeqCst) {
                return Err(RepositoryError::Unavailable("injected".into()));
            }
            self.inner.upsert_all(states).await
        }
    }

    /// One batch with fresh buffers, aborting on any failed message.
    async fn run(
        f: &StatefulFunction<i64>,
        store: &Spy,
        cache: &StateCache,
        batch: &[RawMessage],
    ) -> Result<Vec<EncodedRecord>, BatchError> {
        let abort = |_: &RawMessage, _: &ProcessError| ErrorAction::Abort;
        let buffers = &mut BatchBuffers::default();
        let (outputs, _) = run_with(f, store, cache, buffers, batch, &abort).await?;
        Ok(outputs)
    }

    /// One batch with the given buffers and error policy, through `cache`; also
    /// returns how many states came (from the cache, from the store).
    async fn run_with(
        f: &StatefulFunction<i64>,
        store: &Spy,
        cache: &StateCache,
        buffers: &mut BatchBuffers,
        batch: &[RawMessage],
        on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
    ) -> Result<(Vec<EncodedRecord>, (u64, u64)), BatchError> {
        let store = cache.layer(store);
        // In parts, as the worker does when a batch is split.
        let mut rest = batch;
        let mut records = Vec::new();
        while !rest.is_empty() {
            let mut outputs = Outputs::default();
            let processed =
                apply_batch_with(f, &store, rest, on_error, &|| true, buffers, &mut outputs)
                    .await?;
            assert_eq!(outputs.inputs.len(), outputs.records.len());
            records.extend(outputs.records);
            rest = &rest[processed.clamp(1, rest.len())..];
        }
        Ok((records, (store.hits(), store.misses())))
    }

    /// Another instance, without a cache, counts `times` more "a" (from partition 1) in
    /// `store`, behind the back of any cache of this one.
    async fn count_a_elsewhere(f: &StatefulFunction<i64>, store: &Spy, times: i64) {
        let other = StateCache::new(StateCacheLimits::disabled());
        let elsewhere: Vec<RawMessage> = (0..times)
            .map(|i| RawMessage::raw("words", 1, i, Some(&b"a"[..]), Some(&b"a"[..])))
            .collect();
        run(f, store, &other, &elsewhere)
            .await
            .expect("other instance");
    }

    /// A dead-letter policy whose record carries the value -1.
    fn dead_letter(m: &RawMessage, _: &ProcessError) -> ErrorAction {
        ErrorAction::DeadLetter(vec![EncodedRecord {
            topic: "dlq".into(),
            partition: None,
            key: m.key.clone(),
            value: Some(b"-1".to_vec()),
            headers: Default::default(),
            timestamp: None,
        }])
    }

    #[tokio::test]
    async fn states_written_by_a_batch_are_not_read_again_by_the_next() {
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        let first = run(&f, &store, &cache, &words(0, &["a", "b", "a"])).await;
        assert_eq!(counts(&first.expect("first")), [1, 1, 2]);
        assert_eq!(store.reads(), ["a", "b"]);
        let second = run(&f, &store, &cache, &words(3, &["b", "c", "a"])).await;
        assert_eq!(counts(&second.expect("second")), [2, 1, 3]);
        assert_eq!(store.reads(), ["c"], "a and b came from the cache");
        // The last batch again (not committed before a crash, say), served from the
        // cache: its stored outputs, nothing counted twice.
        let replay = run(&f, &store, &cache, &words(3, &["b", "c", "a"])).await;
        assert_eq!(counts(&replay.expect("replay")), [2, 1, 3]);
        assert!(store.reads().is_empty());
        let a = store.inner.get(&PersistenceId::new("a").expect("id")).await;
        assert_eq!(a.expect("a").content.as_deref(), Some(&b"3"[..]));
    }

    #[tokio::test]
    async fn buffers_kept_from_earlier_batches_leave_nothing_behind() {
        // One set of buffers through batches of every shape: with ids, without any id
        // (all dead-lettered), mixed. Each batch's outputs are its own, in input order.
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        let mut buffers = BatchBuffers::default();
        let keyless = |offset| RawMessage::raw("words", 0, offset, None, Some(&b"?"[..]));
        let batches = [
            words(0, &["a", "b", "a"]),
            vec![keyless(3), keyless(4)],
            [words(5, &["b"]), vec![keyless(6)], words(7, &["c", "a"])].concat(),
            words(9, &["a"]),
        ];
        let (mut counted, mut sources) = (Vec::new(), Vec::new());
        for batch in &batches {
            let (outputs, source) = run_with(&f, &store, &cache, &mut buffers, batch, &dead_letter)
                .await
                .expect("batch");
            counted.push(counts(&outputs));
            sources.push(source);
        }
        assert_eq!(
            counted,
            [vec![1, 1, 2], vec![-1, -1], vec![2, -1, 1, 3], vec![4]]
        );
        // (from the cache, from the store) per batch: only c is new in the third.
        assert_eq!(sources, [(0, 2), (0, 0), (2, 1), (1, 0)]);
    }

    #[tokio::test]
    async fn a_state_changed_behind_the_cache_conflicts_and_is_read_again() {
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        run(&f, &store, &cache, &words(0, &["a"]))
            .await
            .expect("first");
        // Another instance (after a rebalance, say) counts three more "a" in between.
        count_a_elsewhere(&f, &store, 3).await;
        store.reads();
        let out = run(&f, &store, &cache, &words(1, &["a"]))
            .await
            .expect("second");
        assert_eq!(
            counts(&out),
            [5],
            "the stale cached count (1) must not be used"
        );
        assert_eq!(store.reads(), ["a"], "the conflict re-read the store");
    }

    /// Records made in fold order (states one after the other, replays and dead letters
    /// after a state's applied messages) come out in input order, each with its input.
    #[test]
    fn outputs_are_put_in_input_order_whatever_order_they_were_made_in() {
        use crate::worker::tests::record;
        // Made as: m3 (two records), m0, m4, (m1 has none), m2 (three records).
        let made = ["3a", "3b", "0", "4", "2a", "2b", "2c"];
        let spans = [2..3, 3..3, 4..7, 0..2, 3..4];
        // Orders a fresh copy of `made` after what `outputs` holds: the values, inputs.
        let order = |mut outputs: Outputs| {
            let mut records: Vec<EncodedRecord> = made.into_iter().map(record).collect();
            append_in_input_order(&mut records, &spans, &mut Vec::new(), &mut outputs);
            assert!(records.is_empty(), "all moved");
            let values: Vec<String> = outputs
                .records
                .iter()
                .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into())
                .collect();
            (values, outputs.inputs)
        };
        let mut earlier = Outputs::default();
        earlier.extend(9, [record("earlier")]);
        let expected = ["earlier", "0", "2a", "2b", "2c", "3a", "3b", "4"];
        assert_eq!(
            order(earlier),
            (
                expected.map(String::from).to_vec(),
                vec![9, 0, 2, 2, 2, 3, 3, 4]
            )
        );
        // Into empty outputs (the usual case, where the vector is handed over).
        assert_eq!(
            order(Outputs::default()),
            (
                expected[1..].iter().map(|v| v.to_string()).collect(),
                vec![0, 2, 2, 2, 3, 3, 4]
            )
        );
    }

    #[tokio::test]
    async fn a_conflict_retry_keeps_dead_letters_and_folds_again() {
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        run(&f, &store, &cache, &words(0, &["a"]))
            .await
            .expect("first");
        // Another instance counts "a" once more behind this one's cache.
        count_a_elsewhere(&f, &store, 1).await;
        // A keyless message (dead-lettered before any fold), then "a" (whose cached
        // state is stale: the first attempt conflicts), then "b".
        let batch = [
            vec![RawMessage::raw("words", 0, 1, None, Some(&b"?"[..]))],
            words(2, &["a", "b"]),
        ]
        .concat();
        let mut buffers = BatchBuffers::default();
        let (outputs, _) = run_with(&f, &store, &cache, &mut buffers, &batch, &dead_letter)
            .await
            .expect("batch");
        assert_eq!(
            counts(&outputs),
            [-1, 3, 1],
            "one set of outputs, input order"
        );
    }

    /// A conflict halves the batch; the size that got through limits the next batches,
    /// doubling back after every batch written without a conflict.
    #[tokio::test]
    async fn a_conflict_halves_the_batch_and_the_parts_grow_back() {
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        let mut buffers = BatchBuffers::default();
        run_with(
            &f,
            &store,
            &cache,
            &mut buffers,
            &words(0, &["a"]),
            &dead_letter,
        )
        .await
        .expect("first");
        count_a_elsewhere(&f, &store, 1).await;
        let batch = words(1, &["a", "b", "c", "d", "e", "f", "g", "h"]);
        let mut outputs = Outputs::default();
        let cached = cache.layer(&store);
        let processed = apply_batch_with(
            &f,
            &cached,
            &batch,
            &dead_letter,
            &|| true,
            &mut buffers,
            &mut outputs,
        )
        .await
        .expect("first part");
        assert_eq!(processed, 4, "the conflicting batch was halved");
        assert_eq!(buffers.reads.conflicts, 1);
        assert_eq!(counts(&outputs.records), [3, 1, 1, 1]);
        let mut parts = Vec::new();
        let mut rest = &batch[processed..];
        let more = words(
            9,
            &["i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"],
        );
        for part in [rest, &more[..]] {
            rest = part;
            while !rest.is_empty() {
                let mut outputs = Outputs::default();
                let processed = apply_batch_with(
                    &f,
                    &cached,
                    rest,
                    &dead_letter,
                    &|| true,
                    &mut buffers,
                    &mut outputs,
                )
                .await
                .expect("part");
                parts.push(processed);
                rest = &rest[processed..];
            }
        }
        assert_eq!(parts, [4, 8, 4], "4 fit, then 8 (doubled), then the rest");
    }

    #[tokio::test]
    async fn after_a_failed_write_the_batch_reads_the_store_again() {
        let (f, store) = (counter(), Spy::default());
        let cache = StateCache::new(StateCacheLimits::default());
        run(&f, &store, &cache, &words(0, &["a"]))
            .await
            .expect("first");
        store.reads();
        store.fail_next_write.store(true, Ordering::SeqCst);
        let failed = run(&f, &store, &cache, &words(1, &["a"])).await;
        assert!(matches!(failed, Err(BatchError::Store(_))), "{failed:?}");
        assert!(store.reads().is_empty(), "the first attempt used the cache");
        // The retry of the batch (the worker's backoff loop) cannot use a cached copy:
        // the write may or may not have happened.
        let retried = run(&f, &store, &cache, &words(1, &["a"])).await;
        assert_eq!(counts(&retried.expect("retry")), [2]);
        assert_eq!(store.reads(), ["a"]);
    }
}
