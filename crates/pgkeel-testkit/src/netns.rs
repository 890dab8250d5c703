//! Several "machines" on one: network namespaces on a private bridge, for partition tests.
//!
//! [`Net`] makes a bridge with its own /24 (10.251.S.0/24) and one namespace per host, each
//! with a veth on the bridge. S is claimed by creating the bridge `pkbS` (names are unique in
//! the kernel), so tests running side by side never share a subnet: with two bridges on one
//! subnet, the test process's connections could reach the other test's cluster. The test
//! process itself (the root namespace) reaches every host through the bridge's address.
//! [`Net::cut`] drops traffic between two hosts in both directions with blackhole routes (a
//! real partition: packets vanish, connections time out); [`Net::cut_gateway`] does the same
//! between a host and the test process; [`Net::isolate`] takes a host's link down. Everything is removed on drop.
//!
//! [`NetCluster`] puts a 3-member etcd on three hosts and pgkeel nodes (agent + postgres) on
//! others, and presents them as a [`Cluster`], so the usual helpers (leader, kill, writers)
//! work unchanged.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::{wait_for, Cluster};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("run ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn random_u16() -> u16 {
    use std::io::Read;
    let mut b = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u16::from_le_bytes(b) ^ (std::process::id() as u16)
}

/// One host: a namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: String,
    veth: String,
}

/// A bridge and its hosts.
#[derive(Debug)]
pub struct Net {
    bridge: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
    /// Removes the network if the test process is ended by a signal (no `Drop` then).
    _reaper: crate::reaper::Registration,
}

impl Net {
    /// A bridge with `n` hosts.
    pub fn new(n: usize) -> Result<Net, String> {
        let start = random_u16();
        let mut claimed = None;
        for k in 0..250 {
            let subnet = 1 + (start.wrapping_add(k)) % 250;
            match ip(&["link", "add", &format!("pkb{subnet}"), "type", "bridge"]) {
                Ok(()) => {
                    claimed = Some(subnet);
                    break;
                }
                // Another network (of a test running now, or left by a killed one) has it.
                Err(e) if e.contains("File exists") => continue,
                Err(e) => return Err(e),
            }
        }
        let subnet = claimed.ok_or("every subnet 10.251.1-250.0/24 is in use (bridges pkb1..pkb250)")?;
        let bridge = format!("pkb{subnet}");
        let planned: Vec<Host> = (0..n)
            .map(|i| Host {
                ns: format!("pk{subnet}n{i}"),
                addr: format!("10.251.{subnet}.{}", 10 + i),
                veth: format!("pk{subnet}v{i}"),
            })
            .collect();
        let _reaper = crate::reaper::register({
            let (bridge, hosts) = (bridge.clone(), planned.clone());
            move || remove_net(&bridge, &hosts)
        });
        let mut net = Net { bridge, hosts: Vec::new(), _reaper };
        ip(&["addr", "add", &format!("10.251.{subnet}.1/24"), "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for (i, host) in planned.into_iter().enumerate() {
            let peer = format!("pk{subnet}p{i}");
            // Names under a bridge this network claimed can only be left over by a killed run.
            let _ = ip(&["netns", "del", &host.ns]);
            let _ = ip(&["link", "del", &host.veth]);
            ip(&["netns", "add", &host.ns])?;
            net.hosts.push(host.clone());
            ip(&["link", "add", &host.veth, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &host.veth, "master", &net.bridge])?;
            ip(&["link", "set", &host.veth, "up"])?;
            ip(&["link", "set", &peer, "netns", &host.ns])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &host.ns, "link", "set", &peer, "name", "eth0"])?;
            ip(&["-n", &host.ns, "addr", "add", &format!("{}/24", host.addr), "dev", "eth0"])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// Drop all traffic between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) {
        let (ha, hb) = (&self.hosts[a], &self.hosts[b]);
        ip(&["-n", &ha.ns, "route", "add", "blackhole", &format!("{}/32", hb.addr)]).expect("cut");
        ip(&["-n", &hb.ns, "route", "add", "blackhole", &format!("{}/32", ha.addr)]).expect("cut");
    }

