//! Waking sessions when the topology changes, the proxy starts draining, or the admin
//! console kills a database's clients.
//!
//! A busy session must notice a new term at once (fencing), and every session must notice
//! the shutdown and a `KILL`. Waiting on the `watch` channels for that costs a registration in the
//! channel's waiter list and its removal (each under the channel's lock) every time a
//! session waits for I/O, that is, several times per transaction. Here a session registers
//! once, for as long as it lives, and a wait only stores its waker in its own slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::weak_list::WeakList;

/// Every session's wake-up slot, and how many kicks of each kind there were.
///
/// `repr(C)`: the counts, which every transaction reads, come first (see `session::Shared`).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Kicker {
    topology: AtomicU64,
    /// Kicks for every session, busy or idle: the drain, `KILL`.
    everyone: AtomicU64,
    slots: Mutex<WeakList<Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    waker: Mutex<Option<Waker>>,
    /// `waker` holds the session's waker (set and cleared under its lock), so a wait by the
    /// same task need not take the lock again.
    registered: AtomicBool,
    /// The session has work (a server attached or bytes to move): topology changes wake it.
    /// Idle sessions wake only for the shutdown (the topology changes every second while
    /// replicas report their lag).
    busy: AtomicBool,
}

impl Slot {
    fn wake(&self) {
        let taken = {
            let mut w = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
            self.registered.store(false, Ordering::SeqCst);
            w.take()
        };
        if let Some(w) = taken {
            w.wake();
        }
    }
}

impl Kicker {
    /// Wakes the busy sessions: the topology changed.
    pub fn topology_changed(&self) {
        self.topology.fetch_add(1, Ordering::SeqCst);
        self.wake(true);
    }

    /// Wakes every session: the proxy is shutting down, or clients were killed (each session
    /// then looks whether it is one of them).
    pub fn everyone(&self) {
        self.everyone.fetch_add(1, Ordering::SeqCst);
        self.wake(false);
    }

    fn wake(&self, busy_only: bool) {
        // Waking only schedules a session's task, so it is done under the lock.
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        for s in slots.live() {
            if !busy_only || s.busy.load(Ordering::SeqCst) {
                s.wake();
            }
        }
    }

    /// A listener for one session, registered until it is dropped.
    pub fn listen(&self) -> Listener {
        let slot = Arc::new(Slot::default());
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).push(&slot);
        Listener {
            slot,
            topology: self.topology.load(Ordering::SeqCst),
            everyone: self.everyone.load(Ordering::SeqCst),
            stored: None,
        }
    }
}

/// One session's registration with the [`Kicker`].
#[derive(Debug)]
pub struct Listener {
    slot: Arc<Slot>,
    topology: u64,
    everyone: u64,
    /// A copy of the waker last stored in the slot.
    stored: Option<Waker>,
}

impl Listener {
    /// Marks the session busy (topology changes wake it) or idle (they do not). Turning busy
    /// takes the topology as read: the session reads it afresh before it writes anything.
    pub fn set_busy(&mut self, kicker: &Kicker, busy: bool) {
        self.slot.busy.store(busy, Ordering::SeqCst);
        if busy {
            self.topology = kicker.topology.load(Ordering::SeqCst);
        }
    }

    /// Ready once after each kick that concerns the session (a topology change only while
    /// busy), else registers the waker.
    pub fn poll_kicked(&mut self, kicker: &Kicker, cx: &mut Context<'_>) -> Poll<()> {
        // A session waits several times per transaction, always in the same task: its
        // waker is still in the slot unless a kick took it.
        let current = self.slot.registered.load(Ordering::SeqCst)
            && self.stored.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if !current {
            let mut w = self.slot.waker.lock().unwrap_or_else(PoisonError::into_inner);
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            self.slot.registered.store(true, Ordering::SeqCst);
            if !self.stored.as_ref().is_some_and(|s| s.will_wake(cx.waker())) {
                self.stored = Some(cx.waker().clone());
            }
        }
        // Read after the waker is stored: a kick after this read wakes it.
        let everyone = kicker.everyone.load(Ordering::SeqCst);
        let topology = kicker.topology.load(Ordering::SeqCst);
        let mut kicked = everyone != self.everyone;
        self.everyone = everyone;
        if self.slot.busy.load(Ordering::Relaxed) {
            kicked |= topology != self.topology;
            self.topology = topology;
        }
        if kicked {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits for [`Listener::poll_kicked`].
    pub async fn kicked(&mut self, kicker: &Kicker) {
        std::future::poll_fn(|cx| self.poll_kicked(kicker, cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker's wake-up counter.
    fn count() -> Arc<Count> {
        Arc::new(Count(AtomicUsize::new(0)))
    }

    fn wakes(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    /// A listener of a busy session.
    fn busy_listener(k: &Kicker) -> Listener {
        let mut l = k.listen();
        l.set_busy(k, true);
        l
    }

    fn poll(l: &mut Listener, k: &Kicker, count: &Arc<Count>) -> bool {
        let waker = Waker::from(count.clone());
        l.poll_kicked(k, &mut Context::from_waker(&waker)).is_ready()
    }

    #[test]
    fn topology_wakes_busy_sessions_and_a_kick_for_everyone_wakes_all() {
        let k = Kicker::default();
        let (busy_n, idle_n) = (count(), count());
        let mut busy = busy_listener(&k);
        let mut idle = k.listen();
        assert!(!poll(&mut busy, &k, &busy_n));
        assert!(!poll(&mut idle, &k, &idle_n));

        k.topology_changed();
        assert_eq!(wakes(&busy_n), 1, "a busy session is woken by a topology change");
        assert_eq!(wakes(&idle_n), 0, "an idle one is not");
        assert!(poll(&mut busy, &k, &busy_n));
        assert!(!poll(&mut busy, &k, &busy_n), "one kick is seen once");
        assert!(!poll(&mut idle, &k, &idle_n));

        k.everyone();
        assert_eq!(wakes(&idle_n), 1, "draining (or KILL) wakes idle sessions");
        assert_eq!(wakes(&busy_n), 2, "a session waiting again after a kick is woken again");
        assert!(poll(&mut idle, &k, &idle_n));
        assert!(poll(&mut busy, &k, &busy_n));

        // A session turning busy takes the topology as read.
        k.topology_changed();
        idle.set_busy(&k, true);
        assert!(!poll(&mut idle, &k, &idle_n));
    }

    #[test]
    fn a_wait_in_another_task_moves_the_wake_up_there() {
        let k = Kicker::default();
        let (first, second) = (count(), count());
        let mut l = busy_listener(&k);
        assert!(!poll(&mut l, &k, &first));
        assert!(!poll(&mut l, &k, &first));
        assert!(!poll(&mut l, &k, &second));
        k.topology_changed();
        assert_eq!(wakes(&first), 0, "the earlier task is not woken");
        assert_eq!(wakes(&second), 1, "the task that waited last is");
        assert!(poll(&mut l, &k, &second));
    }

    #[test]
    fn ended_sessions_leave_the_list() {
        let k = Kicker::default();
        let keep: Vec<Listener> = (0..10).map(|_| k.listen()).collect();
        for _ in 0..1000 {
            drop(k.listen());
        }
        let slots = k.slots.lock().unwrap();
        assert!(slots.len() <= 64, "{} entries for 10 sessions", slots.len());
        let live = slots.live().count();
        assert_eq!(live, keep.len());
    }
}
