//! The README's first command: every example runs to completion on the embedded default
//! (in-process mock cluster + SQLite), with no servers and no configuration. The
//! word-count demo itself fails unless its final table adds up to the words it fed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use flows_integration_tests::example_binary;

fn run(example: &str) -> String {
    let output = Command::new(example_binary(example))
        .env_remove("FLOWS_BROKERS")
        .env_remove("FLOWS_STORE")
        .env_remove("FLOWS_INSTANCE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{example} failed ({:?}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn word_count_runs_on_the_embedded_default() {
    let stdout = run("word-count");
    assert!(
        stdout.contains("final counts (119 words, 58 distinct)"),
        "{stdout}"
    );
    assert!(stdout.contains("the              14"), "{stdout}");
}

#[test]
fn word_remap_runs_on_the_embedded_default() {
    let stdout = run("word-remap");
    assert!(
        stdout.contains("remapped 85 of 119 words by first letter"),
        "{stdout}"
    );
}

#[test]
fn word_join_runs_on_the_embedded_default() {
    let stdout = run("word-join");
    assert!(
        stdout.contains("age x2: a distinctive period of history"),
        "{stdout}"
    );
}

#[test]
fn word_materialise_runs_on_the_embedded_default() {
    let stdout = run("word-materialise");
    assert!(stdout.contains("word_count_table (58 rows)"), "{stdout}");
    assert!(stdout.contains("the              14"), "{stdout}");
}
