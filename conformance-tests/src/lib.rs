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
//!
//! A store that fences stale writes by ordering rather than by conditional writes
//! ([`versioned_last_write_wins`](flows_core::Capabilities::versioned_last_write_wins))
//! runs `state_repository_suite!(name, factory, fencing: last_write_wins)`: the cases
//! expecting conflicts are replaced by cases checking that stale writes never become
//! visible. A suite run against an in-memory imitation of a server can name the cases
//! the imitation cannot honour, `real_server_only: [case, ...]`: they are generated as
//! ignored tests, never counted as passed (see [`state_repository_suite!`]).

pub mod state;
pub mod upsert;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use flows_core::{Row, SingleStateRepository, UpsertRepository};

pub use upsert::{ConformanceRow, one_value_of_each_type, refused_rows, rows_a_store_may_refuse};

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

/// Checks a backend's table modes on tables named `table` (states) and `{table}_rows`
/// (rows), which must not exist yet: [`TableMode::RequireExisting`] refuses a missing
/// table with a configuration error and creates nothing; once the table was created,
/// it opens it and sees what was written.
///
/// [`TableMode::RequireExisting`]: flows_core::backend::TableMode::RequireExisting
pub async fn assert_table_modes<B: flows_core::backend::Backend>(backend: &B, table: &str) {
    use flows_core::backend::TableMode::{CreateIfMissing, RequireExisting};
    use flows_core::{PersistenceId, RepositoryError, State};

    fn refused<T>(result: Result<T, RepositoryError>, what: &str) {
        match result {
            Err(RepositoryError::Configuration(message)) => {
                assert!(message.contains("does not exist"), "{what}: {message}");
            }
            Err(other) => panic!("{what}: expected a configuration error, got {other}"),
            Ok(_) => panic!("{what}: a missing table was opened"),
        }
    }
    refused(
        backend.open_state_table(table, RequireExisting).await,
        "missing state table",
    );
    refused(
        backend.open_state_table(table, RequireExisting).await,
        "still missing: RequireExisting created nothing",
    );
    let created = backend
        .open_state_table(table, CreateIfMissing)
        .await
        .expect("create the state table");
    let id = PersistenceId::new("mode").expect("valid id");
    created
        .upsert(&State::fresh(id.clone()).with_content(b"kept".to_vec()))
        .await
        .expect("write a state");
    let existing = backend
        .open_state_table(table, RequireExisting)
        .await
        .expect("open the existing state table");
    let read = existing.get(&id).await.expect("read the state");
    assert_eq!(read.content.as_deref(), Some(&b"kept"[..]));

    let rows = format!("{table}_rows");
    refused(
        backend
            .open_row_table::<ConformanceRow>(&rows, RequireExisting)
            .await,
        "missing row table",
    );
    let row = ConformanceRow::sample("mode", 1, 1);
    backend
        .open_row_table::<ConformanceRow>(&rows, CreateIfMissing)
        .await
        .expect("create the row table")
        .upsert_all(std::slice::from_ref(&row))
        .await
        .expect("write a row");
    let existing = backend
        .open_row_table::<ConformanceRow>(&rows, RequireExisting)
        .await
        .expect("open the existing row table");
    let found = existing.get_all(&[row.key()]).await.expect("read the row");
    assert_eq!(found, vec![Some(row)]);
}

/// Asserts that `Row` round trips through values: used by [`upsert`] cases and
/// available to users testing their own row types.
pub fn assert_row_round_trips<T: Row + PartialEq + std::fmt::Debug>(row: &T) {
    let values = row.to_values().expect("row converts to values");
    let back = T::from_values(values).expect("row converts back from its values");
    assert_eq!(&back, row);
}

