//! The state store contract: [`SingleStateRepository`], [`Capabilities`] and the
//! helpers every backend uses so that all backends behave identically.
//!
//! # Contract
//! - `get_all` returns one state per requested id, in request order; duplicates are fine
//!   and ids absent from the store come back as [fresh](State::fresh) states (version 0).
//! - Every write carries the version it read. A write whose version no longer matches
//!   the store fails with [`RepositoryError::Conflict`] naming the ids, and changes
//!   nothing (for `upsert_all`, nothing at all where [`Capabilities::atomic_batch_write`]
//!   is declared; otherwise the conflicting states are untouched and the backend
//!   documents what happens to the others). This is what fences a stale instance.
//! - A successful write returns the states as stored: version incremented by one,
//!   timestamps set.
//! - Any number of ids may be passed; backends chunk to their native batch limit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::id::PersistenceId;
use crate::row::RowError;
use crate::state::{RawState, State, StateCodecError};

/// A boxed error from a backend driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of state and upsert repositories.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// The version carried by a write no longer matches the store (another writer won).
    #[error("version conflict: {} state(s) changed since they were read: {ids:?}", ids.len())]
    Conflict {
        /// The ids whose version did not match.
        ids: Vec<PersistenceId>,
    },
    /// A state is larger than the backend accepts ([`Capabilities::max_state_size`]).
    #[error("state {id} is {size} bytes; this store accepts at most {max} bytes")]
    StateTooLarge {
        /// The state's id.
        id: PersistenceId,
        /// Content plus internal bytes.
        size: usize,
        /// The declared maximum.
        max: usize,
    },
    /// The same id appears twice in one `upsert_all` (its outcome would be ambiguous).
    #[error("persistence id {id} appears more than once in one batch write")]
    DuplicateId {
        /// The repeated id.
        id: PersistenceId,
    },
    /// A stored state could not be decoded.
    #[error("stored state {id:?} is corrupt: {source}")]
    Corrupt {
        /// The id as stored.
        id: String,
        /// What was wrong with it.
        #[source]
        source: StateCodecError,
    },
    /// A row could not be mapped to or from the table.
    #[error(transparent)]
    Row(#[from] RowError),
    /// The store cannot be reached right now (connection refused, pool timeout, failover).
    /// Retrying later is expected to succeed.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store refused the data of a write: a value it cannot hold, a constraint its
    /// table enforces. The same data is refused again; other data can be written.
    #[error("the store refused the data: {0}")]
    Rejected(#[source] BoxError),
    /// Any other error from the store.
    #[error("store error: {0}")]
    Backend(#[source] BoxError),
    /// The repository was configured wrongly (bad URL, bad name, missing table).
    #[error("invalid configuration: {0}")]
    Configuration(String),
}

impl From<crate::id::InvalidName> for RepositoryError {
    /// A bad table or collection name is a configuration mistake.
    fn from(error: crate::id::InvalidName) -> Self {
        RepositoryError::Configuration(error.to_string())
    }
}

impl RepositoryError {
    /// Whether retrying the same operation later may succeed without any change:
    /// true for [`Unavailable`](Self::Unavailable) only. A [`Conflict`](Self::Conflict)
    /// needs a fresh read first.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the store refused the data itself ([`Rejected`](Self::Rejected), or a
    /// [`Row`](Self::Row) that does not fit the table or the store): writing other data
    /// can succeed, writing the same data cannot.
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::Rejected(_) | Self::Row(_))
    }
}

