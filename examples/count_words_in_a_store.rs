//! A stateful word count without Kafka: the same function and store an engine drives,
//! with replay deduplication. Run: `cargo run --example count_words_in_a_store`.

use flows::RawMessage;
use flows::function::{ErrorAction, StatefulProcessor, fold};
use flows::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Declare the function: per-word state is the count, each word emits its new count.
    let count = StatefulFunction::new(Json::<i64>::new())
        .starting_from_default()
        .one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("word-counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::key(),
            |count: &i64, word| Ok((count + 1, Record::new(word.key, count + 1))),
        );
    let store = flows::open_state_store("sqlite::memory:", "word_counts").await?;

    let words = ["fox", "dog", "fox", "fox"];
    let messages: Vec<RawMessage> = words
        .iter()
        .enumerate()
        .map(|(offset, w)| {
            RawMessage::raw(
                "words",
                0,
                offset as i64,
                Some(w.as_bytes()),
                Some(w.as_bytes()),
            )
        })
        .collect();

    // Twice: the second pass is a replay (say, after a crash) and changes nothing.
    for pass in ["first pass", "replay"] {
        for message in &messages {
            let id = count.persistence_id(message)?;
            let state = store.get(&id).await?;
            let outcome = fold(&count, state, &[message], |_, _| ErrorAction::Abort)?;
            if let Some(state) = &outcome.write {
                store.upsert(state).await?;
            }
            for output in outcome.outputs() {
                let value = String::from_utf8_lossy(output.value.as_deref().unwrap_or_default());
                println!("{pass}: {id} -> {value} ({:?})", outcome.messages[0].kind);
            }
        }
    }
    let counts = StateReader::new(store, Json::<i64>::new());
    let fox = counts.get(&flows::PersistenceId::new("fox")?).await?;
    let fox_count = fox.content.unwrap_or(0);
    assert_eq!(fox_count, 3, "the replay must not count again");
    println!(
        "fox counted {fox_count} times, state version {}",
        fox.version
    );
    Ok(())
}
