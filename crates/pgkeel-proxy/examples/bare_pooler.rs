//! A bare transaction pooler on one `mio` event loop, for `scripts/bench-proxy.sh`
//! (`PGKEEL_BENCH_BARE=1`): what a forwarding core with no per-session task, future or waker
//! costs per transaction on this machine, against PgBouncer in the same run. It is a
//! measuring probe, not a pooler to use: no client authentication (every client is let in),
//! no TLS, one pool of server connections opened at start, a client that leaves in the middle
//! of a transaction takes its server connection with it, no cancel requests, and no
//! protocol-level prepared statements across transactions (`pgbench -M prepared` fails).
//!
//! What it does per transaction is what any transaction pooler has to: read the client's
//! frames and check their lengths, attach a free server connection (or queue the client),
//! write the frames to it, read the reply, check each frame's length, pass the whole frames
//! on, and give the server connection back at a ReadyForQuery that says idle, handing it at
//! once to the longest-waiting client.
//!
//! With `--tokio` it runs the same logic as a tokio task per client instead (a
//! current-thread runtime, as the proxy's): straight-line async code, one transaction at a
//! time. The two together tell what the event loop itself costs from what a session's state
//! machine costs on top of a task (docs/benchmarks.md, "Proxy").
//!
//! `bare_pooler [--tokio] LISTEN_PORT PG_HOST:PG_PORT USER PASSWORD DATABASE POOL_SIZE`

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};

const LISTENER: Token = Token(usize::MAX);
/// Each connection's read buffer.
const BUF: usize = 16 * 1024;
const SSL_REQUEST: u32 = 80877103;
const PROTOCOL_3: u32 = 196608;

