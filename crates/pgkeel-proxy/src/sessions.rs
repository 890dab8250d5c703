//! The task that runs client sessions.
//!
//! Every client session of a runtime thread runs inside one tokio task, in a [`Set`],
//! instead of as a task of its own. A session still waits on its sockets, timers and locks
//! through tokio, with a waker of its own, but waking it puts its number on the set's queue
//! and polling it is a call. A tokio task costs two atomic state changes per poll, a
//! reference count per wake and a trip through the runtime's queue (docs/benchmarks.md,
//! "Proxy").
//!
//! What a task gave for free is kept:
//! - a session that panics is dropped alone, with its sockets, and logged ([`Isolated`]);
//! - tokio's cooperative budget still applies: the set polls at most one batch of woken
//!   sessions per poll of its task, and once the task has used its budget, it leaves the rest
//!   of the batch for its next poll; so a session pumping a large COPY cannot keep the others
//!   or the runtime's timers waiting;
//! - on a runtime with several worker threads there are as many such tasks as workers, and
//!   new clients are handed to them in turn.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::router::RouteMode;
use crate::session::{self, Shared};
use crate::stats::Admitted;

/// An accepted client, handed to a sessions task.
pub(crate) struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The `max_client_conn` slot, `None` when none was free.
    pub admitted: Option<Admitted>,
    /// Counts running sessions for a graceful shutdown (held until the session ends).
    pub live: Arc<()>,
    pub mode: RouteMode,
}

/// Where acceptors send new clients: to the sessions tasks (as many as the runtime has
/// workers), in turn.
#[derive(Clone)]
pub(crate) struct Spawner {
    tasks: Arc<[mpsc::UnboundedSender<Accepted>]>,
    next: Arc<AtomicUsize>,
}

impl Spawner {
    /// Starts `workers` sessions tasks (at least one) on the current runtime.
    pub fn start(shared: &Arc<Shared>, workers: usize) -> (Spawner, Vec<tokio::task::JoinHandle<()>>) {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            handles.push(tokio::spawn(run(shared.clone(), rx)));
        }
        (Spawner { tasks: senders.into(), next: Arc::default() }, handles)
    }

    /// Hands a client to the next sessions task. Once the tasks have stopped (the proxy is
    /// shutting down) the client is dropped, which closes its connection.
    pub fn spawn(&self, client: Accepted) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.tasks.len();
        let _ = self.tasks[i].send(client);
    }
}

