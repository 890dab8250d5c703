//! Backups end to end with the real `pgkeel` binary and real postgres servers: the WAL
//! archive as archive_command/restore_command, `backup create|list|verify`, and
//! point-in-time restore. Each test works in its own temp directory on free ports and stops
//! every server it started, even when it panics.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgkeel_backup::walname::WalFile;
use pgkeel_backup::Repo;
use pgkeel_pg::conf::ManagedConf;
use pgkeel_pg::control::Instance;
use pgkeel_pg::testing::{instance, tempdir, StopOnDrop};
use pgkeel_pg::user::run_as_for;
use pgkeel_testkit::wait_for;

const T: Duration = Duration::from_secs(60);
const CLUSTER: &str = "bk";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgkeel"))
}

fn pgkeel(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run pgkeel")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A repository directory owned by the user postgres runs as (archive_command runs as it).
fn repo_dir(root: &Path) -> PathBuf {
    let dir = root.join("repo");
    pgkeel_pg::user::prepare_dir(&dir, 0o700, run_as_for("postgres").unwrap().as_ref()).unwrap();
    dir
}

fn conf(inst: &Instance, archive_command: Option<&str>) -> ManagedConf {
    let mut parameters = BTreeMap::new();
    parameters.insert("shared_buffers".to_string(), "32MB".to_string());
    parameters.insert("max_connections".to_string(), "20".to_string());
    parameters.insert("fsync".to_string(), "off".to_string());
    match archive_command {
        Some(cmd) => {
            parameters.insert("archive_mode".to_string(), "on".to_string());
            parameters.insert("archive_command".to_string(), cmd.to_string());
        }
        None => {
            parameters.insert("archive_mode".to_string(), "off".to_string());
        }
    }
    ManagedConf {
        listen_host: "127.0.0.1".into(),
        port: inst.port,
        socket_dir: inst.socket_dir.clone(),
        cluster_name: "pgkeel-backup-test".into(),
        term: 1,
        primary_conninfo: None,
        primary_slot_name: None,
        synchronous_standby_names: String::new(),
        parameters,
    }
}

async fn start_archiving_primary(inst: &Instance, repo: &Path) -> StopOnDrop {
    inst.initdb("pw").await.unwrap();
    let archive = pgkeel_backup::archive_command(&bin(), repo, CLUSTER);
    inst.write_conf(&conf(inst, Some(&archive))).unwrap();
    inst.write_hba("replicator", &[], &[]).unwrap();
    inst.start(T).await.unwrap();
    StopOnDrop(inst.clone())
}

/// Switches to a new WAL segment and waits until the finished one is in the archive.
async fn switch_and_wait_archived(client: &tokio_postgres::Client, repo: &Repo) {
    let row = client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.unwrap();
    let name: String = row.get(0);
    let file = WalFile::parse(&name).unwrap();
    let key = repo.wal_key(&file);
    wait_for(&format!("{name} archived"), T, || async { repo.storage().exists(&key).unwrap().then_some(()) }).await;
}

/// Restores with `pgkeel restore ARGS`, starts postgres on it, waits until it is promoted,
/// and returns the ids in table t.
async fn restore_and_read(tmp: &Path, name: &str, repo: &Path, target_args: &[&str]) -> (Vec<i32>, StopOnDrop) {
    restore_cluster_and_read(tmp, name, repo, CLUSTER, target_args).await
}

/// [`restore_and_read`] for the repository's cluster `cluster`.
async fn restore_cluster_and_read(
    tmp: &Path,
    name: &str,
    repo: &Path,
    cluster: &str,
    target_args: &[&str],
) -> (Vec<i32>, StopOnDrop) {
    let inst = instance(tmp, name);
    let to = inst.data_dir.display().to_string();
    let repo = repo.display().to_string();
    let mut args = vec!["restore", "--repo", &repo, "--cluster", cluster, "--to", &to];
    args.extend(target_args);
    let out = pgkeel(&args);
    assert!(out.status.success(), "pgkeel restore failed: {}", text(&out));
    assert!(text(&out).contains("restored backup"), "{}", text(&out));
    assert!(inst.data_dir.join("recovery.signal").exists());
    assert!(inst.data_dir.join("backup_label").exists());
    // Its own port and socket, and no archiving into the test repository; max_connections
    // at its default, which is at least what any backed-up primary had.
    let mut settings = conf(&inst, None);
    settings.parameters.remove("max_connections");
    inst.write_conf(&settings).unwrap();
    inst.start(T).await.unwrap();
    let guard = StopOnDrop(inst.clone());
    let client = inst.connect(T).await.unwrap();
    wait_for("the restored server to finish recovery and promote", T, || async {
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
        (!row.get::<_, bool>(0)).then_some(())
    })
    .await;
    let rows = client.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap();
    (rows.iter().map(|r| r.get(0)).collect(), guard)
}

#[test]
fn wal_push_and_fetch_exit_codes() {
    let tmp = tempdir("pgkeel-backup-test-");
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let repo_s = repo.display().to_string();
    let pg_wal = tmp.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let name = "000000010000000000000007";
    let seg = pg_wal.join(name);
    std::fs::write(&seg, vec![1u8; 1 << 20]).unwrap();
    let seg_s = seg.display().to_string();
    let push = |p: &str| pgkeel(&["wal", "push", "--repo", &repo_s, "--cluster", CLUSTER, p]);

    let out = push(&seg_s);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).is_empty(), "a push prints nothing: {}", text(&out));
    let out = push(&seg_s);
    assert!(out.status.success(), "same content again is fine: {}", text(&out));
    assert!(text(&out).contains("already archived with identical content"), "{}", text(&out));

    let archived = repo.join(CLUSTER).join("wal/0000000100000000").join(format!("{name}.zst"));
    let before = std::fs::read(&archived).unwrap();
    std::fs::write(&seg, vec![2u8; 1 << 20]).unwrap();
    let out = push(&seg_s);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains(name) && msg.contains("different content"), "{msg}");
    let sha = |b: u8| pgkeel_backup::codec::sha256_hex(&vec![b; 1 << 20]);
    assert!(msg.contains(&sha(1)) && msg.contains(&sha(2)), "names both checksums: {msg}");
    assert_eq!(std::fs::read(&archived).unwrap(), before, "the archived copy is untouched");

    // Fetch: restored content is the original one.
    let dest = tmp.path().join("RECOVERYXLOG");
    let dest_s = dest.display().to_string();
    let fetch = |n: &str| pgkeel(&["wal", "fetch", "--repo", &repo_s, "--cluster", CLUSTER, n, &dest_s]);
    let out = fetch(name);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), vec![1u8; 1 << 20]);
    std::fs::remove_file(&dest).unwrap();

    // Missing: exit 1, one line.
    for missing in ["000000010000000000000008", "00000002.history"] {
        let out = fetch(missing);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert_eq!(text(&out).lines().count(), 1, "{}", text(&out));
        assert!(!dest.exists());
    }

    // Corrupt: exit > 125 (postgres aborts recovery), naming the file; nothing written.
    let mut bytes = before.clone();
    let n = bytes.len();
    bytes[n - 20] ^= 0xff;
    std::fs::write(&archived, &bytes).unwrap();
    let out = fetch(name);
    assert_eq!(out.status.code(), Some(i32::from(pgkeel_backup::EXIT_FETCH_ABORT)), "{}", text(&out));
    assert!(text(&out).contains(name) && text(&out).contains("corrupt"), "{}", text(&out));
    assert!(!dest.exists());

    // A missing repository is an error, not "missing file".
    let out = pgkeel(&["wal", "fetch", "--repo", "/nonexistent/repo", "--cluster", CLUSTER, name, &dest_s]);
    assert_eq!(out.status.code(), Some(i32::from(pgkeel_backup::EXIT_FETCH_ABORT)), "{}", text(&out));
    let out = pgkeel(&["wal", "push", "--repo", &repo_s, &seg_s]);
    assert!(!out.status.success() && text(&out).contains("--cluster"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_end_to_end() {
    let started = Instant::now();
    let tmp = tempdir("pgkeel-backup-test-");
    let repo_path = repo_dir(tmp.path());
    let repo_s = repo_path.display().to_string();
    let repo = Repo::local(&repo_path, CLUSTER).unwrap();
    let primary = instance(tmp.path(), "primary");
    let _g = start_archiving_primary(&primary, &repo_path).await;
    let client = primary.connect(T).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT clock_timestamp())")
        .await
        .unwrap();
    for id in 1..=5 {
        client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
    }

    // An interrupted backup (no manifest) is listed as incomplete and never used.
    // (Written through the storage, which gives new entries to the repository's owner; a
    // root-owned directory would stop archive_command, run as postgres.)
    let stray = format!("{CLUSTER}/backups/20000101T000000Z/data/PG_VERSION.zst");
    repo.storage().write(&stray, b"x", pgkeel_backup::storage::WriteMode::Overwrite).unwrap();

    create_typed(&repo, &repo_s, &primary, "full");
    eprintln!("backup taken after {:?}", started.elapsed());

    let out = pgkeel(&["backup", "list", "--repo", &repo_s, "--cluster", CLUSTER, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["status"], "incomplete");
    assert_eq!(list[1]["status"], "complete");
    assert_eq!(list[1]["from_standby"], false);
    let label = list[1]["label"].as_str().unwrap().to_string();
    let out = pgkeel(&["backup", "list", "--repo", &repo_s, "--cluster", CLUSTER]);
    assert!(text(&out).contains(&label) && text(&out).contains("incomplete"), "{}", text(&out));

    // Manifest: postmaster.pid and WAL are not in it, pg_control is.
    let m = repo.read_manifest(&label).unwrap().unwrap();
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains(&"global/pg_control") && paths.contains(&"PG_VERSION"));
    assert!(!paths.iter().any(|p| p.starts_with("pg_wal/") || *p == "postmaster.pid"), "{paths:?}");
    assert!(m.directories.iter().any(|d| d.path == "pg_wal"));

    // Rows after the backup: the target time falls between rows 8 and 9.
    for id in 6..=8 {
        client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
    }
    let target: String = client
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'", &[])
        .await
        .unwrap()
        .get(0);
    for id in 9..=10 {
        client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
    }
    let after: bool = client
        .query_one("SELECT min(ts) > $1::text::timestamptz FROM t WHERE id >= 9", &[&target])
        .await
        .unwrap()
        .get(0);
    assert!(after, "rows 9 and 10 were written after the target time");
    switch_and_wait_archived(&client, &repo).await;

    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &label]);
    assert!(out.status.success(), "verify failed: {}", text(&out));
    assert!(text(&out).contains("OK"), "{}", text(&out));

    let (ids, g1) = restore_and_read(tmp.path(), "pitr", &repo_path, &["--target-time", &target]).await;
    assert_eq!(ids, (1..=8).collect::<Vec<i32>>(), "exactly the rows committed before the target");
    drop(g1);
    eprintln!("point-in-time restore checked after {:?}", started.elapsed());

    let (ids, g2) = restore_and_read(tmp.path(), "latest", &repo_path, &["--latest"]).await;
    assert_eq!(ids, (1..=10).collect::<Vec<i32>>(), "every archived row");
    drop(g2);

    // A target before the only backup ended is refused, naming why.
    let early = pgkeel(&[
        "restore",
        "--repo",
        &repo_s,
        "--cluster",
        CLUSTER,
        "--to",
        &tmp.path().join("early").display().to_string(),
        "--target-time",
        "2000-01-01 00:00:00+00",
    ]);
    assert!(!early.status.success() && text(&early).contains("no backup can reach"), "{}", text(&early));

    // A damaged stored file makes verify fail naming it.
    let victim = m.files.iter().find(|f| f.path == "PG_VERSION").unwrap();
    let stored = repo_path.join(repo.backup_file_key(&label, &victim.path));
    let mut bytes = std::fs::read(&stored).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &label]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("file PG_VERSION"), "{}", text(&out));
    eprintln!("done after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_a_standby_restores() {
    let tmp = tempdir("pgkeel-backup-test-");
    let repo_path = repo_dir(tmp.path());
    let repo_s = repo_path.display().to_string();
    let repo = Repo::local(&repo_path, CLUSTER).unwrap();
    let primary = instance(tmp.path(), "primary");
    let _g = start_archiving_primary(&primary, &repo_path).await;
    let pc = primary.connect(T).await.unwrap();
    pgkeel_pg::probe::ensure_replication_user(&pc, "replicator", "replpw").await.unwrap();
    pc.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE noise (n int)").await.unwrap();
    for id in 1..=3 {
        pc.execute("INSERT INTO t VALUES ($1)", &[&id]).await.unwrap();
    }

    let replica = instance(tmp.path(), "replica");
    let source = pgkeel_pg::SourceConn {
        host: "127.0.0.1".into(),
        port: primary.port,
        user: "replicator".into(),
        password: Some("replpw".into()),
    };
    replica.basebackup(&source, None, T).await.unwrap();
    let archive = pgkeel_backup::archive_command(&bin(), &repo_path, CLUSTER);
    let mut rconf = conf(&replica, Some(&archive));
    rconf.primary_conninfo = Some(source.conninfo("replica"));
    replica.write_conf(&rconf).unwrap();
    replica.set_standby(true).unwrap();
    replica.start(T).await.unwrap();
    let _gr = StopOnDrop(replica.clone());
    let rc = replica.connect(T).await.unwrap();
    wait_for("the replica to replay rows 1-3", T, || async {
        let n: i64 = rc.query_one("SELECT count(*) FROM t", &[]).await.ok()?.get(0);
        (n == 3).then_some(())
    })
    .await;

    // The standby does not archive: its primary does, once the segment holding the backup's
    // stop point is finished. Keep switching segments on the primary (about once a second)
    // until the backup returns.
    let mut child = Command::new(bin())
        .args(["backup", "create", "--repo", &repo_s, "--cluster", CLUSTER, "--pgdata"])
        .arg(&replica.data_dir)
        .args(["--host"])
        .arg(&replica.socket_dir)
        .args(["--port", &replica.port.to_string(), "--wal-wait", "60", "--jobs", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let last_switch = std::sync::Mutex::new(Instant::now());
    wait_for("backup create on the standby to finish", T, || {
        let exited = child.try_wait().ok().flatten().is_some();
        let (pc, last_switch) = (&pc, &last_switch);
        async move {
            if exited {
                return Some(());
            }
            let due = last_switch.lock().unwrap().elapsed() > Duration::from_secs(1);
            if due {
                pc.batch_execute("INSERT INTO noise VALUES (1); SELECT pg_switch_wal()").await.ok()?;
                *last_switch.lock().unwrap() = Instant::now();
            }
            None
        }
    })
    .await;
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "backup create on the standby failed: {}", text(&out));
    assert!(text(&out).contains("taken on a standby"), "{}", text(&out));

    let m = repo.complete_backups().unwrap().pop().expect("one complete backup");
    assert!(m.from_standby);
    assert!(!m.files.iter().any(|f| f.path == "standby.signal"), "standby.signal is not backed up");
    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &m.label]);
    assert!(out.status.success(), "verify failed: {}", text(&out));

    for id in 4..=5 {
        pc.execute("INSERT INTO t VALUES ($1)", &[&id]).await.unwrap();
    }
    switch_and_wait_archived(&pc, &repo).await;
    let (ids, _g3) = restore_and_read(tmp.path(), "restored", &repo_path, &["--latest"]).await;
    assert_eq!(ids, (1..=5).collect::<Vec<i32>>());
}