/// What a backend can do, declared honestly: the conformance suite tests every claim.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// `upsert_all` either applies every state or none (one transaction).
    pub atomic_batch_write: bool,
    /// Writes are conditional on the version read (optimistic concurrency). A backend
    /// without it cannot fence stale instances, unless it declares
    /// [`versioned_last_write_wins`](Self::versioned_last_write_wins).
    pub conditional_write: bool,
    /// Without conditional writes, stale writes are fenced by ordering: a write never
    /// becomes visible over a state of a higher version (e.g. Cassandra write
    /// timestamps derived from the version), and stale writes succeed silently instead
    /// of failing with [`RepositoryError::Conflict`]. The backend documents how it
    /// orders two writes of the same version.
    pub versioned_last_write_wins: bool,
    /// Largest state accepted, in bytes of content plus internal blob.
    pub max_state_size: usize,
    /// States sent per round trip; larger batches are split into chunks of this size.
    pub max_batch_size: usize,
}

impl Capabilities {
    /// Capabilities of a transactional store with conditional writes.
    pub fn new(max_state_size: usize, max_batch_size: usize) -> Self {
        Self {
            atomic_batch_write: true,
            conditional_write: true,
            versioned_last_write_wins: false,
            max_state_size,
            max_batch_size: max_batch_size.max(1),
        }
    }

    /// Sets [`Capabilities::atomic_batch_write`].
    pub fn with_atomic_batch_write(mut self, atomic: bool) -> Self {
        self.atomic_batch_write = atomic;
        self
    }

    /// Sets [`Capabilities::conditional_write`].
    pub fn with_conditional_write(mut self, conditional: bool) -> Self {
        self.conditional_write = conditional;
        self
    }

    /// Sets [`Capabilities::versioned_last_write_wins`].
    pub fn with_versioned_last_write_wins(mut self, ordered: bool) -> Self {
        self.versioned_last_write_wins = ordered;
        self
    }
}

/// Stores per-key [`State`]s with their offset progress and last results.
///
/// See the [module documentation](self) for the contract. Implementations are shared
/// between tasks (`&self`), so they hold a pool, not a connection.
#[async_trait]
pub trait SingleStateRepository: Send + Sync {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// Reads one state; an absent id gives a fresh state.
    async fn get(&self, id: &PersistenceId) -> Result<RawState, RepositoryError> {
        let mut states = self.get_all(std::slice::from_ref(id)).await?;
        states
            .pop()
            .ok_or_else(|| RepositoryError::Backend("get_all returned no state for one id".into()))
    }

    /// Reads many states in request order, in as few round trips as the store allows.
    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError>;

    /// Writes one state conditionally on its version; returns it as stored.
    async fn upsert(&self, state: &RawState) -> Result<RawState, RepositoryError> {
        let mut states = self.upsert_all(vec![state.clone()]).await?;
        states.pop().ok_or_else(|| {
            RepositoryError::Backend("upsert_all returned no state for one write".into())
        })
    }

    /// Writes many states, each conditionally on its version; returns them as stored.
    /// The states are handed over, so a store can return them as written without
    /// copying them.
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError>;
}

#[async_trait]
impl<R: SingleStateRepository + ?Sized> SingleStateRepository for Arc<R> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn get(&self, id: &PersistenceId) -> Result<RawState, RepositoryError> {
        (**self).get(id).await
    }
    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        (**self).get_all(ids).await
    }
    async fn upsert(&self, state: &RawState) -> Result<RawState, RepositoryError> {
        (**self).upsert(state).await
    }
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        (**self).upsert_all(states).await
    }
}

#[async_trait]
impl<R: SingleStateRepository + ?Sized> SingleStateRepository for Box<R> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn get(&self, id: &PersistenceId) -> Result<RawState, RepositoryError> {
        (**self).get(id).await
    }
    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        (**self).get_all(ids).await
    }
    async fn upsert(&self, state: &RawState) -> Result<RawState, RepositoryError> {
        (**self).upsert(state).await
    }
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        (**self).upsert_all(states).await
    }
}

/// One state write, validated and ready for a backend to persist.
#[derive(Debug)]
pub struct PreparedWrite<'a> {
    /// The state as the caller passed it.
    pub state: &'a RawState,
    /// The encoded progress and last results.
    pub internal: Vec<u8>,
    /// The version the store must still hold for the write to apply (0: must not exist).
    pub expected_version: u64,
    /// The version the state gets.
    pub new_version: u64,
    /// Creation time to store (kept from the read state, or now).
    pub created_at: DateTime<Utc>,
    /// Update time to store (now).
    pub updated_at: DateTime<Utc>,
}