/// Generates one `#[test]` per state repository case, in a module named `$name`.
///
/// `$factory` is an async closure returning a fresh, isolated store on every call.
///
/// Options, in this order, both optional:
/// - `fencing: conditional` (the default) runs the cases of stores with
///   [`conditional_write`](flows_core::Capabilities::conditional_write): stale writes
///   fail with a conflict. `fencing: last_write_wins` runs, instead of those, the cases
///   of stores declaring
///   [`versioned_last_write_wins`](flows_core::Capabilities::versioned_last_write_wins):
///   stale writes succeed and never become visible over newer states.
/// - `real_server_only: [case, ...]` or `real_server_only("reason"): [case, ...]`
///   generates the named cases with `#[ignore = "reason"]`: for a suite run against an
///   in-memory imitation of a server, the cases the imitation cannot honour. They show
///   as ignored, never as passed; `cargo test -- --include-ignored` runs them (against
///   a real server). Naming a case the suite does not have is a compile error.
///
/// ```text
/// flows_conformance::state_repository_suite!(imitation_timestamps, || async { ... },
///     fencing: last_write_wins,
///     real_server_only("real-server-only: needs a real cluster"): [
///         stale_write_never_becomes_visible_after_newer_write,
///     ],
/// );
/// ```
#[macro_export]
macro_rules! state_repository_suite {
    ($name:ident, $factory:expr
        $(, fencing: $fencing:ident)?
        $(, real_server_only $(($reason:literal))? : [$($ignored:ident),* $(,)?])?
        $(,)?) => {
        $crate::__state_suite!(
            $name, $factory, [$($fencing)?], [$($($reason)?)?], [$($($ignored),*)?]
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __state_suite {
    ($name:ident, $factory:expr, [], $reason:tt, $ignored:tt) => {
        $crate::__state_suite!($name, $factory, [conditional], $reason, $ignored);
    };
    ($name:ident, $factory:expr, [$fencing:ident], [], $ignored:tt) => {
        $crate::__state_suite!(
            $name, $factory, [$fencing], ["real-server-only: needs a real server, not an in-memory imitation"], $ignored
        );
    };
    ($name:ident, $factory:expr, [conditional], [$reason:literal], [$($ignored:ident),*]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::StateFactory {
                $crate::StateFactory::new($factory)
            }

            $crate::__suite_cases!(state; factory; $reason; [$($ignored),*];
                capabilities_are_declared_sanely: future,
                missing_id_is_fresh: future,
                round_trip_empty_content: future,
                round_trip_binary_content: future,
                round_trip_unicode_content: future,
                round_trip_largest_declared_state: future,
                over_sized_state_rejected_and_nothing_written: future,
                progress_and_results_round_trip_exactly: future,
                versions_and_timestamps_advance: future,
                write_all_stores_like_upsert_all: future,
                get_all_keeps_request_order_duplicates_and_missing: future,
                batch_larger_than_native_limit: future,
                idempotent_re_upserts: future,
                stale_version_rejected: future,
                stale_insert_rejected: future,
                stale_write_all_rejected: future,
                stale_batch_rejected_and_nothing_changed: future,
                conflict_names_every_stale_id: future,
                duplicate_ids_in_batch_rejected: future,
                concurrent_increments_lose_no_update: future,
                hostile_ids_round_trip_and_stay_distinct: future,
                invalid_ids_rejected_before_the_store: future,
                stores_with_different_tables_are_isolated: future,
                state_machine_matches_in_memory_model: property,
            );
        }
    };
    ($name:ident, $factory:expr, [last_write_wins], [$reason:literal], [$($ignored:ident),*]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::StateFactory {
                $crate::StateFactory::new($factory)
            }

            $crate::__suite_cases!(state; factory; $reason; [$($ignored),*];
                capabilities_are_declared_sanely: future,
                missing_id_is_fresh: future,
                round_trip_empty_content: future,
                round_trip_binary_content: future,
                round_trip_unicode_content: future,
                round_trip_largest_declared_state: future,
                over_sized_state_rejected_and_nothing_written: future,
                progress_and_results_round_trip_exactly: future,
                versions_and_timestamps_advance: future,
                write_all_stores_like_upsert_all: future,
                get_all_keeps_request_order_duplicates_and_missing: future,
                batch_larger_than_native_limit: future,
                idempotent_re_upserts: future,
                stale_write_never_becomes_visible_after_newer_write: future,
                stale_writes_in_a_batch_leave_newer_states_and_write_the_rest: future,
                replaying_a_write_is_idempotent: future,
                duplicate_ids_in_batch_rejected: future,
                hostile_ids_round_trip_and_stay_distinct: future,
                invalid_ids_rejected_before_the_store: future,
                stores_with_different_tables_are_isolated: future,
                state_machine_matches_last_write_wins_model: property,
            );
        }
    };
}

/// Generates one `#[test]` per upsert repository case, in a module named `$name`.
///
/// `$factory` is an async closure returning a fresh, isolated
/// `UpsertRepository<ConformanceRow>` on every call. Takes the same `real_server_only`
/// option as [`state_repository_suite!`].
#[macro_export]
macro_rules! upsert_repository_suite {
    ($name:ident, $factory:expr
        $(, real_server_only $(($reason:literal))? : [$($ignored:ident),* $(,)?])?
        $(,)?) => {
        $crate::__upsert_suite!($name, $factory, [$($($reason)?)?], [$($($ignored),*)?]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __upsert_suite {
    ($name:ident, $factory:expr, [], $ignored:tt) => {
        $crate::__upsert_suite!(
            $name, $factory, ["real-server-only: needs a real server, not an in-memory imitation"], $ignored
        );
    };
    ($name:ident, $factory:expr, [$reason:literal], [$($ignored:ident),*]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::RowFactory {
                $crate::RowFactory::new($factory)
            }

            $crate::__suite_cases!(upsert; factory; $reason; [$($ignored),*];
                rows_round_trip_every_column_type: future,
                missing_rows_are_none_in_request_order: future,
                upsert_replaces_by_primary_key: future,
                upserting_twice_is_idempotent: future,
                last_change_per_key_in_a_batch_wins: future,
                delete_removes_rows_and_ignores_absent_keys: future,
                row_batch_larger_than_native_limit: future,
                hostile_text_round_trips_or_is_rejected: future,
                refused_rows_are_isolated_and_the_rest_written: future,
                row_tables_are_isolated: future,
                rows_state_machine_matches_in_memory_model: property,
            );
        }
    };
}

/// One `#[test]` per case; those named in `[$ignored]` get `#[ignore = $reason]`. The
/// arms of a local macro match case names literally, which is how a name is found in
/// the list (`macro_rules` cannot compare identifiers otherwise).
#[doc(hidden)]
#[macro_export]
macro_rules! __suite_cases {
    ($module:ident; $factory:ident; $reason:literal; [$($ignored:ident),*];
        $($case:ident: $kind:ident),* $(,)?) => {
        macro_rules! __suite_case {
            $( ($ignored) => { __suite_case!(@ignore $ignored); }; )*
            $(
                (@ignore $case) => {
                    #[test]
                    #[ignore = $reason]
                    fn $case() {
                        $crate::__run_case!($kind $module $factory $case);
                    }
                };
            )*
            $(
                ($case) => {
                    #[test]
                    fn $case() {
                        $crate::__run_case!($kind $module $factory $case);
                    }
                };
            )*
            $( (@check $case) => {}; )*
        }
        // A real-server-only name that is not a case of this suite does not compile.
        $( __suite_case!(@check $ignored); )*
        $( __suite_case!($case); )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __run_case {
    (future $module:ident $factory:ident $case:ident) => {
        $crate::run($crate::$module::$case($factory()))
    };
    (property $module:ident $factory:ident $case:ident) => {
        $crate::$module::$case($factory())
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
