//! Scheduled base backups and dumps (`backup_schedule`, `backup_schedule_incremental` and
//! `dump_schedule` in the cluster config): exactly one member runs each scheduled minute, a
//! replica when one is streaming.
//!
//! A minute's job is, in order: a base backup (full when `backup_schedule` matches, else
//! incremental when `backup_schedule_incremental` does), then `backup expire` with
//! `backup_keep` / `backup_max_age` when set; a logical dump when `dump_schedule` matches,
//! then `backup expire --dumps` with `dump_keep` / `dump_max_age` when set. Each step runs
//! the pgkeel binary; a failed step fails the job (the key records which) but does not stop
//! the later steps, except that no expire follows a failed backup or dump. A slot that
//! comes while the previous job still runs (on a member that is still there) is skipped.
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

/// How a job ended: what it did (and the label of its base backup, if it took one), or why
/// it failed.
type Outcome = Result<(Option<String>, String), String>;

/// What one scheduled minute runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `full` or `incr`, when a base backup is due.
    pub backup: Option<&'static str>,
    /// Whether a logical dump is due.
    pub dump: bool,
}

/// The job due at `now_s` (unix seconds), if any.
pub(crate) fn plan(d: &DynamicConfig, now_s: u64) -> Option<Plan> {
    let due = |e: &Option<String>| e.as_deref().and_then(|s| Cron::parse(s).ok()).is_some_and(|c| c.matches(now_s));
    let backup = if due(&d.backup_schedule) {
        Some("full")
    } else if due(&d.backup_schedule_incremental) {
        Some("incr")
    } else {
        None
    };
    let dump = due(&d.dump_schedule);
    (backup.is_some() || dump).then_some(Plan { backup, dump })
}

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
                    Ok((label, summary)) => {
                        tracing::info!(slot = run.slot, "scheduled job finished: {summary}");
                        if let Some(label) = label {
                            run.last_ok = Some((label, now));
                        }
                        run.message = Some(summary);
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
        let Some(repo) = &shared.config().backup.repo else { return };
        let now = unix_ms() / 1000;
        let Some(plan) = plan(d, now) else { return };
        let slot = now / 60 * 60;
        if self.seen_slot == slot || snap.backup.as_ref().is_some_and(|b| b.value.slot >= slot) {
            self.seen_slot = slot;
            return;
        }
        let me = &shared.config().name;
        // One job at a time: a slot that comes while the previous job still runs on a live
        // member is skipped (two jobs at once would compete for the same postgres and repository).
        if let Some(prev) = snap.backup.as_ref().map(|b| &b.value) {
            if prev.finished_ms.is_none() && snap.member(&prev.runner).is_some() {
                self.seen_slot = slot;
                tracing::warn!(slot, runner = %prev.runner, previous_slot = prev.slot,
                    "skipping a scheduled job: the previous one is still running");
                return;
            }
        }
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
        tracing::info!(slot, backup = plan.backup, dump = plan.dump, "running the scheduled job");
        let primary = if i_lead { None } else { leader_conn(shared, snap) };
        let args = BackupArgs {
            repo: repo.clone(),
            cluster: shared.config().cluster.clone(),
            local,
            primary,
            shared: shared.clone(),
            dynamic: d.clone(),
        };
        self.running = Some((run, tokio::spawn(run_job(args, plan))));
    }
}

struct BackupArgs {
    repo: PathBuf,
    cluster: String,
    local: Local,
    primary: Option<String>,
    shared: Arc<Shared>,
    dynamic: DynamicConfig,
}

impl BackupArgs {
    /// `pgkeel VERB... --repo R --cluster C [--s3-config F]`, output captured.
    fn command(&self, verb: &[&str]) -> Result<tokio::process::Command, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the pgkeel binary: {e}"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(verb).arg("--repo").arg(&self.repo).arg("--cluster").arg(&self.cluster);
        if self.shared.config().backup.is_s3() {
            cmd.arg("--s3-config").arg(self.local.socket_dir.join("s3.toml"));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        Ok(cmd)
    }

    /// Adds how to reach the local postgres as the superuser.
    fn local_conn(&self, cmd: &mut tokio::process::Command) {
        cmd.arg("--host")
            .arg(&self.local.socket_dir)
            .arg("--port")
            .arg(self.local.port.to_string())
            .arg("--user")
            .arg(&self.shared.config().postgres.superuser.username);
        if let Some(pw) = &self.shared.config().postgres.superuser.password {
            cmd.env("PGPASSWORD", pw);
        }
    }
}

