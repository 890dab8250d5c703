//! The proxy through network partitions: etcd and every pgkeel node on its own network
//! namespace ("machine", see `pgkeel_testkit::netns`), the proxy and the clients in the test
//! process's namespace, where they reach every machine.
//!
//! A node kill (`proxy.rs`) closes the old primary's sockets at once; a partition does not:
//! packets vanish, and a transaction sent to the old primary waits for an answer that never
//! comes. Each test writes through the proxy (rows stamped with the server's `pgkeel.term`,
//! with a client timeout far longer than a failover, so a transaction left hanging shows as a
//! gap) beside the usual two writers (the multi-host DSN and one pinned to the old primary), and
//! checks: the old primary acknowledges nothing after the new one was promoted, nothing under
//! the old term after a write under the new one, and writes through the proxy resume within
//! ttl + 5 s.

mod proxy_support;

use std::time::{Duration, Instant};

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

use pgkeel_testkit::netns::{NetCluster, ETCD_HOSTS};
use pgkeel_testkit::{assert_single_writer_term, psql, wait_for, Cluster, Writer, WriterReport};
use proxy_support::{bin, free_port, http_get, metric, Proxy};

/// ttl (4 s) + 5 s, as in `partitions.rs`.
const RESTORE: Duration = Duration::from_secs(9);

/// Ids of the writer through the proxy (the multi-host writer's start at 1, the pinned one's
/// at 1,000,000,001).
const PROXY_IDS: i64 = 2_000_000_000;

/// Starts the proxy (following the cluster's etcd), the two writers of `partitions.rs` and one
/// through the proxy; returns once all three wrote.
async fn proxy_and_writers(c: &Cluster, old: &str, extra: &str) -> (Proxy, [Writer; 3]) {
    // A long connect timeout: an attempt to reach the old primary once it is unreachable has
    // to end when the DCS names another, not when it times out.
    let config = format!("failover_hold_timeout = \"30s\"\nserver_connect_timeout = \"20s\"\n{extra}");
    let p = Proxy::start(c, "proxy", &config).await;
    let (multi, pinned) = c.start_writers(old).await;
    // A minute: the proxy, not the client, has to end a transaction left on the old primary.
    let through = Writer::start_with(p.dsn(), Duration::from_millis(50), PROXY_IDS, Duration::from_secs(60));
    wait_for("writes through the proxy", Duration::from_secs(15), || async {
        (through.acked_count() >= 5).then_some(())
    })
    .await;
    (p, [multi, pinned, through])
}

/// Waits until the new primary `node` holds writes through the proxy under `term`.
async fn wait_proxy_writes(c: &Cluster, node: &str, term: u64) {
    let dsn = c.node_dsn(node);
    wait_for(&format!("writes through the proxy under term {term} on {node}"), Duration::from_secs(30), || {
        let dsn = dsn.clone();
        async move {
            let sql = format!("select count(*) from acked where id > {PROXY_IDS} and term = {term}");
            (psql(&dsn, &sql).ok()?.parse::<i64>().ok()? >= 5).then_some(())
        }
    })
    .await
}

/// Waits (up to `within`) for a leader other than `old`, and for writes through the proxy
/// under its term there; prints how long after `at` (the fault, `what`) the leader came.
async fn failover(c: &Cluster, old: &str, within: Duration, at: Instant, what: &str) -> (String, u64) {
    let (new, new_term) = c.wait_new_leader(old, within).await;
    eprintln!("new leader {new} (term {new_term}) {:?} after {what}", at.elapsed());
    wait_proxy_writes(c, &new, new_term).await;
    (new, new_term)
}

