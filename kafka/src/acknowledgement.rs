//! The acknowledgements awaited for one batch of records, and the ticket each record
//! carries through librdkafka to its delivery report.
//!
//! A report must find its batch and its record's place in it. A boxed pair per record
//! did that, at the cost of an allocation on a worker thread freed on the producer's
//! polling thread and a reference count that both threads touched for every record.
//! Here a batch allocates its tickets once, each holding the batch's address; a
//! record's opaque is its ticket's address, and its place is the ticket's distance from
//! the first. The batch stays alive until its last record is acknowledged: its records
//! together hold one reference to it, released by whoever acknowledges the last one.
//! This module holds the crate's third `unsafe` code (after fetch_queue.rs and
//! enqueue.rs).

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::util::IntoOpaque;
use tokio::sync::Notify;

/// The acknowledgements still awaited for one batch of records: one counter per batch
/// instead of a channel and a future per record.
pub(crate) struct PendingBatch {
    /// Records not yet acknowledged, tickets not yet issued included.
    remaining: AtomicUsize,
    /// The records that failed: their index in the batch and the error.
    failures: Mutex<Vec<(usize, KafkaError)>>,
    done: Notify,
    /// One per record, each holding this batch's address.
    tickets: Box<[Ticket]>,
}

/// The address of the batch a ticket belongs to.
struct Ticket(*const PendingBatch);

// SAFETY: a ticket is only an address, written when its batch is made and only read
// after; the batch it points to is itself shared between threads (atomics, a lock).
unsafe impl Send for Ticket {}
// SAFETY: as above: nothing is ever written through `&Ticket`.
unsafe impl Sync for Ticket {}

impl PendingBatch {
    /// A batch of `records` records to wait on, and the tickets to enqueue them with.
    pub(crate) fn issue(records: usize) -> (Arc<PendingBatch>, Tickets) {
        let batch = Arc::new_cyclic(|me| PendingBatch {
            remaining: AtomicUsize::new(records),
            failures: Mutex::new(Vec::new()),
            done: Notify::new(),
            tickets: (0..records).map(|_| Ticket(me.as_ptr())).collect(),
        });
        // The records' reference: released when the last one is acknowledged. With no
        // records there is nothing to release it, so none is taken.
        let owned = (records > 0).then(|| Arc::into_raw(Arc::clone(&batch)));
        let tickets = Tickets {
            batch: owned.and_then(|p| NonNull::new(p.cast_mut())),
            first: NonNull::from(&*batch.tickets).cast(),
            len: records,
            next: 0,
        };
        (batch, tickets)
    }

    /// Waits for every acknowledgement; the failures, by record index.
    pub(crate) async fn wait(&self) -> Vec<(usize, KafkaError)> {
        while self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        let mut failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()));
        failures.sort_by_key(|(index, _)| *index);
        failures
    }

    /// Counts `records` as acknowledged; the last one wakes the waiter and releases the
    /// records' reference.
    ///
    /// # Safety
    /// `batch` is a batch whose records' reference is still held, and at least
    /// `records` of its records are not acknowledged yet.
    unsafe fn acknowledge(batch: NonNull<PendingBatch>, records: usize) {
        // SAFETY: the records' reference keeps the batch alive (the caller's contract).
        let pending = unsafe { batch.as_ref() };
        if pending.remaining.fetch_sub(records, Ordering::AcqRel) == records {
            // A stored permit: the waiter cannot miss it, however late it starts waiting.
            pending.done.notify_one();
            // SAFETY: the last record is acknowledged: the records' reference, made by
            // `Arc::into_raw` in `issue`, is released once, here.
            unsafe { Arc::decrement_strong_count(batch.as_ptr()) };
        }
    }
}

/// The tickets of a batch not yet handed out, in record order. Those left when it is
/// dropped (the sender was cancelled) are acknowledged: no report will come for them.
pub(crate) struct Tickets {
    /// The batch, through the records' reference; `None` for a batch of no records.
    batch: Option<NonNull<PendingBatch>>,
    /// The batch's first ticket and their number: once all are issued the batch may be
    /// gone, so `next` must not look at it.
    first: NonNull<Ticket>,
    len: usize,
    next: usize,
}

// SAFETY: a batch is shared by threads anyway (its counter is atomic, its failures
// behind a lock), and `Tickets` only hands out addresses into it.
unsafe impl Send for Tickets {}

impl Iterator for Tickets {
    type Item = RecordTicket;

    fn next(&mut self) -> Option<RecordTicket> {
        if self.next == self.len {
            return None;
        }
        // SAFETY: `next < len`: a ticket not issued is a record not acknowledged, so the
        // records' reference keeps the batch, and its tickets, alive.
        let ticket = unsafe { self.first.add(self.next) };
        self.next += 1;
        Some(RecordTicket(ticket))
    }
}

impl Drop for Tickets {
    fn drop(&mut self) {
        let Some(batch) = self.batch else { return };
        let left = self.len - self.next;
        if left > 0 {
            // SAFETY: those `left` records were never issued, so never acknowledged.
            unsafe { PendingBatch::acknowledge(batch, left) };
        }
    }
}

