//! The dataflow a worker runs, as JSON and as a Mermaid diagram.

use flows_kafka::PipelineHandle;
use serde::Serialize;

use crate::IngestRoute;

/// One pipeline as `/topology` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineView {
    /// Its name.
    pub name: String,
    /// `stateless`, `stateful` or `materialise`.
    pub kind: &'static str,
    /// Its consumer group.
    pub group: String,
    /// The topics it reads.
    pub inputs: Vec<String>,
    /// The topics it writes, as its function declares them.
    pub outputs: Vec<String>,
    /// Its dead-letter topic, if its error policy has one.
    pub dead_letter_topic: Option<String>,
    /// Most messages per batch.
    pub batch_max_messages: usize,
    /// Most key and value bytes per batch.
    pub batch_max_bytes: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub batch_max_delay_ms: u128,
    /// Partitions assigned to it in this process right now.
    pub assigned_partitions: u64,
    /// Whether it is stopping (or stopped).
    pub stopping: bool,
}

impl From<&PipelineHandle> for PipelineView {
    fn from(handle: &PipelineHandle) -> Self {
        let batch = handle.batch();
        Self {
            name: handle.name().to_owned(),
            kind: handle.kind(),
            group: handle.group().to_owned(),
            inputs: handle.input_topics().to_vec(),
            outputs: handle.output_topics().to_vec(),
            dead_letter_topic: handle.dead_letter_topic().map(str::to_owned),
            batch_max_messages: batch.max_messages,
            batch_max_bytes: batch.max_bytes,
            batch_max_delay_ms: batch.max_delay.as_millis(),
            assigned_partitions: handle.metrics().snapshot().assigned_partitions,
            stopping: handle.is_stopping(),
        }
    }
}

/// An ingest route as `/topology` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct IngestView {
    /// `POST /{route}`.
    pub route: String,
    /// The topic it produces to.
    pub topic: String,
}

/// The whole dataflow of this worker.
#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    /// Its ingest routes.
    pub ingest: Vec<IngestView>,
    /// Its pipelines.
    pub pipelines: Vec<PipelineView>,
}

impl Topology {
    pub(crate) fn of(routes: &[IngestRoute], pipelines: &[PipelineHandle]) -> Self {
        Self {
            ingest: routes
                .iter()
                .map(|r| IngestView {
                    route: format!("/{}", r.name()),
                    topic: r.topic().to_owned(),
                })
                .collect(),
            pipelines: pipelines.iter().map(PipelineView::from).collect(),
        }
    }

    /// A Mermaid flowchart: ingest routes and topics feed pipelines, pipelines feed
    /// their output and dead-letter topics. Topics are rounded, pipelines are boxes.
    pub fn to_mermaid(&self) -> String {
        let id = |kind: &str, name: &str| {
            let safe: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("{kind}_{safe}")
        };
        let label = |name: &str| name.replace('"', "'");
        let mut lines = vec!["flowchart LR".to_owned()];
        let topic = |lines: &mut Vec<String>, name: &str| {
            let node = id("topic", name);
            lines.push(format!("    {node}([\"{}\"])", label(name)));
            node
        };
        for route in &self.ingest {
            let node = id("ingest", &route.route);
            lines.push(format!("    {node}[/\"POST {}\"/]", label(&route.route)));
            let to = topic(&mut lines, &route.topic);
            lines.push(format!("    {node} --> {to}"));
        }
        for pipeline in &self.pipelines {
            let node = id("pipeline", &pipeline.name);
            lines.push(format!(
                "    {node}[\"{} ({})\"]",
                label(&pipeline.name),
                pipeline.kind
            ));
            for input in &pipeline.inputs {
                let from = topic(&mut lines, input);
                lines.push(format!("    {from} --> {node}"));
            }
            for output in &pipeline.outputs {
                let to = topic(&mut lines, output);
                lines.push(format!("    {node} --> {to}"));
            }
            if let Some(dead_letter) = &pipeline.dead_letter_topic {
                let to = topic(&mut lines, dead_letter);
                lines.push(format!("    {node} -. dead letters .-> {to}"));
            }
        }
        // A topic declared twice is one node: Mermaid merges identical declarations.
        lines.join("\n") + "\n"
    }
}