/// The server's clock now, in a form `--target-time` takes.
async fn server_now(client: &tokio_postgres::Client) -> String {
    let row = client
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'", &[])
        .await
        .unwrap();
    row.get(0)
}

async fn insert(client: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await.unwrap();
    }
}

/// A `pgkeel up` cluster archives into DIR/backups on whichever node is primary: a backup
/// before a failover restores to points on both timelines, each with exactly the rows
/// committed before the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_across_a_failover() {
    let tmp = tempdir("pgkeel-backup-test-");
    let c = pgkeel_testkit::Cluster::up(&bin(), 3).await;
    let repo_path = c.dir().join("backups");
    let repo = Repo::local(&repo_path, "pgkeel").unwrap();
    let (old, _) = c.leader().await.expect("leader");
    let client = pgkeel_testkit::connect(&c.node_dsn(&old)).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT clock_timestamp())")
        .await
        .unwrap();
    insert(&client, 1..=5).await;

    // A base backup of the primary, through its node.toml.
    let config = c.dir().join("nodes").join(&old).join("node.toml").display().to_string();
    let out = pgkeel(&["backup", "create", "--config", &config, "--wal-wait", "60"]);
    assert!(out.status.success(), "backup create failed: {}", text(&out));

    insert(&client, 6..=8).await;
    let t1 = server_now(&client).await;
    insert(&client, 9..=10).await;
    // Every replica has row 10 before the primary dies (asynchronous replication would
    // otherwise be free to lose it, which is not what this test is about).
    for n in c.nodes().into_iter().filter(|n| *n != old) {
        let dsn = c.node_dsn(&n);
        wait_for(&format!("{n} replayed row 10"), T, || {
            let dsn = dsn.clone();
            async move { (pgkeel_testkit::psql(&dsn, "select count(*) from t").ok()? == "10").then_some(()) }
        })
        .await;
    }
    drop(client);
    c.kill_node(&old);
    let (new, _) = c.wait_new_leader(&old, Duration::from_secs(30)).await;
    let client = pgkeel_testkit::connect(&c.node_dsn(&new)).await.unwrap();
    insert(&client, 11..=13).await;
    let t2 = server_now(&client).await;
    let lsn2: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    insert(&client, 14..=15).await;
    // The new primary archives its own timeline: finish its segment and wait for it.
    switch_and_wait_archived(&client, &repo).await;
    assert!(
        repo.storage().exists("pgkeel/wal/history/00000002.history.zst").unwrap(),
        "the new timeline's history is archived"
    );

    let (ids, _g1) = restore_cluster_and_read(tmp.path(), "r1", &repo_path, "pgkeel", &["--target-time", &t1]).await;
    assert_eq!(ids, (1..=8).collect::<Vec<_>>(), "restored to {t1} (timeline 1)");
    drop(_g1);
    let (ids, _g2) = restore_cluster_and_read(tmp.path(), "r2", &repo_path, "pgkeel", &["--target-time", &t2]).await;
    assert_eq!(ids, (1..=13).collect::<Vec<_>>(), "restored to {t2} (timeline 2)");
    drop(_g2);
    let (ids, _g3) = restore_cluster_and_read(tmp.path(), "r3", &repo_path, "pgkeel", &["--target-lsn", &lsn2]).await;
    assert_eq!(ids, (1..=13).collect::<Vec<_>>(), "restored to LSN {lsn2}");
    drop(_g3);
    let (ids, _g4) = restore_cluster_and_read(tmp.path(), "r4", &repo_path, "pgkeel", &["--latest"]).await;
    assert_eq!(ids, (1..=15).collect::<Vec<_>>(), "restored to the end of the archive");
}

