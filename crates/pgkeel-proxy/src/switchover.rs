//! The proxy's half of a zero-error switchover (see `docs/architecture.md`, "A switchover,
//! step by step", and `docs/proxy.md`).
//!
//! The proxy registers itself in the DCS (`proxies/<id>`, with the cluster's `ttl`, rewritten
//! every `ttl / 4`) and watches the `switchover` key. When the leader announces that it is
//! about to step down, the proxy
//!
//! 1. closes the admission gate (`Shared::hold`, shared with the admin console's `PAUSE`):
//!    new transactions wait (at most `failover_hold_timeout`);
//! 2. waits until no client is inside a transaction on the primary ([`Inflight`] counts the
//!    units between the gate and the end of their primary transaction), at most until the
//!    announcement's deadline;
//! 3. acknowledges in its DCS record (`drained` = the switchover's id), so the leader stops
//!    postgres without cutting a transaction;
//! 4. reopens the gate once a newer term leads (idle connections of the old term are closed
//!    then, see `follow_topology`), or when the announcement is withdrawn while the old
//!    leader still leads (cancelled), or after `failover_hold_timeout` at the latest.
//!
//! Session-mode clients are not counted (their server connection is theirs until they leave):
//! they lose it when the old primary stops, as without this step.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeel_dcs::cluster::{ClusterStore, ProxyValue, SwitchoverValue, Versioned};
use tokio::sync::watch;

use crate::session::Shared;

/// Units (a client's transaction or batch) admitted past the gate that may still use the
/// primary: from the gate until their server connection goes back.
#[derive(Debug, Default)]
pub struct Inflight {
    count: AtomicUsize,
}

impl Inflight {
    /// Counts a unit until the returned guard is dropped. The caller checks the gate *after*
    /// this (and the drainer closes the gate *before* it counts), so a unit is either seen by
    /// the drainer or sees the closed gate.
    pub fn enter(self: &Arc<Self>) -> Unit {
        self.count.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Unit { inflight: self.clone() }
    }

    /// Units in flight now.
    pub fn count(&self) -> usize {
        fence(Ordering::SeqCst);
        self.count.load(Ordering::SeqCst)
    }
}

/// One unit counted by [`Inflight`]; dropping it ends the count.
#[derive(Debug)]
pub struct Unit {
    inflight: Arc<Inflight>,
}

