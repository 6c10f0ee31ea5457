//! The conformance suite against the in-memory reference stores.

mod conformance {
    flows_conformance::state_repository_suite!(memory, || async {
        flows_core::MemoryStateRepository::new()
    });
    flows_conformance::upsert_repository_suite!(memory_rows, || async {
        flows_core::MemoryUpsertRepository::<flows_conformance::ConformanceRow>::new()
    });
}