fn die(what: impl std::fmt::Display) -> ! {
    eprintln!("bare_pooler: {what}");
    std::process::exit(1)
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// One socket with its read buffer and the bytes it has not taken yet.
struct Side {
    sock: TcpStream,
    rbuf: Box<[u8]>,
    rlen: usize,
    unsent: Vec<u8>,
    /// The client's server connection, or the server connection's client.
    peer: Option<usize>,
}

impl Side {
    fn new(sock: TcpStream) -> Side {
        Side { sock, rbuf: vec![0; BUF].into_boxed_slice(), rlen: 0, unsent: Vec::new(), peer: None }
    }

    /// Reads what the socket has (a short read drained it: the next arrival is a new edge).
    /// `false`: closed or failed.
    fn fill(&mut self) -> bool {
        while self.rlen < BUF {
            let room = BUF - self.rlen;
            match self.sock.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.rlen += n;
                    if n < room {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Writes `data`, keeping what the socket does not take for its next writable edge.
    fn send(&mut self, data: &[u8]) -> bool {
        if !self.unsent.is_empty() {
            self.unsent.extend_from_slice(data);
            return true;
        }
        let mut off = 0;
        while off < data.len() {
            match self.sock.write(&data[off..]) {
                Ok(0) => return false,
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.unsent.extend_from_slice(&data[off..]);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn flush(&mut self) -> bool {
        while !self.unsent.is_empty() {
            match self.sock.write(&self.unsent) {
                Ok(0) => return false,
                Ok(n) => drop(self.unsent.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Drops the first `n` bytes read.
    fn consume(&mut self, n: usize) {
        self.rbuf.copy_within(n..self.rlen, 0);
        self.rlen -= n;
    }

    /// [`frames`] of what was read.
    fn whole_frames(&self, tag: u8, status: Option<u8>) -> (usize, bool, bool) {
        frames(&self.rbuf[..self.rlen], tag, status)
    }
}

/// The length of the whole frames at the start of `buf`, whether the last of them is `tag`
/// (with `status` as its first body byte, if given), and whether a frame is longer than a
/// read buffer.
fn frames(buf: &[u8], tag: u8, status: Option<u8>) -> (usize, bool, bool) {
    let (mut off, mut last) = (0, false);
    while buf.len() - off >= 5 {
        let len = be32(&buf[off + 1..]) + 1;
        if !(5..=BUF).contains(&len) {
            return (off, last, true);
        }
        if buf.len() - off < len {
            break;
        }
        last = buf[off] == tag && status.is_none_or(|s| len > 5 && buf[off + 5] == s);
        off += len;
    }
    (off, last, false)
}

/// What the client's opening packet at the front of `buf` is (an SSLRequest is answered with
/// N, a startup packet lets the client in), with its length.
enum Opening {
    More,
    SslRequest(usize),
    Startup(usize),
    Bad,
}

fn opening(buf: &[u8]) -> Opening {
    if buf.len() < 8 {
        return Opening::More;
    }
    let len = be32(buf);
    if !(8..=BUF).contains(&len) {
        return Opening::Bad;
    }
    if buf.len() < len {
        return Opening::More;
    }
    match be32(&buf[4..]) as u32 {
        SSL_REQUEST => Opening::SslRequest(len),
        PROTOCOL_3 => Opening::Startup(len),
        _ => Opening::Bad,
    }
}

enum Conn {
    Client { side: Side, started: bool, queued: bool },
    Server(Side),
    Free,
}

struct Pooler {
    poll: Poll,
    conns: Vec<Conn>,
    free: Vec<usize>,
    idle_servers: Vec<usize>,
    waiting: VecDeque<usize>,
    servers: usize,
    /// AuthenticationOk, the first server's ParameterStatus messages, BackendKeyData and
    /// ReadyForQuery: what every client is told at login.
    greeting: Vec<u8>,
}

/// Two distinct entries of `conns`, mutably.
fn pair(conns: &mut [Conn], a: usize, b: usize) -> (&mut Conn, &mut Conn) {
    if a < b {
        let (l, r) = conns.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = conns.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

impl Pooler {
    fn close_client(&mut self, c: usize) {
        let Conn::Client { mut side, queued, .. } = std::mem::replace(&mut self.conns[c], Conn::Free) else { return };
        let _ = self.poll.registry().deregister(&mut side.sock);
        if queued {
            self.waiting.retain(|&w| w != c);
        }
        if let Some(s) = side.peer {
            // Its transaction may be open: the server connection goes too.
            if let Conn::Server(mut server) = std::mem::replace(&mut self.conns[s], Conn::Free) {
                let _ = self.poll.registry().deregister(&mut server.sock);
            }
            self.free.push(s);
            self.servers -= 1;
            eprintln!("bare_pooler: a client left in a transaction; {} server connections left", self.servers);
        }
        self.free.push(c);
    }

    fn client_event(&mut self, c: usize, readable: bool, writable: bool) {
        let Conn::Client { side, started, queued } = &mut self.conns[c] else { return };
        if (writable && !side.flush()) || (readable && !side.fill()) {
            return self.close_client(c);
        }
        if !*started {
            while !*started {
                let (len, answer): (usize, &[u8]) = match opening(&side.rbuf[..side.rlen]) {
                    Opening::More => return,
                    Opening::Bad => return self.close_client(c),
                    Opening::SslRequest(len) => (len, b"N"),
                    Opening::Startup(len) => {
                        *started = true;
                        (len, &self.greeting)
                    }
                };
                side.consume(len);
                if !side.send(answer) {
                    return self.close_client(c);
                }
            }
            return;
        }
        if *queued || side.rlen == 0 {
            return;
        }
        if side.peer.is_none() {
            if side.rbuf[0] == b'X' {
                return self.close_client(c);
            }
            match self.idle_servers.pop() {
                Some(s) => self.attach(c, s),
                None => {
                    *queued = true;
                    self.waiting.push_back(c);
                    return;
                }
            }
        }
        self.hand_to_server(c);
    }

    fn attach(&mut self, c: usize, s: usize) {
        let (Conn::Client { side: client, queued, .. }, Conn::Server(server)) = pair(&mut self.conns, c, s) else {
            die("attach: not a client and a server")
        };
        *queued = false;
        client.peer = Some(s);
        server.peer = Some(c);
    }

    /// Hands the client's whole frames to its server connection.
    fn hand_to_server(&mut self, c: usize) {
        let Conn::Client { side, .. } = &self.conns[c] else { return };
        let Some(s) = side.peer else { return };
        let (n, terminate, bad) = side.whole_frames(b'X', None);
        if bad || terminate {
            return self.close_client(c);
        }
        let (Conn::Client { side: client, .. }, Conn::Server(server)) = pair(&mut self.conns, c, s) else { return };
        if n > 0 {
            if !server.send(&client.rbuf[..n]) {
                die("a server connection failed");
            }
            client.consume(n);
        }
    }

    fn server_event(&mut self, s: usize, readable: bool, writable: bool) {
        let Conn::Server(server) = &mut self.conns[s] else { return };
        if (writable && !server.flush()) || (readable && !server.fill()) {
            die("a server connection closed");
        }
        let (n, idle, bad) = server.whole_frames(b'Z', Some(b'I'));
        if bad {
            die("a server sent a frame longer than the buffer");
        }
        let Some(c) = server.peer else {
            // Nothing is expected from a free server connection (a notice): dropped.
            return server.consume(n);
        };
        if n == 0 {
            return;
        }
        let release = idle && n == server.rlen;
        let (Conn::Server(server), Conn::Client { side: client, .. }) = pair(&mut self.conns, s, c) else { return };
        let sent = client.send(&server.rbuf[..n]);
        server.consume(n);
        if release {
            server.peer = None;
            client.peer = None;
        }
        if !sent {
            self.close_client(c);
        }
        if release {
            match self.waiting.pop_front() {
                Some(w) => {
                    self.attach(w, s);
                    self.hand_to_server(w);
                }
                None => self.idle_servers.push(s),
            }
            // A client that sent its next transaction before this one ended.
            if let Conn::Client { side, queued: false, started: true } = &self.conns[c] {
                if side.peer.is_none() && side.rlen > 0 {
                    self.client_event(c, false, false);
                }
            }
        }
    }

    fn accept(&mut self, listener: &TcpListener) {
        loop {
            let mut sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => return eprintln!("bare_pooler: accept: {e}"),
            };
            let _ = sock.set_nodelay(true);
            let c = self.free.pop().unwrap_or_else(|| {
                self.conns.push(Conn::Free);
                self.conns.len() - 1
            });
            if let Err(e) = self.poll.registry().register(&mut sock, Token(c), Interest::READABLE | Interest::WRITABLE)
            {
                eprintln!("bare_pooler: register a client: {e}");
                self.free.push(c);
                continue;
            }
            self.conns[c] = Conn::Client { side: Side::new(sock), started: false, queued: false };
        }
    }

    fn run(&mut self, listener: &mut TcpListener) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    self.accept(listener);
                    continue;
                }
                let (i, r, w) = (ev.token().0, ev.is_readable() || ev.is_read_closed(), ev.is_writable());
                match self.conns.get(i) {
                    Some(Conn::Client { .. }) => self.client_event(i, r, w),
                    Some(Conn::Server(_)) => self.server_event(i, r, w),
                    _ => {}
                }
            }
        }
    }
}

/// Opens `n` server connections with the proxy's own login (`ServerConn::connect`: SCRAM,
/// md5 or trust, plain TCP, and the check that the server is a primary), and returns them
/// with the first one's ParameterStatus messages.
fn login(
    addr: &str,
    user: &str,
    password: &str,
    database: &str,
    n: usize,
) -> Result<(Vec<std::net::TcpStream>, Vec<u8>), String> {
    use pgkeel_proxy::server::{Dial, ServerAuth, ServerConn, ServerTls};
    use pgkeel_proxy::tls::Stream;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let primary = pgkeel_proxy::topology::Primary { name: "postgres".into(), address: addr.into(), term: 0 };
        let auth = ServerAuth {
            user: user.into(),
            password: Some(password.into()),
            scram: Some(pgkeel_proxy::scram::ClientCredential::Password(password.into())),
            md5: None,
        };
        let dial =
            Dial { timeout: std::time::Duration::from_secs(30), tcp: Default::default(), tls: ServerTls::disabled() };
        let (mut servers, mut params) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let conn = ServerConn::connect(&primary, database, &auth, &dial).await.map_err(|e| e.to_string())?;
            if servers.is_empty() {
                for (name, value) in conn.params.iter() {
                    params.extend_from_slice(&message(b'S', format!("{name}\0{value}\0").as_bytes()));
                }
            }
            let Stream::Plain(tcp) = conn.stream else { return Err("the server connection is not plain TCP".into()) };
            servers.push(tcp.into_std().map_err(|e| e.to_string())?);
        }
        Ok((servers, params))
    })
}

/// The mio event loop over `servers`.
fn run_mio(port: u16, servers: Vec<std::net::TcpStream>, greeting: Vec<u8>) {
    let poll = Poll::new().unwrap_or_else(|e| die(format!("epoll: {e}")));
    let mut p = Pooler {
        poll,
        conns: Vec::new(),
        free: Vec::new(),
        idle_servers: Vec::new(),
        waiting: VecDeque::new(),
        servers: servers.len(),
        greeting,
    };
    for (s, sock) in servers.into_iter().enumerate() {
        let mut sock = TcpStream::from_std(sock);
        if let Err(e) = p.poll.registry().register(&mut sock, Token(s), Interest::READABLE | Interest::WRITABLE) {
            die(format!("register a server connection: {e}"));
        }
        p.conns.push(Conn::Server(Side::new(sock)));
        p.idle_servers.push(s);
    }
    let mut listener = TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap_or_else(|e| die(format!("listen on 127.0.0.1:{port}: {e}")));
    if let Err(e) = p.poll.registry().register(&mut listener, LISTENER, Interest::READABLE) {
        die(format!("register the listener: {e}"));
    }
    if let Err(e) = p.run(&mut listener) {
        die(format!("epoll: {e}"));
    }
}

/// The same pooler as a tokio task per client.
mod tasks {
    use super::{die, frames, opening, Opening, BUF};
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    #[derive(Default)]
    struct Pool {
        idle: Vec<TcpStream>,
        waiting: VecDeque<oneshot::Sender<TcpStream>>,
    }

    /// Hands a server connection to the longest-waiting client, or keeps it.
    fn give_back(pool: &RefCell<Pool>, mut server: TcpStream) {
        let mut p = pool.borrow_mut();
        while let Some(w) = p.waiting.pop_front() {
            match w.send(server) {
                Ok(()) => return,
                Err(back) => server = back,
            }
        }
        p.idle.push(server);
    }

    /// Reads more into `buf[*len..]`; `false`: closed or failed.
    async fn more(sock: &mut TcpStream, buf: &mut [u8], len: &mut usize) -> bool {
        match sock.read(&mut buf[*len..]).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                *len += n;
                true
            }
        }
    }

    async fn client(mut c: TcpStream, pool: Rc<RefCell<Pool>>, greeting: Rc<Vec<u8>>) {
        let (mut cbuf, mut clen) = (vec![0u8; BUF], 0);
        let mut started = false;
        while !started {
            let (len, answer): (usize, &[u8]) = match opening(&cbuf[..clen]) {
                Opening::More if clen < BUF && more(&mut c, &mut cbuf, &mut clen).await => continue,
                Opening::More | Opening::Bad => return,
                Opening::SslRequest(len) => (len, b"N"),
                Opening::Startup(len) => {
                    started = true;
                    (len, &greeting)
                }
            };
            cbuf.copy_within(len..clen, 0);
            clen -= len;
            if c.write_all(answer).await.is_err() {
                return;
            }
        }
        let (mut sbuf, mut slen) = (vec![0u8; BUF], 0);
        loop {
            // The client's next whole frames.
            let (n, terminate, bad) = frames(&cbuf[..clen], b'X', None);
            if terminate || bad {
                return;
            }
            if n == 0 {
                if clen == BUF || !more(&mut c, &mut cbuf, &mut clen).await {
                    return;
                }
                continue;
            }
            let taken = pool.borrow_mut().idle.pop();
            let mut server = match taken {
                Some(s) => s,
                None => {
                    let (tx, rx) = oneshot::channel();
                    pool.borrow_mut().waiting.push_back(tx);
                    rx.await.unwrap_or_else(|_| die("the pool is gone"))
                }
            };
            if server.write_all(&cbuf[..n]).await.is_err() {
                die("a server connection failed");
            }
            cbuf.copy_within(n..clen, 0);
            clen -= n;
            // The reply, up to a ReadyForQuery that says idle with nothing after it. A client
            // that fails meanwhile takes the server connection with it (its transaction may
            // be open).
            loop {
                if !more(&mut server, &mut sbuf, &mut slen).await {
                    die("a server connection closed");
                }
                let (k, idle, bad) = frames(&sbuf[..slen], b'Z', Some(b'I'));
                if bad {
                    die("a server sent a frame longer than the buffer");
                }
                if k == 0 {
                    continue;
                }
                if c.write_all(&sbuf[..k]).await.is_err() {
                    return;
                }
                sbuf.copy_within(k..slen, 0);
                slen -= k;
                if idle && slen == 0 {
                    break;
                }
            }
            give_back(&pool, server);
        }
    }

    pub fn run(port: u16, servers: Vec<std::net::TcpStream>, greeting: Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap_or_else(|e| die(format!("tokio: {e}")));
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let pool = Rc::new(RefCell::new(Pool::default()));
            for s in servers {
                let s = TcpStream::from_std(s).unwrap_or_else(|e| die(format!("register a server connection: {e}")));
                pool.borrow_mut().idle.push(s);
            }
            let greeting = Rc::new(greeting);
            let listener = TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .unwrap_or_else(|e| die(format!("listen on 127.0.0.1:{port}: {e}")));
            loop {
                match listener.accept().await {
                    Ok((c, _)) => {
                        let _ = c.set_nodelay(true);
                        tokio::task::spawn_local(client(c, pool.clone(), greeting.clone()));
                    }
                    Err(e) => eprintln!("bare_pooler: accept: {e}"),
                }
            }
        });
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tokio = args.first().is_some_and(|a| a == "--tokio");
    if tokio {
        args.remove(0);
    }
    let [port, addr, user, password, database, pool] = args.as_slice() else {
        die("usage: bare_pooler [--tokio] LISTEN_PORT PG_HOST:PG_PORT USER PASSWORD DATABASE POOL_SIZE")
    };
    let port: u16 = port.parse().unwrap_or_else(|_| die(format!("LISTEN_PORT {port:?} is not a port number")));
    let pool: usize = pool
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| die(format!("POOL_SIZE {pool:?} is not a positive whole number")));
    let (servers, params) = login(addr, user, password, database, pool).unwrap_or_else(|e| die(e));
    let mut greeting = message(b'R', &0u32.to_be_bytes());
    greeting.extend_from_slice(&params);
    greeting.extend_from_slice(&message(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    greeting.extend_from_slice(&message(b'Z', b"I"));
    let core = if tokio { "a tokio task per client" } else { "one mio event loop" };
    eprintln!("bare_pooler: listening on 127.0.0.1:{port} with {pool} server connections to {addr}, {core}");
    if tokio {
        tasks::run(port, servers, greeting)
    } else {
        run_mio(port, servers, greeting)
    }
}