/// Waits for the old primary to stream from the new one, stops the writers and [`check`]s
/// them, with writes through the proxy resuming within 2 s of the new primary's promotion,
/// counted from the fault at `since_ms` (unix ms): for faults that slow the election itself.
async fn rejoin_and_check(
    c: &Cluster,
    (old, old_term): (&str, u64),
    (new, new_term): (&str, u64),
    writers: [Writer; 3],
    since_ms: u64,
) {
    c.wait_streaming(new, &[old.to_string()], Duration::from_secs(60)).await;
    let promoted_ms = c.promotion_time(new, new_term).await;
    let bound = Duration::from_millis(promoted_ms.saturating_sub(since_ms)) + Duration::from_secs(2);
    check(c, old_term, new, new_term, stop(writers).await, bound).await;
}

/// The checks every test makes once its writers stopped (writes through the proxy resumed
/// within `bound`); prints the figures.
async fn check(c: &Cluster, old_term: u64, new: &str, new_term: u64, reports: [WriterReport; 3], bound: Duration) {
    let [multi, pinned, through] = reports;
    let promoted = c.promotion_time(new, new_term).await;
    // The old primary (pinned) and the multi-host writer, as in partitions.rs; then the proxy's.
    assert_single_writer_term(old_term, promoted, &pinned, &multi);
    assert_single_writer_term(old_term, promoted, &pinned, &through);
    let last_old = through.acked.iter().filter(|a| a.term == old_term as i64).map(|a| a.unix_ms).max();
    assert!(
        last_old.is_some_and(|t| t < promoted),
        "through the proxy, the old term acknowledged a write at {last_old:?}, after the promotion at {promoted}"
    );
    assert!(
        through.acked.iter().any(|a| a.term == new_term as i64),
        "no write through the proxy was acknowledged under the new term"
    );
    assert!(
        through.acked.iter().all(|a| a.term == old_term as i64 || a.term == new_term as i64),
        "only the two terms served writes through the proxy"
    );
    // Replication is asynchronous: the old primary's last writes may not have reached the new
    // one. The new primary's own may not go missing.
    let under_new = WriterReport {
        acked: through.acked.iter().filter(|a| a.term == new_term as i64).copied().collect(),
        ..WriterReport::default()
    };
    let missing = c.missing_acked(new, &under_new);
    assert_eq!(missing, 0, "writes acknowledged through the proxy under the new term missing on the new primary");
    eprintln!(
        "through the proxy: {} acked, {} failed, longest gap {:?} (the multi-host DSN: {:?})",
        through.acked.len(),
        through.errors,
        through.longest_gap,
        multi.longest_gap
    );
    assert!(
        through.longest_gap <= bound,
        "writes through the proxy stopped for {:?}, more than {bound:?}",
        through.longest_gap
    );
}

/// A tokio-postgres client and its connection's task, whose result is the error that ended it.
async fn open(dsn: &str) -> (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.expect("connect through the proxy");
    (client, tokio::spawn(conn))
}

async fn stop(writers: [Writer; 3]) -> [WriterReport; 3] {
    let [a, b, d] = writers;
    [a.stop().await, b.stop().await, d.stop().await]
}

/// The primary's machine is cut from etcd only: the proxy (and the clients) still reach it.
/// Its agent has to stop it taking writes before its lease can expire; the proxy has to send
/// the next transactions to the new primary as soon as the DCS names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_follows_a_primary_cut_from_the_dcs() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (_p, writers) = proxy_and_writers(c, &old, "").await;
    let h = nc.host_of(&old);
    let at = Instant::now();
    for e in ETCD_HOSTS {
        nc.net.cut(h, e);
    }
    let (new, new_term) = failover(c, &old, RESTORE + Duration::from_secs(10), at, "the cut").await;
    for e in ETCD_HOSTS {
        nc.net.heal(h, e);
    }
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    check(c, old_term, &new, new_term, stop(writers).await, RESTORE).await;
}

