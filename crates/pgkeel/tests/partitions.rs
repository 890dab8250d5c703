//! Multi-host fault tests: every etcd member and every pgkeel node (agent + postgres) on its
//! own network namespace ("machine") on a bridge; the test process is the client.
//!
//! Each test runs a writer through the multi-host DSN and one pinned to the old primary, each
//! stamping rows with `pgkeel.term`, and checks: the old primary acknowledges nothing after
//! the new one was promoted (at most one term accepts writes at any instant), no write under
//! an old term after one under a newer term, and service restored within ttl + 5 s wherever a
//! healthy majority exists; or no failover at all while the DCS quorum and the primary are
//! healthy.

use std::path::Path;
use std::time::{Duration, Instant};

use pgkeel_testkit::netns::{NetCluster, ETCD_HOSTS};
use pgkeel_testkit::{psql, wait_for, Cluster, Writer, WriterReport};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

const RESTORE: Duration = Duration::from_secs(9); // ttl 4 s + 5 s

async fn writers(c: &Cluster, old: &str) -> (Writer, Writer) {
    psql(&c.node_dsn(old), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let multi = Writer::start(c.primary_dsn(), Duration::from_millis(50));
    let pinned = Writer::start_at(c.node_dsn(old), Duration::from_millis(50), 1_000_000_000);
    let dsn = c.node_dsn(old);
    wait_for("both writers writing", Duration::from_secs(15), || {
        let dsn = dsn.clone();
        async move {
            let n: i64 = psql(
                &dsn,
                "select count(*) filter (where id > 1000000000) * count(*) filter (where id < 1000000000) from acked",
            )
            .ok()?
            .parse()
            .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
    (multi, pinned)
}

async fn promotion_time(c: &Cluster, new: &str, term: u64) -> u64 {
    let hist = c.api(new, "GET", "/history", None, false).await.json().unwrap();
    hist.as_array()
        .unwrap()
        .iter()
        .find(|h| h["term"] == term)
        .and_then(|h| h["time_ms"].as_u64())
        .expect("history entry")
}

fn check_single_writer_term(old_term: u64, promoted_ms: u64, pinned: &WriterReport, multi: &WriterReport) {
    let last_old = pinned.acked.iter().filter(|a| a.term == old_term as i64).map(|a| a.unix_ms).max().unwrap_or(0);
    assert!(
        last_old < promoted_ms,
        "the old primary acknowledged a write at {last_old}, after the promotion at {promoted_ms}"
    );
    if let Some(first_new) = multi.acked.iter().position(|a| a.term > old_term as i64) {
        assert!(
            multi.acked[first_new..].iter().all(|a| a.term > old_term as i64),
            "an old-term write followed a new-term one"
        );
    }
}

/// Wait for a new leader, within ttl + 5 s of `fault_at`.
async fn new_leader(c: &Cluster, old: &str, old_term: u64, fault_at: Instant) -> (String, u64) {
    let (new, term) = wait_for("a new leader", RESTORE + Duration::from_secs(10), || async {
        c.leader().await.filter(|(n, _)| n != old)
    })
    .await;
    let took = fault_at.elapsed();
    assert!(term > old_term);
    assert!(took <= RESTORE, "service restored after {took:?}, more than ttl + 5 s");
    eprintln!("new leader {new} (term {term}) {took:?} after the fault");
    (new, term)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_isolated_completely() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (multi, pinned) = writers(c, &old).await;
    let at = Instant::now();
    nc.net.isolate(nc.host_of(&old));
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old && *n != new).collect();
    c.wait_streaming(&new, &others, Duration::from_secs(30)).await;
    nc.net.reconnect(nc.host_of(&old));
    // Back on the network, the old primary has demoted itself: it rejoins as a replica.
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    check_single_writer_term(old_term, promotion_time(c, &new, new_term).await, &pinned, &multi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_the_dcs_only() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (multi, pinned) = writers(c, &old).await;
    let h = nc.host_of(&old);
    let at = Instant::now();
    for e in ETCD_HOSTS {
        nc.net.cut(h, e);
    }
    // Clients and replicas still reach the old primary: it must stop taking writes itself
    // before its lease can expire for the others.
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    let dsn = c.node_dsn(&new);
    wait_for("writes under the new term", Duration::from_secs(20), || {
        let dsn = dsn.clone();
        async move {
            (psql(&dsn, &format!("select count(*) from acked where term = {new_term}")).ok()?.parse::<i64>().ok()? >= 5)
                .then_some(())
        }
    })
    .await;
    for e in ETCD_HOSTS {
        nc.net.heal(h, e);
    }
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    check_single_writer_term(old_term, promotion_time(c, &new, new_term).await, &pinned, &multi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_its_replicas_and_an_etcd_member_lost_cause_no_failover() {
    let mut nc = NetCluster::start(bin(), 3).await;
    let (old, old_term) = nc.cluster.leader().await.expect("leader");
    let (multi, pinned) = writers(&nc.cluster, &old).await;
    let h = nc.host_of(&old);
    let replicas: Vec<String> = nc.cluster.nodes().into_iter().filter(|n| *n != old).collect();
    for r in &replicas {
        nc.net.cut(h, nc.host_of(r));
    }
    nc.kill_etcd(0);
    // The DCS keeps its quorum and the primary is healthy: two lease lengths without any
    // change of leader or term, and writes go on.
    let until = Instant::now() + Duration::from_secs(8);
    let mut seen = 0;
    while Instant::now() < until {
        if let Some((leader, term)) = nc.cluster.leader().await {
            assert_eq!((leader.as_str(), term), (old.as_str(), old_term), "no failover");
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen >= 10, "the cluster answered only {seen} times");
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    let last = multi.acked.last().map(|a| a.unix_ms).unwrap_or(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now - last < 2000, "writes went on during the partition");
    assert!(multi.acked.iter().chain(&pinned.acked).all(|a| a.term == old_term as i64));
    for r in &replicas {
        nc.net.heal(h, nc.host_of(r));
    }
    nc.cluster.wait_streaming(&old, &replicas, Duration::from_secs(60)).await;
}