impl PreparedWrite<'_> {
    /// The state's id.
    pub fn id(&self) -> &PersistenceId {
        &self.state.id
    }

    /// The content bytes to store.
    pub fn content(&self) -> Option<&[u8]> {
        self.state.content.as_deref()
    }

    /// `expected_version` as the signed integer SQL stores use.
    pub fn expected_version_i64(&self) -> i64 {
        i64::try_from(self.expected_version).unwrap_or(i64::MAX)
    }

    /// `new_version` as the signed integer SQL stores use.
    pub fn new_version_i64(&self) -> i64 {
        i64::try_from(self.new_version).unwrap_or(i64::MAX)
    }

    /// The state as it is once this write succeeded.
    pub fn written(&self) -> RawState {
        let mut written = self.state.clone();
        mark_written(&mut written, self.updated_at);
        written
    }
}

/// When a batch of [`prepare_writes`] was written (they share one time). Takes the
/// writes, ending their borrow of the states, so that [`into_written`] can have them.
pub fn write_time(writes: Vec<PreparedWrite<'_>>) -> DateTime<Utc> {
    writes
        .first()
        .map_or_else(crate::state::now, |write| write.updated_at)
}

/// `states` (given to `upsert_all`) as the store holds them once every one was written
/// at `now` ([`write_time`]): moved, not copied. [`PreparedWrite::written`] copies one
/// state instead.
pub fn into_written(mut states: Vec<RawState>, now: DateTime<Utc>) -> Vec<RawState> {
    states.iter_mut().for_each(|state| mark_written(state, now));
    states
}

/// Turns `state` into what a store holds once it is written at `now`: the next
/// version, its creation time kept (or `now` for a new state), updated `now`.
pub fn mark_written(state: &mut RawState, now: DateTime<Utc>) {
    state.version += 1;
    state.created_at = Some(state.created_at.unwrap_or(now));
    state.updated_at = Some(now);
}

/// Checks a batch of writes: no duplicate ids, every state (content and internal blob)
/// within `capabilities.max_state_size`. Sizes are computed, not encoded.
pub fn check_writes(
    states: &[RawState],
    capabilities: &Capabilities,
) -> Result<(), RepositoryError> {
    let mut seen = HashSet::with_capacity(states.len());
    for state in states {
        if !seen.insert(&state.id) {
            return Err(RepositoryError::DuplicateId {
                id: state.id.clone(),
            });
        }
        let size = state.stored_size();
        if size > capabilities.max_state_size {
            return Err(RepositoryError::StateTooLarge {
                id: state.id.clone(),
                size,
                max: capabilities.max_state_size,
            });
        }
    }
    Ok(())
}

/// Validates a batch of writes ([`check_writes`]), encodes each state's internal blob
/// and computes versions and timestamps.
pub fn prepare_writes<'a>(
    states: &'a [RawState],
    capabilities: &Capabilities,
) -> Result<Vec<PreparedWrite<'a>>, RepositoryError> {
    check_writes(states, capabilities)?;
    let now = crate::state::now();
    Ok(states
        .iter()
        .map(|state| PreparedWrite {
            state,
            internal: state.encode_internal(),
            expected_version: state.version,
            new_version: state.version + 1,
            created_at: state.created_at.unwrap_or(now),
            updated_at: now,
        })
        .collect())
}

