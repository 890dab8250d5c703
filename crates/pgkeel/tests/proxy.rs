//! `pgkeel proxy` in front of a real cluster, with real clients (psql, pgbench,
//! tokio-postgres): pooling, authentication, bad clients, and following the primary through a
//! node kill.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeel_testkit::{psql, wait_for, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A `pgkeel proxy` child process, killed on drop (its log is printed when the test fails).
struct Proxy {
    child: Child,
    port: u16,
    log: PathBuf,
    password: String,
}

impl Proxy {
    /// Starts a proxy for cluster `c` with `extra` lines of proxy.toml, and waits until it
    /// accepts connections.
    async fn start(c: &Cluster, name: &str, extra: &str) -> Proxy {
        let password = c.info["superuser"]["password"].as_str().expect("superuser password").to_string();
        Proxy::start_with_secret(c, name, extra, &password).await
    }

    /// [`Proxy::start`] with `secret` as postgres' entry in the userlist (the plaintext
    /// password or a SCRAM secret).
    async fn start_with_secret(c: &Cluster, name: &str, extra: &str, secret: &str) -> Proxy {
        let dir = c.dir().join(name);
        std::fs::create_dir_all(&dir).expect("create the proxy dir");
        let password = c.info["superuser"]["password"].as_str().expect("superuser password").to_string();
        std::fs::write(dir.join("userlist.txt"), format!("# test users\n\"postgres\" \"{secret}\"\n"))
            .expect("write the userlist");
        // The same [dcs] as the agents'.
        let node = pgkeel_config::load(&c.dir().join("nodes/n1/node.toml")).expect("n1's node.toml");
        let dcs = match node.dcs {
            pgkeel_config::DcsConfig::Local { path } => {
                format!("kind = \"local\"\npath = {}\n", serde_json::json!(path.display().to_string()))
            }
            pgkeel_config::DcsConfig::Etcd { endpoints } => {
                format!("kind = \"etcd\"\nendpoints = {}\n", serde_json::json!(endpoints))
            }
        };
        let port = free_port();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n[dcs]\n{dcs}\n[auth]\nuserlist = \"userlist.txt\"\n"
            ),
        )
        .expect("write proxy.toml");
        let check =
            Command::new(bin()).args(["proxy", "--check", "--config"]).arg(&config).output().expect("run pgkeel");
        assert!(check.status.success(), "proxy.toml is valid: {}", String::from_utf8_lossy(&check.stderr));
        let log = dir.join("proxy.log");
        let out = std::fs::File::create(&log).expect("create proxy.log");
        let mut cmd = Command::new(bin());
        cmd.args(["proxy", "--config"]).arg(&config).env("PGKEEL_LOG", "debug");
        cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("clone")).stderr(out);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the proxy when
        // the test thread dies, so a test killed hard leaves no proxy behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start pgkeel proxy");
        let p = Proxy { child, port, log, password };
        wait_for("the proxy to listen", Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
        p
    }

    /// URL for psql and tokio-postgres.
    fn dsn(&self) -> String {
        self.dsn_with("postgres", &self.password, "")
    }

    fn dsn_with(&self, user: &str, password: &str, params: &str) -> String {
        format!("postgresql://{user}:{password}@127.0.0.1:{}/postgres?connect_timeout=5{params}", self.port)
    }

    /// Key/value conninfo for pgbench (password in PGPASSWORD).
    fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 60 lines) ---", self.log.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    pgkeel_testkit::connect(dsn).await
}

/// The first column of the first row of a simple query.
async fn one(client: &tokio_postgres::Client, sql: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let msgs = client.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(String::from)),
            _ => None,
        })
        .flatten())
}

