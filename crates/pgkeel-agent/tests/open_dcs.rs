//! `open_dcs` for the etcd kind: it checks reachability, the store works on the caller's
//! runtime, and an unreachable etcd stops it with the endpoints it tried.

use std::time::Duration;

use pgkeel_config::NodeConfig;
use pgkeel_dcs::testing::EtcdCluster;

fn etcd_config(endpoints: &[String]) -> NodeConfig {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let text = format!(
        "cluster = \"main\"\nname = \"n1\"\ndata_dir = \"/var/lib/pgkeel/n1/data\"\n\
         [dcs]\nkind = \"etcd\"\nendpoints = [{}]\n",
        list.join(", ")
    );
    pgkeel_config::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(flavor = "current_thread")]
async fn open_dcs_connects_to_etcd_inside_a_runtime() {
    let etcd = EtcdCluster::start(1).await.unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = pgkeel_agent::open_dcs(&etcd_config(&etcd.client_urls())).await.expect("open_dcs");
    assert_eq!(store.describe(), format!("etcd:{}", etcd.client_urls()[0]));
    // The store works on the caller's runtime, not only on the one that checked it.
    let rev = store.put("/open/k", b"1", Some(Duration::from_secs(10))).await.unwrap();
    let kv = store.get("/open/k").await.unwrap().unwrap();
    assert_eq!(kv.mod_revision, rev);
    assert!(kv.ttl_left.is_some());
}

#[tokio::test(flavor = "current_thread")]
async fn open_dcs_reports_an_unreachable_etcd() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err =
        pgkeel_agent::open_dcs(&etcd_config(std::slice::from_ref(&closed))).await.expect_err("nothing listens there");
    let msg = format!("{err:#}");
    assert!(msg.contains("dcs.endpoints") && msg.contains(&closed) && msg.contains("cannot connect"), "{msg}");
}
