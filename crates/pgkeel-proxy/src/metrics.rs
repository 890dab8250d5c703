//! `GET /metrics` in the Prometheus text format (version 0.0.4), on `metrics_listen`.
//!
//! A few lines of HTTP/1.1 on tokio rather than an HTTP server crate: one request per
//! connection, `GET /metrics` only, `Connection: close`. The numbers come from the pools'
//! atomic counters ([`crate::stats`]), read when scraped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pool::PoolTarget;
use crate::session::Shared;
use crate::stats::{StatsSnapshot, WAIT_BUCKETS};

/// Bound on reading a request and writing its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// One pool's numbers, as rendered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSample {
    /// Database name.
    pub database: String,
    /// Role name.
    pub user: String,
    /// `primary` or `replica:<member>`.
    pub target: String,
    /// `primary` or `replica`.
    pub route: &'static str,
    /// Clients holding a server connection.
    pub clients_active: usize,
    /// Clients waiting for one.
    pub clients_waiting: usize,
    /// Server connections attached to clients.
    pub servers_active: usize,
    /// Idle server connections.
    pub servers_idle: usize,
    /// `pool_size`.
    pub size: u32,
    /// The counters.
    pub stats: StatsSnapshot,
}

/// Everything one scrape reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Per pool.
    pub pools: Vec<PoolSample>,
    /// Logged-in clients (admin console sessions excluded).
    pub clients: usize,
    /// The newest term a leader held.
    pub term: u64,
    /// Whether a usable primary is known.
    pub primary_known: bool,
    /// Whether the proxy's own last read of the DCS answered.
    pub dcs_up: bool,
    /// New transactions are held (PAUSE).
    pub paused: bool,
    /// Seconds since the proxy started.
    pub uptime: f64,
}