    /// Undo [`Net::cut`].
    pub fn heal(&self, a: usize, b: usize) {
        let (ha, hb) = (&self.hosts[a], &self.hosts[b]);
        let _ = ip(&["-n", &ha.ns, "route", "del", "blackhole", &format!("{}/32", hb.addr)]);
        let _ = ip(&["-n", &hb.ns, "route", "del", "blackhole", &format!("{}/32", ha.addr)]);
    }

    /// Drop all traffic between host `a` and the test process (the root namespace, where a
    /// proxy under test runs), both ways; the hosts still reach each other.
    pub fn cut_gateway(&self, a: usize) {
        let h = &self.hosts[a];
        ip(&["route", "add", "blackhole", &format!("{}/32", h.addr)]).expect("cut from the gateway");
        ip(&["-n", &h.ns, "route", "add", "blackhole", &format!("{}/32", self.gateway())])
            .expect("cut from the gateway");
    }

    /// Undo [`Net::cut_gateway`].
    pub fn heal_gateway(&self, a: usize) {
        let h = &self.hosts[a];
        let _ = ip(&["route", "del", "blackhole", &format!("{}/32", h.addr)]);
        let _ = ip(&["-n", &h.ns, "route", "del", "blackhole", &format!("{}/32", self.gateway())]);
    }

    /// Take host `a` off the network entirely (its link goes down).
    pub fn isolate(&self, a: usize) {
        ip(&["link", "set", &self.hosts[a].veth, "down"]).expect("isolate");
    }

    /// Undo [`Net::isolate`].
    pub fn reconnect(&self, a: usize) {
        ip(&["link", "set", &self.hosts[a].veth, "up"]).expect("reconnect");
    }

    /// The test process's address on the bridge (the root namespace), which every host
    /// reaches: where a server the test process runs listens for the hosts.
    pub fn gateway(&self) -> String {
        format!("10.251.{}.1", self.bridge.trim_start_matches("pkb"))
    }

    /// A command run inside host `a`'s namespace.
    pub fn command(&self, a: usize, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[a].ns]).arg(program);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        remove_net(&self.bridge, &self.hosts);
    }
}

/// Deletes each host's veth and namespace, then the bridge (best effort: some may not exist),
/// and the root namespace's blackhole routes to the hosts ([`Net::cut_gateway`]), which would
/// otherwise outlive the network and cut a later one on the same subnet.
fn remove_net(bridge: &str, hosts: &[Host]) {
    for h in hosts {
        let _ = ip(&["route", "del", "blackhole", &format!("{}/32", h.addr)]);
        let _ = ip(&["link", "del", &h.veth]);
        let _ = ip(&["netns", "del", &h.ns]);
    }
    let _ = ip(&["link", "del", bridge]);
}

/// etcd members started in namespaces, killed on drop.
struct Etcd(Vec<Child>);

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// pgkeel nodes and a 3-member etcd, each on its own host. Fields drop in order: the cluster
/// (agents, postgres) first, then etcd, then the network.
pub struct NetCluster {
    /// The pgkeel cluster (its helpers work as with `pgkeel up`).
    pub cluster: Cluster,
    etcd: Etcd,
    /// The network: hosts 0..3 run etcd, hosts 3.. run the pgkeel nodes n1, n2, ...
    pub net: Net,
}

/// Host index of etcd member `i`.
pub const ETCD_HOSTS: [usize; 3] = [0, 1, 2];

impl NetCluster {
    /// Host index of pgkeel node `name` (`n1` is host 3).
    pub fn host_of(&self, name: &str) -> usize {
        3 + name.trim_start_matches('n').parse::<usize>().expect("node names are n1, n2, ...") - 1
    }

