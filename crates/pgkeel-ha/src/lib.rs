//! Pure HA decisions: what one agent should do next, given what it observed.
//!
//! [`decide`] is a pure function of an [`Observation`] (time is passed in, nothing is read from
//! the clock, the network or the disk). The agent's loop gathers the observation, calls
//! [`decide`], carries out the returned [`Decision`] and starts over. Every rule of the HA
//! promises in `PRODUCT.md` is a branch here and has a row in the table tests below.
//!
//! Rules, in the order they are checked:
//! 1. DCS unreachable: a primary keeps running only while its lease is valid, then demotes;
//!    nobody else does anything (no promotion without the DCS).
//! 2. No data directory: bootstrap if nobody has, else clone from a running leader, else wait.
//! 3. Data from another cluster (system identifier differs): refuse to act.
//! 4. A running primary whose lease is about to run out demotes at once (fencing) — except in
//!    pause, where nobody promotes automatically, so keeping the primary up is the safe choice.
//!    Likewise a key holder whose lease is about to run out renews it before restarting or
//!    promoting postgres, and stops a postgres that is starting as the primary: the DCS view
//!    may predate the lease (an agent paused past the ttl still sees itself as the leader).
//! 5. The leader key is mine: keep the lease, restart a crashed postgres in place within
//!    `primary_start_timeout` (else release the key), promote if postgres is still a replica,
//!    step down for a requested switchover.
//! 6. The leader key is someone else's: a primary demotes; a replica follows it; a stopped node
//!    starts as a replica, rewinding first (re-cloning if that fails) when its timeline
//!    diverged.
//! 7. No leader key: a primary demotes (it has no lease); a stopped node starts as a replica (it
//!    never starts as primary without the key); a running replica that is a candidate probes its
//!    peers in parallel and races only if no primary is alive and no eligible peer is better
//!    (higher LSN, then higher `failover_priority`, then smaller name).
//! 8. Synchronous modes (`on`, `strict`): only members of the `sync` key (they have every
//!    acknowledged commit) race, and a switchover goes only to one of them. In `quorum` mode
//!    a voter races only when it reached enough voters of every configuration in the key
//!    (`n - k + 1` of `ANY k`) and none of them has more WAL (see [`sync::quorum_allows`]).
//! 9. Failsafe (`failsafe_mode`): without the DCS a primary with a valid lease asks every
//!    member to confirm it and keeps its lease only if all do; a member that confirmed does
//!    not race until a ttl has passed, and the primary takes its key back when the DCS
//!    returns.
//! 10. Pause: nothing automatic; the key holder still renews its lease. Manual actions still
//!     work when they name a candidate: the leader steps down for it and it promotes.

pub mod sync;

use std::cmp::Ordering;

pub use sync::{QuorumSet, SyncMode};

/// Timing and policy settings the decision needs (from the dynamic config), in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Leader lease length.
    pub ttl_ms: u64,
    /// Pause between loops.
    pub loop_wait_ms: u64,
    /// How long one call may take.
    pub retry_timeout_ms: u64,
    /// Max bytes behind the leader's last LSN for a candidate.
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to restart in place.
    pub primary_start_timeout_ms: u64,
    /// Pause mode.
    pub pause: bool,
    /// Synchronous replication mode: in `on` and `strict` only synchronous standbys are
    /// promoted.
    pub sync_mode: SyncMode,
    /// Keep the primary through a DCS outage while every member confirms it.
    pub failsafe_mode: bool,
}

impl Settings {
    /// How long before the lease deadline a primary must begin to demote, so postgres is
    /// stopped before the key can expire for the others.
    pub fn demote_margin_ms(&self) -> u64 {
        self.retry_timeout_ms.min(self.ttl_ms / 4).max(200)
    }
}

/// This member's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tags {
    /// Never promote automatically.
    pub nofailover: bool,
    /// Tie-break among equal LSNs; 0 means never.
    pub failover_priority: i64,
}

