//! What the examples share: running on the embedded default (in-process Kafka mock
//! cluster, SQLite in a temporary file) unless `FLOWS_BROKERS` points at a real cluster.

#![allow(dead_code)] // each example uses part of this

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flows::EncodedRecord;
use flows::kafka::{EmbeddedKafka, EngineError, OutputProducer};
use flows::prelude::*;
use flows::telemetry::{Telemetry, TelemetryGuard};

/// Where an example runs.
pub struct Setup {
    /// The Kafka configuration (embedded or from `FLOWS_*`).
    pub config: KafkaConfig,
    /// The store URL (`FLOWS_STORE`, or SQLite in a temporary directory).
    pub store_url: String,
    embedded: Option<(EmbeddedKafka, PathBuf)>,
    /// Logs, and spans over OTLP with the `otel` feature and `OTEL_EXPORTER_OTLP_ENDPOINT`.
    _telemetry: TelemetryGuard,
}

impl Setup {
    /// Reads `FLOWS_BROKERS`/`FLOWS_STORE`; without them starts the mock cluster with
    /// `topics` (name, partitions) and a SQLite file. Also sets up logging.
    pub fn new(topics: &[(&str, i32)]) -> Result<Self, Box<dyn std::error::Error>> {
        let config = KafkaConfig::from_env()?;
        // A worker logs its lifecycle; a demo prints results, so it logs only problems.
        let default_filter = if config.is_some() { "info" } else { "warn" };
        let telemetry = Telemetry::from_env()
            .default_filter(default_filter)
            .init()?;
        if let Some(config) = config {
            let store_url = std::env::var("FLOWS_STORE")
                .unwrap_or_else(|_| "sqlite://flows-example.sqlite".into());
            return Ok(Self {
                config,
                store_url,
                embedded: None,
                _telemetry: telemetry,
            });
        }
        let kafka = EmbeddedKafka::start(1)?;
        for (topic, partitions) in topics {
            kafka.create_topic(topic, *partitions, 1)?;
        }
        let dir = std::env::temp_dir().join(format!("flows-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            config: KafkaConfig::new(kafka.bootstrap_servers()),
            store_url: format!("sqlite://{}", dir.join("state.sqlite").display()),
            embedded: Some((kafka, dir)),
            _telemetry: telemetry,
        })
    }

    /// Whether this is the self-contained demo (no `FLOWS_BROKERS`).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Publishes `records` and waits for their acknowledgements.
    pub async fn feed(&self, records: &[EncodedRecord]) -> Result<(), EngineError> {
        OutputProducer::new(&self.config)?.send_all(records).await
    }

    /// Publishes every word of the sample text to topic `words` (key and value = the
    /// word) and returns them, in order.
    pub async fn feed_sample_words(&self) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let words = words_of(include_str!("../sample.txt"));
        let topic = Topic::new("words", Utf8, Utf8);
        let records = words
            .iter()
            .map(|w| topic.encode(Record::new(w.clone(), w.clone()), None))
            .collect::<Result<Vec<_>, _>>()?;
        self.feed(&records).await?;
        Ok(words)
    }

    /// Embedded: starts `pipelines`, waits until `done` says the work is finished (or a
    /// pipeline stops, or two minutes pass), stops them. Real cluster: runs the
    /// pipelines chosen by `FLOWS_INSTANCE` until SIGINT/SIGTERM.
    /// Runs `pipelines`: on the embedded default until pipeline number `watched` has
    /// committed `total` messages (at most two minutes), else until SIGINT or SIGTERM.
    pub async fn run(
        &self,
        pipelines: &[Pipeline],
        watched: usize,
        total: u64,
    ) -> Result<(), EngineError> {
        let engine = Engine::new(self.config.clone());
        if !self.is_embedded() {
            let selected = flows::kafka::select_from_env(pipelines)?;
            return engine.run_until_signal(&selected).await;
        }
        let mut running = Vec::new();
        for pipeline in pipelines {
            running.push(engine.start(pipeline)?);
        }
        let done = running[watched].wait_for(|counters| counters.committed >= total);
        // A pipeline that stops early ends the wait; `wait` below says why.
        let _ = tokio::time::timeout(Duration::from_secs(120), done).await;
        for pipeline in &running {
            pipeline.stop();
        }
        for pipeline in running {
            pipeline.wait().await?;
        }
        Ok(())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some((_, dir)) = &self.embedded {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The main job: per word (the key of topic `words`), a count kept in `store`; every
/// change is published to `word-counts` (key = word, value = the count as JSON).
/// Messages that cannot be processed go to `words-dead-letter`.
pub fn word_count(store: Arc<dyn SingleStateRepository>) -> Pipeline {
    let count = StatefulFunction::new(Json::<i64>::new())
        .starting_from_default()
        .one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("word-counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::key(),
            |count: &i64, word| Ok((count + 1, Record::new(word.key, count + 1))),
        );
    Pipeline::stateful("word-count", count, store)
        .on_error(ErrorPolicy::dead_letter("words-dead-letter"))
}

/// The words of `text`, lowercased, without punctuation.
pub fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}