/// Runs pgkeel with extra environment variables.
fn pgkeel_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pgkeel")
}

/// The whole cycle on an S3-compatible repository (moto, started locally): archive_command
/// and restore_command on S3, WAL duplicates, backup create → list → verify → restore to a
/// target time, then retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_end_to_end() {
    let started = Instant::now();
    let moto = pgkeel_backup::testing::Moto::start().unwrap_or_else(|e| panic!("{e}"));
    // pgkeel processes, and postgres (archive_command, restore_command), find the
    // credentials in the environment; the endpoint is in the URL.
    for (k, v) in pgkeel_backup::testing::Moto::env() {
        std::env::set_var(k, v);
    }
    let s3 = std::sync::Arc::new(pgkeel_backup::s3::S3Storage::new(moto.config("pgkeel-e2e", "repo")).unwrap());
    s3.create_bucket().unwrap();
    let url = moto.url("pgkeel-e2e", "repo");
    let repo = Repo::new(s3.clone(), CLUSTER).unwrap();
    let tmp = tempdir("pgkeel-backup-test-");

    // WAL duplicates through the CLI.
    let seg = tmp.path().join("000000010000000000000042");
    std::fs::write(&seg, vec![1u8; 1 << 20]).unwrap();
    let seg_s = seg.display().to_string();
    let push = || pgkeel(&["wal", "push", "--repo", &url, "--cluster", "dup", &seg_s]);
    assert!(push().status.success(), "{}", text(&push()));
    let out = push();
    assert!(out.status.success() && text(&out).contains("identical content"), "{}", text(&out));
    std::fs::write(&seg, vec![2u8; 1 << 20]).unwrap();
    let out = push();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("different content"), "{}", text(&out));
    let dest = tmp.path().join("fetched").display().to_string();
    let out = pgkeel(&["wal", "fetch", "--repo", &url, "--cluster", "dup", "000000010000000000000042", &dest]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), vec![1u8; 1 << 20]);
    let out = pgkeel(&["wal", "fetch", "--repo", &url, "--cluster", "dup", "000000010000000000000043", &dest]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Without credentials: a clear error, and exit 200 for fetch (postgres stops recovery).
    let out = pgkeel_env(
        &["wal", "fetch", "--repo", &url, "--cluster", "dup", "000000010000000000000042", &dest],
        &[("AWS_ACCESS_KEY_ID", "")],
    );
    assert_eq!(out.status.code(), Some(200), "{}", text(&out));
    assert!(text(&out).contains("AWS_ACCESS_KEY_ID"), "{}", text(&out));

    // A primary archiving into the bucket.
    let primary = instance(tmp.path(), "primary");
    let archive = pgkeel_backup::archive_command(&bin(), Path::new(&url), CLUSTER);
    primary.initdb("pw").await.unwrap();
    primary.write_conf(&conf(&primary, Some(&archive))).unwrap();
    primary.write_hba("replicator", &[], &[]).unwrap();
    primary.start(T).await.unwrap();
    let _g = StopOnDrop(primary.clone());
    let client = primary.connect(T).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT clock_timestamp())")
        .await
        .unwrap();
    insert(&client, 1..=5).await;

    let create = || pgkeel(&backup_create(&url, &primary, &[]).iter().map(String::as_str).collect::<Vec<_>>());
    let out = create();
    assert!(out.status.success(), "backup create failed: {}", text(&out));
    assert!(text(&out).contains("(100%)"), "progress is logged when stderr is not a terminal: {}", text(&out));
    let first = repo.complete_backups().unwrap().pop().expect("a complete backup").label;
    eprintln!("backup on S3 after {:?}", started.elapsed());

    insert(&client, 6..=8).await;
    let target = server_now(&client).await;
    insert(&client, 9..=10).await;
    switch_and_wait_archived(&client, &repo).await;

    let out = pgkeel(&["backup", "verify", "--repo", &url, "--cluster", CLUSTER, &first]);
    assert!(out.status.success() && text(&out).contains("OK"), "verify failed: {}", text(&out));
    let (ids, g) = restore_and_read(tmp.path(), "pitr", Path::new(&url), &["--target-time", &target]).await;
    assert_eq!(ids, (1..=8).collect::<Vec<i32>>(), "exactly the rows committed before the target");
    drop(g);
    eprintln!("point-in-time restore from S3 after {:?}", started.elapsed());

    // A second backup, then retention: the first backup and the WAL only it needed go.
    let out = create();
    assert!(out.status.success(), "second backup failed: {}", text(&out));
    let backups = repo.complete_backups().unwrap();
    assert_eq!(backups.len(), 2);
    let second = backups[1].clone();
    let out = pgkeel(&["backup", "expire", "--repo", &url, "--cluster", CLUSTER, "--keep", "1", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("would remove backup {first}")), "{}", text(&out));
    assert_eq!(repo.complete_backups().unwrap().len(), 2, "a dry run removes nothing");
    let out = pgkeel(&["backup", "expire", "--repo", &url, "--cluster", CLUSTER, "--keep", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("removed backup {first}")), "{}", text(&out));
    let left: Vec<String> = repo.list_backups().unwrap().into_iter().map(|b| b.label).collect();
    assert_eq!(left, std::slice::from_ref(&second.label));
    let first_needed = pgkeel_backup::walname::SegmentName::from_lsn(
        second.start_timeline,
        second.start_lsn_value().unwrap(),
        second.wal_segment_size,
    );
    for o in repo.storage().list_tree(&format!("{CLUSTER}/wal")).unwrap() {
        let name = o.key.rsplit('/').next().unwrap().trim_end_matches(".zst");
        assert!(name[..24] >= first_needed.to_string()[..], "{name} is older than {first_needed}: expired");
    }
    let out = pgkeel(&["backup", "verify", "--repo", &url, "--cluster", CLUSTER, &second.label]);
    assert!(out.status.success(), "the kept backup still verifies: {}", text(&out));
    let (ids, _g2) = restore_and_read(tmp.path(), "latest", Path::new(&url), &["--latest"]).await;
    assert_eq!(ids, (1..=10).collect::<Vec<i32>>());
    eprintln!("done after {:?}", started.elapsed());
}