impl Tags {
    /// Whether tags allow an automatic promotion.
    pub fn candidate(&self) -> bool {
        !self.nofailover && self.failover_priority > 0
    }
}

/// Role of a running postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRole {
    /// Not in recovery.
    Primary,
    /// In recovery.
    Replica,
}

/// What the agent knows about its own postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgState {
    /// No data directory (or an empty one).
    NoData,
    /// Data directory present, postgres not running.
    Stopped {
        /// Controldata says it was a primary when it stopped (`in production` or `shut down`).
        was_primary: bool,
        /// Its WAL is not a prefix of the current leader's timeline: it must be rewound (or
        /// re-cloned).
        diverged: bool,
        /// When the agent first saw it down without having stopped it (crash), monotonic ms.
        down_since_ms: Option<u64>,
    },
    /// The postmaster runs but does not accept connections yet.
    Starting {
        /// When the agent started it (or first saw it starting), monotonic ms.
        since_ms: u64,
    },
    /// Postgres runs and answered the probe.
    Running {
        /// Primary or replica.
        role: PgRole,
        /// Primary: current LSN; replica: max(received, replayed).
        lsn: u64,
        /// Replica: the member its `primary_conninfo` points at.
        following: Option<String>,
    },
}

/// The leader key as read from the DCS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// Holder.
    pub holder: String,
    /// Term.
    pub term: u64,
}

/// A member record as read from the DCS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Reported role is primary and postgres runs.
    pub running_primary: bool,
    /// Reported running replica.
    pub running_replica: bool,
}

/// A pending switchover or failover request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRequest {
    /// The leader that must step down, if named.
    pub leader: Option<String>,
    /// The member that must take over, if named.
    pub candidate: Option<String>,
}

/// State of the bootstrap record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// Nobody has claimed the bootstrap.
    None,
    /// Claimed by `by`, not finished.
    InProgress {
        /// Claimer.
        by: String,
    },
    /// Finished: the cluster's system identifier.
    Done {
        /// System identifier.
        sysid: String,
    },
}

/// The cluster as read from the DCS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// Leader key.
    pub leader: Option<LeaderKey>,
    /// Live members (including this one if its record is alive).
    pub members: Vec<Member>,
    /// Bootstrap record.
    pub init: Init,
    /// Pending request.
    pub failover: Option<FailoverRequest>,
    /// Leader's last LSN (`status` key).
    pub last_leader_lsn: Option<u64>,
    /// Standbys the leader confirmed synchronous (`sync` key).
    pub sync_members: Vec<String>,
    /// Quorum configurations a candidate must satisfy (`sync` key, quorum mode).
    pub sync_quorum: Vec<QuorumSet>,
}

/// One peer's answer to the pre-race probe (its REST `/node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Name.
    pub name: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Its postgres runs as primary.
    pub running_primary: bool,
    /// Its postgres runs as replica.
    pub running_replica: bool,
    /// Its LSN.
    pub lsn: u64,
    /// Its tags.
    pub tags: Tags,
}

/// Everything one decision depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Monotonic time, ms.
    pub now_ms: u64,
    /// This member's name.
    pub me: String,
    /// This member's tags.
    pub tags: Tags,
    /// Settings.
    pub settings: Settings,
    /// The cluster, or `None` when the DCS could not be read.
    pub cluster: Option<ClusterView>,
    /// Local postgres.
    pub pg: PgState,
    /// System identifier of the local data directory, when it has one.
    pub local_sysid: Option<String>,
    /// Monotonic deadline of this member's lease (time of the last successful acquire/renew
    /// request's start + ttl), when it believes it holds the key.
    pub lease_deadline_ms: Option<u64>,
    /// Answers of the pre-race probe, once made for this decision.
    pub peers: Option<Vec<Peer>>,
    /// This member confirmed a failsafe primary until this monotonic time: it must not race
    /// before then, so that primary can take its key back once the DCS returns.
    pub failsafe_until_ms: Option<u64>,
}

