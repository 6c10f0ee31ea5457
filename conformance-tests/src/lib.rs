//! The conformance suite of flows: one set of tests that every
//! [`SingleStateRepository`] and [`UpsertRepository`] passes, built-in or your own.
//!
//! # Running it against your store
//!
//! Add `flows-conformance` (and `tokio`) as dev-dependencies and write one test file,
//! e.g. `tests/conformance.rs`:
//!
//! ```text
//! mod conformance {
//!     // Each call must return a fresh, isolated store (e.g. a new table name).
//!     flows_conformance::state_repository_suite!(my_store, || async {
//!         my_crate::MyStateStore::connect_to_new_table().await.unwrap()
//!     });
//!     flows_conformance::upsert_repository_suite!(my_store_rows, || async {
//!         my_crate::MyUpsertStore::<flows_conformance::ConformanceRow>::new_table().await.unwrap()
//!     });
//! }
//! ```
//!
//! `cargo test -- --list` then shows one test per case, named after the store, e.g.
//! `conformance::my_store::stale_version_rejected`. The factory expression is expanded
//! inside the generated module: refer to your items by path.
//!
//! Each case checks a behaviour of the contract documented on
//! [`flows_core::repository`]; capability-dependent cases test what the store declares
//! in [`Capabilities`](flows_core::Capabilities) and fail if a declared capability does
//! not hold.

pub mod state;
pub mod upsert;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use flows_core::{Row, SingleStateRepository, UpsertRepository};

pub use upsert::ConformanceRow;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A shared state store under test.
pub type StateStore = Arc<dyn SingleStateRepository>;

/// A shared upsert store under test.
pub type RowStore = Arc<dyn UpsertRepository<ConformanceRow>>;

/// Makes a fresh, isolated state store per call.
#[derive(Clone)]
pub struct StateFactory(Arc<dyn Fn() -> BoxFuture<StateStore> + Send + Sync>);

impl StateFactory {
    /// Wraps an async closure returning a store.
    pub fn new<F, Fut, R>(factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: SingleStateRepository + 'static,
    {
        let factory = Arc::new(factory);
        Self(Arc::new(move || {
            let factory = Arc::clone(&factory);
            Box::pin(async move { Arc::new(factory().await) as StateStore })
        }))
    }

    /// A fresh store.
    pub async fn create(&self) -> StateStore {
        (self.0)().await
    }
}

/// Makes a fresh, isolated upsert store of [`ConformanceRow`]s per call.
#[derive(Clone)]
pub struct RowFactory(Arc<dyn Fn() -> BoxFuture<RowStore> + Send + Sync>);

impl RowFactory {
    /// Wraps an async closure returning a store.
    pub fn new<F, Fut, R>(factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: UpsertRepository<ConformanceRow> + 'static,
    {
        let factory = Arc::new(factory);
        Self(Arc::new(move || {
            let factory = Arc::clone(&factory);
            Box::pin(async move { Arc::new(factory().await) as RowStore })
        }))
    }

    /// A fresh store.
    pub async fn create(&self) -> RowStore {
        (self.0)().await
    }
}

/// Runs one async case on a fresh multi-threaded runtime.
pub fn run(case: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(case)
}

/// Runs a property over `cases` random inputs of `strategy`, each case an async block on
/// one shared runtime; panics with proptest's minimal failing input.
pub fn run_property<S: proptest::strategy::Strategy>(
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> BoxFuture<Result<(), proptest::test_runner::TestCaseError>>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, |value| runtime.block_on(property(value))) {
        panic!("{e}");
    }
}

/// Asserts that `Row` round trips through values: used by [`upsert`] cases and
/// available to users testing their own row types.
pub fn assert_row_round_trips<T: Row + PartialEq + std::fmt::Debug>(row: &T) {
    let back = T::from_values(row.to_values()).expect("row converts back from its values");
    assert_eq!(&back, row);
}

/// Generates one `#[test]` per state repository case, in a module named `$name`.
///
/// `$factory` is an async closure returning a fresh, isolated store on every call.
#[macro_export]
macro_rules! state_repository_suite {
    ($name:ident, $factory:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::StateFactory {
                $crate::StateFactory::new($factory)
            }

            $crate::__cases!(state; factory;
                capabilities_are_declared_sanely,
                missing_id_is_fresh,
                round_trip_empty_content,
                round_trip_binary_content,
                round_trip_unicode_content,
                round_trip_largest_declared_state,
                over_sized_state_rejected_and_nothing_written,
                progress_and_results_round_trip_exactly,
                versions_and_timestamps_advance,
                get_all_keeps_request_order_duplicates_and_missing,
                batch_larger_than_native_limit,
                idempotent_re_upserts,
                stale_version_rejected,
                stale_insert_rejected,
                stale_batch_rejected_and_nothing_changed,
                conflict_names_every_stale_id,
                duplicate_ids_in_batch_rejected,
                concurrent_increments_lose_no_update,
                hostile_ids_round_trip_and_stay_distinct,
                invalid_ids_rejected_before_the_store,
                stores_with_different_tables_are_isolated,
            );

            #[test]
            fn state_machine_matches_in_memory_model() {
                $crate::state::state_machine_matches_in_memory_model(factory());
            }
        }
    };
}

/// Generates one `#[test]` per upsert repository case, in a module named `$name`.
///
/// `$factory` is an async closure returning a fresh, isolated
/// `UpsertRepository<ConformanceRow>` on every call.
#[macro_export]
macro_rules! upsert_repository_suite {
    ($name:ident, $factory:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::RowFactory {
                $crate::RowFactory::new($factory)
            }

            $crate::__cases!(upsert; factory;
                rows_round_trip_every_column_type,
                missing_rows_are_none_in_request_order,
                upsert_replaces_by_primary_key,
                upserting_twice_is_idempotent,
                last_change_per_key_in_a_batch_wins,
                delete_removes_rows_and_ignores_absent_keys,
                row_batch_larger_than_native_limit,
                hostile_text_round_trips_or_is_rejected,
                row_tables_are_isolated,
            );

            #[test]
            fn rows_state_machine_matches_in_memory_model() {
                $crate::upsert::rows_state_machine_matches_in_memory_model(factory());
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cases {
    ($module:ident; $factory:ident; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run($crate::$module::$case($factory()));
            }
        )*
    };
}