    /// Start a 3-member etcd and `nodes` pgkeel nodes, and wait until every member streams.
    pub async fn start(bin: &Path, nodes: usize) -> NetCluster {
        let net = Net::new(3 + nodes).unwrap_or_else(|e| panic!("set up network namespaces: {e}"));
        let dir = tempfile::Builder::new().prefix("pgkeel-net-").tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let etcd_bin = pgkeel_dcs::testing::etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let initial: Vec<String> =
            ETCD_HOSTS.iter().map(|&h| format!("e{h}=http://{}:2380", net.hosts[h].addr)).collect();
        let mut etcd = Etcd(Vec::new());
        for &h in &ETCD_HOSTS {
            let a = &net.hosts[h].addr;
            let data = dir.path().join(format!("etcd{h}"));
            let log = std::fs::File::create(dir.path().join(format!("etcd{h}.log"))).expect("etcd log");
            let child = net
                .command(h, &etcd_bin)
                .args(["--name", &format!("e{h}"), "--data-dir"])
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("http://{a}:2379"),
                    "--advertise-client-urls",
                    &format!("http://{a}:2379"),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("http://{a}:2380"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{a}:2380"),
                ])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start etcd");
            etcd.0.push(child);
        }
        let endpoints: Vec<String> = ETCD_HOSTS.iter().map(|&h| format!("http://{}:2379", net.hosts[h].addr)).collect();
        wait_for("etcd answers with a leader", Duration::from_secs(30), || {
            let endpoints = endpoints.clone();
            async move { pgkeel_dcs::etcd::EtcdStore::connect(endpoints, Duration::from_secs(1)).await.ok().map(|_| ()) }
        })
        .await;

        // node.toml files and an up.json, in the layout `pgkeel up` uses.
        let (su, api) = ("netpw-super", "netpw-api");
        let mut nodes_json = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let h = 3 + i;
            let a = net.hosts[h].addr.clone();
            let node_dir = dir.path().join("nodes").join(&name);
            std::fs::create_dir_all(&node_dir).expect("node dir");
            std::fs::set_permissions(&node_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            let endpoints_toml: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
            let toml = format!(
                "cluster = \"net\"\nname = \"{name}\"\ndata_dir = \"{data}\"\n[dcs]\nkind = \"etcd\"\nendpoints = [{eps}]\n\
                 [postgres]\nlisten = \"{a}:5432\"\n[postgres.superuser]\nusername = \"postgres\"\npassword = \"{su}\"\n\
                 [postgres.replication]\nusername = \"pgkeel_replicator\"\npassword = \"netpw-repl\"\n\
                 [postgres.parameters]\nshared_buffers = \"32MB\"\nmax_connections = 50\n\
                 [rest]\nlisten = \"{a}:8008\"\npassword = \"{api}\"\n",
                data = node_dir.join("data").display(),
                eps = endpoints_toml.join(", ")
            );
            std::fs::write(node_dir.join("node.toml"), toml).expect("write node.toml");
            hosts.push(format!("{a}:5432"));
            nodes_json.push(json!({
                "name": name, "api_url": format!("http://{a}:8008"),
                "dsn": format!("postgresql://postgres:{su}@{a}:5432/postgres?connect_timeout=2"),
                "config": node_dir.join("node.toml"), "pid_file": node_dir.join("agent.pid"), "data_dir": node_dir.join("data"),
            }));
        }
        let base = format!("postgresql://postgres:{su}@{}/postgres", hosts.join(","));
        let info = json!({
            "cluster": "net", "dir": dir.path(),
            "primary_dsn": format!("{base}?target_session_attrs=read-write&connect_timeout=2"),
            "replica_dsn": format!("{base}?target_session_attrs=prefer-standby&connect_timeout=2"),
            "superuser": {"username": "postgres", "password": su},
            "api": {"username": "pgkeel", "password": api},
            "nodes": nodes_json,
        });
        std::fs::write(dir.path().join("up.json"), serde_json::to_string_pretty(&info).expect("json"))
            .expect("write up.json");
        let netns: HashMap<String, String> =
            (0..nodes).map(|i| (format!("n{}", i + 1), net.hosts[3 + i].ns.clone())).collect();
        let mut cluster = Cluster::from_parts(dir, bin, info, netns);
        for i in 0..nodes {
            cluster.start_agent(&format!("n{}", i + 1));
        }
        let c = NetCluster { cluster, etcd, net };
        wait_for("every member streaming", Duration::from_secs(120), || async {
            let v = c.cluster.cluster_json().await?;
            let ms = v["members"].as_array()?;
            (ms.len() == nodes
                && ms.iter().all(|m| m["state"] == "streaming" || (m["role"] == "leader" && m["state"] == "running")))
            .then_some(())
        })
        .await;
        c
    }

    /// Kill etcd member `i` (SIGKILL).
    pub fn kill_etcd(&mut self, i: usize) {
        let _ = self.etcd.0[i].kill();
        let _ = self.etcd.0[i].wait();
    }
}