/// Why a promotion happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteReason {
    /// The leader key expired and this member was the best candidate.
    Failover,
    /// A switchover or manual failover named this member (or it was the best candidate).
    Switchover,
    /// This member holds the key but postgres is still in recovery (e.g. the agent restarted
    /// between taking the key and promoting).
    Resume,
}

impl PromoteReason {
    /// Text for history and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PromoteReason::Failover => "failover",
            PromoteReason::Switchover => "switchover",
            PromoteReason::Resume => "resume",
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Idle,
    /// Claim the bootstrap, initdb, start, take the leader key with term 1.
    Bootstrap,
    /// Copy the data directory from `leader`.
    Clone {
        /// Source.
        leader: String,
    },
    /// Rewind the diverged data directory onto `leader`'s timeline (pg_rewind); when that
    /// fails, move it aside and clone afresh.
    Rewind {
        /// Source.
        leader: String,
    },
    /// Start postgres as a replica of `leader` (`None`: no upstream yet).
    StartReplica {
        /// Upstream.
        leader: Option<String>,
    },
    /// Re-point the running replica at `leader`.
    Follow {
        /// Upstream.
        leader: String,
    },
    /// Renew the lease (and publish status, manage slots).
    Renew,
    /// Start postgres in place as primary (the key is ours); renew the lease too.
    RestartPrimary,
    /// Promote the local replica under the key (acquired first unless already held).
    Promote {
        /// Why.
        reason: PromoteReason,
        /// Acquire the key first.
        acquire: bool,
    },
    /// Ask peers for their state, then decide again with `peers` filled in.
    ProbePeers,
    /// Stop postgres immediately and come back as a replica.
    Demote,
    /// Switchover: stop postgres cleanly (so replicas get the shutdown checkpoint), publish the
    /// final LSN and release the key.
    StepDown,
    /// Give up the key (postgres could not be restarted in time) and stop postgres.
    Release,
    /// DCS unreachable, failsafe mode: ask every member to confirm this primary; extend the
    /// lease if all do, else demote.
    Failsafe,
    /// This running primary holds a valid lease but the leader key is gone (it expired during
    /// a failsafe DCS outage): take the key again, with a new term, instead of demoting.
    Reacquire,
}

/// The outcome of [`decide`]: an action and the reason, for logs and the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// Why, in words an operator understands.
    pub reason: String,
}

fn d(action: Action, reason: impl Into<String>) -> Decision {
    Decision { action, reason: reason.into() }
}

/// Decide what to do next.
pub fn decide(o: &Observation) -> Decision {
    let s = &o.settings;
    let running_primary = matches!(o.pg, PgState::Running { role: PgRole::Primary, .. });
    let lease_expiring = o.lease_deadline_ms.is_none_or(|deadline| o.now_ms + s.demote_margin_ms() >= deadline);

    let Some(c) = &o.cluster else {
        // Rule 1: without the DCS nobody can know who leads; the primary may run only on the
        // lease it already has, or (failsafe) on every member's confirmation.
        let lease_valid = o.lease_deadline_ms.is_some_and(|deadline| o.now_ms < deadline);
        if running_primary && !s.pause && s.failsafe_mode && lease_valid {
            return d(Action::Failsafe, "DCS unreachable: failsafe, asking every member to confirm this primary");
        }
        if running_primary && !s.pause && lease_expiring {
            return d(Action::Demote, "DCS unreachable and the lease is about to expire: demoting to stay safe");
        }
        return d(Action::Idle, "DCS unreachable: no action without the DCS");
    };

    // Rule 2: no data yet.
    if o.pg == PgState::NoData {
        return no_data(o, c);
    }

    // Rule 3: never touch another cluster's data.
    if let (Init::Done { sysid }, Some(local)) = (&c.init, &o.local_sysid) {
        if sysid != local {
            return d(
                Action::Idle,
                format!(
                    "data directory belongs to another cluster (system identifier {local}, cluster has {sysid}): refusing to act; remove it or point data_dir elsewhere"
                ),
            );
        }
    }

    let mine = c.leader.as_ref().is_some_and(|l| l.holder == o.me);

    // Rule 4: fencing. A primary without a valid lease stops accepting writes before the key
    // can expire for the others, whatever else is going on.
    if running_primary && !s.pause && lease_expiring {
        return d(Action::Demote, "the lease is about to expire without renewal: demoting before others may promote");
    }
    // The same holds before postgres is (re)started or promoted under the key: the view of
    // the DCS may be older than the lease (the agent was paused, say), so only a lease that
    // still holds by the local clock lets this member act as the leader.
    if mine && !s.pause && lease_expiring {
        return match (&o.pg, o.lease_deadline_ms) {
            (PgState::Starting { .. }, _) => d(
                Action::Demote,
                "the lease is about to expire while postgres starts as the primary: stopping it before others may promote",
            ),
            (_, None) => d(Action::Idle, "named in the leader key but holding no lease: waiting to adopt it or see it expire"),
            (_, Some(_)) => {
                d(Action::Renew, "the lease is about to expire: renewing it before starting or promoting postgres")
            }
        };
    }

    match &c.leader {
        Some(l) if mine => leader_is_me(o, c, l),
        Some(l) => leader_is_other(o, l),
        None => no_leader(o, c),
    }
}

