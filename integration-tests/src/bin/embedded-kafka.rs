//! Hosts librdkafka's mock cluster in its own process, so that a worker under test can
//! be killed and restarted against a broker that outlives it.
//!
//! `embedded-kafka [topic:partitions ...]` prints `BOOTSTRAP=<servers>` once the topics
//! exist, then serves until SIGTERM/SIGINT or until its standard input closes (so it
//! never outlives the test that started it).

use std::io::{BufRead, Write};

use flows::kafka::EmbeddedKafka;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kafka = EmbeddedKafka::start(1)?;
    for spec in std::env::args().skip(1) {
        let (topic, partitions) = spec
            .split_once(':')
            .ok_or_else(|| format!("expected topic:partitions, got {spec:?}"))?;
        kafka.create_topic(topic, partitions.parse()?, 1)?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "BOOTSTRAP={}", kafka.bootstrap_servers())?;
    stdout.flush()?;
    drop(stdout);
    // Serve until the parent closes our stdin (or kills us).
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    Ok(())
}
