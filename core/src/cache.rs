//! A cache of recently written states, as a layer over any [`SingleStateRepository`]:
//! [`StateCache::layer`] wraps a store so that the next batch touching a hot key skips
//! the store read.
//!
//! Safe without any invalidation protocol because every state write is conditional on
//! the version it was read at: a cached state that is no longer current (another
//! writer, another instance after a rebalance, an operator's edit) makes its write
//! conflict, and the conflicting state is then read from the store again (a read takes
//! a state out of the cache). Stores that fence by last-write-wins instead of conflicts
//! ([`Capabilities::versioned_last_write_wins`]) would not report that, so the layer
//! keeps nothing for them.
//!
//! Two generations bound it, an approximation of least-recently-used with no per-entry
//! bookkeeping: entries go into the young generation; when that reaches half the limit
//! (in states or bytes), the old generation is dropped and the young one becomes old.
//!
//! ```
//! # async fn demo() -> Result<(), flows_core::RepositoryError> {
//! use flows_core::cache::{StateCache, StateCacheLimits};
//! use flows_core::{MemoryStateRepository, PersistenceId, SingleStateRepository};
//!
//! let store = MemoryStateRepository::new();
//! let cache = StateCache::new(StateCacheLimits::default());
//! let cached = cache.layer(&store);
//! let id = PersistenceId::new("a").expect("valid id");
//! let mut state = cached.get(&id).await?;
//! state.content = Some(b"1".to_vec());
//! cached.write_all(vec![state]).await?;
//! // Read from the cache: the store is not asked.
//! assert_eq!(cached.get(&id).await?.version, 1);
//! # Ok(()) }
//! ```

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
// foldhash: ids come from input messages; a seeded fast hash.
use foldhash::fast::RandomState;
// A table of states found by their own id: no copy of the id as a separate key.
use hashbrown::HashTable;

use crate::id::PersistenceId;
use crate::repository::{Capabilities, RepositoryError, SingleStateRepository};
use crate::state::RawState;

/// Limits of a pipeline's state cache; zero states disables it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCacheLimits {
    /// Most states kept (default 100,000; the byte limit is usually the one reached
    /// first). Below a pipeline's number of hot keys, the two generations turn over
    /// before a key comes back and most reads miss: with 10,000 keys written in turn,
    /// a limit of 10,000 kept about half of them.
    pub max_states: usize,
    /// Most bytes of ids, contents and stored outputs kept (default 32 MiB).
    pub max_bytes: usize,
}

