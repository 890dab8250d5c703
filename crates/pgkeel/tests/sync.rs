//! Synchronous replication: in `on` and `strict` a failover promotes only a synchronous
//! standby (no acknowledged commit lost); losing the synchronous standby moves the role to
//! another; in `strict` no commit is acknowledged without one. In `quorum` (`ANY k`) the voter
//! with the most WAL takes over, and configuration changes go through a joint key.

use std::path::Path;
use std::time::Duration;

use pgkeel_testkit::{connect, psql, wait_for, Cluster, Writer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

/// Set the mode and wait until exactly one replica is the confirmed synchronous standby, both
/// in the `sync` key (`/sync` answers 200) and in the primary's pg_stat_replication.
async fn sync_standby(c: &Cluster, mode: &str, leader: &str) -> String {
    let out = c.ctl(&["config", "set", &format!("synchronous_mode={mode}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leader_dsn = c.node_dsn(leader);
    wait_for("a confirmed synchronous standby", Duration::from_secs(20), || async {
        let mut sync = vec![];
        for n in c.nodes().into_iter().filter(|n| n != leader) {
            if c.api(&n, "GET", "/sync", None, false).await.status == 200 {
                sync.push(n);
            }
        }
        let in_pg = psql(
            &leader_dsn,
            "select string_agg(application_name, ',') from pg_stat_replication where sync_state = 'sync'",
        )
        .ok()?;
        (sync.len() == 1 && in_pg == sync[0]).then(|| sync.remove(0))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_on_fails_over_only_to_the_sync_standby_and_loses_nothing() {
    let c = Cluster::up(bin(), 3).await;
    let (old, old_term) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&old), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let sync = sync_standby(&c, "on", &old).await;
    assert_eq!(c.api(&old, "GET", "/sync", None, false).await.status, 503, "the primary is not a sync standby");
    let writer = Writer::start(c.primary_dsn(), Duration::from_millis(20));
    let dsn = c.node_dsn(&old);
    wait_for("writes", Duration::from_secs(10), || {
        let dsn = dsn.clone();
        async move { (psql(&dsn, "select count(*) from acked").ok()?.parse::<i64>().ok()? >= 20).then_some(()) }
    })
    .await;
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert_eq!(new, sync, "only the synchronous standby may be promoted");
    assert!(new_term > old_term);
    c.wait_writes_under_term(&new, new_term, 5).await;
    let report = writer.stop().await;
    let missing = c.missing_acked(&new, &report);
    assert_eq!(missing, 0, "acknowledged commits lost (of {} acked)", report.acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_moves_the_sync_role_and_never_commits_without_a_sync_standby() {
    let mut c = Cluster::up(bin(), 3).await;
    let (leader, _) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&leader), "create table t(x int)").unwrap();
    let first = sync_standby(&c, "strict", &leader).await;
    let other = c.nodes().into_iter().find(|n| *n != leader && *n != first).unwrap();

    // The synchronous standby dies: the primary names the other replica and writes go on.
    c.kill_node(&first);
    let leader_dsn = c.node_dsn(&leader);
    wait_for("the other replica takes the synchronous role", Duration::from_secs(20), || {
        let dsn = leader_dsn.clone();
        let other = other.clone();
        async move {
            (psql(&dsn, "select string_agg(application_name, ',') from pg_stat_replication where sync_state = 'sync'")
                .ok()?
                == other)
                .then_some(())
        }
    })
    .await;
    let client = connect(&leader_dsn).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.execute("insert into t values (1)", &[]))
        .await
        .expect("a commit completes with the new synchronous standby")
        .unwrap();
    assert_eq!(leader, c.leader().await.expect("leader").0, "no failover for a lost standby");

    // The last replica dies too: strict acknowledges no commit (it waits; a statement timeout
    // would not do, since postgres reports a cancelled wait as committed).
    c.kill_node(&other);
    // Until its WAL receiver is gone too, the dying standby may still flush and confirm.
    wait_for("no standby connected", Duration::from_secs(10), || {
        let dsn = leader_dsn.clone();
        async move { (psql(&dsn, "select count(*) from pg_stat_replication").ok()? == "0").then_some(()) }
    })
    .await;
    let pending = tokio::spawn(async move { client.execute("insert into t values (2)", &[]).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    if pending.is_finished() {
        panic!("strict answered a commit without a synchronous standby: {:?}", pending.await);
    }
    // A standby returns: the waiting commit completes.
    c.start_agent(&other);
    tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the commit completes once a synchronous standby is back")
        .unwrap()
        .unwrap();
}

/// The quorum configurations of the `sync` key, as `ANY k (a, b)` strings, when `leader`
/// wrote it.
async fn quorum_key(c: &Cluster, leader: &str) -> Option<Vec<String>> {
    let v = c.cluster_json().await?;
    let sync = &v["sync"];
    (sync["leader"] == leader).then(|| {
        sync["quorum"]
            .as_array()
            .map(|qs| {
                qs.iter()
                    .map(|q| {
                        let voters: Vec<&str> =
                            q["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                        format!("ANY {} ({})", q["k"], voters.join(", "))
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

async fn wait_quorum_key(c: &Cluster, leader: &str, want: &str) {
    wait_for(&format!("the sync key of {leader} to be [{want}]"), Duration::from_secs(30), || async {
        (quorum_key(c, leader).await? == [want.to_string()]).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_fails_over_to_the_most_advanced_voter_and_changes_configuration_safely() {
    let mut c = Cluster::up(bin(), 3).await;
    let (old, old_term) = c.leader().await.expect("leader");
    let mut replicas: Vec<String> = c.nodes().into_iter().filter(|n| *n != old).collect();
    replicas.sort();
    psql(&c.node_dsn(&old), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let out = c.ctl(&["config", "set", "synchronous_mode=quorum"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Both replicas vote, any one confirms: the GUC says so and postgres agrees.
    wait_quorum_key(&c, &old, &format!("ANY 1 ({})", replicas.join(", "))).await;
    let old_dsn = c.node_dsn(&old);
    assert_eq!(
        psql(&old_dsn, "show synchronous_standby_names").unwrap(),
        format!("ANY 1 (\"{}\", \"{}\")", replicas[0], replicas[1])
    );
    assert_eq!(psql(&old_dsn, "select string_agg(sync_state, ',') from pg_stat_replication").unwrap(), "quorum,quorum");
    // Each replica learns it votes on its next loop.
    wait_for("both voters answering /sync", Duration::from_secs(10), || async {
        for r in &replicas {
            if c.api(r, "GET", "/sync", None, false).await.status != 200 {
                return None;
            }
        }
        Some(())
    })
    .await;

    let writer = Writer::start(c.primary_dsn(), Duration::from_millis(20));
    wait_for("writes", Duration::from_secs(10), || {
        let dsn = old_dsn.clone();
        async move { (psql(&dsn, "select count(*) from acked").ok()?.parse::<i64>().ok()? >= 20).then_some(()) }
    })
    .await;

    // The primary dies: the voter with the most WAL among enough voters takes over.
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(20)).await;
    assert!(replicas.contains(&new), "a voter is promoted");
    assert!(new_term > old_term);
    c.wait_writes_under_term(&new, new_term, 5).await;
    let other = replicas.iter().find(|r| **r != new).unwrap().clone();
    // The new primary's quorum is the one replica left...
    wait_quorum_key(&c, &new, &format!("ANY 1 ({other})")).await;

    // ... and when the old primary rejoins, the configuration grows through a joint key to
    // both voters, commits going on throughout.
    c.start_agent(&old);
    let mut both = [old.clone(), other.clone()];
    both.sort();
    wait_quorum_key(&c, &new, &format!("ANY 1 ({})", both.join(", "))).await;
    let report = writer.stop().await;
    let missing = c.missing_acked(&new, &report);
    assert_eq!(missing, 0, "acknowledged commits lost (of {} acked)", report.acked.len());
    assert!(report.acked.iter().any(|a| a.term == new_term as i64), "writes went on under the new term");
}
