//! W3C trace context through the dataflow.
//!
//! Outputs inherit their input's `traceparent` and `tracestate`, so one trace follows a
//! request through every pipeline. Each batch runs in a `flows.batch` span (with
//! `flows.store.read` / `flows.store.write` spans inside); with the `otel` feature that
//! span links to the trace context of every traced input, as OpenTelemetry's messaging
//! conventions ask of batch processing: a trace backend shows which batch handled an
//! HTTP request's message, and the request's trace shows the batch.

use flows_core::{RawMessage, TopicPartition};

use crate::pipeline::Outputs;

/// The W3C trace context headers an output inherits from its input.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Copies each input's W3C trace context (`traceparent`, `tracestate`) onto the outputs
/// it caused that carry none of their own. Done at publication, from the input: a
/// replay re-emits stored outputs with the same headers added, byte for byte as the
/// first time.
pub(crate) fn propagate_trace_context(part: &[RawMessage], outputs: &mut Outputs) {
    let traced = |message: &RawMessage| message.headers.first("traceparent").is_some();
    if !part.iter().any(traced) {
        return;
    }
    for (record, &input) in outputs.records.iter_mut().zip(&outputs.inputs) {
        let Some(message) = part.get(input as usize) else {
            continue;
        };
        if !traced(message) || record.headers.first("traceparent").is_some() {
            continue;
        }
        for name in TRACE_HEADERS {
            if let Some(value) = message.headers.first(name) {
                record.headers.append(name, value.map(<[u8]>::to_vec));
            }
        }
    }
}

/// The span a batch of `tp` runs in: pipeline, topic, partition, offsets and size, named
/// as OpenTelemetry's messaging conventions name them where they have a name.
pub(crate) fn batch_span(
    pipeline: &str,
    tp: &TopicPartition,
    batch: &[RawMessage],
) -> tracing::Span {
    let first = batch.first().map_or(-1, |m| m.offset);
    let last = batch.last().map_or(-1, |m| m.offset);
    let span = tracing::info_span!(
        "flows.batch",
        pipeline,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %tp.topic,
        messaging.destination.partition.id = tp.partition,
        messaging.batch.message_count = batch.len() as i64,
        first_offset = first,
        last_offset = last,
    );
    #[cfg(feature = "otel")]
    otel::link_inputs(&span, batch);
    span
}

#[cfg(feature = "otel")]
pub(crate) mod otel {
    use flows_core::RawMessage;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// Most links one batch span carries: OpenTelemetry's default span link limit.
    const MAX_LINKS: usize = 128;

    /// Links `span` to the trace context of each traced message of `batch` (the first
    /// [`MAX_LINKS`]); nothing when no OpenTelemetry layer records the span.
    pub(crate) fn link_inputs(span: &tracing::Span, batch: &[RawMessage]) {
        if span.is_disabled() {
            return;
        }
        let contexts = batch
            .iter()
            .filter_map(|m| m.headers.first("traceparent").flatten())
            .filter_map(remote_span_context)
            .take(MAX_LINKS);
        for context in contexts {
            span.add_link(context);
        }
    }

    /// The span context a W3C `traceparent` header names (`00-{trace id}-{span id}-
    /// {flags}`), as a remote parent or link; `None` for a malformed or invalid one.
    ///
    /// ```
    /// let cx = flows_kafka::remote_span_context(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    ///     .expect("valid");
    /// assert!(cx.is_sampled() && cx.is_remote());
    /// assert_eq!(flows_kafka::traceparent(&cx), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    /// assert!(flows_kafka::remote_span_context(b"00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none());
    /// ```
    pub fn remote_span_context(traceparent: &[u8]) -> Option<SpanContext> {
        let text = std::str::from_utf8(traceparent).ok()?.trim();
        let mut parts = text.split('-');
        let version = parts.next()?;
        let (trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may append more.
        let valid_version = version.len() == 2
            && version != "ff"
            && u8::from_str_radix(version, 16).is_ok()
            && (version != "00" || parts.next().is_none());
        if !valid_version || trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
            return None;
        }
        let context = SpanContext::new(
            TraceId::from_hex(trace_id).ok()?,
            SpanId::from_hex(span_id).ok()?,
            TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        );
        context.is_valid().then_some(context)
    }

    /// The W3C `traceparent` header naming `context`.
    pub fn traceparent(context: &SpanContext) -> String {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::tests::record;

    /// An output inherits its input's trace context unless it carries its own; inputs
    /// without one leave their outputs alone.
    #[test]
    fn outputs_carry_their_inputs_trace_context() {
        let mut traced = RawMessage::raw("in", 0, 0, None, Some(&b"a"[..]));
        traced
            .headers
            .append("traceparent", Some(b"00-abc-def-01".to_vec()));
        traced.headers.append("tracestate", Some(b"k=v".to_vec()));
        let plain = RawMessage::raw("in", 0, 1, None, Some(&b"b"[..]));
        let mut own = record("own");
        own.headers
            .append("traceparent", Some(b"00-own-own-01".to_vec()));
        let mut outputs = Outputs::default();
        outputs.extend(0, [record("inherits"), own]);
        outputs.extend(1, [record("untouched")]);
        propagate_trace_context(&[traced, plain], &mut outputs);
        let header = |i: usize, name: &str| {
            outputs.records[i]
                .headers
                .first(name)
                .flatten()
                .map(<[u8]>::to_vec)
        };
        assert_eq!(header(0, "traceparent"), Some(b"00-abc-def-01".to_vec()));
        assert_eq!(header(0, "tracestate"), Some(b"k=v".to_vec()));
        assert_eq!(header(1, "traceparent"), Some(b"00-own-own-01".to_vec()));
        assert_eq!(header(2, "traceparent"), None);
    }

    #[cfg(feature = "otel")]
    #[test]
    fn traceparents_parse_strictly() {
        use otel::remote_span_context as parse;
        let good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let cx = parse(good).expect("valid");
        assert!(!cx.is_sampled());
        for bad in [
            &b"00-abc-def-01"[..],
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            b"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields.
        assert!(parse(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x").is_some());
    }
}
