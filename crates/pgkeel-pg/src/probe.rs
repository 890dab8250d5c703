//! The SQL-level view of a running server ([`probe`]) and the SQL changes the agent makes:
//! replication slots for members ([`ensure_slots`]) and role passwords
//! ([`ensure_replication_user`], [`set_superuser_password`]).

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};
use tracing::{debug, info, warn};

use crate::lsn::parse_lsn;
use crate::quote::{sql_ident, sql_literal};
use crate::PgError;

/// Prefix of the slots pgkeel manages; slots without it belong to the user and are never
/// dropped.
pub const SLOT_PREFIX: &str = "pgkeel_";

/// Everything the HA loop wants to know about a running server, from one round trip.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Probe {
    /// `pg_is_in_recovery()`: true on a replica.
    pub in_recovery: bool,
    /// Current timeline: on a primary from the current WAL file name (the checkpoint's
    /// timeline is stale right after a promotion); on a replica the WAL receiver's
    /// `received_tli`, else the last checkpoint's.
    pub timeline: u32,
    /// `server_version_num`, e.g. 150018.
    pub server_version_num: i32,
    /// Primary: `pg_current_wal_lsn()`.
    pub current_lsn: Option<u64>,
    /// Replica: `pg_last_wal_receive_lsn()`.
    pub received_lsn: Option<u64>,
    /// Replica: `pg_last_wal_replay_lsn()`.
    pub replayed_lsn: Option<u64>,
    /// Replica: WAL replay is paused.
    pub replay_paused: bool,
    /// Replica: how far replay is behind, in ms: 0 when everything received is replayed,
    /// else the age of the last replayed transaction (`pg_last_xact_replay_timestamp()`);
    /// unknown when it is behind and has replayed no transaction since it started. The agent
    /// tightens it with [`bound_replay_delay`].
    pub replay_lag_ms: Option<u64>,
    /// Replica: the WAL receiver, when one runs.
    pub wal_receiver: Option<WalReceiver>,
    /// Connected standbys (`pg_stat_replication`).
    pub replication: Vec<ReplicationRow>,
    /// Physical replication slots.
    pub slots: Vec<SlotRow>,
    /// Parameters changed in the configuration that need a restart to apply.
    pub pending_restart: Vec<String>,
    /// `pgkeel.term` from the configuration the server runs with.
    pub term: Option<u64>,
    /// Postmaster start time, seconds since the Unix epoch.
    pub postmaster_start_unix: f64,
    /// `synchronous_standby_names` as the server applies it now (after the last reload).
    pub synchronous_standby_names: String,
    /// When this server last archived a WAL file (`pg_stat_archiver`), unix ms.
    pub last_archived_ms: Option<u64>,
}

/// One row of `pg_stat_wal_receiver`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`, `restarting`, `stopping`...
    pub status: String,
    /// Host streamed from.
    pub sender_host: Option<String>,
    /// Port streamed from.
    pub sender_port: Option<i32>,
    /// Slot used on the sender.
    pub slot_name: Option<String>,
    /// Last WAL position flushed to disk (`flushed_lsn`, `received_lsn` before PG 13).
    pub flushed_lsn: Option<u64>,
    /// Timeline of the last WAL received.
    pub received_tli: Option<u32>,
}

/// One row of `pg_stat_replication`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicationRow {
    /// The standby's `application_name` (pgkeel sets it to the member name).
    pub application_name: String,
    /// Client address, `None` for unix socket connections.
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, `backup`, ...
    pub state: String,
    /// Last WAL position sent.
    pub sent_lsn: Option<u64>,
    /// Last WAL position written by the standby.
    pub write_lsn: Option<u64>,
    /// Last WAL position flushed by the standby.
    pub flush_lsn: Option<u64>,
    /// Last WAL position replayed by the standby.
    pub replay_lsn: Option<u64>,
    /// `async`, `sync`, `potential`, `quorum`.
    pub sync_state: String,
    /// Replay lag in seconds, when known.
    pub replay_lag: Option<f64>,
}

/// One physical replication slot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotRow {
    /// Slot name.
    pub slot_name: String,
    /// A standby is streaming through it now.
    pub active: bool,
    /// Oldest WAL the slot retains.
    pub restart_lsn: Option<u64>,
}

