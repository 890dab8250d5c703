//! `backup_schedule`: one member (a replica when one streams) takes each scheduled base
//! backup into the cluster's repository; the result shows in `/cluster`, `pgkeel list` and
//! `/metrics`, and the backup verifies. `dump_schedule` adds a logical dump to the job, and
//! `backup_schedule_incremental` with `backup_keep` takes an incremental and applies the
//! retention, which keeps the full backup the incremental shares files with. A new cluster
//! can start from another cluster's backup (`pgkeel up --from-backup`).

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

    // One `config set` each time, so no minute sees half of a change.
    let set = |kv: &[&str]| {
        let mut args = vec!["config", "set"];
        args.extend(kv);
        let out = c.ctl(&args);
        assert!(out.status.success(), "config set {kv:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    set(&["dump_schedule=* * * * *", "dump_keep=1", "backup_schedule=* * * * *"]);
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
    set(&["backup_schedule=null", "dump_schedule=null"]);

    let run = &v["backup"];
    let runner = run["runner"].as_str().unwrap().to_string();
    assert_ne!(runner, leader, "a streaming replica takes the backup, not the primary");
    let slot = run["slot"].as_u64().unwrap();
    let mut claims = Vec::new();
    for n in c.nodes() {
        let log = std::fs::read_to_string(c.dir().join("nodes").join(&n).join("agent.log")).unwrap();
        claims.extend(
            log.lines()
                .filter(|l| l.contains("running the scheduled job") && l.contains(&format!(" slot={slot}")))
                .map(|l| format!("{n}: {l}")),
        );
    }
    assert_eq!(claims.len(), 1, "exactly one member ran the backup of slot {slot} (runner {runner}): {claims:#?}");

    // The backup is in the repository and verifies; the dump ran in the same job.
    let label = run["last_ok"][0].as_str().unwrap().to_string();
    let message = run["message"].as_str().unwrap().to_string();
    assert!(message.contains(&format!("backup {label} (full)")) && message.contains("dump "), "{message}");
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

    // The first job can end just after a minute boundary, and the next slot's job start
    // before the schedule above was cleared (CI, 2026-11-22): wait for any such job, then
    // count the full backups.
    let last = wait_for("no scheduled job running", Duration::from_secs(90), || async {
        let v = c.cluster_json().await?;
        (!v["backup"]["finished_ms"].is_null()).then_some(v["backup"]["slot"].as_u64()?)
    })
    .await;
    let backup_list = || -> Vec<serde_json::Value> {
        let out =
            std::process::Command::new(bin()).args(["backup", "list", "--json", "--config", &config]).output().unwrap();
        assert!(out.status.success(), "backup list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    };
    let fulls: Vec<String> = backup_list()
        .iter()
        .filter(|b| b["type"] == "full")
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect();
    assert!(fulls.contains(&label), "{label} in {fulls:?}");
    let newest_full = fulls.last().unwrap().clone();

    // An incremental on the next minute, then the retention keeps it and its full backup
    // (the newest), and expires the other full backups.
    set(&["backup_keep=1", "backup_schedule_incremental=* * * * *"]);
    let v = wait_for("a scheduled incremental backup to succeed", Duration::from_secs(150), || async {
        let v = c.cluster_json().await?;
        let b = &v["backup"];
        if b["slot"].as_u64()? <= slot.max(last) || b["finished_ms"].is_null() {
            return None;
        }
        assert_eq!(b["ok"], true, "the scheduled incremental failed: {b}");
        Some(v)
    })
    .await;
    set(&["backup_schedule_incremental=null"]);
    let message = v["backup"]["message"].as_str().unwrap().to_string();
    let expired = format!("expired {} backup(s)", fulls.len() - 1);
    assert!(message.contains("(incr)") && message.contains(&expired), "{message}");
    let list = backup_list();
    assert_eq!(list.len(), 2, "the newest full one stays, the incremental needs it: {list:?}");
    assert_eq!(list[0]["label"].as_str(), Some(newest_full.as_str()));
    assert_eq!((list[1]["type"].as_str(), list[1]["reference"].as_str()), (Some("incr"), Some(newest_full.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_bootstraps_from_a_backup_to_a_target_time() {
    let a = Cluster::up(bin(), 1).await;
    let (leader, _) = a.leader().await.expect("leader");
    let dsn = a.node_dsn(&leader);
    psql(&dsn, "create table t (id int primary key); insert into t select generate_series(1, 5)").unwrap();
    let config = a.dir().join("nodes").join(&leader).join("node.toml").display().to_string();
    let out = std::process::Command::new(bin())
        .args(["backup", "create", "--config", &config, "--wal-wait", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "backup create: {}", String::from_utf8_lossy(&out.stderr));
    psql(&dsn, "insert into t select generate_series(6, 8)").unwrap();
    let target = psql(&dsn, "select clock_timestamp()::text").unwrap().trim().to_string();
    psql(&dsn, "insert into t select generate_series(9, 10)").unwrap();
    // The segment holding rows 9 and 10 must reach the archive, to prove recovery stops early.
    let seg = psql(&dsn, "select pg_walfile_name(pg_switch_wal())").unwrap().trim().to_string();
    let repo_dir = a.dir().join("backups");
    let repo = pgkeel_backup::Repo::local(&repo_dir, "pgkeel").unwrap();
    let key = repo.wal_key(&pgkeel_backup::walname::WalFile::parse(&seg).unwrap());
    wait_for("the last segment to be archived", Duration::from_secs(60), || async {
        repo.storage().exists(&key).unwrap().then_some(())
    })
    .await;

    let repo_s = repo_dir.display().to_string();
    let b = Cluster::up_with(bin(), 2, &["--from-backup", &repo_s, "--target-time", &target]).await;
    let (b_leader, _) = b.leader().await.expect("the new cluster has a leader");
    let ids = |dsn: &str| psql(dsn, "select string_agg(id::text, ',' order by id) from t").unwrap().trim().to_string();
    assert_eq!(ids(&b.node_dsn(&b_leader)), "1,2,3,4,5,6,7,8", "exactly the rows committed before the target");
    // Writable, and the other member cloned it and streams.
    psql(&b.node_dsn(&b_leader), "insert into t values (100)").unwrap();
    let other = b.nodes().into_iter().find(|n| *n != b_leader).unwrap();
    let other_dsn = b.node_dsn(&other);
    wait_for("the clone to replay the new row", Duration::from_secs(60), || async {
        (ids(&other_dsn) == "1,2,3,4,5,6,7,8,100").then_some(())
    })
    .await;
    // The restore's recovery settings are gone from the configuration files (they take
    // effect at the next start, e.g. when this member restarts as a standby).
    let n = psql(
        &b.node_dsn(&b_leader),
        "select count(*) from pg_file_settings where name in ('recovery_target_time', 'recovery_target_action')",
    )
    .unwrap();
    assert_eq!(n.trim(), "0", "no recovery target left in the configuration files");
    drop(a);
}
