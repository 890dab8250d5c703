//! `pgkeel proxy` in front of a real cluster, with real clients (psql, pgbench,
//! tokio-postgres, and a raw protocol client): pooling, authentication, bad clients,
//! protocol-level prepared statements in transaction mode, read/write splitting,
//! read-your-writes, and following the primary through a node kill.

use std::io::{Read, Write};

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeel_proxy::bytes::{Bytes, BytesMut};
use pgkeel_proxy::protocol::{
    Authentication, BackendDecoder, BackendMessage, Bind, FrontendMessage, Parse, StartupMessage, StartupPacket,
    Target, Text,
};
use pgkeel_proxy::scram::{ClientCredential, ClientExchange};
use pgkeel_testkit::{psql, wait_for, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

mod proxy_support;

use proxy_support::{bin, free_port, Proxy};

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    pgkeel_testkit::connect(dsn).await
}

/// How many sessions `pg_stat_activity` shows that match `filter` (an SQL condition).
async fn sessions(client: &tokio_postgres::Client, filter: &str) -> Option<u64> {
    one(client, &format!("select count(*)::text from pg_stat_activity where {filter}")).await.ok()??.parse().ok()
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

/// [`one`] that must succeed; "" for no row or NULL.
async fn answer(client: &tokio_postgres::Client, sql: &str) -> String {
    one(client, sql).await.unwrap_or_else(|e| panic!("{sql}: {}", text(&e))).unwrap_or_default()
}

/// An error's text, with the server's message and SQLSTATE when there is one.
fn text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn pgbench(p: &Proxy, args: &[&str]) -> String {
    let out = p.pgbench(args).output().expect("run pgbench");
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

    // A large result (about 6 MB, many reads on the way) arrives as it does
    // directly, byte for byte, in both protocols; the session goes on afterwards.
    let big = "select g, md5(g::text) || repeat('-', g % 50) from generate_series(1, 100000) g";
    let direct = connect(&c.node_dsn(&leader)).await.unwrap();
    let rows = |m: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        m.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("{}|{}", r.get(0)?, r.get(1)?)),
                _ => None,
            })
            .collect()
    };
    let want = rows(direct.simple_query(big).await.unwrap());
    assert_eq!(want.len(), 100_000);
    assert!(rows(client.simple_query(big).await.unwrap()) == want, "simple protocol: the large result differs");
    let extended: Vec<String> = client
        .query(big, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{}|{}", r.get::<_, i32>(0), r.get::<_, String>(1)))
        .collect();
    assert!(extended == want, "extended protocol: the large result differs");
    // A client that stops reading: once its socket is full the proxy keeps the rest (and
    // stops reading from the server, which then waits to write), and sends it on in order
    // when the client reads again. About 30 MB, more than the sockets' buffers hold.
    let mut slow = Raw::connect(&p).await;
    let rows_n = 400_000;
    slow.send(&[query(&format!(
        "select g, repeat(chr(65 + g % 26), 40 + g % 50) from generate_series(1, {rows_n}) g"
    ))])
    .await;
    wait_for("the server to wait on the proxy, which waits on the stalled client", Duration::from_secs(30), || async {
        (sessions(&direct, "wait_event = 'ClientWrite' and query like 'select g, repeat%'").await? > 0).then_some(())
    })
    .await;
    let mut next = 1;
    loop {
        match slow.recv().await {
            BackendMessage::DataRow(v) => {
                let col = |i: usize| String::from_utf8_lossy(v[i].as_deref().unwrap_or_default()).into_owned();
                let pad = char::from(b'A' + (next % 26) as u8).to_string().repeat(40 + next % 50);
                assert_eq!((col(0), col(1)), (next.to_string(), pad), "stalled client: row {next}");
                next += 1;
            }
            BackendMessage::ReadyForQuery(_) => break,
            BackendMessage::RowDescription(_) | BackendMessage::CommandComplete { .. } => {}
            other => panic!("unexpected answer to the large query: {other:?}"),
        }
    }
    assert_eq!(next, rows_n + 1, "stalled client: every row arrived");
    // A large COPY FROM STDIN (about 20 MB) sent in one burst while the table is locked: the
    // proxy's buffer for the server fills up while the client's data waits in it and in the
    // sockets; once the lock is gone all of it reaches the server, its end too, which comes
    // when that buffer is full and the client has nothing more to send.
    psql(&p.dsn(), "create table copied(id int, v text)").unwrap();
    let locker = connect(&c.node_dsn(&leader)).await.unwrap();
    locker.batch_execute("begin; lock table copied in access exclusive mode").await.unwrap();
    let mut copier = Raw::connect(&p).await;
    let copy_n = 200_000;
    let mut data = vec![query("copy copied from stdin")];
    data.extend((0..copy_n).map(|i| FrontendMessage::CopyData(Bytes::from(format!("{i}\t{}\n", "x".repeat(90))))));
    data.push(FrontendMessage::CopyDone);
    let sending = tokio::spawn(async move {
        copier.send(&data).await;
        copier
    });
    wait_for("the COPY to wait for the lock", Duration::from_secs(30), || async {
        (sessions(&direct, "wait_event_type = 'Lock' and query like 'copy copied%'").await? > 0).then_some(())
    })
    .await;
    locker.batch_execute("commit").await.unwrap();
    let mut copier = sending.await.unwrap();
    assert_eq!(copier.answers(1).await, "G C ZI");
    assert_eq!(one(&client, "select count(*) from copied").await.unwrap(), Some(copy_n.to_string()));
    assert_eq!(one(&client, "select 3").await.unwrap().as_deref(), Some("3"));

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

    // A cancel from a client with no query running reaches nobody, even while another
    // client runs one (maybe on the server connection the first one used last).
    let idle = connect(&p.dsn()).await.unwrap();
    one(&idle, "select 1").await.unwrap();
    let idle_token = idle.cancel_token();
    let busy = connect(&p.dsn()).await.unwrap();
    let sleeping = tokio::spawn(async move {
        busy.simple_query("/* pgkeel:primary */ select pg_sleep(2), 'busy-sleeper'").await.map(|_| ())
    });
    wait_for("the other client's query to run", Duration::from_secs(10), || async {
        let sql = "/* pgkeel:primary */ select count(*) from pg_stat_activity \
                   where query like '%busy-sleeper%' and pid <> pg_backend_pid() and state = 'active'";
        let n = one(&client, sql).await.ok()??;
        (n != "0").then_some(())
    })
    .await;
    idle_token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    sleeping.await.unwrap().expect("another client's cancel does not stop this query");

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

    // A client that leaves while its one statement runs gives the connection up at once (it
    // is closed, as it owes an answer), not when the statement ends: the next client is
    // served within query_wait_timeout.
    let leader = c.leader().await.expect("a leader");
    let direct = connect(&c.node_dsn(&leader.0)).await.unwrap();
    let mut leaver = Raw::connect(&p).await;
    leaver.send(&[query("select pg_sleep(60) /* leaver */")]).await;
    wait_for("the leaver's statement to run", Duration::from_secs(30), || async {
        (sessions(&direct, "query like 'select pg_sleep(60) /* leaver */%'").await? > 0).then_some(())
    })
    .await;
    drop(leaver);
    let next = connect(&p.dsn()).await.unwrap();
    assert_eq!(one(&next, "select 'after the leaver'").await.unwrap().as_deref(), Some("after the leaver"));

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
    // Continuous pgbench too: 16 clients of one-statement write transactions (extended
    // protocol), at 400 a second in all, so that a client is between transactions most of the
    // time, as an application's are. A client whose transaction is in flight when the node
    // dies (or reaches a backend in the milliseconds it takes to notice) loses its connection,
    // and pgbench ends that client ("aborted"); the others have to carry on.
    psql(&p.dsn(), "create table pb(id bigserial primary key, client int not null, term bigint not null)").unwrap();
    let logs = tempfile::tempdir().expect("a log dir");
    let bench = rated_pgbench(
        &p,
        logs.path(),
        "insert into pb(client, term) values (:client_id, current_setting('pgkeel.term')::bigint);",
        20,
    );
    let pb_rows = |term: u64, min: i64| {
        let dsn = p.dsn();
        async move {
            let sql = format!("select count(*) from pb where term = {term}");
            (psql(&dsn, &sql).ok()?.parse::<i64>().ok()? >= min).then_some(())
        }
    };
    wait_for("pgbench transactions through the proxy", Duration::from_secs(15), || pb_rows(old_term, 400)).await;

    let killed = Instant::now();
    let killed_us = unix_us();
    c.kill_node(&old);
    let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(30)).await;
    assert!(new_term > old_term);
    wait_for("pgbench transactions on the new primary", Duration::from_secs(20), || pb_rows(new_term, 400)).await;
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

    // pgbench: ends with status 0, or 2 if a client was aborted, and only the clients whose
    // transaction was in flight (0 to 4 of them measured) may have been.
    let (aborted, out) = rated_pgbench_end(bench).await;
    let direct = c.node_dsn(&new);
    let survivors: i64 = psql(&direct, &format!("select count(distinct client) from pb where term = {new_term}"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(survivors, 16 - aborted.len() as i64, "every client not aborted wrote on the new primary:\n{out}");
    // Terms only move forward, for pgbench too: no row under the old term after (by the
    // sequence) a row under the new one.
    let late_old: i64 = psql(
        &direct,
        &format!(
            "select count(*) from pb where term = {old_term} and id > (select min(id) from pb where term = {new_term})"
        ),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert_eq!(late_old, 0, "an old-term row after a new-term one");
    let terms: i64 = psql(&direct, &format!("select count(*) from pb where term not in ({old_term}, {new_term})"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(terms, 0, "only the two terms served pgbench's writes");
    // The write outage pgbench saw: the longest time without a commit, which starts at the
    // kill (give or take the transactions in flight then).
    let ends: Vec<u64> = pgbench_log(logs.path()).into_iter().map(|(_, end)| end).collect();
    let (from, outage) = ends
        .windows(2)
        .map(|w| (w[0], Duration::from_micros(w[1] - w[0])))
        .max_by_key(|&(_, gap)| gap)
        .expect("pgbench transactions");
    eprintln!(
        "pgbench through the kill: {} transactions, {} of 16 clients aborted, longest time without a commit \
         {outage:?}, from {:?} after the kill",
        ends.len(),
        aborted.len(),
        Duration::from_micros(from.saturating_sub(killed_us))
    );
    assert!(from + 1_000_000 > killed_us, "the longest time without a commit began before the kill");
    assert!(outage < Duration::from_secs(4 + 6), "write outage through the proxy for pgbench: {outage:?}");
}

/// A three-node cluster, its leader, and its two replicas once both stream from it.
async fn three_streaming() -> (Cluster, String, Vec<String>) {
    let c = Cluster::up(bin(), 3).await;
    let (leader, _) = c.leader().await.expect("a leader");
    let replicas: Vec<String> = c.nodes().into_iter().filter(|n| *n != leader).collect();
    c.wait_streaming(&leader, &replicas, Duration::from_secs(60)).await;
    (c, leader, replicas)
}

/// Reads through the proxy while a replica's node is killed: only the reads in flight on it
/// fail; the others carry on, on the other replica or the primary, without a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_through_a_replica_kill() {
    let (c, _leader, replicas) = three_streaming().await;
    let p = Proxy::start(&c, "proxy", "").await;
    // One-row reads (extended protocol), 400 a second in all, for 12 s.
    let logs = tempfile::tempdir().expect("a log dir");
    let bench = rated_pgbench(&p, logs.path(), "select pg_is_in_recovery();", 12);
    // The replica to kill serves reads (the proxy's connections to it are open).
    let victim = replicas[0].clone();
    let direct = c.node_dsn(&victim);
    wait_for("reads through the proxy on the replica", Duration::from_secs(15), || async {
        let sql =
            "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()";
        (psql(&direct, sql).ok()?.parse::<i64>().ok()? >= 2).then_some(())
    })
    .await;
    let killed_us = unix_us();
    c.kill_node(&victim);
    let (aborted, out) = rated_pgbench_end(bench).await;
    // Every client pgbench kept read after the kill, and reads never stopped for long.
    let log = pgbench_log(logs.path());
    let after: std::collections::HashSet<u64> =
        log.iter().filter(|&&(_, end)| end > killed_us + 1_000_000).map(|&(client, _)| client).collect();
    let ends: Vec<u64> = log.iter().map(|&(_, end)| end).collect();
    let gap = ends.windows(2).map(|w| Duration::from_micros(w[1] - w[0])).max().unwrap_or_default();
    eprintln!(
        "reads through a replica kill: {} transactions, {} of 16 clients aborted, {} read after it, longest time \
         without a read {gap:?}",
        ends.len(),
        aborted.len(),
        after.len()
    );
    assert_eq!(after.len(), 16 - aborted.len(), "every client not aborted read after the kill:\n{out}");
    assert!(gap < Duration::from_secs(2), "reads stopped for {gap:?}");
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// `pgbench` through `p` running `sql` as its only script, 16 clients, 400 transactions a
/// second in all (so that a client is between transactions most of the time, as an
/// application's are), for `seconds`, with per-transaction logs in `dir`.
fn rated_pgbench(p: &Proxy, dir: &std::path::Path, sql: &str, seconds: u32) -> std::process::Child {
    let script = dir.join("script.sql");
    std::fs::write(&script, format!("{sql}\n")).expect("write the pgbench script");
    let prefix = dir.join("pgb").display().to_string();
    // Temporary paths hold no spaces.
    let args =
        format!("-n -c 16 -j 2 -T {seconds} -R 400 -M extended --log --log-prefix {prefix} -f {}", script.display());
    p.pgbench(args.split_whitespace()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start pgbench")
}

/// Waits for a [`rated_pgbench`]: it must end with status 0, or 2 when clients were aborted,
/// and at most half of them may have been. The aborted clients' lines ("client 3 script 0
/// aborted in command 0 query 0: FATAL: ..."), printed, and the whole output.
async fn rated_pgbench_end(bench: std::process::Child) -> (Vec<String>, String) {
    let (status, out) = tokio::task::spawn_blocking(move || {
        let out = bench.wait_with_output().expect("wait for pgbench");
        (out.status, String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    })
    .await
    .unwrap();
    let aborted: Vec<String> = out.lines().filter(|l| l.contains(" aborted in command ")).map(String::from).collect();
    for l in &aborted {
        eprintln!("{l}");
    }
    assert!(matches!(status.code(), Some(0 | 2)), "pgbench failed ({status}):\n{out}");
    assert!(aborted.len() <= 8, "{} of 16 pgbench clients aborted:\n{out}", aborted.len());
    (aborted, out)
}

/// (client, when it ended in unix µs) of each transaction in a [`rated_pgbench`]'s logs
/// (`--log`: client, transaction, latency µs, script, epoch s, µs, schedule lag), by end.
fn pgbench_log(dir: &std::path::Path) -> Vec<(u64, u64)> {
    let mut ends = Vec::new();
    for e in std::fs::read_dir(dir).expect("read the log dir").flatten() {
        if !e.file_name().to_string_lossy().starts_with("pgb") {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap_or_default().lines() {
            let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if f.len() >= 6 {
                ends.push((f[0], f[4] * 1_000_000 + f[5]));
            }
        }
    }
    ends.sort_unstable_by_key(|&(_, end)| end);
    ends
}

/// A raw protocol client, for what libpq and tokio-postgres never send: a duplicate statement
/// name, a Bind of an unknown statement, several batches in one write.
struct Raw {
    stream: tokio::net::TcpStream,
    buf: BytesMut,
}

/// One server answer, short: the message tag, with the SQLSTATE for an error and the value
/// of a one-column row.
fn short(m: &BackendMessage) -> String {
    match m {
        BackendMessage::ErrorResponse(e) => format!("E{}", e.code().map(|c| c.to_string()).unwrap_or_default()),
        BackendMessage::DataRow(v) => {
            format!(
                "D{}",
                v.first().cloned().flatten().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
            )
        }
        BackendMessage::ReadyForQuery(s) => format!("Z{}", s.byte() as char),
        other => (other.tag() as char).to_string(),
    }
}

impl Raw {
    async fn connect(p: &Proxy) -> Raw {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", p.port)).await.expect("connect to the proxy");
        let mut raw = Raw { stream, buf: BytesMut::new() };
        let mut out = BytesMut::new();
        StartupPacket::Startup(StartupMessage::new([("user", "postgres"), ("database", "postgres")])).encode(&mut out);
        raw.stream.write_all(&out).await.unwrap();
        let mut scram: Option<ClientExchange> = None;
        loop {
            let reply = match raw.recv().await {
                BackendMessage::Authentication(Authentication::Sasl { .. }) => {
                    let ex = ClientExchange::new(ClientCredential::Password(p.password.clone())).unwrap();
                    let first = ex.client_first();
                    scram = Some(ex);
                    Some(FrontendMessage::SaslInitialResponse {
                        mechanism: "SCRAM-SHA-256".into(),
                        data: Some(Bytes::from(first)),
                    })
                }
                BackendMessage::Authentication(Authentication::SaslContinue(d)) => {
                    let fin = scram.as_mut().unwrap().server_first(&d).unwrap();
                    Some(FrontendMessage::SaslResponse(Bytes::from(fin)))
                }
                BackendMessage::ReadyForQuery(_) => break,
                BackendMessage::ErrorResponse(e) => panic!("login failed: {e:?}"),
                _ => None,
            };
            if let Some(r) = reply {
                raw.send(&[r]).await;
            }
        }
        raw
    }

    async fn send(&mut self, msgs: &[FrontendMessage]) {
        let mut out = BytesMut::new();
        for m in msgs {
            m.encode(&mut out);
        }
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> BackendMessage {
        let decoder = BackendDecoder::default();
        loop {
            if let Some(m) = decoder.decode(&mut self.buf).expect("a valid message from the proxy") {
                return m;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "the proxy closed the connection");
        }
    }

    /// The answers up to the `n`th ReadyForQuery, short, joined with spaces.
    async fn answers(&mut self, mut n: usize) -> String {
        let mut seen = Vec::new();
        while n > 0 {
            let m = self.recv().await;
            if matches!(m, BackendMessage::ReadyForQuery(_)) {
                n -= 1;
            }
            if !matches!(m, BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus { .. }) {
                seen.push(short(&m));
            }
        }
        seen.join(" ")
    }
}

fn parse(name: &str, query: &str) -> FrontendMessage {
    FrontendMessage::Parse(Parse { name: Text::lossy(name), query: Text::lossy(query), param_types: vec![] })
}

fn bind(statement: &str, params: &[&str]) -> FrontendMessage {
    FrontendMessage::Bind(Bind {
        portal: Text::lossy(""),
        statement: Text::lossy(statement),
        param_formats: vec![],
        params: params.iter().map(|p| Some(Bytes::copy_from_slice(p.as_bytes()))).collect(),
        result_formats: vec![],
    })
}

fn execute() -> FrontendMessage {
    FrontendMessage::Execute { portal: Text::lossy(""), max_rows: 0 }
}

fn query(sql: &str) -> FrontendMessage {
    FrontendMessage::Query(Text::lossy(sql))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_prepared_statements_in_transaction_mode() {
    let c = Cluster::up(bin(), 1).await;
    c.leader().await.expect("a leader");
    // Two server connections and room for 3 statements on each: consecutive transactions of
    // a client change server connections, and statements are evicted and prepared again.
    let p = Proxy::start(&c, "prepared", "pool_size = 2\nmax_prepared_statements = 3").await;
    psql(&p.dsn(), "create table kv(k int primary key, v text)").unwrap();

    // tokio-postgres: a statement prepared once, used from transactions that run on
    // different server connections (another client holds one of the two in between).
    let a = connect(&p.dsn()).await.unwrap();
    let b = connect(&p.dsn()).await.unwrap();
    let stmt = a.prepare("select pg_backend_pid(), $1::int + 1").await.unwrap();
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..12i32 {
        if i % 3 == 1 {
            b.simple_query("begin; select 1").await.unwrap();
        }
        let row = a.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i + 1);
        pids.insert(row.get::<_, i32>(0));
        if i % 3 == 1 {
            b.simple_query("commit").await.unwrap();
        }
    }
    assert!(pids.len() >= 2, "the statement ran on several server connections: {pids:?}");
    // More statements than a server connection keeps: evicted ones are prepared again.
    let stmts: Vec<_> = futures_prepare(&a, 8).await;
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = a.query_one(s, &[]).await.unwrap().get(0);
            assert_eq!(v, i as i32 + 100, "round {round}");
        }
    }
    // A statement that does not prepare: the error, and the client goes on.
    let e = a.prepare("select * from no_such_table").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE), "{e}");
    assert_eq!(a.query_one(&stmt, &[&41i32]).await.unwrap().get::<_, i32>(1), 42);
    // Inside a transaction, then an error inside one.
    {
        let mut a2 = connect(&p.dsn()).await.unwrap();
        let ins = a2.prepare("insert into kv values ($1, $2)").await.unwrap();
        let tx = a2.transaction().await.unwrap();
        tx.execute(&ins, &[&1i32, &"one"]).await.unwrap();
        let e = tx.execute(&ins, &[&1i32, &"again"]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION));
        tx.rollback().await.unwrap();
        a2.execute(&ins, &[&2i32, &"two"]).await.unwrap();
    }
    assert_eq!(one(&a, "select string_agg(v, ',') from kv").await.unwrap().as_deref(), Some("two"));

    // The testkit's writer (tokio-postgres, parameterised statements) through the proxy.
    psql(&p.dsn(), "create table acked(id bigint primary key, term bigint not null)").unwrap();
    let writer = pgkeel_testkit::Writer::start(p.dsn(), Duration::from_millis(10));
    wait_for("50 writes through the proxy", Duration::from_secs(20), || async {
        (writer.acked_count() >= 50).then_some(())
    })
    .await;
    let report = writer.stop().await;
    assert_eq!(report.errors, 0, "writer errors through the proxy");
    let rows: usize = psql(&p.dsn(), "select count(*) from acked").unwrap().parse().unwrap();
    assert_eq!(rows, report.acked.len());

    // Raw protocol: what drivers rarely do.
    let mut r = Raw::connect(&p).await;
    // Parse, Bind, Execute in one batch; then the statement from later batches.
    r.send(&[parse("s1", "select $1::int * 2"), bind("s1", &["21"]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 D42 C ZI");
    // Two batches in one write, the second on a server connection that may lack s1.
    r.send(&[
        bind("s1", &["1"]),
        execute(),
        FrontendMessage::Sync,
        bind("s1", &["2"]),
        execute(),
        FrontendMessage::Sync,
    ])
    .await;
    assert_eq!(r.answers(2).await, "2 D2 C ZI 2 D4 C ZI");
    // A duplicate name: 42P05, the rest of the batch skipped up to its Sync.
    r.send(&[parse("s1", "select 1"), bind("s1", &["3"]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "E42P05 ZI");
    // An unknown statement: 26000.
    r.send(&[bind("nope", &[]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "E26000 ZI");
    // Describe of a named statement.
    r.send(&[FrontendMessage::Describe { target: Target::Statement, name: Text::lossy("s1") }, FrontendMessage::Sync])
        .await;
    assert_eq!(r.answers(1).await, "t T ZI");
    // A server error in the middle of a batch: the statements parsed after it do not exist.
    r.send(&[
        parse("s2", "select 1 / (random() * 0)::int"),
        bind("s2", &[]),
        execute(),
        parse("s3", "select 3"),
        FrontendMessage::Sync,
        bind("s3", &[]),
        execute(),
        FrontendMessage::Sync,
    ])
    .await;
    assert_eq!(r.answers(2).await, "1 2 E22012 ZI E26000 ZI");
    // s2 exists (its Parse succeeded); s3 can now be prepared.
    r.send(&[parse("s3", "select 3"), bind("s3", &[]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 D3 C ZI");
    // Close: answered by the proxy; the name is free again.
    r.send(&[FrontendMessage::Close { target: Target::Statement, name: Text::lossy("s1") }, FrontendMessage::Sync])
        .await;
    assert_eq!(r.answers(1).await, "3 ZI");
    r.send(&[bind("s1", &["1"]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "E26000 ZI");
    r.send(&[parse("s1", "select 'again'"), bind("s1", &[]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 Dagain C ZI");
    // A named statement inside an explicit transaction, across Sync boundaries.
    r.send(&[query("begin")]).await;
    assert_eq!(r.answers(1).await, "C ZT");
    r.send(&[bind("s3", &[]), execute(), FrontendMessage::Sync, query("commit")]).await;
    assert_eq!(r.answers(2).await, "2 D3 C ZT C ZI");
    // The proxy still answers plain queries.
    r.send(&[query("select 5")]).await;
    assert_eq!(r.answers(1).await, "T D5 C ZI");
    // Unnamed statements, as pgbench's `extended` mode, JDBC and psycopg send them: each unit
    // whole, several in one write, an error in one, a Describe of the portal, a unit mixing
    // in a named statement, and a unit whose Sync comes in a later write.
    let unnamed = |sql: &str, param: &str| [parse("", sql), bind("", &[param]), execute(), FrontendMessage::Sync];
    r.send(&unnamed("select $1::int + 1", "1")).await;
    assert_eq!(r.answers(1).await, "1 2 D2 C ZI");
    let mut batch = unnamed("select $1::int * 10", "2").to_vec();
    batch.extend(unnamed("select 1 / $1::int", "0"));
    batch.extend(unnamed("select $1::text", "after"));
    r.send(&batch).await;
    // (The division by a constant zero fails at Bind, where the statement is planned.)
    assert_eq!(r.answers(3).await, "1 2 D20 C ZI 1 E22012 ZI 1 2 Dafter C ZI");
    // An answer in many reads (postgres flushes every 8 kB): the unit ends with its Sync's
    // ReadyForQuery, not before.
    r.send(&unnamed("select repeat('x', $1::int)", "300000")).await;
    assert_eq!(r.answers(1).await, format!("1 2 D{} C ZI", "x".repeat(300_000)));
    let portal = FrontendMessage::Describe { target: Target::Portal, name: Text::lossy("") };
    r.send(&[parse("", "select 7 as seven"), bind("", &[]), portal, execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 T D7 C ZI");
    r.send(&[parse("", "select 8"), bind("", &[]), execute(), bind("s3", &[]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 D8 C 2 D3 C ZI");
    r.send(&[parse("", "select 9"), bind("", &[]), execute()]).await;
    r.send(&[FrontendMessage::Sync]).await;
    assert_eq!(r.answers(1).await, "1 2 D9 C ZI");
    let fails = parse("", "select 1 / (random() * 0)::int");
    r.send(&[query("begin"), fails, bind("", &[]), execute(), FrontendMessage::Sync]).await;
    assert_eq!(r.answers(2).await, "C ZT 1 2 E22012 ZE");
    r.send(&[query("rollback")]).await;
    assert_eq!(r.answers(1).await, "C ZI");

    // pgbench in prepared mode through the small pool (statements evicted and prepared again)
    // and through a proxy with the default limits.
    // One pgbench thread per client: pgbench prepares a statement with a blocking PQprepare
    // (Parse, Sync) before its first use, and a thread blocked there waiting for a server
    // connection cannot finish the transactions of its other clients, which hold both server
    // connections. With `-j 1` that deadlocks the client every time (docs/proxy.md).
    pgbench(&p, &["-i", "-s", "1", "-q"]);
    let out = pgbench(&p, &["-c", "4", "-j", "4", "-T", "5", "-M", "prepared"]);
    assert_no_failed_transactions("prepared (pool_size 2, 3 statements per connection)", &out);
    let big = Proxy::start(&c, "prepared-default", "").await;
    let out = pgbench(&big, &["-c", "4", "-j", "2", "-T", "5", "-M", "prepared"]);
    assert_no_failed_transactions("prepared", &out);
}

/// Prepares `n` statements `select 100 + i`.
async fn futures_prepare(c: &tokio_postgres::Client, n: i32) -> Vec<tokio_postgres::Statement> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(c.prepare(&format!("select {}::int", 100 + i)).await.unwrap());
    }
    v
}

/// The port part of a node's DSN (`postgresql://...@127.0.0.1:PORT/...`).
fn dsn_port(dsn: &str) -> String {
    dsn.rsplit(':').next().and_then(|s| s.split(['/', '?']).next()).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_splits_reads_and_writes() {
    let (c, leader, replicas) = three_streaming().await;
    let port_of = |n: &str| dsn_port(&c.node_dsn(n));
    let primary_port = port_of(&leader);
    // Functions for the catalog check below, made before the proxy starts (it reads a
    // database's list when its first pool appears, and again every 30 s).
    psql(
        &c.node_dsn(&leader),
        "create table ft(i int); \
         create function vol_read() returns bool language sql as 'select pg_is_in_recovery()'; \
         create function stable_read() returns bool stable language sql as 'select pg_is_in_recovery()'; \
         create function add_row(n int) returns bool language sql as \
           'insert into ft values (n); select pg_is_in_recovery()'; \
         create schema app2; \
         create function app2.pick() returns bool language sql as 'select pg_is_in_recovery()'",
    )
    .unwrap();
    let p = Proxy::start(
        &c,
        "split",
        "max_replica_lag = \"1MB\"\nprimary_functions = [\"app_bump\"]\nreplica_functions = [\"app2.pick\"]",
    )
    .await;
    // The same proxy.toml with the other two listeners.
    let replica_port = free_port();
    let primary_only = free_port();
    let both = Proxy::start(
        &c,
        "listeners",
        &format!("listen_replica = \"127.0.0.1:{replica_port}\"\nlisten_primary = \"127.0.0.1:{primary_only}\""),
    )
    .await;
    psql(&p.dsn(), "create table t(id int primary key, v text); create sequence s").unwrap();
    psql(&p.dsn(), "create function app_bump() returns int language sql as 'select 1'").unwrap();
    // Reads reach replicas once the proxy has seen them streaming (six in a row: both
    // replicas, round robin).
    let client = connect(&p.dsn()).await.unwrap();
    wait_for("reads on both replicas through the auto listener", Duration::from_secs(30), || async {
        for _ in 0..6 {
            if one(&client, "select pg_is_in_recovery()").await.ok()?.as_deref() != Some("t") {
                return None;
            }
        }
        Some(())
    })
    .await;
    let in_recovery = |sql: &'static str| answer(&client, sql);
    assert_eq!(in_recovery("select pg_is_in_recovery()").await, "t", "a plain read");
    assert_eq!(in_recovery("/* pgkeel:primary */ select pg_is_in_recovery()").await, "f", "the comment override");
    assert_eq!(in_recovery("select pg_is_in_recovery(); select 1").await, "t", "reads in one string");
    // Statements that write, on a client of their own: after a write, read-your-writes sends
    // a client's reads to the primary until a replica has replayed it, so `client`'s reads
    // below would depend on how fast the replicas replay (CI, 2026-11-22, a loaded machine).
    let writer = connect(&p.dsn()).await.unwrap();
    let on_writer = |sql: &'static str| answer(&writer, sql);
    assert_eq!(on_writer("select pg_is_in_recovery() from (select nextval('s')) n").await, "f", "nextval");
    assert_eq!(on_writer("select pg_is_in_recovery(), app_bump()").await, "f", "a configured function");
    assert_eq!(on_writer("select pg_is_in_recovery() from t for update").await, "", "FOR UPDATE (no rows)");
    // Inside an explicit transaction everything goes to the primary; BEGIN READ ONLY reads on
    // a replica. (The former on the writing client: a transaction on the primary counts as a
    // write for read-your-writes, and `client`'s next reads would wait for the replicas to
    // replay the primary's position at its COMMIT, CI, 2026-11-25.)
    writer.simple_query("begin").await.unwrap();
    assert_eq!(on_writer("select pg_is_in_recovery()").await, "f", "inside BEGIN");
    writer.simple_query("commit").await.unwrap();
    client.simple_query("begin read only").await.unwrap();
    assert_eq!(in_recovery("select pg_is_in_recovery()").await, "t", "inside BEGIN READ ONLY");
    client.simple_query("commit").await.unwrap();
    // Extended protocol: classified at Parse; the statement follows the client.
    let stmt = client.prepare("select pg_is_in_recovery()").await.unwrap();
    assert!(client.query_one(&stmt, &[]).await.unwrap().get::<_, bool>(0), "a prepared read on a replica");
    {
        let mut c2 = connect(&p.dsn()).await.unwrap();
        let tx = c2.transaction().await.unwrap();
        let r: bool = tx.query_one("select pg_is_in_recovery()", &[]).await.unwrap().get(0);
        assert!(!r, "in a transaction: the primary");
        tx.commit().await.unwrap();
        let n: i64 = c2.query_one("select nextval('s')", &[]).await.unwrap().get(0);
        assert!(n > 0);
    }
    // Unnamed statements in whole units (pgbench's `extended` mode, JDBC, psycopg): the same
    // routing. A client that only reads, and one that writes.
    let unit = |sql: &str| [parse("", sql), bind("", &[]), execute(), FrontendMessage::Sync];
    let mut reader = Raw::connect(&p).await;
    reader.send(&unit("select pg_is_in_recovery()")).await;
    assert_eq!(reader.answers(1).await, "1 2 Dt C ZI", "an unnamed read on a replica");
    let mut raw_writer = Raw::connect(&p).await;
    raw_writer.send(&unit("select pg_is_in_recovery() from (select nextval('s')) n")).await;
    assert_eq!(raw_writer.answers(1).await, "1 2 Df C ZI", "an unnamed nextval on the primary");
    let mut two = unit("select pg_is_in_recovery()").to_vec();
    two.extend(unit("select pg_is_in_recovery(), app_bump()"));
    reader.send(&two).await;
    assert_eq!(reader.answers(2).await, "1 2 Dt C ZI 1 2 Df C ZI", "a read and a write in one write");
    // SET pgkeel.route, answered by the proxy.
    client.simple_query("set pgkeel.route = primary").await.unwrap();
    assert_eq!(in_recovery("show pgkeel.route").await, "primary");
    assert_eq!(in_recovery("select pg_is_in_recovery()").await, "f", "SET pgkeel.route = primary");
    client.simple_query("set pgkeel.route to 'replica'").await.unwrap();
    assert_eq!(in_recovery("select pg_is_in_recovery()").await, "t");
    client.simple_query("reset pgkeel.route").await.unwrap();
    assert_eq!(in_recovery("show pgkeel.route").await, "auto");
    let e = client.simple_query("set pgkeel.route = sideways").await.unwrap_err();
    assert!(text(&e).contains("invalid value for pgkeel.route"), "{}", text(&e));
    // The same through the extended protocol (JDBC, Npgsql): a unit of its own is answered by
    // the proxy; a named statement, or the command inside another batch, gets an error.
    // A client of its own: one that wrote would read on the primary until the replicas
    // replayed its write (read-your-writes).
    let mut ext = Raw::connect(&p).await;
    let describe = || FrontendMessage::Describe { target: Target::Portal, name: Text::lossy("") };
    let route = |sql: &str| [parse("", sql), bind("", &[]), describe(), execute(), FrontendMessage::Sync];
    ext.send(&route("SET pgkeel.route = primary")).await;
    assert_eq!(ext.answers(1).await, "1 2 n C ZI", "SET pgkeel.route, extended");
    ext.send(&unit("select pg_is_in_recovery()")).await;
    assert_eq!(ext.answers(1).await, "1 2 Df C ZI", "a read after the extended SET: the primary");
    ext.send(&route("show pgkeel.route")).await;
    assert_eq!(ext.answers(1).await, "1 2 T Dprimary C ZI", "SHOW pgkeel.route, extended");
    ext.send(&[
        parse("", "show pgkeel.route"),
        FrontendMessage::Describe { target: Target::Statement, name: Text::lossy("") },
        FrontendMessage::Sync,
    ])
    .await;
    assert_eq!(ext.answers(1).await, "1 t T ZI", "Describe of the statement");
    ext.send(&route("set pgkeel.route = sideways")).await;
    assert_eq!(ext.answers(1).await, "1 2 n E22023 ZI", "a bad value: the statement's error");
    ext.send(&[parse("s1", "reset pgkeel.route"), FrontendMessage::Sync]).await;
    assert_eq!(ext.answers(1).await, "E0A000 ZI", "a named statement is refused");
    let mut batch = unit("select 1").to_vec();
    batch.pop();
    batch.extend(route("reset pgkeel.route"));
    ext.send(&batch).await;
    assert_eq!(ext.answers(1).await, "1 2 D1 C E0A000 ZI", "inside a batch: refused, the batch skipped");
    ext.send(&unit("select pg_is_in_recovery()")).await;
    assert_eq!(ext.answers(1).await, "1 2 Df C ZI", "still primary: nothing reset it");
    ext.send(&route("reset pgkeel.route")).await;
    assert_eq!(ext.answers(1).await, "1 2 n C ZI");
    ext.send(&unit("select pg_is_in_recovery()")).await;
    assert_eq!(ext.answers(1).await, "1 2 Dt C ZI", "after the extended RESET: a replica");
    // Volatile functions from the catalog go to the primary (a writing one works), stable
    // ones and those in replica_functions to replicas. A client that has not written.
    let funcs = connect(&p.dsn()).await.unwrap();
    assert_eq!(answer(&funcs, "select vol_read()").await, "f", "a volatile function: the primary");
    assert_eq!(answer(&funcs, "select stable_read()").await, "t", "a stable function: a replica");
    assert_eq!(answer(&funcs, "select app2.pick()").await, "t", "a volatile function in replica_functions");
    assert_eq!(answer(&funcs, "select x from (select public.vol_read() x) s").await, "f", "qualified, in a subquery");
    assert_eq!(answer(&funcs, "select add_row(1)").await, "f", "a volatile function that writes runs");
    assert_eq!(answer(&funcs, "select count(*)::text from ft").await, "1");
    // Writes work through the auto listener (they go to the primary).
    client.simple_query("insert into t values (1, 'a')").await.unwrap();
    // The replica and primary listeners.
    let on = |port: u16, sql: &str| {
        psql(&format!("postgresql://postgres:{}@127.0.0.1:{port}/postgres", both.password), sql).unwrap()
    };
    assert_eq!(on(replica_port, "select pg_is_in_recovery()"), "t", "the replica listener");
    assert_eq!(on(primary_only, "select pg_is_in_recovery()"), "f", "the primary listener");
    // Round robin: both replicas serve reads, the primary none. (A client that never wrote:
    // after a write, a client's reads prefer the replicas known to have replayed it.)
    let client = connect(&p.dsn()).await.unwrap();
    let port_now = || async { one(&client, "select inet_server_port()::text").await.unwrap().unwrap_or_default() };
    let mut ports = std::collections::BTreeMap::new();
    for _ in 0..20 {
        *ports.entry(port_now().await).or_insert(0) += 1;
    }
    eprintln!("reads by server port: {ports:?} (primary {primary_port})");
    assert!(!ports.contains_key(&primary_port), "no plain read on the primary: {ports:?}");
    assert_eq!(ports.len(), 2, "both replicas serve reads: {ports:?}");

    // A lagging replica (replay paused, then WAL written on the primary) stops getting reads.
    let lagging = &replicas[0];
    let lagging_port = port_of(lagging);
    psql(&c.node_dsn(lagging), "select pg_wal_replay_pause()").unwrap();
    psql(&p.dsn(), "create table filler as select g, repeat('x', 200) as pad from generate_series(1, 20000) g")
        .unwrap();
    let started = Instant::now();
    wait_for("the lagging replica to stop getting reads", Duration::from_secs(30), || async {
        for _ in 0..10 {
            if one(&client, "select inet_server_port()::text").await.ok()?? == lagging_port {
                return None;
            }
        }
        Some(())
    })
    .await;
    eprintln!("the paused replica {lagging} stopped getting reads after {:?}", started.elapsed());
    for _ in 0..30 {
        assert_ne!(port_now().await, lagging_port, "a read went to the paused replica");
    }
    psql(&c.node_dsn(lagging), "select pg_wal_replay_resume()").unwrap();
    wait_for("the resumed replica to get reads again", Duration::from_secs(30), || async {
        for _ in 0..10 {
            if one(&client, "select inet_server_port()::text").await.ok()?? == lagging_port {
                return Some(());
            }
        }
        None
    })
    .await;

    // Read-your-writes: each read right after a write sees it, wherever it runs.
    psql(&p.dsn(), "create table ryw(id int primary key)").unwrap();
    let rw = connect(&p.dsn()).await.unwrap();
    let mut on_replica = 0;
    let t0 = Instant::now();
    for i in 0..200 {
        rw.simple_query(&format!("insert into ryw values ({i})")).await.unwrap();
        let row =
            one(&rw, &format!("select count(*)::text || ' ' || pg_is_in_recovery()::text from ryw where id = {i}"))
                .await
                .unwrap()
                .unwrap_or_default();
        let (n, recovery) = row.split_once(' ').unwrap_or_default();
        assert_eq!(n, "1", "iteration {i}: the read did not see the write just committed ({row})");
        if recovery == "true" {
            on_replica += 1;
        }
    }
    eprintln!("read-your-writes: 200 write-then-read rounds in {:?}, {on_replica} reads on replicas", t0.elapsed());
}

/// `pgkeel up` runs a proxy in front of the cluster, saves its DSN in up.json, and `down`
/// stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_proxy_and_down_stops_it() {
    let c = Cluster::up(bin(), 2).await;
    let dsn = c.info["proxy"]["dsn"].as_str().expect("up.json names the proxy's DSN").to_string();
    let pid_file = PathBuf::from(c.info["proxy"]["pid_file"].as_str().unwrap());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    // Through the proxy: a write reaches the primary, a read a replica.
    wait_for("a write through the proxy", Duration::from_secs(20), || {
        let dsn = dsn.clone();
        async move { psql(&dsn, "create table via_proxy as select 1 as x").ok() }
    })
    .await;
    wait_for("a read through the proxy on a replica", Duration::from_secs(20), || {
        let dsn = dsn.clone();
        async move { (psql(&dsn, "select pg_is_in_recovery() from via_proxy").ok()? == "t").then_some(()) }
    })
    .await;
    let out = c.cli(&["down", "--dir", &c.dir().display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pgkeel_testkit::alive(pid), "down stopped the proxy");
    assert!(!pid_file.exists());
}
