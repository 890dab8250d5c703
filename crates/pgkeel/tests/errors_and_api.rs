//! Bad input gets clear errors (config files, CLI arguments, REST requests), and the health
//! endpoints follow Patroni's status semantics. Also the test harness's own promise: a test
//! ended by a signal (a timeout, Ctrl-C) leaves no cluster behind.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgkeel_testkit::{alive, psql, read_pid, signal, wait_for, Cluster};
use serde_json::json;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run pgkeel");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn config_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const GOOD: &str = r#"
cluster = "main"
name = "n1"
data_dir = "/var/lib/pgkeel/n1/data"
[dcs]
kind = "local"
path = "/var/lib/pgkeel/dcs"
"#;

#[test]
fn config_check_reports_bad_files_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_file(dir.path(), "good.toml", GOOD);
    let (code, out, _) = run(&["config", "check", &good]);
    assert_eq!(code, 0);
    assert!(out.contains("OK"));

    #[rustfmt::skip]
    let cases: &[(&str, String, &str)] = &[
        ("typo at top level", format!("nmae = \"x\"\n{GOOD}"), "did you mean \"name\""),
        ("typo in a table", GOOD.replace("[dcs]", "[postgres]\nlisen = \"127.0.0.1:5432\"\n[dcs]"), "did you mean \"postgres.listen\""),
        ("typo in bootstrap", format!("{GOOD}\n[bootstrap]\nttll = 5\n"), "did you mean \"bootstrap.ttl\""),
        ("bad port", GOOD.replace("[dcs]", "[postgres]\nlisten = \"127.0.0.1:99999\"\n[dcs]"), "99999"),
        ("relative data_dir", GOOD.replace("/var/lib/pgkeel/n1/data", "data"), "data_dir"),
        ("timing rule", format!("{GOOD}\n[bootstrap]\nttl = 3\nloop_wait = 1\nretry_timeout = 2\n"), "retry_timeout"),
        ("managed parameter", format!("{GOOD}\n[postgres.parameters]\nport = 5433\n"), "port"),
        ("unknown dcs kind", GOOD.replace("kind = \"local\"", "kind = \"zookeeper\""), "local"),
        ("syntax error", "cluster = \n".to_string(), "line"),
        ("missing key", GOOD.replace("name = \"n1\"", ""), "name"),
    ];
    for (what, text, needle) in cases {
        let f = config_file(dir.path(), "bad.toml", text);
        let (code, _, err) = run(&["config", "check", &f]);
        assert_eq!(code, 64, "{what}: exit code 64 expected, stderr: {err}");
        assert!(err.contains(needle), "{what}: error should mention {needle:?}: {err}");
    }
    let (code, _, err) = run(&["config", "check", "/nonexistent/node.toml"]);
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/node.toml"), "{err}");
    // The agent refuses a bad config the same way, before binding anything.
    let f = config_file(dir.path(), "bad.toml", &format!("nmae = \"x\"\n{GOOD}"));
    let (code, _, err) = run(&["agent", "--config", &f]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn config_example_is_valid() {
    let (code, example, _) = run(&["config", "example"]);
    assert_eq!(code, 0);
    assert!(example.lines().filter(|l| l.trim_start().starts_with('#')).count() > 20, "the example is annotated");
    let dir = tempfile::tempdir().unwrap();
    let f = config_file(dir.path(), "example.toml", &example);
    let (code, _, err) = run(&["config", "check", &f]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_cli_arguments_get_clear_errors() {
    #[rustfmt::skip]
    let cases: &[(&[&str], i32, &str)] = &[
        (&["frobnicate"], 2, "unrecognized subcommand"),
        (&["up"], 2, "--dir"),
        (&["up", "--dir", "/tmp/x", "--nodes", "0"], 2, "--nodes"),
        (&["up", "--dir", "/tmp/x", "--nodes", "many"], 2, "invalid value"),
        (&["failover"], 2, "--to"),
        (&["list", "--api", "http://x:1", "--dir", "/tmp"], 2, "cannot be used with"),
        (&["list"], 1, "--api URL, --config node.toml or --dir DIR"),
        (&["list", "--dir", "/nonexistent-dir"], 1, "pgkeel up"),
        (&["list", "--api", "https://127.0.0.1:1"], 1, "https is not supported"),
        (&["list", "--api", "http://127.0.0.1:1"], 1, "no member answered"),
        (&["--log-level", "loud", "list"], 2, "bad log level"),
    ];
    for (args, want, needle) in cases {
        let (code, _, err) = run(args);
        assert_eq!(code, *want, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: stderr should mention {needle:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_health_semantics_and_bad_requests() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(20)).await;
    // Let the replica see the leader's status key so its lag is known.
    wait_for("replica lag known", Duration::from_secs(10), || async {
        c.api(&replica, "GET", "/node", None, false).await.json().ok()?["lag_bytes"].as_u64()
    })
    .await;

    #[rustfmt::skip]
    let health: &[(&str, &str, u16, u16)] = &[
        // path, method, status on leader, status on replica
        ("/", "GET", 200, 503),
        ("/primary", "GET", 200, 503),
        ("/primary", "HEAD", 200, 503),
        ("/primary", "OPTIONS", 200, 503),
        ("/read-write", "GET", 200, 503),
        ("/leader", "GET", 200, 503),
        ("/replica", "GET", 503, 200),
        ("/replica?lag=10MB", "GET", 503, 200),
        ("/replica?lag=1048576", "HEAD", 503, 200),
        ("/replica?replication_state=streaming", "GET", 503, 200),
        ("/read-only", "GET", 200, 200),
        ("/async", "GET", 503, 200),
        ("/sync", "GET", 503, 503),
        ("/health", "GET", 200, 200),
        ("/liveness", "GET", 200, 200),
        ("/readiness", "GET", 200, 200),
    ];
    for (path, method, on_leader, on_replica) in health {
        for (node, want) in [(&leader, on_leader), (&replica, on_replica)] {
            let r = c.api(node, method, path, None, false).await;
            assert_eq!(r.status, *want, "{method} {path} on {node}: {}", r.text());
            if *method != "GET" {
                assert!(r.body.is_empty(), "{method} {path} has no body");
            }
        }
    }
    let node = c.api(&leader, "GET", "/node", None, false).await.json().unwrap();
    assert_eq!(node["role"], "primary");
    assert!(node["holds_lease"].as_bool().unwrap());
    // The leader's view of its replicas is refreshed every loop.
    let metrics = wait_for("the leader sees its replica", Duration::from_secs(10), || async {
        let m = c.api(&leader, "GET", "/metrics", None, false).await.text();
        m.contains("pgkeel_replication_lag_bytes{").then_some(m)
    })
    .await;
    for m in [
        "pgkeel_primary{",
        "pgkeel_term{",
        "pgkeel_timeline{",
        "pgkeel_replication_lag_bytes{",
        "pgkeel_lease_seconds_left{",
        "pgkeel_cluster_failovers_total{",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}:\n{metrics}");
    }
    let cluster = c.api(&replica, "GET", "/cluster", None, false).await.json().unwrap();
    assert_eq!(cluster["leader"], leader.as_str());

    #[rustfmt::skip]
    let bad: &[BadRequest] = &[
        ("GET", "/replica?lag=lots", None, false, 400, "bad lag"),
        ("GET", "/replica?replication_state=flying", None, false, 400, "replication_state"),
        ("POST", "/primary", None, false, 405, "GET, HEAD and OPTIONS"),
        ("GET", "/nope", None, false, 404, "no endpoint"),
        ("DELETE", "/switchover", None, true, 405, "POST"),
        ("POST", "/switchover", Some(json!({})), false, 401, "Basic"),
        ("POST", "/switchover", Some(json!({"candidate": 5})), true, 400, "member name"),
        ("POST", "/switchover", Some(json!({"to": "n1"})), true, 400, "unknown field"),
        ("POST", "/switchover", Some(json!([1, 2])), true, 400, "JSON object"),
        ("POST", "/switchover", Some(json!({"leader": "someone-else"})), true, 412, "leader"),
        ("POST", "/switchover", Some(json!({"scheduled_at": "2030-01-01T00:00:00Z"})), true, 400, "scheduled"),
        ("POST", "/failover", Some(json!({})), true, 400, "requires"),
        ("POST", "/failover", Some(json!({"candidate": leader.clone()})), true, 412, "already the leader"),
        ("PATCH", "/config", Some(json!({"ttl": 1})), true, 400, "ttl"),
        ("PATCH", "/config", Some(json!({"ttll": 5})), true, 400, "ttll"),
        ("PATCH", "/config", Some(json!({"loop_wait": 2, "retry_timeout": 2})), true, 400, "loop_wait"),
        ("PATCH", "/config", Some(json!({"postgresql": {"pg_hba": ["host all all md5"]}})), true, 400, "postgresql.pg_hba[0]"),
        ("POST", "/reload", None, false, 401, "Basic"),
        ("GET", "/reload", None, true, 405, "POST"),
    ];
    for (method, path, body, auth, want, needle) in bad {
        let r = c.api(&leader, method, path, body.as_ref(), *auth).await;
        assert_eq!(r.status, *want, "{method} {path} {body:?}: {}", r.text());
        assert!(r.text().contains(needle), "{method} {path}: reply should mention {needle:?}: {}", r.text());
    }
    // Not JSON at all.
    let raw = pgkeel_agent::http::split_url(&c.api_url(&leader)).unwrap().0;
    let reply = raw_http(
        &raw,
        "POST /switchover HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nauthorization: Basic Zm9vOmJhcg==\r\n\r\n{{{{{",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("www-authenticate: basic"), "{reply}");
    let auth = base64_auth(&c);
    let body = "{{{{{";
    let reply = raw_http(
        &raw,
        &format!(
            "POST /switchover HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nauthorization: Basic {auth}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("not valid JSON"), "{reply}");
    let reply = raw_http(&raw, "GARBAGE\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400") || reply.is_empty(), "{reply}");
    // The API still answers after all that.
    assert_eq!(c.api(&leader, "GET", "/health", None, false).await.status, 200);

    // Dynamic config: a reloadable parameter reaches every member; one that needs a restart is
    // flagged as pending.
    let patch = json!({"postgresql": {"parameters": {"work_mem": "7MB", "max_connections": 120}}});
    let r = c.api(&replica, "PATCH", "/config", Some(&patch), true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for n in c.nodes() {
        let dsn = c.node_dsn(&n);
        wait_for(&format!("work_mem applied on {n}"), Duration::from_secs(10), || {
            let dsn = dsn.clone();
            async move { (pgkeel_testkit::psql(&dsn, "show work_mem").ok()? == "7MB").then_some(()) }
        })
        .await;
        wait_for(&format!("pending restart flagged on {n}"), Duration::from_secs(10), || async {
            let node = c.api(&n, "GET", "/node", None, false).await.json().ok()?;
            node["pending_restart"].as_array()?.iter().any(|p| p == "max_connections").then_some(())
        })
        .await;
    }
    let cfg = c.api(&leader, "GET", "/config", None, false).await.json().unwrap();
    assert_eq!(cfg["config"]["postgresql"]["parameters"]["work_mem"], "7MB");

    // pgkeel config set / show / edit, with validation and a version check.
    let out = c.ctl(&[
        "config",
        "set",
        "ttl=6s",
        "postgresql.parameters.work_mem=8MB",
        "postgresql.parameters.max_connections=null",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show = String::from_utf8_lossy(&c.ctl(&["config", "show"]).stdout).to_string();
    assert!(
        show.contains("\"ttl\": 6.0") && show.contains("\"work_mem\": \"8MB\"") && !show.contains("max_connections"),
        "{show}"
    );
    let out = c.ctl(&["config", "set", "ttl=2s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loop_wait"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.ctl(&["config", "set", "nonsense"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
    let version = c.api(&leader, "GET", "/config", None, false).await.json().unwrap()["version"].as_u64().unwrap();
    let out = std::process::Command::new(bin())
        .args(["config", "edit", "--dir", &c.dir().display().to_string()])
        .env("EDITOR", "sed -i 's/\"pause\": false/\"pause\": true/'")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = c.api(&leader, "GET", "/config", None, false).await.json().unwrap();
    assert_eq!(cfg["config"]["pause"], true);
    assert!(cfg["version"].as_u64().unwrap() > version);
    let out = std::process::Command::new(bin())
        .args(["config", "edit", "--dir", &c.dir().display().to_string()])
        .env("EDITOR", "sed -i 's/\"ttl\": 6.0/\"ttl\": 1.0/'")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "an invalid edit is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing changed"));
    // A write based on a stale version is a conflict, not a lost update.
    let r = pgkeel_agent::http::request_with_headers(
        "PATCH",
        &format!("{}/config", c.api_url(&leader)),
        Some(&json!({"pause": false})),
        Some(&c.auth()),
        &[("if-match", version.to_string())],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(c.ctl(&["resume"]).status.success());
}

/// method, path, body, authenticated, expected status, text the reply must contain
type BadRequest<'a> = (&'a str, &'a str, Option<serde_json::Value>, bool, u16, &'a str);

fn base64_auth(c: &Cluster) -> String {
    let a = c.auth();
    let raw = format!("{}:{}", a.username, a.password);
    // Tiny standard base64 encoder: enough for a test header.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = raw.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn raw_http(addr: &str, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into()
}

/// Not a test by itself: brings a cluster up, prints its directory and waits to be ended
/// (run by `a_test_ended_by_sigterm_leaves_no_cluster_behind`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: run by a_test_ended_by_sigterm_leaves_no_cluster_behind"]
async fn cluster_until_ended() {
    let c = Cluster::up(bin(), 1).await;
    c.leader().await.expect("a leader");
    println!("cluster dir: {}", c.dir().display());
    std::future::pending::<()>().await;
}

/// A test the runner ends with SIGTERM (nextest does at its timeout) never unwinds, so no
/// `Drop` runs; `pgkeel up` detached the cluster's processes, which would outlive it. The
/// testkit kills them and removes the directory on the signal.
#[test]
fn a_test_ended_by_sigterm_leaves_no_cluster_behind() {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "cluster_until_ended", "--ignored", "--nocapture", "--test-threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the helper test");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dir = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // After libtest's "test cluster_until_ended ... " on the same line.
            .find_map(|l| l.split_once("cluster dir: ").map(|(_, d)| PathBuf::from(d.trim())));
        let _ = tx.send(dir);
    });
    let dir = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Some(dir)) => dir,
        other => {
            // SIGTERM: the helper's cluster goes with it (what this test checks).
            signal(child.id() as i32, libc::SIGTERM);
            let _ = child.wait();
            panic!("the helper test printed no cluster directory within 120 s: {other:?}");
        }
    };
    let pid_in = |p: PathBuf| read_pid(&p).unwrap_or_else(|| panic!("no pid in {}", p.display()));
    let node = dir.join("nodes/n1");
    let pids = [
        ("agent", pid_in(node.join("agent.pid"))),
        ("postmaster", pid_in(node.join("data/postmaster.pid"))),
        ("guard", pid_in(node.join("guard.pid"))),
        ("proxy", pid_in(dir.join("proxy.pid"))),
    ];
    for (what, pid) in pids {
        assert!(alive(pid), "the {what} ({pid}) runs before the signal");
    }
    let (shmid, control) = pgkeel_testkit::ipc::shared_memory(&node.join("data")).expect("postgres' shared memory");
    let control = control.expect("a dynamic shared memory control segment");
    assert!(pgkeel_testkit::ipc::segment_exists(shmid) && control.exists(), "{shmid} {}", control.display());
    signal(child.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the helper test") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the helper test did not end within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the helper ends as SIGTERM ends a process: {status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|(_, p)| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (what, pid) in pids {
        assert!(!alive(pid), "the {what} ({pid}) outlived the test ended by SIGTERM");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    // The postmaster was SIGKILLed: its shared memory is released as its restart would.
    assert!(!pgkeel_testkit::ipc::segment_exists(shmid), "System V segment {shmid} left behind");
    assert!(!control.exists(), "{} left behind", control.display());
}

/// A postmaster the test kills and never restarts leaves its System V segment and its
/// `/dev/shm/PostgreSQL.*` files to the kernel; the cluster's teardown releases them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postmasters_shared_memory_is_released_at_teardown() {
    let c = Cluster::up(bin(), 1).await;
    let (leader, _) = c.leader().await.expect("a leader");
    let data = c.dir().join("nodes").join(&leader).join("data");
    let (shmid, control) = pgkeel_testkit::ipc::shared_memory(&data).expect("postgres' shared memory");
    let control = control.expect("a dynamic shared memory control segment");
    let postmaster = c.postmaster_pid(&leader).expect("a postmaster");
    c.kill_node(&leader);
    wait_for("the postmaster to die", Duration::from_secs(10), || async { (!alive(postmaster)).then_some(()) }).await;
    assert!(pgkeel_testkit::ipc::segment_exists(shmid) && control.exists(), "left behind by the kill, for now");
    drop(c);
    assert!(!pgkeel_testkit::ipc::segment_exists(shmid), "System V segment {shmid} left behind");
    assert!(!control.exists(), "{} left behind", control.display());
}

/// The cluster's `pg_hba` lines (`pgkeel config set postgresql.pg_hba=...`) reach every
/// member's `pg_hba.conf` and postgres takes them without a restart; a node's own lines come
/// first. SIGHUP and `pgkeel reload` make an agent read node.toml again: it takes the
/// reloadable keys, names the ones waiting for its restart, and keeps running on a broken
/// file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_toml_reload_and_the_clusters_pg_hba() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(30)).await;
    psql(&c.node_dsn(&leader), "create role hba_probe login password 'probe pw'").unwrap();
    // postgresql://postgres:PW@127.0.0.1:PORT/postgres, as hba_probe.
    let probe = |node: &str| {
        let address = c.node_dsn(node).rsplit_once('@').expect("a DSN with credentials").1.to_string();
        format!("postgresql://hba_probe:probe%20pw@{address}")
    };
    let login = |node: &str| psql(&probe(node), "select current_user");
    wait_for("the role on the replica", Duration::from_secs(20), || async { login(&replica).ok() }).await;

    // One cluster-wide line refuses hba_probe on every member, without a restart.
    let pids: Vec<_> = [&leader, &replica].map(|n| c.postmaster_pid(n)).into();
    let out = c.ctl(&["config", "set", r#"postgresql.pg_hba=["host all hba_probe 127.0.0.1/32 reject"]"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for node in [&leader, &replica] {
        let err = wait_for("postgres to take the cluster's line", Duration::from_secs(20), || async {
            login(node).err().filter(|e| e.contains("pg_hba.conf rejects connection"))
        })
        .await;
        assert!(err.contains("hba_probe"), "{err}");
        let hba = std::fs::read_to_string(c.dir().join("nodes").join(node).join("data").join("pg_hba.conf")).unwrap();
        assert!(hba.contains("(postgresql.pg_hba in the cluster config)"), "{hba}");
    }
    assert_eq!(pids, [&leader, &replica].map(|n| c.postmaster_pid(n)), "reloaded, not restarted");
    let out = c.ctl(&["config", "set", r#"postgresql.pg_hba=["host all hba_probe 127.0.0.1/32"]"#]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgresql.pg_hba[0]") && err.contains("too few fields"), "{err}");

    // The replica's node.toml: its own line (before the cluster's, so it wins), a parameter,
    // a tag, and a key that needs a restart. SIGHUP: the agent lives on and takes the first
    // three.
    let node_toml = c.dir().join("nodes").join(&replica).join("node.toml");
    let original = std::fs::read_to_string(&node_toml).unwrap();
    let mut config = pgkeel_config::load(&node_toml).expect("node.toml");
    config.postgres.pg_hba = vec!["host all hba_probe 127.0.0.1/32 scram-sha-256".into()];
    config.postgres.parameters.insert("work_mem".into(), pgkeel_config::ParamValue::Text("3MB".into()));
    config.tags.nofailover = true;
    let (host, port) = config.postgres.listen.rsplit_once(':').unwrap();
    config.postgres.listen = format!("{host}:{}", port.parse::<u16>().unwrap() + 1);
    std::fs::write(&node_toml, config.to_toml()).unwrap();
    let agent = c.agent_pid(&replica).expect("the replica's agent");
    signal(agent, libc::SIGHUP);
    assert_eq!(
        wait_for("the replica's own line to win", Duration::from_secs(20), || async { login(&replica).ok() }).await,
        "hba_probe"
    );
    assert!(login(&leader).is_err(), "the leader keeps refusing hba_probe");
    assert_eq!(psql(&c.node_dsn(&replica), "show work_mem").unwrap(), "3MB");
    wait_for("the replica's tag in /cluster", Duration::from_secs(20), || async {
        let v = c.cluster_json().await?;
        let m = v["members"].as_array()?.iter().find(|m| m["name"] == replica.as_str())?.clone();
        (m["tags"]["nofailover"] == true).then_some(())
    })
    .await;
    let list = String::from_utf8_lossy(&c.ctl(&["list"]).stdout).to_string();
    assert!(list.lines().any(|l| l.starts_with(replica.as_str()) && l.contains("nofailover")), "{list}");
    assert!(alive(agent), "SIGHUP must not end the agent");
    let log = std::fs::read_to_string(c.dir().join("nodes").join(&replica).join("agent.log")).unwrap();
    assert!(
        log.contains(
            "SIGHUP: node.toml reloaded, applying postgres.parameters.work_mem, postgres.pg_hba, tags.nofailover"
        ),
        "{log}"
    );
    assert!(
        log.contains("node.toml changes postgres.listen: the agent keeps the running values until it restarts"),
        "{log}"
    );
    assert_eq!(psql(&c.node_dsn(&replica), "select 1").unwrap(), "1", "still on the old port");

    // A broken file changes nothing; `pgkeel reload` says why and fails.
    std::fs::write(&node_toml, original.replace("[postgres]", "[postgres]\npg_hba = [\"hots all all 0.0.0.0/0 md5\"]"))
        .unwrap();
    let out = c.ctl(&["reload", &replica]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("node.toml not reloaded") && said.contains("postgres.pg_hba[0]"), "{said}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("not reloaded on {replica}")));
    assert_eq!(psql(&c.node_dsn(&replica), "show work_mem").unwrap(), "3MB");
    assert!(alive(agent));

    // The original file again, on every member: the replica drops its line, tag and
    // parameter; the leader has nothing to change.
    std::fs::write(&node_toml, &original).unwrap();
    let out = c.ctl(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{leader}: node.toml reloaded: nothing changed")), "{said}");
    assert!(said.contains(&format!("{replica}: node.toml reloaded: applied postgres.parameters.work_mem")), "{said}");
    wait_for("the cluster's line on the replica again", Duration::from_secs(20), || async {
        login(&replica).err().filter(|e| e.contains("pg_hba.conf rejects connection"))
    })
    .await;
    assert_ne!(psql(&c.node_dsn(&replica), "show work_mem").unwrap(), "3MB");
}

/// The shipped systemd units (`deploy/systemd/`) pass `systemd-analyze verify` (pointed at
/// the binary under test), and every pgkeel command line in them is one the CLI takes: run
/// here, each stops at the missing config file (exit 64), not at its arguments (exit 2).
#[test]
fn shipped_systemd_units_verify_and_name_real_commands() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    for unit in ["pgkeel-agent.service", "pgkeel-proxy.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"), "{unit}: reload is SIGHUP");
        let copy = dir.path().join(unit);
        std::fs::write(&copy, text.replace("/usr/local/bin/pgkeel", &bin().display().to_string())).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("run systemd-analyze (Debian's systemd package; scripts/install-deps.sh installs it)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{unit}: systemd-analyze verify: {err}");
        let commands: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ExecStart=").or_else(|| l.strip_prefix("ExecStartPre=")))
            .collect();
        assert_eq!(commands.len(), 2, "{unit}");
        for command in commands {
            let args: Vec<&str> = command.split_whitespace().skip(1).collect();
            let (code, _, err) = run(&args);
            assert_eq!(code, 64, "{unit}: {command}: {err}");
            assert!(err.contains("cannot read /etc/pgkeel/"), "{unit}: {command}: {err}");
        }
    }
}