/// Runs the sessions of the clients `rx` hands over, until every sender is gone and every
/// session has ended.
async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Accepted>) {
    let mut set = Set::default();
    let mut open = true;
    std::future::poll_fn(|cx| {
        while open {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(a)) => {
                    // The session's own future, not an `async move` block around it: the
                    // block would keep its captures next to the session built from them
                    // (docs/benchmarks.md, "Proxy").
                    set.push(Isolated(session::run(shared.clone(), a.stream, a.peer, a.admitted, a.live, a.mode)));
                }
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        set.poll(cx);
        if !open && set.is_empty() {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}

/// Futures polled by one task, each when its own waker was woken: the sessions of a runtime
/// thread.
///
/// The futures are kept in a slab; a waker is its future's [`Entry::cell`], and waking it
/// queues the future's slot number once (until it is polled) and wakes the task. Each
/// [`Set::poll`] takes the queue as it is and polls those futures once each. A future that
/// ends leaves its cell marked queued for good, so its wakers, wherever they were kept, do
/// nothing (a later future in the same slot has a cell of its own).
pub(crate) struct Set<F> {
    entries: Vec<Option<Entry<F>>>,
    /// Free slots of `entries`.
    free: Vec<usize>,
    queue: Arc<Queue>,
    /// The batch being polled (and what a spent budget left of it); when it is empty, its
    /// allocation is swapped with the queue's at the next poll.
    batch: Vec<usize>,
}

struct Entry<F> {
    future: Pin<Box<F>>,
    cell: Arc<Cell>,
    /// `cell` as a waker, made once: tokio keeps a waker only when it is not this one
    /// (`will_wake`), so a session that waits again and again clones nothing.
    waker: Waker,
}

/// A future's waker.
struct Cell {
    /// Queued (or ended): a wake has nothing to do.
    queued: AtomicBool,
    slot: usize,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Queue {
    inner: Mutex<Woken>,
}

#[derive(Default)]
struct Woken {
    slots: Vec<usize>,
    /// The set's task, taken by the first wake after it was last polled.
    task: Option<Waker>,
}

impl Wake for Cell {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = {
            let mut w = self.queue.inner.lock().unwrap_or_else(PoisonError::into_inner);
            w.slots.push(self.slot);
            w.task.take()
        };
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F> Default for Set<F> {
    fn default() -> Self {
        Set { entries: Vec::new(), free: Vec::new(), queue: Arc::default(), batch: Vec::new() }
    }
}

impl<F: Future<Output = ()>> Set<F> {
    /// Adds a future, to be polled at the next [`Set::poll`].
    pub fn push(&mut self, future: F) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.entries.len() - 1
        });
        let cell = Arc::new(Cell { queued: AtomicBool::new(false), slot, queue: self.queue.clone() });
        // Polled first at the next poll.
        Wake::wake_by_ref(&cell);
        let waker = Waker::from(cell.clone());
        self.entries[slot] = Some(Entry { future: Box::pin(future), cell, waker });
    }

    /// How many futures have not ended.
    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether every future has ended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Polls the futures woken since the last poll, once each, and drops those that end.
    /// `cx`'s waker is woken at the next wake of any of them (also one during this poll,
    /// which then waits for the next).
    ///
    /// Once the task has spent tokio's cooperative budget, every future polled would only
    /// wake itself again: the rest of the batch then waits, in order, for the next poll, and
    /// the task yields (the budget is looked at every [`BUDGET_LOOK`] futures, a
    /// thread-local read).
    pub fn poll(&mut self, cx: &mut Context<'_>) {
        {
            let mut w = self.queue.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if self.batch.is_empty() {
                std::mem::swap(&mut w.slots, &mut self.batch);
            } else {
                self.batch.append(&mut w.slots);
            }
            if !w.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                w.task = Some(cx.waker().clone());
            }
        }
        let mut polled = 0;
        while let Some(&slot) = self.batch.get(polled) {
            if polled % BUDGET_LOOK == BUDGET_LOOK - 1 && !tokio::task::coop::has_budget_remaining() {
                cx.waker().wake_by_ref();
                break;
            }
            polled += 1;
            let Some(entry) = self.entries.get_mut(slot).and_then(Option::as_mut) else { continue };
            // From here a wake queues it again, for the next batch.
            entry.cell.queued.store(false, Ordering::Release);
            let mut fcx = Context::from_waker(&entry.waker);
            if entry.future.as_mut().poll(&mut fcx).is_ready() {
                entry.cell.queued.store(true, Ordering::Release);
                self.entries[slot] = None;
                self.free.push(slot);
            }
        }
        self.batch.drain(..polled);
    }
}

/// How many futures [`Set::poll`] polls between looks at tokio's budget.
const BUDGET_LOOK: usize = 4;

/// A session whose panic ends only itself: its future is dropped (closing its client and
/// server sockets) and the panic is logged, as a tokio task's would be.
struct Isolated<F>(F);

impl<F: Future<Output = ()>> Future for Isolated<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `Isolated` is a structural pin of its only field: the field is never moved
        // out of a pinned `Isolated`, and `Isolated` has no `Drop` or `Unpin` of its own.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("a client session panicked (reported above); its connection is closed");
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Polls `set` (as its task does) until `done` says so.
    async fn drive(set: &mut Set<Boxed>, done: impl Fn(&Set<Boxed>) -> bool) {
        std::future::poll_fn(|cx| {
            set.poll(cx);
            if done(set) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// A panicking future ends alone, and the set goes on polling the others.
    #[tokio::test]
    async fn a_panicking_session_ends_alone() {
        let mut set = Set::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let got = Arc::new(AtomicUsize::new(0));
        set.push(Box::pin(Isolated(async {
            tokio::task::yield_now().await;
            panic!("test: a session panics");
        })) as Boxed);
        let g = got.clone();
        set.push(Box::pin(Isolated(async move {
            g.store(rx.await.unwrap().into(), Ordering::SeqCst);
        })));
        drive(&mut set, |s| s.len() == 1).await;
        tx.send(7).unwrap();
        drive(&mut set, Set::is_empty).await;
        assert_eq!(got.load(Ordering::SeqCst), 7);
    }

    /// Futures woken from other threads run, and each ends once; a slot freed by an ended
    /// future is reused, and the ended future's waker does not poll its successor.
    #[tokio::test]
    async fn wakes_from_other_threads_run_the_futures_and_stale_wakers_do_nothing() {
        let mut set = Set::default();
        let ended = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for _ in 0..50 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            senders.push(tx);
            let e = ended.clone();
            set.push(Box::pin(async move {
                rx.await.unwrap();
                e.fetch_add(1, Ordering::SeqCst);
            }) as Boxed);
        }
        drive(&mut set, |_| true).await;
        assert_eq!(set.len(), 50);
        let thread = std::thread::spawn(move || senders.into_iter().for_each(|tx| tx.send(()).unwrap()));
        drive(&mut set, Set::is_empty).await;
        thread.join().unwrap();
        assert_eq!(ended.load(Ordering::SeqCst), 50);

        // A future that keeps its waker and ends, then one in its slot that counts its polls.
        let stale: Arc<Mutex<Option<Waker>>> = Arc::default();
        let s = stale.clone();
        set.push(Box::pin(std::future::poll_fn(move |cx| {
            *s.lock().unwrap() = Some(cx.waker().clone());
            Poll::Ready(())
        })) as Boxed);
        drive(&mut set, Set::is_empty).await;
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        set.push(Box::pin(std::future::poll_fn(move |_| {
            p.fetch_add(1, Ordering::SeqCst);
            Poll::Pending
        })) as Boxed);
        assert_eq!(set.entries.len(), 50, "the slot is reused");
        drive(&mut set, |_| true).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        stale.lock().unwrap().take().unwrap().wake();
        drive(&mut set, |_| true).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "a stale waker polled another future");
    }

    /// Once tokio's budget for the task's poll is spent, the set stops polling and yields
    /// instead of polling futures that could only wake themselves again.
    #[tokio::test]
    async fn a_spent_budget_ends_the_batch() {
        let mut set = Set::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        for _ in 0..1000 {
            let (p, e) = (polls.clone(), ended.clone());
            let mut spent = Box::pin(tokio::task::coop::consume_budget());
            set.push(Box::pin(std::future::poll_fn(move |cx| {
                p.fetch_add(1, Ordering::SeqCst);
                // One unit of the budget, as a socket read that finds data.
                std::task::ready!(spent.as_mut().poll(cx));
                e.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(())
            })) as Boxed);
        }
        drive(&mut set, Set::is_empty).await;
        assert_eq!(ended.load(Ordering::SeqCst), 1000);
        // The budget is 128 units a poll: about 8 polls of the task, each of which may poll
        // up to `BUDGET_LOOK - 1` futures after the budget ran out. Without the look, every
        // future of a batch after the 128th is polled for nothing: 4,416 polls.
        let polls = polls.load(Ordering::SeqCst);
        assert!(polls <= 1000 + 10 * BUDGET_LOOK, "{polls} polls for 1,000 futures");
    }
}
