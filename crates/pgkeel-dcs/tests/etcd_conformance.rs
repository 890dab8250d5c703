//! The conformance suite run against `EtcdStore` and a real etcd (Debian's `etcd-server`, 3.4),
//! one test per check on a single-member cluster, plus what only a multi-member cluster shows:
//! the whole suite with one member killed, reads through one member of writes through another,
//! a watch that survives the death of its member, and the errors of `connect`.
//!
//! Every test starts its own etcd on free ports in a temp dir (`pgkeel_dcs::testing`), killed
//! when the test ends, also when it panics. A missing etcd fails the tests: run
//! `scripts/install-deps.sh --test`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeel_dcs::conformance;
use pgkeel_dcs::etcd::EtcdStore;
use pgkeel_dcs::testing::EtcdCluster;
use pgkeel_dcs::{Dcs, DcsError};

/// The request timeout the agent uses.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

async fn start(size: usize) -> EtcdCluster {
    EtcdCluster::start(size).await.unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

async fn connect(endpoints: Vec<String>) -> EtcdStore {
    EtcdStore::connect(endpoints.clone(), REQUEST_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to etcd at {endpoints:?}: {e}"))
}

macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let etcd = start(1).await;
            let store: Arc<dyn Dcs> = Arc::new(connect(etcd.client_urls()).await);
            conformance::$check(store, "/conformance/").await;
        }
    )*};
}

pgkeel_dcs::for_each_conformance_check!(conformance_tests);

/// Kill the leader of a 3-member cluster, then run the whole suite through a client whose first
/// endpoint is the dead member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_checks_on_a_cluster_with_a_dead_member() {
    let mut etcd = start(3).await;
    let leader = etcd.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    etcd.kill(leader);
    // The suite's timing checks assume a working cluster, so wait for the election to end;
    // what a client sees during one is the agent's business (it retries within retry_timeout).
    let new_leader = etcd.wait_for_leader(Duration::from_secs(15)).await.unwrap();
    assert_ne!(new_leader, leader);

    let urls = etcd.client_urls();
    let mut endpoints = vec![urls[leader].clone()];
    endpoints.extend(urls.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, u)| u.clone()));
    let store = connect(endpoints).await;
    assert!(store.describe().starts_with(&format!("etcd:{}", urls[leader])), "{}", store.describe());
    conformance::run_all(Arc::new(store), "/all/").await;
}

/// A write through one member is read, listed and watched through another (reads are
/// linearizable, not served from a lagging member's own copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_member_are_seen_through_another() {
    let etcd = start(3).await;
    let urls = etcd.client_urls();
    let (a, b) = (connect(vec![urls[0].clone()]).await, connect(vec![urls[1].clone()]).await);
    for i in 0..20 {
        let rev = a.put("/cross/k", i.to_string().as_bytes(), None).await.unwrap();
        let kv = b.get("/cross/k").await.unwrap().expect("the key must be visible through the other member");
        assert_eq!((kv.text(), kv.mod_revision), (i.to_string(), rev), "round {i}");
    }
    let rev = a.put("/cross/ttl", b"1", Some(Duration::from_secs(30))).await.unwrap();
    let kv = b.get("/cross/ttl").await.unwrap().unwrap();
    assert_eq!(kv.mod_revision, rev);
    assert!(kv.ttl_left.is_some_and(|t| t > Duration::from_secs(25) && t <= Duration::from_secs(30)), "{kv:?}");
    let keys: Vec<String> = b.list("/cross/").await.unwrap().into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["/cross/k", "/cross/ttl"]);

    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.put("/cross/k", b"watched", None).await.unwrap()
    });
    let known = b.get("/cross/k").await.unwrap().unwrap().mod_revision;
    let t = Instant::now();
    let got = b.watch("/cross/k", Some(known), Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "the watch took {:?}", t.elapsed());
    let written = writer.await.unwrap();
    assert_eq!((got.text(), got.mod_revision), ("watched".to_string(), written));
}

