//! `/metrics`: the engine's counters, histograms and partition positions, and the
//! ingest routes' requests, encoded by `prometheus-client`.
//!
//! The engine keeps its own lock-free counters (it must not depend on an exporter);
//! [`EngineCollector`] reads them at scrape time, so a scrape costs one snapshot per
//! pipeline and nothing between scrapes. Labels are pipeline, topic, partition, route
//! and status: never a message key or id.

use std::fmt::Error;

use flows_kafka::{HistogramSnapshot, Histograms, MetricsSnapshot, PipelineHandle};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The labels of an ingest request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The ingest route's name.
    pub(crate) route: String,
    /// The response's status code.
    pub(crate) status: u16,
}

/// The registry a server scrapes, and the ingest request counter it updates.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    registry: Registry,
    /// Ingest requests answered, by route and status.
    pub(crate) requests: Family<RequestLabels, Counter>,
}

impl ServerMetrics {
    pub(crate) fn new(pipelines: Vec<PipelineHandle>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "flows_http_ingest_requests",
            "Ingest requests answered, by route and status",
            requests.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { pipelines }));
        Self { registry, requests }
    }

    /// The metrics in the OpenMetrics text format (ends with `# EOF`).
    pub(crate) fn openmetrics(&self) -> Result<String, Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// The metrics in the Prometheus text format 0.0.4, for scrapers that do not ask for
    /// OpenMetrics.
    pub(crate) fn prometheus(&self) -> Result<String, Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads every pipeline's metrics at scrape time.
#[derive(Debug)]
struct EngineCollector {
    pipelines: Vec<PipelineHandle>,
}

/// A counter's name (without `_total`, which the encoder adds), help and value.
type CounterOf = (&'static str, &'static str, fn(&MetricsSnapshot) -> u64);
/// A histogram's name, help and which of a pipeline's it is.
type HistogramOf = (
    &'static str,
    &'static str,
    fn(&Histograms) -> &HistogramSnapshot,
);

const COUNTERS: [CounterOf; 16] = [
    (
        "flows_messages_consumed",
        "Messages received from Kafka",
        |s| s.consumed,
    ),
    (
        "flows_messages_committed",
        "Messages whose batch completed",
        |s| s.committed,
    ),
    (
        "flows_records_published",
        "Output records acknowledged",
        |s| s.published,
    ),
    ("flows_batches", "Batches completed", |s| s.batches),
    (
        "flows_dead_lettered",
        "Messages sent to the dead-letter topic",
        |s| s.dead_lettered,
    ),
    (
        "flows_transient_retries",
        "Retries after a store or broker failure",
        |s| s.transient_retries,
    ),
    (
        "flows_function_retries",
        "Batch re-runs under a retrying error policy",
        |s| s.function_retries,
    ),
    (
        "flows_abandoned_batches",
        "Batches abandoned on revoke or shutdown",
        |s| s.abandoned_batches,
    ),
    (
        "flows_fenced_batches",
        "Batches dropped after losing the partition",
        |s| s.conflicts_fenced,
    ),
    ("flows_rebalances", "Rebalance events", |s| s.rebalances),
    (
        "flows_states_read",
        "States read from the store (cache misses)",
        |s| s.states_read,
    ),
    (
        "flows_state_cache_hits",
        "States served by the cache of recently written states",
        |s| s.state_cache_hits,
    ),
    (
        "flows_batches_split",
        "Batches processed in parts (a state outgrowing the store, or write conflicts)",
        |s| s.batches_split,
    ),
    (
        "flows_unpublishable",
        "Outputs refused for good by the broker or client",
        |s| s.unpublishable,
    ),
    (
        "flows_commit_failures",
        "Offset commits that failed (and were retried)",
        |s| s.commit_failures,
    ),
    (
        "flows_state_conflicts",
        "State writes that conflicted with another writer (retried)",
        |s| s.state_conflicts,
    ),
];

const GAUGES: [CounterOf; 3] = [
    (
        "flows_partitions_stalled",
        "Partitions retrying a failure or awaiting acknowledgements for long",
        |s| s.stalled_partitions,
    ),
    (
        "flows_partitions_assigned",
        "Partitions assigned to this pipeline",
        |s| s.assigned_partitions,
    ),
    (
        "flows_messages_buffered",
        "Messages taken from Kafka and waiting for their partition's worker",
        |s| s.buffered_messages,
    ),
];

const HISTOGRAMS: [HistogramOf; 6] = [
    ("flows_batch_messages", "Messages per batch part", |h| {
        &h.batch_messages
    }),
    (
        "flows_batch_process_seconds",
        "Time processing a batch part: functions and store calls, retries included",
        |h| &h.process_seconds,
    ),
    (
        "flows_batch_fold_seconds",
        "Time in the pipeline's functions and the engine's own work on a batch part, store calls excluded",
        |h| &h.fold_seconds,
    ),
    (
        "flows_store_read_seconds",
        "Time reading a batch part's states from the store",
        |h| &h.store_read_seconds,
    ),
    (
        "flows_store_write_seconds",
        "Time writing a batch part's states or rows to the store",
        |h| &h.store_write_seconds,
    ),
    (
        "flows_batch_publish_seconds",
        "Time publishing a batch part's outputs until acknowledged",
        |h| &h.publish_seconds,
    ),
];

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let snapshots: Vec<_> = self
            .pipelines
            .iter()
            .map(|p| ([("pipeline", p.name())], p.metrics().snapshot()))
            .collect();
        for (name, help, value) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, snapshot) in &snapshots {
                family
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&value(snapshot), None)?;
            }
        }
        for (name, help, value) in GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, snapshot) in &snapshots {
                // Gauges are i64 in the encoder; counts of partitions fit.
                let value = i64::try_from(value(snapshot)).unwrap_or(i64::MAX);
                family.encode_family(labels)?.encode_gauge(&value)?;
            }
        }
        let histograms: Vec<_> = self
            .pipelines
            .iter()
            .map(|p| ([("pipeline", p.name())], p.metrics().histograms()))
            .collect();
        for (name, help, of) in HISTOGRAMS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, all) in &histograms {
                let h = of(all);
                family
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        let partitions: Vec<_> = self
            .pipelines
            .iter()
            .map(|p| (p.name(), p.partitions()))
            .collect();
        type PartitionValue = fn(&flows_kafka::PartitionStats) -> i64;
        let per_partition: [(&str, &str, PartitionValue); 2] = [
            (
                "flows_partition_lag",
                "Messages of an assigned partition not committed yet",
                |p| p.lag,
            ),
            (
                "flows_partition_committed_offset",
                "The group's committed offset of an assigned partition",
                |p| p.committed_offset,
            ),
        ];
        for (name, help, value) in per_partition {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (pipeline, stats) in &partitions {
                // -1: librdkafka does not know yet; no sample rather than a wrong one.
                for stat in stats.iter().filter(|p| value(p) >= 0) {
                    let partition = stat.partition.to_string();
                    let labels = [
                        ("pipeline", *pipeline),
                        ("topic", stat.topic.as_str()),
                        ("partition", partition.as_str()),
                    ];
                    family.encode_family(&labels)?.encode_gauge(&value(stat))?;
                }
            }
        }
        Ok(())
    }
}
