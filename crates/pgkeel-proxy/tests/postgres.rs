//! The codec against a real PostgreSQL server: a raw unix-socket connection (trust
//! authentication, as `Instance::write_hba` configures for the local socket) speaks the
//! protocol through `pgkeel_proxy::protocol` only — startup, simple and extended queries,
//! transaction states, COPY in both directions, errors, notices, notifications and a cancel
//! request — and asserts the decoded answers. Everything the server sent is then decoded
//! again and must re-encode to the same bytes.
//!
//! The server lives in its own temporary directory on a free port and is stopped when the
//! test ends, also when it panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgkeel_pg::conf::ManagedConf;
use pgkeel_pg::control::Instance;
use pgkeel_pg::testing::{instance, tempdir, StopOnDrop};
use pgkeel_proxy::protocol::{
    field, Authentication, BackendDecoder, BackendMessage, Bind, CancelRequest, FrontendMessage, Parse, StartupMessage,
    StartupPacket, Target, Text, TransactionStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const T: Duration = Duration::from_secs(30);

async fn start_postgres(inst: &Instance) -> StopOnDrop {
    inst.initdb("unused-password").await.unwrap();
    let mut parameters = BTreeMap::new();
    parameters.insert("shared_buffers".to_string(), "16MB".to_string());
    parameters.insert("max_connections".to_string(), "10".to_string());
    parameters.insert("fsync".to_string(), "off".to_string());
    let conf = ManagedConf {
        listen_host: "127.0.0.1".into(),
        port: inst.port,
        socket_dir: inst.socket_dir.clone(),
        cluster_name: "pgkeel-proxy-test".into(),
        term: 1,
        primary_conninfo: None,
        primary_slot_name: None,
        synchronous_standby_names: String::new(),
        parameters,
    };
    inst.write_conf(&conf).unwrap();
    inst.write_hba("replicator", &[], &[]).unwrap();
    inst.start(T).await.unwrap();
    StopOnDrop(inst.clone())
}

fn socket_path(inst: &Instance) -> PathBuf {
    let dir = if inst.socket_dir.is_absolute() {
        inst.socket_dir.clone()
    } else {
        std::env::current_dir().unwrap().join(&inst.socket_dir)
    };
    dir.join(format!(".s.PGSQL.{}", inst.port))
}

fn text(s: &'static str) -> Text {
    Text::from_static(s)
}

/// A client connection that speaks only through the codec.
struct Conn {
    stream: UnixStream,
    buf: BytesMut,
    decoder: BackendDecoder,
    /// Every byte the server sent, for the re-decoding check at the end.
    captured: Vec<u8>,
    received: usize,
}

impl Conn {
    async fn open(path: &Path) -> Conn {
        let stream = tokio::time::timeout(T, UnixStream::connect(path)).await.unwrap().unwrap();
        Conn { stream, buf: BytesMut::new(), decoder: BackendDecoder::default(), captured: Vec::new(), received: 0 }
    }

    async fn send_startup(&mut self, packet: &StartupPacket) {
        let mut out = BytesMut::new();
        packet.encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn send(&mut self, messages: &[FrontendMessage]) {
        let mut out = BytesMut::new();
        for m in messages {
            m.encode(&mut out);
        }
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> BackendMessage {
        loop {
            if let Some(m) = self.decoder.decode(&mut self.buf).unwrap() {
                self.received += 1;
                return m;
            }
            let before = self.buf.len();
            let n = tokio::time::timeout(T, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for the server")
                .unwrap();
            assert!(n > 0, "the server closed the connection");
            self.captured.extend_from_slice(&self.buf[before..]);
        }
    }

    /// Messages up to and including ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<BackendMessage> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = matches!(m, BackendMessage::ReadyForQuery(_));
            out.push(m);
            if done {
                return out;
            }
        }
    }

    async fn query(&mut self, sql: &'static str) -> Vec<BackendMessage> {
        self.send(&[FrontendMessage::Query(text(sql))]).await;
        self.until_ready().await
    }
}

fn rfq(status: TransactionStatus) -> BackendMessage {
    BackendMessage::ReadyForQuery(status)
}

fn row(values: &[Option<&'static str>]) -> BackendMessage {
    BackendMessage::DataRow(values.iter().map(|v| v.map(|s| Bytes::from_static(s.as_bytes()))).collect())
}

fn complete(tag: &'static str) -> BackendMessage {
    BackendMessage::CommandComplete { tag: text(tag) }
}

/// The ErrorResponse fields of `m`, or a panic naming what came instead.
fn error_fields(m: &BackendMessage) -> &pgkeel_proxy::protocol::ErrorFields {
    match m {
        BackendMessage::ErrorResponse(f) => f,
        other => panic!("expected an ErrorResponse, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_protocol_with_a_real_server() {
    let tmp = tempdir("pgkeel-proxy-test-");
    let inst = instance(tmp.path(), "pg");
    let _guard = start_postgres(&inst).await;
    let path = socket_path(&inst);

    // Startup: trust on the unix socket.
    let mut c = Conn::open(&path).await;
    c.send_startup(&StartupPacket::Startup(StartupMessage::new([
        ("user", "postgres"),
        ("database", "postgres"),
        ("application_name", "pgkeel-proxy-test"),
    ])))
    .await;
    let startup = c.until_ready().await;
    assert_eq!(startup.first(), Some(&BackendMessage::Authentication(Authentication::Ok)));
    assert_eq!(startup.last(), Some(&rfq(TransactionStatus::Idle)));
    let params: BTreeMap<String, String> = startup
        .iter()
        .filter_map(|m| match m {
            BackendMessage::ParameterStatus { name, value } => Some((name.to_string(), value.to_string())),
            _ => None,
        })
        .collect();
    assert!(params.contains_key("server_version"), "{params:?}");
    assert_eq!(params.get("application_name").map(String::as_str), Some("pgkeel-proxy-test"));
    assert_eq!(params.get("client_encoding").map(String::as_str), Some("UTF8"));
    let (pid, secret_key) = startup
        .iter()
        .find_map(|m| match m {
            BackendMessage::BackendKeyData { pid, secret_key } => Some((*pid, secret_key.clone())),
            _ => None,
        })
        .expect("BackendKeyData");
    assert!(pid > 0 && secret_key.len() >= 4);

    // Simple query.
    let got = c.query("select 1").await;
    assert_eq!(got.len(), 4, "{got:?}");
    let BackendMessage::RowDescription(fields) = &got[0] else { panic!("{got:?}") };
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].name, "?column?");
    assert_eq!(fields[0].type_oid, 23);
    assert_eq!(fields[0].type_size, 4);
    assert_eq!(&got[1..], &[row(&[Some("1")]), complete("SELECT 1"), rfq(TransactionStatus::Idle)]);

    // Empty query, and NULLs.
    assert_eq!(c.query("").await, vec![BackendMessage::EmptyQueryResponse, rfq(TransactionStatus::Idle)]);
    let got = c.query("select null::text as a, ''::text as b").await;
    assert_eq!(got[1], row(&[None, Some("")]));

    // Extended protocol with a parameter: Parse / Bind / Describe / Execute / Sync.
    c.send(&[
        FrontendMessage::Parse(Parse {
            name: text("s1"),
            query: text("select $1::int + 1 as n"),
            param_types: vec![23],
        }),
        FrontendMessage::Describe { target: Target::Statement, name: text("s1") },
        FrontendMessage::Bind(Bind {
            portal: text(""),
            statement: text("s1"),
            param_formats: vec![0],
            params: vec![Some(Bytes::from_static(b"41"))],
            result_formats: vec![0],
        }),
        FrontendMessage::Execute { portal: text(""), max_rows: 0 },
        FrontendMessage::Close { target: Target::Statement, name: text("s1") },
        FrontendMessage::Sync,
    ])
    .await;
    let got = c.until_ready().await;
    assert_eq!(got[0], BackendMessage::ParseComplete);
    assert_eq!(got[1], BackendMessage::ParameterDescription(vec![23]));
    let BackendMessage::RowDescription(fields) = &got[2] else { panic!("{got:?}") };
    assert_eq!(fields[0].name, "n");
    assert_eq!(
        &got[3..],
        &[
            BackendMessage::BindComplete,
            row(&[Some("42")]),
            complete("SELECT 1"),
            BackendMessage::CloseComplete,
            rfq(TransactionStatus::Idle)
        ]
    );

    // A row limit suspends the portal; NoData for a statement without rows.
    c.send(&[
        FrontendMessage::Parse(Parse {
            name: text(""),
            query: text("select generate_series(1, 3)"),
            param_types: vec![],
        }),
        FrontendMessage::Bind(Bind {
            portal: text("p"),
            statement: text(""),
            param_formats: vec![],
            params: vec![],
            result_formats: vec![],
        }),
        FrontendMessage::Execute { portal: text("p"), max_rows: 2 },
        FrontendMessage::Parse(Parse {
            name: text(""),
            query: text("set application_name = 'x'"),
            param_types: vec![],
        }),
        FrontendMessage::Describe { target: Target::Statement, name: text("") },
        FrontendMessage::Sync,
    ])
    .await;
    let got = c.until_ready().await;
    assert_eq!(
        got,
        vec![
            BackendMessage::ParseComplete,
            BackendMessage::BindComplete,
            row(&[Some("1")]),
            row(&[Some("2")]),
            BackendMessage::PortalSuspended,
            BackendMessage::ParseComplete,
            BackendMessage::ParameterDescription(vec![]),
            BackendMessage::NoData,
            rfq(TransactionStatus::Idle),
        ]
    );

    // The transaction status byte, which the pooler relies on: I, T, E, back to I.
    assert_eq!(c.query("begin").await, vec![complete("BEGIN"), rfq(TransactionStatus::InTransaction)]);
    let got = c.query("select * from no_such_table").await;
    assert_eq!(got.len(), 2, "{got:?}");
    let err = error_fields(&got[0]);
    assert_eq!(err.code().unwrap(), "42P01");
    assert_eq!(err.severity().unwrap(), "ERROR");
    assert_eq!(err.message().unwrap(), "relation \"no_such_table\" does not exist");
    assert_eq!(err.get(field::POSITION).unwrap(), "15");
    assert_eq!(got[1], rfq(TransactionStatus::Failed));
    assert_eq!(c.query("rollback").await, vec![complete("ROLLBACK"), rfq(TransactionStatus::Idle)]);

    // An error in the extended protocol: the server skips to Sync.
    c.send(&[
        FrontendMessage::Parse(Parse { name: text(""), query: text("selec 1"), param_types: vec![] }),
        FrontendMessage::Bind(Bind {
            portal: text(""),
            statement: text(""),
            param_formats: vec![],
            params: vec![],
            result_formats: vec![],
        }),
        FrontendMessage::Execute { portal: text(""), max_rows: 0 },
        FrontendMessage::Sync,
    ])
    .await;
    let got = c.until_ready().await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(error_fields(&got[0]).code().unwrap(), "42601");
    assert_eq!(got[1], rfq(TransactionStatus::Idle));

    // COPY FROM STDIN, then COPY TO STDOUT.
    c.query("create temp table t (id int, name text)").await;
    c.send(&[FrontendMessage::Query(text("copy t from stdin"))]).await;
    match c.recv().await {
        BackendMessage::CopyInResponse(r) => {
            assert_eq!(r.format, 0);
            assert_eq!(r.column_formats, vec![0, 0]);
        }
        other => panic!("expected CopyInResponse, got {other:?}"),
    }
    c.send(&[
        FrontendMessage::CopyData(Bytes::from_static(b"1\tone\n2\t")),
        FrontendMessage::CopyData(Bytes::from_static(b"two\n3\t\\N\n")),
        FrontendMessage::CopyDone,
    ])
    .await;
    assert_eq!(c.until_ready().await, vec![complete("COPY 3"), rfq(TransactionStatus::Idle)]);

    let got = c.query("copy (select * from t order by id) to stdout").await;
    let BackendMessage::CopyOutResponse(r) = &got[0] else { panic!("{got:?}") };
    assert_eq!(r.column_formats.len(), 2);
    let data: Vec<u8> = got
        .iter()
        .filter_map(|m| match m {
            BackendMessage::CopyData(d) => Some(d.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(data, b"1\tone\n2\ttwo\n3\t\\N\n");
    assert_eq!(&got[got.len() - 3..], &[BackendMessage::CopyDone, complete("COPY 3"), rfq(TransactionStatus::Idle)]);

    // CopyFail aborts a COPY FROM STDIN with the client's message.
    c.send(&[FrontendMessage::Query(text("copy t from stdin"))]).await;
    assert!(matches!(c.recv().await, BackendMessage::CopyInResponse(_)));
    c.send(&[FrontendMessage::CopyFail { message: text("client changed its mind") }]).await;
    let got = c.until_ready().await;
    let err = error_fields(&got[0]);
    assert_eq!(err.code().unwrap(), "57014");
    assert!(err.message().unwrap().to_string().contains("client changed its mind"), "{err:?}");

    // Notices and notifications.
    let got = c.query("do $$ begin raise notice 'hello %', 42; end $$").await;
    let BackendMessage::NoticeResponse(notice) = &got[0] else { panic!("{got:?}") };
    assert_eq!(notice.message().unwrap(), "hello 42");
    assert_eq!(notice.severity().unwrap(), "NOTICE");
    c.query("listen jobs").await;
    let got = c.query("notify jobs, 'payload'").await;
    assert!(
        got.iter().any(|m| matches!(m, BackendMessage::NotificationResponse { pid: p, channel, payload }
            if *p == pid && channel == "jobs" && payload == "payload")),
        "{got:?}"
    );

    // A CancelRequest on a second connection stops a running query of the first.
    c.send(&[FrontendMessage::Query(text("select pg_sleep(60)"))]).await;
    // Give the query a moment to start; a cancel that arrives first is ignored, so retry.
    let mut cancelled = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut cancel = Conn::open(&path).await;
        cancel.send_startup(&StartupPacket::CancelRequest(CancelRequest { pid, secret_key: secret_key.clone() })).await;
        // The server closes the cancel connection without answering.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(T, cancel.stream.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(n, 0, "the server answers a CancelRequest with nothing");
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(500), c.until_ready()).await {
            cancelled = Some(got);
            break;
        }
    }
    let got = cancelled.expect("the cancel request never took effect");
    let err = error_fields(got.iter().find(|m| matches!(m, BackendMessage::ErrorResponse(_))).expect("an error"));
    assert_eq!(err.code().unwrap(), "57014", "query_canceled: {err:?}");

    // Terminate: the server closes the connection.
    c.send(&[FrontendMessage::Terminate]).await;
    let mut rest = Vec::new();
    tokio::time::timeout(T, c.stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty(), "nothing after Terminate");

    // Everything the server sent decodes again, frame by frame, and re-encodes to the same
    // bytes (the check the fuzz targets run).
    let mut all = BytesMut::from(&c.captured[..]);
    let mut count = 0;
    while let Some(frame) = c.decoder.decode_frame(&mut all).unwrap() {
        let msg = BackendMessage::parse(&frame).unwrap();
        let mut out = BytesMut::new();
        msg.encode(&mut out);
        assert_eq!(&out[..], frame.as_bytes(), "{msg:?}");
        count += 1;
    }
    assert!(all.is_empty());
    assert_eq!(count, c.received);
    pgkeel_proxy::protocol::fuzz::decode_backend(&c.captured);
}

/// An SSLRequest gets the one-byte answer `N` (the test server has no TLS), and the same
/// connection then carries a StartupMessage, as libpq does with `sslmode=prefer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_then_startup_and_a_bad_packet() {
    let tmp = tempdir("pgkeel-proxy-test-");
    let inst = instance(tmp.path(), "pg");
    let _guard = start_postgres(&inst).await;
    let path = socket_path(&inst);

    let mut c = Conn::open(&path).await;
    c.send_startup(&StartupPacket::SslRequest).await;
    let answer = tokio::time::timeout(T, c.stream.read_u8()).await.unwrap().unwrap();
    assert_eq!(answer, b'N');
    c.send_startup(&StartupPacket::Startup(StartupMessage::new([("user", "postgres")]))).await;
    let got = c.until_ready().await;
    assert_eq!(got.first(), Some(&BackendMessage::Authentication(Authentication::Ok)));
    assert_eq!(c.query("select current_database()").await[1], row(&[Some("postgres")]));

    // A startup packet for a role that does not exist: trust authentication succeeds, then
    // FATAL with SQLSTATE 28000.
    let mut c = Conn::open(&path).await;
    c.send_startup(&StartupPacket::Startup(StartupMessage::new([("user", "nobody_here")]))).await;
    assert_eq!(c.recv().await, BackendMessage::Authentication(Authentication::Ok));
    let err = c.recv().await;
    let BackendMessage::ErrorResponse(fields) = &err else { panic!("{err:?}") };
    assert_eq!(fields.severity().unwrap(), "FATAL");
    assert_eq!(fields.code().unwrap(), "28000");
    assert_eq!(fields.message().unwrap(), "role \"nobody_here\" does not exist");
}
