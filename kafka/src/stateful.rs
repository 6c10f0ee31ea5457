//! One batch of a stateful pipeline against the store: one `get_all`, one fold per
//! persistence id, one `upsert_all`; outputs in input order.
//!
//! This is the store half of a partition worker's cycle (read states → fold → write
//! states → publish outputs → commit offsets), kept free of Kafka so it can be tested
//! with any store.

use std::collections::HashMap;

use flows_core::function::{ErrorAction, FoldError, StatefulProcessor, fold};
use flows_core::{
    EncodedRecord, PersistenceId, ProcessError, RawMessage, RepositoryError, SingleStateRepository,
};

/// How many times a batch re-reads and re-folds the states whose write conflicted
/// before giving up (a conflict means another writer changed the state in between).
pub const MAX_CONFLICT_RETRIES: usize = 8;

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

/// Applies `messages` (in offset order per partition) to their states in `store` and
/// returns every output to publish, in input order.
///
/// States are written before this returns; the caller publishes the outputs and only
/// then commits the offsets. Replayed messages re-emit their stored outputs and are not
/// applied again, so calling this again with the same messages after a crash is safe.
pub async fn apply_batch<P, R>(
    processor: &P,
    store: &R,
    messages: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
) -> Result<Vec<EncodedRecord>, BatchError>
where
    P: StatefulProcessor + ?Sized,
    R: SingleStateRepository + ?Sized,
{
    apply_batch_while_owner(processor, store, messages, on_error, &|| true).await
}

/// [`apply_batch`] for a partition that can be taken away: after a write conflict the
/// batch is retried only if `still_owner()` holds, otherwise it fails with
/// [`BatchError::Fenced`] (the version check rejected this stale instance's write).
pub async fn apply_batch_while_owner<P, R>(
    processor: &P,
    store: &R,
    messages: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
    still_owner: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Vec<EncodedRecord>, BatchError>
where
    P: StatefulProcessor + ?Sized,
    R: SingleStateRepository + ?Sized,
{
    let mut outputs: Vec<Vec<EncodedRecord>> = vec![Vec::new(); messages.len()];
    // Ids in first-seen order, and for each the indices of its messages in input order.
    let mut group_of: HashMap<PersistenceId, usize> = HashMap::new();
    let mut ids: Vec<PersistenceId> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        match processor.persistence_id(message) {
            Ok(id) => {
                let group = *group_of.entry(id).or_insert_with_key(|id| {
                    ids.push(id.clone());
                    members.push(Vec::new());
                    members.len() - 1
                });
                members[group].push(index);
            }
            Err(source) => match on_error(message, &source) {
                // No state to record this in: a replay dead-letters it again, identically.
                ErrorAction::DeadLetter(records) => outputs[index] = records,
                ErrorAction::Abort => {
                    return Err(BatchError::PersistenceId {
                        topic: message.topic.to_string(),
                        partition: message.partition,
                        offset: message.offset,
                        source,
                    });
                }
            },
        }
    }
    if ids.is_empty() {
        return Ok(outputs.into_iter().flatten().collect());
    }
    drop(group_of);

    // After a conflict every id of the batch is read and folded again, not only the
    // conflicting ones: an atomic store wrote none of the batch, and in a non-atomic one
    // the states that were written now replay their stored outputs instead of applying.
    let mut last_conflict = Vec::new();
    for _attempt in 0..=MAX_CONFLICT_RETRIES {
        // `get_all` answers in request order, one state per id.
        let states = store.get_all(&ids).await?;
        let mut writes = Vec::with_capacity(states.len());
        let mut folded: Vec<Vec<EncodedRecord>> = Vec::with_capacity(messages.len());
        for (state, indices) in states.into_iter().zip(&members) {
            let group: Vec<&RawMessage> = indices.iter().map(|&i| &messages[i]).collect();
            let outcome = fold(processor, state, &group, |m, e| on_error(m, e))?;
            folded.extend(outcome.messages.into_iter().map(|m| m.outputs));
            writes.extend(outcome.write);
        }
        match store.upsert_all(&writes).await {
            Ok(_) => {
                let indices = members.iter().flatten();
                for (&index, records) in indices.zip(folded) {
                    outputs[index] = records;
                }
                return Ok(outputs.into_iter().flatten().collect());
            }
            Err(RepositoryError::Conflict { ids }) => {
                tracing::debug!(
                    conflicts = ids.len(),
                    "state write conflicted; re-reading the batch"
                );
                if !still_owner() {
                    return Err(BatchError::Fenced);
                }
                last_conflict = ids;
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(BatchError::PersistentConflict { ids: last_conflict })
}
