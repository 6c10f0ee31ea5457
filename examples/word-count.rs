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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flows::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
use flows::kafka::{EmbeddedKafka, Engine, ErrorPolicy, KafkaConfig, OutputProducer, Pipeline};
use flows::{Json, PersistenceId, Record, SingleStateRepository, Topic, Utf8};

const SAMPLE: &str = include_str!("sample.txt");

/// The pipeline: per word, a count; every change is published to `word-counts`.
fn word_count(store: Arc<dyn SingleStateRepository>) -> Pipeline {
    let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("word-counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count)))
        },
    );
    Pipeline::stateful("word-count", count, store)
        .on_error(ErrorPolicy::dead_letter("words-dead-letter"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = KafkaConfig::from_env()?;
    // The worker logs its lifecycle; the demo prints counts, so it logs only problems.
    let default_filter = if config.is_some() { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    match config {
        Some(config) => worker(config).await,
        None => demo().await,
    }
}

/// Long-lived worker against real Kafka and a real store.
async fn worker(config: KafkaConfig) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("FLOWS_STORE").unwrap_or_else(|_| "sqlite://word-count.sqlite".into());
    let table = std::env::var("FLOWS_STATE_TABLE").unwrap_or_else(|_| "word_counts".into());
    let store = flows::open_state_store(&url, &table).await?;
    let pipelines = flows::kafka::select_from_env(&[word_count(store)])?;
    Engine::new(config).run_until_signal(&pipelines).await?;
    Ok(())
}

/// Everything in process: mock cluster, SQLite in a temporary file, a sample text.
async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let kafka = EmbeddedKafka::start(1)?;
    for topic in ["words", "word-counts", "words-dead-letter"] {
        kafka.create_topic(topic, 4, 1)?;
    }
    let config = KafkaConfig::new(kafka.bootstrap_servers());

    let dir = std::env::temp_dir().join(format!("flows-word-count-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite://{}", dir.join("state.sqlite").display());
    let store = flows::open_state_store(&url, "word_counts").await?;

    let words: Vec<String> = SAMPLE
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    let topic = Topic::new("words", Utf8, Utf8);
    let records = words
        .iter()
        .map(|w| topic.encode(&Record::new(w.clone(), w.clone()), None))
        .collect::<Result<Vec<_>, _>>()?;
    OutputProducer::new(&config)?.send_all(&records).await?;
    println!("fed {} words to the embedded Kafka; counting…", words.len());

    // A second pipeline prints every published count: that is what downstream sees.
    let printer = StatelessFunction::explode(
        Topic::new("word-counts", Utf8, Json::<i64>::new()),
        Topic::new("unused", Utf8, Utf8),
        |m| {
            println!("  {:<16} {}", m.key, m.value);
            Ok(Vec::new())
        },
    );
    let engine = Engine::new(config);
    let counting = engine.start(&word_count(Arc::clone(&store)))?;
    let printing = engine.start(&Pipeline::stateless("word-count-printer", printer))?;

    let started = Instant::now();
    while printing.metrics().snapshot().committed < words.len() as u64 {
        if counting.is_stopping() || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = counting.metrics().snapshot();
    counting.shutdown().await?;
    printing.shutdown().await?;

    let distinct: Vec<PersistenceId> = words
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(PersistenceId::new)
        .collect::<Result<_, _>>()?;
    let mut table = Vec::new();
    for state in store.get_all(&distinct).await? {
        let count: i64 = serde_json::from_slice(state.content.as_deref().unwrap_or(b"0"))?;
        table.push((count, state.id.as_str().to_owned()));
    }
    table.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    println!(
        "\nfinal counts ({} words, {} distinct, {} batches):",
        words.len(),
        table.len(),
        stats.batches
    );
    for (count, word) in &table {
        println!("  {word:<16} {count}");
    }
    let total: i64 = table.iter().map(|(c, _)| c).sum();
    let _ = std::fs::remove_dir_all(&dir);
    if total != words.len() as i64 {
        return Err(format!("counted {total} words, fed {}", words.len()).into());
    }
    Ok(())
}