impl Default for StateCacheLimits {
    fn default() -> Self {
        Self {
            max_states: 100_000,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

impl StateCacheLimits {
    /// No cache: every batch reads its states from the store.
    pub fn disabled() -> Self {
        Self {
            max_states: 0,
            max_bytes: 0,
        }
    }

    fn is_enabled(&self) -> bool {
        self.max_states > 0 && self.max_bytes > 0
    }
}

#[derive(Default)]
struct Generation {
    states: HashTable<RawState>,
    bytes: usize,
}

impl Generation {
    fn take(&mut self, hash: u64, id: &PersistenceId) -> Option<RawState> {
        let (state, _) = self.states.find_entry(hash, |s| s.id == *id).ok()?.remove();
        self.bytes -= footprint(&state);
        Some(state)
    }
}

/// Recently written states, within [`StateCacheLimits`]; shared by every task of a
/// pipeline run. Put it over a store with [`layer`](Self::layer).
pub struct StateCache {
    limits: StateCacheLimits,
    generations: Mutex<Generations>,
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache")
            .field("limits", &self.limits)
            .field("states", &self.lock().len())
            .finish()
    }
}

impl StateCache {
    /// An empty cache within `limits`.
    pub fn new(limits: StateCacheLimits) -> Self {
        Self {
            limits,
            generations: Mutex::new(Generations::default()),
        }
    }

    /// Whether the limits let it keep anything.
    pub fn is_enabled(&self) -> bool {
        self.limits.is_enabled()
    }

    /// `store` with this cache in front: reads take states from the cache before
    /// asking the store, writes keep the states as written. Nothing is cached for a
    /// store that fences by last-write-wins (it could not report a stale cached state).
    pub fn layer<'a, R: SingleStateRepository + ?Sized>(
        &'a self,
        store: &'a R,
    ) -> CachedStates<'a, R> {
        let usable = self.is_enabled() && !store.capabilities().versioned_last_write_wins;
        CachedStates {
            store,
            cache: usable.then_some(self),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Number of states kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no state is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every state.
    pub fn clear(&self) {
        *self.lock() = Generations::default();
    }

    /// It holds no invariant a panic could break halfway, so a poisoned lock is used
    /// as it is.
    fn lock(&self) -> MutexGuard<'_, Generations> {
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn take(&self, id: &PersistenceId) -> Option<RawState> {
        self.lock().take(id)
    }

    fn put_all(&self, states: impl Iterator<Item = RawState>) {
        if !self.is_enabled() {
            return;
        }
        let mut generations = self.lock();
        states.for_each(|state| generations.put(state, self.limits));
    }

    fn forget(&self, ids: &[PersistenceId]) {
        let mut generations = self.lock();
        ids.iter().for_each(|id| drop(generations.take(id)));
    }
}

/// The two generations of a [`StateCache`].
#[derive(Default)]
struct Generations {
    young: Generation,
    old: Generation,
    hasher: RandomState,
}

impl Generations {
    /// Removes and returns the cached state of `id`, if any: a state read is about to
    /// be folded and rewritten.
    fn take(&mut self, id: &PersistenceId) -> Option<RawState> {
        let hash = self.hasher.hash_one(id);
        self.young
            .take(hash, id)
            .or_else(|| self.old.take(hash, id))
    }

    /// Keeps `state` (as the store now holds it), replacing any older copy.
    fn put(&mut self, state: RawState, limits: StateCacheLimits) {
        let size = footprint(&state);
        let hash = self.hasher.hash_one(&state.id);
        self.old.take(hash, &state.id);
        self.young.take(hash, &state.id);
        if size > limits.max_bytes / 2 {
            return;
        }
        if self.young.states.len() >= limits.max_states.div_ceil(2)
            || self.young.bytes + size > limits.max_bytes / 2
        {
            // The next generation will likely fill as this one did: sized for that
            // up front, it never rehashes on the way.
            let next = Generation {
                states: HashTable::with_capacity(self.young.states.len()),
                bytes: 0,
            };
            self.old = std::mem::replace(&mut self.young, next);
        }
        self.young.bytes += size;
        let hasher = &self.hasher;
        self.young
            .states
            .insert_unique(hash, state, |s| hasher.hash_one(&s.id));
    }

    fn len(&self) -> usize {
        self.young.states.len() + self.old.states.len()
    }
}

/// A store with a [`StateCache`] in front (see [`StateCache::layer`]). It counts where
/// the states it read came from.
pub struct CachedStates<'a, R: ?Sized> {
    store: &'a R,
    cache: Option<&'a StateCache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<'a, R: SingleStateRepository + ?Sized> CachedStates<'a, R> {
    /// `store` without a cache (every read goes to the store), counting its reads as
    /// misses.
    pub fn uncached(store: &'a R) -> Self {
        Self {
            store,
            cache: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// States read so far from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// States read so far from the store.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

impl<R: ?Sized> std::fmt::Debug for CachedStates<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStates")
            .field("cache", &self.cache)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<R: SingleStateRepository + ?Sized> SingleStateRepository for CachedStates<'_, R> {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }

    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        let Some(cache) = self.cache else {
            self.misses.fetch_add(ids.len() as u64, Ordering::Relaxed);
            return self.store.get_all(ids).await;
        };
        let mut slots: Vec<Option<RawState>> = {
            let mut generations = cache.lock();
            ids.iter().map(|id| generations.take(id)).collect()
        };
        let missing: Vec<PersistenceId> = ids
            .iter()
            .zip(&slots)
            .filter(|(_, state)| state.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        self.hits
            .fetch_add((ids.len() - missing.len()) as u64, Ordering::Relaxed);
        self.misses
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        if !missing.is_empty() {
            let mut read = self.store.get_all(&missing).await?.into_iter();
            for slot in slots.iter_mut().filter(|slot| slot.is_none()) {
                *slot = read.next();
            }
        }
        // `get_all` returns one state per requested id; anything else is a store bug.
        slots
            .into_iter()
            .zip(ids)
            .map(|(state, id)| {
                state.ok_or_else(|| {
                    RepositoryError::Backend(format!("get_all returned no state for {id}").into())
                })
            })
            .collect()
    }

    /// Keeps a copy of each written state ([`write_all`](Self::write_all) keeps them
    /// without copying).
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let written = self.written(self.store.upsert_all(states).await)?;
        if let Some(cache) = self.cache {
            cache.put_all(written.iter().cloned());
        }
        Ok(written)
    }

    async fn write_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        let mut written = self.written(self.store.upsert_all(states).await)?;
        match self.cache {
            Some(cache) => cache.put_all(written.drain(..)),
            None => written.clear(),
        }
        Ok(written)
    }
}

impl<R: ?Sized> CachedStates<'_, R> {
    /// A conflict means the cached copies of those ids (if any) are stale.
    fn written(
        &self,
        result: Result<Vec<RawState>, RepositoryError>,
    ) -> Result<Vec<RawState>, RepositoryError> {
        if let (Some(cache), Err(RepositoryError::Conflict { ids })) = (self.cache, &result) {
            cache.forget(ids);
        }
        result
    }
}

