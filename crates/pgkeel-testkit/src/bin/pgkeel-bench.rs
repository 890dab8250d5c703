//! `pgkeel-bench`: prints the figures behind the cluster-core targets.
//!
//! - `up`: `pgkeel up` from an empty directory to three members streaming (target ≤ 15 s);
//! - `failover`: SIGKILL of the primary's agent and postgres together to the first successful
//!   write through a libpq multi-host DSN with `target_session_attrs=read-write`
//!   (target ≤ ttl + 1 s = 5 s at the defaults);
//! - `idle`: CPU and RSS of idle agents (target < 1 % of one core, < 30 MB);
//! - `all`: all three;
//! - `zero-loss`: `--runs` consecutive kills of the primary's node under continuous writes in
//!   a synchronous mode (`--sync on|strict|quorum`, default on); prints how many acknowledged commits
//!   are missing at the end (target: 0);
//! - `false-failover`: `pgbench` saturating both cores against the primary for `--seconds`
//!   (default 30; the target is stated for 300) with default timings; prints how many
//!   failovers happened (target: 0) and the smallest lease margin seen.
//!
//! Usage: `pgkeel-bench [up|failover|idle|all] [--runs N] [--seconds S] [--pgkeel PATH] [--etcd]`
//! (`--etcd`: the failover runs on a real 3-member etcd instead of the embedded store).
//! Build both binaries in release mode first: `cargo build --release -p pgkeel -p pgkeel-testkit`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pgkeel_testkit::{signal, wait_for, Cluster};