/// Arranges the states a backend found into request order: duplicates repeated, missing
/// ids as fresh states.
pub fn in_request_order(
    ids: &[PersistenceId],
    mut found: HashMap<PersistenceId, RawState>,
) -> Vec<RawState> {
    let mut remaining: HashMap<&PersistenceId, usize> = HashMap::new();
    for id in ids {
        *remaining.entry(id).or_default() += 1;
    }
    ids.iter()
        .map(|id| {
            let left = remaining.get_mut(id).map_or(0, |n| {
                *n -= 1;
                *n
            });
            // The last request for an id takes the state by value; earlier ones clone.
            let state = if left == 0 {
                found.remove(id)
            } else {
                found.get(id).cloned()
            };
            state.unwrap_or_else(|| State::fresh(id.clone()))
        })
        .collect()
}

/// The ids of `writes` that are not in `applied`, in write order: the conflicts.
pub fn conflicting_ids<'a>(
    writes: impl IntoIterator<Item = &'a PreparedWrite<'a>>,
    applied: &HashSet<PersistenceId>,
) -> Vec<PersistenceId> {
    writes
        .into_iter()
        .filter(|w| !applied.contains(w.id()))
        .map(|w| w.id().clone())
        .collect()
}

/// Decodes an id read back from a store (stored as UTF-8 bytes); anything else is
/// reported as a corrupt state rather than panicking or skipping the row.
pub fn decode_stored_id(bytes: Vec<u8>) -> Result<PersistenceId, RepositoryError> {
    let text = String::from_utf8(bytes).map_err(|e| RepositoryError::Corrupt {
        id: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        source: StateCodecError::Invalid("id is not UTF-8"),
    })?;
    PersistenceId::new(&text).map_err(|_| RepositoryError::Corrupt {
        id: text.clone(),
        source: StateCodecError::Invalid("id is not a valid persistence id"),
    })
}

/// Rebuilds a state from what a backend stored ([`RawState::from_stored`]), reporting an
/// undecodable internal blob or a negative version as [`RepositoryError::Corrupt`] naming
/// the id.
pub fn decode_stored_state(
    id: PersistenceId,
    content: Option<Vec<u8>>,
    internal: impl Into<prost::bytes::Bytes>,
    version: i64,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
) -> Result<RawState, RepositoryError> {
    let stored_id = id.to_string();
    RawState::from_stored(id, content, internal, version, created_at, updated_at).map_err(
        |source| RepositoryError::Corrupt {
            id: stored_id,
            source,
        },
    )
}

/// The distinct ids of a request, in first-seen order.
pub fn distinct_ids(ids: &[PersistenceId]) -> Vec<&PersistenceId> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().filter(|id| seen.insert(*id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PersistenceId {
        PersistenceId::new(s).unwrap()
    }

    #[test]
    fn prepare_rejects_duplicates_and_oversized_states() {
        let caps = Capabilities::new(100, 10);
        let a = State::fresh(id("a")).with_content(vec![1]);
        let dup = vec![a.clone(), a.clone()];
        assert!(matches!(
            prepare_writes(&dup, &caps),
            Err(RepositoryError::DuplicateId { .. })
        ));
        let big = vec![State::fresh(id("b")).with_content(vec![0; 101])];
        assert!(matches!(
            prepare_writes(&big, &caps),
            Err(RepositoryError::StateTooLarge { size, max: 100, .. }) if size > 100
        ));
        let ok = [a];
        let prepared = prepare_writes(&ok, &caps).unwrap();
        assert_eq!(prepared[0].expected_version, 0);
        assert_eq!(prepared[0].new_version, 1);
        let written = prepared[0].written();
        assert_eq!(written.version, 1);
        assert_eq!(written.created_at, written.updated_at);
    }

    #[test]
    fn request_order_repeats_duplicates_and_fills_missing() {
        let mut stored = State::fresh(id("x")).with_content(vec![9]);
        stored.version = 3;
        let found = HashMap::from([(id("x"), stored)]);
        let states = in_request_order(&[id("x"), id("y"), id("x")], found);
        assert_eq!(states.len(), 3);
        assert_eq!(states[0].version, 3);
        assert_eq!(states[1].version, 0);
        assert_eq!(states[1].id, id("y"));
        assert_eq!(states[2].content, Some(vec![9]));
    }
}