/// What a cached state costs, approximately: its id, content and stored outputs.
fn footprint(state: &RawState) -> usize {
    state.id.as_str().len()
        + state.content.as_ref().map_or(0, Vec::len)
        + state.results.encoded_len()
        + 128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStateRepository;

    fn state(id: &str, version: u64, content: usize) -> RawState {
        let mut state = RawState::fresh(PersistenceId::new(id).expect("id"));
        state.version = version;
        state.content = Some(vec![7; content]);
        state
    }

    fn id(id: &str) -> PersistenceId {
        PersistenceId::new(id).expect("id")
    }

    fn put(cache: &StateCache, state: RawState) {
        cache.put_all(std::iter::once(state));
    }

    #[test]
    fn a_taken_state_is_gone_and_a_put_replaces_the_older_copy() {
        let cache = StateCache::new(StateCacheLimits::default());
        put(&cache, state("a", 1, 3));
        put(&cache, state("a", 2, 3));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.take(&id("a")).map(|s| s.version), Some(2));
        assert!(cache.take(&id("a")).is_none());
    }

    #[test]
    fn the_number_of_states_stays_within_the_limit_and_recent_ones_survive() {
        let limits = StateCacheLimits {
            max_states: 100,
            max_bytes: usize::MAX,
        };
        let cache = StateCache::new(limits);
        for i in 0..1_000 {
            put(&cache, state(&format!("k{i}"), 1, 1));
            assert!(cache.len() <= 100, "{} states kept", cache.len());
        }
        assert!(cache.take(&id("k999")).is_some());
        assert!(cache.take(&id("k0")).is_none());
    }

    #[test]
    fn bytes_stay_within_the_limit_and_oversized_states_are_not_kept() {
        let limits = StateCacheLimits {
            max_states: usize::MAX,
            max_bytes: 100_000,
        };
        let cache = StateCache::new(limits);
        for i in 0..1_000 {
            put(&cache, state(&format!("k{i}"), 1, 1_000));
            let generations = cache.lock();
            let bytes = generations.young.bytes + generations.old.bytes;
            assert!(bytes <= 100_000, "{bytes} bytes kept");
        }
        put(&cache, state("huge", 1, 10));
        // A newer copy too large to keep must not leave the older one behind.
        put(&cache, state("huge", 2, 60_000));
        assert!(cache.take(&id("huge")).is_none());
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let cache = StateCache::new(StateCacheLimits::disabled());
        put(&cache, state("a", 1, 1));
        assert!(cache.is_empty());
    }

    async fn count(store: &impl SingleStateRepository, key: &str) -> RawState {
        let mut state = store.get(&id(key)).await.expect("read");
        let n = state.content.as_ref().map_or(0, |c| c[0]);
        state.content = Some(vec![n + 1]);
        let mut written = store.upsert_all(vec![state]).await.expect("write");
        written.pop().expect("written state")
    }

    #[tokio::test]
    async fn the_layer_reads_written_states_from_the_cache_and_the_rest_from_the_store() {
        let store = MemoryStateRepository::new();
        count(&store, "b").await;
        let cache = StateCache::new(StateCacheLimits::default());
        let cached = cache.layer(&store);
        let a = count(&cached, "a").await;
        assert_eq!((a.version, cached.hits(), cached.misses()), (1, 0, 1));
        // In request order, a from the cache, b (written before the layer) and c
        // (never written) from the store.
        let read = cached
            .get_all(&[id("a"), id("b"), id("c")])
            .await
            .expect("read");
        let versions: Vec<u64> = read.iter().map(|s| s.version).collect();
        assert_eq!(versions, [1, 1, 0]);
        assert_eq!(read[0], a);
        assert_eq!((cached.hits(), cached.misses()), (1, 3));
        // A read takes a state out: read again, it comes from the store.
        cached.get(&id("a")).await.expect("read");
        assert_eq!((cached.hits(), cached.misses()), (1, 4));
    }

    #[tokio::test]
    async fn write_all_keeps_the_written_states_and_hands_back_an_empty_vector() {
        let store = MemoryStateRepository::new();
        let cache = StateCache::new(StateCacheLimits::default());
        let cached = cache.layer(&store);
        let fresh = cached.get_all(&[id("a"), id("b")]).await.expect("read");
        let back = cached.write_all(fresh).await.expect("write");
        assert!(back.is_empty());
        assert_eq!(cache.len(), 2);
        let read = cached.get_all(&[id("b"), id("a")]).await.expect("read");
        assert!(read.iter().all(|s| s.version == 1));
        assert_eq!(cached.hits(), 2);
        assert_eq!(
            read,
            store.get_all(&[id("b"), id("a")]).await.expect("read")
        );
    }

    #[tokio::test]
    async fn a_state_changed_behind_the_cache_conflicts_and_is_then_read_from_the_store() {
        let store = MemoryStateRepository::new();
        let cache = StateCache::new(StateCacheLimits::default());
        let cached = cache.layer(&store);
        count(&cached, "a").await;
        // Another writer, without this cache, counts a again.
        count(&store, "a").await;
        // The cached copy (version 1) is stale: its write conflicts.
        let stale = cached.get(&id("a")).await.expect("read");
        assert_eq!(stale.version, 1);
        put(&cache, stale.clone());
        let error = cached
            .upsert_all(vec![stale])
            .await
            .expect_err("stale write");
        assert!(matches!(error, RepositoryError::Conflict { .. }), "{error}");
        assert!(cache.is_empty(), "the conflicting id is forgotten");
        assert_eq!(count(&cached, "a").await.content, Some(vec![3]));
    }

    #[tokio::test]
    async fn nothing_is_cached_over_a_store_that_cannot_report_a_stale_write() {
        struct LastWriteWins(MemoryStateRepository);
        #[async_trait]
        impl SingleStateRepository for LastWriteWins {
            fn capabilities(&self) -> Capabilities {
                Capabilities {
                    versioned_last_write_wins: true,
                    ..self.0.capabilities()
                }
            }
            async fn get_all(
                &self,
                ids: &[PersistenceId],
            ) -> Result<Vec<RawState>, RepositoryError> {
                self.0.get_all(ids).await
            }
            async fn upsert_all(
                &self,
                states: Vec<RawState>,
            ) -> Result<Vec<RawState>, RepositoryError> {
                self.0.upsert_all(states).await
            }
        }
        let store = LastWriteWins(MemoryStateRepository::new());
        let cache = StateCache::new(StateCacheLimits::default());
        let cached = cache.layer(&store);
        count(&cached, "a").await;
        count(&cached, "a").await;
        assert!(cache.is_empty());
        assert_eq!((cached.hits(), cached.misses()), (0, 2));
    }
}
