//! Word join: counts from topic `words` and definitions from topic `definitions`, both
//! keyed by word, joined into one state per word; every change publishes a word card
//! to `word-cards`.
//!
//! As in the seed, a join is two pipelines: `word-join-rekey` copies both sources into
//! the intermediate topic `word-join-intermediate` keyed by persistence id, and
//! `word-join` applies one handler per source topic to the shared state. Deploy them
//! together or apart (`FLOWS_INSTANCE=word-join-rekey` / `word-join`).
//!
//! `cargo run --example word-join` runs on the embedded default; with `FLOWS_BROKERS`
//! it is a long-lived worker (see `word-count.rs`; states in table `FLOWS_STATE_TABLE`,
//! default `word_cards`).

mod common;

use flows::prelude::*;
use serde::{Deserialize, Serialize};

/// What is known about a word.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct WordCard {
    count: i64,
    definition: Option<String>,
}

fn card_text(word: &str, card: &WordCard) -> String {
    let definition = card.definition.as_deref().unwrap_or("(no definition yet)");
    format!("{word} x{}: {definition}", card.count)
}

fn join() -> Join {
    let cards = Topic::new("word-cards", Utf8, Utf8);
    let function = StatefulFunction::new(Json::<WordCard>::new())
        .starting_from_default()
        .one_to_one(
            Topic::new("words", Utf8, Utf8),
            cards.clone(),
            PersistenceIdFn::key(),
            |card: &WordCard, word| {
                let mut card = card.clone();
                card.count += 1;
                let text = card_text(&word.key, &card);
                Ok((card, Record::new(word.key, text)))
            },
        )
        .one_to_one(
            Topic::new("definitions", Utf8, Utf8),
            cards,
            PersistenceIdFn::key(),
            |card: &WordCard, definition| {
                let mut card = card.clone();
                card.definition = Some(definition.value);
                let text = card_text(&definition.key, &card);
                Ok((card, Record::new(definition.key, text)))
            },
        );
    Join::new("word-join", "word-join-intermediate", function)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let setup = common::Setup::new(&[
        ("words", 4),
        ("definitions", 2),
        ("word-join-intermediate", 8),
        ("word-cards", 4),
        ("word-join-dead-letter", 1),
    ])?;
    let table = std::env::var("FLOWS_STATE_TABLE").unwrap_or_else(|_| "word_cards".into());
    let store = flows::open_state_store(&setup.store_url, &table).await?;
    let join = join();
    let dead_letter = ErrorPolicy::dead_letter("word-join-dead-letter");
    let mut pipelines = vec![
        join.rekey_pipeline().on_error(dead_letter.clone()),
        join.stateful_pipeline(store).on_error(dead_letter),
    ];
    if !setup.is_embedded() {
        setup.run(&pipelines, 0, u64::MAX).await?;
        return Ok(());
    }

    let words = common::words_of(include_str!("sample.txt"));
    let word_topic = Topic::new("words", Utf8, Utf8);
    let definition_topic = Topic::new("definitions", Utf8, Utf8);
    let definitions = [
        (
            "times",
            "plural of time: an instance of something happening",
        ),
        ("age", "a distinctive period of history"),
        ("season", "one of the four divisions of the year"),
        ("epoch", "a period of time marked by notable events"),
    ];
    let mut records = Vec::new();
    for (i, word) in words.iter().enumerate() {
        records.push(word_topic.encode(Record::new(word.clone(), word.clone()), None)?);
        if let Some((w, d)) = definitions.get(i / 20).filter(|_| i % 20 == 0) {
            records.push(
                definition_topic.encode(Record::new((*w).to_owned(), (*d).to_owned()), None)?,
            );
        }
    }
    setup.feed(&records).await?;
    let total = records.len() as u64;

    let printer = StatelessFunction::for_each(Topic::new("word-cards", Utf8, Utf8), |m| {
        println!("  {}", m.value);
        Ok(())
    });
    pipelines.push(Pipeline::stateless("word-join-printer", printer));
    setup.run(&pipelines, 2, total).await?;
    println!(
        "joined {} words and {} definitions",
        words.len(),
        definitions.len()
    );
    Ok(())
}

/// The join through flows' test driver: both halves, every crash point replayed.
#[cfg(test)]
mod tests {
    use super::*;
    use flows::MemoryStateRepository;
    use flows::testing::{TestDriver, TestDriverError, assert_replays_exactly};

    fn pipelines() -> Vec<Pipeline> {
        let join = join();
        vec![
            join.rekey_pipeline(),
            join.stateful_pipeline(MemoryStateRepository::new()),
        ]
    }

    fn feed(driver: &mut TestDriver) -> Result<(), TestDriverError> {
        let words = Topic::new("words", Utf8, Utf8);
        let definitions = Topic::new("definitions", Utf8, Utf8);
        driver.pipe(&words, Record::new("fox".into(), "fox".into()))?;
        driver.pipe(
            &definitions,
            Record::new("fox".into(), "a quick animal".into()),
        )?;
        driver.pipe(&words, Record::new("fox".into(), "fox".into()))?;
        Ok(())
    }

    #[tokio::test]
    async fn a_card_joins_counts_and_definitions_through_every_crash() {
        let mut driver = TestDriver::new(pipelines());
        feed(&mut driver).unwrap();
        driver.run().await.unwrap();
        let cards = driver.read(&Topic::new("word-cards", Utf8, Utf8)).unwrap();
        let last = cards.last().map(|m| m.value.as_str());
        assert_eq!(last, Some("fox x2: a quick animal"));
        assert_replays_exactly(pipelines, 1, feed).await;
    }
}
