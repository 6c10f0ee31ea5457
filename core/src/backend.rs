//! What a backend implementation needs and users never do: validating and preparing
//! state writes ([`prepare_writes`], [`PreparedWrite`]), marking them written, putting
//! read states in request order, decoding what a store holds, and for row tables the
//! change batches and the isolation of refused rows. Every backend uses these, so that
//! all behave identically; a custom store imports them from here.
//!
//! The contract they serve is [`SingleStateRepository`]'s and [`UpsertRepository`]'s, checked by `flows-conformance`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::id::PersistenceId;
use crate::repository::{Capabilities, RepositoryError, SingleStateRepository};
use crate::row::{Row, UpsertRepository};
use crate::state::{RawState, State, StateCodecError};

pub use crate::row::{
    ChangeBatch, ChangeBatchBuilder, RowChangeRef, ValidChange, rows_in_request_order,
    write_isolating,
};
pub use crate::state::{decode_internal, now};

#[doc(hidden)]
pub use async_trait::async_trait as __async_trait;

/// Implements [`Backend`] for a backend's connection type whose repositories follow the
/// names every backend shares: `States::open(connection, table, mode)` and
/// `Rows::<T>::open(connection, table, mode)`, with the connection cloned for each.
///
/// ```text
/// flows_core::impl_backend!(SqliteStore, schemes: ["sqlite"],
///     states: SqliteStateRepository, rows: SqliteUpsertRepository);
/// ```
#[macro_export]
macro_rules! impl_backend {
    ($connection:ty, schemes: [$($scheme:literal),+ $(,)?], states: $states:ident, rows: $rows:ident $(,)?) => {
        #[$crate::backend::__async_trait]
        impl $crate::backend::Backend for $connection {
            const SCHEMES: &'static [&'static str] = &[$($scheme),+];

            async fn connect(url: &str) -> ::core::result::Result<Self, $crate::RepositoryError> {
                <$connection>::connect(url).await
            }

            async fn open_state_table(
                &self,
                table: &str,
                mode: $crate::backend::TableMode,
            ) -> ::core::result::Result<
                ::std::sync::Arc<dyn $crate::SingleStateRepository>,
                $crate::RepositoryError,
            > {
                Ok(::std::sync::Arc::new($states::open(self.clone(), table, mode).await?))
            }

            async fn open_row_table<T: $crate::Row>(
                &self,
                table: &str,
                mode: $crate::backend::TableMode,
            ) -> ::core::result::Result<
                ::std::sync::Arc<dyn $crate::UpsertRepository<T>>,
                $crate::RepositoryError,
            > {
                Ok(::std::sync::Arc::new($rows::<T>::open(self.clone(), table, mode).await?))
            }
        }
    };
}

/// Whether opening a table creates it or requires it to exist; every backend's
/// repositories take it in `open`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TableMode {
    /// Create the table (and what it needs: indexes, a collection) if it does not exist.
    /// Safe when many workers start at once.
    #[default]
    CreateIfMissing,
    /// Fail with [`RepositoryError::Configuration`] if the table does not exist, for
    /// deployments whose schema is managed separately (migrations, Terraform) and whose
    /// workers may not create tables.
    RequireExisting,
}

/// The error of a table that [`TableMode::RequireExisting`] did not find.
pub fn missing_table(backend: &str, table: &str) -> RepositoryError {
    RepositoryError::Configuration(format!(
        "{backend} table {table} does not exist (TableMode::RequireExisting: create it first)"
    ))
}

/// A store flows opens by URL: a backend's connection, on which state tables and row
/// tables are opened (one connection serves both). Implementing it is what makes a
/// backend available to `flows::Store::connect` and `flows::open_state_store`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flows_core::RepositoryError> {
/// use flows_core::backend::Backend;
/// use flows_core::memory::MemoryBackend;
///
/// let store = MemoryBackend::connect("memory://").await?;
/// let states = store.state_table("word_counts").await?;
/// assert_eq!(states.get_all(&[]).await?.len(), 0);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Backend: Sized + Send + Sync + 'static {
    /// The URL schemes naming this backend (`postgres`, `postgresql`).
    const SCHEMES: &'static [&'static str];

    /// Connects to the store `url` names.
    async fn connect(url: &str) -> Result<Self, RepositoryError>;

    /// Opens the state table `table`, creating it or requiring it to exist per `mode`.
    async fn open_state_table(
        &self,
        table: &str,
        mode: TableMode,
    ) -> Result<Arc<dyn SingleStateRepository>, RepositoryError>;

    /// Opens the table of `T` under the name `table`, creating it or requiring it to
    /// exist per `mode`.
    async fn open_row_table<T: Row>(
        &self,
        table: &str,
        mode: TableMode,
    ) -> Result<Arc<dyn UpsertRepository<T>>, RepositoryError>;

    /// Opens the state table `table`, creating it if missing.
    async fn state_table(
        &self,
        table: &str,
    ) -> Result<Arc<dyn SingleStateRepository>, RepositoryError> {
        self.open_state_table(table, TableMode::CreateIfMissing)
            .await
    }

    /// Opens the table of `T` (named by `T::schema()`), creating it if missing.
    async fn row_table<T: Row>(&self) -> Result<Arc<dyn UpsertRepository<T>>, RepositoryError> {
        let schema = T::schema();
        self.open_row_table::<T>(schema.table().as_str(), TableMode::CreateIfMissing)
            .await
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
