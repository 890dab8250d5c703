//! Integration tests against real PostgreSQL servers (`/usr/lib/postgresql/*/bin` or
//! `pg_config --bindir`). Each test works in its own temporary directory on free ports and
//! stops every server it started, even when it panics.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use pgkeel_pg::conf::ManagedConf;
use pgkeel_pg::control::{Instance, SourceConn, StopMode};
use pgkeel_pg::probe::{ensure_replication_user, ensure_slots, probe, set_superuser_password, slot_name_for};
use pgkeel_pg::testing::{instance, tempdir, StopOnDrop};
use pgkeel_pg::timeline::{can_follow, parse_history};
use pgkeel_pg::PgError;
use tokio_postgres::error::SqlState;

const T: Duration = Duration::from_secs(30);

fn managed_conf(inst: &Instance, term: u64) -> ManagedConf {
    let mut parameters = BTreeMap::new();
    // Small, so several servers fit comfortably on a test machine.
    parameters.insert("shared_buffers".to_string(), "32MB".to_string());
    parameters.insert("max_connections".to_string(), "20".to_string());
    parameters.insert("fsync".to_string(), "off".to_string());
    ManagedConf {
        listen_host: "127.0.0.1".into(),
        port: inst.port,
        socket_dir: inst.socket_dir.clone(),
        cluster_name: "pgkeel-test".into(),
        term,
        primary_conninfo: None,
        primary_slot_name: None,
        synchronous_standby_names: String::new(),
        parameters,
    }
}

