//! Starting, stopping and selecting pipelines.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::oneshot;

use crate::config::{KafkaConfig, client_error, numeric_property};
use crate::consumer::{EngineContext, Shared, longest_revoke, poll_loop};
use crate::error::EngineError;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::pipeline::Pipeline;
use crate::producer::OutputProducer;
use crate::worker::WorkerContext;

/// Runs pipelines against one Kafka cluster.
///
/// Each started pipeline gets its own consumer (group `{prefix}{name}`), its own
/// producer, a consumer thread, and one task per assigned partition. Scale out by
/// starting the same pipeline in more processes: Kafka's group protocol spreads the
/// partitions.
#[derive(Clone, Debug)]
pub struct Engine {
    config: KafkaConfig,
}

impl Engine {
    /// An engine with `config`.
    pub fn new(config: KafkaConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Starts `pipeline` in the background of the current tokio runtime.
    pub fn start(&self, pipeline: &Pipeline) -> Result<RunningPipeline, EngineError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            EngineError::Configuration("Engine::start must be called inside a tokio runtime".into())
        })?;
        let metrics = Metrics::new();
        let mut producer_config = self.config.clone();
        producer_config
            .producer_overrides
            .extend(pipeline.producer_overrides.iter().cloned());
        let producer = OutputProducer::new(&producer_config)?;
        let properties = self
            .config
            .consumer_properties(&self.config.group_id(&pipeline.name));
        check_revoke_fits_rebalance(
            &properties,
            self.config.drain_timeout,
            producer.delivery_timeout(),
        )?;
        let worker = Arc::new(WorkerContext {
            pipeline: pipeline.clone(),
            producer,
            batch: self.config.batch.clone(),
            backoff: self.config.backoff,
            metrics: metrics.clone(),
            cache: pipeline.new_state_cache(),
        });
        let shared = Arc::new(Shared::new(worker, runtime, self.config.drain_timeout));

        let mut client = ClientConfig::new();
        for (key, value) in &properties {
            client.set(key, value);
        }
        let consumer: Arc<BaseConsumer<EngineContext>> = Arc::new(
            client
                .create_with_context(EngineContext {
                    shared: Arc::clone(&shared),
                })
                .map_err(|e| client_error(e, &properties))?,
        );
        shared.set_consumer(&consumer);
        let topics = pipeline.input_topics();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        tracing::info!(pipeline = %pipeline.name, inputs = ?topics, group = %self.config.group_id(&pipeline.name), "pipeline started");

        let (done_tx, done_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("flows-{}", pipeline.name))
            .spawn(move || {
                let result = poll_loop(consumer, thread_shared);
                let _ = done_tx.send(result);
            })
            .map_err(|e| EngineError::Internal(format!("cannot start consumer thread: {e}")))?;
        let handle = PipelineHandle {
            name: pipeline.name.clone(),
            group: self.config.group_id(&pipeline.name),
            kind: pipeline.kind(),
            inputs: topics,
            outputs: pipeline.output_topics(),
            dead_letter: pipeline.dead_letter_topic().map(str::to_owned),
            batch: self.config.batch.clone(),
            metrics,
            shared,
            stage: Arc::clone(&pipeline.stage),
        };
        Ok(RunningPipeline {
            handle,
            done: Some(done_rx),
        })
    }

    /// Runs `pipelines` until SIGINT or SIGTERM (or until one fails), then stops them
    /// all gracefully. Returns the first failure.
    pub async fn run_until_signal(&self, pipelines: &[Pipeline]) -> Result<(), EngineError> {
        let mut running = Vec::with_capacity(pipelines.len());
        for pipeline in pipelines {
            running.push(self.start(pipeline)?);
        }
        let failed = tokio::select! {
            () = shutdown_signal() => None,
            index = first_stopped(&running) => Some(index),
        };
        if failed.is_none() {
            tracing::info!("shutdown requested");
        }
        for pipeline in &running {
            pipeline.stop();
        }
        let mut first_error = None;
        for pipeline in running {
            if let Err(error) = pipeline.wait().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn first_stopped(running: &[RunningPipeline]) -> usize {
    loop {
        if let Some(index) = running.iter().position(RunningPipeline::is_stopping) {
            return index;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// librdkafka's default `max.poll.interval.ms`, which is also the rebalance timeout the
/// consumer announces to its group.
const DEFAULT_REBALANCE_TIMEOUT: Duration = Duration::from_secs(300);

/// Refuses a configuration under which a revoke may outlast the group's rebalance
/// timeout (`max.poll.interval.ms`): the group would drop the member while an abandoned
/// batch's outputs are still queued in its producer, and they could land after the next
/// owner's, leaving an older value last for their keys.
fn check_revoke_fits_rebalance(
    consumer_properties: &[(String, String)],
    drain_timeout: Duration,
    delivery_timeout: Option<Duration>,
) -> Result<(), EngineError> {
    let rebalance_timeout = numeric_property(consumer_properties, &["max.poll.interval.ms"])
        .map_or(DEFAULT_REBALANCE_TIMEOUT, Duration::from_millis);
    let longest = longest_revoke(drain_timeout, delivery_timeout);
    if longest < rebalance_timeout {
        return Ok(());
    }
    Err(EngineError::Configuration(format!(
        "a revoke may block the consumer group for {longest:?} (drain_timeout {drain_timeout:?}, \
         then up to the producer's message.timeout.ms {} for an abandoned batch's outputs to \
         settle), not less than max.poll.interval.ms ({rebalance_timeout:?}): the group would \
         drop this member while those outputs can still land after the next owner's. Lower \
         drain_timeout or message.timeout.ms, or raise max.poll.interval.ms",
        delivery_timeout.map_or_else(|| "(never)".to_owned(), |t| format!("{t:?}"))
    )))
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the engine");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What an observer sees of a running pipeline (see [`RunningPipeline::handle`]).
#[derive(Clone)]
pub struct PipelineHandle {
    name: String,
    group: String,
    kind: &'static str,
    inputs: Vec<String>,
    outputs: Vec<String>,
    dead_letter: Option<String>,
    batch: crate::BatchConfig,
    metrics: Metrics,
    shared: Arc<Shared>,
    stage: Arc<dyn crate::pipeline::Stage>,
}

impl std::fmt::Debug for PipelineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineHandle")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("group", &self.group)
            .finish()
    }
}

impl PipelineHandle {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// `stateless`, `stateful` or `materialise`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The topics it reads, sorted.
    pub fn input_topics(&self) -> &[String] {
        &self.inputs
    }

    /// The topics it writes, as its function declares them.
    pub fn output_topics(&self) -> &[String] {
        &self.outputs
    }

    /// The dead-letter topic of its error policy, if any.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter.as_deref()
    }

    /// Its batch limits.
    pub fn batch(&self) -> &crate::BatchConfig {
        &self.batch
    }

    /// Live counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether a stop was requested or the pipeline failed.
    pub fn is_stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Where each assigned partition stands (committed offset, end, lag), as of
    /// librdkafka's last statistics; empty until the first ones arrive.
    pub fn partitions(&self) -> Vec<crate::PartitionStats> {
        self.shared
            .partition_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The state of `id` as the store holds it now (one read, never a scan); `None`
    /// when the pipeline keeps no state (stateless, materialise).
    pub async fn read_state(
        &self,
        id: &flows_core::PersistenceId,
    ) -> Option<Result<flows_core::RawState, flows_core::RepositoryError>> {
        self.stage.read_state(id).await
    }
}

/// A pipeline running in the background. Dropping it requests a stop without waiting.
pub struct RunningPipeline {
    /// What it is, its counters and its stop flag.
    handle: PipelineHandle,
    done: Option<oneshot::Receiver<Result<(), EngineError>>>,
}

impl std::fmt::Debug for RunningPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPipeline")
            .field("name", &self.handle.name)
            .field("metrics", &self.handle.metrics.snapshot())
            .finish()
    }
}

impl RunningPipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        self.handle.name()
    }

    /// Live counters.
    pub fn metrics(&self) -> &Metrics {
        self.handle.metrics()
    }

    /// A cheap, cloneable view of this pipeline for observers (the HTTP face, a
    /// supervisor): what it is, its counters and whether it is stopping.
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Requests a graceful stop: in-flight batches finish (within the drain timeout),
    /// their offsets are committed, the consumer leaves the group.
    pub fn stop(&self) {
        self.handle.shared.stop.store(true, Ordering::Release);
        self.metrics().changed();
    }

    /// Waits, without polling, until `condition` holds for this pipeline's counters
    /// (checked after every batch, rebalance and stop); `None` if the pipeline stops
    /// first (a stop was requested, or it failed: [`wait`](Self::wait) says why).
    ///
    /// ```no_run
    /// # async fn run(running: flows_kafka::RunningPipeline) {
    /// let done = running.wait_for(|counters| counters.committed >= 1_000).await;
    /// assert!(done.is_some(), "the pipeline stopped before committing 1,000 messages");
    /// # }
    /// ```
    pub async fn wait_for(
        &self,
        mut condition: impl FnMut(&MetricsSnapshot) -> bool,
    ) -> Option<MetricsSnapshot> {
        let snapshot = self
            .metrics()
            .wait_for(|s| condition(s) || self.is_stopping())
            .await;
        condition(&snapshot).then_some(snapshot)
    }

    /// Whether a stop was requested or the pipeline failed.
    pub fn is_stopping(&self) -> bool {
        self.handle.is_stopping()
    }

    /// Waits until the pipeline has stopped; returns the error that stopped it, if any.
    pub async fn wait(mut self) -> Result<(), EngineError> {
        match self.done.take() {
            Some(done) => done.await.unwrap_or_else(|_| {
                Err(EngineError::Internal(
                    "the consumer thread ended without a result".into(),
                ))
            }),
            None => Ok(()),
        }
    }

    /// Stops and waits.
    pub async fn shutdown(self) -> Result<(), EngineError> {
        self.stop();
        self.wait().await
    }
}