/// Runs one minute's job (see the module doc).
async fn run_job(a: BackupArgs, plan: Plan) -> Outcome {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut label = None;
    if let Some(kind) = plan.backup {
        match run_backup(&a, kind).await {
            Ok(l) => {
                done.push(format!("backup {l} ({kind})"));
                label = Some(l);
                if let Some(args) = expire_args(a.dynamic.backup_keep, &a.dynamic.backup_max_age) {
                    match run_step(&a, &["backup", "expire"], &args).await {
                        Ok(out) => done.push(expire_summary("backup", &out)),
                        Err(e) => failed.push(e),
                    }
                }
            }
            Err(e) => failed.push(e),
        }
    }
    if plan.dump {
        match run_dump(&a).await {
            Ok(l) => {
                done.push(format!("dump {l}"));
                if let Some(mut args) = expire_args(a.dynamic.dump_keep, &a.dynamic.dump_max_age) {
                    args.push("--dumps".into());
                    match run_step(&a, &["backup", "expire"], &args).await {
                        Ok(out) => done.push(expire_summary("dump", &out)),
                        Err(e) => failed.push(e),
                    }
                }
            }
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok((label, done.join("; ")))
    } else {
        Err(failed.join("; "))
    }
}

/// `--keep N --max-age AGE` when either is set.
fn expire_args(keep: Option<u32>, max_age: &Option<String>) -> Option<Vec<String>> {
    let mut args = Vec::new();
    if let Some(k) = keep {
        args.extend(["--keep".to_string(), k.to_string()]);
    }
    if let Some(a) = max_age {
        args.extend(["--max-age".to_string(), a.clone()]);
    }
    (!args.is_empty()).then_some(args)
}

/// "expired N backup(s)" from `backup expire`'s output.
fn expire_summary(what: &str, out: &str) -> String {
    let removed = out.lines().filter(|l| l.starts_with("removed ") && !l.contains(" WAL file")).count();
    format!("expired {removed} {what}(s)")
}

/// Runs one pgkeel command; its standard output, or an error with the end of its stderr.
async fn run_step(a: &BackupArgs, verb: &[&str], args: &[String]) -> Result<String, String> {
    let mut cmd = a.command(verb)?;
    cmd.args(args);
    let out = cmd.output().await.map_err(|e| format!("pgkeel {}: {e}", verb.join(" ")))?;
    check_output(&verb.join(" "), &out)
}

fn check_output(what: &str, out: &std::process::Output) -> Result<String, String> {
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pgkeel {what} {}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pgkeel dump` of every database of the local postgres; returns the dump's label.
async fn run_dump(a: &BackupArgs) -> Result<String, String> {
    let mut cmd = a.command(&["dump"])?;
    a.local_conn(&mut cmd);
    cmd.arg("--os-user").arg(&a.shared.config().postgres.os_user);
    let out = cmd.output().await.map_err(|e| format!("pgkeel dump: {e}"))?;
    let stdout = check_output("dump", &out)?;
    // "dump LABEL complete: ..."
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix("dump ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or("(label not reported)")
        .to_string())
}

/// A libpq connection string to the leader as the superuser, to finish its WAL segments.
fn leader_conn(shared: &Shared, snap: &ClusterSnapshot) -> Option<String> {
    let leader = snap.member(snap.leader_name()?)?;
    let (host, port) = leader.pg_address.rsplit_once(':')?;
    let su = &shared.config().postgres.superuser;
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

/// `pgkeel backup create --type KIND` on the local postgres; returns the backup's label.
async fn run_backup(a: &BackupArgs, kind: &str) -> Result<String, String> {
    let mut cmd = a.command(&["backup", "create"])?;
    cmd.arg("--type").arg(kind).arg("--pgdata").arg(&a.local.data_dir);
    a.local_conn(&mut cmd);
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
    let stdout = check_output("backup create", &out)?;
    // "backup LABEL complete (KIND): ..."
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or("(label not reported)")
        .to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_minute_runs() {
        // 2024-05-05 03:00:00 UTC, a Sunday.
        let sunday_3am = 1_714_878_000;
        let d = DynamicConfig {
            backup_schedule: Some("0 3 * * 0".into()),
            backup_schedule_incremental: Some("0 * * * *".into()),
            dump_schedule: Some("0 3 * * *".into()),
            ..DynamicConfig::default()
        };
        assert_eq!(plan(&d, sunday_3am), Some(Plan { backup: Some("full"), dump: true }), "full wins over incr");
        assert_eq!(plan(&d, sunday_3am + 3600), Some(Plan { backup: Some("incr"), dump: false }));
        assert_eq!(plan(&d, sunday_3am + 86_400), Some(Plan { backup: Some("incr"), dump: true }), "Monday");
        assert_eq!(plan(&d, sunday_3am + 60), None);
        assert_eq!(plan(&DynamicConfig::default(), sunday_3am), None);
    }

    #[test]
    fn expire_arguments_and_summary() {
        assert_eq!(expire_args(None, &None), None);
        assert_eq!(
            expire_args(Some(3), &Some("14d".into())),
            Some(vec!["--keep".into(), "3".into(), "--max-age".into(), "14d".into()])
        );
        let out =
            "removed backup A (1 MiB): not among the newest 1\nremoved backup B (2 MiB): x\nkept 1 backup(s): C\n\
                   removed 3 WAL file(s) (48 MiB) before 000000010000000000000009\n";
        assert_eq!(expire_summary("backup", out), "expired 2 backup(s)");
    }
}
