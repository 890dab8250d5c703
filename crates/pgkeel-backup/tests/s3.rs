//! The S3 storage against a real S3-compatible server (moto, started on a free port and
//! stopped at the end of each test). Without moto these tests fail, saying how to install it.

use std::io::{Read, Write};
use std::sync::Arc;

use pgkeel_backup::s3::{S3Storage, MIN_PART_SIZE};
use pgkeel_backup::storage::{Storage, WriteMode, WriteOutcome};
use pgkeel_backup::testing::Moto;
use pgkeel_backup::{FetchOutcome, PushOutcome, Repo};

fn moto() -> Moto {
    Moto::start().unwrap_or_else(|e| panic!("{e}"))
}

fn storage(m: &Moto, bucket: &str, prefix: &str) -> S3Storage {
    let s = S3Storage::new(m.config(bucket, prefix)).unwrap();
    s.create_bucket().unwrap();
    s
}

#[test]
fn objects_round_trip_no_clobber_list_and_delete() {
    let m = moto();
    let s = storage(&m, "pgkeel-a", "some/prefix");
    s.check().unwrap();
    assert!(s.read("x/y/z").unwrap().is_none());
    assert!(!s.exists("x/y/z").unwrap());
    assert_eq!(s.write("x/y/z", b"one", WriteMode::NoClobber).unwrap(), WriteOutcome::Written);
    assert_eq!(s.write("x/y/z", b"two", WriteMode::NoClobber).unwrap(), WriteOutcome::Exists);
    assert_eq!(s.read("x/y/z").unwrap().unwrap(), b"one");
    assert_eq!(s.write("x/y/z", b"three", WriteMode::Overwrite).unwrap(), WriteOutcome::Written);
    assert_eq!(s.read("x/y/z").unwrap().unwrap(), b"three");
    s.write("x/a", b"", WriteMode::Overwrite).unwrap();
    assert_eq!(s.read("x/a").unwrap().unwrap(), b"", "an empty object");
    s.write("x/name with space+plus", b"odd", WriteMode::Overwrite).unwrap();
    assert_eq!(s.read("x/name with space+plus").unwrap().unwrap(), b"odd");
    assert_eq!(s.list("x").unwrap(), ["a", "name with space+plus", "y"]);
    assert_eq!(s.list("").unwrap(), ["x"]);
    assert!(s.list("nope").unwrap().is_empty());
    assert!(s.exists("x/a").unwrap());

    // An abandoned write leaves nothing visible.
    let mut w = s.create("x/abandoned").unwrap();
    w.write_all(b"partial").unwrap();
    drop(w);
    assert!(!s.exists("x/abandoned").unwrap());

    let tree: Vec<String> = s.list_tree("x").unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(tree, ["x/a", "x/name with space+plus", "x/y/z"]);
    let info = s.list_tree("x/y").unwrap();
    assert_eq!(info[0].size, 5);
    assert!(info[0].modified_us > 1_700_000_000_000_000, "{info:?}");

    // Nothing outside the prefix is seen or touched.
    let other = storage(&m, "pgkeel-a", "some/prefixx");
    other.write("x/a", b"other", WriteMode::Overwrite).unwrap();
    assert_eq!(s.list_tree("").unwrap().len(), 3);

    s.delete("x/a").unwrap();
    s.delete("x/a").unwrap();
    assert!(!s.exists("x/a").unwrap());
    assert_eq!(s.delete_tree("x").unwrap(), 2);
    assert!(s.list_tree("").unwrap().is_empty());
    assert_eq!(other.read("x/a").unwrap().unwrap(), b"other");
}

