//! Scheduled base backups (`backup_schedule` in the cluster config): exactly one member runs
//! each scheduled minute, a replica when one is streaming.
//!
//! At a scheduled minute every streaming replica races for the DCS `backup` key with a
//! compare-and-set naming the slot; the winner runs `pgkeel backup create` on its own
//! postgres. The leader joins the race only when no replica streams, or after it has waited
//! half a minute on the slot (counted from when it first saw it) without a replica taking it.
//! While a replica's backup runs, the runner asks the primary to finish its WAL segment
//! every few seconds (`pg_switch_wal()`, a no-op on an idle segment), since the backup ends
//! only once the WAL it needs is archived and the primary archives whole segments only. The
//! key keeps how the run ended and the last success, shown by `/metrics` and `pgkeel list`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pgkeel_config::cron::Cron;
use pgkeel_config::DynamicConfig;
use pgkeel_dcs::cluster::{BackupRunValue, ClusterSnapshot, Role};

use crate::{unix_ms, Shared};

/// How long the leader leaves a slot to the replicas.
const LEADER_DELAY_SECS: u64 = 30;

/// What a run needs to reach the local postgres.
pub(crate) struct Local {
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
}

type Outcome = Result<String, String>;

#[derive(Default)]
pub(crate) struct Scheduler {
    running: Option<(BackupRunValue, tokio::task::JoinHandle<Outcome>)>,
    /// The last slot this member looked at (so a slot is raced for once).
    seen_slot: u64,
    /// The slot this member is waiting on and when it first saw it: the leader's delay counts
    /// from there (a schedule enabled late in a minute must not hand the slot to the leader).
    waiting: Option<(u64, std::time::Instant)>,
}

impl Scheduler {
    /// One look per HA loop: finish a run that ended, or claim and start the current slot.
    pub(crate) async fn tick(
        &mut self,
        shared: &Arc<Shared>,
        snap: &ClusterSnapshot,
        d: &DynamicConfig,
        i_lead: bool,
        local: Local,
    ) {
        if let Some((_, handle)) = &self.running {
            if !handle.is_finished() {
                return;
            }
            if let Some((mut run, handle)) = self.running.take() {
                let outcome = handle.await.unwrap_or_else(|e| Err(format!("the backup task failed: {e}")));
                let now = unix_ms();
                run.finished_ms = Some(now);
                run.ok = Some(outcome.is_ok());
                match outcome {
                    Ok(label) => {
                        tracing::info!(label = %label, slot = run.slot, "scheduled backup finished");
                        run.last_ok = Some((label.clone(), now));
                        run.message = Some(label);
                    }
                    Err(e) => {
                        tracing::error!(slot = run.slot, "scheduled backup failed: {e}");
                        run.message = Some(e);
                    }
                }
                let rev = snap.backup.as_ref().filter(|b| b.value.slot == run.slot).map(|b| b.revision);
                if let Err(e) = shared.store.write_backup_run(&run, rev).await {
                    tracing::warn!("failed to record the scheduled backup's end: {e}");
                }
            }
            return;
        }
        let (Some(expr), Some(repo)) = (&d.backup_schedule, &shared.config.backup.repo) else { return };
        let Ok(cron) = Cron::parse(expr) else { return };
        let now = unix_ms() / 1000;
        if !cron.matches(now) {
            return;
        }
        let slot = now / 60 * 60;
        if self.seen_slot == slot || snap.backup.as_ref().is_some_and(|b| b.value.slot >= slot) {
            self.seen_slot = slot;
            return;
        }
        let me = &shared.config.name;
        let streaming_replica = |name: &str| {
            snap.member(name).is_some_and(|m| m.role == Role::Replica && m.streaming && !m.tags.nofailover)
        };
        let first_seen = match self.waiting {
            Some((s, at)) if s == slot => at,
            _ => {
                let at = std::time::Instant::now();
                self.waiting = Some((slot, at));
                at
            }
        };
        let eligible = if i_lead {
            first_seen.elapsed() >= Duration::from_secs(LEADER_DELAY_SECS)
                || !snap.members.iter().any(|m| streaming_replica(&m.value.name))
        } else {
            streaming_replica(me)
        };
        if !eligible {
            return;
        }
        self.seen_slot = slot;
        let run = BackupRunValue {
            slot,
            runner: me.clone(),
            started_ms: unix_ms(),
            last_ok: snap.backup.as_ref().and_then(|b| b.value.last_ok.clone()),
            ..BackupRunValue::default()
        };
        match shared.store.write_backup_run(&run, snap.backup.as_ref().map(|b| b.revision)).await {
            Ok(Some(_)) => {}
            Ok(None) => return, // another member took this slot
            Err(e) => {
                tracing::warn!("failed to claim the scheduled backup: {e}");
                return;
            }
        }
        tracing::info!(slot, schedule = %cron, "running the scheduled backup");
        let primary = if i_lead { None } else { leader_conn(shared, snap) };
        let args = BackupArgs {
            repo: repo.clone(),
            cluster: shared.config.cluster.clone(),
            local,
            primary,
            shared: shared.clone(),
        };
        self.running = Some((run, tokio::spawn(run_backup(args))));
    }
}

struct BackupArgs {
    repo: PathBuf,
    cluster: String,
    local: Local,
    primary: Option<String>,
    shared: Arc<Shared>,
}

/// A libpq connection string to the leader as the superuser, to finish its WAL segments.
fn leader_conn(shared: &Shared, snap: &ClusterSnapshot) -> Option<String> {
    let leader = snap.member(snap.leader_name()?)?;
    let (host, port) = leader.pg_address.rsplit_once(':')?;
    let su = &shared.config.postgres.superuser;
    let q = pgkeel_pg::quote::libpq_value;
    let mut conn = format!(
        "host={} port={port} user={} dbname=postgres connect_timeout=2",
        q(host.trim_matches(['[', ']'])),
        q(&su.username)
    );
    if let Some(pw) = &su.password {
        conn.push_str(&format!(" password={}", q(pw)));
    }
    Some(conn)
}

async fn run_backup(a: BackupArgs) -> Outcome {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the pgkeel binary: {e}"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("backup")
        .arg("create")
        .arg("--repo")
        .arg(&a.repo)
        .arg("--cluster")
        .arg(&a.cluster)
        .arg("--pgdata")
        .arg(&a.local.data_dir)
        .arg("--host")
        .arg(&a.local.socket_dir)
        .arg("--port")
        .arg(a.local.port.to_string())
        .arg("--user")
        .arg(&a.shared.config.postgres.superuser.username)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(pw) = &a.shared.config.postgres.superuser.password {
        cmd.env("PGPASSWORD", pw);
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start pgkeel backup create: {e}"))?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let out = loop {
        tokio::select! {
            out = &mut output => break out.map_err(|e| format!("pgkeel backup create: {e}"))?,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                if let Some(conn) = &a.primary {
                    switch_wal(conn).await;
                }
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pgkeel backup create {}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    // "backup LABEL complete: ..."
    let label = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or("(label not reported)");
    Ok(label.to_string())
}

async fn switch_wal(conn: &str) {
    let Ok(Ok((client, connection))) =
        tokio::time::timeout(Duration::from_secs(3), tokio_postgres::connect(conn, tokio_postgres::NoTls)).await
    else {
        return;
    };
    let task = tokio::spawn(connection);
    let _ = tokio::time::timeout(Duration::from_secs(3), client.simple_query("SELECT pg_switch_wal()")).await;
    drop(client);
    task.abort();
}
