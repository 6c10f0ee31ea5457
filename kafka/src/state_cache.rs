//! Recently written states, kept so that the next batch touching a hot key skips the
//! store read.
//!
//! Safe without any invalidation protocol because every state write is conditional on
//! the version it was read at: a cached state that is no longer current (another
//! writer, another instance after a rebalance, an operator's edit) makes its write
//! conflict, and the conflict path drops it and reads the store again. Stores that
//! fence by last-write-wins instead of conflicts (`versioned_last_write_wins`) would not
//! report that, so no cache is kept for them.
//!
//! Two generations bound it, an approximation of least-recently-used with no per-entry
//! bookkeeping: entries go into the young generation; when that reaches half the limit
//! (in states or bytes), the old generation is dropped and the young one becomes old.
//! A state read from either is taken out (it is about to be folded and rewritten).

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

// A table of states found by their own id: no copy of the id as a separate key.
// foldhash: ids come from input messages; a seeded fast hash.
use foldhash::fast::RandomState;
use hashbrown::HashTable;

use flows_core::{PersistenceId, RawState};

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

/// The cache of one stateful pipeline (shared by its partition workers).
pub(crate) struct StateCache {
    limits: StateCacheLimits,
    young: Generation,
    old: Generation,
    hasher: RandomState,
}

impl StateCache {
    pub(crate) fn new(limits: StateCacheLimits) -> Self {
        Self {
            limits,
            young: Generation::default(),
            old: Generation::default(),
            hasher: RandomState::default(),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.limits.max_states > 0 && self.limits.max_bytes > 0
    }

    /// Removes and returns the cached state of `id`, if any.
    pub(crate) fn take(&mut self, id: &PersistenceId) -> Option<RawState> {
        let hash = self.hasher.hash_one(id);
        self.young
            .take(hash, id)
            .or_else(|| self.old.take(hash, id))
    }

    /// Keeps `state` (as the store now holds it), replacing any older copy.
    pub(crate) fn put(&mut self, state: RawState) {
        if !self.is_enabled() {
            return;
        }
        let size = footprint(&state);
        if size > self.limits.max_bytes / 2 {
            return;
        }
        let hash = self.hasher.hash_one(&state.id);
        self.old.take(hash, &state.id);
        self.young.take(hash, &state.id);
        if self.young.states.len() >= self.limits.max_states.div_ceil(2)
            || self.young.bytes + size > self.limits.max_bytes / 2
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

    /// Number of states kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.states.len() + self.old.states.len()
    }
}

/// Locks a pipeline's cache. It holds no invariant a panic could break halfway, so a
/// poisoned lock is used as it is.
pub(crate) fn lock(cache: &Mutex<StateCache>) -> MutexGuard<'_, StateCache> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn state(id: &str, version: u64, content: usize) -> RawState {
        let mut state = RawState::fresh(PersistenceId::new(id).expect("id"));
        state.version = version;
        state.content = Some(vec![7; content]);
        state
    }

    #[test]
    fn a_taken_state_is_gone_and_a_put_replaces_the_older_copy() {
        let mut cache = StateCache::new(StateCacheLimits::default());
        cache.put(state("a", 1, 3));
        cache.put(state("a", 2, 3));
        assert_eq!(cache.len(), 1);
        let id = PersistenceId::new("a").expect("id");
        assert_eq!(cache.take(&id).map(|s| s.version), Some(2));
        assert!(cache.take(&id).is_none());
    }

    #[test]
    fn the_number_of_states_stays_within_the_limit_and_recent_ones_survive() {
        let limits = StateCacheLimits {
            max_states: 100,
            max_bytes: usize::MAX,
        };
        let mut cache = StateCache::new(limits);
        for i in 0..1_000 {
            cache.put(state(&format!("k{i}"), 1, 1));
            assert!(cache.len() <= 100, "{} states kept", cache.len());
        }
        let recent = PersistenceId::new("k999").expect("id");
        assert!(cache.take(&recent).is_some());
        let ancient = PersistenceId::new("k0").expect("id");
        assert!(cache.take(&ancient).is_none());
    }

    #[test]
    fn bytes_stay_within_the_limit_and_oversized_states_are_not_kept() {
        let limits = StateCacheLimits {
            max_states: usize::MAX,
            max_bytes: 100_000,
        };
        let mut cache = StateCache::new(limits);
        for i in 0..1_000 {
            cache.put(state(&format!("k{i}"), 1, 1_000));
            let bytes = cache.young.bytes + cache.old.bytes;
            assert!(bytes <= 100_000, "{bytes} bytes kept");
        }
        cache.put(state("huge", 1, 60_000));
        assert!(
            cache
                .take(&PersistenceId::new("huge").expect("id"))
                .is_none()
        );
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let mut cache = StateCache::new(StateCacheLimits::disabled());
        cache.put(state("a", 1, 1));
        assert_eq!(cache.len(), 0);
    }
}