/// The primary's machine is taken off the network: the proxy's connections to it hang (no
/// reset, no end of file), with a transaction in flight on one of them. The proxy has to end
/// that transaction and drop those connections once the DCS names a new primary, and send the
/// next transactions there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_follows_a_primary_isolated_completely() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (p, writers) = proxy_and_writers(c, &old, "").await;
    // Two more clients with a transaction open on the old primary: one stays idle in it, the
    // other sends its COMMIT once the old primary is unreachable.
    let (idle, idle_conn) = open(&p.dsn()).await;
    idle.batch_execute("begin; insert into acked(id, term) values (3000000001, 0)").await.expect("begin");
    let (committing, _conn) = open(&p.dsn()).await;
    committing.batch_execute("begin; insert into acked(id, term) values (3000000002, 0)").await.expect("begin");
    let at = Instant::now();
    nc.net.isolate(nc.host_of(&old));
    let commit = tokio::spawn(async move { committing.batch_execute("commit").await });
    let (new, new_term) = failover(c, &old, RESTORE + Duration::from_secs(10), at, "the isolation").await;
    // The COMMIT got no answer: the client is told its outcome is unknown, not that it is lost
    // (it may have committed before the answer was cut off).
    let e = tokio::time::timeout(Duration::from_secs(30), commit).await.expect("the COMMIT ends").expect("task");
    let e = e.expect_err("no answer can have come from the old primary");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(message.contains("the primary changed") && message.contains("is unknown"), "COMMIT: {message}");
    // The client idle in its transaction is told the transaction is lost, without asking.
    let e = tokio::time::timeout(Duration::from_secs(30), idle_conn).await.expect("the session ends").expect("task");
    let e = e.expect_err("the proxy ends the session");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(message.contains("the open transaction is lost"), "idle in transaction: {message}");
    drop(idle);
    // A fresh client reads through the proxy too, while the old primary is still unreachable.
    assert_eq!(
        psql(&p.dsn(), "/* pgkeel:primary */ select current_setting('pgkeel.term')").as_deref(),
        Ok(new_term.to_string().as_str())
    );
    nc.net.reconnect(nc.host_of(&old));
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    check(c, old_term, &new, new_term, stop(writers).await, RESTORE).await;
}

/// The etcd member the proxy (and everyone) reached first is taken off the network, then the
/// primary's machine: the proxy has to read the new leader from the other members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_follows_a_failover_after_losing_its_etcd_member() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (p, writers) = proxy_and_writers(c, &old, "").await;
    let at = Instant::now();
    let isolated_ms = unix_ms();
    nc.net.isolate(ETCD_HOSTS[0]);
    nc.net.isolate(nc.host_of(&old));
    let (new, new_term) = failover(c, &old, RESTORE + Duration::from_secs(15), at, "the isolations").await;
    // It was reading from that member (the first listed), and moved on.
    let lost = format!("etcd call failed endpoint=http://{}:2379", nc.net.hosts[ETCD_HOSTS[0]].addr);
    assert!(p.log_text().contains(&lost), "the proxy's calls to the lost member failed over");
    nc.net.reconnect(nc.host_of(&old));
    nc.net.reconnect(ETCD_HOSTS[0]);
    // The agents lose that member too, which slows the election (4 to 8 s measured): the
    // writes through the proxy have to resume within 2 s of the promotion (etcd's request
    // timeout: the proxy's first read after the loss may wait it out).
    rejoin_and_check(c, (&old, old_term), (&new, new_term), writers, isolated_ms).await;
}

