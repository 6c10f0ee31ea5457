//! A test worker: the word count of `examples/word-count.rs`, except that every output
//! carries a header with a fresh random stamp. If the engine ever recomputed an output
//! instead of replaying the stored one, the duplicate would carry a different stamp,
//! which the kill-and-restart test detects.
//!
//! Configured like the example: `FLOWS_BROKERS`, `FLOWS_STORE`, `FLOWS_STATE_TABLE`.

use flows::function::{PersistenceIdFn, StatefulFunction};
use flows::kafka::{Engine, ErrorPolicy, KafkaConfig, Pipeline};
use flows::{Json, Record, Topic, Utf8};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    flows_integration_tests::init_tracing();
    let config = KafkaConfig::from_env()?.ok_or("FLOWS_BROKERS is required")?;
    let url = std::env::var("FLOWS_STORE")?;
    let table = std::env::var("FLOWS_STATE_TABLE").unwrap_or_else(|_| "word_counts".into());
    let store = flows::open_state_store(&url, &table).await?;
    let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("word-counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            let stamp = rand::random::<u64>().to_string();
            Ok((
                count,
                Record::new(word.key, count).with_header("stamp", stamp),
            ))
        },
    );
    let pipeline = Pipeline::stateful("word-count", count, store)
        .on_error(ErrorPolicy::dead_letter("words-dead-letter"));
    Engine::new(config).run_until_signal(&[pipeline]).await?;
    Ok(())
}