fn no_data(o: &Observation, c: &ClusterView) -> Decision {
    match (&c.init, &c.leader) {
        (Init::None, _) if o.settings.pause => d(Action::Idle, "paused: not bootstrapping"),
        (Init::None, _) => d(Action::Bootstrap, "cluster not initialized: bootstrapping"),
        (Init::InProgress { by }, _) if *by == o.me => d(Action::Bootstrap, "resuming a bootstrap this member started"),
        (Init::InProgress { by }, _) => d(Action::Idle, format!("waiting for {by} to bootstrap the cluster")),
        (Init::Done { .. }, Some(l)) if c.members.iter().any(|m| m.name == l.holder && m.running_primary) => d(
            Action::Clone { leader: l.holder.clone() },
            format!("no data directory: cloning from leader {}", l.holder),
        ),
        (Init::Done { .. }, _) => d(Action::Idle, "no data directory: waiting for a running leader to clone from"),
    }
}

fn leader_is_me(o: &Observation, c: &ClusterView, l: &LeaderKey) -> Decision {
    let s = &o.settings;
    match &o.pg {
        PgState::Running { role: PgRole::Primary, .. } => {
            if let Some(f) = &c.failover {
                // In pause nobody races, so only a named candidate can take over.
                let actionable = !s.pause || f.candidate.is_some();
                if actionable
                    && f.leader.as_deref().is_none_or(|x| x == o.me)
                    && f.candidate.as_deref() != Some(o.me.as_str())
                {
                    // In a synchronous mode only a synchronous standby has every commit.
                    let qualifies = |name: &str| match s.sync_mode {
                        SyncMode::Off => true,
                        SyncMode::On | SyncMode::Strict => c.sync_members.iter().any(|m| m == name),
                        SyncMode::Quorum => c.sync_quorum.last().is_some_and(|q| q.voters.iter().any(|v| v == name)),
                    };
                    let candidate_ok = match &f.candidate {
                        Some(cand) => c.members.iter().any(|m| &m.name == cand && m.running_replica) && qualifies(cand),
                        None => c.members.iter().any(|m| m.name != o.me && m.running_replica && qualifies(&m.name)),
                    };
                    if candidate_ok {
                        return d(Action::StepDown, "switchover requested: stepping down");
                    }
                    return d(
                        Action::Renew,
                        "switchover requested but no healthy (synchronous, in a synchronous mode) candidate: staying primary",
                    );
                }
            }
            d(Action::Renew, format!("leader with term {}", l.term))
        }
        PgState::Running { role: PgRole::Replica, .. } => d(
            Action::Promote { reason: PromoteReason::Resume, acquire: false },
            "holding the leader key while postgres is in recovery: promoting",
        ),
        PgState::Starting { since_ms } => {
            if !s.pause && o.now_ms.saturating_sub(*since_ms) > s.primary_start_timeout_ms {
                d(Action::Release, "postgres did not come up within primary_start_timeout: releasing the leader key")
            } else {
                d(Action::Renew, "postgres is starting: keeping the leader key")
            }
        }
        PgState::Stopped { down_since_ms, .. } => {
            if s.pause {
                return d(Action::Renew, "paused: postgres is down, not restarting it");
            }
            let down_for = down_since_ms.map_or(0, |t| o.now_ms.saturating_sub(t));
            if down_for >= s.primary_start_timeout_ms {
                d(Action::Release, "postgres stayed down past primary_start_timeout: releasing the leader key")
            } else {
                d(Action::RestartPrimary, "postgres is down on the leader: restarting it in place")
            }
        }
        PgState::NoData => unreachable!("handled by no_data"),
    }
}