impl Drop for Unit {
    fn drop(&mut self) {
        self.inflight.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long the count must stay at zero before the proxy acknowledges: covers a client that
/// passed the gate an instant before it closed and has not counted itself yet.
const QUIET: Duration = Duration::from_millis(10);

/// The proxy's id in the DCS: its listen address and process id, with characters other than
/// letters, digits, `-` and `_` replaced.
pub fn proxy_id(listen: &str) -> String {
    let raw = format!("{listen}-{}", std::process::id());
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Keeps `proxies/<id>` alive, in its own task so that a slow DCS write (an fsync under load)
/// never delays noticing the new primary: rewrites it every `ttl / 4` (the cluster's `ttl`,
/// re-read each time) and at once when `drained` changes; deletes it when `drained` closes.
/// Each time it also reads the other proxies' records, for cancel requests to pass on
/// ([`Shared::set_peers`]).
async fn register(
    store: ClusterStore,
    shared: Arc<Shared>,
    mut value: ProxyValue,
    mut drained: watch::Receiver<Option<String>>,
) {
    let mut ttl = Duration::from_secs(4);
    let mut failing = false;
    let mut first = true;
    loop {
        value.drained = drained.borrow_and_update().clone();
        if let Ok(Some(c)) = store.get_config().await {
            if let Ok(d) = pgkeel_config::DynamicConfig::from_json(&c.value) {
                ttl = d.ttl;
            }
        }
        let next = match store.put_proxy(&value, ttl).await {
            Ok(()) => {
                if let Ok(all) = store.proxies().await {
                    shared.set_peers(peers(&value.id, all.into_iter().map(|p| p.value)));
                }
                if std::mem::take(&mut failing) {
                    tracing::info!(id = %value.id, "registered in the DCS again");
                } else if first {
                    tracing::info!(id = %value.id, ttl = ?ttl, "registered in the DCS for switchovers");
                }
                first = false;
                ttl / 4
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(id = %value.id, error = %e, "cannot register the proxy in the DCS");
                }
                Duration::from_millis(500)
            }
        };
        tokio::select! {
            r = drained.changed() => {
                if r.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(next) => {}
        }
    }
    if let Err(e) = store.delete_proxy(&value.id).await {
        tracing::info!(error = %e, "cannot remove the proxy's DCS record (it expires by itself)");
    }
}

/// The other proxies, as last read from the DCS ([`Shared::peers`]).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// Their addresses (`host:port`).
    pub addresses: Vec<String>,
    /// When a cancel request last read them ([`peers_now`]).
    pub reread_at: Option<Instant>,
}

/// A cancel request for none of this proxy's clients reads the other proxies from the DCS
/// again unless another did within this long.
const PEERS_REREAD_EVERY: Duration = Duration::from_millis(200);
/// How long [`peers_now`] waits for the DCS before it takes the list it has.
const PEERS_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The other proxies a cancel request for none of this proxy's clients is passed on to: read
/// from the DCS now, so a proxy that registered since the last registration round
/// ([`register`], every `ttl / 4`) is on it. A burst of such requests reads the DCS once per
/// [`PEERS_REREAD_EVERY`] at most (each is a connection anyone can open). When the DCS does
/// not answer within [`PEERS_READ_TIMEOUT`], the list of the last read.
pub async fn peers_now(shared: &Shared) -> Vec<String> {
    let known = shared.peers();
    if known.reread_at.is_some_and(|t| t.elapsed() < PEERS_REREAD_EVERY) {
        return known.addresses;
    }
    let Some((store, me)) = shared.peer_source.get() else { return known.addresses };
    match tokio::time::timeout(PEERS_READ_TIMEOUT, store.proxies()).await {
        Ok(Ok(all)) => {
            let fresh = peers(me, all.into_iter().map(|p| p.value));
            shared.set_peers_for_cancel(fresh.clone());
            fresh
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "cannot read the other proxies from the DCS; a cancel request goes to those read last");
            known.addresses
        }
        Err(_) => {
            tracing::info!(timeout = ?PEERS_READ_TIMEOUT, "the DCS did not list the other proxies in time; a cancel request goes to those read last");
            known.addresses
        }
    }
}

/// The addresses of the proxies in `all` other than `me` that can be connected to (not an
/// address for every interface, which a proxy publishes when it has no `connect_address`).
fn peers(me: &str, all: impl Iterator<Item = ProxyValue>) -> Vec<String> {
    all.filter(|p| p.id != me)
        .map(|p| p.address)
        .filter(|a| !a.parse::<std::net::SocketAddr>().is_ok_and(|s| s.ip().is_unspecified()))
        .collect()
}

/// Registers the proxy (at `address`, where the other proxies reach it) and follows switchover
/// announcements until `shutdown` turns true; then removes the registration.
pub async fn run(store: ClusterStore, shared: Arc<Shared>, address: String, mut shutdown: watch::Receiver<bool>) {
    let id = proxy_id(&address);
    let _ = shared.peer_source.set((store.clone(), id.clone()));
    let value = ProxyValue { id, address, drained: None, version: env!("CARGO_PKG_VERSION").into() };
    let (drained, drained_rx) = watch::channel(None::<String>);
    let registration = tokio::spawn(register(store.clone(), shared.clone(), value, drained_rx));
    let mut known: Option<u64> = None;
    let mut handled: Option<String> = None;
    let mut watch_failing = false;
    loop {
        let seen = tokio::select! {
            _ = shutdown.changed() => break,
            r = store.watch_switchover(known, Duration::from_secs(5)) => r,
        };
        match seen {
            Ok(Some(sw)) => {
                watch_failing = false;
                known = Some(sw.revision);
                let newest = shared.topology.borrow().newest_term;
                if handled.as_deref() != Some(sw.value.id.as_str())
                    && sw.value.term >= newest
                    && unix_ms() < sw.value.deadline_ms
                {
                    handled = Some(sw.value.id.clone());
                    hold(&store, &shared, &drained, &sw, &mut shutdown).await;
                    drained.send_replace(None);
                }
            }
            Ok(None) => {
                watch_failing = false;
                known = None;
            }
            Err(e) => {
                if !std::mem::replace(&mut watch_failing, true) {
                    tracing::warn!(error = %e, "cannot watch the switchover key");
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    // Closing the channel ends the registration task, which deletes the record.
    drop(drained);
    let _ = registration.await;
}

/// Holds new transactions for one announced switchover; see the module doc.
async fn hold(
    store: &ClusterStore,
    shared: &Arc<Shared>,
    drained_tx: &watch::Sender<Option<String>>,
    sw: &Versioned<SwitchoverValue>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let s = &sw.value;
    let closed_at = Instant::now();
    shared.hold.close();
    fence(Ordering::SeqCst);
    let hold_limit = closed_at + shared.config().failover_hold_timeout;
    let drain_until = closed_at + Duration::from_millis(s.deadline_ms.saturating_sub(unix_ms()));
    tracing::info!(id = %s.id, leader = %s.leader, term = s.term, in_flight = shared.inflight.count(),
        "switchover announced: holding new transactions until the ones in flight finish");
    // Drain.
    let mut zero_since: Option<Instant> = None;
    let drained = loop {
        let now = Instant::now();
        if shared.inflight.count() == 0 {
            let since = *zero_since.get_or_insert(now);
            if now.duration_since(since) >= QUIET {
                break true;
            }
        } else {
            zero_since = None;
        }
        if now >= drain_until || *shutdown.borrow() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    if drained {
        drained_tx.send_replace(Some(s.id.clone()));
        tracing::info!(id = %s.id, drained_ms = closed_at.elapsed().as_millis() as u64,
            "no transaction in flight on the primary: told the leader");
    } else {
        tracing::warn!(id = %s.id, in_flight = shared.inflight.count(),
            "transactions still in flight on the old primary at the switchover's deadline: they may fail");
    }
    // Wait for the new leader (or a cancellation).
    let mut topo_rx = shared.topology.clone();
    let mut gone = false;
    let why = loop {
        let (newest, primary_term) = {
            let t = topo_rx.borrow_and_update();
            (t.newest_term, t.primary.as_ref().map(|p| p.term))
        };
        if newest > s.term {
            break "a newer term leads";
        }
        if gone {
            if primary_term.is_none() {
                break "the announcement is gone and the old primary no longer leads";
            }
            match store.load().await {
                Ok(snap)
                    if snap.leader.as_ref().is_some_and(|l| l.value.holder == s.leader && l.value.term == s.term) =>
                {
                    break "the switchover was cancelled: the old primary still leads"
                }
                _ => {}
            }
        }
        let now = Instant::now();
        if now >= hold_limit {
            tracing::warn!(id = %s.id, "no new primary within failover_hold_timeout after the switchover announcement");
            break "failover_hold_timeout passed";
        }
        let nap = hold_limit.saturating_duration_since(now).min(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.changed() => break "the proxy is stopping",
            _ = topo_rx.changed() => {}
            r = store.watch_switchover(if gone { None } else { Some(sw.revision) }, nap) => {
                match r {
                    Ok(Some(v)) if v.revision == sw.revision => {}
                    Ok(_) => gone = true,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };
    shared.hold.open();
    tracing::info!(id = %s.id, held_ms = closed_at.elapsed().as_millis() as u64, why, "new transactions run again");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_requests_go_to_the_other_proxies_that_can_be_reached() {
        let p = |id: &str, address: &str| ProxyValue {
            id: id.into(),
            address: address.into(),
            drained: None,
            version: String::new(),
        };
        let all = [p("me", "10.0.0.1:6432"), p("b", "10.0.0.2:6432"), p("c", "0.0.0.0:6432"), p("d", "px-4:6432")];
        assert_eq!(peers("me", all.into_iter()), vec!["10.0.0.2:6432".to_string(), "px-4:6432".to_string()]);
    }

    #[test]
    fn units_are_counted_until_dropped() {
        let f = Arc::new(Inflight::default());
        let a = f.enter();
        let b = f.enter();
        assert_eq!(f.count(), 2);
        drop(a);
        assert_eq!(f.count(), 1);
        drop(b);
        assert_eq!(f.count(), 0);
    }

    #[test]
    fn ids_are_key_safe() {
        let id = proxy_id("[::1]:6432");
        assert!(id.starts_with("___1__6432-"), "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
