//! Multi-host fault tests: every etcd member and every pgkeel node (agent + postgres) on its
//! own network namespace ("machine") on a bridge; the test process is the client.
//!
//! Each test runs a writer through the multi-host DSN and one pinned to the old primary, each
//! stamping rows with `pgkeel.term`, and checks: the old primary acknowledges nothing after
//! the new one was promoted (at most one term accepts writes at any instant), no write under
//! an old term after one under a newer term, and service restored within ttl + 5 s wherever a
//! healthy majority exists; or no failover at all while the DCS quorum and the primary are
//! healthy. In the synchronous scenario, also that no acknowledged commit is lost.

use std::path::Path;
use std::time::{Duration, Instant};

use pgkeel_testkit::netns::{NetCluster, ETCD_HOSTS};
use pgkeel_testkit::{assert_single_writer_term, psql, signal, wait_for, Cluster};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

const RESTORE: Duration = Duration::from_secs(9); // ttl 4 s + 5 s

/// Wait for a new leader, within ttl + 5 s of `fault_at`.
async fn new_leader(c: &Cluster, old: &str, old_term: u64, fault_at: Instant) -> (String, u64) {
    let (new, term) = c.wait_new_leader(old, RESTORE + Duration::from_secs(10)).await;
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
    let (multi, pinned) = c.start_writers(&old).await;
    let at = Instant::now();
    nc.net.isolate(nc.host_of(&old));
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old && *n != new).collect();
    c.wait_streaming(&new, &others, Duration::from_secs(30)).await;
    nc.net.reconnect(nc.host_of(&old));
    // Back on the network, the old primary has demoted itself: it rejoins as a replica.
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_the_dcs_only() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (multi, pinned) = c.start_writers(&old).await;
    let h = nc.host_of(&old);
    let at = Instant::now();
    for e in ETCD_HOSTS {
        nc.net.cut(h, e);
    }
    // Clients and replicas still reach the old primary: it must stop taking writes itself
    // before its lease can expire for the others.
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    c.wait_writes_under_term(&new, new_term, 5).await;
    for e in ETCD_HOSTS {
        nc.net.heal(h, e);
    }
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_its_replicas_and_an_etcd_member_lost_cause_no_failover() {
    let mut nc = NetCluster::start(bin(), 3).await;
    let (old, old_term) = nc.cluster.leader().await.expect("leader");
    let (multi, pinned) = nc.cluster.start_writers(&old).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_agent_frozen_for_two_ttl() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let (multi, pinned) = c.start_writers(&old).await;
    let agent = c.agent_pid(&old).expect("agent pid");
    let at = Instant::now();
    signal(agent, libc::SIGSTOP);
    // The guard on the old primary's host fences postgres before the lease can expire.
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    // The fault lasts 2 × ttl in all (its length, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(at.elapsed())).await;
    signal(agent, libc::SIGCONT);
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let err = psql(&c.node_dsn(&old), "insert into acked values (-1, 0)").unwrap_err();
    assert!(err.contains("read-only"), "{err}");
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_standby_killed_then_primary_killed_loses_nothing() {
    let nc = NetCluster::start(bin(), 3).await;
    let c = &nc.cluster;
    let (old, old_term) = c.leader().await.expect("leader");
    let out = c.ctl(&["config", "set", "synchronous_mode=on"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replicas: Vec<String> = c.nodes().into_iter().filter(|n| *n != old).collect();
    let sync_standby = || async {
        let v = c.cluster_json().await?;
        let members = v["sync"]["members"].as_array()?.clone();
        (v["sync"]["leader"] == old.as_str() && members.len() == 1).then(|| members[0].as_str().map(String::from))?
    };
    let first = wait_for("a confirmed synchronous standby", Duration::from_secs(30), sync_standby).await;
    let (multi, pinned) = c.start_writers(&old).await;
    c.wait_writes_under_term(&old, old_term, 20).await;

    // The synchronous standby's machine dies: the role moves to the other replica, with no
    // failover and writes going on.
    c.kill_node(&first);
    let second = replicas.iter().find(|r| **r != first).unwrap().clone();
    wait_for("the other replica confirmed synchronous", Duration::from_secs(30), || async {
        (sync_standby().await? == second).then_some(())
    })
    .await;
    assert_eq!(c.leader().await.map(|l| l.0), Some(old.clone()), "no failover for a lost standby");
    let before = multi.acked_count();
    wait_for("writes after the standby loss", Duration::from_secs(15), || async {
        (multi.acked_count() >= before + 20).then_some(())
    })
    .await;

    // Then the primary's machine dies too: only the synchronous standby may take over, and it
    // has every acknowledged commit.
    let at = Instant::now();
    nc.net.isolate(nc.host_of(&old));
    let (new, new_term) = new_leader(c, &old, old_term, at).await;
    assert_eq!(new, second, "only the synchronous standby is promoted");
    c.wait_writes_under_term(&new, new_term, 5).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
    for w in [&multi, &pinned] {
        assert_eq!(c.missing_acked(&new, w), 0, "acknowledged commits lost (of {} acked)", w.acked.len());
    }
}