fn leader_is_other(o: &Observation, l: &LeaderKey) -> Decision {
    match &o.pg {
        PgState::Running { role: PgRole::Primary, .. } => {
            d(Action::Demote, format!("{} holds the leader key (term {}): demoting", l.holder, l.term))
        }
        PgState::Running { role: PgRole::Replica, following, .. } => {
            if following.as_deref() == Some(l.holder.as_str()) {
                d(Action::Idle, format!("replica of {}", l.holder))
            } else {
                d(Action::Follow { leader: l.holder.clone() }, format!("following new leader {}", l.holder))
            }
        }
        PgState::Starting { .. } => d(Action::Idle, "postgres is starting"),
        PgState::Stopped { diverged, .. } => {
            if o.settings.pause {
                d(Action::Idle, "paused: postgres is down, not starting it")
            } else if *diverged {
                d(
                    Action::Rewind { leader: l.holder.clone() },
                    format!("timeline diverged from leader {}: rewinding", l.holder),
                )
            } else {
                d(
                    Action::StartReplica { leader: Some(l.holder.clone()) },
                    format!("starting as replica of {}", l.holder),
                )
            }
        }
        PgState::NoData => unreachable!("handled by no_data"),
    }
}

fn no_leader(o: &Observation, c: &ClusterView) -> Decision {
    let s = &o.settings;
    let named_me = c.failover.as_ref().is_some_and(|f| f.candidate.as_deref() == Some(o.me.as_str()));
    if s.pause && !named_me {
        return d(Action::Idle, "paused: no leader, not racing");
    }
    let my_lsn = match &o.pg {
        // A primary whose own lease is still valid lost only the key (it expired during a
        // failsafe DCS outage, or was deleted): take it back; the atomic create decides, and
        // losing it means another leader, which demotes this one next loop.
        PgState::Running { role: PgRole::Primary, .. } if o.lease_deadline_ms.is_some() => {
            return d(Action::Reacquire, "running as primary with a valid lease but no leader key: taking it back");
        }
        PgState::Running { role: PgRole::Primary, .. } => {
            return d(Action::Demote, "running as primary without the leader key: demoting");
        }
        PgState::Running { role: PgRole::Replica, lsn, .. } => *lsn,
        PgState::Starting { .. } => return d(Action::Idle, "postgres is starting"),
        PgState::Stopped { .. } => {
            return d(
                Action::StartReplica { leader: None },
                "no leader: starting as replica (never as primary without the key)",
            )
        }
        PgState::NoData => unreachable!("handled by no_data"),
    };

    if let Some(f) = &c.failover {
        if f.leader.as_deref() == Some(o.me.as_str()) {
            return d(Action::Idle, "stepped down for a switchover: not racing");
        }
        match &f.candidate {
            Some(cand) if *cand == o.me => {
                return d(
                    Action::Promote { reason: PromoteReason::Switchover, acquire: true },
                    "named as switchover/failover candidate: promoting",
                )
            }
            Some(cand) if c.members.iter().any(|m| &m.name == cand && m.running_replica) => {
                return d(Action::Idle, format!("waiting for {cand} to take over"));
            }
            _ => {}
        }
    }

    if !o.tags.candidate() {
        return d(Action::Idle, "no leader, but this member is tagged nofailover");
    }
    if o.failsafe_until_ms.is_some_and(|until| o.now_ms < until) {
        return d(
            Action::Idle,
            "no leader, but this member confirmed a failsafe primary: letting it take the key back",
        );
    }
    let quorum = s.sync_mode == SyncMode::Quorum;
    let is_voter = |name: &str| c.sync_quorum.iter().any(|q| q.voters.iter().any(|v| v == name));
    if quorum && !is_voter(&o.me) {
        return d(
            Action::Idle,
            format!("no leader, but in quorum mode only a voter ({:?}) may be promoted", c.sync_quorum),
        );
    }
    let sync = s.sync_mode != SyncMode::Off;
    if sync && !quorum && !c.sync_members.contains(&o.me) {
        return d(
            Action::Idle,
            format!(
                "no leader, but in synchronous mode only a synchronous standby ({:?}) may be promoted",
                c.sync_members
            ),
        );
    }
    // A synchronous standby has every acknowledged commit; the lag limit is for async only.
    if let Some(last) = c.last_leader_lsn.filter(|_| !sync) {
        let lag = last.saturating_sub(my_lsn);
        if lag > s.maximum_lag_on_failover {
            return d(
                Action::Idle,
                format!(
                    "no leader, but this member is {lag} bytes behind (maximum_lag_on_failover {})",
                    s.maximum_lag_on_failover
                ),
            );
        }
    }
    let Some(peers) = &o.peers else {
        return d(Action::ProbePeers, "no leader: comparing positions with the other members");
    };
    if let Some(p) = peers.iter().find(|p| p.reachable && p.running_primary) {
        return d(Action::Idle, format!("no leader, but {} still runs as primary", p.name));
    }
    let excluded = c.failover.as_ref().and_then(|f| f.leader.as_deref());
    let me = Peer {
        name: o.me.clone(),
        reachable: true,
        running_primary: false,
        running_replica: true,
        lsn: my_lsn,
        tags: o.tags.clone(),
    };
    let eligible = |p: &&Peer| {
        p.reachable
            && p.running_replica
            && p.tags.candidate()
            && Some(p.name.as_str()) != excluded
            && (!sync || if quorum { is_voter(&p.name) } else { c.sync_members.contains(&p.name) })
            && (sync || c.last_leader_lsn.is_none_or(|last| last.saturating_sub(p.lsn) <= s.maximum_lag_on_failover))
    };
    let best = peers
        .iter()
        .filter(|p| p.name != o.me)
        .chain(std::iter::once(&me))
        .filter(eligible)
        .max_by(|a, b| better(a, b));
    if quorum && best.is_some_and(|b| b.name == o.me) {
        let reached: Vec<(String, u64)> = peers
            .iter()
            .filter(|p| p.name != o.me && p.reachable && p.running_replica)
            .chain(std::iter::once(&me))
            .map(|p| (p.name.clone(), p.lsn))
            .collect();
        if let Err(why) = sync::quorum_allows(&c.sync_quorum, &o.me, my_lsn, &reached) {
            return d(Action::Idle, format!("no leader, but quorum mode forbids promoting this member: {why}"));
        }
    }
    match best {
        Some(b) if b.name == o.me => d(
            Action::Promote { reason: PromoteReason::Failover, acquire: true },
            format!("no leader and this member is the best candidate (LSN {my_lsn}): racing for the key"),
        ),
        Some(b) => d(Action::Idle, format!("no leader; {} is a better candidate", b.name)),
        None => d(Action::Idle, "no leader and no eligible candidate"),
    }
}

/// Candidate order: higher LSN, then higher priority, then the smaller name.
fn better(a: &Peer, b: &Peer) -> Ordering {
    a.lsn.cmp(&b.lsn).then(a.tags.failover_priority.cmp(&b.tags.failover_priority)).then(b.name.cmp(&a.name))
}

#[cfg(test)]
mod tests;
