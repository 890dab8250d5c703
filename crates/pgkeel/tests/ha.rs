//! Behaviour of a real cluster (`pgkeel up`, real postgres processes): replication, failover on
//! node loss, repair of a crashed primary in place, switchover, pause.

use std::path::Path;
use std::time::Duration;

use pgkeel_testkit::{psql, wait_for, Cluster, Writer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_replicates_to_both_replicas_and_replicas_are_read_only() {
    let c = Cluster::up(bin(), 3).await;
    let (leader, term) = c.leader().await.expect("a leader after up");
    assert_eq!(term, 1, "the first primary runs under term 1");
    let primary = c.node_dsn(&leader);
    psql(&primary, "create table t(x int primary key); insert into t select generate_series(1, 100)").unwrap();
    assert_eq!(psql(&primary, "select current_setting('pgkeel.term')").unwrap(), "1");
    assert_eq!(psql(&primary, "show data_checksums").unwrap(), "on", "initdb enables data checksums");
    for n in c.nodes().into_iter().filter(|n| *n != leader) {
        let dsn = c.node_dsn(&n);
        wait_for(&format!("rows on {n}"), Duration::from_secs(10), || {
            let dsn = dsn.clone();
            async move { (psql(&dsn, "select count(*) from t").ok()? == "100").then_some(()) }
        })
        .await;
        let err = psql(&dsn, "insert into t values (1000)").unwrap_err();
        assert!(err.contains("cannot execute INSERT in a read-only transaction"), "{n}: {err}");
        assert_eq!(psql(&dsn, "select pg_is_in_recovery()").unwrap(), "t");
    }
    // Replication is allowed to the replication user only.
    let su = c.node_dsn(&leader).replace("/postgres", "/postgres?replication=true");
    let err = psql(&su, "IDENTIFY_SYSTEM").unwrap_err();
    assert!(err.contains("pg_hba.conf") || err.contains("no pg_hba"), "superuser must not replicate: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_promotes_best_replica_and_loses_only_in_flight_writes() {
    let mut c = Cluster::up(bin(), 3).await;
    let (old, old_term) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&old), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let writer = Writer::start(c.primary_dsn(), Duration::from_millis(50));
    wait_for("first acknowledged writes", Duration::from_secs(10), || async {
        (psql(&c.node_dsn(&old), "select count(*) from acked").ok()?.parse::<i64>().ok()? >= 10).then_some(())
    })
    .await;

    // Lose the whole node: agent and postgres together.
    let killed_ms = unix_ms();
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert!(new_term > old_term, "term must grow: {old_term} -> {new_term}");
    assert_eq!(psql(&c.node_dsn(&new), "select current_setting('pgkeel.term')").unwrap(), new_term.to_string());
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old && *n != new).collect();
    c.wait_streaming(&new, &others, Duration::from_secs(20)).await;

    // Writes continue on the new primary, under the new term.
    c.wait_writes_under_term(&new, new_term, 5).await;
    let dsn = c.node_dsn(&new);
    let report = writer.stop().await;
    // Asynchronous replication: only what was in flight at the kill may be missing.
    c.assert_only_in_flight_lost(&new, &report, killed_ms, Duration::from_secs(2));
    assert!(
        report.acked.iter().any(|a| a.term == old_term as i64)
            && report.acked.iter().any(|a| a.term == new_term as i64)
    );
    eprintln!(
        "writer: {} acked, {} failed attempts, longest gap {:?}",
        report.acked.len(),
        report.errors,
        report.longest_gap
    );

    // History records the failover.
    let hist = c.api(&new, "GET", "/history", None, false).await.json().unwrap();
    let last = hist.as_array().and_then(|h| h.last()).cloned().unwrap();
    assert_eq!(last["reason"], "failover");
    assert_eq!(last["new_primary"], new.as_str());
    assert_eq!(last["old_primary"], old.as_str());

    // The lost node comes back as a replica of the new primary: its timeline diverged (it was
    // killed as primary), so it is rewound with pg_rewind, not re-cloned.
    c.start_agent(&old);
    c.wait_streaming(&new, std::slice::from_ref(&old), Duration::from_secs(40)).await;
    let log = std::fs::read_to_string(c.dir().join("nodes").join(&old).join("agent.log")).unwrap();
    assert!(log.contains(&format!("rewound onto {new}'s timeline")), "expected a rewind:\n{log}");
    assert!(!c.dir().join("nodes").join(&old).join("data.old").exists(), "no re-clone after a successful rewind");
    let count = psql(&dsn, "select count(*) from acked").unwrap();
    let dsn_old = c.node_dsn(&old);
    wait_for("rejoined node has every row", Duration::from_secs(10), || {
        let (dsn_old, count) = (dsn_old.clone(), count.clone());
        async move { (psql(&dsn_old, "select count(*) from acked").ok()? == count).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_primary_postgres_is_restarted_in_place() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, term) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&leader), "create table t(x int)").unwrap();
    let started = std::time::Instant::now();
    c.kill_postgres(&leader);
    // primary_start_timeout is 10 s by default: the repair must come well within it.
    let dsn = c.node_dsn(&leader);
    wait_for("the primary writable again in place", Duration::from_secs(10), || {
        let dsn = dsn.clone();
        async move { psql(&dsn, "insert into t values (1)").ok() }
    })
    .await;
    eprintln!("primary repaired in place after {:?}", started.elapsed());
    let (now, now_term) = wait_for("the leader reports running", Duration::from_secs(5), || c.leader()).await;
    assert_eq!((now.as_str(), now_term), (leader.as_str(), term), "no failover for a crash that restarts in time");
    let hist = c.api(&leader, "GET", "/history", None, false).await.json().unwrap();
    assert_eq!(hist.as_array().map(Vec::len), Some(1), "only the bootstrap in history: {hist}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_streaming_from_the_running_leader_is_restarted() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, _) = c.leader().await.expect("leader");
    let replica = c.nodes().into_iter().find(|n| *n != leader).unwrap();
    let dsn = c.node_dsn(&replica);
    let started_at = || psql(&dsn, "select pg_postmaster_start_time()").unwrap();
    let first_start = started_at();
    // Wedge the WAL receiver behind pgkeel's back: ALTER SYSTEM wins over pgkeel.conf.
    psql(&dsn, "alter system set primary_conninfo = 'host=127.0.0.1 port=1 connect_timeout=1'").unwrap();
    psql(&dsn, "select pg_reload_conf()").unwrap();
    // The agent notices after max(3 x ttl, 10 s) and restarts postgres, saying why.
    wait_for("the stalled replica restarted by its agent", Duration::from_secs(40), || {
        let dsn = dsn.clone();
        let first = first_start.clone();
        async move { psql(&dsn, "select pg_postmaster_start_time()").ok().filter(|t| *t != first) }
    })
    .await;
    let log = std::fs::read_to_string(c.dir().join("nodes").join(&replica).join("agent.log")).unwrap();
    assert!(log.contains("has not streamed from the running leader"), "the agent says why it restarted postgres");
    // Once the bad setting is gone, it streams again.
    wait_for("ALTER SYSTEM reset", Duration::from_secs(20), || {
        let dsn = dsn.clone();
        async move {
            psql(&dsn, "alter system reset primary_conninfo").ok()?;
            psql(&dsn, "select pg_reload_conf()").ok()
        }
    })
    .await;
    c.wait_streaming(&leader, std::slice::from_ref(&replica), Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_to_named_member_and_old_primary_rejoins() {
    let c = Cluster::up(bin(), 3).await;
    let (old, term) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&old), "create table t(x int); insert into t values (1)").unwrap();
    let target = c.nodes().into_iter().find(|n| *n != old).unwrap();
    let out = c.ctl(&["switchover", "--to", &target]);
    assert!(out.status.success(), "switchover failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&target));
    let (new, new_term) = c.leader().await.expect("leader after switchover");
    assert_eq!(new, target);
    assert!(new_term > term);
    let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != new).collect();
    c.wait_streaming(&new, &others, Duration::from_secs(20)).await;
    assert!(!c.dir().join("nodes").join(&old).join("data.old").exists(), "a clean switchover needs no re-clone");
    assert_eq!(psql(&c.node_dsn(&new), "select count(*) from t").unwrap(), "1");
    let hist = c.api(&new, "GET", "/history", None, false).await.json().unwrap();
    assert_eq!(hist.as_array().unwrap().last().unwrap()["reason"], "switchover");

    // A switchover to a member that does not exist is refused with Patroni's 412.
    let r = c.api(&new, "POST", "/switchover", Some(&serde_json::json!({"candidate": "nope"})), true).await;
    assert_eq!(r.status, 412, "{}", r.text());
    assert!(r.text().contains("not a live member"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_prevents_failover_until_resumed() {
    let c = Cluster::up(bin(), 2).await;
    let (old, _) = c.leader().await.expect("leader");
    let out = c.ctl(&["pause"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = c.ctl(&["list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("PAUSED"), "list says paused");
    wait_for("every agent sees the pause", Duration::from_secs(10), || async {
        let mut all = true;
        for n in c.nodes() {
            all &= c.api(&n, "GET", "/node", None, false).await.json().ok()?["paused"] == true;
        }
        all.then_some(())
    })
    .await;
    // In pause a switchover must name its candidate (nobody races), and then it works.
    let out = c.ctl(&["switchover"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused"), "{}", String::from_utf8_lossy(&out.stderr));
    let first = old.clone();
    let old = c.nodes().into_iter().find(|n| *n != first).unwrap();
    let out = c.ctl(&["switchover", "--to", &old]);
    assert!(out.status.success(), "switchover in pause: {}", String::from_utf8_lossy(&out.stderr));
    c.wait_streaming(&old, std::slice::from_ref(&first), Duration::from_secs(20)).await;

    c.kill_node(&old);
    // Two lease lengths pass without anyone promoting.
    let other = c.nodes().into_iter().find(|n| *n != old).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(9);
    while std::time::Instant::now() < deadline {
        let node = c.api(&other, "GET", "/node", None, false).await.json().unwrap();
        assert_eq!(node["role"], "replica", "no promotion while paused: {node}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = c.ctl(&["resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (new, _) = wait_for("failover after resume", Duration::from_secs(20), || async {
        c.leader().await.filter(|(n, _)| *n != old)
    })
    .await;
    assert_eq!(new, other);
    assert_eq!(psql(&c.node_dsn(&new), "select pg_is_in_recovery()").unwrap(), "f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_resumes_the_same_cluster() {
    let c = Cluster::up(bin(), 1).await;
    let (leader, _) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&leader), "create table keep(x int); insert into keep values (42)").unwrap();
    let dir = c.dir().display().to_string();
    let out = c.cli(&["down", "--dir", &dir]);
    assert!(out.status.success());
    assert!(c.postmaster_pid(&leader).is_none() && c.agent_pid(&leader).is_none(), "down stops everything");
    let out = c.cli(&["up", "--detach", "--dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    assert_eq!(psql(&c.node_dsn(&leader), "select x from keep").unwrap(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_in_the_foreground_shows_status_and_ctrl_c_stops_everything() {
    let mut c = Cluster::up_foreground(bin(), 2).await;
    let nodes = c.nodes();
    let pids: Vec<i32> = nodes.iter().flat_map(|n| [c.agent_pid(n), c.postmaster_pid(n)]).flatten().collect();
    assert_eq!(pids.len(), 4, "two agents and two postmasters run");
    // The live status line names every member.
    let out = c.dir().join("up.out");
    wait_for("a status line", Duration::from_secs(10), || {
        let out = out.clone();
        async move {
            std::fs::read_to_string(out)
                .ok()?
                .lines()
                .any(|l| l.starts_with("term 1 |") && l.contains("streaming"))
                .then_some(())
        }
    })
    .await;
    let (ok, text) = c.interrupt_foreground(libc::SIGINT).await;
    assert!(ok, "pgkeel up exits 0 after Ctrl-C:\n{text}");
    assert!(text.contains("stopped"), "{text}");
    for p in pids {
        assert!(!pgkeel_testkit::alive(p), "process {p} still runs after Ctrl-C:\n{text}");
    }
}

/// A foreground `up` whose terminal hangs up (SIGHUP) stops the cluster as Ctrl-C does,
/// instead of dying and leaving it running unattended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_in_the_foreground_stops_the_cluster_when_its_terminal_hangs_up() {
    let mut c = Cluster::up_foreground(bin(), 1).await;
    let node = c.nodes().remove(0);
    let pids: Vec<i32> = [c.agent_pid(&node), c.postmaster_pid(&node)].into_iter().flatten().collect();
    assert_eq!(pids.len(), 2, "an agent and a postmaster run");
    let (ok, text) = c.interrupt_foreground(libc::SIGHUP).await;
    assert!(ok, "pgkeel up exits 0 after a hang-up:\n{text}");
    assert!(text.contains("the terminal hung up (SIGHUP)") && text.contains("stopped"), "{text}");
    for p in pids {
        assert!(!pgkeel_testkit::alive(p), "process {p} still runs after the hang-up:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_applies_pending_parameters_and_reinit_replaces_a_replica() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(20)).await;
    // max_connections needs a restart: every member flags it as pending.
    let out = c.ctl(&["config", "set", "postgresql.parameters.max_connections=120"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("pending restart on every member", Duration::from_secs(15), || async {
        let list = String::from_utf8_lossy(&c.ctl(&["list"]).stdout).to_string();
        (list.lines().filter(|l| l.trim_end().ends_with('*')).count() == 2).then_some(())
    })
    .await;
    let out = c.ctl(&["restart", "--all", "--pending"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{replica}: restarted")) && text.contains(&format!("{leader}: restarted")),
        "{text}"
    );
    assert!(text.contains("Successfully switched over"), "the leader is restarted after a switchover: {text}");
    assert!(!text.contains("skipped"), "every pending member is restarted: {text}");
    let (new_leader, _) = c.leader().await.expect("leader");
    assert_eq!(new_leader, replica);
    for n in c.nodes() {
        assert_eq!(psql(&c.node_dsn(&n), "show max_connections").unwrap(), "120", "{n}");
    }
    // Nothing pending any more: a second pass restarts nobody.
    let out = c.ctl(&["restart", "--all", "--pending"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && !text.contains("restarted"), "{text}");

    // Reinitialize the replica (the former leader): a fresh clone, old data kept aside.
    let out = c.ctl(&["reinit", &new_leader]);
    assert_eq!(out.status.code(), Some(1), "the leader cannot be reinitialized");
    assert!(String::from_utf8_lossy(&out.stderr).contains("switch over first"));
    let out = c.ctl(&["reinit", &leader]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c.dir().join("nodes").join(&leader).join("data.old/PG_VERSION").exists());
    c.wait_streaming(&new_leader, std::slice::from_ref(&leader), Duration::from_secs(30)).await;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
