//! Volatile functions from each database's catalog: a call of one sends the statement to the
//! primary (docs/proxy.md, "Routing reads to replicas").
//!
//! A `SELECT` that calls a user function may write (`select create_order(...)`), and a replica
//! would fail it (`25006 cannot execute INSERT in a read-only transaction`). Postgres marks a
//! function that may have side effects `VOLATILE` (the default for `CREATE FUNCTION`), so the
//! proxy reads the volatile functions outside `pg_catalog` and `information_schema` of every
//! database it has clients for, on the primary, and classifies their calls as writes, as
//! pgpool-II does. `replica_functions` lists volatile functions that only read.
//!
//! The list of a database is read through one of its pools (a free slot, an idle connection
//! or a new one), when the pool appears and every [`REFRESH`] after that. Until it has been
//! read, that database's reads go to the primary ([`crate::pool::Pool::functions_known`]):
//! slower for a moment, never wrong.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pool::{Pool, PoolTarget};
use crate::server::ServerConn;
use crate::session::Shared;

/// How often each database's list is read again: a function created (or made volatile) since
/// reaches the routing within this long.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How often the watch looks for pools of databases it has not read yet.
const LOOK: Duration = Duration::from_secs(1);
/// How long after a failure to read a database's list it is tried again (not every [`LOOK`]:
/// each try may be a login to postgres).
const RETRY: Duration = Duration::from_secs(10);
/// How often a failure to read a database's list is logged.
const COMPLAIN: Duration = Duration::from_secs(60);

/// The volatile functions outside the system schemas, as (schema, name), both as postgres
/// stores them.
const QUERY: &str = "select n.nspname, p.proname from pg_catalog.pg_proc p \
                     join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
                     where p.provolatile = 'v' and p.prokind in ('f', 'p') \
                     and n.nspname not in ('pg_catalog', 'information_schema') \
                     and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%'";

/// A database's volatile functions: (schema, name).
pub type Volatile = BTreeSet<(String, String)>;

/// The names a classifier treats as primary-only: `primary_functions`, and every volatile
/// function (by name and by `schema.name`) that `replica_functions` does not name either way.
pub fn primary_only<'a>(
    primary_functions: &[String],
    replica_functions: &[String],
    volatile: impl IntoIterator<Item = &'a (String, String)>,
) -> Vec<String> {
    let reads = |s: &str| replica_functions.iter().any(|r| r.eq_ignore_ascii_case(s));
    let mut out: Vec<String> = primary_functions.to_vec();
    for (schema, name) in volatile {
        let qualified = format!("{schema}.{name}");
        if !reads(name) && !reads(&qualified) {
            out.push(name.to_lowercase());
            out.push(qualified.to_lowercase());
        }
    }
    out
}

/// Keeps every database's list of volatile functions current, until aborted.
pub async fn watch(shared: Arc<Shared>) {
    let mut read_at: HashMap<String, Instant> = HashMap::new();
    let mut complained: HashMap<String, Instant> = HashMap::new();
    // By (database, user): another user's pool of the database may work.
    let mut failed_at: HashMap<(String, String), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pools: Vec<Arc<Pool>> =
            shared.pools.all().into_iter().filter(|p| p.key.target == PoolTarget::Primary).collect();
        for pool in &pools {
            let db = &pool.key.database;
            let fresh = read_at.get(db).is_some_and(|at| at.elapsed() < REFRESH);
            if fresh {
                // A pool of a database read already (a new user of it): known too.
                pool.set_functions_known();
                continue;
            }
            let key = (db.clone(), pool.key.user.clone());
            if failed_at.get(&key).is_some_and(|at| at.elapsed() < RETRY) {
                continue;
            }
            match read(&shared, pool).await {
                Ok(Some(list)) => {
                    tracing::debug!(database = %db, volatile = list.len(), "read the volatile functions");
                    shared.set_volatile(db, list);
                    read_at.insert(db.clone(), Instant::now());
                    complained.remove(db);
                    failed_at.retain(|(d, _), _| d != db);
                    for p in pools.iter().filter(|p| p.key.database == *db) {
                        p.set_functions_known();
                    }
                }
                // The pool is busy (or has no login yet): another pool of the database, or the
                // next look.
                Ok(None) => {}
                Err(e) => {
                    failed_at.insert(key, Instant::now());
                    if complained.get(db).is_none_or(|at| at.elapsed() >= COMPLAIN) {
                        tracing::warn!(database = %db, error = %e,
                            "cannot read the volatile functions; until it works, the database's reads stay on the primary");
                        complained.insert(db.clone(), Instant::now());
                    }
                }
            }
        }
    }
}

/// Reads the volatile functions of `pool`'s database on the primary, through a free slot of
/// the pool (`None` when there is none, or no client logged in yet).
async fn read(shared: &Shared, pool: &Arc<Pool>) -> Result<Option<Volatile>, String> {
    let Some(auth) = pool.auth() else { return Ok(None) };
    let topo = shared.topology.borrow().clone();
    let (Some(primary), Some(term)) = (topo.primary.as_ref(), topo.reusable_term()) else {
        return Err("there is no primary".into());
    };
    let Some(slot) = pool.try_slot() else { return Ok(None) };
    let mut conn = match pool.take_idle(term) {
        Some(c) => c,
        None => {
            // It joins the pool afterwards: under the caps like any other (none: later).
            let Ok(permit) = pool.try_permit() else { return Ok(None) };
            let cfg = shared.config();
            let database = cfg.dbname_for(&pool.key.database);
            let mut c = ServerConn::connect(primary, database, &auth, &shared.dial(&auth.user))
                .await
                .map_err(|e| e.to_string())?;
            c.permit = permit;
            pool.set_welcome(&c);
            Box::new(c)
        }
    };
    let rows = conn.simple_query(QUERY).await?;
    // Clean again (the query ran outside any transaction): back to the pool.
    slot.put_back(conn);
    Ok(Some(
        rows.into_iter()
            .filter_map(|r| match r.as_slice() {
                [Some(schema), Some(name)] => Some((schema.clone(), name.clone())),
                _ => None,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_functions_but_the_listed_readers_are_primary_only() {
        let volatile: Volatile = [("app", "Bump"), ("app", "rand_pick"), ("public", "audit"), ("public", "now_ish")]
            .into_iter()
            .map(|(s, n)| (s.to_string(), n.to_string()))
            .collect();
        let got = primary_only(&["extra_fn".into()], &["app.rand_pick".into(), "NOW_ISH".into()], volatile.iter());
        assert_eq!(got, ["extra_fn", "bump", "app.bump", "audit", "public.audit"]);
    }
}
