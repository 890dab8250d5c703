//! Fencing: a primary whose agent is killed or frozen stops accepting writes before its lease
//! can expire for the others, enforced by the guard process outside the agent.
//!
//! Each test runs two writers: one through the multi-host read-write DSN (it follows the
//! failover) and one pinned to the old primary. The old primary must acknowledge nothing after
//! the new primary was promoted, and the multi-host writer never sees the old term again once
//! it has seen the new one.

use std::path::Path;
use std::time::{Duration, Instant};

use pgkeel_testkit::{assert_single_writer_term, psql, signal, Cluster, Writer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

async fn setup(c: &Cluster) -> (String, u64, Writer, Writer) {
    let (old, term) = c.leader().await.expect("leader");
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old).collect();
    c.wait_streaming(&old, &others, Duration::from_secs(20)).await;
    let (multi, pinned) = c.start_writers(&old).await;
    (old, term, multi, pinned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_agent_is_fenced_before_its_lease_expires() {
    let c = Cluster::up(bin(), 3).await;
    let (old, old_term, multi, pinned) = setup(&c).await;
    let agent = c.agent_pid(&old).expect("agent pid");
    let frozen_at = Instant::now();
    signal(agent, libc::SIGSTOP);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert!(new_term > old_term);
    // Keep the agent frozen for 2 × ttl in all (the fault's length, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(frozen_at.elapsed())).await;
    signal(agent, libc::SIGCONT);
    // After the thaw the old node rejoins as a replica of the new primary and accepts no write.
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let err = psql(&c.node_dsn(&old), "insert into acked values (-1, 0)").unwrap_err();
    assert!(err.contains("read-only"), "{err}");
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
    let log = std::fs::read_to_string(c.dir().join("nodes").join(&old).join("guard.log")).unwrap();
    assert!(
        log.contains(&format!("lease of term {old_term} not renewed in time: killed postgres")),
        "guard log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_agent_is_fenced_and_rejoins() {
    let mut c = Cluster::up(bin(), 3).await;
    let (old, old_term, multi, pinned) = setup(&c).await;
    let postmaster = c.postmaster_pid(&old).expect("postmaster");
    c.kill_agent(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert!(new_term > old_term);
    assert!(!pgkeel_testkit::alive(postmaster), "the guard stopped the old primary's postgres");
    c.wait_writes_under_term(&new, new_term, 5).await;
    let (multi, pinned) = (multi.stop().await, pinned.stop().await);
    assert_single_writer_term(old_term, c.promotion_time(&new, new_term).await, &pinned, &multi);
    // The agent comes back and finds its fenced data diverged. Its node.toml now has a wrong
    // superuser password, so pg_rewind fails: it falls back to a fresh clone, keeping the old
    // data directory aside, and rejoins.
    let toml = c.dir().join("nodes").join(&old).join("node.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let pw = c.info["superuser"]["password"].as_str().unwrap();
    std::fs::write(&toml, text.replacen(pw, "wrong-password", 1)).unwrap();
    c.start_agent(&old);
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(c.dir().join("nodes").join(&old).join("agent.log")).unwrap();
    assert!(log.contains("pg_rewind did not work"), "{log}");
    assert!(c.dir().join("nodes").join(&old).join("data.old").join("PG_VERSION").exists(), "old data kept aside");
}
