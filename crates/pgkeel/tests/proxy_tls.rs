//! TLS and `auth_query` in `pgkeel proxy`, against real `pgkeel up` clusters with real clients
//! (psql, tokio-postgres, psycopg 3, and raw sockets for hostile bytes).

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pgkeel_testkit::{psql, wait_for, Cluster};
use tokio_postgres::error::SqlState;

mod proxy_support;

use proxy_support::{bin, dcs_toml, free_port, proxy_dir, superuser_password, Proxy};

fn password(c: &Cluster) -> String {
    superuser_password(c)
}

/// A proxy for cluster `c` whose userlist holds the superuser, with `extra` lines at the end
/// of proxy.toml (after `[auth] userlist`, so they may add `[auth]` keys, then `[tls]`).
async fn start_proxy(c: &Cluster, name: &str, extra: &str) -> Proxy {
    start_proxy_for(c, name, &[("postgres", &password(c))], extra).await
}

/// [`start_proxy`] with `users` (name, plaintext password) in the userlist.
async fn start_proxy_for(c: &Cluster, name: &str, users: &[(&str, &str)], extra: &str) -> Proxy {
    let dir = proxy_dir(c, name, users);
    let port = free_port();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{port}\"\n[dcs]\n{}\n[auth]\nuserlist = \"userlist.txt\"\n{extra}\n",
            dcs_toml(c)
        ),
    )
    .expect("write proxy.toml");
    Proxy::launch(&config, port, password(c)).await
}

/// The first byte the server answers to `packet`, on a fresh plain connection to `port`.
fn answer_to(port: u16, packet: &[u8]) -> (std::net::TcpStream, u8) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(packet).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("an answer");
    (s, b[0])
}