/// Polls `f` every 100 ms until it returns `Some`, panicking after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// initdb + managed files + start; returns the guard that stops it.
async fn start_primary(inst: &Instance, password: &str, term: u64) -> StopOnDrop {
    inst.initdb(password).await.unwrap();
    assert!(inst.write_conf(&managed_conf(inst, term)).unwrap());
    assert!(inst.write_hba("replicator", &[], &[]).unwrap());
    inst.start(T).await.unwrap();
    StopOnDrop(inst.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_initdb_start_probe() {
    let tmp = tempdir("pgkeel-pg-test-");
    let inst = instance(tmp.path(), "n1");
    assert!(!inst.is_initialized());
    inst.initdb("s3cret'pw").await.unwrap();
    assert!(inst.is_initialized());
    assert!(matches!(inst.initdb("x").await, Err(PgError::BadDataDir { .. })), "initdb twice must be refused");

    let conf = managed_conf(&inst, 5);
    assert!(inst.write_conf(&conf).unwrap());
    assert!(!inst.write_conf(&conf).unwrap(), "unchanged content reports no change");
    assert!(inst.write_hba("replicator", &[], &[]).unwrap());
    assert!(!inst.write_hba("replicator", &[], &[]).unwrap());
    let pgconf = std::fs::read_to_string(inst.data_dir.join("postgresql.conf")).unwrap();
    assert_eq!(pgconf.matches("include_if_exists = 'pgkeel.conf'").count(), 1);
    let meta = std::fs::metadata(inst.data_dir.join("pgkeel.conf")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    if let Some(r) = &inst.run_as {
        assert_eq!((meta.uid(), meta.gid()), (r.uid, r.gid));
        assert_eq!(std::fs::metadata(inst.data_dir.join("pg_hba.conf")).unwrap().uid(), r.uid);
    }

    inst.start(T).await.unwrap();
    let _guard = StopOnDrop(inst.clone());
    assert!(inst.postmaster_pid().is_some());
    inst.start(T).await.unwrap(); // already running: success
    let sock_mode = std::fs::metadata(&inst.socket_dir).unwrap().mode() & 0o777;
    assert_eq!(sock_mode, 0o700);

    let client = inst.connect(T).await.unwrap();
    let row = client.query_one("SHOW data_checksums", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    let row = client.query_one("SHOW shared_buffers", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "32MB", "user parameters override the baseline");

    let p = probe(&client).await.unwrap();
    assert!(!p.in_recovery);
    assert!(p.current_lsn.is_some());
    assert_eq!(p.received_lsn, None);
    assert_eq!(p.term, Some(5));
    assert_eq!(p.timeline, 1);
    assert!(p.server_version_num >= 130000);
    assert!(p.wal_receiver.is_none());
    assert!(p.postmaster_start_unix > 1.0e9);
    serde_json::to_string(&p).unwrap();

    client.batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2)").await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);

    // The superuser password set by initdb works over TCP (SCRAM), and can be changed.
    let tcp = |pw: &str| format!("host=127.0.0.1 port={} user=postgres password='{pw}' dbname=postgres", inst.port);
    let (c2, conn) = tokio_postgres::connect(&tcp("s3cret\\'pw"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    drop(c2);
    set_superuser_password(&client, "postgres", "n3w\\pw").await.unwrap();
    let (c3, conn) = tokio_postgres::connect(&tcp("n3w\\\\pw"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    drop(c3);

    // A new term reaches the running server through reload.
    assert!(inst.write_conf(&managed_conf(&inst, 6)).unwrap());
    inst.reload().await.unwrap();
    wait_for("term 6 after reload", T, || async { (probe(&client).await.unwrap().term == Some(6)).then_some(()) })
        .await;

    inst.stop(StopMode::Fast, T).await.unwrap();
    assert!(inst.postmaster_pid().is_none());
    let cd = inst.controldata().await.unwrap();
    assert_eq!(cd.state, "shut down");
    assert_eq!(cd.timeline, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_streams_then_promotes() {
    let tmp = tempdir("pgkeel-pg-test-");
    let primary = instance(tmp.path(), "n1");
    let replica = instance(tmp.path(), "n2");
    let _g1 = start_primary(&primary, "supersecret", 1).await;
    let pc = primary.connect(T).await.unwrap();
    ensure_replication_user(&pc, "replicator", "repl'pw").await.unwrap();
    ensure_replication_user(&pc, "replicator", "repl pw\\x").await.unwrap(); // exists: ALTER
    let slot = slot_name_for("n2");
    // A user slot and a stale pgkeel slot: the stale one goes, the user's stays.
    pc.batch_execute(
        "SELECT pg_create_physical_replication_slot('user_slot'); \
         SELECT pg_create_physical_replication_slot('pgkeel_gone')",
    )
    .await
    .unwrap();
    ensure_slots(&pc, std::slice::from_ref(&slot)).await.unwrap();
    ensure_slots(&pc, std::slice::from_ref(&slot)).await.unwrap();
    let names: Vec<String> = probe(&pc).await.unwrap().slots.into_iter().map(|s| s.slot_name).collect();
    assert_eq!(names, vec![slot.clone(), "user_slot".to_string()]);
    pc.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (42)").await.unwrap();

    // Clone over TCP as the replication user.
    let source = SourceConn {
        host: "127.0.0.1".into(),
        port: primary.port,
        user: "replicator".into(),
        password: Some("repl pw\\x".into()),
    };
    replica.basebackup(&source, Some(&slot), T).await.unwrap();
    assert!(replica.is_initialized());
    let mut conf = managed_conf(&replica, 1);
    conf.primary_conninfo = Some(source.conninfo("n2"));
    conf.primary_slot_name = Some(slot.clone());
    replica.write_conf(&conf).unwrap();
    replica.write_hba("replicator", &[], &[]).unwrap();
    replica.set_standby(true).unwrap();
    replica.start(T).await.unwrap();
    let _g2 = StopOnDrop(replica.clone());

    let rc = replica.connect(T).await.unwrap();
    wait_for("row on the replica", T, || async {
        let n: i64 = rc.query_one("SELECT count(*) FROM t WHERE id = 42", &[]).await.ok()?.get(0);
        (n == 1).then_some(())
    })
    .await;
    let rp = wait_for("streaming wal receiver", T, || async {
        let p = probe(&rc).await.unwrap();
        (p.wal_receiver.as_ref().map(|w| w.status.as_str()) == Some("streaming")).then_some(p)
    })
    .await;
    assert!(rp.in_recovery);
    assert!(rp.received_lsn.is_some() && rp.replayed_lsn.is_some());
    assert_eq!(rp.current_lsn, None);
    assert_eq!(rp.timeline, 1);
    let w = rp.wal_receiver.unwrap();
    assert_eq!(w.slot_name.as_deref(), Some(slot.as_str()));
    assert_eq!(w.sender_port, Some(primary.port as i32));
    assert!(w.flushed_lsn.is_some());

    let pp = wait_for("replication row and active slot on the primary", T, || async {
        let p = probe(&pc).await.unwrap();
        let ok = p.replication.iter().any(|r| r.application_name == "n2" && r.state == "streaming")
            && p.slots.iter().any(|s| s.slot_name == slot && s.active);
        ok.then_some(p)
    })
    .await;
    let row = pp.replication.iter().find(|r| r.application_name == "n2").unwrap();
    assert_eq!(row.client_addr.as_deref(), Some("127.0.0.1"));
    assert!(row.sent_lsn.is_some());

    let err = rc.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));

    // Only the replication role may replicate.
    let other = SourceConn { user: "postgres".into(), password: Some("supersecret".into()), ..source.clone() };
    let other_replica = instance(tmp.path(), "n3");
    let e = other_replica.basebackup(&other, None, T).await.unwrap_err().to_string();
    assert!(e.contains("pg_hba.conf"), "{e}");

    // Switchover: clean stop of the primary, replica catches up, then promotion.
    primary.stop(StopMode::Fast, T).await.unwrap();
    let old = primary.controldata().await.unwrap();
    assert_eq!(old.state, "shut down");
    assert_eq!(old.timeline, 1);
    wait_for("replica replayed the shutdown checkpoint", T, || async {
        let p = probe(&rc).await.unwrap();
        (p.replayed_lsn? > old.checkpoint_lsn).then_some(())
    })
    .await;
    assert!(matches!(replica.set_standby(false), Err(PgError::BadDataDir { .. })), "would break the promotion");
    replica.promote(T).await.unwrap();
    assert!(!replica.data_dir.join("standby.signal").exists());
    replica.set_standby(false).unwrap(); // already gone: fine
    let p = probe(&rc).await.unwrap();
    assert!(!p.in_recovery);
    assert_eq!(p.timeline, 2);
    assert!(p.current_lsn.is_some());
    rc.execute("INSERT INTO t VALUES (43)", &[]).await.unwrap();

    // After pg_rewind from it, the new primary writes WAL past the insert position pg_rewind
    // read (the rewound standby's minimum recovery point), even when nothing else writes.
    let insert: String = rc.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    let su = SourceConn { port: replica.port, ..other };
    Instance::advance_source_wal(&su, T).await.unwrap();
    let q = "SELECT pg_current_wal_insert_lsn() > $1::text::pg_lsn";
    let inserted: bool = rc.query_one(q, &[&insert]).await.unwrap().get(0);
    assert!(inserted, "a WAL record inserted after {insert}");
    wait_for(&format!("WAL flushed past {insert}"), T, || async {
        let q = "SELECT pg_current_wal_flush_lsn() > $1::text::pg_lsn";
        rc.query_one(q, &[&insert]).await.ok()?.get::<_, bool>(0).then_some(())
    })
    .await;
    let bad = SourceConn { password: Some("wrong".into()), ..su };
    let e = Instance::advance_source_wal(&bad, T).await.unwrap_err().to_string();
    assert!(e.contains("WAL write on the new primary after pg_rewind"), "{e}");

    let history = replica.read_timeline_history(2).expect("00000002.history");
    let entries = parse_history(&history);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, 1);
    assert!(can_follow(&entries, old.timeline, old.checkpoint_lsn), "{entries:?} vs {old:?}");
    assert_eq!(replica.controldata().await.unwrap().system_identifier, old.system_identifier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_modes_and_crash() {
    let tmp = tempdir("pgkeel-pg-test-");
    let inst = instance(tmp.path(), "n1");
    let _guard = start_primary(&inst, "", 1).await;

    inst.stop(StopMode::Smart, T).await.unwrap();
    assert!(inst.postmaster_pid().is_none());
    inst.stop(StopMode::Fast, T).await.unwrap(); // not running: success

    inst.start(T).await.unwrap();
    inst.stop(StopMode::Immediate, T).await.unwrap();
    assert!(inst.postmaster_pid().is_none());
    assert_eq!(inst.controldata().await.unwrap().state, "in production", "immediate stop leaves no checkpoint");

    inst.start(T).await.unwrap(); // crash recovery
    let pid = inst.postmaster_pid().unwrap();
    // SAFETY: kill(2) on our own postmaster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for("postmaster gone after SIGKILL", T, || async { inst.postmaster_pid().is_none().then_some(()) }).await;
    assert!(inst.data_dir.join("postmaster.pid").exists(), "stale pid file stays behind");
    inst.stop(StopMode::Fast, T).await.unwrap(); // stale pid file: not running, success

    // Restart after the crash; orphaned backends may hold shared memory for a moment.
    wait_for("restart after crash", T, || async { inst.start(T).await.ok() }).await;
    let client = inst.connect(T).await.unwrap();
    assert!(!probe(&client).await.unwrap().in_recovery);
    inst.stop(StopMode::Fast, T).await.unwrap();

    // A failed start explains itself with the end of the server log.
    let mut bad = managed_conf(&inst, 1);
    bad.parameters.insert("shared_buffers".into(), "banana".into());
    inst.write_conf(&bad).unwrap();
    let e = inst.start(T).await.unwrap_err().to_string();
    assert!(e.contains("last lines of") && e.contains("banana"), "{e}");
    assert!(inst.postmaster_pid().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basebackup_failure_is_clean() {
    let tmp = tempdir("pgkeel-pg-test-");
    let primary = instance(tmp.path(), "n1");
    let _g = start_primary(&primary, "supersecret", 1).await;
    let pc = primary.connect(T).await.unwrap();
    ensure_replication_user(&pc, "replicator", "right").await.unwrap();

    let replica = instance(tmp.path(), "n2");
    let source = SourceConn {
        host: "127.0.0.1".into(),
        port: primary.port,
        user: "replicator".into(),
        password: Some("wrong".into()),
    };
    let err = replica.basebackup(&source, None, T).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PgError::CommandFailed { .. }), "{msg}");
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("wrong"), "the password must not appear: {msg}");
    eprintln!("{msg}");
    assert!(!replica.data_dir.exists(), "no partial data dir left");

    // A pre-existing empty directory is kept, but empty.
    std::fs::create_dir_all(&replica.data_dir).unwrap();
    replica.basebackup(&source, None, T).await.unwrap_err();
    assert_eq!(std::fs::read_dir(&replica.data_dir).unwrap().count(), 0);

    // A non-empty directory is refused, and can be moved aside.
    std::fs::write(replica.data_dir.join("precious"), "x").unwrap();
    let ok = SourceConn { password: Some("right".into()), ..source };
    assert!(matches!(replica.basebackup(&ok, None, T).await, Err(PgError::BadDataDir { .. })));
    let old = replica.move_aside().unwrap();
    assert!(old.join("precious").exists());
    assert!(!replica.data_dir.exists());
    replica.basebackup(&ok, None, T).await.unwrap();
    assert!(replica.is_initialized());
    // A running server is never moved aside.
    assert!(matches!(primary.move_aside(), Err(PgError::BadDataDir { .. })));
}
