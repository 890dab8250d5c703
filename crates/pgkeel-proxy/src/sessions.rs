//! The task that runs client sessions.
//!
//! Every client session of a runtime thread runs inside one tokio task, as a
//! `FuturesUnordered` entry, instead of as a task of its own. A session still waits on its
//! sockets, timers and locks through tokio, with a waker of its own, but waking it puts it on
//! this task's queue and polling it is a call. A tokio task costs two atomic state changes
//! per poll, a reference count per wake and a trip through the runtime's queue; about 230
//! user-space instructions per `pgbench -S` transaction, of about 4,400 (docs/benchmarks.md,
//! "Proxy").
//!
//! What a task gave for free is kept:
//! - a session that panics is dropped alone, with its sockets, and logged ([`Isolated`]);
//! - tokio's cooperative budget still applies: once the task has used it, the sessions it
//!   polls are put back on the queue and the task yields to the runtime, so a session
//!   pumping a large COPY cannot keep the others or the runtime's timers waiting;
//! - on a runtime with several worker threads there is one such task per worker, and new
//!   clients are handed to them in turn.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
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

/// Where acceptors send new clients: one sessions task per runtime worker, in turn.
#[derive(Clone)]
pub(crate) struct Spawner {
    tasks: Arc<[mpsc::UnboundedSender<Accepted>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
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
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.tasks.len();
        let _ = self.tasks[i].send(client);
    }
}

/// Runs the sessions of the clients `rx` hands over, until every sender is gone and every
/// session has ended.
async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Accepted>) {
    let mut set = FuturesUnordered::new();
    let mut open = true;
    std::future::poll_fn(|cx| {
        while open {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(a)) => {
                    set.push(Isolated(session::run(shared.clone(), a.stream, a.peer, a.admitted, a.live, a.mode)))
                }
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        // Polls every session that was woken; stops at the first that ends (`Some`), at
        // none left to poll (`Pending`; the set yields by itself after a round, waking this
        // task again when sessions are still ready) or an empty set (`None`).
        while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
        if !open && set.is_empty() {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}

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

    /// A panicking future ends alone, as `Ready`, and the set goes on polling the others.
    #[tokio::test]
    async fn a_panicking_session_ends_alone() {
        let mut set = FuturesUnordered::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        set.push(Box::pin(Isolated(async {
            tokio::task::yield_now().await;
            panic!("test: a session panics");
        })) as Pin<Box<dyn Future<Output = ()> + Send>>);
        set.push(Box::pin(Isolated(async move {
            assert_eq!(rx.await.unwrap(), 7);
        })));
        // The panicking one ends first; the other is still waiting for its value.
        assert_eq!(set.next().await, Some(()));
        assert_eq!(set.len(), 1);
        tx.send(7).unwrap();
        assert_eq!(set.next().await, Some(()));
        assert!(set.is_empty());
    }
}