/// An error's text, with the server's message and SQLSTATE when there is one.
fn text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn pgbench(p: &Proxy, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(args)
        .arg(p.conninfo())
        .env("PGPASSWORD", &p.password)
        .stdin(Stdio::null())
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn assert_no_failed_transactions(mode: &str, out: &str) {
    let processed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("pgbench -M {mode}: no transaction count in:\n{out}"));
    assert!(processed > 0, "pgbench -M {mode} processed no transaction:\n{out}");
    assert!(
        out.contains("number of failed transactions: 0 (0.000%)"),
        "pgbench -M {mode} had failed transactions:\n{out}"
    );
    assert!(!out.contains("error"), "pgbench -M {mode} reported errors:\n{out}");
    eprintln!("pgbench -M {mode} through the proxy: {processed} transactions, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pools_authenticates_and_refuses_bad_clients() {
    let c = Cluster::up(bin(), 1).await;
    let (leader, term) = c.leader().await.expect("a leader");
    let p = Proxy::start(&c, "proxy", "pool_size = 4").await;

    // psql: a simple query reaches the primary, under its term.
    let port = c.node_dsn(&leader).rsplit(':').next().and_then(|s| s.split('/').next()).unwrap().to_string();
    assert_eq!(
        psql(&p.dsn(), "select inet_server_port(), current_setting('pgkeel.term'), pg_is_in_recovery()").unwrap(),
        format!("{port}|{term}|f")
    );
    // psql: an error is reported as postgres reports it.
    let err = psql(&p.dsn(), "select 1/0").unwrap_err();
    assert!(err.contains("division by zero"), "{err}");
    // psql: a multi-statement transaction in one query string.
    psql(&p.dsn(), "create table t(id int primary key, v text)").unwrap();
    psql(&p.dsn(), "begin; insert into t values (1, 'a'); commit").unwrap();
    assert_eq!(psql(&p.dsn(), "select count(*) from t").unwrap(), "1");

    // tokio-postgres: a transaction over several round trips, with extended-protocol
    // statements inside it; an error inside a transaction; the session goes on afterwards.
    let client = connect(&p.dsn()).await.expect("connect through the proxy");
    {
        let mut client = connect(&p.dsn()).await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute("insert into t values ($1, $2)", &[&2i32, &"b"]).await.unwrap();
        let n: i64 = tx.query_one("select count(*) from t where id <= $1", &[&2i32]).await.unwrap().get(0);
        assert_eq!(n, 2, "the transaction sees its own row");
        tx.rollback().await.unwrap();
    }
    assert_eq!(one(&client, "select count(*) from t").await.unwrap().as_deref(), Some("1"), "rolled back");
    client.simple_query("begin").await.unwrap();
    let e = client.simple_query("select 1/0").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let e = client.simple_query("select 1").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    client.simple_query("rollback").await.unwrap();
    assert_eq!(one(&client, "select 2").await.unwrap().as_deref(), Some("2"));

    // A client that vanishes mid-transaction: its transaction is rolled back, and the pool
    // does not lose the connection (4 times with a pool of 4).
    for i in 10..14 {
        let c2 = connect(&p.dsn()).await.unwrap();
        c2.simple_query(&format!("begin; insert into t values ({i}, 'lost')")).await.unwrap();
        drop(c2);
    }
    wait_for("the vanished clients' transactions to roll back", Duration::from_secs(10), || async {
        (one(&client, "select count(*) from t where v = 'lost'").await.ok()?.as_deref() == Some("0")).then_some(())
    })
    .await;

    // Session settings given at connection time follow the client to every server
    // connection; a client's SET is remembered too.
    let a = connect(&p.dsn_with("postgres", &p.password, "&application_name=app_a")).await.unwrap();
    let b = connect(&p.dsn_with("postgres", &p.password, "&application_name=app_b")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(one(&a, "show application_name").await.unwrap().as_deref(), Some("app_a"));
        assert_eq!(one(&b, "show application_name").await.unwrap().as_deref(), Some("app_b"));
    }
    a.simple_query("set application_name = 'app_a2'").await.unwrap();
    assert_eq!(one(&b, "show application_name").await.unwrap().as_deref(), Some("app_b"));
    assert_eq!(one(&a, "show application_name").await.unwrap().as_deref(), Some("app_a2"));

    // A cancel request reaches the backend running this client's query.
    let sleeper = connect(&p.dsn()).await.unwrap();
    let token = sleeper.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = sleeper.simple_query("select pg_sleep(30)").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "cancelled promptly");
    canceller.await.unwrap().unwrap();

    // pgbench: initialise, then 4 clients for 5 s in simple and extended protocol.
    let t = Instant::now();
    pgbench(&p, &["-i", "-s", "1", "-q"]);
    eprintln!("pgbench -i through the proxy: {:?}", t.elapsed());
    for mode in ["simple", "extended"] {
        let out = pgbench(&p, &["-c", "4", "-j", "2", "-T", "5", "-M", mode]);
        assert_no_failed_transactions(mode, &out);
    }

    // Wrong password, unknown user: the same clear error.
    let err = psql(&p.dsn_with("postgres", "wrong", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"postgres\""), "{err}");
    let err = psql(&p.dsn_with("nobody", "x", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"nobody\""), "{err}");
    // Unknown database: postgres' own error, forwarded.
    let err = psql(&p.dsn().replace("/postgres?", "/nodb?"), "select 1").unwrap_err();
    assert!(err.contains("database \"nodb\" does not exist"), "{err}");

    // A userlist holding the SCRAM secret instead of the password: clients log in with the
    // password, and the proxy logs in to postgres with the key recovered from their proof.
    let secret = psql(&c.node_dsn(&leader), "select rolpassword from pg_authid where rolname = 'postgres'").unwrap();
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let passthrough = Proxy::start_with_secret(&c, "passthrough", "", &secret).await;
    assert_eq!(psql(&passthrough.dsn(), "select current_user").unwrap(), "postgres");
    let err = psql(&passthrough.dsn_with("postgres", "wrong", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    drop(passthrough);

    // Garbage bytes: a protocol error, then the connection is closed.
    for (garbage, expected) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "startup packet: length"),
        (&b"\x00\x00\x00\x08\x00\x01\x00\x00"[..], "unsupported frontend protocol 1.0"),
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).expect("the proxy closes the connection");
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(answer.first(), Some(&b'E'), "an ErrorResponse: {text:?}");
        assert!(text.contains("08P01") && text.contains(expected), "{text:?}");
    }
    // The proxy still serves clients after all that.
    assert_eq!(psql(&p.dsn(), "select 42").unwrap(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pool_limits_wait_queue_and_session_mode() {
    let c = Cluster::up(bin(), 1).await;
    c.leader().await.expect("a leader");

    // Transaction mode, one server connection, a short wait.
    let p = Proxy::start(&c, "small", "pool_size = 1\nquery_wait_timeout = \"700ms\"").await;
    let holder = connect(&p.dsn()).await.unwrap();
    holder.simple_query("begin; select 1").await.unwrap();
    let waiter = connect(&p.dsn()).await.unwrap();
    let started = Instant::now();
    let e = waiter.simple_query("select 1").await.unwrap_err();
    let waited = started.elapsed();
    let db = e.as_db_error().unwrap_or_else(|| panic!("a server error, not {e}"));
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{db}");
    assert!(db.message().contains("query_wait_timeout (700ms)"), "{}", db.message());
    assert!(waited >= Duration::from_millis(600) && waited < Duration::from_secs(5), "waited {waited:?}");
    // Once the holder commits, the next client gets the connection; a waiting client is
    // served as soon as it is free.
    let queued = tokio::spawn({
        let dsn = p.dsn();
        async move {
            let c = connect(&dsn).await.unwrap();
            one(&c, "select 'served'").await.unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.simple_query("commit").await.unwrap();
    assert_eq!(queued.await.unwrap().as_deref(), Some("served"));

    // Session mode: the connection is the client's until it leaves, then DISCARD ALL.
    let s = Proxy::start(&c, "session", "pool_mode = \"session\"\npool_size = 1\nquery_wait_timeout = \"500ms\"").await;
    let first = connect(&s.dsn()).await.unwrap();
    first.simple_query("set myapp.flag = 'leaked'; create temp table tmp(x int)").await.unwrap();
    let pid = one(&first, "select pg_backend_pid()").await.unwrap();
    assert_eq!(one(&first, "select current_setting('myapp.flag')").await.unwrap().as_deref(), Some("leaked"));
    // The only server connection belongs to `first`: another client cannot even log in.
    let Err(e) = connect(&s.dsn()).await else { panic!("no connection while the session holds it") };
    assert!(text(&e).contains("query_wait_timeout"), "{}", text(&e));
    drop(first);
    let second = wait_for("the session's connection back in the pool", Duration::from_secs(10), || async {
        connect(&s.dsn()).await.ok()
    })
    .await;
    assert_eq!(one(&second, "select pg_backend_pid()").await.unwrap(), pid, "the same server connection");
    assert_eq!(one(&second, "select current_setting('myapp.flag', true)").await.unwrap().unwrap_or_default(), "");
    assert_eq!(
        one(&second, "select count(*) from pg_tables where tablename = 'tmp'").await.unwrap().as_deref(),
        Some("0"),
        "DISCARD ALL dropped the temp table"
    );
}

/// What the writer saw: acknowledged terms with the time of the acknowledgement, and errors.
#[derive(Default)]
struct Seen {
    acks: Vec<(Instant, u64)>,
    errors: Vec<(Instant, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_follows_the_primary_through_a_node_kill() {
    let c = Cluster::up(bin(), 3).await;
    let (old, old_term) = c.leader().await.expect("a leader");
    let p = Proxy::start(&c, "proxy", "failover_hold_timeout = \"30s\"").await;
    psql(&p.dsn(), "create table w(id bigserial primary key, term bigint not null)").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (dsn, stop) = (p.dsn(), stop.clone());
        async move {
            let mut seen = Seen::default();
            let mut client: Option<tokio_postgres::Client> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match connect(&dsn).await {
                        Ok(c) => Some(c),
                        Err(e) => {
                            seen.errors.push((Instant::now(), format!("connect: {}", text(&e))));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                }
                let Some(cl) = &client else { continue };
                let sql = "insert into w(term) values (current_setting('pgkeel.term')::bigint) returning term";
                match one(cl, sql).await {
                    Ok(Some(t)) => seen.acks.push((Instant::now(), t.parse().unwrap_or(0))),
                    Ok(None) => seen.errors.push((Instant::now(), "no row".into())),
                    Err(e) => seen.errors.push((Instant::now(), text(&e))),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    });
    wait_for("writes through the proxy", Duration::from_secs(10), || async {
        (psql(&p.dsn(), "select count(*) from w").ok()?.parse::<i64>().ok()? >= 10).then_some(())
    })
    .await;

    let killed = Instant::now();
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(30)).await;
    assert!(new_term > old_term);
    // New transactions go to the new primary within ttl (4 s) plus a few seconds.
    let dsn = p.dsn();
    wait_for("writes through the proxy under the new term", Duration::from_secs(20), || async {
        let n = psql(&dsn, &format!("select count(*) from w where term = {new_term}")).ok()?;
        (n.parse::<i64>().ok()? >= 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = writer.await.unwrap();

    let first_new = seen
        .acks
        .iter()
        .find(|(at, t)| *at > killed && *t == new_term)
        .map(|(at, _)| at.duration_since(killed))
        .expect("a write acknowledged under the new term");
    let last_old = seen.acks.iter().filter(|(_, t)| *t == old_term).map(|(at, _)| *at).max().expect("old-term acks");
    eprintln!(
        "{old} killed; {new} leads under term {new_term}; first write through the proxy on it after {first_new:?}; \
         {} acks, {} errors: {:?}",
        seen.acks.len(),
        seen.errors.len(),
        seen.errors.iter().map(|(at, e)| (at.saturating_duration_since(killed), e)).collect::<Vec<_>>()
    );
    assert!(first_new < Duration::from_secs(4 + 6), "write outage through the proxy: {first_new:?}");
    // Terms only move forward: nothing was acknowledged under the old term after a write
    // under the new one.
    let first_new_at = killed + first_new;
    assert!(last_old < first_new_at, "an old-term write was acknowledged after a new-term one");
    assert!(seen.acks.iter().all(|(_, t)| *t == old_term || *t == new_term), "only the two terms served writes");
    // Errors are limited to the transaction in flight when the node died.
    assert!(seen.errors.len() <= 2, "client errors: {:?}", seen.errors);
    // The new primary has every acknowledged row.
    let acked_new = seen.acks.iter().filter(|(_, t)| *t == new_term).count() as i64;
    let rows: i64 =
        psql(&c.node_dsn(&new), &format!("select count(*) from w where term = {new_term}")).unwrap().parse().unwrap();
    assert!(rows >= acked_new, "{rows} rows under the new term, {acked_new} acknowledged");
}