/// The proxy's machine is cut from every etcd member (the database machines are not), then
/// the primary's machine is taken off the network: the proxy cannot see the failover in etcd
/// itself, and has to follow it through the agents, which still read etcd (`GET /routing`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_from_the_dcs_follows_a_failover_through_the_agents() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let metrics_port = free_port();
    let (p, writers) = proxy_and_writers(c, &old, &format!("metrics_listen = \"127.0.0.1:{metrics_port}\"")).await;
    let dcs_up = || metric(&http_get(metrics_port, "/metrics").1, "pgkeel_proxy_dcs_up");
    assert_eq!(dcs_up(), Some(1.0));
    for e in ETCD_HOSTS {
        nc.net.cut_gateway(e);
    }
    wait_for("the proxy to route from an agent's view", Duration::from_secs(30), || {
        let log = p.log_text();
        async move { log.contains("routing from what an agent reads there").then_some(()) }
    })
    .await;
    wait_for("pgkeel_proxy_dcs_up 0", Duration::from_secs(30), || async { (dcs_up() == Some(0.0)).then_some(()) })
        .await;
    let at = Instant::now();
    let isolated_ms = unix_ms();
    nc.net.isolate(nc.host_of(&old));
    let (new, new_term) = failover(c, &old, RESTORE + Duration::from_secs(10), at, "the isolation").await;
    // What the proxy read: the agent's view of etcd.
    let view = c.api(&new, "GET", "/routing", None, false).await.json().expect("GET /routing is JSON");
    assert_eq!(view["cluster"], "net");
    assert_eq!(view["leader"]["holder"], new.as_str());
    assert_eq!(view["leader_term"], new_term);
    assert!(view["members"].as_array().is_some_and(|m| m.len() >= 2), "{view}");
    nc.net.reconnect(nc.host_of(&old));
    for e in ETCD_HOSTS {
        nc.net.heal_gateway(e);
    }
    wait_for("the proxy to route from etcd again", Duration::from_secs(30), || {
        let log = p.log_text();
        async move { log.contains("routing from the DCS again").then_some(()) }
    })
    .await;
    assert_eq!(dcs_up(), Some(1.0));
    // The agents ask etcd every second: writes through the proxy resume within 2 s of the
    // promotion.
    rejoin_and_check(c, (&old, old_term), (&new, new_term), writers, isolated_ms).await;
}

/// A replica's machine is taken off the network while a read runs on it through the proxy:
/// its connection goes silent (no reset, no end of file), so only its member record expiring
/// tells. The proxy ends that session then, not after TCP keepalive's 2 minutes, and new reads
/// go to the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_replica_cut_off_ends_when_its_record_expires() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (leader, _) = c.leader().await.expect("leader");
    let p = Proxy::start(c, "proxy", "").await;
    let (client, conn) = open(&p.dsn()).await;
    client.batch_execute("set pgkeel.route = replica").await.expect("route to replicas");
    let sleep = "select pg_sleep(300)";
    let read = tokio::spawn(async move {
        let r = client.simple_query(sleep).await.map(|_| ());
        (client, r)
    });
    let replicas: Vec<String> = c.nodes().into_iter().filter(|n| *n != leader).collect();
    let replica = wait_for("the read on a replica", Duration::from_secs(20), || async {
        replicas.iter().find_map(|r| {
            let sql = format!("select count(*) from pg_stat_activity where query = '{sleep}'");
            (psql(&c.node_dsn(r), &sql).ok()? == "1").then(|| r.clone())
        })
    })
    .await;
    let host = nc.host_of(&replica);
    let at = Instant::now();
    nc.net.isolate(host);
    let (_client, r) = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the read through the proxy ends within a minute")
        .expect("task");
    let took = at.elapsed();
    eprintln!("the read on {replica}, cut off, ended after {took:?}");
    let e = r.expect_err("the replica answers nothing");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(message.contains(&format!("the replica {replica}")) && message.contains("left the cluster"), "{message}");
    assert!(conn.await.expect("task").is_err(), "the proxy ended the session");
    // The member record lives `ttl` (4 s) after the agent's last write; the proxy reads the
    // cluster every second.
    assert!(took < Duration::from_secs(10), "the read ended {took:?} after the replica was cut off");
    // New reads go to the replica that is left.
    let other = replicas.iter().find(|r| **r != replica).expect("another replica");
    let addr = &nc.net.hosts[nc.host_of(other)].addr;
    assert_eq!(psql(&p.dsn(), "select host(inet_server_addr())").as_deref(), Ok(addr.as_str()));
    nc.net.reconnect(host);
    c.wait_streaming(&leader, std::slice::from_ref(&replica), Duration::from_secs(60)).await;
}
