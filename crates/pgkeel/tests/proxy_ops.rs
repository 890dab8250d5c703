//! Operating `pgkeel proxy`: the admin console (database `pgkeel`), `/metrics`, RELOAD and
//! SIGHUP, PAUSE/RESUME, the drain on SIGTERM, DISABLE/ENABLE/KILL/RECONNECT of a database,
//! and `pgkeel config check` on a proxy.toml.
//! A real one-node `pgkeel up` cluster, a real proxy process, tokio-postgres and psql.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pgkeel_testkit::{psql, wait_for, Cluster};
use tokio_postgres::SimpleQueryMessage;

mod proxy_support;

use proxy_support::{bin, dcs_toml, free_port, http_get, metric, proxy_dir, superuser_password, Proxy};

/// A proxy.toml: the ports, the admin user and the DCS stay; the rest can be rewritten.
struct ConfigFile {
    path: PathBuf,
    port: u16,
    metrics_port: u16,
    dcs: String,
}

impl ConfigFile {
    fn write(&self, extra: &str) {
        std::fs::write(
            &self.path,
            format!(
                "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
                 admin_users = [\"postgres\"]\n{extra}\n[dcs]\n{}\n[auth]\nuserlist = \"userlist.txt\"\n",
                self.port, self.metrics_port, self.dcs
            ),
        )
        .expect("write proxy.toml");
    }
}

/// The proxy under test, with its rewritable proxy.toml and metrics port.
struct OpsProxy {
    p: Proxy,
    metrics_port: u16,
    config: ConfigFile,
}

impl std::ops::Deref for OpsProxy {
    type Target = Proxy;
    fn deref(&self) -> &Proxy {
        &self.p
    }
}

impl std::ops::DerefMut for OpsProxy {
    fn deref_mut(&mut self) -> &mut Proxy {
        &mut self.p
    }
}

impl OpsProxy {
    async fn start(c: &Cluster, extra: &str) -> OpsProxy {
        let password = superuser_password(c);
        let dir = proxy_dir(c, "proxy-ops", &[("postgres", &password), ("app", "app-secret")]);
        let (port, metrics_port) = (free_port(), free_port());
        let config = ConfigFile { path: dir.join("proxy.toml"), port, metrics_port, dcs: dcs_toml(c) };
        config.write(extra);
        let p = Proxy::launch(&config.path, port, password).await;
        OpsProxy { p, metrics_port, config }
    }

    fn dsn(&self, database: &str) -> String {
        self.p.url("postgres", &self.p.password, database, "")
    }