/// Five statements sent as one simple query: one round trip. In a simple query all values
/// come back as text. Functions that fail during recovery are guarded by CASE on a single
/// `pg_is_in_recovery()` evaluation; `flushed_lsn` is read through `to_jsonb` because PG 12
/// names that column `received_lsn`.
const PROBE_SQL: &str = "\
SELECT r.rec,
       current_setting('server_version_num'),
       CASE WHEN NOT r.rec THEN pg_current_wal_lsn() END,
       CASE WHEN NOT r.rec THEN pg_walfile_name(pg_current_wal_lsn()) END,
       pg_last_wal_receive_lsn(),
       pg_last_wal_replay_lsn(),
       CASE WHEN r.rec THEN pg_is_wal_replay_paused() ELSE false END,
       current_setting('pgkeel.term', true),
       extract(epoch FROM pg_postmaster_start_time()),
       (SELECT timeline_id FROM pg_control_checkpoint()),
       current_setting('synchronous_standby_names'),
       (SELECT (extract(epoch FROM last_archived_time) * 1000)::bigint FROM pg_stat_archiver),
       CASE WHEN NOT r.rec THEN NULL
            WHEN COALESCE(pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn(), false) THEN 0
            WHEN pg_last_xact_replay_timestamp() IS NULL THEN NULL
            ELSE greatest(0, (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000)::bigint)
       END
  FROM (SELECT pg_is_in_recovery() AS rec) r;
SELECT w.status, w.sender_host, w.sender_port, w.slot_name, w.received_tli,
       COALESCE(to_jsonb(w)->>'flushed_lsn', to_jsonb(w)->>'received_lsn')
  FROM pg_stat_wal_receiver w;
SELECT application_name, client_addr, state, sent_lsn, write_lsn, flush_lsn, replay_lsn, sync_state,
       extract(epoch FROM replay_lag)
  FROM pg_stat_replication ORDER BY application_name;
SELECT slot_name, active, restart_lsn FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY slot_name;
SELECT name FROM pg_settings WHERE pending_restart ORDER BY name;";

/// The last probe of a replica that found everything received replayed: the postmaster it
/// ran in (start time) and when (ms). Kept across probes by [`bound_replay_delay`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaughtUp {
    /// `postmaster_start_unix` of that probe: a restart forgets it.
    pub postmaster_start_unix: f64,
    /// When that probe ran, ms on the caller's clock.
    pub at_ms: u64,
}

/// Tightens `p.replay_lag_ms` with what earlier probes saw, and updates `caught_up`.
///
/// The age of the last replayed transaction overstates the delay when the primary was idle:
/// a probe that lands between WAL arriving and its replay, after ten quiet seconds, would
/// report ten seconds. A replica that had replayed everything it received at an earlier
/// probe is behind by at most the time since then, so the delay is the smaller of the two
/// (and known, where the transaction age is not). `now_ms` is on the same clock as
/// [`CaughtUp::at_ms`].
pub fn bound_replay_delay(p: &mut Probe, caught_up: &mut Option<CaughtUp>, now_ms: u64) {
    if !p.in_recovery {
        *caught_up = None;
        return;
    }
    if caught_up.is_some_and(|c| c.postmaster_start_unix != p.postmaster_start_unix) {
        *caught_up = None;
    }
    if p.replay_lag_ms == Some(0) {
        *caught_up = Some(CaughtUp { postmaster_start_unix: p.postmaster_start_unix, at_ms: now_ms });
    } else if let Some(c) = caught_up {
        let bound = now_ms.saturating_sub(c.at_ms);
        p.replay_lag_ms = Some(p.replay_lag_ms.map_or(bound, |ms| ms.min(bound)));
    }
}