impl Drop for RunningPipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Picks the pipelines a process runs: all of them when `instance` is `None`, empty or
/// `"all"`, otherwise the one with that name (the seed's `INSTANCE` switch, so one
/// binary deploys as many workers). Read it from `FLOWS_INSTANCE` with
/// [`select_from_env`].
pub fn select<'a>(
    pipelines: &'a [Pipeline],
    instance: Option<&str>,
) -> Result<Vec<&'a Pipeline>, EngineError> {
    match instance.map(str::trim) {
        None | Some("") | Some("all") => Ok(pipelines.iter().collect()),
        Some(name) => pipelines
            .iter()
            .find(|p| p.name == name)
            .map(|p| vec![p])
            .ok_or_else(|| {
                let known: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
                EngineError::Configuration(format!(
                    "no pipeline named {name:?}; known: {}",
                    known.join(", ")
                ))
            }),
    }
}

/// [`select`] with the instance name from the `FLOWS_INSTANCE` environment variable.
pub fn select_from_env(pipelines: &[Pipeline]) -> Result<Vec<Pipeline>, EngineError> {
    let instance = std::env::var("FLOWS_INSTANCE").ok();
    Ok(select(pipelines, instance.as_deref())?
        .into_iter()
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_core::function::StatelessFunction;
    use flows_core::{Bytes, Topic};

    fn pipeline(name: &str) -> Pipeline {
        Pipeline::stateless(
            name,
            StatelessFunction::filter(Topic::new("in", Bytes, Bytes), "out", |_| true),
        )
    }

    #[test]
    fn instances_are_selected_by_name() {
        let all = [pipeline("a"), pipeline("b")];
        assert_eq!(select(&all, None).unwrap().len(), 2);
        assert_eq!(select(&all, Some("all")).unwrap().len(), 2);
        assert_eq!(select(&all, Some(" b ")).unwrap()[0].name(), "b");
        let error = select(&all, Some("c")).unwrap_err().to_string();
        assert!(error.contains("known: a, b"), "{error}");
    }

    /// The check a revoke's longest wait is held to, with the producer's timeout as the
    /// engine reads it.
    fn check(config: &KafkaConfig) -> Result<(), EngineError> {
        let producer = OutputProducer::new(config).unwrap();
        check_revoke_fits_rebalance(
            &config.consumer_properties("group"),
            config.drain_timeout,
            producer.delivery_timeout(),
        )
    }

    #[test]
    fn the_default_revoke_fits_the_default_rebalance_timeout() {
        let config = KafkaConfig::new("127.0.0.1:1");
        check(&config).unwrap();
        // The join's re-key producer never times records out: its wait is the drain's.
        check(&config.clone().producer_property("message.timeout.ms", "0")).unwrap();
    }

    #[test]
    fn a_revoke_that_could_outlast_the_rebalance_timeout_is_refused() {
        // librdkafka's own producer default: 30 s drain + 300 s settle > 300 s.
        let config =
            KafkaConfig::new("127.0.0.1:1").producer_property("message.timeout.ms", "300000");
        let error = check(&config).unwrap_err().to_string();
        assert!(error.contains("max.poll.interval.ms"), "{error}");
        assert!(error.contains("message.timeout.ms"), "{error}");
        // Either side can make it fit.
        check(
            &config
                .clone()
                .consumer_property("max.poll.interval.ms", "600000"),
        )
        .unwrap();
        check(
            &config
                .clone()
                .drain_timeout(Duration::from_secs(1))
                .producer_property("delivery.timeout.ms", "60000"),
        )
        .unwrap();
        let slow_drain = KafkaConfig::new("127.0.0.1:1").drain_timeout(Duration::from_secs(200));
        assert!(check(&slow_drain).is_err());
    }
}
