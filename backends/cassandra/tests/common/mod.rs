//! The server the Cassandra tests run against: a real cluster when
//! `FLOWS_TEST_CASSANDRA_URL` is set (e.g. `cassandra://127.0.0.1:9042/flows_test`, the
//! docker-compose ScyllaDB), otherwise kassandra, an in-memory imitation of a CQL v4
//! server started inside the test process.
//!
//! kassandra ignores lightweight transactions (`IF` clauses are applied
//! unconditionally and not even parsed as bind markers), write timestamps (the last
//! write to arrive wins), `WHERE k IN (...)` and null bindings in an `INSERT` (it keeps
//! the old value where Cassandra writes a tombstone). Stores opened on it accept a server
//! without lightweight transactions
//! ([`CassandraStore::accept_servers_without_lwt`]); the cases that depend on what it
//! ignores are generated as ignored, "real-server-only".

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use flows_cassandra::CassandraStore;
use kassandra_tester::KassandraTester;
use kassandra_tester::kassandra::session::KassandraSession;

/// The real cluster's URL, if one is configured.
pub fn real_server_url() -> Option<String> {
    std::env::var("FLOWS_TEST_CASSANDRA_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// The address of the process-wide kassandra server, started on first use on a thread
/// of its own (its runtime outlives every test's).
fn kassandra() -> SocketAddr {
    static ADDRESS: OnceLock<SocketAddr> = OnceLock::new();
    *ADDRESS.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kassandra".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("kassandra runtime");
                let tester = KassandraTester::new(KassandraSession::new());
                let served = runtime.block_on(tester.in_scope(|address| {
                    let sender = sender.clone();
                    async move {
                        sender.send(address).expect("report kassandra's address");
                        // Serve for as long as the test process lives.
                        std::future::pending::<Result<(), ()>>().await
                    }
                }));
                drop(served);
            })
            .expect("kassandra thread");
        receiver.recv().expect("kassandra started")
    })
}

/// A connected store: on the real cluster strictly, on kassandra accepting its lack of
/// lightweight transactions.
pub async fn store() -> CassandraStore {
    match real_server_url() {
        Some(url) => CassandraStore::connect(&url).await.unwrap_or_else(|e| {
            panic!("cannot use the Cassandra cluster at FLOWS_TEST_CASSANDRA_URL={url}: {e}")
        }),
        None => CassandraStore::connect(&imitation_url())
            .await
            .unwrap_or_else(|e| panic!("cannot use the in-process kassandra server: {e}"))
            .accept_servers_without_lwt(true),
    }
}

/// The `cassandra://` URL of the in-process kassandra server. It has no schema
/// versions to agree on, so the driver must not wait for agreement.
pub fn imitation_url() -> String {
    format!(
        "cassandra://{}/flows_test?await_schema_agreement=false",
        kassandra()
    )
}

/// A table name no other test (of this or a concurrent run) uses.
pub fn unique_table(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        rand::random::<u32>(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
