//! `backup_schedule`: one member (a replica when one streams) takes each scheduled base
//! backup into the cluster's repository; the result shows in `/cluster`, `pgkeel list` and
//! `/metrics`, and the backup verifies.

use std::path::Path;
use std::time::Duration;

use pgkeel_testkit::{psql, wait_for, Cluster};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backup_runs_once_on_a_replica() {
    let c = Cluster::up(bin(), 3).await;
    let (leader, _) = c.leader().await.expect("leader");
    psql(&c.node_dsn(&leader), "create table t as select generate_series(1, 1000) as id").unwrap();

    let out = c.ctl(&["config", "set", "backup_schedule=* * * * *"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The next minute boundary, then the backup itself.
    let v = wait_for("a scheduled backup to succeed", Duration::from_secs(150), || async {
        let v = c.cluster_json().await?;
        if v["backup"]["ok"] == false {
            panic!("the scheduled backup failed: {}", v["backup"]);
        }
        (v["backup"]["ok"] == true).then_some(v)
    })
    .await;
    // No more runs while the test checks the first one.
    let out = c.ctl(&["config", "set", "backup_schedule=null"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let run = &v["backup"];
    let runner = run["runner"].as_str().unwrap().to_string();
    assert_ne!(runner, leader, "a streaming replica takes the backup, not the primary");
    let slot = run["slot"].as_u64().unwrap();
    let mut claims = 0;
    for n in c.nodes() {
        let log = std::fs::read_to_string(c.dir().join("nodes").join(&n).join("agent.log")).unwrap();
        claims += log
            .lines()
            .filter(|l| l.contains("running the scheduled backup") && l.contains(&format!("slot={slot}")))
            .count();
    }
    assert_eq!(claims, 1, "exactly one member ran the backup of slot {slot}");

    // The backup is in the repository and verifies.
    let label = run["message"].as_str().unwrap().to_string();
    let config = c.dir().join("nodes").join(&runner).join("node.toml").display().to_string();
    let out =
        std::process::Command::new(bin()).args(["backup", "verify", "--config", &config, &label]).output().unwrap();
    assert!(
        out.status.success(),
        "verify {label}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Operators see it.
    let out = c.ctl(&["list"]);
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(list.contains(&format!("Last scheduled backup: {label}")), "{list}");
    assert!(list.contains("WAL archive: last file archived"), "{list}");
    let metrics = c.api(&runner, "GET", "/metrics", None, false).await.text();
    for name in
        ["pgkeel_backup_last_success_age_seconds", "pgkeel_backup_last_run_ok", "pgkeel_wal_last_archived_age_seconds"]
    {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
}