/// Reads the server's replication state in one round trip (see [`Probe`]).
pub async fn probe(client: &Client) -> Result<Probe, PgError> {
    let messages = client.simple_query(PROBE_SQL).await.map_err(|e| PgError::sql("probing postgres", e))?;
    let mut sets: Vec<Vec<SimpleQueryRow>> = vec![Vec::new()];
    for m in messages {
        match m {
            SimpleQueryMessage::Row(r) => {
                if let Some(set) = sets.last_mut() {
                    set.push(r);
                }
            }
            SimpleQueryMessage::CommandComplete(_) => sets.push(Vec::new()),
            _ => {}
        }
    }
    if sets.len() < 5 {
        return Err(unexpected(format!("expected 5 result sets, got {}", sets.len() - 1)));
    }
    let main = sets[0].first().ok_or_else(|| unexpected("no row from the main probe query".into()))?;

    let in_recovery = bool_at(main, 0)?;
    let mut p = Probe {
        in_recovery,
        server_version_num: parse_at(main, 1)?.unwrap_or(0),
        current_lsn: lsn_at(main, 2)?,
        received_lsn: lsn_at(main, 4)?,
        replayed_lsn: lsn_at(main, 5)?,
        replay_paused: bool_at(main, 6)?,
        term: text_at(main, 7)?.and_then(|t| t.trim().parse().ok()),
        postmaster_start_unix: parse_at(main, 8)?.unwrap_or(0.0),
        synchronous_standby_names: text_at(main, 10)?.unwrap_or_default().to_string(),
        last_archived_ms: parse_at(main, 11)?,
        replay_lag_ms: parse_at(main, 12)?,
        ..Probe::default()
    };
    let checkpoint_tli: Option<u32> = parse_at(main, 9)?;

    p.wal_receiver = match sets[1].first() {
        Some(w) => Some(WalReceiver {
            status: text_at(w, 0)?.unwrap_or_default().to_string(),
            sender_host: text_at(w, 1)?.map(str::to_string),
            sender_port: parse_at(w, 2)?,
            slot_name: text_at(w, 3)?.map(str::to_string),
            received_tli: parse_at(w, 4)?,
            flushed_lsn: lsn_at(w, 5)?,
        }),
        None => None,
    };
    for r in &sets[2] {
        p.replication.push(ReplicationRow {
            application_name: text_at(r, 0)?.unwrap_or_default().to_string(),
            client_addr: text_at(r, 1)?.map(str::to_string),
            state: text_at(r, 2)?.unwrap_or_default().to_string(),
            sent_lsn: lsn_at(r, 3)?,
            write_lsn: lsn_at(r, 4)?,
            flush_lsn: lsn_at(r, 5)?,
            replay_lsn: lsn_at(r, 6)?,
            sync_state: text_at(r, 7)?.unwrap_or_default().to_string(),
            replay_lag: parse_at(r, 8)?,
        });
    }
    for r in &sets[3] {
        p.slots.push(SlotRow {
            slot_name: text_at(r, 0)?.unwrap_or_default().to_string(),
            active: bool_at(r, 1)?,
            restart_lsn: lsn_at(r, 2)?,
        });
    }
    for r in &sets[4] {
        if let Some(name) = text_at(r, 0)? {
            p.pending_restart.push(name.to_string());
        }
    }

    // Timeline: the WAL file name's first 8 hex digits on a primary (current even right
    // after a promotion), the WAL receiver's on a replica, the last checkpoint's otherwise.
    let from_walfile = text_at(main, 3)?.and_then(|f| f.get(..8)).and_then(|h| u32::from_str_radix(h, 16).ok());
    let from_receiver = p.wal_receiver.as_ref().and_then(|w| w.received_tli).filter(|t| *t > 0);
    p.timeline = if in_recovery { from_receiver.or(checkpoint_tli) } else { from_walfile.or(checkpoint_tli) }
        .ok_or_else(|| unexpected("no timeline in the probe result".into()))?;
    Ok(p)
}

