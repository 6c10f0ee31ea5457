//! What a failed delivery means: every produce error is either worth retrying, a
//! problem of one record (which the error policy handles), or a problem of the
//! configuration or the producer itself (which stops the pipeline).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The kind of a delivery failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeliveryFailure {
    /// The broker or the network is unavailable or busy: retry with backoff.
    Transient,
    /// This record can never be published (too large, a partition or timestamp the
    /// broker refuses, a policy violation): the error policy decides for its input.
    Record,
    /// The configuration is wrong (no such topic, no permission) or the producer is
    /// unusable: no record of this pipeline can be published, so it stops.
    Fatal,
}

/// Classifies a produce error.
pub(crate) fn classify(error: &KafkaError) -> DeliveryFailure {
    use RDKafkaErrorCode::*;
    let Some(code) = error.rdkafka_error_code() else {
        return DeliveryFailure::Transient;
    };
    match code {
        // (InvalidMessage, Kafka's CORRUPT_MESSAGE, is retriable: a damaged request.)
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge | InvalidRecord
        | InvalidTimestamp | UnknownPartition | PolicyViolation | BadMessage => {
            DeliveryFailure::Record
        }
        TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | TransactionalIdAuthorizationFailed
        | SaslAuthenticationFailed
        | Authentication
        | InvalidTopic
        | UnknownTopic
        | UnknownTopicOrPartition
        | InvalidRequiredAcks
        | InvalidConfig
        | InvalidArgument
        | UnsupportedForMessageFormat
        | UnsupportedCompressionType
        | UnsupportedVersion
        | Fatal
        | GaplessGuarantee
        | OutOfOrderSequenceNumber
        | InvalidProducerEpoch
        | ProducerFenced
        | Fenced => DeliveryFailure::Fatal,
        _ => DeliveryFailure::Transient,
    }
}

/// Whether a [`DeliveryFailure::Record`] error is the client's verdict on this record
/// alone (a partition that does not exist, a malformed message). A broker's refusal
/// (too large for the topic, an invalid timestamp, a policy violation) applies to a
/// whole request batch, so it may name records that are fine.
pub(crate) fn refused_alone(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(UnknownPartition | BadMessage)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(code: RDKafkaErrorCode) -> DeliveryFailure {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn every_produce_error_has_a_kind() {
        use RDKafkaErrorCode::*;
        for code in [
            MessageTimedOut,
            BrokerTransportFailure,
            AllBrokersDown,
            NotEnoughReplicas,
            NotEnoughReplicasAfterAppend,
            LeaderNotAvailable,
            NotLeaderForPartition,
            RequestTimedOut,
            NetworkException,
            ThrottlingQuotaExceeded,
            KafkaStorageError,
            InvalidMessage,
        ] {
            assert_eq!(of(code), DeliveryFailure::Transient, "{code:?}");
        }
        for code in [
            MessageSizeTooLarge,
            UnknownPartition,
            InvalidTimestamp,
            InvalidRecord,
            PolicyViolation,
        ] {
            assert_eq!(of(code), DeliveryFailure::Record, "{code:?}");
        }
        for code in [
            TopicAuthorizationFailed,
            UnknownTopic,
            UnknownTopicOrPartition,
            InvalidTopic,
            Fatal,
        ] {
            assert_eq!(of(code), DeliveryFailure::Fatal, "{code:?}");
        }
        assert_eq!(
            classify(&KafkaError::Canceled),
            DeliveryFailure::Transient,
            "no code: retried"
        );
    }
}