    fn dsn_as(&self, user: &str, password: &str, database: &str) -> String {
        self.p.url(user, password, database, "")
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    pgkeel_testkit::connect(dsn).await
}

/// The rows of a console command, as maps of column name to value.
async fn show(admin: &tokio_postgres::Client, cmd: &str) -> Vec<std::collections::HashMap<String, String>> {
    let msgs = admin.simple_query(cmd).await.unwrap_or_else(|e| panic!("{cmd}: {e}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn config_value(admin: &tokio_postgres::Client, key: &str) -> String {
    show(admin, "SHOW CONFIG").await.into_iter().find(|r| r["key"] == key).map(|r| r["value"].clone()).expect(key)
}

/// The primary pool's row of `postgres`/`postgres` in a console table.
fn primary_row(
    rows: &[std::collections::HashMap<String, String>],
) -> Option<&std::collections::HashMap<String, String>> {
    rows.iter().find(|r| r["database"] == "postgres" && r["user"] == "postgres" && r["target"] == "primary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_admin_console_metrics_reload_pause_and_drain() {
    let c = Cluster::up(bin(), 1).await;
    let (leader, term) = c.leader().await.expect("a leader");
    let p = OpsProxy::start(&c, "pool_size = 4\nshutdown_timeout = \"20s\"").await;

    // Traffic: queries, an error, a transaction.
    let client = connect(&p.dsn("postgres")).await.expect("connect through the proxy");
    client.simple_query("create table ops(id int primary key)").await.unwrap();
    for i in 0..5 {
        client.simple_query(&format!("insert into ops values ({i})")).await.unwrap();
    }
    assert!(client.simple_query("select 1/0").await.is_err());
    client.simple_query("begin; select count(*) from ops; commit").await.unwrap();

    // The console, with tokio-postgres.
    let admin = connect(&p.dsn("pgkeel")).await.expect("connect to the admin console");
    let pools = show(&admin, "SHOW POOLS").await;
    let row = primary_row(&pools).unwrap_or_else(|| panic!("a primary pool row: {pools:?}"));
    assert_eq!((row["mode"].as_str(), row["pool_size"].as_str()), ("transaction", "4"));
    assert_eq!(row["cl_waiting"], "0");
    assert!(row["sv_idle"].parse::<u32>().unwrap() >= 1, "{row:?}");
    let stats = show(&admin, "show stats;").await;
    let row = primary_row(&stats).expect("a stats row");
    assert!(row["total_query_count"].parse::<u64>().unwrap() >= 8, "{row:?}");
    assert!(row["total_errors"].parse::<u64>().unwrap() >= 1, "{row:?}");
    assert_eq!(row["route"], "primary");
    let servers = show(&admin, "SHOW SERVERS").await;
    assert!(
        servers.iter().any(|r| r["role"] == "primary" && r["term"] == term.to_string() && r["member"] == leader),
        "{servers:?}"
    );
    // A connection in a client's open transaction is active; given back, idle again.
    let state_of = |servers: &[std::collections::HashMap<String, String>], state: &str| {
        servers.iter().filter(|r| r["state"] == state).count()
    };
    assert_eq!(state_of(&servers, "active"), 0, "{servers:?}");
    client.simple_query("begin; select 1").await.unwrap();
    let servers = show(&admin, "SHOW SERVERS").await;
    assert_eq!(state_of(&servers, "active"), 1, "{servers:?}");
    // Linked both ways: the client holding it, and the connection the client holds.
    let active = servers.iter().find(|r| r["state"] == "active").unwrap();
    let holder =
        show(&admin, "SHOW CLIENTS").await.into_iter().find(|r| r["state"] == "active").expect("an active client");
    assert_eq!(
        (&active["client_pid"], &active["pid"]),
        (&holder["pid"], &holder["server_pid"]),
        "{active:?} {holder:?}"
    );
    assert!(servers.iter().filter(|r| r["state"] == "idle").all(|r| r["client_pid"].is_empty()), "{servers:?}");
    client.simple_query("commit").await.unwrap();
    let servers = show(&admin, "SHOW SERVERS").await;
    assert_eq!((state_of(&servers, "active"), state_of(&servers, "idle") >= 1), (0, true), "{servers:?}");
    let clients = show(&admin, "SHOW CLIENTS").await;
    assert!(clients.iter().any(|r| r["database"] == "postgres" && r["state"] == "idle"), "{clients:?}");
    assert_eq!(config_value(&admin, "pool_size").await, "4");
    let e = admin.simple_query("SHOW FROBS").await.unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("unknown admin console command") && msg.contains("SHOW POOLS"), "{msg}");
    // With psql too.
    let out = psql(&p.dsn("pgkeel"), "SHOW POOLS").expect("psql SHOW POOLS");
    assert!(out.lines().any(|l| l.starts_with("postgres|postgres|primary|transaction|")), "{out}");

    // A user who is not in admin_users gets a clear error.
    let Err(e) = connect(&p.dsn_as("app", "app-secret", "pgkeel")).await else {
        panic!("a user outside admin_users reached the console")
    };
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(msg.contains("may not use the admin console") && msg.contains("admin_users"), "{msg}");

    // /metrics: served, parseable, non-zero counters.
    let (status, body) = http_get(p.metrics_port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (_, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(v.parse::<f64>().is_ok(), "not a number: {line}");
    }
    let labels = "{database=\"postgres\",user=\"postgres\",target=\"primary\"";
    assert!(metric(&body, &format!("pgkeel_proxy_queries_total{labels},route=\"primary\"}}")).unwrap() >= 8.0);
    assert!(metric(&body, &format!("pgkeel_proxy_errors_total{labels}}}")).unwrap() >= 1.0);
    assert!(metric(&body, &format!("pgkeel_proxy_wait_seconds_count{labels}}}")).unwrap() >= 1.0);
    assert_eq!(metric(&body, "pgkeel_proxy_term ").unwrap(), term as f64);
    assert_eq!(http_get(p.metrics_port, "/").0, "HTTP/1.1 404 Not Found");

    // PAUSE waits for the transaction in flight, which then commits.
    let mut a = connect(&p.dsn("postgres")).await.unwrap();
    let tx = a.transaction().await.unwrap();
    tx.simple_query("insert into ops values (100)").await.unwrap();
    let pause_dsn = p.dsn("pgkeel");
    let pause = tokio::spawn(async move {
        let admin2 = connect(&pause_dsn).await.expect("second console");
        let started = Instant::now();
        admin2.simple_query("PAUSE").await.expect("PAUSE");
        started.elapsed()
    });
    wait_for("the console to show the proxy paused", Duration::from_secs(10), || async {
        let (_, body) = http_get(p.metrics_port, "/metrics");
        (metric(&body, "pgkeel_proxy_paused ") == Some(1.0)).then_some(())
    })
    .await;
    assert!(!pause.is_finished(), "PAUSE waits for the transaction in flight");
    tx.simple_query("insert into ops values (101)").await.expect("the transaction goes on while paused");
    tx.commit().await.expect("the transaction in flight commits while paused");
    let waited = tokio::time::timeout(Duration::from_secs(10), pause).await.expect("PAUSE returns").unwrap();
    eprintln!("PAUSE returned after {waited:?}");
    // A new transaction is held, then runs after RESUME, without an error.
    let b = connect(&p.dsn("postgres")).await.unwrap();
    let held = tokio::spawn(async move { b.simple_query("select count(*) from ops").await.map(|_| ()) });
    wait_for("the held client to show as waiting", Duration::from_secs(10), || async {
        show(&admin, "SHOW CLIENTS").await.iter().any(|r| r["state"] == "waiting").then_some(())
    })
    .await;
    assert!(!held.is_finished());
    admin.simple_query("RESUME").await.expect("RESUME");
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held query runs after RESUME")
        .unwrap()
        .expect("no error");

    // RELOAD: pool_size changes live; a connected client stays; a bad file changes nothing.
    p.config.write("pool_size = 6\nshutdown_timeout = \"20s\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(config_value(&admin, "pool_size").await, "6");
    assert_eq!(primary_row(&show(&admin, "SHOW POOLS").await).unwrap()["pool_size"], "6");
    assert_eq!(client.simple_query("select 1").await.unwrap().len(), 3, "the connected client survives");
    p.config.write("pool_size = 0");
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("pool_size = 0 is out of range") && msg.contains("kept"), "{msg}");
    assert_eq!(config_value(&admin, "pool_size").await, "6", "the old configuration stays");
    // SIGHUP does the same.
    p.config.write("pool_size = 8\nshutdown_timeout = \"20s\"");
    p.signal(libc::SIGHUP);
    wait_for("SIGHUP to apply pool_size = 8", Duration::from_secs(10), || async {
        (config_value(&admin, "pool_size").await == "8").then_some(())
    })
    .await;
    client.simple_query("select 1").await.expect("the client survives SIGHUP");

    // SIGTERM: an idle client is closed, the one mid-transaction commits, then exit 0.
    let mut d = connect(&p.dsn("postgres")).await.unwrap();
    let tx = d.transaction().await.unwrap();
    tx.simple_query("insert into ops values (200)").await.unwrap();
    let mut p = p;
    p.signal(libc::SIGTERM);
    wait_for("the idle client to be closed", Duration::from_secs(10), || async {
        client.simple_query("select 1").await.is_err().then_some(())
    })
    .await;
    wait_for("the proxy to stop accepting", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", p.port)).is_err().then_some(())
    })
    .await;
    assert!(p.child.try_wait().unwrap().is_none(), "the proxy waits for the transaction in flight");
    tx.simple_query("insert into ops values (201)").await.expect("the transaction goes on while draining");
    tx.commit().await.expect("the transaction in flight commits");
    let status = wait_for("the proxy to exit", Duration::from_secs(15), || {
        let s = p.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "the proxy exits 0 after the drain: {status:?}");
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    assert!(log.contains("every client finished"), "drained before exiting");
    assert_eq!(
        psql(&c.node_dsn(&leader), "select count(*) from ops where id in (100, 101, 200, 201)").unwrap(),
        "4",
        "the paused and the drained transactions committed"
    );
}

/// The message of a failed query or login.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| format!("{} {}", d.code().code(), d.message())).unwrap_or_else(|| e.to_string())
}

/// The first column of the first row of a simple query's answer.
fn first_value(rows: &[SimpleQueryMessage]) -> String {
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row in {rows:?}"))
}

/// A one-node cluster and its primary's DSN, after running `setup` there (one statement each).
async fn cluster_with(setup: &[&str]) -> (Cluster, String) {
    let c = Cluster::up(bin(), 1).await;
    let (leader, _) = c.leader().await.expect("a leader");
    let direct = c.node_dsn(&leader);
    for sql in setup {
        psql(&direct, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    (c, direct)
}

/// `n` clients of `dsn`, each inside a transaction that ran a query, so each holds a server
/// connection (until [`commit_all`]).
async fn in_transactions(dsn: &str, n: usize) -> Vec<tokio_postgres::Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let c = connect(dsn).await.unwrap();
        c.simple_query("begin").await.unwrap();
        c.simple_query("select 1").await.unwrap();
        clients.push(c);
    }
    clients
}

async fn commit_all(clients: &[tokio_postgres::Client]) {
    for c in clients {
        c.simple_query("commit").await.expect("commit");
    }
}

/// How many client backends `database` has, asked of postgres at `direct`.
fn backends_of(direct: &str, database: &str) -> String {
    let sql = format!(
        "select count(*) from pg_stat_activity where datname = '{database}' and backend_type = 'client backend'"
    );
    psql(direct, &sql).expect("count backends")
}

/// Whether the backend `pid` still runs, asked of postgres at `direct`.
fn backend_alive(direct: &str, pid: &str) -> bool {
    psql(direct, &format!("select count(*) from pg_stat_activity where pid = {pid}")).expect("pg_stat_activity") == "1"
}

/// The backend pids of `database`'s server connections in `SHOW SERVERS`.
async fn server_pids(admin: &tokio_postgres::Client, database: &str) -> Vec<String> {
    show(admin, "SHOW SERVERS")
        .await
        .into_iter()
        .filter(|r| r["database"] == database)
        .map(|r| r["pid"].clone())
        .collect()
}

/// Waits (10 s at most) until `SHOW DATABASES` has `column` = `value` in the row of `maint`.
async fn wait_for_maint(admin: &tokio_postgres::Client, what: &str, column: &str, value: &str) {
    wait_for(what, Duration::from_secs(10), || async {
        show(admin, "SHOW DATABASES")
            .await
            .into_iter()
            .find(|r| r["database"] == "maint" && r[column] == value)
            .map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_admin_commands_for_one_database() {
    let (c, direct) = cluster_with(&["create database maint"]).await;
    let backends = |db: &str| backends_of(&direct, db);
    let p = OpsProxy::start(&c, "pool_size = 2\nquery_wait_timeout = \"60s\"").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    let row_of =
        |rows: Vec<std::collections::HashMap<String, String>>, db: &str| rows.into_iter().find(|r| r["database"] == db);

    // Clients of maint: one idle, one in an open transaction and one running a long query
    // (both of the pool's slots), one waiting for a slot. A client of postgres, which nothing
    // here may touch.
    let idle = connect(&p.dsn("maint")).await.expect("connect to maint");
    idle.simple_query("select 1").await.unwrap();
    let t1 = connect(&p.dsn("maint")).await.unwrap();
    t1.simple_query("begin; create table killed_tx(i int)").await.unwrap();
    let t2 = connect(&p.dsn("maint")).await.unwrap();
    let t2 = std::sync::Arc::new(t2);
    let sleeper = t2.clone();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(120)").await.map(|_| ()) });
    wait_for("the long query to run", Duration::from_secs(10), || async {
        (psql(&direct, "select count(*) from pg_stat_activity where query = 'select pg_sleep(120)'").unwrap() == "1")
            .then_some(())
    })
    .await;
    let waiter = connect(&p.dsn("maint")).await.unwrap();
    let waiting = tokio::spawn(async move { waiter.simple_query("select 1").await.map(|_| ()) });
    let other = connect(&p.dsn("postgres")).await.unwrap();
    other.simple_query("select 1").await.unwrap();
    wait_for_maint(&admin, "the fourth maint client to wait for a slot", "cl_waiting", "1").await;
    let row = row_of(show(&admin, "SHOW DATABASES").await, "maint").expect("a maint row");
    assert_eq!((row["clients"].as_str(), row["sv_active"].as_str(), row["disabled"].as_str()), ("4", "2", "no"));

    // DISABLE: a new login is refused, saying how to undo it; the clients already in stay.
    admin.simple_query("DISABLE maint").await.expect("DISABLE");
    let e = connect(&p.dsn("maint")).await.expect_err("a login to a disabled database is refused");
    let msg = message(&e);
    assert!(msg.starts_with("55000") && msg.contains("ENABLE maint"), "{msg}");
    let row = row_of(show(&admin, "SHOW DATABASES").await, "maint").unwrap();
    assert_eq!((row["disabled"].as_str(), row["clients"].as_str()), ("yes", "4"), "the clients already in stay");

    // KILL: every client of maint ends at once, the waiting one with the reason; the server
    // connections close (postgres rolls the open transactions back); postgres's client stays.
    let started = Instant::now();
    admin.simple_query("KILL maint").await.expect("KILL");
    let r = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the waiting client ends").unwrap();
    let msg = message(&r.expect_err("the waiting client gets an error"));
    assert!(msg.starts_with("57P01") && msg.contains("KILL maint"), "{msg}");
    let r = tokio::time::timeout(Duration::from_secs(10), sleeping).await.expect("the long query ends").unwrap();
    let msg = message(&r.expect_err("the client of the long query gets an error"));
    assert!(msg.starts_with("57P01") && msg.contains("KILL maint"), "{msg}");
    for (name, client) in [("idle", &idle), ("in a transaction", &t1)] {
        wait_for(&format!("the {name} client of maint to be closed"), Duration::from_secs(10), || async {
            client.simple_query("select 1").await.is_err().then_some(())
        })
        .await;
    }
    // The long query was cancelled: its backend is gone too, long before the query's end.
    wait_for("maint's backends to end", Duration::from_secs(10), || async { (backends("maint") == "0").then_some(()) })
        .await;
    eprintln!("KILL: clients and backends gone after {:?}", started.elapsed());
    assert!(show(&admin, "SHOW CLIENTS").await.iter().all(|r| r["database"] != "maint"));
    assert!(server_pids(&admin, "maint").await.is_empty());
    other.simple_query("select 1").await.expect("a client of another database is untouched");
    assert!(connect(&p.dsn("maint")).await.is_err(), "still disabled after KILL");

    // ENABLE lets clients in again. KILL paused maint too (as PgBouncer's KILL): a new
    // client's transaction is held until RESUME maint, then runs without an error. The killed
    // transaction was rolled back.
    assert_eq!(row_of(show(&admin, "SHOW DATABASES").await, "maint").unwrap()["paused"], "yes");
    admin.simple_query("ENABLE maint").await.expect("ENABLE");
    let back = connect(&p.dsn("maint")).await.expect("connect after ENABLE");
    let back = std::sync::Arc::new(back);
    let asking = back.clone();
    let held = tokio::spawn(async move {
        asking.simple_query("select count(*) from pg_class where relname = 'killed_tx'").await.map(|r| first_value(&r))
    });
    wait_for_maint(&admin, "the new client's transaction to be held after KILL", "cl_waiting", "1").await;
    assert!(!held.is_finished(), "held until RESUME maint");
    other.simple_query("select 1").await.expect("another database's transactions are not held");
    admin.simple_query("RESUME maint").await.expect("RESUME maint after KILL");
    let killed_tx = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held transaction runs after RESUME maint")
        .unwrap()
        .expect("without an error");
    assert_eq!(killed_tx, "0", "the killed transaction was rolled back");
    let back = std::sync::Arc::into_inner(back).expect("the only handle left");

    // RECONNECT: idle server connections close now, one in a transaction after it; then
    // every transaction runs on a connection opened since.
    let mut tx_client = connect(&p.dsn("maint")).await.unwrap();
    let tx = tx_client.transaction().await.unwrap();
    let pid_of = |rows: Vec<SimpleQueryMessage>| first_value(&rows);
    let in_tx = pid_of(tx.simple_query("select pg_backend_pid()").await.unwrap());
    back.simple_query("select 1").await.unwrap();
    let before = server_pids(&admin, "maint").await;
    assert!(before.len() == 2 && before.contains(&in_tx), "{before:?}");
    let close_needed = |rows: Vec<std::collections::HashMap<String, String>>| -> Vec<(String, String)> {
        rows.into_iter()
            .filter(|r| r["database"] == "maint")
            .map(|r| (r["pid"].clone(), r["close_needed"].clone()))
            .collect()
    };
    assert_eq!(close_needed(show(&admin, "SHOW SERVERS").await).len(), 2);
    assert!(close_needed(show(&admin, "SHOW SERVERS").await).iter().all(|(_, c)| c == "0"));
    admin.simple_query("RECONNECT maint").await.expect("RECONNECT");
    assert_eq!(server_pids(&admin, "maint").await, vec![in_tx.clone()], "the idle one closed at once");
    assert_eq!(close_needed(show(&admin, "SHOW SERVERS").await), vec![(in_tx.clone(), "1".to_string())]);
    // WAIT_CLOSE maint waits for that connection, at most shutdown_timeout (reloaded to
    // 300ms here): an error then, saying what is still open. WAIT_CLOSE for another database
    // returns at once.
    admin.simple_query("WAIT_CLOSE postgres").await.expect("nothing of postgres's to wait for");
    p.config.write("pool_size = 2\nquery_wait_timeout = \"60s\"\nshutdown_timeout = \"300ms\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let started = Instant::now();
    let msg = message(&admin.simple_query("WAIT_CLOSE maint").await.expect_err("the connection stays open"));
    assert!(
        msg.starts_with("55006") && msg.contains("1 server connections of database \"maint\" marked to close"),
        "{msg}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited: {:?}", started.elapsed());
    p.config.write("pool_size = 2\nquery_wait_timeout = \"60s\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    // From a second console, it returns once the connection closed, after the commit.
    let wait_dsn = p.dsn("pgkeel");
    let waiting_close = tokio::spawn(async move {
        let console = connect(&wait_dsn).await.expect("a second console");
        console.simple_query("WAIT_CLOSE maint").await.map(|_| ())
    });
    assert_eq!(pid_of(tx.simple_query("select pg_backend_pid()").await.unwrap()), in_tx, "the transaction goes on");
    tx.commit().await.expect("the transaction commits");
    tokio::time::timeout(Duration::from_secs(10), waiting_close)
        .await
        .expect("WAIT_CLOSE maint returns after the commit")
        .unwrap()
        .expect("without an error");
    assert!(server_pids(&admin, "maint").await.is_empty(), "the marked connection is closed");
    wait_for("the connection of the transaction to close", Duration::from_secs(10), || async {
        (psql(&direct, &format!("select count(*) from pg_stat_activity where pid = {in_tx}")).unwrap() == "0")
            .then_some(())
    })
    .await;
    let now = pid_of(back.simple_query("select pg_backend_pid()").await.unwrap());
    assert!(!before.contains(&now), "a new connection after RECONNECT: {now} in {before:?}");
    other.simple_query("select 1").await.expect("RECONNECT maint leaves postgres's pool alone");

    // PAUSE maint: waits for maint's transaction in flight and holds maint's new ones, no one
    // else's; RESUME maint lets them run, without an error.
    let tx = tx_client.transaction().await.unwrap();
    tx.simple_query("select 1").await.unwrap();
    let pause_dsn = p.dsn("pgkeel");
    let pausing = tokio::spawn(async move {
        let console = connect(&pause_dsn).await.expect("a second console");
        console.simple_query("PAUSE maint").await.map(|_| ())
    });
    wait_for_maint(&admin, "maint to show as paused", "paused", "yes").await;
    assert!(!pausing.is_finished(), "PAUSE maint waits for maint's transaction in flight");
    other.simple_query("select 1").await.expect("another database's transactions are not held");
    tx.simple_query("select 2").await.expect("the transaction in flight goes on");
    tx.commit().await.expect("and commits");
    tokio::time::timeout(Duration::from_secs(10), pausing).await.expect("PAUSE maint returns").unwrap().unwrap();
    let held = tokio::spawn(async move { back.simple_query("select 1").await.map(|_| ()) });
    wait_for_maint(&admin, "maint's new transaction to be held", "cl_waiting", "1").await;
    other.simple_query("select 1").await.expect("still not held");
    admin.simple_query("RESUME maint").await.expect("RESUME maint");
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held transaction runs after RESUME maint")
        .unwrap()
        .expect("without an error");
    assert_eq!(row_of(show(&admin, "SHOW DATABASES").await, "maint").unwrap()["paused"], "no");

    // SHOW TOTALS and SHOW VERSION; bad commands get the usage.
    let totals: std::collections::HashMap<String, String> =
        show(&admin, "SHOW TOTALS").await.into_iter().map(|r| (r["name"].clone(), r["value"].clone())).collect();
    assert!(totals["total_xact_count"].parse::<u64>().unwrap() >= 6, "{totals:?}");
    assert!(totals["clients"].parse::<u64>().unwrap() >= 2, "{totals:?}");
    let version = show(&admin, "SHOW VERSION").await;
    assert!(version[0]["version"].starts_with("pgkeel proxy "), "{version:?}");
    for (bad, says) in [("KILL", "KILL takes one database name"), ("DISABLE pgkeel", "admin console's own database")] {
        let msg = message(&admin.simple_query(bad).await.unwrap_err());
        assert!(msg.contains(says), "{bad}: {msg}");
    }

    // SHUTDOWN: the drain of SIGTERM; the idle clients are closed and the proxy exits 0.
    admin.simple_query("SHUTDOWN").await.expect("SHUTDOWN");
    let mut p = p;
    let status = wait_for("the proxy to exit after SHUTDOWN", Duration::from_secs(15), || {
        let s = p.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "the proxy exits 0 after SHUTDOWN: {status:?}");
    let log = p.log_text();
    assert!(log.contains("SHUTDOWN on the admin console") && log.contains("every client finished"), "{log}");
    assert!(other.simple_query("select 1").await.is_err(), "its clients are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_closes_unused_and_old_server_connections() {
    let (c, direct) = cluster_with(&[]).await;
    let alive = |pid: &str| backend_alive(&direct, pid);
    let p = OpsProxy::start(&c, "pool_size = 4\nserver_idle_timeout = \"1s\"\nserver_lifetime = 0").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "server_idle_timeout").await, "1s");
    assert_eq!(config_value(&admin, "server_lifetime").await, "0");

    // server_idle_timeout: three connections used at once, then none. A client inside a
    // transaction keeps its connection however long it takes.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&p.dsn("postgres")).await.unwrap());
    }
    let mut long = connect(&p.dsn("postgres")).await.unwrap();
    let tx = long.transaction().await.unwrap();
    let long_pid = first_value(&tx.simple_query("select pg_backend_pid()").await.unwrap());
    let mut open = Vec::new();
    for client in clients.iter_mut() {
        let t = client.transaction().await.unwrap();
        t.simple_query("select 1").await.unwrap();
        open.push(t);
    }
    assert_eq!(server_pids(&admin, "postgres").await.len(), 4, "four connections in use at once");
    for t in open {
        t.commit().await.unwrap();
    }
    let started = Instant::now();
    wait_for("the unused connections to close", Duration::from_secs(10), || async {
        (server_pids(&admin, "postgres").await == vec![long_pid.clone()]).then_some(())
    })
    .await;
    eprintln!("unused connections closed after {:?}", started.elapsed());
    // The sweep that closed them left the connection of the transaction, idle in it all along.
    assert_eq!(first_value(&tx.simple_query("select pg_backend_pid()").await.unwrap()), long_pid);
    tx.commit().await.expect("the long transaction commits");
    wait_for("its connection to close once unused", Duration::from_secs(10), || async {
        (!alive(&long_pid)).then_some(())
    })
    .await;

    // server_lifetime (RELOAD): a busy client's connection is replaced when it is given back
    // after its lifetime, without an error; one inside a transaction is not cut.
    p.config.write("pool_size = 4\nserver_idle_timeout = 0\nserver_lifetime = \"2s\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(config_value(&admin, "server_lifetime").await, "2s");
    let busy = &clients[0];
    let first = first_value(&busy.simple_query("select pg_backend_pid()").await.unwrap());
    let started = Instant::now();
    wait_for("the busy client's connection to be replaced", Duration::from_secs(15), || async {
        let now = first_value(&busy.simple_query("select pg_backend_pid()").await.expect("no error"));
        (now != first).then_some(now)
    })
    .await;
    eprintln!("replaced after {:?}", started.elapsed());
    assert!(!alive(&first), "the old connection was closed");
    let mut in_tx = connect(&p.dsn("postgres")).await.unwrap();
    let tx = in_tx.transaction().await.unwrap();
    let pid = first_value(&tx.simple_query("select pg_backend_pid()").await.unwrap());
    tx.simple_query("select pg_sleep(3)").await.unwrap();
    assert_eq!(first_value(&tx.simple_query("select pg_backend_pid()").await.unwrap()), pid);
    tx.commit().await.expect("a transaction longer than the lifetime commits");
    wait_for("the connection past its lifetime to close after the commit", Duration::from_secs(10), || async {
        (!alive(&pid)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_through_the_proxy_frees_the_connection() {
    // PgBouncer's idle_transaction_timeout, done by postgres: a client idle inside a
    // transaction holds a pool slot until postgres ends its backend; then the slot is free.
    let (c, _) =
        cluster_with(&["create database itx", "alter database itx set idle_in_transaction_session_timeout = '1s'"])
            .await;
    let p = OpsProxy::start(&c, "pool_size = 1").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    // Its connection task is kept: what postgres says when it ends the backend arrives there.
    let (mut idle, idle_conn) = tokio_postgres::connect(&p.dsn("itx"), tokio_postgres::NoTls).await.unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    let tx = idle.transaction().await.unwrap();
    tx.simple_query("select 1").await.unwrap();
    // The only connection is held: the next client waits for it, until postgres ends the
    // idle transaction's backend.
    let other = connect(&p.dsn("itx")).await.unwrap();
    let started = Instant::now();
    let rows = tokio::time::timeout(Duration::from_secs(20), other.simple_query("select 2"))
        .await
        .expect("the waiting client gets the connection once postgres ended the idle transaction")
        .expect("without an error");
    assert_eq!(first_value(&rows), "2");
    eprintln!("the waiting client ran after {:?}", started.elapsed());
    // postgres's own FATAL reached the client, which the proxy then closed.
    let ended = tokio::time::timeout(Duration::from_secs(10), idle_conn).await.expect("the connection ends").unwrap();
    let msg = message(&ended.expect_err("with postgres's error"));
    assert!(msg.starts_with("25P03") && msg.contains("idle-in-transaction timeout"), "{msg}");
    assert!(tx.simple_query("select 3").await.is_err());
    assert!(show(&admin, "SHOW SERVERS").await.iter().all(|r| r["state"] != "active"));
}

/// A proxy with `pool_size = 4` (no `server_idle_timeout`), its console, and four clients
/// whose transactions left four idle pooled connections to `database`, with their backend pids.
async fn four_pooled(
    c: &Cluster,
    database: &str,
) -> (OpsProxy, tokio_postgres::Client, Vec<tokio_postgres::Client>, Vec<String>) {
    let p = OpsProxy::start(c, "pool_size = 4\nserver_idle_timeout = 0").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    let clients = in_transactions(&p.dsn(database), 4).await;
    commit_all(&clients).await;
    let pids = server_pids(&admin, database).await;
    assert_eq!(pids.len(), 4, "four pooled connections");
    (p, admin, clients, pids)
}

/// A pooled connection its server closed (as a postmaster that dies, shuts down or restarts
/// closes them all, a few milliseconds apart) makes the pool close its other connections
/// too, rather than give them to the next clients one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_its_server_closed_closes_the_pools_others() {
    let (c, direct) = cluster_with(&[]).await;
    let (p, admin, clients, pids) = four_pooled(&c, "postgres").await;
    // The pool gives out the connection given back last: the one this query used.
    let top = first_value(&clients[0].simple_query("select pg_backend_pid()").await.unwrap());
    psql(&direct, &format!("select pg_terminate_backend({top})")).unwrap();
    wait_for("the terminated backend to end", Duration::from_secs(10), || async {
        (!backend_alive(&direct, &top)).then_some(())
    })
    .await;
    // The next transaction finds it closed: it runs on a new connection, without an error,
    // and the other three are closed as well.
    let pid = first_value(&clients[1].simple_query("select pg_backend_pid()").await.expect("no error"));
    assert!(!pids.contains(&pid), "a new connection ({pid}), not one of {pids:?}");
    wait_for("the pool's other connections to close", Duration::from_secs(10), || async {
        pids.iter().all(|old| !backend_alive(&direct, old)).then_some(())
    })
    .await;
    assert_eq!(server_pids(&admin, "postgres").await, vec![pid.clone()]);
    assert!(p.log_text().contains("an idle server connection has something to read"), "the proxy says why");
    // Every client carries on.
    for client in &clients {
        client.simple_query("select 1").await.expect("the clients carry on");
    }
}

/// A backend that postgres's `idle_session_timeout` ended (57P05) ended alone: the pool
/// closes each such connection by itself, without taking it for a server closing them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_ended_by_idle_session_timeout_are_closed_alone() {
    let (c, direct) =
        cluster_with(&["create database ist", "alter database ist set idle_session_timeout = '1s'"]).await;
    let (p, _admin, clients, pids) = four_pooled(&c, "ist").await;
    // Over TLS (`pgkeel up` turns it on, the proxy prefers it): what the backends send when
    // they time out can only be read by taking it.
    let ssl = psql(&direct, &format!("select bool_and(ssl) from pg_stat_ssl where pid in ({})", pids.join(",")));
    assert_eq!(ssl.as_deref(), Ok("t"));
    wait_for("the idle backends to time out", Duration::from_secs(20), || async {
        pids.iter().all(|pid| !backend_alive(&direct, pid)).then_some(())
    })
    .await;
    let pid = first_value(&clients[0].simple_query("select pg_backend_pid()").await.expect("no error"));
    assert!(!pids.contains(&pid), "a new connection ({pid}), not one of {pids:?}");
    let log = p.log_text();
    assert_eq!(log.matches("its server ended by idle_session_timeout").count(), 4, "{log}");
    assert!(!log.contains("an idle server connection has something to read"), "no flush of the pool: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_closes_clients_idle_longer_than_client_idle_timeout() {
    let c = Cluster::up(bin(), 1).await;
    let p = OpsProxy::start(&c, "client_idle_timeout = \"1s\"").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "client_idle_timeout").await, "1s");
    // Its connection task is kept: the proxy's FATAL arrives there.
    let (idle, idle_conn) = tokio_postgres::connect(&p.dsn("postgres"), tokio_postgres::NoTls).await.unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    idle.simple_query("select 1").await.unwrap();
    let busy = connect(&p.dsn("postgres")).await.unwrap();
    let mut in_tx = connect(&p.dsn("postgres")).await.unwrap();
    let tx = in_tx.transaction().await.unwrap();
    tx.simple_query("select 1").await.unwrap();
    // The busy client queries on every look; the idle one is closed; the one inside a
    // transaction (it holds a server connection) is not.
    let started = Instant::now();
    wait_for("the idle client to be closed", Duration::from_secs(15), || async {
        busy.simple_query("select 1").await.expect("a client that keeps querying stays");
        idle_conn.is_finished().then_some(())
    })
    .await;
    eprintln!("idle client closed after {:?}", started.elapsed());
    let msg = message(&idle_conn.await.unwrap().expect_err("with the proxy's error"));
    assert!(msg.starts_with("57P05") && msg.contains("client_idle_timeout (1s)"), "{msg}");
    tx.simple_query("select 2").await.expect("a client inside a transaction is not idle");
    tx.commit().await.expect("and commits");
    busy.simple_query("select 1").await.expect("the busy client is still connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_caps_server_connections_per_database_and_user() {
    let (c, direct) = cluster_with(&["create database capped", "create role app login password 'app-secret'"]).await;
    let backends = || backends_of(&direct, "capped");
    let alive = |pid: &str| backend_alive(&direct, pid);
    let p = OpsProxy::start(&c, "pool_size = 5\nmax_db_connections = 2\nquery_wait_timeout = \"2s\"").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "max_db_connections").await, "2");
    let (app_dsn, pg_dsn) = (p.dsn_as("app", "app-secret", "capped"), p.dsn("capped"));
    let app = || connect(&app_dsn);
    let pg = || connect(&pg_dsn);

    // Two users' pools of one database fill its cap between them.
    let mut a1 = pg().await.unwrap();
    let a1_tx = a1.transaction().await.unwrap();
    let a1_pid = first_value(&a1_tx.simple_query("select pg_backend_pid()").await.unwrap());
    let mut b1 = app().await.unwrap();
    let b1_tx = b1.transaction().await.unwrap();
    b1_tx.simple_query("select 1").await.unwrap();
    let db_row = |rows: Vec<std::collections::HashMap<String, String>>| {
        rows.into_iter().find(|r| r["database"] == "capped").expect("a row of capped")
    };
    let row = db_row(show(&admin, "SHOW DATABASES").await);
    assert_eq!((row["current_connections"].as_str(), row["max_connections"].as_str()), ("2", "2"));

    // Both in use: the app pool has free slots but the database has no room. The wait ends at
    // query_wait_timeout with an error naming the cap.
    let b2 = app().await.unwrap();
    let e = b2.simple_query("select 2").await.expect_err("no room under the cap");
    let msg = message(&e);
    assert!(
        msg.starts_with("53300")
            && msg.contains("max_db_connections (2) of database \"capped\" on the primary")
            && msg.contains("query_wait_timeout (2s)"),
        "{msg}"
    );
    assert_eq!(backends(), "2");

    // A waiting client gets the room of a connection another user's pool gives back: that
    // pool closes it instead of keeping it idle.
    let b3 = app().await.unwrap();
    let waiting = tokio::spawn(async move {
        let pid = first_value(&b3.simple_query("select pg_backend_pid()").await.expect("no error"));
        (b3, pid)
    });
    wait_for("the client to wait for room", Duration::from_secs(10), || async {
        (db_row(show(&admin, "SHOW DATABASES").await)["cl_waiting"] == "1").then_some(())
    })
    .await;
    a1_tx.commit().await.unwrap();
    let (b3, b3_pid) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client runs once a connection came back")
        .unwrap();
    assert!(!alive(&a1_pid), "the connection given back was closed");
    assert_eq!(backends(), "2");

    // An idle connection of another pool is closed to make room at once (without it the
    // query would wait out query_wait_timeout and fail).
    let a2 = pg().await.unwrap();
    a2.simple_query("select 4").await.expect("room made by closing the app pool's idle connection");
    assert!(!alive(&b3_pid), "the idle connection was closed for it");
    assert_eq!(backends(), "2");
    let row = db_row(show(&admin, "SHOW DATABASES").await);
    assert_eq!(row["current_connections"], "2");

    // max_user_connections, set by RELOAD: one connection for app over every database. b1
    // holds it (in capped); app's first login to another database needs a connection (for
    // the server's parameters), waits for room, then fails.
    p.config.write("pool_size = 5\nmax_user_connections = 1\nquery_wait_timeout = \"2s\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(config_value(&admin, "max_user_connections").await, "1");
    let Err(e) = connect(&p.dsn_as("app", "app-secret", "postgres")).await else {
        panic!("app logged in to a second database past max_user_connections")
    };
    let msg = message(&e);
    assert!(msg.starts_with("53300") && msg.contains("max_user_connections (1) of user \"app\""), "{msg}");
    // Lifted by another RELOAD while a client of app waits: it runs at once.
    let waiting = tokio::spawn(async move { b3.simple_query("select 6").await.map(|r| first_value(&r)) });
    wait_for("app's client to wait for room", Duration::from_secs(10), || async {
        (db_row(show(&admin, "SHOW DATABASES").await)["cl_waiting"] == "1").then_some(())
    })
    .await;
    p.config.write("pool_size = 5\nquery_wait_timeout = \"2s\"");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let v = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("it runs after the reload").unwrap();
    assert_eq!(v.expect("without an error"), "6");
    b1_tx.commit().await.expect("the transaction held all along commits");
    drop((b2, a2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_finds_the_replicas_cap_reached_runs_on_the_primary() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(30)).await;
    let port_of = |node: &str| psql(&c.node_dsn(node), "show port").expect("show port");
    let (primary_port, replica_port) = (port_of(&leader), port_of(&replica));
    let p = OpsProxy::start(&c, "max_db_connections = 1\nquery_wait_timeout = \"3s\"").await;
    async fn port(client: &tokio_postgres::Client) -> String {
        first_value(&client.simple_query("select inet_server_port()").await.expect("a read"))
    }
    // A read-only transaction holds the replica's one connection.
    let a = connect(&p.dsn("postgres")).await.unwrap();
    wait_for("reads to reach the replica", Duration::from_secs(30), || async {
        (port(&a).await == replica_port).then_some(())
    })
    .await;
    a.simple_query("begin read only").await.unwrap();
    assert_eq!(port(&a).await, replica_port, "the read-only transaction runs on the replica");
    // Another client's read does not wait for it: it runs on the primary at once (waiting
    // would end in 53300 after query_wait_timeout).
    let b = connect(&p.dsn("postgres")).await.unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(port(&b).await, primary_port, "the replica's cap is reached: the primary");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "no wait for the replica");
    a.simple_query("commit").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_opens_reserve_connections_for_clients_that_waited_too_long() {
    let (c, direct) = cluster_with(&["create database burst"]).await;
    let backends = || backends_of(&direct, "burst");
    let p = OpsProxy::start(
        &c,
        "pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = \"500ms\"\nquery_wait_timeout = \"3s\"",
    )
    .await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "reserve_pool_timeout").await, "500ms");
    let dsn = p.dsn("burst");
    // A holds the pool's one connection in a transaction.
    let mut a = connect(&dsn).await.unwrap();
    let a_tx = a.transaction().await.unwrap();
    a_tx.simple_query("select 1").await.unwrap();
    // B waits, and after reserve_pool_timeout runs on a reserve connection while A's
    // transaction is still open.
    let b = connect(&dsn).await.unwrap();
    let started = Instant::now();
    let b_pid = first_value(&b.simple_query("select pg_backend_pid()").await.expect("a reserve connection"));
    let waited = started.elapsed();
    eprintln!("B ran after {waited:?}");
    assert!(waited >= Duration::from_millis(500), "B ran before reserve_pool_timeout ({waited:?})");
    // Given back with nobody waiting that long, the reserve connection closes: the pool is back
    // to pool_size.
    wait_for("the reserve connection to close", Duration::from_secs(10), || async {
        (backends() == "1").then_some(())
    })
    .await;
    assert!(server_pids(&admin, "burst").await.iter().all(|pid| *pid != b_pid));
    // The reserve is free again: C gets it the same way, and holds it in a transaction.
    let mut c2 = connect(&dsn).await.unwrap();
    let c_tx = c2.transaction().await.unwrap();
    c_tx.simple_query("select 3").await.expect("the reserve again");
    assert_eq!(backends(), "2");
    // pool_size and reserve_pool_size in use: D waits out query_wait_timeout.
    let d = connect(&dsn).await.unwrap();
    let msg = message(&d.simple_query("select 4").await.expect_err("nothing left"));
    assert!(
        msg.starts_with("53300")
            && msg.contains("query_wait_timeout (3s): all 1 of pool_size and reserve_pool_size (1)"),
        "{msg}"
    );
    a_tx.commit().await.unwrap();
    c_tx.commit().await.unwrap();
    assert_eq!(first_value(&b.simple_query("select 5").await.unwrap()), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_min_pool_size_connections_open() {
    let (c, _) = cluster_with(&["create database warm", "create database other"]).await;
    let p = OpsProxy::start(&c, "pool_size = 4\nmin_pool_size = 2\nserver_idle_timeout = \"1s\"").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "min_pool_size").await, "2");
    let pids = |db: &'static str| {
        let admin = &admin;
        async move {
            let mut v = server_pids(admin, db).await;
            v.sort();
            v
        }
    };
    // A client's first query leaves one connection; the pool opens the second itself.
    let client = connect(&p.dsn("warm")).await.unwrap();
    client.simple_query("select 1").await.unwrap();
    wait_for("the pool to open min_pool_size connections", Duration::from_secs(10), || async {
        (pids("warm").await.len() == 2).then_some(())
    })
    .await;

    // Four used at once; server_idle_timeout closes the unused ones down to min_pool_size,
    // not below.
    let clients = in_transactions(&p.dsn("warm"), 4).await;
    assert_eq!(pids("warm").await.len(), 4);
    commit_all(&clients).await;
    wait_for("the unused connections beyond min_pool_size to close", Duration::from_secs(15), || async {
        (pids("warm").await.len() == 2).then_some(())
    })
    .await;
    let kept = pids("warm").await;
    // More sweeps pass (another pool's three unused connections come down to two, which
    // takes one to two of them), and the two are still the same backends: kept, not closed
    // and opened again.
    commit_all(&in_transactions(&p.dsn("other"), 3).await).await;
    wait_for("the other pool's sweep", Duration::from_secs(15), || async {
        (pids("other").await.len() == 2).then_some(())
    })
    .await;
    assert_eq!(pids("warm").await, kept, "min_pool_size connections were closed by server_idle_timeout");
    // Closed by RECONNECT (as by a failover), they are opened again.
    admin.simple_query("RECONNECT warm").await.expect("RECONNECT");
    wait_for("min_pool_size connections to be opened again", Duration::from_secs(10), || async {
        let now = pids("warm").await;
        (now.len() == 2 && now.iter().all(|p| !kept.contains(p))).then_some(())
    })
    .await;
    client.simple_query("select 2").await.expect("the client runs on them");
}

/// `min_pool_size` also keeps a replica's pool warm, once a read went there, with the login
/// of the primary pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_pool_keeps_min_pool_size_connections_open() {
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(30)).await;
    psql(&c.node_dsn(&leader), "create database warm").expect("create database warm");
    let replica_dsn = c.node_dsn(&replica);
    wait_for("the replica to replay the new database", Duration::from_secs(30), || async {
        (psql(&replica_dsn, "select count(*) from pg_database where datname = 'warm'").ok()? == "1").then_some(())
    })
    .await;
    let replica_port = psql(&replica_dsn, "show port").expect("show port");
    let p = OpsProxy::start(&c, "pool_size = 4\nmin_pool_size = 2").await;
    let client = connect(&p.dsn("warm")).await.unwrap();
    wait_for("a read to reach the replica", Duration::from_secs(30), || async {
        let rows = client.simple_query("select inet_server_port()").await.ok()?;
        (first_value(&rows) == replica_port).then_some(())
    })
    .await;
    // One connection served the reads; the pool opens the second itself.
    wait_for("the replica's pool to open min_pool_size connections", Duration::from_secs(10), || async {
        (backends_of(&replica_dsn, "warm") == "2").then_some(())
    })
    .await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    let pools = show(&admin, "SHOW POOLS").await;
    let row = pools
        .iter()
        .find(|r| r["database"] == "warm" && r["target"] == format!("replica:{replica}"))
        .unwrap_or_else(|| panic!("the replica's pool in SHOW POOLS: {pools:?}"));
    assert_eq!(row["sv_idle"], "2", "{row:?}");
    let primary_dsn = c.node_dsn(&leader);
    wait_for("the primary's pool to be kept at min_pool_size too", Duration::from_secs(10), || async {
        (backends_of(&primary_dsn, "warm") == "2").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sizes_pools_per_database_and_per_user() {
    let (c, _) = cluster_with(&["create database small", "create role app login password 'app-secret'"]).await;
    let p = OpsProxy::start(
        &c,
        "pool_size = 5\nquery_wait_timeout = \"1s\"\n[databases.small]\npool_size = 1\n[databases.tiny]\n\
         dbname = \"small\"\n[users.app]\npool_size = 2",
    )
    .await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "databases").await, "small: pool_size=1; tiny: dbname=small");
    // An alias: clients say tiny, the server's database is small, in a pool of its own.
    let aliased = connect(&p.dsn("tiny")).await.unwrap();
    assert_eq!(first_value(&aliased.simple_query("select current_database()").await.unwrap()), "small");
    assert_eq!(config_value(&admin, "users").await, "app: pool_size=2");
    for (user, password, db) in [("postgres", p.password.as_str(), "small"), ("app", "app-secret", "small")] {
        connect(&p.dsn_as(user, password, db)).await.unwrap().simple_query("select 1").await.unwrap();
    }
    connect(&p.dsn("postgres")).await.unwrap().simple_query("select 1").await.unwrap();
    let size_of = |rows: &[std::collections::HashMap<String, String>], db: &str, user: &str| {
        rows.iter().find(|r| r["database"] == db && r["user"] == user).map(|r| r["pool_size"].clone())
    };
    let rows = show(&admin, "SHOW POOLS").await;
    assert_eq!(size_of(&rows, "small", "postgres").as_deref(), Some("1"), "the database's pool_size");
    assert_eq!(size_of(&rows, "small", "app").as_deref(), Some("2"), "the user's, over the database's");
    assert_eq!(size_of(&rows, "postgres", "postgres").as_deref(), Some("5"), "the top-level one");
    assert_eq!(size_of(&rows, "tiny", "postgres").as_deref(), Some("5"), "the alias's pool, sized on its own");
    // small's one connection held: the next client of small waits and fails with its size.
    let mut holder = connect(&p.dsn("small")).await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.simple_query("select 1").await.unwrap();
    let waiter = connect(&p.dsn("small")).await.unwrap();
    let msg = message(&waiter.simple_query("select 2").await.expect_err("small is full"));
    assert!(msg.starts_with("53300") && msg.contains("all 1 of pool_size are in use"), "{msg}");
    // RELOAD without the section: small's pool grows to the top-level size at once, live.
    p.config.write(
        "pool_size = 5\nquery_wait_timeout = \"1s\"\n[databases.tiny]\ndbname = \"small\"\n[users.app]\npool_size = 2",
    );
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(config_value(&admin, "databases").await, "tiny: dbname=small");
    assert_eq!(size_of(&show(&admin, "SHOW POOLS").await, "small", "postgres").as_deref(), Some("5"));
    let other = connect(&p.dsn("small")).await.unwrap();
    assert_eq!(first_value(&other.simple_query("select 3").await.expect("room now")), "3");
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pools_one_database_in_session_mode() {
    let (c, _) = cluster_with(&["create database legacy"]).await;
    let p = OpsProxy::start(&c, "pool_size = 5\n[databases.legacy]\npool_mode = \"session\"").await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    let (a, b) = (connect(&p.dsn("legacy")).await.unwrap(), connect(&p.dsn("legacy")).await.unwrap());
    let t = connect(&p.dsn("postgres")).await.unwrap();
    // Session state lives between a legacy client's statements: its own backend throughout.
    a.simple_query("create temp table mine (v int)").await.unwrap();
    let pid = first_value(&a.simple_query("select pg_backend_pid()").await.unwrap());
    for i in 0..3 {
        b.simple_query("select 1").await.unwrap();
        t.simple_query("select 1").await.unwrap();
        a.simple_query(&format!("insert into mine values ({i})")).await.expect("the temp table is still there");
        assert_eq!(first_value(&a.simple_query("select pg_backend_pid()").await.unwrap()), pid);
    }
    // Between statements, each legacy client holds its connection; the postgres database's
    // transaction-mode client holds none.
    let pools = show(&admin, "SHOW POOLS").await;
    let legacy = pools.iter().find(|r| r["database"] == "legacy").expect("legacy's pool");
    let other = primary_row(&pools).expect("postgres's pool");
    assert_eq!((legacy["mode"].as_str(), legacy["sv_active"].as_str()), ("session", "2"));
    assert_eq!((other["mode"].as_str(), other["sv_active"].as_str()), ("transaction", "0"));
    assert_eq!(config_value(&admin, "databases").await, "legacy: pool_mode=session");
    drop(a);
    wait_for("the departed session's connection to go back", Duration::from_secs(10), || async {
        let pools = show(&admin, "SHOW POOLS").await;
        (pools.iter().find(|r| r["database"] == "legacy")?["sv_active"] == "1").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_that_reaches_another_proxy_is_passed_on() {
    // Behind one load balancer, the new connection of a cancel request may reach any proxy.
    let c = Cluster::up(bin(), 1).await;
    cancel_through_another_proxy(&c, "", "").await;
    // Proxies with `pgkeel up`'s certificates pass it on over TLS checked against the
    // cluster's CA (server_tls = "verify-full" fails on a peer that answers without TLS).
    let tls = c.dir().join("tls");
    let with_tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_tls = \"allow\"\nserver_tls = \"verify-full\"\nserver_ca = {:?}\n",
        tls.join("proxy.crt").display().to_string(),
        tls.join("proxy.key").display().to_string(),
        tls.join("ca.crt").display().to_string()
    );
    cancel_through_another_proxy(&c, &with_tls, "-tls").await;
}

/// A client of one proxy runs `pg_sleep(60)`; its cancel key, sent to a second proxy (both
/// with `extra` in their proxy.toml), stops the query; a key no proxy has stops nothing.
async fn cancel_through_another_proxy(c: &Cluster, extra: &str, suffix: &str) {
    let a = Proxy::start(c, &format!("proxy-a{suffix}"), extra).await;
    let b = Proxy::start(c, &format!("proxy-b{suffix}"), extra).await;
    let admin_b = connect(&b.url("postgres", &b.password, "pgkeel", "")).await;
    // Not an admin user on this proxy: the console refuses; the proxy itself is up.
    assert!(admin_b.is_err());
    let sleeper = connect(&a.url("postgres", &a.password, "postgres", "")).await.unwrap();
    let token = sleeper.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    // Sent to b until b knows a (each proxy reads the others' DCS records every ttl / 4).
    wait_for("the cancel sent to the other proxy to stop the query", Duration::from_secs(30), || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", b.port)).await.expect("connect to b");
        token.cancel_query_raw(tcp, tokio_postgres::NoTls).await.expect("b takes the cancel request");
        running.is_finished().then_some(())
    })
    .await;
    let e = running.await.unwrap().expect_err("cancelled");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    eprintln!("cancelled through the other proxy after {:?}", started.elapsed());
    let tls = if extra.is_empty() { "tls=false" } else { "tls=true" };
    let log = a.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("forwarding a cancel request") && l.contains("passed_on=true") && l.contains(tls)),
        "the first proxy got the request from the second, {tls}:\n{log}"
    );
    // A key no proxy has cancels nothing: b passes it on, a finds no client with it, and a's
    // query runs to its end.
    let other = connect(&a.url("postgres", &a.password, "postgres", "")).await.unwrap();
    let running = tokio::spawn(async move { other.simple_query("select pg_sleep(1), 'kept'").await.map(|_| ()) });
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", b.port)).await.expect("connect to b");
    let mut out = pgkeel_proxy::bytes::BytesMut::new();
    let stranger = pgkeel_proxy::protocol::CancelRequest {
        pid: 1_000_000,
        secret_key: pgkeel_proxy::bytes::Bytes::from_static(b"nope"),
    };
    pgkeel_proxy::protocol::StartupPacket::CancelRequest(stranger).encode(&mut out);
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &out).await.expect("send");
    running.await.unwrap().expect("another client's cancel does not stop this query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_proxy_that_started_after_the_one_it_was_sent_to() {
    // Each proxy rereads the others' DCS records every ttl / 4: 15 s here. A proxy started
    // since then must still get a cancel request for its client at once.
    let (c, direct) = cluster_with(&[]).await;
    let out = c.ctl(&["config", "set", "ttl=60s"]);
    assert!(out.status.success(), "config set ttl: {}", String::from_utf8_lossy(&out.stderr));
    let registered = |p: &Proxy| p.log_text().contains("registered in the DCS for switchovers").then_some(());
    let b = Proxy::start(&c, "proxy-b-first", "").await;
    wait_for("the first proxy to register", Duration::from_secs(20), || async { registered(&b) }).await;
    assert!(b.log_text().contains("ttl=60s"), "the first proxy's rounds are 15 s apart:\n{}", b.log_text());
    let a = Proxy::start(&c, "proxy-a-later", "").await;
    wait_for("the later proxy to register", Duration::from_secs(20), || async { registered(&a) }).await;

    let sleeper = connect(&a.url("postgres", &a.password, "postgres", "")).await.unwrap();
    let token = sleeper.cancel_token();
    let running = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    wait_for("the query to run", Duration::from_secs(10), || async {
        let n = psql(&direct, "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'").ok()?;
        (n == "1").then_some(())
    })
    .await;
    // Once, to the proxy that started first.
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", b.port)).await.expect("connect to the first proxy");
    token.cancel_query_raw(tcp, tokio_postgres::NoTls).await.expect("it takes the cancel request");
    let e = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the query is cancelled well before the first proxy's next round")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    eprintln!("cancelled through the proxy started first after {:?}", started.elapsed());
    assert!(
        a.log_text().lines().any(|l| l.contains("forwarding a cancel request") && l.contains("passed_on=true")),
        "the later proxy got it from the first:\n{}",
        a.log_text()
    );
}

/// A process killed (and reaped) on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_ends_the_session_of_a_client_host_that_vanished() {
    // The client runs on a host of its own (a network namespace), whose link is then taken
    // down: no FIN, no RST, its packets just stop, as when a machine loses power.
    let net = pgkeel_testkit::netns::Net::new(1).expect("a network namespace (needs root)");
    let (c, direct) = cluster_with(&["create table vanished(id int primary key)"]).await;
    let outside = free_port();
    let p = OpsProxy::start(
        &c,
        &format!(
            "listen_primary = \"{}:{outside}\"\ntcp_keepidle = \"1s\"\ntcp_keepintvl = \"1s\"\ntcp_keepcnt = 2",
            net.gateway()
        ),
    )
    .await;
    let admin = connect(&p.dsn("pgkeel")).await.expect("the console");
    assert_eq!(config_value(&admin, "tcp_keepidle").await, "1s");

    // psql on the host opens a transaction, writes, and stays in it.
    let dsn = format!("postgresql://postgres:{}@{}:{outside}/postgres?connect_timeout=5", p.password, net.gateway());
    let mut client = Reaped(
        net.command(0, std::path::Path::new("psql"))
            .args([dsn.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run psql on the host"),
    );
    let mut stdin = client.0.stdin.take().expect("psql's stdin");
    stdin.write_all(b"begin;\ninsert into vanished values (1);\n").expect("write to psql");
    stdin.flush().unwrap();
    let held = || async {
        let servers = show(&admin, "SHOW SERVERS").await;
        servers.iter().any(|r| r["state"] == "active").then_some(())
    };
    wait_for("the host's transaction to hold a server connection", Duration::from_secs(20), held).await;
    wait_for("its insert to be done", Duration::from_secs(20), || async {
        let locks = psql(
            &direct,
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 'vanished'",
        )
        .unwrap();
        (locks != "0").then_some(())
    })
    .await;

    net.isolate(0);
    let started = Instant::now();
    // Silence for tcp_keepidle, then tcp_keepcnt unanswered probes tcp_keepintvl apart: the
    // proxy drops the client and rolls its transaction back (the kernel's default, two hours
    // of silence, would leave the row locked that long).
    wait_for("the proxy to drop the vanished client", Duration::from_secs(30), || async {
        let gone = show(&admin, "SHOW CLIENTS").await.iter().all(|r| r["addr"] != net.hosts[0].addr);
        let free = show(&admin, "SHOW SERVERS").await.iter().all(|r| r["state"] != "active");
        (gone && free).then_some(())
    })
    .await;
    eprintln!("vanished client dropped {:?} after its link went down", started.elapsed());
    assert_eq!(psql(&direct, "select count(*) from vanished").unwrap(), "0", "its transaction was rolled back");
    let through = connect(&p.dsn("postgres")).await.unwrap();
    through.simple_query("insert into vanished values (1)").await.expect("the row is free again");
    drop(stdin);
}

#[test]
fn config_check_recognises_a_proxy_toml() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"pw\"\n").unwrap();
    let good = "cluster = \"main\"\nlisten = \"127.0.0.1:6432\"\nadmin_users = [\"postgres\"]\n\
                metrics_listen = \"127.0.0.1:9187\"\n[dcs]\nkind = \"local\"\npath = \"/tmp/dcs\"\n\
                [auth]\nuserlist = \"users.txt\"\n";
    let check = |name: &str, text: &str, args: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin()).args(["config", "check"]).arg(&path).args(args).output().expect("run pgkeel");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check("proxy.toml", good, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("OK (proxy, cluster \"main\""), "{out}");
    // Named anything: told by its contents.
    assert_eq!(check("front.toml", good, &[]).0, Some(0));
    let (code, _, err) =
        check("bad.toml", &good.replace("cluster = \"main\"\n", "cluster = \"main\"\npool_size = 0\n"), &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("pool_size = 0 is out of range"), "{err}");
    let (code, _, err) = check("typo.toml", &good.replace("metrics_listen", "metric_listen"), &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("did you mean \"metrics_listen\"?"), "{err}");
    let (code, _, err) = check("admin.toml", &good.replace("[\"postgres\"]", "[\"ops\"]"), &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("admin_users: \"ops\" is not in the userlist"), "{err}");
    // A node.toml is still checked as one; --kind proxy forces the proxy check.
    let node = pgkeel_config::example();
    let (code, out, err) = check("node.toml", node, &[]);
    assert!(!out.contains("proxy") && !err.contains("proxy"), "{out}{err}");
    assert!(code == Some(0) || code == Some(64), "{code:?}");
    let (code, _, err) = check("node2.toml", node, &["--kind", "proxy"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("unknown key"), "{err}");
    // A file that is not TOML, named like a proxy.toml, gets the proxy checker's message.
    let (code, _, err) = check("my-proxy.toml", "cluster = ", &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("TOML parse error"), "{err}");
}

/// The shipped alert rules (deploy/prometheus): promtool accepts them and their unit tests
/// pass, and every metric they name is one a real agent or proxy exports, so a renamed metric
/// cannot leave an alert that never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_alert_rules_pass_promtool_and_name_exported_metrics() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    let promtool = std::env::var("PGKEEL_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    for args in [["check", "rules", "pgkeel-alerts.yml"], ["test", "rules", "pgkeel-alerts.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap_or_else(|e| {
            panic!(
                "cannot run {promtool} ({e}): install it with scripts/install-deps.sh --test (Debian's \
                 prometheus package), or point PGKEEL_PROMTOOL at it"
            )
        });
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The metric names of every `expr:` (one line or a block), without histogram suffixes.
    let rules = std::fs::read_to_string(dir.join("pgkeel-alerts.yml")).expect("read the rules");
    let mut names = std::collections::BTreeSet::new();
    // The indentation of an `expr: |` whose block is being read.
    let mut block: Option<usize> = None;
    for line in rules.lines() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if let Some(rest) = t.strip_prefix("expr:") {
            block = (rest.trim() == "|").then_some(indent);
            names.extend(metric_names(rest));
        } else if block.is_some_and(|b| indent > b) && !t.starts_with('#') {
            names.extend(metric_names(t));
        } else {
            block = None;
        }
    }
    assert!(names.len() > 15, "the rules name the metrics they watch: {names:?}");

    // A primary with a streaming replica (so the primary reports its replication), and a
    // proxy that has served a query.
    let c = Cluster::up(bin(), 2).await;
    let (leader, replica) = c.leader_and_replica(Duration::from_secs(30)).await;
    let p = OpsProxy::start(&c, "").await;
    let client = connect(&p.dsn("postgres")).await.unwrap();
    client.simple_query("select 1").await.unwrap();
    let mut exported = http_get(p.metrics_port, "/metrics").1;
    // The primary lists its replicas from pg_stat_replication on its next loop.
    let primary = wait_for("the primary to report its replica in /metrics", Duration::from_secs(30), || async {
        let text = c.api(&leader, "GET", "/metrics", None, false).await.text();
        text.contains("pgkeel_replication_lag_bytes{").then_some(text)
    })
    .await;
    exported.push_str(&primary);
    exported.push_str(&c.api(&replica, "GET", "/metrics", None, false).await.text());
    let families: std::collections::BTreeSet<&str> =
        exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next()).collect();
    // Exported once a scheduled backup has run and the primary has archived WAL, which
    // scheduled_backup.rs waits for and checks in /metrics.
    let after_a_backup = include_str!("scheduled_backup.rs");
    for name in &names {
        if name == "up" {
            continue; // Prometheus's own, per scrape target
        }
        assert!(
            families.contains(name.as_str()) || after_a_backup.contains(&format!("\"{name}\"")),
            "the alert rules use {name}, which neither the agents nor the proxy export: {families:?}"
        );
    }
}

/// Names in a PromQL expression that look like pgkeel's metrics (or `up`), with a histogram's
/// `_bucket`, `_sum` or `_count` removed.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("pgkeel_") || *w == "up")
        .map(|w| {
            let w = ["_bucket", "_sum", "_count"].iter().find_map(|s| w.strip_suffix(s)).unwrap_or(w);
            w.to_string()
        })
        .collect()
}
