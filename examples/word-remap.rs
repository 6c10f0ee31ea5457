//! Word remap, a stateless pipeline: every word of topic `words` is re-keyed by its
//! first letter onto `words-by-letter` (so one consumer per letter range can follow
//! them), and words shorter than three letters are filtered out.
//!
//! `cargo run --example word-remap` runs on the embedded default and prints what it
//! published; with `FLOWS_BROKERS` it is a long-lived worker (see `word-count.rs`).

mod common;

use flows::prelude::*;

fn remap() -> Pipeline {
    let by_letter = StatelessFunction::explode(
        Topic::new("words", Utf8, Utf8),
        Topic::new("words-by-letter", Utf8, Utf8),
        |m| {
            Ok(match m.value.chars().next() {
                Some(first) if m.value.chars().count() >= 3 => {
                    vec![Record::new(first.to_string(), m.value)]
                }
                _ => Vec::new(),
            })
        },
    );
    Pipeline::stateless("word-remap", by_letter)
        .on_error(ErrorPolicy::dead_letter("words-dead-letter"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let setup = common::Setup::new(&[
        ("words", 4),
        ("words-by-letter", 4),
        ("words-dead-letter", 1),
    ])?;
    if !setup.is_embedded() {
        setup.run(&[remap()], 0, u64::MAX).await?;
        return Ok(());
    }
    let words = setup.feed_sample_words().await?;
    let kept = words.iter().filter(|w| w.chars().count() >= 3).count() as u64;

    let printer = StatelessFunction::for_each(Topic::new("words-by-letter", Utf8, Utf8), |m| {
        println!("  {} <- {}", m.key, m.value);
        Ok(())
    });
    let pipelines = [remap(), Pipeline::stateless("word-remap-printer", printer)];
    setup.run(&pipelines, 1, kept).await?;
    println!("remapped {kept} of {} words by first letter", words.len());
    Ok(())
}
