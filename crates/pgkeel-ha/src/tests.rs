//! Table tests: one row per rule. Each row builds an observation from a few words and states
//! the expected action, so a reader can check the rules against `PRODUCT.md` line by line.

use super::*;

const NOW: u64 = 100_000;

fn settings() -> Settings {
    Settings {
        ttl_ms: 4000,
        loop_wait_ms: 1000,
        retry_timeout_ms: 1500,
        maximum_lag_on_failover: 1 << 20,
        primary_start_timeout_ms: 10_000,
        pause: false,
        sync_mode: SyncMode::Off,
        failsafe_mode: false,
    }
}

fn tags() -> Tags {
    Tags { nofailover: false, failover_priority: 1 }
}

fn member(name: &str, role: &str) -> Member {
    Member { name: name.into(), running_primary: role == "primary", running_replica: role == "replica" }
}

fn peer(name: &str, role: &str, lsn: u64) -> Peer {
    Peer {
        name: name.into(),
        reachable: role != "unreachable",
        running_primary: role == "primary",
        running_replica: role == "replica",
        lsn,
        tags: tags(),
    }
}

fn replica(lsn: u64, following: Option<&str>) -> PgState {
    PgState::Running { role: PgRole::Replica, lsn, following: following.map(String::from) }
}

fn primary() -> PgState {
    PgState::Running { role: PgRole::Primary, lsn: 5000, following: None }
}

fn stopped() -> PgState {
    PgState::Stopped { was_primary: false, diverged: false, down_since_ms: None }
}

fn cluster(leader: Option<(&str, u64)>, members: &[(&str, &str)]) -> ClusterView {
    ClusterView {
        leader: leader.map(|(h, t)| LeaderKey { holder: h.into(), term: t }),
        members: members.iter().map(|(n, r)| member(n, r)).collect(),
        init: Init::Done { sysid: "42".into() },
        failover: None,
        last_leader_lsn: None,
        sync_members: vec![],
        sync_quorum: vec![],
    }
}

fn q(k: u32, voters: &[&str]) -> QuorumSet {
    QuorumSet { k, voters: voters.iter().map(|v| v.to_string()).collect() }
}

/// Observation for member n2 with a valid lease when it leads.
fn obs(c: Option<ClusterView>, pg: PgState) -> Observation {
    let mine = c.as_ref().and_then(|c| c.leader.as_ref()).is_some_and(|l| l.holder == "n2");
    Observation {
        now_ms: NOW,
        me: "n2".into(),
        tags: tags(),
        settings: settings(),
        cluster: c,
        pg,
        local_sysid: Some("42".into()),
        lease_deadline_ms: mine.then_some(NOW + 3000),
        peers: None,
        failsafe_until_ms: None,
    }
}

fn with(mut o: Observation, f: impl FnOnce(&mut Observation)) -> Observation {
    f(&mut o);
    o
}

fn promote(reason: PromoteReason) -> Action {
    Action::Promote { reason, acquire: reason != PromoteReason::Resume }
}