/// One record's ticket, the opaque its delivery report carries back. Acknowledge it
/// exactly once ([`acknowledge`](Self::acknowledge)); dropped unacknowledged (its
/// sender was cancelled), it counts as failed.
pub(crate) struct RecordTicket(NonNull<Ticket>);

// SAFETY: see `Tickets`; a ticket is consumed by exactly one thread, the one that
// acknowledges it.
unsafe impl Send for RecordTicket {}
// SAFETY: a ticket offers no access through `&self`.
unsafe impl Sync for RecordTicket {}

impl RecordTicket {
    /// Counts the record as delivered (`None`) or failed with `failure`.
    pub(crate) fn acknowledge(self, failure: Option<KafkaError>) {
        let ticket = self.0;
        std::mem::forget(self);
        // SAFETY: an unacknowledged ticket's batch is alive (its records' reference is
        // held until the last record is acknowledged), and its tickets with it.
        let batch = unsafe { ticket.as_ref().0 };
        // SAFETY: as above.
        let pending = unsafe { &*batch };
        if let Some(error) = failure {
            // SAFETY: `ticket` points into `pending.tickets`, so both are in one
            // allocation and the distance is the record's index.
            let index = unsafe { ticket.as_ptr().offset_from(pending.tickets.as_ptr()) };
            pending
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((usize::try_from(index).unwrap_or(usize::MAX), error));
        }
        if let Some(batch) = NonNull::new(batch.cast_mut()) {
            // SAFETY: this record was not acknowledged before (the ticket is consumed).
            unsafe { PendingBatch::acknowledge(batch, 1) };
        }
    }
}

impl Drop for RecordTicket {
    fn drop(&mut self) {
        // Only a cancelled sender drops a ticket it got back from a full queue.
        let ticket = RecordTicket(self.0);
        ticket.acknowledge(Some(KafkaError::Canceled));
    }
}

impl IntoOpaque for RecordTicket {
    fn into_ptr(self) -> *mut c_void {
        let ticket = self.0;
        // Owned by librdkafka's message now, until `from_ptr` takes it back.
        std::mem::forget(self);
        ticket.as_ptr().cast()
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Self {
        // The only opaques this crate's producers are given are tickets (`into_ptr`).
        match NonNull::new(ptr.cast::<Ticket>()) {
            Some(ticket) => RecordTicket(ticket),
            None => unreachable!("a delivery report without its record's ticket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    fn error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[tokio::test]
    async fn the_last_acknowledgement_wakes_the_waiter_with_the_failures_by_index() {
        let (batch, tickets) = PendingBatch::issue(4);
        let issued: Vec<RecordTicket> = tickets.collect();
        assert_eq!(issued.len(), 4);
        let waiter = tokio::spawn({
            let batch = Arc::clone(&batch);
            async move { batch.wait().await }
        });
        let mut issued = issued.into_iter();
        let (a, b, c, d) = (
            issued.next().expect("0"),
            issued.next().expect("1"),
            issued.next().expect("2"),
            issued.next().expect("3"),
        );
        // Out of order and from another thread, as the polling thread reports them.
        std::thread::spawn(move || {
            d.acknowledge(Some(error(RDKafkaErrorCode::MessageSizeTooLarge)));
            a.acknowledge(None);
            b.acknowledge(Some(error(RDKafkaErrorCode::InvalidRecord)));
        })
        .join()
        .expect("acknowledged");
        assert!(!waiter.is_finished(), "one record is still unacknowledged");
        c.acknowledge(None);
        let failures = waiter.await.expect("waited");
        let indices: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [1, 3]);
        // Only the waiter's reference is left: the records' one was released.
        assert_eq!(Arc::strong_count(&batch), 1);
    }

    #[tokio::test]
    async fn tickets_never_issued_or_dropped_count_as_acknowledged() {
        let (batch, mut tickets) = PendingBatch::issue(3);
        let first = tickets.next().expect("0");
        // The sender is cancelled with the first ticket back from a full queue and two
        // never issued.
        drop(first);
        drop(tickets);
        let failures = batch.wait().await;
        assert_eq!(failures.len(), 1, "the dropped ticket failed: {failures:?}");
        assert_eq!(failures[0].0, 0);
        assert_eq!(Arc::strong_count(&batch), 1);
    }

    #[tokio::test]
    async fn an_empty_batch_is_done_at_once() {
        let (batch, mut tickets) = PendingBatch::issue(0);
        assert!(tickets.next().is_none());
        drop(tickets);
        assert!(batch.wait().await.is_empty());
        assert_eq!(Arc::strong_count(&batch), 1);
    }

    #[test]
    fn a_ticket_survives_the_trip_through_an_opaque_pointer() {
        let (batch, mut tickets) = PendingBatch::issue(2);
        let _first = tickets.next().expect("0");
        let second = tickets.next().expect("1");
        let pointer = second.into_ptr();
        // SAFETY: the pointer was made by `into_ptr` just above and is taken back once.
        let back = unsafe { RecordTicket::from_ptr(pointer) };
        back.acknowledge(Some(KafkaError::Canceled));
        assert_eq!(batch.remaining.load(Ordering::Acquire), 1);
        assert_eq!(
            batch.failures.lock().expect("failures")[0].0,
            1,
            "the second record's index"
        );
    }
}