/// Creates the missing physical slots in `wanted` (reserving WAL at once) and drops inactive
/// physical slots named `pgkeel_*` that are not wanted. Slots without the prefix are the
/// user's and are never touched. Callers build names with [`slot_name_for`].
///
/// A slot that became active meanwhile is skipped with a warning rather than failing the
/// whole call; it is retried on the next call.
pub async fn ensure_slots(client: &Client, wanted: &[String]) -> Result<(), PgError> {
    let rows = client
        .query("SELECT slot_name::text, slot_type, active FROM pg_replication_slots", &[])
        .await
        .map_err(|e| PgError::sql("listing replication slots", e))?;
    let mut existing: Vec<(String, String, bool)> = Vec::with_capacity(rows.len());
    for r in &rows {
        let get = |e| PgError::sql("reading pg_replication_slots", e);
        existing.push((r.try_get(0).map_err(get)?, r.try_get(1).map_err(get)?, r.try_get(2).map_err(get)?));
    }

    for name in wanted {
        match existing.iter().find(|(n, _, _)| n == name) {
            Some((_, kind, _)) if kind == "physical" => {}
            Some((_, kind, _)) => {
                return Err(PgError::InvalidInput {
                    what: format!(
                        "replication slot {name:?}: a {kind} slot of that name exists; drop it or rename the member"
                    ),
                })
            }
            None => {
                info!(slot = %name, "creating physical replication slot");
                match client.execute("SELECT pg_create_physical_replication_slot($1, true)", &[name]).await {
                    Ok(_) => {}
                    // Someone created it between the listing and now: that is what we want.
                    Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                    Err(e) => return Err(PgError::sql(format!("creating replication slot {name:?}"), e)),
                }
            }
        }
    }

    for (name, kind, active) in &existing {
        if kind != "physical" || !name.starts_with(SLOT_PREFIX) || wanted.contains(name) {
            continue;
        }
        if *active {
            debug!(slot = %name, "unwanted slot is active; keeping it for now");
            continue;
        }
        info!(slot = %name, "dropping replication slot of a member that left");
        match client.execute("SELECT pg_drop_replication_slot($1)", &[name]).await {
            Ok(_) => {}
            Err(e) if matches!(e.code(), Some(c) if *c == SqlState::UNDEFINED_OBJECT) => {}
            Err(e) if matches!(e.code(), Some(c) if *c == SqlState::OBJECT_IN_USE) => {
                warn!(slot = %name, "slot became active while dropping it; will retry");
            }
            Err(e) => return Err(PgError::sql(format!("dropping replication slot {name:?}"), e)),
        }
    }
    Ok(())
}

