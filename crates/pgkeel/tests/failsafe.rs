//! DCS outage: without failsafe the primary demotes before its lease runs out; with failsafe
//! it stays writable while every member confirms it, takes its key back when the DCS returns,
//! and demotes as soon as one member stops confirming. Nobody promotes without the DCS.

use std::path::Path;
use std::time::{Duration, Instant};

use pgkeel_testkit::{psql, signal, wait_for, Cluster};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

fn etcd_pid(c: &Cluster) -> i32 {
    c.etcd.as_ref().expect("etcd").members()[0].pid().expect("etcd runs") as i32
}

/// Exactly one member runs as a writable primary.
fn primaries(c: &Cluster) -> Vec<String> {
    c.nodes()
        .into_iter()
        .filter(|n| psql(&c.node_dsn(n), "select pg_is_in_recovery()").ok().as_deref() == Some("f"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcs_outage_without_failsafe_demotes_the_primary_and_nobody_promotes() {
    let c = Cluster::up_on_etcd(bin(), 3, 1).await;
    let (leader, _) = c.leader().await.expect("leader");
    let dsn = c.node_dsn(&leader);
    psql(&dsn, "create table t(x int)").unwrap();
    let etcd = etcd_pid(&c);
    signal(etcd, libc::SIGSTOP);
    let started = Instant::now();
    wait_for("the primary stops accepting writes", Duration::from_secs(10), || {
        let dsn = dsn.clone();
        async move { psql(&dsn, "insert into t values (1)").is_err().then_some(()) }
    })
    .await;
    let demoted_after = started.elapsed();
    assert!(demoted_after < Duration::from_secs(4), "demoted before the 4 s lease could run out: {demoted_after:?}");
    assert!(primaries(&c).is_empty(), "nobody promotes without the DCS");
    signal(etcd, libc::SIGCONT);
    // Right after the resume, etcd may still show the old (frozen) leader key and records.
    wait_for("exactly one primary after the DCS returns", Duration::from_secs(60), || async {
        (primaries(&c).len() == 1).then_some(())
    })
    .await;
    wait_for("a leader again after the DCS returns", Duration::from_secs(30), || c.leader()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_keeps_the_primary_while_every_member_confirms_it() {
    let c = Cluster::up_on_etcd(bin(), 3, 1).await;
    let (leader, term) = c.leader().await.expect("leader");
    let dsn = c.node_dsn(&leader);
    psql(&dsn, "create table t(x int)").unwrap();
    let out = c.ctl(&["config", "set", "failsafe_mode=true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("every agent applied failsafe_mode", Duration::from_secs(10), || async {
        let mut all = true;
        for n in c.nodes() {
            all &= c.api(&n, "GET", "/node", None, false).await.json().ok()?["failsafe_mode"] == true;
        }
        all.then_some(())
    })
    .await;

    // The DCS goes away for three lease lengths: every member confirms the primary, which
    // keeps taking writes; nobody else promotes.
    let etcd = etcd_pid(&c);
    signal(etcd, libc::SIGSTOP);
    let until = Instant::now() + Duration::from_secs(12);
    let mut n = 0;
    while Instant::now() < until {
        psql(&dsn, &format!("insert into t values ({n})"))
            .unwrap_or_else(|e| panic!("write {n} failed during the outage: {e}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(primaries(&c), vec![leader.clone()]);

    // The DCS returns (the leader key expired meanwhile): the same primary takes it back.
    signal(etcd, libc::SIGCONT);
    let (again, new_term) = wait_for("the leader key back", Duration::from_secs(30), || c.leader()).await;
    assert_eq!(again, leader, "no failover after a failsafe outage");
    assert!(new_term >= term);
    psql(&dsn, "insert into t values (-1)").unwrap();

    // Second outage, and one replica's agent stops answering: not every member confirms, so
    // the primary demotes; still nobody promotes.
    let replica = c.nodes().into_iter().find(|n| *n != leader).unwrap();
    let agent = c.agent_pid(&replica).expect("agent");
    signal(agent, libc::SIGSTOP);
    signal(etcd, libc::SIGSTOP);
    wait_for("the primary demotes without every confirmation", Duration::from_secs(10), || {
        let dsn = dsn.clone();
        async move { psql(&dsn, "insert into t values (2)").is_err().then_some(()) }
    })
    .await;
    assert!(primaries(&c).is_empty(), "nobody promotes without the DCS");
    signal(agent, libc::SIGCONT);
    signal(etcd, libc::SIGCONT);
    wait_for("a leader again", Duration::from_secs(60), || c.leader()).await;
    wait_for("exactly one primary", Duration::from_secs(30), || async { (primaries(&c).len() == 1).then_some(()) })
        .await;
}