/// Reads the numbers from the running proxy.
pub fn sample(shared: &Shared) -> Sample {
    let pools = shared
        .pools
        .all()
        .iter()
        .map(|p| {
            let (in_use, idle, size) = p.counts();
            let (target, route) = match &p.key.target {
                PoolTarget::Primary => ("primary".to_string(), "primary"),
                PoolTarget::Replica(name) => (format!("replica:{name}"), "replica"),
            };
            PoolSample {
                database: p.key.database.clone(),
                user: p.key.user.clone(),
                target,
                route,
                clients_active: in_use,
                clients_waiting: p.waiters().0,
                servers_active: in_use,
                servers_idle: idle,
                size,
                stats: p.stats.snapshot(),
            }
        })
        .collect();
    let topo = shared.topology.borrow();
    Sample {
        pools,
        clients: shared.clients().len(),
        term: topo.newest_term,
        primary_known: topo.primary.is_some(),
        dcs_up: topo.dcs_ok,
        paused: shared.hold.holds_everyone(),
        uptime: shared.started.elapsed().as_secs_f64(),
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text exposition of `s`.
pub fn render(s: &Sample) -> String {
    let mut out = String::with_capacity(4096 + s.pools.len() * 2048);
    let mut family = |name: &str, kind: &str, help: &str, lines: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        lines(&mut out);
    };
    let labels = |p: &PoolSample| {
        format!("database=\"{}\",user=\"{}\",target=\"{}\"", escape(&p.database), escape(&p.user), escape(&p.target))
    };
    family("pgkeel_proxy_up", "gauge", "1 while the proxy runs.", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_up 1");
    });
    family("pgkeel_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_uptime_seconds {:.3}", s.uptime);
    });
    family("pgkeel_proxy_term", "gauge", "The newest term a leader of the cluster held.", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_term {}", s.term);
    });
    family("pgkeel_proxy_primary_known", "gauge", "1 when a running primary is known.", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_primary_known {}", u8::from(s.primary_known));
    });
    family(
        "pgkeel_proxy_dcs_up",
        "gauge",
        "1 when the proxy's own last read of the DCS answered (0: it routes by an agent's view, or as it was).",
        &mut |o| {
            let _ = writeln!(o, "pgkeel_proxy_dcs_up {}", u8::from(s.dcs_up));
        },
    );
    family("pgkeel_proxy_paused", "gauge", "1 while new transactions are held (PAUSE).", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_paused {}", u8::from(s.paused));
    });
    family("pgkeel_proxy_client_connections", "gauge", "Logged-in client connections.", &mut |o| {
        let _ = writeln!(o, "pgkeel_proxy_client_connections {}", s.clients);
    });
    family(
        "pgkeel_proxy_pool_clients",
        "gauge",
        "Clients per pool: holding a server connection, or waiting for one.",
        &mut |o| {
            for p in &s.pools {
                let l = labels(p);
                let _ = writeln!(o, "pgkeel_proxy_pool_clients{{{l},state=\"active\"}} {}", p.clients_active);
                let _ = writeln!(o, "pgkeel_proxy_pool_clients{{{l},state=\"waiting\"}} {}", p.clients_waiting);
            }
        },
    );
    family(
        "pgkeel_proxy_pool_servers",
        "gauge",
        "Server connections per pool: attached to a client, or idle.",
        &mut |o| {
            for p in &s.pools {
                let l = labels(p);
                let _ = writeln!(o, "pgkeel_proxy_pool_servers{{{l},state=\"active\"}} {}", p.servers_active);
                let _ = writeln!(o, "pgkeel_proxy_pool_servers{{{l},state=\"idle\"}} {}", p.servers_idle);
            }
        },
    );
    family("pgkeel_proxy_pool_size", "gauge", "pool_size of each pool.", &mut |o| {
        for p in &s.pools {
            let _ = writeln!(o, "pgkeel_proxy_pool_size{{{}}} {}", labels(p), p.size);
        }
    });
    family(
        "pgkeel_proxy_transactions_total",
        "counter",
        "Server connections handed to clients (one per transaction in transaction mode).",
        &mut |o| {
            for p in &s.pools {
                let _ = writeln!(
                    o,
                    "pgkeel_proxy_transactions_total{{{},route=\"{}\"}} {}",
                    labels(p),
                    p.route,
                    p.stats.transactions
                );
            }
        },
    );
    family("pgkeel_proxy_queries_total", "counter", "Queries (Query and Execute messages) by route.", &mut |o| {
        for p in &s.pools {
            let _ =
                writeln!(o, "pgkeel_proxy_queries_total{{{},route=\"{}\"}} {}", labels(p), p.route, p.stats.queries);
        }
    });
    family(
        "pgkeel_proxy_primary_reads_total",
        "counter",
        "Reads that could have run on a replica and ran on the primary, by reason: read_your_writes (no replica \
         was known to have replayed the client's last write) or no_replica (none was eligible).",
        &mut |o| {
            for p in s.pools.iter().filter(|p| p.route == "primary") {
                let l = labels(p);
                let _ = writeln!(
                    o,
                    "pgkeel_proxy_primary_reads_total{{{l},reason=\"read_your_writes\"}} {}",
                    p.stats.reads_for_writes
                );
                let _ = writeln!(
                    o,
                    "pgkeel_proxy_primary_reads_total{{{l},reason=\"no_replica\"}} {}",
                    p.stats.reads_without_replica
                );
            }
        },
    );
    family("pgkeel_proxy_errors_total", "counter", "Errors the servers sent to clients.", &mut |o| {
        for p in &s.pools {
            let _ = writeln!(o, "pgkeel_proxy_errors_total{{{}}} {}", labels(p), p.stats.errors);
        }
    });
    family(
        "pgkeel_proxy_wait_seconds",
        "histogram",
        "How long clients waited for a server connection (pause, pool slot, primary).",
        &mut |o| {
            for p in &s.pools {
                let l = labels(p);
                let mut cumulative = 0;
                for (i, bound) in WAIT_BUCKETS.iter().enumerate() {
                    cumulative += p.stats.wait_buckets[i];
                    let _ = writeln!(o, "pgkeel_proxy_wait_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}");
                }
                cumulative += p.stats.wait_buckets[WAIT_BUCKETS.len()];
                let _ = writeln!(o, "pgkeel_proxy_wait_seconds_bucket{{{l},le=\"+Inf\"}} {cumulative}");
                let _ = writeln!(o, "pgkeel_proxy_wait_seconds_sum{{{l}}} {:.6}", p.stats.wait_us as f64 / 1_000_000.0);
                let _ = writeln!(o, "pgkeel_proxy_wait_seconds_count{{{l}}} {cumulative}");
            }
        },
    );
    out
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The status line and body for a request line.
fn respond(request_line: &str, shared: &Shared) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&sample(shared))),
        ("GET" | "HEAD", _) => {
            ("404 Not Found", "text/plain; charset=utf-8", "not found; the metrics are at /metrics\n".into())
        }
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "use GET /metrics\n".into()),
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n").await?;
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("");
    let (status, content_type, body) = respond(line, shared);
    let head_only = line.starts_with("HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_is_valid_exposition_text() {
        let mut stats =
            StatsSnapshot { transactions: 3, queries: 5, errors: 1, wait_us: 2_500_000, ..Default::default() };
        stats.wait_buckets[0] = 2;
        stats.wait_buckets[WAIT_BUCKETS.len()] = 1;
        let s = Sample {
            pools: vec![
                PoolSample {
                    database: "app\"db".into(),
                    user: "u".into(),
                    target: "replica:n2".into(),
                    route: "replica",
                    clients_active: 1,
                    clients_waiting: 2,
                    servers_active: 1,
                    servers_idle: 4,
                    size: 20,
                    stats,
                },
                PoolSample {
                    database: "app\"db".into(),
                    user: "u".into(),
                    target: "primary".into(),
                    route: "primary",
                    size: 20,
                    stats: StatsSnapshot { reads_for_writes: 4, reads_without_replica: 2, ..Default::default() },
                    ..Default::default()
                },
            ],
            clients: 7,
            term: 3,
            primary_known: true,
            dcs_up: false,
            paused: false,
            uptime: 1.5,
        };
        let text = render(&s);
        let l = r#"database="app\"db",user="u",target="replica:n2""#;
        let p = r#"database="app\"db",user="u",target="primary""#;
        assert!(
            !text.lines().any(|line| line.starts_with("pgkeel_proxy_primary_reads_total") && line.contains(l)),
            "a replica's pool has no primary reads:\n{text}"
        );
        for want in [
            "pgkeel_proxy_term 3".to_string(),
            "pgkeel_proxy_dcs_up 0".into(),
            "pgkeel_proxy_client_connections 7".into(),
            format!("pgkeel_proxy_pool_clients{{{l},state=\"waiting\"}} 2"),
            format!("pgkeel_proxy_pool_servers{{{l},state=\"idle\"}} 4"),
            format!("pgkeel_proxy_queries_total{{{l},route=\"replica\"}} 5"),
            format!("pgkeel_proxy_errors_total{{{l}}} 1"),
            format!("pgkeel_proxy_wait_seconds_bucket{{{l},le=\"0.001\"}} 2"),
            format!("pgkeel_proxy_wait_seconds_bucket{{{l},le=\"30\"}} 2"),
            format!("pgkeel_proxy_wait_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("pgkeel_proxy_wait_seconds_sum{{{l}}} 2.500000"),
            format!("pgkeel_proxy_wait_seconds_count{{{l}}} 3"),
            format!("pgkeel_proxy_primary_reads_total{{{p},reason=\"read_your_writes\"}} 4"),
            format!("pgkeel_proxy_primary_reads_total{{{p},reason=\"no_replica\"}} 2"),
        ] {
            assert!(text.lines().any(|line| line == want), "missing {want}\n{text}");
        }
        // Every line is a comment or `name{labels} value` with a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        // Each family is declared once, before its samples.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut dedup = types.clone();
        dedup.dedup();
        assert_eq!(types.len(), dedup.len());
    }
}
