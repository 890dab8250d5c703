//! A cluster whose state lives in a real 3-member etcd: losing one etcd member changes
//! nothing; losing the primary's node fails over, losing at most the writes in flight.

use std::path::Path;
use std::time::{Duration, Instant};

use pgkeel_testkit::{psql, wait_for, Cluster, Writer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_loss_is_harmless_and_node_loss_fails_over() {
    let mut c = Cluster::up_on_etcd(bin(), 3, 3).await;
    let (old, old_term) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&old), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let writer = Writer::start(c.primary_dsn(), Duration::from_millis(50));

    // One etcd member dies (the first endpoint every agent tries): the DCS keeps its quorum,
    // so for two lease lengths the leader and its term stay the same.
    c.etcd.as_mut().expect("etcd").kill(0);
    let until = Instant::now() + Duration::from_secs(8);
    let mut seen = 0;
    while Instant::now() < until {
        // While etcd elects a new leader the DCS (and so /cluster) may not answer for a moment;
        // what must never happen is another leader or another term.
        if let Some((leader, term)) = c.leader().await {
            assert_eq!(
                (leader.as_str(), term),
                (old.as_str(), old_term),
                "no failover while the DCS quorum and the primary are healthy"
            );
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen >= 10, "the cluster answered only {seen} times in 8 s");
    let (leader, term) = wait_for("the leader", Duration::from_secs(10), || c.leader()).await;
    assert_eq!((leader.as_str(), term), (old.as_str(), old_term));

    // The primary's node dies: a replica takes over through etcd.
    let started = Instant::now();
    let killed_ms = unix_ms();
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert!(new_term > old_term);
    eprintln!("new leader {new} after {:?}", started.elapsed());
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old && *n != new).collect();
    c.wait_streaming(&new, &others, Duration::from_secs(30)).await;
    c.wait_writes_under_term(&new, new_term, 5).await;
    let report = writer.stop().await;
    // Asynchronous replication: only what was in flight at the kill may be missing.
    c.assert_only_in_flight_lost(&new, &report, killed_ms, Duration::from_secs(2));

    // The lost node returns and rejoins by rewind.
    c.start_agent(&old);
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(40)).await;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