/// The slot name for a member: `pgkeel_` + the name lowercased, every character outside
/// `[a-z0-9_]` replaced by `_`, at most 63 characters (postgres' name limit).
pub fn slot_name_for(member: &str) -> String {
    let mut name = String::from(SLOT_PREFIX);
    name.extend(member.chars().map(|c| {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    name.truncate(63);
    name
}

/// Creates the replication role (`REPLICATION LOGIN`) with this password, or updates the
/// password and attributes when it exists. The statement is not written to the server log.
pub async fn ensure_replication_user(client: &Client, name: &str, password: &str) -> Result<(), PgError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(|e| PgError::sql(format!("looking up role {name:?}"), e))?
        .is_some();
    let verb = if exists { "ALTER" } else { "CREATE" };
    let stmt = format!("{verb} ROLE {} WITH REPLICATION LOGIN PASSWORD {}", sql_ident(name)?, sql_literal(password)?);
    info!(role = name, created = !exists, "ensuring replication role");
    execute_secret(client, &stmt, &format!("{} replication role {name:?}", verb.to_lowercase())).await
}

/// Sets a role's password (the superuser's, for TCP clients). Not written to the server log.
pub async fn set_superuser_password(client: &Client, name: &str, password: &str) -> Result<(), PgError> {
    let stmt = format!("ALTER ROLE {} WITH PASSWORD {}", sql_ident(name)?, sql_literal(password)?);
    info!(role = name, "setting superuser password");
    execute_secret(client, &stmt, &format!("setting the password of role {name:?}")).await
}

/// Runs a statement containing a password in a transaction whose statement logging is off,
/// so the password does not end up in the server log (log_statement, slow-statement and
/// error-statement logging all print the statement text).
async fn execute_secret(client: &Client, stmt: &str, context: &str) -> Result<(), PgError> {
    client
        .batch_execute(
            "BEGIN; SET LOCAL log_statement = 'none'; SET LOCAL log_min_duration_statement = -1; \
             SET LOCAL log_min_error_statement = 'panic'",
        )
        .await
        .map_err(|e| PgError::sql(context.to_string(), e))?;
    match client.batch_execute(stmt).await {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(|e| PgError::sql(context.to_string(), e)),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(PgError::sql(context.to_string(), e))
        }
    }
}

fn unexpected(problem: String) -> PgError {
    PgError::Unexpected { source_name: "the probe query".into(), problem }
}

fn text_at(row: &SimpleQueryRow, i: usize) -> Result<Option<&str>, PgError> {
    row.try_get(i).map_err(|e| unexpected(format!("column {i}: {e}")))
}

fn bool_at(row: &SimpleQueryRow, i: usize) -> Result<bool, PgError> {
    Ok(matches!(text_at(row, i)?, Some("t") | Some("true") | Some("on")))
}

fn lsn_at(row: &SimpleQueryRow, i: usize) -> Result<Option<u64>, PgError> {
    match text_at(row, i)? {
        None => Ok(None),
        Some(t) => parse_lsn(t).map(Some).ok_or_else(|| unexpected(format!("column {i} is not an LSN: {t:?}"))),
    }
}

fn parse_at<T: std::str::FromStr>(row: &SimpleQueryRow, i: usize) -> Result<Option<T>, PgError> {
    match text_at(row, i)? {
        None => Ok(None),
        Some(t) => {
            t.trim().parse().map(Some).map_err(|_| unexpected(format!("column {i} has an unexpected value {t:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_delay_is_bounded_by_the_last_caught_up_probe() {
        let replica = |lag: Option<u64>, start: f64| Probe {
            in_recovery: true,
            replay_lag_ms: lag,
            postmaster_start_unix: start,
            ..Probe::default()
        };
        let mut seen = None;
        // Behind with no earlier caught-up probe: the transaction age as reported.
        let mut p = replica(Some(10_000), 1.0);
        bound_replay_delay(&mut p, &mut seen, 1_000);
        assert_eq!((p.replay_lag_ms, seen), (Some(10_000), None));
        // Caught up at 2 s; behind at 2.3 s after a quiet primary: at most 300 ms.
        let mut p = replica(Some(0), 1.0);
        bound_replay_delay(&mut p, &mut seen, 2_000);
        assert_eq!(seen, Some(CaughtUp { postmaster_start_unix: 1.0, at_ms: 2_000 }));
        let mut p = replica(Some(10_000), 1.0);
        bound_replay_delay(&mut p, &mut seen, 2_300);
        assert_eq!(p.replay_lag_ms, Some(300));
        // Replay stopped (paused): the bound grows with time; a younger transaction wins.
        let mut p = replica(Some(10_000), 1.0);
        bound_replay_delay(&mut p, &mut seen, 6_000);
        assert_eq!(p.replay_lag_ms, Some(4_000));
        let mut p = replica(Some(150), 1.0);
        bound_replay_delay(&mut p, &mut seen, 6_000);
        assert_eq!(p.replay_lag_ms, Some(150));
        // Unknown transaction age: the bound makes it known.
        let mut p = replica(None, 1.0);
        bound_replay_delay(&mut p, &mut seen, 7_000);
        assert_eq!(p.replay_lag_ms, Some(5_000));
        // A restarted postmaster forgets the earlier probe.
        let mut p = replica(Some(10_000), 9.0);
        bound_replay_delay(&mut p, &mut seen, 7_100);
        assert_eq!((p.replay_lag_ms, seen), (Some(10_000), None));
        // A primary forgets it too, and its delay stays unset.
        seen = Some(CaughtUp { postmaster_start_unix: 9.0, at_ms: 7_000 });
        let mut p = Probe { in_recovery: false, ..Probe::default() };
        bound_replay_delay(&mut p, &mut seen, 8_000);
        assert_eq!((p.replay_lag_ms, seen), (None, None));
    }

    #[test]
    fn slot_names() {
        assert_eq!(slot_name_for("node1"), "pgkeel_node1");
        assert_eq!(slot_name_for("Node-2.east"), "pgkeel_node_2_east");
        assert_eq!(slot_name_for("ünï"), "pgkeel__n_");
        let long = slot_name_for(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert!(long.starts_with("pgkeel_xxx"));
    }
}