struct Opts {
    what: String,
    runs: usize,
    seconds: u64,
    pgkeel: PathBuf,
    /// Run the cluster on a real 3-member etcd instead of the embedded store.
    etcd: bool,
    /// synchronous_mode for `zero-loss`.
    sync: String,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let default_bin = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("pgkeel");
    let mut o = Opts { what: "all".into(), runs: 5, seconds: 30, pgkeel: default_bin, etcd: false, sync: "on".into() };
    while let Some(a) = args.next() {
        match a.as_str() {
            "up" | "failover" | "idle" | "all" | "zero-loss" | "false-failover" => o.what = a,
            "--sync" => {
                o.sync = args
                    .next()
                    .filter(|m| m == "on" || m == "strict" || m == "quorum")
                    .ok_or("--sync takes on, strict or quorum")?
            }
            "--runs" => {
                o.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--seconds" => {
                o.seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--seconds needs a positive number")?
            }
            "--pgkeel" => o.pgkeel = args.next().map(PathBuf::from).ok_or("--pgkeel needs a path")?,
            "--etcd" => o.etcd = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !o.pgkeel.exists() {
        return Err(format!(
            "{} not found: build it with cargo build --release -p pgkeel, or pass --pgkeel PATH",
            o.pgkeel.display()
        ));
    }
    Ok(o)
}

fn stats(label: &str, xs: &mut [f64]) {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let median = xs[xs.len() / 2];
    println!("{label}: median {median:.2} s, min {:.2} s, max {:.2} s over {} runs", xs[0], xs[xs.len() - 1], xs.len());
}

async fn bench_up(o: &Opts) {
    let mut xs = Vec::new();
    for _ in 0..o.runs.min(3) {
        let t = Instant::now();
        let c = Cluster::up(&o.pgkeel, 3).await;
        xs.push(t.elapsed().as_secs_f64());
        drop(c);
    }
    stats("up: empty dir to 3 members streaming", &mut xs);
}

/// Time from SIGKILL of the primary's agent + postgres to the first successful write.
async fn bench_failover(o: &Opts) {
    let mut xs = Vec::new();
    let mut c = if o.etcd { Cluster::up_on_etcd(&o.pgkeel, 3, 3).await } else { Cluster::up(&o.pgkeel, 3).await };
    let dsn = c.primary_dsn().replace("connect_timeout=2", "connect_timeout=1");
    pgkeel_testkit::psql(&dsn, "create table bench(id serial primary key, term bigint)").expect("create table");
    for run in 0..o.runs {
        let (old, _) = wait_for("a leader", Duration::from_secs(30), || c.leader()).await;
        let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old).collect();
        c.wait_streaming(&old, &others, Duration::from_secs(60)).await;
        let apid = c.agent_pid(&old).expect("agent pid");
        let ppid = c.postmaster_pid(&old).expect("postmaster pid");
        let t = Instant::now();
        signal(apid, libc::SIGKILL);
        signal(ppid, libc::SIGKILL);
        loop {
            let out = Command::new("psql")
                .args([
                    dsn.as_str(),
                    "-X",
                    "-Atc",
                    "insert into bench(term) values (current_setting('pgkeel.term')::bigint) returning term",
                ])
                .output()
                .expect("run psql");
            if out.status.success() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no write within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        println!("  run {}: killed {old}, first write after {secs:.2} s", run + 1);
        xs.push(secs);
        // Bring the node back so the next run has a full cluster.
        c.start_agent(&old);
    }
    let dcs = if o.etcd { "etcd, 3 members" } else { "embedded store" };
    stats(
        &format!("failover ({dcs}): SIGKILL of primary agent+postgres to first write (libpq multi-host, read-write)"),
        &mut xs,
    );
}

/// Kill the primary's node `runs` times under continuous writes in a synchronous mode, then
/// count acknowledged commits missing from the final primary.
async fn bench_zero_loss(o: &Opts) {
    let mut c = if o.etcd { Cluster::up_on_etcd(&o.pgkeel, 3, 3).await } else { Cluster::up(&o.pgkeel, 3).await };
    let out = c.ctl(&["config", "set", &format!("synchronous_mode={}", o.sync)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (first, _) = wait_for("a leader", Duration::from_secs(30), || c.leader()).await;
    pgkeel_testkit::psql(&c.node_dsn(&first), "create table acked(id bigint primary key, term bigint not null)")
        .expect("create table");
    let writer = pgkeel_testkit::Writer::start(c.primary_dsn(), Duration::from_millis(10));
    for run in 0..o.runs {
        let (old, term) = wait_for("a leader", Duration::from_secs(60), || c.leader()).await;
        let others: Vec<String> = c.nodes().into_iter().filter(|n| *n != old).collect();
        c.wait_streaming(&old, &others, Duration::from_secs(120)).await;
        // Kill only once a standby is confirmed synchronous (before that nobody may take over).
        wait_for("a synchronous standby", Duration::from_secs(30), || async {
            let mut any = false;
            for n in &others {
                any |= c.api(n, "GET", "/sync", None, false).await.status == 200;
            }
            any.then_some(())
        })
        .await;
        let t = Instant::now();
        c.kill_node(&old);
        let (new, new_term) = c.wait_new_leader(&old, Duration::from_secs(60)).await;
        assert!(new_term > term);
        println!(
            "  run {}: killed {old}, {new} leads (term {new_term}) after {:.2} s",
            run + 1,
            t.elapsed().as_secs_f64()
        );
        c.start_agent(&old);
    }
    let (leader, _) = wait_for("a leader", Duration::from_secs(60), || c.leader()).await;
    let report = writer.stop().await;
    let missing = c.missing_acked(&leader, &report);
    println!(
        "zero-loss (synchronous_mode={}): {missing} of {} acknowledged commits missing after {} consecutive primary kills ({} failed attempts)",
        o.sync,
        report.acked.len(),
        o.runs,
        report.errors
    );
}

/// pgbench against the primary, saturating both cores, while watching the leader and term.
async fn bench_false_failover(o: &Opts) {
    let c = if o.etcd { Cluster::up_on_etcd(&o.pgkeel, 3, 3).await } else { Cluster::up(&o.pgkeel, 3).await };
    let (leader, term) = wait_for("a leader", Duration::from_secs(30), || c.leader()).await;
    let pgbench = pgkeel_pg::binaries::PgBinaries::discover(None).expect("postgres binaries").path("pgbench");
    let dsn = c.node_dsn(&leader);
    let init = Command::new(&pgbench).args(["-i", "-q", "-s", "20", &dsn]).output().expect("run pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let secs = o.seconds.to_string();
    let mut bench = std::process::Command::new(&pgbench)
        .args(["-c", "16", "-j", "2", "-T", secs.as_str(), "-n", &dsn])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgbench");
    let api = c.api_url(&leader);
    let mut min_lease_ms = u64::MAX;
    let mut failovers = 0;
    let started = Instant::now();
    while bench.try_wait().expect("pgbench status").is_none() {
        if let Some((l, t)) = c.leader().await {
            if l != leader || t != term {
                failovers += 1;
                println!("  failover at {:.0} s: {l} term {t}", started.elapsed().as_secs_f64());
                break;
            }
        }
        if let Ok(r) =
            pgkeel_agent::http::request("GET", &format!("{api}/node"), None, None, Duration::from_secs(2)).await
        {
            if let Some(left) = r.json().ok().and_then(|v| v["lease_left_ms"].as_u64()) {
                min_lease_ms = min_lease_ms.min(left);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = bench.wait_with_output().expect("pgbench output");
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text.lines().find(|l| l.starts_with("tps")).unwrap_or("tps = ?").to_string();
    let dcs = if o.etcd { "etcd" } else { "embedded store" };
    println!(
        "false-failover ({dcs}): {failovers} failovers during {:.0} s of pgbench -c 16 -j 2 ({tps}); smallest lease left seen {:.2} s of 4 s",
        started.elapsed().as_secs_f64(),
        min_lease_ms as f64 / 1000.0
    );
}

fn proc_cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_rss_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

async fn bench_idle(o: &Opts) {
    let c = Cluster::up(&o.pgkeel, 3).await;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let pids: Vec<(String, i32)> = c.nodes().into_iter().filter_map(|n| c.agent_pid(&n).map(|p| (n, p))).collect();
    let before: Vec<u64> = pids.iter().map(|(_, p)| proc_cpu_ticks(*p).unwrap_or(0)).collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    let elapsed = t.elapsed().as_secs_f64();
    for ((name, pid), b) in pids.iter().zip(before) {
        let ticks = proc_cpu_ticks(*pid).unwrap_or(0).saturating_sub(b);
        let cpu = ticks as f64 / hz / elapsed * 100.0;
        let rss = proc_rss_kb(*pid).unwrap_or(0) as f64 / 1024.0;
        println!("idle agent {name}: {cpu:.2} % of one core over {elapsed:.0} s, RSS {rss:.1} MB");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("usage: pgkeel-bench [up|failover|idle|all|zero-loss] [--runs N] [--seconds S] [--pgkeel PATH] [--etcd] [--sync on|strict|quorum]\n       (up, failover, idle, all, zero-loss, false-failover)");
            std::process::exit(2);
        }
    };
    println!(
        "pgkeel-bench with {} ({} cores)",
        o.pgkeel.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if matches!(o.what.as_str(), "up" | "all") {
        bench_up(&o).await;
    }
    if matches!(o.what.as_str(), "failover" | "all") {
        bench_failover(&o).await;
    }
    if o.what == "false-failover" {
        bench_false_failover(&o).await;
    }
    if o.what == "zero-loss" {
        bench_zero_loss(&o).await;
    }
    if matches!(o.what.as_str(), "idle" | "all") {
        bench_idle(&o).await;
    }
}
