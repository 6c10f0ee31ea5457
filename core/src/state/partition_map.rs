//! A map keyed by topic-partition, kept as a sorted vector.
//!
//! A state nearly always hears from one or two partitions; for so few entries a vector
//! is cheaper to clone (one small allocation, not a tree node of eleven slots) and to
//! search than a `BTreeMap`, and iterates in the same (sorted) order.

use crate::message::TopicPartition;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PartitionMap<V>(Vec<(TopicPartition, V)>);

impl<V: Clone> Clone for PartitionMap<V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }

    // Reuses the vector: a store overwriting a state allocates nothing new here.
    fn clone_from(&mut self, source: &Self) {
        self.0.clone_from(&source.0);
    }
}

impl<V> Default for PartitionMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> PartitionMap<V> {
    fn position(&self, tp: &TopicPartition) -> Result<usize, usize> {
        self.0.binary_search_by(|(key, _)| key.cmp(tp))
    }

    pub(crate) fn get(&self, tp: &TopicPartition) -> Option<&V> {
        self.position(tp).ok().map(|i| &self.0[i].1)
    }

    /// Inserts or replaces the value of `tp`.
    pub(crate) fn insert(&mut self, tp: TopicPartition, value: V) {
        match self.position(&tp) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (tp, value)),
        }
    }

    /// The value of `tp`, inserted by `make` if absent.
    pub(crate) fn get_or_insert_with(
        &mut self,
        tp: TopicPartition,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        let i = match self.position(&tp) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (tp, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub(crate) fn remove(&mut self, tp: &TopicPartition) -> Option<V> {
        self.position(tp).ok().map(|i| self.0.remove(i).1)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TopicPartition, &V)> {
        self.0.iter().map(|(tp, value)| (tp, value))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, value)| value)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, i64),
        Remove(u8),
        Bump(u8, i64),
    }

    fn tp(n: u8) -> TopicPartition {
        TopicPartition::new(["a", "b", "c"][usize::from(n % 3)], i32::from(n / 3))
    }

    proptest! {
        /// Behaves like a `BTreeMap`, iteration order included.
        #[test]
        fn matches_a_btree_map(ops in proptest::collection::vec(
            prop_oneof![
                (0u8..12, any::<i64>()).prop_map(|(k, v)| Op::Insert(k, v)),
                (0u8..12).prop_map(Op::Remove),
                (0u8..12, any::<i64>()).prop_map(|(k, v)| Op::Bump(k, v)),
            ],
            0..60,
        )) {
            let mut map = PartitionMap::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        map.insert(tp(k), v);
                        model.insert(tp(k), v);
                    }
                    Op::Remove(k) => prop_assert_eq!(map.remove(&tp(k)), model.remove(&tp(k))),
                    Op::Bump(k, v) => {
                        let a = map.get_or_insert_with(tp(k), || v);
                        *a = a.wrapping_add(1);
                        let b = model.entry(tp(k)).or_insert(v);
                        *b = b.wrapping_add(1);
                    }
                }
                for k in 0..12 {
                    prop_assert_eq!(map.get(&tp(k)), model.get(&tp(k)));
                }
                let listed: Vec<_> = map.iter().map(|(t, v)| (t.clone(), *v)).collect();
                let expected: Vec<_> = model.iter().map(|(t, v)| (t.clone(), *v)).collect();
                prop_assert_eq!(listed, expected);
                prop_assert_eq!(map.is_empty(), model.is_empty());
            }
        }
    }
}
