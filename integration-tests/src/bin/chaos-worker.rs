//! The worker of the chaos suite (`tests/chaos.rs`): one pipeline of every shape, run
//! as a long-lived worker that the suite kills with SIGKILL and restarts.
//!
//! `FLOWS_INSTANCE` picks the pipeline (required); `FLOWS_BROKERS` and `FLOWS_STORE`
//! (a PostgreSQL URL) say where; `CHAOS_TABLE` names its state or row table.
//!
//! | pipeline | shape | input → output |
//! |---|---|---|
//! | `chaos-stateless` | stateless one-to-one | `chaos-events` → `chaos-events-out` (same key and value) |
//! | `chaos-count` | stateful word count | `chaos-words` → `chaos-counts` (count as JSON) |
//! | `chaos-join-rekey`, `chaos-join` | join of words and definitions | `chaos-words`, `chaos-definitions` → `chaos-join-intermediate` → `chaos-cards` |
//! | `chaos-materialise` | materialisation | `chaos-readings` → table `CHAOS_TABLE`: row `sensor` = the last `seq`, and a row `sensor#seq` per reading |
//!
//! Stateful and join outputs carry a header with a fresh random stamp: if the engine
//! ever recomputed an output instead of replaying the stored one, the duplicate would
//! differ, which the suite detects. Join cards number the inputs their state applied
//! (`n`), so the suite can check every card was published, in order.

use std::sync::Arc;

use flows::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
use flows::kafka::{Engine, ErrorPolicy, Join, KafkaConfig, Pipeline};
use flows::postgres::{PostgresStore, PostgresUpsertRepository};
use flows::{Json, Record, Row, RowChange, Topic, UpsertRepository, Utf8};
use serde::{Deserialize, Serialize};

/// A join card: how many inputs its state applied, how many were words, and the last
/// definition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Card {
    n: i64,
    count: i64,
    definition: Option<String>,
}

/// A materialised row: `key` is a sensor (its last sequence number) or `sensor#seq`
/// (one row per reading, so that a lost message shows).
#[derive(Row)]
#[flows(table = "chaos_readings")]
struct Reading {
    #[flows(key)]
    key: String,
    seq: i64,
}

fn stamp() -> String {
    rand::random::<u64>().to_string()
}

fn dead_letter() -> ErrorPolicy {
    ErrorPolicy::dead_letter("chaos-dead-letter")
}

fn stateless() -> Pipeline {
    let copy = StatelessFunction::one_to_one(
        Topic::new("chaos-events", Utf8, Utf8),
        Topic::new("chaos-events-out", Utf8, Utf8),
        |m| Ok(Record::new(m.key, m.value)),
    );
    Pipeline::stateless("chaos-stateless", copy).on_error(dead_letter())
}

async fn count(url: &str, table: &str) -> Result<Pipeline, Box<dyn std::error::Error>> {
    let store = flows::open_state_store(url, table).await?;
    let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("chaos-words", Utf8, Utf8),
        Topic::new("chaos-counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((
                count,
                Record::new(word.key, count).with_header("stamp", stamp()),
            ))
        },
    );
    Ok(Pipeline::stateful("chaos-count", count, store).on_error(dead_letter()))
}

fn join() -> Join {
    let cards = Topic::new("chaos-cards", Utf8, Json::<Card>::new());
    let card = |card: Option<&Card>, word: bool, definition: Option<String>| {
        let mut card = card.cloned().unwrap_or_default();
        card.n += 1;
        card.count += i64::from(word);
        if definition.is_some() {
            card.definition = definition;
        }
        card
    };
    let function = StatefulFunction::new(Json::<Card>::new())
        .one_to_one(
            Topic::new("chaos-words", Utf8, Utf8),
            cards.clone(),
            PersistenceIdFn::key(),
            move |state: Option<&Card>, word| {
                let next = card(state, true, None);
                let record = Record::new(word.key, next.clone()).with_header("stamp", stamp());
                Ok((next, record))
            },
        )
        .one_to_one(
            Topic::new("chaos-definitions", Utf8, Utf8),
            cards,
            PersistenceIdFn::key(),
            move |state: Option<&Card>, definition| {
                let next = card(state, false, Some(definition.value));
                let record =
                    Record::new(definition.key, next.clone()).with_header("stamp", stamp());
                Ok((next, record))
            },
        );
    Join::new("chaos-join", "chaos-join-intermediate", function)
}

async fn materialise(url: &str, table: &str) -> Result<Pipeline, Box<dyn std::error::Error>> {
    let store = PostgresStore::connect(url).await?;
    let table: Arc<dyn UpsertRepository<Reading>> =
        Arc::new(PostgresUpsertRepository::<Reading>::with_table(store, table).await?);
    let pipeline = Pipeline::materialise(
        "chaos-materialise",
        Topic::new("chaos-readings", Utf8, Json::<i64>::new()),
        table,
        |m| {
            let log = Reading {
                key: format!("{}#{}", m.key, m.value),
                seq: m.value,
            };
            let last = Reading {
                key: m.key,
                seq: m.value,
            };
            Ok(vec![RowChange::Upsert(last), RowChange::Upsert(log)])
        },
    );
    Ok(pipeline.on_error(dead_letter()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    flows_integration_tests::init_tracing();
    let config = KafkaConfig::from_env()?.ok_or("FLOWS_BROKERS is required")?;
    let instance = std::env::var("FLOWS_INSTANCE").map_err(|_| "FLOWS_INSTANCE is required")?;
    let url = std::env::var("FLOWS_STORE").unwrap_or_default();
    let table = std::env::var("CHAOS_TABLE").unwrap_or_else(|_| "chaos".into());
    let pipeline = match instance.as_str() {
        "chaos-stateless" => stateless(),
        "chaos-count" => count(&url, &table).await?,
        "chaos-join-rekey" => join().rekey_pipeline().on_error(dead_letter()),
        "chaos-join" => join()
            .stateful_pipeline(flows::open_state_store(&url, &table).await?)
            .on_error(dead_letter()),
        "chaos-materialise" => materialise(&url, &table).await?,
        other => return Err(format!("unknown pipeline {other:?}").into()),
    };
    Engine::new(config).run_until_signal(&[pipeline]).await?;
    Ok(())
}
