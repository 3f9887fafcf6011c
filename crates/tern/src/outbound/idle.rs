//! Connections waiting, open and idle, for their destination's next job.
//!
//! A connection whose destination has nothing due when its message is done
//! is parked here for [`IDLE_TIME`] instead of ending with QUIT at once:
//! under load the next message for a busy destination is seldom more than a
//! moment away, and a new job goes to a parked connection before a new one
//! is opened (Postfix's connection cache keeps idle sessions 2 s too).
//!
//! Invariants: a parked connection holds no job, so it takes no place in the
//! scheduler's window; each is answered exactly once (a job, or `None` to
//! end it with QUIT): when handed a job, when its time is up, or at shutdown.
//! The most recently parked connection is used first, so the rest time out
//! and a burst's extra connections are let go.

use super::NextJob;
use crate::scheduler::{Destination, Job, Millis};
use crate::spool::Envelope;
use std::collections::HashMap;

/// How long a connection waits for its destination's next job.
pub const IDLE_TIME: Millis = 2_000;

#[derive(Default)]
pub struct IdleConnections {
    parked: HashMap<Destination, Vec<(Millis, NextJob)>>,
}

impl IdleConnections {
    pub fn park(&mut self, destination: Destination, next: NextJob, now: Millis) {
        self.parked
            .entry(destination)
            .or_default()
            .push((now.saturating_add(IDLE_TIME), next));
    }

    /// Gives `job` to a connection parked for `destination`; returns it when
    /// none is (or every one has gone meanwhile).
    pub fn hand_over(&mut self, job: Job, envelope: Envelope) -> Option<(Job, Envelope)> {
        let destination = job.destination.clone();
        let mut offer = Some((job, envelope));
        if let Some(list) = self.parked.get_mut(&destination) {
            while let Some((_, next)) = list.pop() {
                match next.send(offer.take()) {
                    Ok(()) => break,
                    // The connection was lost while it waited.
                    Err(back) => offer = back,
                }
            }
            if list.is_empty() {
                self.parked.remove(&destination);
            }
        }
        offer
    }

    /// Ends the connections whose time is up.
    pub fn expire(&mut self, now: Millis) {
        self.parked.retain(|_, list| {
            list.retain(|(deadline, _)| *deadline > now);
            !list.is_empty()
        });
        // Dropping a sender ends its connection like an explicit None.
    }

    pub fn next_deadline(&self) -> Option<Millis> {
        self.parked
            .values()
            .flat_map(|list| list.iter().map(|(deadline, _)| *deadline))
            .min()
    }

    pub fn close_all(&mut self) {
        self.parked.clear();
    }
}
