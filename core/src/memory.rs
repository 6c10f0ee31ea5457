//! In-memory stores: the reference model the conformance suite compares every backend
//! with, and a zero-setup store for demos and tests. Nothing survives the process.

// foldhash: keys come from input messages, hashed per message; a seeded fast hash.
use foldhash::{HashMap, HashMapExt};
use std::collections::HashMap as StdHashMap;
use std::marker::PhantomData;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::backend::{check_writes, mark_written};
use crate::id::PersistenceId;
use crate::repository::{Capabilities, RepositoryError, SingleStateRepository};
use crate::row::{
    ChangeBatch, PrimaryKey, Row, TableSchema, UpsertRepository, Value, rows_in_request_order,
};
use crate::state::{RawState, State};

/// Default largest state of the in-memory store: 16 MiB.
pub const DEFAULT_MAX_STATE_SIZE: usize = 16 * 1024 * 1024;

/// A [`SingleStateRepository`] in a mutex-guarded map. Batch writes are atomic.
#[derive(Debug)]
pub struct MemoryStateRepository {
    states: Mutex<HashMap<PersistenceId, RawState>>,
    capabilities: Capabilities,
}

impl Default for MemoryStateRepository {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStateRepository {
    /// An empty store accepting states up to [`DEFAULT_MAX_STATE_SIZE`].
    pub fn new() -> Self {
        Self::with_max_state_size(DEFAULT_MAX_STATE_SIZE)
    }

    /// An empty store with a custom state size limit.
    pub fn with_max_state_size(max_state_size: usize) -> Self {
        Self {
            states: Mutex::new(HashMap::new()),
            capabilities: Capabilities::new(max_state_size, usize::MAX),
        }
    }

    /// Number of stored states.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every stored state, in no particular order.
    pub fn snapshot(&self) -> Vec<RawState> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PersistenceId, RawState>> {
        // A panic while holding the lock cannot leave a half-applied write (writes are
        // applied after all checks), so a poisoned map is still consistent.
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl SingleStateRepository for MemoryStateRepository {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let states = self.lock();
        // Straight into request order: duplicates repeated, missing ids fresh.
        Ok(ids
            .iter()
            .map(|id| {
                states
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| State::fresh(id.clone()))
            })
            .collect())
    }

    async fn upsert_all(
        &self,
        mut states: Vec<RawState>,
    ) -> Result<Vec<RawState>, RepositoryError> {
        // Nothing is encoded: the internal blob's size is computed for the size check.
        check_writes(&states, &self.capabilities)?;
        let now = crate::state::now();
        let mut stored = self.lock();
        // All or nothing: every version is checked before anything is written.
        let conflicts: Vec<PersistenceId> = states
            .iter()
            .filter(|state| stored.get(&state.id).map_or(0, |s| s.version) != state.version)
            .map(|state| state.id.clone())
            .collect();
        if !conflicts.is_empty() {
            return Err(RepositoryError::Conflict { ids: conflicts });
        }
        for state in &mut states {
            mark_written(state, now);
            match stored.get_mut(&state.id) {
                // Overwritten in place, reusing the stored state's buffers.
                Some(slot) => slot.clone_from(state),
                None => {
                    stored.insert(state.id.clone(), state.clone());
                }
            }
        }
        Ok(states)
    }
}

/// An [`UpsertRepository`] in a mutex-guarded map. Batches are atomic.
pub struct MemoryUpsertRepository<T> {
    schema: TableSchema,
    rows: Mutex<StdHashMap<PrimaryKey, Vec<Value>>>,
    _row: PhantomData<fn() -> T>,
}

impl<T: Row> Default for MemoryUpsertRepository<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Row> MemoryUpsertRepository<T> {
    /// An empty table for `T`.
    pub fn new() -> Self {
        Self {
            schema: T::schema(),
            rows: Mutex::new(StdHashMap::new()),
            _row: PhantomData,
        }
    }

    /// Every row, in no particular order.
    pub fn rows(&self) -> Result<Vec<T>, RepositoryError> {
        self.lock()
            .values()
            .map(|v| T::from_values(v.clone()).map_err(RepositoryError::from))
            .collect()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StdHashMap<PrimaryKey, Vec<Value>>> {
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl<T: Row> UpsertRepository<T> for MemoryUpsertRepository<T> {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DEFAULT_MAX_STATE_SIZE, usize::MAX)
    }

    fn schema(&self) -> &TableSchema {
        &self.schema
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        let mut rows = self.lock();
        for key in &batch.deletes {
            rows.remove(key);
        }
        for values in batch.upserts {
            rows.insert(self.schema.key_of(&values), values);
        }
        Ok(())
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        for key in keys {
            self.schema.check_key(key)?;
        }
        rows_in_request_order(keys, &self.lock())
    }
}

/// The in-memory [`Backend`](crate::backend::Backend) (`memory://`): every table it
/// opens is new and empty, and nothing persists.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryBackend;

#[async_trait::async_trait]
impl crate::backend::Backend for MemoryBackend {
    const SCHEMES: &'static [&'static str] = &["memory"];

    async fn connect(_url: &str) -> Result<Self, RepositoryError> {
        Ok(MemoryBackend)
    }

    /// A new, empty state table; under `RequireExisting` an error, since no in-memory
    /// table outlives its opening.
    async fn open_state_table(
        &self,
        table: &str,
        mode: crate::backend::TableMode,
    ) -> Result<std::sync::Arc<dyn SingleStateRepository>, RepositoryError> {
        if mode == crate::backend::TableMode::RequireExisting {
            return Err(crate::backend::missing_table("in-memory", table));
        }
        Ok(std::sync::Arc::new(MemoryStateRepository::new()))
    }

    async fn open_row_table<T: Row>(
        &self,
        table: &str,
        mode: crate::backend::TableMode,
    ) -> Result<std::sync::Arc<dyn UpsertRepository<T>>, RepositoryError> {
        if mode == crate::backend::TableMode::RequireExisting {
            return Err(crate::backend::missing_table("in-memory", table));
        }
        Ok(std::sync::Arc::new(MemoryUpsertRepository::<T>::new()))
    }
}