#[test]
fn large_objects_use_multipart_and_listing_pages() {
    let m = moto();
    let mut cfg = m.config("pgkeel-b", "");
    cfg.part_size = MIN_PART_SIZE;
    cfg.list_page = 3;
    let s = S3Storage::new(cfg).unwrap();
    s.create_bucket().unwrap();

    // 12 MiB + a bit in odd-sized writes: three parts.
    let data: Vec<u8> = (0..(12 << 20) + 12345u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut w = s.create("big/object").unwrap();
    for chunk in data.chunks(100_003) {
        w.write_all(chunk).unwrap();
    }
    assert!(!s.exists("big/object").unwrap(), "invisible before commit");
    assert_eq!(w.commit(WriteMode::NoClobber).unwrap(), WriteOutcome::Written);
    let mut back = Vec::new();
    s.open("big/object").unwrap().unwrap().read_to_end(&mut back).unwrap();
    assert!(back == data, "multipart round trip");

    // A second no-clobber multipart write of the same key is refused and changes nothing.
    let mut w = s.create("big/object").unwrap();
    w.write_all(&vec![7u8; 6 << 20]).unwrap();
    assert_eq!(w.commit(WriteMode::NoClobber).unwrap(), WriteOutcome::Exists);
    assert_eq!(s.read("big/object").unwrap().unwrap().len(), data.len());

    // An abandoned multipart upload leaves nothing.
    let mut w = s.create("big/abandoned").unwrap();
    w.write_all(&vec![1u8; 6 << 20]).unwrap();
    drop(w);
    assert!(!s.exists("big/abandoned").unwrap());

    // Listings across pages (3 keys a page).
    for i in 0..10 {
        s.write(&format!("many/k{i:02}"), b"x", WriteMode::Overwrite).unwrap();
        s.write(&format!("many/d{i:02}/f"), b"x", WriteMode::Overwrite).unwrap();
    }
    let names = s.list("many").unwrap();
    assert_eq!(names.len(), 20, "{names:?}");
    assert_eq!(names[0], "d00");
    assert_eq!(names[19], "k09");
    assert_eq!(s.list_tree("many").unwrap().len(), 20);
    assert_eq!(s.delete_tree("many").unwrap(), 20);
    assert!(s.list("many").unwrap().is_empty());
}

#[test]
fn missing_bucket_and_unreachable_endpoint_are_explained() {
    let m = moto();
    let s = S3Storage::new(m.config("pgkeel-missing", "")).unwrap();
    let err = s.check().unwrap_err().to_string();
    assert!(err.contains("pgkeel-missing") && err.contains("does not exist"), "{err}");

    let mut cfg = m.config("pgkeel-x", "");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.authority = format!("127.0.0.1:{port}");
    let err = S3Storage::new(cfg).unwrap().check().unwrap_err().to_string();
    assert!(err.contains(&port.to_string()) && err.contains("PGKEEL_S3_ENDPOINT"), "{err}");
}

#[test]
fn wal_archive_on_s3_handles_duplicates_and_corruption() {
    let m = moto();
    let s = Arc::new(storage(&m, "pgkeel-wal", "repo"));
    let repo = Repo::new(s.clone(), "c1").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let name = "000000010000000000000003";
    let p = tmp.path().join(name);
    std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
    assert_eq!(repo.push_wal(&p).unwrap(), PushOutcome::Stored);
    assert_eq!(repo.push_wal(&p).unwrap(), PushOutcome::AlreadyArchived);
    std::fs::write(&p, vec![8u8; 1 << 20]).unwrap();
    let err = format!("{:#}", repo.push_wal(&p).unwrap_err());
    assert!(err.contains("different content") && err.contains(name), "{err}");

    let dest = tmp.path().join("RECOVERYXLOG");
    assert_eq!(repo.fetch_wal(name, &dest).unwrap(), FetchOutcome::Restored);
    assert_eq!(std::fs::read(&dest).unwrap(), vec![7u8; 1 << 20], "the first content stays");
    assert_eq!(repo.fetch_wal("000000010000000000000004", &dest).unwrap(), FetchOutcome::Missing);

    // Damage the archived object behind pgkeel's back: fetch refuses it.
    let key = "c1/wal/0000000100000000/000000010000000000000003.zst";
    let mut bytes = s.read(key).unwrap().unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    s.write(key, &bytes, WriteMode::Overwrite).unwrap();
    let err = format!("{:#}", repo.fetch_wal(name, &dest).unwrap_err());
    assert!(err.contains("corrupt"), "{err}");
}

/// A TLS front for moto on a free port, with a certificate for 127.0.0.1 from a throwaway CA;
/// returns the port, the CA's PEM and the runtime serving it (dropped with the test).
fn tls_front(moto_port: u16) -> (u16, String, tokio::runtime::Runtime) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::pem::PemObject;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else { return };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", moto_port)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (port, ca_pem, rt)
}

#[test]
fn https_endpoint_checked_against_the_configured_ca() {
    let m = moto();
    let moto_port: u16 = m.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let (port, ca_pem, _rt) = tls_front(moto_port);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let [(_, key), (_, secret), _] = Moto::env();
    let settings = pgkeel_config::S3Settings {
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        region: None,
        access_key_id: Some(key.into()),
        secret_access_key: Some(secret.into()),
        ca_file: Some(ca_file.clone()),
    };
    let s = S3Storage::from_url_with("s3://pgkeel-tls/p", &settings).unwrap();
    s.create_bucket().unwrap();
    assert_eq!(s.write("k", b"over tls", WriteMode::NoClobber).unwrap(), WriteOutcome::Written);
    assert_eq!(s.read("k").unwrap().unwrap(), b"over tls");
    assert!(s.describe().contains("https://127.0.0.1"), "{}", s.describe());

    // The system's CAs do not vouch for this certificate: refused, naming the endpoint.
    let untrusted =
        S3Storage::from_url_with("s3://pgkeel-tls/p", &pgkeel_config::S3Settings { ca_file: None, ..settings })
            .unwrap();
    let err = format!("{:#}", untrusted.read("k").unwrap_err());
    assert!(err.contains("https://127.0.0.1") && err.to_lowercase().contains("certificate"), "{err}");
}
