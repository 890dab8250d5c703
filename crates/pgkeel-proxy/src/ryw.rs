//! The read-your-writes floor shared by the connections of one database and user
//! (`read_your_writes = "user"`).
//!
//! A client connection keeps its own floor (the primary's WAL position after its last write,
//! read with `pg_current_wal_lsn()` once the transaction is over; see `session.rs`). With
//! `"user"`, each write also raises a [`UserFloor`] that every connection of the same database
//! and user reads before it picks a replica, so an application that writes on one connection
//! of its pool and reads on another still reads its writes.
//!
//! The position of a write is known one round trip after its client saw the commit. In that
//! window the write is *pending*: it is counted from the moment the proxy forwards the
//! ReadyForQuery that ends the transaction (before the client can have seen it), and while any
//! write is pending the floor is [`UNKNOWN`], so reads run on the primary. A write whose
//! position is never learnt (its server connection failed first) leaves the floor unknown
//! until a write that committed after that is resolved: only that one's position is known to
//! cover it.

use std::sync::{Mutex, PoisonError};

/// A floor no replica reaches: reads run on the primary.
pub const UNKNOWN: u64 = u64::MAX;

/// The floor of one database and user.
#[derive(Debug, Default)]
pub struct UserFloor {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The highest resolved write position.
    lsn: u64,
    /// Writes whose commit was forwarded and whose position is not known yet.
    pending: u32,
    /// Counts [`UserFloor::begin`] calls; a write's ticket is the count after its own.
    tickets: u64,
    /// Set when a write's position was lost: the ticket count then. Writes with a higher
    /// ticket committed after the lost one.
    lost_at: Option<u64>,
}

impl UserFloor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The floor a read of this database and user must respect: [`UNKNOWN`] while a write is
    /// pending or a lost one is not covered.
    pub fn get(&self) -> u64 {
        let s = self.state();
        if s.pending > 0 || s.lost_at.is_some() {
            UNKNOWN
        } else {
            s.lsn
        }
    }

    /// Whether a write's position was lost and no later write covers it yet.
    pub fn lost(&self) -> bool {
        self.state().lost_at.is_some()
    }

    /// `own` (a connection's floor) combined with this one.
    pub fn with(&self, own: u64) -> u64 {
        match self.get() {
            UNKNOWN => UNKNOWN,
            _ if own == UNKNOWN => UNKNOWN,
            shared => shared.max(own),
        }
    }

    /// A write's commit is about to reach its client: pending until the returned guard is
    /// [resolved](Pending::resolve) (or dropped, which counts as lost).
    pub fn begin(self: &std::sync::Arc<Self>) -> Pending {
        let mut s = self.state();
        s.pending += 1;
        s.tickets += 1;
        Pending { floor: Some(self.clone()), ticket: s.tickets }
    }

    fn end(&self, ticket: u64, lsn: Option<u64>) {
        let mut s = self.state();
        s.pending = s.pending.saturating_sub(1);
        match lsn {
            Some(l) => {
                s.lsn = s.lsn.max(l);
                if s.lost_at.is_some_and(|at| ticket > at) {
                    s.lost_at = None;
                }
            }
            None => s.lost_at = Some(s.tickets),
        }
    }
}

/// A write whose position is not known yet ([`UserFloor::begin`]).
#[derive(Debug)]
pub struct Pending {
    floor: Option<std::sync::Arc<UserFloor>>,
    ticket: u64,
}

impl Pending {
    /// The write's position, `None` when it could not be read.
    pub fn resolve(mut self, lsn: Option<u64>) {
        if let Some(f) = self.floor.take() {
            f.end(self.ticket, lsn);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(f) = self.floor.take() {
            f.end(self.ticket, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_pending_write_sends_reads_to_the_primary_until_its_position_is_known() {
        let f = Arc::new(UserFloor::default());
        assert_eq!(f.get(), 0, "nothing written");
        assert_eq!(f.with(7), 7, "a connection's own floor counts");
        let w = f.begin();
        assert_eq!(f.get(), UNKNOWN);
        assert_eq!(f.with(0), UNKNOWN);
        w.resolve(Some(100));
        assert_eq!(f.get(), 100);
        assert_eq!((f.with(50), f.with(150), f.with(UNKNOWN)), (100, 150, UNKNOWN));
        // Two at once: unknown until both are resolved; an older position does not lower it.
        let (a, b) = (f.begin(), f.begin());
        b.resolve(Some(300));
        assert_eq!(f.get(), UNKNOWN);
        a.resolve(Some(200));
        assert_eq!(f.get(), 300);
    }

    #[test]
    fn a_lost_position_needs_a_later_write_to_be_covered() {
        let f = Arc::new(UserFloor::default());
        f.begin().resolve(Some(100));
        let before = f.begin();
        let lost = f.begin();
        drop(lost);
        assert_eq!(f.get(), UNKNOWN, "pending, and one lost");
        assert!(f.lost());
        // A write that committed before the lost one does not cover it.
        before.resolve(Some(150));
        assert_eq!(f.get(), UNKNOWN);
        // One that committed after it does.
        let after = f.begin();
        after.resolve(Some(400));
        assert_eq!(f.get(), 400);
        assert!(!f.lost());
        // A position that could not be read counts as lost too.
        f.begin().resolve(None);
        assert_eq!(f.get(), UNKNOWN);
        f.begin().resolve(Some(500));
        assert_eq!(f.get(), 500);
    }
}