/// A client keeps working when the member it uses dies, and a watch on that member moves to
/// another one without missing the change it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_when_its_member_dies() {
    let mut etcd = start(3).await;
    let leader = etcd.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    // Kill a follower, so no election gets in the way of the timing below.
    let victim = (leader + 1) % 3;
    let urls = etcd.client_urls();
    let mut endpoints = vec![urls[victim].clone()];
    endpoints.extend(urls.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, u)| u.clone()));
    let store = Arc::new(connect(endpoints).await);
    assert_eq!(store.status().await.unwrap().endpoint, urls[victim], "the client starts on the first endpoint");
    let rev = store.put("/moves/k", b"1", None).await.unwrap();

    let other = connect(vec![urls[leader].clone()]).await;
    let watcher = {
        let store = store.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let got = store.watch("/moves/k", Some(rev), Duration::from_secs(10)).await;
            (got, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.kill(victim);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rev2 = other.put("/moves/k", b"2", None).await.unwrap();
    let (got, took) = watcher.await.unwrap();
    let kv = got.unwrap().expect("the key exists");
    assert_eq!((kv.text(), kv.mod_revision), ("2".to_string(), rev2), "the watch must see the change");
    assert!(took < Duration::from_secs(3), "the watch took {took:?}");

    // Plain calls go to a live member from now on.
    let kv = store.get("/moves/k").await.unwrap().unwrap();
    assert_eq!(kv.mod_revision, rev2);
    let rev3 = store.put("/moves/k", b"3", None).await.unwrap();
    assert!(rev3 > rev2);
    assert_ne!(store.status().await.unwrap().endpoint, urls[victim]);
}

/// `connect` names every endpoint it tried and why it failed; bad URLs are configuration errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_name_the_endpoints() {
    // Ports that were just free: nothing listens there.
    let closed: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        })
        .collect();
    let err = EtcdStore::connect(closed.clone(), REQUEST_TIMEOUT).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DcsError::Unavailable(_)), "{err:?}");
    for url in &closed {
        assert!(msg.contains(url.as_str()), "the error must name {url}: {msg}");
    }
    assert!(msg.contains("cannot connect"), "{msg}");

    let err = EtcdStore::connect(vec!["https://127.0.0.1:2379".into()], REQUEST_TIMEOUT).await.unwrap_err();
    assert!(matches!(&err, DcsError::Misconfigured(m) if m.contains("https is not supported yet")), "{err:?}");
    let err = EtcdStore::connect(vec![], REQUEST_TIMEOUT).await.unwrap_err();
    assert!(matches!(&err, DcsError::Misconfigured(m) if m.contains("no etcd endpoints")), "{err:?}");
}

/// Something that answers HTTP but is not etcd is reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_etcd_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ =
                s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nNot Found").await;
        }
    });
    let err = EtcdStore::connect(vec![url.clone()], REQUEST_TIMEOUT).await.unwrap_err();
    server.abort();
    let msg = err.to_string();
    assert!(msg.contains(&url) && msg.contains("HTTP 404") && msg.contains("etcd 3.4 or newer"), "{msg}");
}

/// A key rewritten with a TTL does not leave its old leases behind: they are revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_revoke_the_previous_lease() {
    let etcd = start(1).await;
    let store = connect(etcd.client_urls()).await;
    for i in 0..5 {
        store.put("/lease/k", i.to_string().as_bytes(), Some(Duration::from_secs(60))).await.unwrap();
    }
    let kv = store.get("/lease/k").await.unwrap().unwrap();
    let rev = kv.mod_revision;
    store.compare_and_set("/lease/k", b"cas", rev, Some(Duration::from_secs(60))).await.unwrap().unwrap();
    // A failed CAS revokes the lease it granted.
    assert_eq!(store.compare_and_set("/lease/k", b"stale", rev, Some(Duration::from_secs(60))).await.unwrap(), None);
    // Revocation runs in the background: poll the lease count.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leases = lease_count(&etcd.client_urls()[0]).await;
        if leases == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{leases} leases left for one TTL key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.delete("/lease/k", None).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_count(&etcd.client_urls()[0]).await != 0 {
        assert!(Instant::now() < deadline, "the lease of a deleted key must be revoked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many leases etcd holds (`/v3/lease/leases`), asked with a bare HTTP request.
async fn lease_count(url: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(authority).await.unwrap();
    let req = format!(
        "POST /v3/lease/leases HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n\
         content-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    // The body may be chunked; the JSON object sits between the first '{' and the last '}'.
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["leases"].as_array().map_or(0, Vec::len)
}
