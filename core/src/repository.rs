//! The state store contract: [`SingleStateRepository`], [`Capabilities`] and the
//! helpers every backend uses so that all backends behave identically.
//!
//! # Contract
//! - `get_all` returns one state per requested id, in request order; duplicates are fine
//!   and ids absent from the store come back as [fresh](crate::State::fresh) states (version 0).
//! - Every write carries the version it read. A write whose version no longer matches
//!   the store fails with [`RepositoryError::Conflict`] naming the ids, and changes
//!   nothing (for `upsert_all`, nothing at all where [`Capabilities::atomic_batch_write`]
//!   is declared; otherwise the conflicting states are untouched and the backend
//!   documents what happens to the others). This is what fences a stale instance.
//! - A successful write returns the states as stored: version incremented by one,
//!   timestamps set.
//! - Any number of ids may be passed; backends chunk to their native batch limit.

use std::sync::Arc;

use async_trait::async_trait;

use crate::id::PersistenceId;
use crate::row::RowError;
use crate::state::{RawState, StateCodecError};

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

/// Stores per-key [`State`](crate::State)s with their offset progress and last results.
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

    /// [`upsert_all`](Self::upsert_all) for a caller that does not need the states
    /// back: returns the vector emptied, its capacity kept for the next batch. A layer
    /// that keeps written states ([`StateCache`](crate::cache::StateCache)) takes them
    /// without a copy.
    async fn write_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let mut written = self.upsert_all(states).await?;
        written.clear();
        Ok(written)
    }
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
    async fn write_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        (**self).write_all(states).await
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
    async fn write_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        (**self).write_all(states).await
    }
}