#[test]
fn rules_table() {
    let three = [("n1", "primary"), ("n2", "replica"), ("n3", "replica")];
    let no_leader_replicas = [("n2", "replica"), ("n3", "replica")];
    #[rustfmt::skip]
    let rows: Vec<(&str, Observation, Action)> = vec![
        // Rule 1: DCS unreachable.
        ("dcs down, primary with a valid lease keeps running",
            with(obs(None, primary()), |o| o.lease_deadline_ms = Some(NOW + 3000)), Action::Idle),
        ("dcs down, primary whose lease is expiring demotes",
            with(obs(None, primary()), |o| o.lease_deadline_ms = Some(NOW + 500)), Action::Demote),
        ("dcs down, primary with no lease demotes",
            obs(None, primary()), Action::Demote),
        ("dcs down, replica never promotes",
            obs(None, replica(10, None)), Action::Idle),
        ("dcs down, paused primary keeps running",
            with(obs(None, primary()), |o| o.settings.pause = true), Action::Idle),
        // Rule 2: no data.
        ("no data, uninitialized cluster: bootstrap",
            obs(Some(ClusterView { init: Init::None, ..cluster(None, &[]) }), PgState::NoData), Action::Bootstrap),
        ("no data, uninitialized cluster, paused: wait",
            with(obs(Some(ClusterView { init: Init::None, ..cluster(None, &[]) }), PgState::NoData), |o| o.settings.pause = true), Action::Idle),
        ("no data, someone else bootstrapping: wait",
            obs(Some(ClusterView { init: Init::InProgress { by: "n1".into() }, ..cluster(None, &[]) }), PgState::NoData), Action::Idle),
        ("no data, my own interrupted bootstrap: resume",
            obs(Some(ClusterView { init: Init::InProgress { by: "n2".into() }, ..cluster(None, &[]) }), PgState::NoData), Action::Bootstrap),
        ("no data, running leader: clone",
            obs(Some(cluster(Some(("n1", 1)), &three)), PgState::NoData), Action::Clone { leader: "n1".into() }),
        ("no data, leader key but its postgres is not running: wait",
            obs(Some(cluster(Some(("n1", 1)), &[("n1", "stopped")])), PgState::NoData), Action::Idle),
        // Rule 3: foreign data.
        ("data of another cluster: refuse",
            with(obs(Some(cluster(Some(("n1", 1)), &three)), stopped()), |o| o.local_sysid = Some("7".into())), Action::Idle),
        // Rule 4: fencing.
        ("leader whose lease is about to expire demotes",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), primary()), |o| o.lease_deadline_ms = Some(NOW + 100)), Action::Demote),
        ("paused leader with an expiring lease keeps running",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), primary()), |o| { o.lease_deadline_ms = Some(NOW + 100); o.settings.pause = true; }), Action::Renew),
        ("leader whose lease ran out while postgres was down renews before restarting it",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Stopped { was_primary: true, diverged: false, down_since_ms: Some(NOW - 2000) }), |o| o.lease_deadline_ms = Some(NOW - 4000)), Action::Renew),
        ("leader whose lease is about to expire renews before promoting",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), replica(10, None)), |o| o.lease_deadline_ms = Some(NOW + 100)), Action::Renew),
        ("leader whose lease is about to expire stops a starting postgres",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Starting { since_ms: NOW - 3000 }), |o| o.lease_deadline_ms = Some(NOW + 100)), Action::Demote),
        ("named in the key without a lease: no restart",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), stopped()), |o| o.lease_deadline_ms = None), Action::Idle),
        ("paused leader with an expired lease leaves postgres down",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Stopped { was_primary: true, diverged: false, down_since_ms: Some(NOW - 2000) }), |o| { o.lease_deadline_ms = Some(NOW - 4000); o.settings.pause = true; }), Action::Renew),
        // Rule 5: the key is mine.
        ("leader renews",
            obs(Some(cluster(Some(("n2", 3)), &three)), primary()), Action::Renew),
        ("leader whose postgres is still in recovery promotes without re-acquiring",
            obs(Some(cluster(Some(("n2", 3)), &three)), replica(10, None)), promote(PromoteReason::Resume)),
        ("leader with crashed postgres restarts it in place",
            obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Stopped { was_primary: true, diverged: false, down_since_ms: Some(NOW - 2000) }), Action::RestartPrimary),
        ("leader with postgres down past primary_start_timeout releases",
            obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Stopped { was_primary: true, diverged: false, down_since_ms: Some(NOW - 10_000) }), Action::Release),
        ("leader with postgres starting within the timeout keeps the key",
            obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Starting { since_ms: NOW - 3000 }), Action::Renew),
        ("leader with postgres starting for too long releases",
            obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Starting { since_ms: NOW - 11_000 }), Action::Release),
        ("paused leader with postgres down does not restart it",
            with(obs(Some(cluster(Some(("n2", 3)), &three)), PgState::Stopped { was_primary: true, diverged: false, down_since_ms: Some(NOW - 20_000) }), |o| o.settings.pause = true), Action::Renew),
        ("switchover to a healthy named replica: step down",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), Action::StepDown),
        ("switchover to any replica: step down",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: None }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), Action::StepDown),
        ("switchover to a dead candidate: stay",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n9".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), Action::Renew),
        ("switchover addressed to another leader: ignore",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), Action::Renew),
        // Rule 6: the key is someone else's.
        ("primary seeing another leader demotes",
            with(obs(Some(cluster(Some(("n1", 4)), &three)), primary()), |o| o.lease_deadline_ms = Some(NOW + 3000)), Action::Demote),
        ("primary seeing another leader demotes even when paused",
            with(obs(Some(cluster(Some(("n1", 4)), &three)), primary()), |o| { o.lease_deadline_ms = Some(NOW + 3000); o.settings.pause = true; }), Action::Demote),
        ("replica following the leader idles",
            obs(Some(cluster(Some(("n1", 4)), &three)), replica(10, Some("n1"))), Action::Idle),
        ("replica following an old leader re-points",
            obs(Some(cluster(Some(("n3", 5)), &three)), replica(10, Some("n1"))), Action::Follow { leader: "n3".into() }),
        ("stopped node starts as replica of the leader",
            obs(Some(cluster(Some(("n1", 4)), &three)), stopped()), Action::StartReplica { leader: Some("n1".into()) }),
        ("stopped former primary with a diverged timeline rewinds",
            obs(Some(cluster(Some(("n1", 4)), &three)), PgState::Stopped { was_primary: true, diverged: true, down_since_ms: None }), Action::Rewind { leader: "n1".into() }),
        ("stopped node in pause stays down",
            with(obs(Some(cluster(Some(("n1", 4)), &three)), stopped()), |o| o.settings.pause = true), Action::Idle),
        // Rule 7: no leader key.
        ("primary without the key or a lease demotes",
            with(obs(Some(cluster(None, &three)), primary()), |o| o.lease_deadline_ms = None), Action::Demote),
        ("stopped node without a leader starts as replica, never primary",
            obs(Some(cluster(None, &no_leader_replicas)), stopped()), Action::StartReplica { leader: None }),
        ("replica without a leader probes peers first",
            obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), Action::ProbePeers),
        ("highest LSN wins",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n3", "replica", 90)])), promote(PromoteReason::Failover)),
        ("a peer with a higher LSN wins",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n3", "replica", 110)])), Action::Idle),
        ("an unreachable peer is ignored",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n3", "unreachable", 110)])), promote(PromoteReason::Failover)),
        ("a peer still running as primary stops the race",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n1", "primary", 100)])), Action::Idle),
        ("equal LSN: higher failover_priority wins",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![Peer { tags: Tags { nofailover: false, failover_priority: 5 }, ..peer("n3", "replica", 100) }])), Action::Idle),
        ("equal LSN and priority: the smaller name wins",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n3", "replica", 100)])), promote(PromoteReason::Failover)),
        ("equal LSN and priority: the smaller name wins (I lose)",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n1", "replica", 100)])), Action::Idle),
        ("a nofailover peer with a higher LSN does not block me",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.peers = Some(vec![Peer { tags: Tags { nofailover: true, failover_priority: 1 }, ..peer("n3", "replica", 200) }])), promote(PromoteReason::Failover)),
        ("nofailover member never races",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.tags.nofailover = true), Action::Idle),
        ("failover_priority 0 never races",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.tags.failover_priority = 0), Action::Idle),
        ("too far behind the leader's last LSN: no race",
            obs(Some(ClusterView { last_leader_lsn: Some(100 + (1 << 20) + 1), ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), Action::Idle),
        ("within maximum_lag_on_failover: race",
            with(obs(Some(ClusterView { last_leader_lsn: Some(100 + (1 << 20)), ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| o.peers = Some(vec![])), promote(PromoteReason::Failover)),
        ("a lagging peer with a higher priority does not beat me",
            with(obs(Some(ClusterView { last_leader_lsn: Some(3 << 20), ..cluster(None, &no_leader_replicas) }), replica(3 << 20, Some("n1"))), |o| o.peers = Some(vec![Peer { tags: Tags { nofailover: false, failover_priority: 9 }, ..peer("n3", "replica", 1) }])), promote(PromoteReason::Failover)),
        ("named switchover candidate promotes",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n2".into()) }), ..cluster(None, &three) }), replica(100, Some("n1"))), promote(PromoteReason::Switchover)),
        ("another member is the named candidate: wait",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n3".into()) }), ..cluster(None, &three) }), replica(100, Some("n1"))), Action::Idle),
        ("the named candidate died: race normally",
            obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n9".into()) }), ..cluster(None, &three) }), replica(100, Some("n1"))), Action::ProbePeers),
        ("the stepped-down leader does not race",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: None }), ..cluster(None, &three) }), replica(100, None)), |o| o.peers = Some(vec![])), Action::Idle),
        ("switchover without candidate: the old leader is not eligible even with a higher LSN",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: None }), ..cluster(None, &three) }), replica(100, Some("n1"))), |o| o.peers = Some(vec![peer("n1", "replica", 200)])), promote(PromoteReason::Failover)),
        // Rule 7b: synchronous modes.
        ("sync mode: a synchronous standby races even with a lower LSN than an async peer",
            with(obs(Some(ClusterView { sync_members: vec!["n2".into()], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::On; o.peers = Some(vec![peer("n3", "replica", 200)]); }), promote(PromoteReason::Failover)),
        ("sync mode: an async standby never races, however advanced",
            with(obs(Some(ClusterView { sync_members: vec!["n3".into()], ..cluster(None, &no_leader_replicas) }), replica(500, Some("n1"))), |o| o.settings.sync_mode = SyncMode::Strict), Action::Idle),
        ("sync mode: no synchronous standby confirmed: nobody races",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(500, Some("n1"))), |o| o.settings.sync_mode = SyncMode::On), Action::Idle),
        ("sync mode: the lag limit does not apply to a synchronous standby",
            with(obs(Some(ClusterView { sync_members: vec!["n2".into()], last_leader_lsn: Some(100 + (5 << 20)), ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::On; o.peers = Some(vec![]); }), promote(PromoteReason::Failover)),
        ("sync mode: between two synchronous standbys the higher LSN wins",
            with(obs(Some(ClusterView { sync_members: vec!["n2".into(), "n3".into()], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::On; o.peers = Some(vec![peer("n3", "replica", 120)]); }), Action::Idle),
        ("sync mode: switchover to an async standby is refused",
            with(obs(Some(ClusterView { sync_members: vec!["n4".into()], failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.sync_mode = SyncMode::On), Action::Renew),
        ("sync mode: switchover to a synchronous standby proceeds",
            with(obs(Some(ClusterView { sync_members: vec!["n3".into()], failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: None }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.sync_mode = SyncMode::On), Action::StepDown),
        // Rule 8: quorum mode (ANY k). n1 was the primary; n2 is this member.
        ("quorum: ANY 1 of 2 voters, both reached, this member has the most WAL: promote",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n2", "n3"])], ..cluster(None, &no_leader_replicas) }), replica(200, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 150)]); }), promote(PromoteReason::Failover)),
        ("quorum: ANY 1 of 2 voters, only itself reached: the other may have commits it lacks",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n2", "n3"])], ..cluster(None, &no_leader_replicas) }), replica(200, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "unreachable", 0)]); }), Action::Idle),
        ("quorum: ANY 2 of 3 voters, two reached (itself and n3) is enough",
            with(obs(Some(ClusterView { sync_quorum: vec![q(2, &["n2", "n3", "n4"])], ..cluster(None, &no_leader_replicas) }), replica(200, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 200), peer("n4", "unreachable", 0)]); }), promote(PromoteReason::Failover)),
        ("quorum: ANY 1 of 1 voter: the voter alone knows it has everything",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n2"])], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 900)]); }), promote(PromoteReason::Failover)),
        ("quorum: a non-voter never races, however advanced",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n3"])], ..cluster(None, &no_leader_replicas) }), replica(900, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 100)]); }), Action::Idle),
        ("quorum: a reached voter with more WAL that may not be promoted blocks the race",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n2", "n3"])], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![{ let mut p = peer("n3", "replica", 300); p.tags.nofailover = true; p }]); }), Action::Idle),
        ("quorum: joint key: enough voters of the old configuration must be reached too",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n3", "n4"]), q(1, &["n2"])], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 100), peer("n4", "unreachable", 0)]); }), Action::Idle),
        ("quorum: joint key satisfied: promote",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n3", "n4"]), q(1, &["n2"])], ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![peer("n3", "replica", 100), peer("n4", "replica", 90)]); }), promote(PromoteReason::Failover)),
        ("quorum: empty key (the primary ran asynchronously): nobody races",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![]); }), Action::Idle),
        ("quorum: the lag limit does not apply to a voter",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n2"])], last_leader_lsn: Some(100 + (5 << 20)), ..cluster(None, &no_leader_replicas) }), replica(100, Some("n1"))), |o| { o.settings.sync_mode = SyncMode::Quorum; o.peers = Some(vec![]); }), promote(PromoteReason::Failover)),
        ("quorum: switchover to a voter proceeds",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n3"])], failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.sync_mode = SyncMode::Quorum), Action::StepDown),
        ("quorum: switchover to a non-voter is refused",
            with(obs(Some(ClusterView { sync_quorum: vec![q(1, &["n4"])], failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.sync_mode = SyncMode::Quorum), Action::Renew),
        // Failsafe.
        ("failsafe: DCS down, primary with a valid lease asks the members",
            with(obs(None, primary()), |o| { o.lease_deadline_ms = Some(NOW + 3000); o.settings.failsafe_mode = true; }), Action::Failsafe),
        ("failsafe: asked even when the lease is about to run out",
            with(obs(None, primary()), |o| { o.lease_deadline_ms = Some(NOW + 300); o.settings.failsafe_mode = true; }), Action::Failsafe),
        ("failsafe: a lease already expired cannot be extended: demote",
            with(obs(None, primary()), |o| { o.lease_deadline_ms = Some(NOW - 1); o.settings.failsafe_mode = true; }), Action::Demote),
        ("failsafe: a replica never promotes without the DCS",
            with(obs(None, replica(10, None)), |o| o.settings.failsafe_mode = true), Action::Idle),
        ("DCS back, key expired, primary with a valid lease takes it back",
            with(obs(Some(cluster(None, &three)), primary()), |o| o.lease_deadline_ms = Some(NOW + 3000)), Action::Reacquire),
        ("DCS back, key expired, a member that confirmed the failsafe primary does not race",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.failsafe_until_ms = Some(NOW + 2000)), Action::Idle),
        ("... and races once that confirmation is older than a ttl",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.failsafe_until_ms = Some(NOW - 1)), Action::ProbePeers),
        // Rule 8: pause.
        ("paused: the named switchover candidate still promotes",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n2".into()) }), ..cluster(None, &three) }), replica(100, Some("n1"))), |o| o.settings.pause = true), promote(PromoteReason::Switchover)),
        ("paused: another member named, this one waits",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n1".into()), candidate: Some("n3".into()) }), ..cluster(None, &three) }), replica(100, Some("n1"))), |o| o.settings.pause = true), Action::Idle),
        ("paused leader steps down for a named candidate",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: Some("n3".into()) }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.pause = true), Action::StepDown),
        ("paused leader does not step down without a named candidate (nobody would race)",
            with(obs(Some(ClusterView { failover: Some(FailoverRequest { leader: Some("n2".into()), candidate: None }), ..cluster(Some(("n2", 3)), &[("n2", "primary"), ("n3", "replica")]) }), primary()), |o| o.settings.pause = true), Action::Renew),
        ("paused replica without leader does not race",
            with(obs(Some(cluster(None, &no_leader_replicas)), replica(100, Some("n1"))), |o| o.settings.pause = true), Action::Idle),
    ];
    let mut failures = Vec::new();
    for (name, o, want) in &rows {
        let got = decide(o);
        if got.action != *want {
            failures.push(format!("{name}: want {want:?}, got {:?} ({})", got.action, got.reason));
        }
        assert!(!got.reason.is_empty(), "{name}: every decision has a reason");
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

#[test]
fn demote_margin_leaves_time_to_stop() {
    let s = settings();
    assert_eq!(s.demote_margin_ms(), 1000);
    let tiny = Settings { ttl_ms: 400, retry_timeout_ms: 50, ..s };
    assert_eq!(tiny.demote_margin_ms(), 200, "never less than 200 ms");
}

#[test]
fn candidate_order_is_total_and_deterministic() {
    let mut ps = [peer("b", "replica", 5), peer("a", "replica", 5), peer("c", "replica", 7), peer("d", "replica", 5)];
    ps.sort_by(better);
    let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["d", "b", "a", "c"], "ascending: lower LSN first, then larger names");
}
