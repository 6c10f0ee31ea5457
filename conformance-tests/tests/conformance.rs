//! The conformance suite against the in-memory reference stores, and against an
//! in-memory model of last-write-wins fencing (which checks the `fencing:
//! last_write_wins` cases themselves: no server-backed store here honours write
//! timestamps).

mod conformance {
    flows_conformance::state_repository_suite!(memory, || async {
        flows_core::MemoryStateRepository::new()
    });
    flows_conformance::state_repository_suite!(
        memory_last_write_wins,
        || async { crate::last_write_wins::Store::default() },
        fencing: last_write_wins,
    );
    flows_conformance::upsert_repository_suite!(memory_rows, || async {
        flows_core::MemoryUpsertRepository::<flows_conformance::ConformanceRow>::new()
    });
}

/// Unconditional writes ordered like Cassandra write timestamps derived from the state
/// (flows-cassandra's `Fencing::WriteTimestamps`): the higher version wins; of two
/// writes of one version, the one made sooner after the state it read was written.
mod last_write_wins {
    use std::cmp::Reverse;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use flows_core::backend::{in_request_order, prepare_writes};
    use flows_core::{
        Capabilities, PersistenceId, RawState, RepositoryError, SingleStateRepository,
    };

    type Order = (u64, Reverse<i64>);

    #[derive(Default)]
    pub struct Store {
        states: Mutex<HashMap<PersistenceId, (Order, RawState)>>,
    }

    #[async_trait]
    impl SingleStateRepository for Store {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new(1024 * 1024, 100)
                .with_atomic_batch_write(false)
                .with_conditional_write(false)
                .with_versioned_last_write_wins(true)
        }

        async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
            let states = self.states.lock().expect("lock");
            let found = ids
                .iter()
                .filter_map(|id| states.get(id).map(|(_, s)| (id.clone(), s.clone())))
                .collect();
            Ok(in_request_order(ids, found))
        }

        async fn upsert_all(
            &self,
            states: Vec<RawState>,
        ) -> Result<Vec<RawState>, RepositoryError> {
            let writes = prepare_writes(&states, &self.capabilities())?;
            let mut stored = self.states.lock().expect("lock");
            for write in &writes {
                let elapsed = write.state.updated_at.map_or(0, |read| {
                    (write.updated_at - read)
                        .num_microseconds()
                        .unwrap_or(i64::MAX)
                        .max(0)
                });
                let order = (write.new_version, Reverse(elapsed));
                let newer = stored
                    .get(write.id())
                    .is_none_or(|(current, _)| order > *current);
                if newer {
                    stored.insert(write.id().clone(), (order, write.written()));
                }
            }
            Ok(writes.iter().map(|w| w.written()).collect())
        }
    }
}
