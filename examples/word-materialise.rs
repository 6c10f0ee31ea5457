//! Word materialise: the counts published on `word-counts` upserted, in batches, into
//! the table `word_count_table (word TEXT PRIMARY KEY, count BIGINT)`.
//!
//! With `FLOWS_STORE=postgres://…` (feature `postgres`) the table is in PostgreSQL, as
//! in the seed; on the embedded default (`cargo run --example word-materialise`) it is
//! SQLite, and the demo also runs the word count that feeds `word-counts`, then prints
//! the table. With `FLOWS_BROKERS` it is a long-lived worker (see `word-count.rs`;
//! `FLOWS_INSTANCE=word-materialise` runs only the materialisation).

mod common;

use std::sync::Arc;

use flows::PrimaryKey;
use flows::prelude::*;

/// One row of the materialised table.
#[derive(Clone, Debug, PartialEq, Row)]
#[flows(table = "word_count_table")]
struct WordCountRow {
    #[flows(key)]
    word: String,
    count: i64,
}

fn materialise(table: Arc<dyn UpsertRepository<WordCountRow>>) -> Pipeline {
    Pipeline::materialise(
        "word-materialise",
        Topic::new("word-counts", Utf8, Json::<i64>::new()),
        table,
        |m| {
            Ok(vec![RowChange::Upsert(WordCountRow {
                word: m.key,
                count: m.value,
            })])
        },
    )
    .on_error(ErrorPolicy::dead_letter("word-counts-dead-letter"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let setup = common::Setup::new(&[
        ("words", 4),
        ("word-counts", 4),
        ("word-counts-dead-letter", 1),
        ("words-dead-letter", 1),
    ])?;
    let table = flows::open_upsert_repository::<WordCountRow>(&setup.store_url).await?;
    if !setup.is_embedded() {
        setup.run(&[materialise(table)], 0, u64::MAX).await?;
        return Ok(());
    }

    let words = setup.feed_sample_words().await?;
    let states = flows::open_state_store(&setup.store_url, "word_counts").await?;
    let pipelines = [common::word_count(states), materialise(Arc::clone(&table))];
    let total = words.len() as u64;
    setup.run(&pipelines, 1, total).await?;

    let mut distinct = words.clone();
    distinct.sort();
    distinct.dedup();
    let keys: Vec<PrimaryKey> = distinct.iter().cloned().map(PrimaryKey::from).collect();
    let mut rows: Vec<WordCountRow> = table.get_all(&keys).await?.into_iter().flatten().collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.word.cmp(&b.word)));
    println!("word_count_table ({} rows):", rows.len());
    for row in rows.iter().take(15) {
        println!("  {:<16} {}", row.word, row.count);
    }
    if rows.len() > 15 {
        println!("  … and {} more", rows.len() - 15);
    }
    Ok(())
}

/// The materialisation through flows' test driver: rows written at least once, the
/// last count of each word kept, through every crash point.
#[cfg(test)]
mod tests {
    use super::*;
    use flows::MemoryUpsertRepository;
    use flows::testing::{TestDriver, TestDriverError, assert_replays_exactly};

    fn feed(driver: &mut TestDriver) -> Result<(), TestDriverError> {
        let counts = Topic::new("word-counts", Utf8, Json::<i64>::new());
        for (word, count) in [("fox", 1), ("hen", 1), ("fox", 2)] {
            driver.pipe(&counts, Record::new(word.to_owned(), count))?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_table_keeps_the_last_count_of_each_word() {
        let table = Arc::new(MemoryUpsertRepository::<WordCountRow>::new());
        let mut driver = TestDriver::new([materialise(table.clone())]);
        feed(&mut driver).unwrap();
        driver.run().await.unwrap();
        let fox = table
            .get_all(&[flows::PrimaryKey::from("fox".to_owned())])
            .await
            .unwrap();
        assert_eq!(fox[0].as_ref().map(|row| row.count), Some(2));
        let fresh = || vec![materialise(Arc::new(MemoryUpsertRepository::new()))];
        assert_replays_exactly(fresh, 1, feed).await;
    }
}