async fn connect_db(inst: &Instance, db: &str) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(&inst.socket_dir).port(inst.port).user("postgres").dbname(db);
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// `pgkeel dump` of a real server: every database (names that need encoding too), listed,
/// fetched and restored with pg_restore; retention of dumps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_dumps_round_trip() {
    let tmp = tempdir("pgkeel-backup-test-");
    let repo_path = repo_dir(tmp.path());
    let repo_s = repo_path.display().to_string();
    let primary = instance(tmp.path(), "primary");
    let _g = start_archiving_primary(&primary, &repo_path).await;
    let client = primary.connect(T).await.unwrap();
    for sql in ["CREATE DATABASE app", "CREATE DATABASE \"odd db/1\"", "CREATE ROLE app_owner"] {
        client.batch_execute(sql).await.unwrap();
    }
    let app = connect_db(&primary, "app").await;
    app.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text); ALTER TABLE items OWNER TO app_owner")
        .await
        .unwrap();
    app.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g", &[]).await.unwrap();

    let socket = primary.socket_dir.display().to_string();
    let port = primary.port.to_string();
    let dump = |extra: &[&str]| {
        let mut args = vec!["dump", "--repo", &repo_s, "--cluster", CLUSTER, "--host", &socket, "--port", &port];
        args.extend(extra);
        pgkeel(&args)
    };
    let out = dump(&[]);
    assert!(out.status.success(), "dump failed: {}", text(&out));
    assert!(text(&out).contains("complete") && text(&out).contains("odd db/1"), "{}", text(&out));
    let out = dump(&["--database", "nope"]);
    assert!(!out.status.success() && text(&out).contains("no database \"nope\""), "{}", text(&out));

    let out = pgkeel(&["dump", "list", "--repo", &repo_s, "--cluster", CLUSTER, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["status"], "complete");
    let names: Vec<&str> =
        list[0]["databases"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app", "odd db/1", "postgres"]);
    let label = list[0]["label"].as_str().unwrap().to_string();

    // Fetch and restore into a new database.
    let file = tmp.path().join("app.dump");
    let out = pgkeel(&[
        "dump",
        "fetch",
        "--repo",
        &repo_s,
        "--cluster",
        CLUSTER,
        &label,
        "app",
        "-o",
        &file.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let globals = pgkeel(&["dump", "fetch", "--repo", &repo_s, "--cluster", CLUSTER, &label, "--globals"]);
    assert!(globals.status.success(), "{}", text(&globals));
    assert!(String::from_utf8_lossy(&globals.stdout).contains("CREATE ROLE app_owner"), "{}", text(&globals));
    client.batch_execute("CREATE DATABASE app_copy").await.unwrap();
    let mut cmd = Command::new(primary.bins.path("pg_restore"));
    cmd.args(["-h", &socket, "-p", &port, "-U", "postgres", "-d", "app_copy"]).arg(&file);
    if let Some(r) = run_as_for("postgres").unwrap() {
        cmd.uid(r.uid).gid(r.gid);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "pg_restore: {}", text(&out));
    let copy = connect_db(&primary, "app_copy").await;
    let row = copy.query_one("SELECT count(*), max(name) FROM items", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1)), (1000, "item 999".to_string()));

    // A damaged dump is refused, and nothing is left at --output.
    let key = format!("{CLUSTER}/dumps/{label}/db-app.dump");
    let stored = repo_path.join(&key);
    let mut bytes = std::fs::read(&stored).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let bad = tmp.path().join("bad.dump");
    let out = pgkeel(&[
        "dump",
        "fetch",
        "--repo",
        &repo_s,
        "--cluster",
        CLUSTER,
        &label,
        "app",
        "-o",
        &bad.display().to_string(),
    ]);
    assert!(!out.status.success() && text(&out).contains("damaged"), "{}", text(&out));
    assert!(!bad.exists());

    // Retention of dumps: a second dump (of app only), then keep 1.
    let out = dump(&["--database", "app"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pgkeel(&["backup", "expire", "--dumps", "--repo", &repo_s, "--cluster", CLUSTER, "--keep", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("removed dump {label}")), "{}", text(&out));
    let repo = Repo::local(&repo_path, CLUSTER).unwrap();
    let left = pgkeel_backup::dump::list_dumps(&repo).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].manifest.as_ref().unwrap().databases.len(), 1);
    drop(app);
}

/// The arguments of `backup create` of `inst` into `repo` (waiting up to 60 s for WAL), then
/// `extra`.
fn backup_create(repo: &str, inst: &Instance, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["backup", "create", "--repo", repo, "--cluster", CLUSTER].map(String::from).into();
    args.extend(["--pgdata".into(), inst.data_dir.display().to_string()]);
    args.extend(["--host".into(), inst.socket_dir.display().to_string()]);
    args.extend(["--port".into(), inst.port.to_string(), "--wal-wait".into(), "60".into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `backup create --type TYPE` on `inst`; returns the new backup's manifest.
fn create_typed(repo: &Repo, repo_s: &str, inst: &Instance, kind: &str) -> pgkeel_backup::Manifest {
    let before: Vec<String> = repo.complete_backups().unwrap().into_iter().map(|m| m.label).collect();
    let args = backup_create(repo_s, inst, &["--type", kind, "--user", "postgres"]);
    let out = pgkeel(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "backup create --type {kind} failed: {}", text(&out));
    let m = repo.complete_backups().unwrap().into_iter().find(|m| !before.contains(&m.label)).expect("a new backup");
    assert!(text(&out).contains(&format!("backup {} complete ({})", m.label, m.kind.as_str())), "{}", text(&out));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_and_incremental_backups_share_unchanged_files() {
    use pgkeel_backup::manifest::BackupKind;
    let tmp = tempdir("pgkeel-backup-test-");
    let repo_path = repo_dir(tmp.path());
    let repo_s = repo_path.display().to_string();
    let repo = Repo::local(&repo_path, CLUSTER).unwrap();
    let primary = instance(tmp.path(), "primary");
    let _g = start_archiving_primary(&primary, &repo_path).await;
    let client = primary.connect(T).await.unwrap();
    // `big` never changes after the full backup; `t` changes before every later one.
    for sql in [
        "CREATE TABLE big AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        "VACUUM FREEZE big",
        "CREATE TABLE t (id int PRIMARY KEY)",
        "INSERT INTO t VALUES (1)",
        "CHECKPOINT",
    ] {
        client.simple_query(sql).await.unwrap();
    }
    let big: String = client.query_one("SELECT pg_relation_filepath('big')", &[]).await.unwrap().get(0);
    let t_file: String = client.query_one("SELECT pg_relation_filepath('t')", &[]).await.unwrap().get(0);

    // An incremental with no backup to compare with is a full one.
    let full = create_typed(&repo, &repo_s, &primary, "incr");
    assert_eq!((full.kind, full.reference.as_deref()), (BackupKind::Full, None));
    let entry = |m: &pgkeel_backup::Manifest, path: &str| m.files.iter().find(|f| f.path == path).unwrap().clone();

    client.batch_execute("INSERT INTO t VALUES (2); CHECKPOINT").await.unwrap();
    let incr1 = create_typed(&repo, &repo_s, &primary, "incr");
    assert_eq!((incr1.kind, incr1.reference.as_deref()), (BackupKind::Incr, Some(full.label.as_str())));
    assert_eq!(entry(&incr1, &big).stored_in.as_deref(), Some(full.label.as_str()), "big is shared");
    assert_eq!(entry(&incr1, &t_file).stored_in, None, "t changed, so it is stored again");
    assert_eq!(entry(&incr1, "global/pg_control").stored_in, None, "pg_control is always copied");
    assert!(
        incr1.stored_size() * 2 < full.stored_size(),
        "the incremental stores less: {} vs {}",
        incr1.stored_size(),
        full.stored_size()
    );
    assert!(!repo_path.join(repo.backup_file_key(&incr1.label, &big)).exists(), "no second copy of big");

    client.batch_execute("INSERT INTO t VALUES (3); CHECKPOINT").await.unwrap();
    let diff = create_typed(&repo, &repo_s, &primary, "diff");
    assert_eq!(diff.reference.as_deref(), Some(full.label.as_str()), "a differential compares with the full one");
    client.batch_execute("INSERT INTO t VALUES (4); CHECKPOINT").await.unwrap();
    let incr2 = create_typed(&repo, &repo_s, &primary, "incr");
    assert_eq!(incr2.reference.as_deref(), Some(diff.label.as_str()), "an incremental compares with the newest");
    assert_eq!(entry(&incr2, &big).stored_in.as_deref(), Some(full.label.as_str()), "points at the holder");

    // The table and JSON listings show types and references.
    let out = pgkeel(&["backup", "list", "--repo", &repo_s, "--cluster", CLUSTER]);
    assert!(text(&out).contains(&format!("incr of {}", diff.label)), "{}", text(&out));
    let out = pgkeel(&["backup", "list", "--repo", &repo_s, "--cluster", CLUSTER, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["type"].as_str(), last["reference"].as_str()), (Some("incr"), Some(diff.label.as_str())));

    for id in 5..=6 {
        client.execute("INSERT INTO t VALUES ($1)", &[&id]).await.unwrap();
    }
    switch_and_wait_archived(&client, &repo).await;
    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &incr2.label]);
    assert!(out.status.success(), "verify failed: {}", text(&out));
    let (ids, g) = restore_and_read(tmp.path(), "from-incr", &repo_path, &["--backup", &incr2.label, "--latest"]).await;
    assert_eq!(ids, (1..=6).collect::<Vec<i32>>(), "an incremental restores everything");
    drop(g);

    // Retention: keeping the newest one keeps what it shares files with, and nothing else.
    let out = pgkeel(&["backup", "expire", "--repo", &repo_s, "--cluster", CLUSTER, "--keep", "1"]);
    assert!(out.status.success(), "expire failed: {}", text(&out));
    let left: Vec<String> = repo.complete_backups().unwrap().into_iter().map(|m| m.label).collect();
    let mut needed = incr2.depends_on();
    needed.push(incr2.label.clone());
    needed.sort();
    assert_eq!(left, needed, "kept: the newest and the backups it needs; {}", text(&out));
    assert!(left.contains(&full.label) && !left.contains(&incr1.label), "{left:?}");
    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &incr2.label]);
    assert!(out.status.success(), "verify after expire failed: {}", text(&out));

    // A damaged file stored by the full backup makes the incremental's verify fail naming it.
    let stored = repo_path.join(repo.backup_file_key(&full.label, &big));
    let mut bytes = std::fs::read(&stored).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let out = pgkeel(&["backup", "verify", "--repo", &repo_s, "--cluster", CLUSTER, &incr2.label]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("file {big}")), "{}", text(&out));
}