/// A login to the proxy at `port` as a client that knows only MD5: the authentication
/// request's code (5: MD5, 10: SASL), and then, when it was MD5, the result of
/// `select current_user` or the error (`SQLSTATE: message`).
fn md5_login(port: u16, user: &str, password: &str) -> (u32, Result<String, String>) {
    use pgkeel_proxy::bytes::BytesMut;
    use pgkeel_proxy::protocol::{
        Authentication, BackendDecoder, BackendMessage, FrontendMessage, StartupMessage, StartupPacket, Text,
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    let mut recv = |s: &mut std::net::TcpStream| loop {
        if let Some(m) = BackendDecoder::default().decode(&mut buf).expect("a valid message from the proxy") {
            return m;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("an answer within 10 s");
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    let send = |s: &mut std::net::TcpStream, m: FrontendMessage| {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        s.write_all(&out).unwrap();
    };
    let mut out = BytesMut::new();
    StartupPacket::Startup(StartupMessage::new([("user", user), ("database", "postgres")])).encode(&mut out);
    s.write_all(&out).unwrap();
    let salt = match recv(&mut s) {
        BackendMessage::Authentication(Authentication::Md5Password { salt }) => salt,
        BackendMessage::Authentication(Authentication::Sasl { .. }) => return (10, Err("asked for SASL".into())),
        other => panic!("expected an authentication request, got {other:?}"),
    };
    let answer = pgkeel_proxy::scram::md5_password(user, password, &salt);
    send(&mut s, FrontendMessage::Password(Text::lossy(&answer)));
    // Messages up to ReadyForQuery: the first column of the last DataRow, or the error.
    let mut until_ready = |s: &mut std::net::TcpStream| {
        let mut value = String::new();
        loop {
            match recv(s) {
                BackendMessage::ErrorResponse(e) => {
                    let field = |f: Option<&Text>| f.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                    return Err(format!("{}: {}", field(e.code()), field(e.message())));
                }
                BackendMessage::DataRow(v) => {
                    value = v
                        .first()
                        .cloned()
                        .flatten()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                }
                BackendMessage::ReadyForQuery(_) => return Ok(value),
                _ => {}
            }
        }
    };
    if let Err(e) = until_ready(&mut s) {
        return (5, Err(e));
    }
    send(&mut s, FrontendMessage::Query(Text::lossy("select current_user")));
    (5, until_ready(&mut s))
}

const SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
const GSSENC_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x30";

/// `pgkeel up`: a CA and certificates in DIR/tls, postgres with `ssl = on`, a proxy that
/// requires TLS from clients and checks postgres' certificate (`verify-full`), and DSNs with
/// `sslmode=verify-full`. Hostile bytes get a clear error; psycopg 3 gets the same answers
/// through the proxy as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_cluster_uses_tls_on_both_sides() {
    let c = Cluster::up(bin(), 2).await;
    let ca = c.dir().join("tls/ca.crt");
    assert!(ca.exists(), "up wrote the CA");
    let dsn = c.info["proxy"]["dsn"].as_str().expect("up.json names the proxy's DSN").to_string();
    assert!(dsn.contains("sslmode=verify-full") && dsn.contains(&format!("sslrootcert={}", ca.display())), "{dsn}");
    let leader = c.leader().await.expect("a leader").0;

    // Client side: psql checks the proxy's certificate against the CA and the name
    // (127.0.0.1 and localhost are both in it).
    let info = wait_for("psql through the proxy", Duration::from_secs(20), || {
        let dsn = dsn.clone();
        async move { psql(&dsn, "\\conninfo").ok() }
    })
    .await;
    assert!(info.contains("SSL connection"), "{info}");
    let localhost = dsn.replace("@127.0.0.1:", "@localhost:");
    assert_eq!(psql(&localhost, "select 1").unwrap(), "1");
    // SCRAM-SHA-256-PLUS: libpq binds the login to the TLS channel (the proxy's certificate,
    // ECDSA with SHA-256 as up makes it) and insists on it; a wrong password still fails.
    assert_eq!(psql(&format!("{dsn}&channel_binding=require"), "select 'bound'").unwrap(), "bound");
    let wrong = dsn.replacen(&format!(":{}@", password(&c)), ":wrong@", 1);
    assert_ne!(wrong, dsn, "the DSN carries the password");
    let err = psql(&format!("{wrong}&channel_binding=require"), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"postgres\""), "{err}");
    // Server side: the proxy's own connection to postgres is TLS too.
    assert_eq!(psql(&dsn, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").unwrap(), "t");
    // Direct connections to a node can use the same CA.
    let node = format!("{}?sslmode=verify-full&sslrootcert={}", c.node_dsn(&leader), ca.display());
    assert_eq!(psql(&node, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").unwrap(), "t");

    // client_tls = "require": a plaintext client gets FATAL 28000 saying so.
    let plain = format!("{}?sslmode=disable", dsn.split('?').next().unwrap());
    let err = psql(&plain, "select 1").unwrap_err();
    assert!(err.contains("the proxy requires TLS (client_tls = \"require\")"), "{err}");
    let Err(e) = pgkeel_testkit::connect(&plain).await else { panic!("a plaintext client was accepted") };
    assert_eq!(e.code(), Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{e}");

    let port: u16 = dsn.split(':').nth(3).and_then(|s| s.split('/').next()).and_then(|p| p.parse().ok()).unwrap();
    // GSSENCRequest is answered N, SSLRequest S.
    assert_eq!(answer_to(port, GSSENC_REQUEST).1, b'N');
    let (mut s, b) = answer_to(port, SSL_REQUEST);
    assert_eq!(b, b'S');
    // Garbage instead of a TLS ClientHello: the connection is closed (nothing to say in
    // plaintext on a channel that is now TLS).
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.len() < 64, "a TLS alert at most: {rest:?}");
    // Garbage instead of a startup packet: FATAL 08P01 naming the problem, then closed.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("the proxy closes the connection");
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(answer.first(), Some(&b'E'), "{text:?}");
    assert!(text.contains("08P01") && text.contains("startup packet: length"), "{text:?}");
    // Still serving.
    assert_eq!(psql(&dsn, "select 42").unwrap(), "42");

    psycopg_through_the_proxy(&dsn, &node).await;
}

const PSYCOPG_SCRIPT: &str = r#"
import json, sys, threading, time
import psycopg

dsn, suffix = sys.argv[1], sys.argv[2]
out = {}
with psycopg.connect(dsn, autocommit=True) as conn:
    out["tls"] = conn.info.pgconn.ssl_in_use
    cur = conn.cursor()
    cur.execute("select 1, 'x'::text, 2.5::numeric, array[1,2,3], null::int, '2024-01-02 03:04:05+00'::timestamptz at time zone 'UTC'")
    out["simple"] = [str(v) for v in cur.fetchone()]
    t = "psy_" + suffix
    cur.execute(f"create table {t}(id int primary key, v text)")
    with conn.transaction():
        cur.execute(f"insert into {t} values (%s, %s), (%s, %s)", (1, "one", 2, "two"))
    try:
        with conn.transaction():
            cur.execute(f"insert into {t} values (3, 'three')")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    try:
        with conn.transaction():
            cur.execute(f"insert into {t} values (1, 'dup')")
    except psycopg.errors.UniqueViolation as e:
        out["dup"] = e.sqlstate
    prepared = []
    for i in range(8):
        cur.execute(f"select v, %s::int * 10 from {t} where id = %s", (i, 1 + i % 2), prepare=True)
        prepared.append(list(cur.fetchone()))
    out["prepared"] = prepared
    with cur.copy(f"copy {t} (id, v) from stdin") as copy:
        for i in range(10, 1010):
            copy.write_row((i, f"row {i}"))
    rows = []
    with cur.copy(f"copy (select id, v from {t} order by id) to stdout") as copy:
        for row in copy.rows():
            rows.append(list(row))
    out["copy_count"] = len(rows)
    out["copy_head"] = rows[:4]
    out["copy_tail"] = rows[-2:]
    cur.execute(f"select count(*), sum(id) from {t}")
    out["after_copy"] = [int(v) for v in cur.fetchone()]
    cur.execute(f"drop table {t}")

# A cancel request (libpq's, plaintext to the proxy) stops this client's running query; the
# proxy forwards it to the server over TLS, as the session itself.
with psycopg.connect(dsn, autocommit=True) as sleeper:
    def cancel_once_running():
        with psycopg.connect(dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                # Both on the primary: through the proxy, once the database's volatile
                # functions are known, a read (pg_sleep's too) may go to a replica, and one
                # node's pg_stat_activity never shows another's query.
                running = watcher.execute(
                    "/* pgkeel:primary */ select count(*) from pg_stat_activity "
                    "where query = '/* pgkeel:primary */ select pg_sleep(30)' and state = 'active'"
                ).fetchone()[0]
                if running:
                    sleeper.cancel()
                    return
                time.sleep(0.05)

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    started = time.monotonic()
    try:
        sleeper.execute("/* pgkeel:primary */ select pg_sleep(30)")
        out["cancel"] = "not cancelled"
    except psycopg.errors.QueryCanceled as e:
        out["cancel"] = e.sqlstate
    out["cancelled_in_time"] = time.monotonic() - started < 25
    canceller.join()
    out["after_cancel"] = sleeper.execute("select 7").fetchone()[0]
print(json.dumps(out, sort_keys=True))
"#;

/// Runs the psycopg script against `dsn` (libpq conninfo URL), returning its JSON line.
async fn run_psycopg(python: &Path, dsn: &str, suffix: &str) -> String {
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-c", PSYCOPG_SCRIPT, dsn, suffix]).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the psycopg script finishes within 60 s")
        .expect("run python");
    assert!(
        out.status.success(),
        "psycopg against {dsn}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// psycopg 3 (libpq underneath): queries, transactions, server-side prepared statements
/// (`prepare=True`), COPY in and out, a cancel request, over TLS; the same answers through the proxy as
/// directly. Needs /opt/pgkeel-test-venv with psycopg (`scripts/install-deps.sh --test`); skipped
/// with a message without it, except under CI, where it must run.
async fn psycopg_through_the_proxy(proxy_dsn: &str, node_dsn: &str) {
    let python = Path::new("/opt/pgkeel-test-venv/bin/python");
    let ok = python.exists()
        && Command::new(python).args(["-c", "import psycopg"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "psycopg is missing from /opt/pgkeel-test-venv: run scripts/install-deps.sh --test"
        );
        eprintln!("SKIPPED the psycopg part: /opt/pgkeel-test-venv has no psycopg; run scripts/install-deps.sh --test");
        return;
    }
    let via_proxy = run_psycopg(python, proxy_dsn, "proxy").await;
    let direct = run_psycopg(python, node_dsn, "direct").await;
    assert!(via_proxy.contains("\"tls\": true"), "{via_proxy}");
    assert!(via_proxy.contains("\"copy_count\": 1002"), "{via_proxy}");
    assert!(via_proxy.contains("\"dup\": \"23505\""), "{via_proxy}");
    assert!(via_proxy.contains("\"cancel\": \"57014\""), "{via_proxy}");
    assert_eq!(via_proxy, direct, "psycopg gets the same answers through the proxy as directly");
}

/// A proxy with `client_tls = "allow"`, `server_tls = "require"` and `auth_query`: clients
/// choose TLS or not; users missing from the userlist are looked up on the primary, SCRAM
/// users log in to postgres with the ClientKey recovered from their proof; MD5 users are
/// checked with MD5; wrong passwords get 28P01. A wrong `server_ca` fails with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_and_auth_query() {
    let c = Cluster::up(bin(), 1).await;
    let leader = c.leader().await.expect("a leader").0;
    let tls = c.dir().join("tls");
    let p = start_proxy(
        &c,
        "proxy-aq",
        &format!(
            "query = \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"\nauth_user = \"postgres\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_tls = \"allow\"\nserver_tls = \"require\"\n",
            tls.join("proxy.crt").display().to_string(),
            tls.join("proxy.key").display().to_string()
        ),
    )
    .await;
    let su = password(&c);
    let plain = p.dsn_with("postgres", &su, "&sslmode=disable");
    let info = wait_for("psql through the proxy", Duration::from_secs(20), || {
        let dsn = plain.clone();
        async move { psql(&dsn, "\\conninfo").ok() }
    })
    .await;
    assert!(!info.contains("SSL connection"), "{info}");
    let info = psql(&p.dsn_with("postgres", &su, "&sslmode=require"), "\\conninfo").unwrap();
    assert!(info.contains("SSL connection"), "{info}");
    // Channel binding over TLS only: libpq refuses to go on without it.
    for (params, works) in [
        ("&sslmode=require&channel_binding=require", true),
        ("&sslmode=require&channel_binding=disable", true),
        ("&sslmode=disable&channel_binding=require", false),
    ] {
        let r = psql(&p.dsn_with("postgres", &su, params), "select current_user");
        assert_eq!(r.is_ok(), works, "{params}: {r:?}");
    }
    // server_tls = "require": TLS to postgres, and the proxy's SCRAM login bound to it
    // (postgres offers SCRAM-SHA-256-PLUS over TLS and checks the binding data itself).
    assert_eq!(psql(&plain, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").unwrap(), "t");
    let log = p.log_text();
    assert!(
        log.lines().any(|l| l.contains("logging in with SCRAM") && l.contains("mechanism=\"SCRAM-SHA-256-PLUS\"")),
        "{log}"
    );

    // Users that exist only in postgres.
    let node = c.node_dsn(&leader);
    psql(&node, "create role scram_u login password 'scram pw'").unwrap();
    psql(&node, "set password_encryption = 'md5'; create role md5_u login password 'md5 pw'").unwrap();
    let stored = psql(&node, "select rolpassword from pg_authid where rolname = 'md5_u'").unwrap();
    assert!(stored.starts_with("md5"), "{stored}");
    for round in 0..2 {
        // The second round is answered from the cache.
        for sslmode in ["disable", "require", "require&channel_binding=require"] {
            let dsn = p.dsn_with("scram_u", "scram%20pw", &format!("&sslmode={sslmode}"));
            assert_eq!(psql(&dsn, "select current_user").unwrap(), "scram_u", "round {round}, {sslmode}");
        }
    }
    let client = pgkeel_testkit::connect(&p.dsn_with("scram_u", "scram%20pw", "&sslmode=disable")).await.unwrap();
    let row = client.query_one("select current_user::text, $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("scram_u".to_string(), 42));
    drop(client);
    let err = psql(&p.dsn_with("scram_u", "wrong", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"scram_u\""), "{err}");
    let Err(e) = pgkeel_testkit::connect(&p.dsn_with("scram_u", "wrong", "&sslmode=disable")).await else {
        panic!("a wrong password was accepted")
    };
    assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
    let err = psql(&p.dsn_with("nobody", "x", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"nobody\""), "{err}");
    // MD5: a wrong password is refused by the proxy's MD5 check; the right one passes it, and
    // then postgres (pg_hba.conf: scram-sha-256, as pgkeel writes it) cannot take an MD5 login:
    // the error says so and how to fix it.
    let err = psql(&p.dsn_with("md5_u", "wrong", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed for user \"md5_u\""), "{err}");
    let err = psql(&p.dsn_with("md5_u", "md5%20pw", ""), "select 1").unwrap_err();
    assert!(err.contains("stored as an MD5 hash") && err.contains("password_encryption"), "{err}");
    // auth_type = "md5": a client that can only do MD5 logs in as a userlist user with a
    // plaintext password (and the proxy logs in to postgres with SCRAM); a SCRAM-secret
    // user of auth_query still gets SCRAM; an unknown user gets the same MD5 exchange.
    let md5 = start_proxy(
        &c,
        "proxy-md5",
        "auth_type = \"md5\"\nquery = \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"\n\
         auth_user = \"postgres\"\n",
    )
    .await;
    let (method, r) = md5_login(md5.port, "postgres", &su);
    assert_eq!((method, r.as_deref()), (5, Ok("postgres")), "MD5 login of a userlist user, query answered");
    let (method, r) = md5_login(md5.port, "postgres", "wrong");
    assert_eq!(method, 5);
    assert!(r.as_ref().is_err_and(|e| e.contains("28P01") && e.contains("password authentication failed")), "{r:?}");
    let (method, r) = md5_login(md5.port, "nobody", "x");
    assert_eq!(method, 5, "an unknown user is asked for MD5 as a known one is");
    assert!(r.as_ref().is_err_and(|e| e.contains("28P01")), "{r:?}");
    assert_eq!(md5_login(md5.port, "scram_u", "scram pw").0, 10, "a SCRAM secret can only be checked with SCRAM");
    assert_eq!(psql(&md5.dsn_with("postgres", &su, ""), "select current_user").unwrap(), "postgres");
    assert_eq!(psql(&md5.dsn_with("scram_u", "scram%20pw", ""), "select current_user").unwrap(), "scram_u");

    // A user created after a failed lookup is found once the negative answer expires (5 s).
    let err = psql(&p.dsn_with("late_u", "late", ""), "select 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    psql(&node, "create role late_u login password 'late'").unwrap();
    wait_for("late_u through the proxy", Duration::from_secs(15), || {
        let dsn = p.dsn_with("late_u", "late", "");
        async move { (psql(&dsn, "select current_user").ok()? == "late_u").then_some(()) }
    })
    .await;

    // verify-full against a CA that did not sign postgres' certificate: a clear error.
    let wrong = start_proxy(
        &c,
        "proxy-wrong-ca",
        &format!(
            "[tls]\nserver_tls = \"verify-full\"\nserver_ca = {:?}\n",
            tls.join("proxy.crt").display().to_string()
        ),
    )
    .await;
    let err = psql(&wrong.dsn_with("postgres", &su, ""), "select 1").unwrap_err();
    assert!(
        err.contains("TLS handshake with")
            && err.contains("verify-full")
            && err.contains("not signed by a CA of tls.server_ca"),
        "{err}"
    );

    // A reload (SIGHUP) reads [tls] and the certificate files again: the right CA fixes the
    // server side, and a certificate with client_tls = "require" changes what clients must do.
    std::fs::write(
        c.dir().join("proxy-wrong-ca").join("proxy.toml"),
        format!(
            "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{}\"\n[dcs]\n{}\n[auth]\nuserlist = \"userlist.txt\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_tls = \"require\"\nserver_tls = \"verify-full\"\nserver_ca = {:?}\n",
            wrong.port,
            dcs_toml(&c),
            tls.join("proxy.crt").display().to_string(),
            tls.join("proxy.key").display().to_string(),
            tls.join("ca.crt").display().to_string()
        ),
    )
    .expect("rewrite proxy.toml");
    wrong.signal(libc::SIGHUP);
    let verified =
        wrong.dsn_with("postgres", &su, &format!("&sslmode=verify-ca&sslrootcert={}", tls.join("ca.crt").display()));
    wait_for("the reloaded CA and certificate", Duration::from_secs(15), || {
        let dsn = verified.clone();
        async move { (psql(&dsn, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").ok()? == "t").then_some(()) }
    })
    .await;
    let err = psql(&wrong.dsn_with("postgres", &su, "&sslmode=disable"), "select 1").unwrap_err();
    assert!(err.contains("the proxy requires TLS (client_tls = \"require\")"), "{err}");
    // A [tls] file that cannot be read: the reload is refused and the TLS in force stays.
    std::fs::write(
        c.dir().join("proxy-wrong-ca").join("proxy.toml"),
        format!(
            "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{}\"\n[dcs]\n{}\n[auth]\nuserlist = \"userlist.txt\"\n\
             [tls]\ncert = \"/nonexistent/proxy.crt\"\nkey = \"/nonexistent/proxy.key\"\n",
            wrong.port,
            dcs_toml(&c)
        ),
    )
    .expect("rewrite proxy.toml");
    wrong.signal(libc::SIGHUP);
    wait_for("the refused reload in the log", Duration::from_secs(15), || {
        let log = wrong.log_text();
        async move { log.contains("reload refused").then_some(()) }
    })
    .await;
    assert_eq!(psql(&verified, "select 1").unwrap(), "1", "the TLS in force stayed");
}

/// A CA of the test's own that writes PEM files into one directory: its certificate, the
/// certificates and keys it signs (keys mode 0600, as libpq and postgres want them) and its
/// revocation lists.
struct TestCa {
    dir: std::path::PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A CA with common name `cn`, its certificate in `dir/FILE`.
    fn new(dir: &Path, cn: &str, file: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let ca = TestCa { dir: dir.to_path_buf(), issuer: rcgen::Issuer::new(params, key) };
        ca.write(file, &cert.pem(), 0o644);
        ca
    }

    fn write(&self, name: &str, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// `FILE.crt` and `FILE.key`: a certificate with common name `cn`, serial number
    /// `serial`, and either the subject names `hosts` (a server's) or none (a client's).
    fn leaf(&self, file: &str, cn: &str, serial: u8, hosts: &[&str]) {
        use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, SerialNumber};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = Some(SerialNumber::from_slice(&[serial]));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if hosts.is_empty() {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        self.write(&format!("{file}.crt"), &cert.pem(), 0o644);
        self.write(&format!("{file}.key"), &key.serialize_pem(), 0o600);
    }

    /// `FILE`: a revocation list of the certificates with these serial numbers.
    fn crl(&self, file: &str, serials: &[u8]) {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from_slice(&[serials.len() as u8]),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&[s]),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        self.write(file, &params.signed_by(&self.issuer).unwrap().pem().unwrap(), 0o644);
    }
}

/// Client certificates signed by a CA of the test's own, as PEM files in `dir`: the CA's
/// `clients-ca.crt`, and for each common name `NAME.crt` and `NAME.key`;
/// `stranger.crt` and `stranger.key` (CN postgres) come from another CA (`other-ca.crt`);
/// `revoked.crt` and `revoked.key` (CN postgres) from the CA, which revokes them in
/// `clients.crl`, and them and `NAMES[0]`'s in `clients-more.crl`.
fn client_certificates(dir: &Path, names: &[&str]) {
    let ca = TestCa::new(dir, "pgkeel tests client CA", "clients-ca.crt");
    for (serial, name) in (1..).zip(names) {
        ca.leaf(name, name, serial, &[]);
    }
    ca.leaf("revoked", "postgres", 100, &[]);
    ca.crl("clients.crl", &[100]);
    ca.crl("clients-more.crl", &[100, 1]);
    TestCa::new(dir, "another CA", "other-ca.crt").leaf("stranger", "postgres", 1, &[]);
}

/// `client_tls = "verify-ca"` / `"verify-full"` with `client_ca`, and `auth_type = "cert"`,
/// with psql presenting certificates (or none, or one of another CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_verify_full_and_cert_auth() {
    let c = Cluster::up(bin(), 1).await;
    let leader = c.leader().await.expect("a leader").0;
    let tls = c.dir().join("tls");
    let certs = c.dir().join("client-certs");
    client_certificates(&certs, &["postgres", "intruder", "cert_u"]);
    let su = password(&c);
    let with_cert = |name: &str| {
        format!(
            "&sslmode=require&sslcert={}&sslkey={}",
            certs.join(format!("{name}.crt")).display(),
            certs.join(format!("{name}.key")).display()
        )
    };
    let tls_section = |mode: &str| {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_tls = \"{mode}\"\nclient_ca = {:?}\n",
            tls.join("proxy.crt").display().to_string(),
            tls.join("proxy.key").display().to_string(),
            certs.join("clients-ca.crt").display().to_string()
        )
    };

    // verify-full: a certificate of the client CA whose CN is the user, and the password too.
    let full = start_proxy(&c, "proxy-verify-full", &tls_section("verify-full")).await;
    let good = full.dsn_with("postgres", &su, &with_cert("postgres"));
    let info = wait_for("psql with a client certificate", Duration::from_secs(20), || {
        let dsn = good.clone();
        async move { psql(&dsn, "\\conninfo").ok() }
    })
    .await;
    assert!(info.contains("SSL connection"), "{info}");
    assert_eq!(psql(&good, "select current_user").unwrap(), "postgres");
    let err = psql(&full.dsn_with("postgres", "wrong", &with_cert("postgres")), "select 1").unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"postgres\""),
        "the password is still checked: {err}"
    );
    let err = psql(&full.dsn_with("postgres", &su, "&sslmode=require"), "select 1").unwrap_err();
    assert!(
        err.contains("connection requires a valid client certificate (client_tls = \"verify-full\")"),
        "no certificate: {err}"
    );
    let err = psql(&full.dsn_with("postgres", &su, &with_cert("intruder")), "select 1").unwrap_err();
    assert!(
        err.contains("certificate validation (client_tls = \"verify-full\") failed for user \"postgres\"")
            && err.contains("\"intruder\""),
        "another user's certificate: {err}"
    );
    let err = psql(&full.dsn_with("postgres", &su, "&sslmode=disable"), "select 1").unwrap_err();
    assert!(err.contains("the proxy requires TLS (client_tls = \"verify-full\")"), "{err}");
    // A certificate of another CA fails the handshake; the proxy says so in its log.
    let err = psql(&full.dsn_with("postgres", &su, &with_cert("stranger")), "select 1").unwrap_err();
    assert!(err.to_lowercase().contains("ssl"), "a certificate of another CA: {err}");
    // psql may be gone before the proxy has written the line.
    wait_for("the failed handshake in the proxy's log", Duration::from_secs(10), || {
        let log = full.log_text();
        async move { log.contains("TLS handshake with a client failed").then_some(()) }
    })
    .await;

    // auth_type = "cert": the certificate alone logs in (no password asked), and the proxy
    // logs in to postgres with the userlist's password. verify-ca checks only the CA, and the
    // cert method then wants the CN to be the user.
    // client_crl: a certificate it lists fails the handshake.
    let crl = c.dir().join("client-now.crl");
    std::fs::copy(certs.join("clients.crl"), &crl).unwrap();
    let cert = start_proxy(
        &c,
        "proxy-cert-auth",
        &format!("auth_type = \"cert\"\n{}client_crl = {:?}\n", tls_section("verify-ca"), crl.display().to_string()),
    )
    .await;
    let by_cert = cert.dsn_with("postgres", "", &with_cert("postgres"));
    let who = wait_for("a login by certificate", Duration::from_secs(20), || {
        let dsn = by_cert.clone();
        async move { psql(&dsn, "select current_user").ok() }
    })
    .await;
    assert_eq!(who, "postgres");
    let err = psql(&cert.dsn_with("postgres", "", &with_cert("revoked")), "select 1").unwrap_err();
    assert!(err.contains("certificate revoked"), "a revoked certificate: {err}");
    wait_for("the revoked certificate in the proxy's log", Duration::from_secs(10), || {
        let log = cert.log_text();
        async move { (log.contains("TLS handshake with a client failed") && log.contains("Revoked")).then_some(()) }
    })
    .await;
    let err = psql(&cert.dsn_with("postgres", "", &with_cert("intruder")), "select 1").unwrap_err();
    assert!(
        err.contains("certificate authentication failed for user \"postgres\"") && err.contains("\"intruder\""),
        "{err}"
    );
    let err = psql(&cert.dsn_with("postgres", &su, "&sslmode=require"), "select 1").unwrap_err();
    assert!(err.contains("connection requires a valid client certificate"), "{err}");
    // A user the userlist does not have: the certificate lets it in to the proxy, and postgres
    // (pg_hba.conf: scram-sha-256) wants a password the proxy does not have: the error says so.
    psql(&c.node_dsn(&leader), "create role cert_u login password 'unknown to the proxy'").unwrap();
    let err = psql(&cert.dsn_with("cert_u", "", &with_cert("cert_u")), "select 1").unwrap_err();
    assert!(err.contains("the proxy has no password for this user") && err.contains("cert_u"), "{err}");
    // A new list that also revokes postgres's certificate, read on SIGHUP: it no longer logs in.
    std::fs::copy(certs.join("clients-more.crl"), &crl).unwrap();
    cert.signal(libc::SIGHUP);
    let err = wait_for("the reloaded revocation list", Duration::from_secs(15), || {
        let dsn = by_cert.clone();
        async move { psql(&dsn, "select 1").err() }
    })
    .await;
    assert!(err.contains("certificate revoked"), "revoked after the reload: {err}");
}

/// `postgres.pg_hba` in node.toml and the proxy's own certificate towards postgres
/// (`[tls] server_cert`, `server_key`): a `hostssl ... cert` line for one role, and a proxy
/// that logs in as that role with its certificate, where one without it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_hba_lines_and_the_proxys_certificate_towards_postgres() {
    let mut c = Cluster::up(bin(), 1).await;
    let leader = c.leader().await.expect("a leader").0;
    let certs = c.dir().join("client-certs");
    client_certificates(&certs, &["cert_login", "cert_other"]);
    let node = c.node_dsn(&leader);
    psql(&node, "create role cert_login login; create role cert_other login").unwrap();

    // First postgres is told which CA signs client certificates, then the operator's line is
    // added alone: the agent writes pg_hba.conf when it starts and reloads postgres for that
    // change too.
    let node_toml = c.dir().join("nodes").join(&leader).join("node.toml");
    let mut config = pgkeel_config::load(&node_toml).expect("node.toml");
    let ca = certs.join("clients-ca.crt").display().to_string();
    config.postgres.parameters.insert("ssl_ca_file".into(), pgkeel_config::ParamValue::Text(ca.clone()));
    std::fs::write(&node_toml, config.to_toml()).unwrap();
    c.kill_agent(&leader);
    c.start_agent(&leader);
    wait_for("postgres to read ssl_ca_file", Duration::from_secs(60), || {
        let (node, ca) = (node.clone(), ca.clone());
        async move { (psql(&node, "show ssl_ca_file").ok()? == ca).then_some(()) }
    })
    .await;
    config.postgres.pg_hba =
        vec!["hostssl all cert_login 127.0.0.1/32 cert".into(), "hostssl all cert_other 127.0.0.1/32 cert".into()];
    std::fs::write(&node_toml, config.to_toml()).unwrap();
    c.kill_agent(&leader);
    c.start_agent(&leader);
    // postgresql://postgres:PW@127.0.0.1:PORT/postgres, as cert_login without a password.
    let address = node.rsplit_once('@').expect("a DSN with credentials").1;
    let with_cert = format!(
        "sslmode=require&sslcert={}&sslkey={}",
        certs.join("cert_login.crt").display(),
        certs.join("cert_login.key").display()
    );
    let by_cert = format!("postgresql://cert_login@{address}?{with_cert}");
    let who = wait_for("a login with the certificate under the new pg_hba.conf", Duration::from_secs(60), || {
        let dsn = by_cert.clone();
        async move { psql(&dsn, "select current_user").ok() }
    })
    .await;
    assert_eq!(who, "cert_login");
    let hba = std::fs::read_to_string(c.dir().join("nodes").join(&leader).join("data").join("pg_hba.conf")).unwrap();
    let (line, catch_all) = (
        hba.find("hostssl all cert_login 127.0.0.1/32 cert").expect("the operator's line"),
        hba.find("host    all          all   0.0.0.0/0").expect("pgkeel's catch-all"),
    );
    assert!(line < catch_all, "the operator's line comes before the catch-all:\n{hba}");

    // A proxy with cert_login's certificate logs in to postgres with it (no password: the
    // userlist's is for clients only), and as cert_other with that user's own certificate
    // ([users.cert_other]); one without them gets postgres' refusal, passed on.
    let users = [("cert_login", "client pw"), ("cert_other", "other pw")];
    let file = |name: &str| certs.join(name).display().to_string();
    let cert_login = format!(
        "[tls]\nserver_tls = \"require\"\nserver_cert = {:?}\nserver_key = {:?}\n",
        file("cert_login.crt"),
        file("cert_login.key")
    );
    let cert_other = format!(
        "[users.cert_other]\nserver_cert = {:?}\nserver_key = {:?}\n",
        file("cert_other.crt"),
        file("cert_other.key")
    );
    let section = format!("{cert_login}{cert_other}");
    let with = start_proxy_for(&c, "proxy-server-cert", &users, &section).await;
    let through = with.dsn_with("cert_login", "client%20pw", "&sslmode=disable");
    let dn = wait_for("a login through the proxy", Duration::from_secs(20), || {
        let dsn = through.clone();
        async move { psql(&dsn, "select client_dn from pg_stat_ssl where pid = pg_backend_pid()").ok() }
    })
    .await;
    assert_eq!(dn, "/CN=cert_login", "the proxy's connection to postgres carries the certificate");
    let other = with.dsn_with("cert_other", "other%20pw", "&sslmode=disable");
    let dn = psql(&other, "select client_dn from pg_stat_ssl where pid = pg_backend_pid()").unwrap();
    assert_eq!(dn, "/CN=cert_other", "cert_other's own certificate");
    // A client that stays connected across a reload that takes cert_other's certificate away:
    // the reload replaces the server connections, and the next one, opened with the TLS in
    // force (cert_login's certificate for everyone), is refused by postgres.
    let held = pgkeel_testkit::connect(&other).await.unwrap();
    held.simple_query("select 1").await.unwrap();
    let config = c.dir().join("proxy-server-cert").join("proxy.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(&cert_other, "")).unwrap();
    with.signal(libc::SIGHUP);
    let err = wait_for("the held client's next transaction to be refused", Duration::from_secs(15), || {
        let held = &held;
        async move { held.simple_query("select 1").await.err() }
    })
    .await;
    let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_else(|| err.to_string());
    assert!(message.contains("certificate authentication failed for user \"cert_other\""), "{message}");
    let err = psql(&with.dsn_with("cert_login", "wrong", "&sslmode=disable"), "select 1").unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"cert_login\""),
        "the client still needs its password: {err}"
    );
    let without = start_proxy_for(&c, "proxy-no-server-cert", &users, "[tls]\nserver_tls = \"require\"\n").await;
    let err = psql(&without.dsn_with("cert_login", "client%20pw", "&sslmode=disable"), "select 1").unwrap_err();
    assert!(err.contains("connection requires a valid client certificate"), "postgres' refusal: {err}");
}

/// `[tls] server_crl` with `server_tls = "verify-full"`: a revocation list of `server_ca`'s CA
/// that lists postgres' certificate keeps the proxy from logging in to it, with an error that
/// says so. The list is read again on SIGHUP, and a reload that changes the server side of
/// `[tls]` replaces the server connections already open, so a revocation reaches them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crl_refuses_a_revoked_postgres_certificate() {
    let c = Cluster::up(bin(), 1).await;
    let leader = c.leader().await.expect("a leader").0;
    // Postgres gets a certificate of the test's own CA (serial 7): the files `pgkeel up` made
    // get new contents (their owner and mode stay, as postgres wants them), and a reload.
    let certs = c.dir().join("server-certs");
    let ca = TestCa::new(&certs, "pgkeel tests server CA", "servers-ca.crt");
    ca.leaf("server", "postgres server", 7, &["127.0.0.1", "localhost"]);
    ca.crl("others-revoked.crl", &[99]);
    ca.crl("server-revoked.crl", &[99, 7]);
    for file in ["server.crt", "server.key"] {
        std::fs::write(c.dir().join("tls").join(file), std::fs::read(certs.join(file)).unwrap()).unwrap();
    }
    let node = c.node_dsn(&leader);
    psql(&node, "select pg_reload_conf()").unwrap();
    let server_ca = certs.join("servers-ca.crt").display().to_string();
    let direct = format!("{node}?sslmode=verify-full&sslrootcert={server_ca}");
    wait_for("postgres to present the new certificate", Duration::from_secs(20), || {
        let dsn = direct.clone();
        async move { psql(&dsn, "select 1").ok() }
    })
    .await;

    let crl = c.dir().join("servers-now.crl");
    std::fs::copy(certs.join("others-revoked.crl"), &crl).unwrap();
    let p = start_proxy(
        &c,
        "proxy-server-crl",
        &format!(
            "[tls]\nserver_tls = \"verify-full\"\nserver_ca = {server_ca:?}\nserver_crl = {:?}\n",
            crl.display().to_string()
        ),
    )
    .await;
    let su = password(&c);
    let through = p.dsn_with("postgres", &su, "&sslmode=disable");
    let pid = wait_for("a login through the proxy", Duration::from_secs(20), || {
        let dsn = through.clone();
        async move { psql(&dsn, "select pg_backend_pid()").ok() }
    })
    .await;
    assert_eq!(psql(&through, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").unwrap(), "t");
    let backend_alive = format!("select count(*) from pg_stat_activity where pid = {pid}");
    assert_eq!(psql(&direct, &backend_alive).unwrap(), "1", "the pooled server connection is open");

    // The list now revokes postgres' certificate: the pooled connection is closed at the
    // reload, and no new one can be opened.
    std::fs::copy(certs.join("server-revoked.crl"), &crl).unwrap();
    p.signal(libc::SIGHUP);
    wait_for("the pooled server connection to close", Duration::from_secs(15), || {
        let (dsn, sql) = (direct.clone(), backend_alive.clone());
        async move { (psql(&dsn, &sql).ok()? == "0").then_some(()) }
    })
    .await;
    wait_for("the reconnect in the proxy's log", Duration::from_secs(10), || {
        let log = p.log_text();
        async move { log.contains("the TLS towards servers changed").then_some(()) }
    })
    .await;
    let err = psql(&through, "select 1").unwrap_err();
    assert!(
        err.contains("TLS handshake with") && err.contains("Revoked") && err.contains("tls.server_crl lists"),
        "a revoked server certificate: {err}"
    );

    // Lifted again: the proxy logs in.
    std::fs::copy(certs.join("others-revoked.crl"), &crl).unwrap();
    p.signal(libc::SIGHUP);
    wait_for("a login after the revocation is lifted", Duration::from_secs(15), || {
        let dsn = through.clone();
        async move { psql(&dsn, "select 1").ok() }
    })
    .await;
    // A file that is not a revocation list: the reload is refused, naming the key, and the
    // list in force stays.
    std::fs::write(&crl, "not a revocation list\n").unwrap();
    p.signal(libc::SIGHUP);
    wait_for("the refused reload in the log", Duration::from_secs(15), || {
        let log = p.log_text();
        async move { log.lines().any(|l| l.contains("reload refused") && l.contains("tls.server_crl")).then_some(()) }
    })
    .await;
    assert_eq!(psql(&through, "select 1").unwrap(), "1", "the TLS in force stayed");
}
