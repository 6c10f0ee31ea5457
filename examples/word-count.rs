//! Word count: the main job of flows.
//!
//! `cargo run --release --example word-count` needs no servers: it starts librdkafka's
//! in-process mock cluster and a SQLite store in a temporary file, feeds a sample text,
//! counts every word with a stateful pipeline, prints each count as it changes, prints
//! the final table, and exits.
//!
//! With `FLOWS_BROKERS` set it is a long-lived worker against a real cluster instead:
//! it reads topic `words` (key = word), writes `word-counts` (key = word, value = the
//! count as JSON) and keeps its state in `FLOWS_STORE` (`postgres://…` with the
//! `postgres` feature, `sqlite://…`, `memory://`; table `FLOWS_STATE_TABLE`, default
//! `word_counts`), until SIGINT or SIGTERM. See `KafkaConfig::from_env` for the other
//! `FLOWS_*` settings.
//!
//! With `FLOWS_HTTP_ADDR` (e.g. `127.0.0.1:8081`) it runs until SIGINT or SIGTERM with
//! its HTTP face, on the embedded default or a real cluster: `POST /words` with a text
//! counts its words, `GET /state/word-count/{word}` shows a count, `/metrics`,
//! `/topology?format=mermaid` and `/health/ready` show the rest.
//!
//! The pipeline itself, `common::word_count`, is in `examples/common/mod.rs`: the
//! materialise example runs it too.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use flows::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let setup = common::Setup::new(&[("words", 4), ("word-counts", 4), ("words-dead-letter", 1)])?;
    let table = std::env::var("FLOWS_STATE_TABLE").unwrap_or_else(|_| "word_counts".into());
    let store = flows::open_state_store(&setup.store_url, &table).await?;
    // `POST /words` with a text: one message per word, keyed by the word.
    let ingest = IngestRoute::explode("words", Utf8, Topic::new("words", Utf8, Utf8), |text| {
        Ok(common::words_of(&text.body)
            .into_iter()
            .map(|word| Record::new(word.clone(), word))
            .collect())
    });
    if let Some((server, addr)) = HttpServer::new().ingest(ingest).from_env()? {
        println!(
            "http://{addr}: POST /words, GET /state/word-count/{{word}}, /metrics, /topology?format=mermaid"
        );
        let pipelines = flows::kafka::select_from_env(&[common::word_count(store)])?;
        let engine = flows::kafka::Engine::new(setup.config.clone());
        server.run_until_signal(addr, &engine, &pipelines).await?;
        return Ok(());
    }
    if !setup.is_embedded() {
        setup.run(&[common::word_count(store)], 0, u64::MAX).await?;
        return Ok(());
    }

    let words = setup.feed_sample_words().await?;
    println!(
        "fed {} words to the embedded Kafka; counts as they change:",
        words.len()
    );

    // A second pipeline prints every published count: what downstream consumers see.
    let printer =
        StatelessFunction::for_each(Topic::new("word-counts", Utf8, Json::<i64>::new()), |m| {
            println!("  {:<16} {}", m.key, m.value);
            Ok(())
        });
    let pipelines = [
        common::word_count(Arc::clone(&store)),
        Pipeline::stateless("word-count-printer", printer),
    ];
    let total = words.len() as u64;
    setup.run(&pipelines, 1, total).await?;

    let distinct: Vec<PersistenceId> = words
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(PersistenceId::new)
        .collect::<Result<_, _>>()?;
    let mut table = Vec::new();
    let counts = StateReader::new(store, Json::<i64>::new());
    for state in counts.get_all(&distinct).await? {
        table.push((state.content.unwrap_or(0), state.id.as_str().to_owned()));
    }
    table.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    println!(
        "\nfinal counts ({} words, {} distinct):",
        words.len(),
        table.len()
    );
    for (count, word) in &table {
        println!("  {word:<16} {count}");
    }
    let counted: i64 = table.iter().map(|(c, _)| c).sum();
    if counted != words.len() as i64 {
        return Err(format!("counted {counted} words, fed {}", words.len()).into());
    }
    Ok(())
}

/// The word count through flows' test driver: no broker, every crash point replayed.
#[cfg(test)]
mod tests {
    use super::*;
    use flows::MemoryStateRepository;
    use flows::testing::{TestDriver, assert_replays_exactly};

    fn feed(driver: &mut TestDriver) -> Result<(), flows::testing::TestDriverError> {
        let words = Topic::new("words", Utf8, Utf8);
        for word in common::words_of("It was the best of times, it was the worst of times") {
            driver.pipe(&words, Record::new(word.clone(), word))?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn counts_each_word_once_through_every_crash() {
        let store = || Arc::new(MemoryStateRepository::new());
        let mut driver = TestDriver::new([common::word_count(store())]);
        feed(&mut driver).unwrap();
        driver.run().await.unwrap();
        let counts = driver
            .read(&Topic::new("word-counts", Utf8, Json::<i64>::new()))
            .unwrap();
        let times: Vec<i64> = counts
            .iter()
            .filter(|m| m.key == "times")
            .map(|m| m.value)
            .collect();
        assert_eq!(times, [1, 2]);
        assert_replays_exactly(|| vec![common::word_count(store())], 3, feed).await;
    }
}
