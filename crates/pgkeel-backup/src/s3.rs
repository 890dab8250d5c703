//! A repository in an S3-compatible bucket: [`S3Storage`] implements [`Storage`] with a small
//! hand-rolled client (AWS Signature Version 4 over hyper's HTTP/1.1 client, path-style
//! addressing, plain-HTTP endpoints only for now).
//!
//! - Writes buffer up to one part in memory: a small object is one `PUT`; a larger one is a
//!   multipart upload (parts of 16 MiB, growing past 1000 parts) completed on `commit`, and
//!   aborted when the writer is dropped uncommitted. Nothing is visible before `commit`.
//! - [`WriteMode::NoClobber`]: a `HEAD` first (an existing object is left alone without
//!   uploading anything), then the `PUT` (or the multipart completion) carries
//!   `If-None-Match: *`, which makes the server refuse to replace an object that appeared in
//!   between (412). A server that rejects the header as not implemented (501) gets the plain
//!   write after the `HEAD` check, which is racy: two writers of one key in the same instant
//!   could both succeed (pgkeel warns once). A server that silently ignores the header
//!   behaves the same way.
//! - Reads stream: the body is handed over in chunks as it arrives (bounded buffering).
//! - Listing uses ListObjectsV2 with pagination; deleting a tree deletes its objects 16 at a
//!   time.
//!
//! The Storage trait is blocking; the client runs its own small tokio runtime, so it can be
//! used from any thread, inside or outside another runtime.

use std::future::Future;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::codec::hex;
use crate::sigv4::{self, Credentials, SignRequest, EMPTY_SHA256};
use crate::storage::{check_key, ObjectInfo, ObjectWriter, Storage, WriteMode, WriteOutcome};
use crate::timefmt::{label_utc, now_us, parse_timestamp};

/// Default size of one multipart upload part.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// The smallest part S3 accepts (all parts but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Where and how to reach a bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; empty for the whole bucket).
    pub prefix: String,
    /// `host:port` of the endpoint.
    pub authority: String,
    /// TLS settings for an `https://` endpoint (`None`: plain HTTP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Region to sign for.
    pub region: String,
    /// Credentials.
    pub credentials: Credentials,
    /// Multipart part size (at least [`MIN_PART_SIZE`]).
    pub part_size: usize,
    /// Keys per ListObjectsV2 page (1 to 1000).
    pub list_page: u32,
}

/// Whether a repository location is an S3 URL.
pub fn is_s3_url(repo: &str) -> bool {
    repo.starts_with("s3://")
}

impl S3Config {
    /// Reads `s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=REGION]`, taking what the
    /// URL does not say from the environment: `PGKEEL_S3_ENDPOINT`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`; default `us-east-1`), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    pub fn from_url(url: &str) -> anyhow::Result<S3Config> {
        S3Config::from_url_with(url, &pgkeel_config::S3Settings::default())
    }

    /// [`S3Config::from_url`], with `settings` (node.toml's `[backup.s3]`, or the file given
    /// by `--s3-config`) taking precedence over the environment and the URL.
    pub fn from_url_with(url: &str, settings: &pgkeel_config::S3Settings) -> anyhow::Result<S3Config> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(rest) = url.strip_prefix("s3://") else {
            bail!("{url:?} is not an S3 repository URL: write s3://BUCKET/PREFIX");
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            bail!(
                "repository {url:?}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '.' and '-'); \
                 write s3://BUCKET/PREFIX"
            );
        }
        if !prefix.is_empty() {
            check_key(&prefix).map_err(|_| {
                anyhow::anyhow!("repository {url:?}: the prefix {prefix:?} must be a plain path like backups/main")
            })?;
        }
        let mut endpoint = None;
        let mut region = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) => endpoint = Some(v.to_string()),
                Some(("region", v)) => region = Some(v.to_string()),
                _ => bail!("repository {url:?}: unknown option {pair:?} (known: endpoint=URL, region=NAME)"),
            }
        }
        let endpoint =
            settings.endpoint.clone().or(endpoint).or_else(|| env("PGKEEL_S3_ENDPOINT")).with_context(|| {
                format!(
                    "repository {url}: say where the S3 service is: PGKEEL_S3_ENDPOINT=http://HOST:PORT (or \
                 ?endpoint=http://HOST:PORT in the URL)"
                )
            })?;
        let (https, authority) = parse_endpoint(&endpoint)?;
        let tls = if https { Some(tls_config(settings.ca_file.as_deref())?) } else { None };
        let region = settings
            .region
            .clone()
            .or(region)
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or("us-east-1".into());
        let from_settings = settings.access_key_id.clone().zip(settings.secret_access_key.clone());
        let session_token = if from_settings.is_some() { None } else { env("AWS_SESSION_TOKEN") };
        let Some((access_key, secret_key)) =
            from_settings.or_else(|| env("AWS_ACCESS_KEY_ID").zip(env("AWS_SECRET_ACCESS_KEY")))
        else {
            bail!(
                "repository {url}: no S3 credentials: set access_key_id and secret_access_key in node.toml's \
                 [backup.s3], or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
            );
        };
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix,
            authority,
            tls,
            region,
            credentials: Credentials { access_key, secret_key, session_token },
            part_size: DEFAULT_PART_SIZE,
            list_page: 1000,
        })
    }

    /// The full key of a repository key.
    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The list prefix for a "directory" key (`""` is the repository root).
    fn dir_prefix(&self, prefix: &str) -> String {
        match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => String::new(),
            (false, true) => format!("{}/", self.prefix),
            (_, false) => format!("{}/", self.full_key(prefix)),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The repository key of a full key below the repository prefix.
    fn strip(&self, full: &str) -> Option<String> {
        if self.prefix.is_empty() {
            return Some(full.to_string());
        }
        full.strip_prefix(&self.prefix).and_then(|r| r.strip_prefix('/')).map(str::to_string)
    }

    fn describe(&self) -> String {
        let prefix = if self.prefix.is_empty() { String::new() } else { format!("/{}", self.prefix) };
        format!("s3://{}{prefix} at {}://{}", self.bucket, self.scheme(), self.authority)
    }

    /// Part size for part number `n` (1-based): the base size, growing by the base size every
    /// 1000 parts, so that S3's 10,000 parts hold 55,000 base parts' worth (880 GiB at 16 MiB).
    fn part_size(&self, n: usize) -> usize {
        self.part_size.max(MIN_PART_SIZE) * (1 + n.saturating_sub(1) / 1000)
    }
}

/// `http://HOST[:PORT][/]` to `HOST:PORT`.
/// `(https, host:port)` of an endpoint URL.
fn parse_endpoint(endpoint: &str) -> anyhow::Result<(bool, String)> {
    let (https, rest) = if let Some(r) = endpoint.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = endpoint.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("S3 endpoint {endpoint:?}: write it as https://HOST[:PORT] or http://HOST:PORT");
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains('@') {
        bail!("S3 endpoint {endpoint:?}: write it as https://HOST[:PORT] (no path; the bucket goes in s3://BUCKET)");
    }
    let has_port = match host.rfind(':') {
        Some(i) => !host.ends_with(']') && host[i + 1..].parse::<u16>().is_ok(),
        None => false,
    };
    let default_port = if https { 443 } else { 80 };
    Ok((https, if has_port { host.to_string() } else { format!("{host}:{default_port}") }))
}

/// The system's CA bundles, tried in order when no `ca_file` is given.
const SYSTEM_CA_FILES: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// A TLS client configuration trusting the CA certificates in `ca_file` (PEM), or the
/// system's bundle.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let path = match ca_file {
        Some(p) => p.to_path_buf(),
        None => SYSTEM_CA_FILES.iter().map(std::path::PathBuf::from).find(|p| p.exists()).with_context(|| {
            format!(
                "no CA certificates to check the S3 endpoint with: none of {} exists; install ca-certificates or set \
                 ca_file in [backup.s3]",
                SYSTEM_CA_FILES.join(", ")
            )
        })?,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("reading CA certificates from {}: {e}", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("{} holds no usable CA certificate (PEM)", path.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A response with its whole body.
struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    /// `CODE: message` from an S3 error body, or the status alone.
    fn error_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        match (xml_value(&text, "Code"), xml_value(&text, "Message")) {
            (Some(c), Some(m)) => format!("{} {c}: {m}", self.status),
            (Some(c), None) => format!("{} {c}", self.status),
            _ => format!("HTTP {}", self.status),
        }
    }
}

/// The connection pool and configuration, shared by the tasks of the client's runtime.
struct Shared {
    cfg: S3Config,
    pool: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// The server answered `If-None-Match: *` with 501: write without it (after a HEAD).
    no_conditional: AtomicBool,
}

/// How many times a request is tried (transient failures: connection errors, 5xx, 429).
const ATTEMPTS: u32 = 4;

impl Shared {
    fn path(&self, full_key: Option<&str>) -> String {
        match full_key {
            Some(k) => format!("/{}/{}", self.cfg.bucket, sigv4::uri_encode(k, true)),
            None => format!("/{}", self.cfg.bucket),
        }
    }

    fn what(&self, method: &Method, full_key: Option<&str>) -> String {
        format!(
            "S3 {method} s3://{}/{} at {}://{}",
            self.cfg.bucket,
            full_key.unwrap_or(""),
            self.cfg.scheme(),
            self.cfg.authority
        )
    }

    async fn connection(&self) -> io::Result<SendRequest<Full<Bytes>>> {
        loop {
            let pooled = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
            match pooled {
                Some(s) if !s.is_closed() && s.is_ready() => return Ok(s),
                Some(_) => continue,
                None => break,
            }
        }
        let stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&self.cfg.authority))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out after 10s"))??;
        stream.set_nodelay(true)?;
        let Some(tls) = &self.cfg.tls else {
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(sender);
        };
        let host = self.cfg.authority.rsplit_once(':').map_or(self.cfg.authority.as_str(), |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("S3 endpoint host {host:?}: {e}")))?;
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out after 10s"))??;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn give_back(&self, s: SendRequest<Full<Bytes>>) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < 32 {
                p.push(s);
            }
        }
    }

    /// Sends one signed request; returns the response head and body stream, and the
    /// connection (to give back once the body is read).
    async fn send_once(
        &self,
        method: &Method,
        full_key: Option<&str>,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: &Bytes,
    ) -> io::Result<(hyper::Response<Incoming>, SendRequest<Full<Bytes>>)> {
        let path = self.path(full_key);
        let payload_sha = if body.is_empty() { EMPTY_SHA256.to_string() } else { hex(&Sha256::digest(body)) };
        let mut to_sign = vec![("host".to_string(), self.cfg.authority.clone())];
        to_sign.extend(headers.iter().cloned());
        let amz_date = label_utc(now_us());
        let req = SignRequest {
            method: method.as_str(),
            path: &path,
            query,
            headers: &to_sign,
            payload_sha256: &payload_sha,
        };
        let signed = sigv4::sign(&req, &self.cfg.credentials, &self.cfg.region, &amz_date);
        let q = sigv4::canonical_query(query);
        let uri = if q.is_empty() { path.clone() } else { format!("{path}?{q}") };
        let mut builder = Request::builder().method(method.clone()).uri(uri);
        for (k, v) in to_sign.iter().chain(signed.iter()) {
            builder = builder.header(k.as_str(), v.as_str());
        }
        builder = builder.header("user-agent", concat!("pgkeel/", env!("CARGO_PKG_VERSION")));
        if matches!(*method, Method::PUT | Method::POST) {
            builder = builder.header("content-length", body.len().to_string());
        }
        let request = builder.body(Full::new(body.clone())).map_err(io::Error::other)?;
        let mut sender = self.connection().await?;
        // Long enough to upload a large part over a slow link.
        let limit = Duration::from_secs(60 + (body.len() as u64 >> 18));
        let resp = tokio::time::timeout(limit, sender.send_request(request))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {limit:?}")))?
            .map_err(io::Error::other)?;
        Ok((resp, sender))
    }

    /// Sends a request, retrying transient failures, and reads the whole response.
    async fn request(
        &self,
        method: Method,
        full_key: Option<&str>,
        query: &[(String, String)],
        headers: &[(String, String)],
        body: Bytes,
    ) -> io::Result<Resp> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                let (resp, sender) = self.send_once(&method, full_key, query, headers, &body).await?;
                let status = resp.status().as_u16();
                let head = resp.headers().clone();
                let bytes = tokio::time::timeout(Duration::from_secs(120), resp.into_body().collect())
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reading the answer timed out"))?
                    .map_err(io::Error::other)?
                    .to_bytes();
                self.give_back(sender);
                Ok::<_, io::Error>(Resp { status, headers: head, body: bytes })
            }
            .await;
            let transient = match &result {
                Ok(r) => r.status >= 500 && r.status != 501 || r.status == 429,
                Err(_) => true,
            };
            if !transient || attempt >= ATTEMPTS {
                return result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.what(&method, full_key))));
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    fn fail(&self, method: &Method, full_key: Option<&str>, r: &Resp) -> io::Error {
        let hint = match r.status {
            403 => " (check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions)",
            404 => " (does the bucket exist?)",
            _ => "",
        };
        let kind = match r.status {
            403 => io::ErrorKind::PermissionDenied,
            404 => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{}: {}{hint}", self.what(method, full_key), r.error_text()))
    }

    async fn head(&self, full_key: &str) -> io::Result<bool> {
        let r = self.request(Method::HEAD, Some(full_key), &[], &[], Bytes::new()).await?;
        match r.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.fail(&Method::HEAD, Some(full_key), &r)),
        }
    }

    async fn delete(&self, full_key: &str) -> io::Result<()> {
        let r = self.request(Method::DELETE, Some(full_key), &[], &[], Bytes::new()).await?;
        match r.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.fail(&Method::DELETE, Some(full_key), &r)),
        }
    }

    /// ListObjectsV2 of `prefix`, every page: (keys with size and time, common prefixes).
    async fn list(&self, prefix: &str, delimiter: bool) -> io::Result<(Vec<ObjectInfo>, Vec<String>)> {
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![
                ("list-type".to_string(), "2".to_string()),
                ("prefix".to_string(), prefix.to_string()),
                ("max-keys".to_string(), self.cfg.list_page.clamp(1, 1000).to_string()),
            ];
            if delimiter {
                query.push(("delimiter".to_string(), "/".to_string()));
            }
            if let Some(t) = &token {
                query.push(("continuation-token".to_string(), t.clone()));
            }
            let r = self.request(Method::GET, None, &query, &[], Bytes::new()).await?;
            if r.status != 200 {
                return Err(self.fail(&Method::GET, Some(prefix), &r));
            }
            let text = String::from_utf8_lossy(&r.body);
            for c in xml_blocks(&text, "Contents") {
                let Some(key) = xml_value(c, "Key") else { continue };
                let size = xml_value(c, "Size").and_then(|s| s.parse().ok()).unwrap_or(0);
                let modified_us = xml_value(c, "LastModified").and_then(|t| parse_timestamp(&t).ok()).unwrap_or(0);
                objects.push(ObjectInfo { key, size, modified_us });
            }
            for c in xml_blocks(&text, "CommonPrefixes") {
                if let Some(p) = xml_value(c, "Prefix") {
                    prefixes.push(p);
                }
            }
            let truncated = xml_value(&text, "IsTruncated").is_some_and(|v| v == "true");
            token = xml_value(&text, "NextContinuationToken");
            if !truncated {
                break;
            }
            if token.is_none() {
                return Err(io::Error::other(format!(
                    "{}: a truncated listing without a continuation token",
                    self.what(&Method::GET, Some(prefix))
                )));
            }
        }
        Ok((objects, prefixes))
    }
}

/// The blocking face of the client: a small runtime of its own.
struct Client {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

impl Client {
    /// Runs `fut` on the client's runtime and waits for it (from any thread).
    fn block<T, F>(&self, fut: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = io::Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| io::Error::other("the S3 client stopped"))?
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Never blocks (this may run inside another runtime).
            rt.shutdown_background();
        }
    }
}

/// A repository in an S3-compatible bucket (see the module documentation).
pub struct S3Storage {
    client: Arc<Client>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Storage({})", self.client.shared.cfg.describe())
    }
}

impl S3Storage {
    /// A storage on the bucket `cfg` describes (nothing is contacted yet).
    pub fn new(cfg: S3Config) -> io::Result<S3Storage> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgkeel-s3")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let shared = Arc::new(Shared { cfg, pool: Mutex::new(Vec::new()), no_conditional: AtomicBool::new(false) });
        Ok(S3Storage { client: Arc::new(Client { runtime: Some(runtime), handle, shared }) })
    }

    /// `s3://...` with settings from the URL and the environment (see [`S3Config::from_url`]).
    pub fn from_url(url: &str) -> anyhow::Result<S3Storage> {
        Ok(S3Storage::new(S3Config::from_url(url)?)?)
    }

    /// `s3://...` with `settings` first (see [`S3Config::from_url_with`]).
    pub fn from_url_with(url: &str, settings: &pgkeel_config::S3Settings) -> anyhow::Result<S3Storage> {
        Ok(S3Storage::new(S3Config::from_url_with(url, settings)?)?)
    }

    /// Creates the bucket (for tests and first setup); an existing one is fine.
    pub fn create_bucket(&self) -> io::Result<()> {
        let shared = self.client.shared.clone();
        self.client.block(async move {
            let r = shared.request(Method::PUT, None, &[], &[], Bytes::new()).await?;
            match r.status {
                200 => Ok(()),
                409 if r.error_text().contains("BucketAlreadyOwnedByYou") => Ok(()),
                _ => Err(shared.fail(&Method::PUT, None, &r)),
            }
        })
    }

    fn shared(&self) -> Arc<Shared> {
        self.client.shared.clone()
    }
}

impl Storage for S3Storage {
    fn describe(&self) -> String {
        self.client.shared.cfg.describe()
    }

    fn check(&self) -> io::Result<()> {
        let shared = self.shared();
        self.client.block(async move {
            let r = shared.request(Method::HEAD, None, &[], &[], Bytes::new()).await.map_err(|e| {
                io::Error::new(e.kind(), format!("{e} (is PGKEEL_S3_ENDPOINT right, and the service running?)"))
            })?;
            match r.status {
                200 => Ok(()),
                404 => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "repository {}: the bucket {} does not exist; create it first (e.g. aws s3 mb s3://{} \
                         --endpoint-url http://{})",
                        shared.cfg.describe(),
                        shared.cfg.bucket,
                        shared.cfg.bucket,
                        shared.cfg.authority
                    ),
                )),
                _ => Err(shared.fail(&Method::HEAD, None, &r)),
            }
        })
    }

    fn open(&self, key: &str) -> io::Result<Option<Box<dyn Read + Send>>> {
        check_key(key)?;
        let shared = self.shared();
        let full = shared.cfg.full_key(key);
        let reader = self.client.block(async move {
            let mut attempt = 0;
            let (resp, sender) = loop {
                attempt += 1;
                match shared.send_once(&Method::GET, Some(&full), &[], &[], &Bytes::new()).await {
                    Ok((resp, sender)) if resp.status().as_u16() < 500 || attempt >= ATTEMPTS => break (resp, sender),
                    Ok(_) => {}
                    Err(e) if attempt >= ATTEMPTS => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{}: {e}", shared.what(&Method::GET, Some(&full))),
                        ))
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            };
            let status = resp.status().as_u16();
            if status != 200 {
                let headers = resp.headers().clone();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if status == 404 && !String::from_utf8_lossy(&body).contains("NoSuchBucket") {
                    shared.give_back(sender);
                    return Ok(None);
                }
                return Err(shared.fail(&Method::GET, Some(&full), &Resp { status, headers, body }));
            }
            Ok(Some(stream_body(shared.clone(), resp.into_body(), sender, full)))
        })?;
        Ok(reader.map(|r| Box::new(r) as Box<dyn Read + Send>))
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        check_key(key)?;
        let full = self.client.shared.cfg.full_key(key);
        Ok(Box::new(S3Writer { client: self.client.clone(), key: full, buf: Vec::new(), upload: None, done: false }))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let shared = self.shared();
        let dir = shared.cfg.dir_prefix(prefix);
        let (objects, prefixes) = self.client.block({
            let (shared, dir) = (shared.clone(), dir.clone());
            async move { shared.list(&dir, true).await }
        })?;
        let mut names: Vec<String> = objects
            .iter()
            .map(|o| o.key.as_str())
            .chain(prefixes.iter().map(|p| p.trim_end_matches('/')))
            .filter_map(|k| k.strip_prefix(&dir))
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        check_key(key)?;
        let shared = self.shared();
        let full = shared.cfg.full_key(key);
        self.client.block(async move { shared.head(&full).await })
    }

    fn list_tree(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let shared = self.shared();
        let dir = shared.cfg.dir_prefix(prefix);
        let (objects, _) = self.client.block({
            let shared = shared.clone();
            async move { shared.list(&dir, false).await }
        })?;
        let mut out: Vec<ObjectInfo> =
            objects.into_iter().filter_map(|o| shared.cfg.strip(&o.key).map(|key| ObjectInfo { key, ..o })).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        check_key(key)?;
        let shared = self.shared();
        let full = shared.cfg.full_key(key);
        self.client.block(async move { shared.delete(&full).await })
    }

    fn delete_tree(&self, prefix: &str) -> io::Result<usize> {
        check_key(prefix)?;
        let keys: Vec<String> = self.list_tree(prefix)?.into_iter().map(|o| o.key).collect();
        self.delete_keys(&keys)?;
        Ok(keys.len())
    }

    fn delete_keys(&self, keys: &[String]) -> io::Result<()> {
        for key in keys {
            check_key(key)?;
        }
        let keys = keys.to_vec();
        let shared = self.shared();
        self.client.block(async move {
            for chunk in keys.chunks(16) {
                let mut set = tokio::task::JoinSet::new();
                for key in chunk {
                    let (shared, full) = (shared.clone(), shared.cfg.full_key(key));
                    set.spawn(async move { shared.delete(&full).await });
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(io::Error::other)??;
                }
            }
            Ok(())
        })
    }
}

/// A message from the task reading a GET body.
enum Chunk {
    Data(Bytes),
    End,
    Failed(io::Error),
}

/// Chunks buffered ahead of the reader.
const READ_AHEAD: usize = 16;

/// Starts a task that pumps `body` into a channel; returns the blocking reader of it.
fn stream_body(shared: Arc<Shared>, mut body: Incoming, sender: SendRequest<Full<Bytes>>, key: String) -> S3Reader {
    let (tx, rx) = std::sync::mpsc::channel();
    let permits = Arc::new(Semaphore::new(READ_AHEAD));
    let task_permits = permits.clone();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = task_permits.acquire().await else { return };
            permit.forget();
            let frame = match tokio::time::timeout(Duration::from_secs(120), body.frame()).await {
                Err(_) => Chunk::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("reading s3 object {key}: no data for 120s"),
                )),
                Ok(None) => Chunk::End,
                Ok(Some(Err(e))) => Chunk::Failed(io::Error::other(format!("reading s3 object {key}: {e}"))),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Chunk::Data(data),
                    Err(_) => {
                        task_permits.add_permits(1);
                        continue;
                    }
                },
            };
            let last = !matches!(frame, Chunk::Data(_));
            if tx.send(frame).is_err() {
                return; // The reader is gone: drop the connection.
            }
            if last {
                break;
            }
        }
        shared.give_back(sender);
    });
    S3Reader { rx, permits, current: Bytes::new(), finished: false }
}

struct S3Reader {
    rx: std::sync::mpsc::Receiver<Chunk>,
    permits: Arc<Semaphore>,
    current: Bytes,
    finished: bool,
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.finished {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(b)) => {
                    self.permits.add_permits(1);
                    self.current = b;
                }
                Ok(Chunk::End) => self.finished = true,
                Ok(Chunk::Failed(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("the connection to S3 was lost while reading")),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// A multipart upload in progress.
struct Upload {
    id: String,
    /// (part number, ETag).
    parts: Vec<(usize, String)>,
}

struct S3Writer {
    client: Arc<Client>,
    key: String,
    buf: Vec<u8>,
    upload: Option<Upload>,
    done: bool,
}

impl S3Writer {
    fn shared(&self) -> Arc<Shared> {
        self.client.shared.clone()
    }

    /// Uploads the buffer as the next part (starting the multipart upload first if needed).
    fn flush_part(&mut self) -> io::Result<()> {
        let shared = self.shared();
        if self.upload.is_none() {
            let key = self.key.clone();
            let id = self.client.block({
                let shared = shared.clone();
                async move {
                    let q = [("uploads".to_string(), String::new())];
                    let r = shared.request(Method::POST, Some(&key), &q, &[], Bytes::new()).await?;
                    if r.status != 200 {
                        return Err(shared.fail(&Method::POST, Some(&key), &r));
                    }
                    xml_value(&String::from_utf8_lossy(&r.body), "UploadId").ok_or_else(|| {
                        io::Error::other(format!(
                            "{}: no UploadId in the answer",
                            shared.what(&Method::POST, Some(&key))
                        ))
                    })
                }
            })?;
            self.upload = Some(Upload { id, parts: Vec::new() });
        }
        let Some(upload) = &mut self.upload else { return Err(io::Error::other("no multipart upload")) };
        let number = upload.parts.len() + 1;
        let body = Bytes::from(std::mem::take(&mut self.buf));
        let (key, id) = (self.key.clone(), upload.id.clone());
        let etag = self.client.block(async move {
            let q = [("partNumber".to_string(), number.to_string()), ("uploadId".to_string(), id)];
            let r = shared.request(Method::PUT, Some(&key), &q, &[], body).await?;
            if r.status != 200 {
                return Err(shared.fail(&Method::PUT, Some(&key), &r));
            }
            r.headers.get("etag").and_then(|v| v.to_str().ok()).map(str::to_string).ok_or_else(|| {
                io::Error::other(format!("{}: no ETag for part {number}", shared.what(&Method::PUT, Some(&key))))
            })
        })?;
        upload.parts.push((number, etag));
        Ok(())
    }

    fn abort(&mut self) {
        if let Some(upload) = self.upload.take() {
            let (shared, key) = (self.shared(), self.key.clone());
            let _ = self.client.block(async move {
                let q = [("uploadId".to_string(), upload.id)];
                shared.request(Method::DELETE, Some(&key), &q, &[], Bytes::new()).await.map(|_| ())
            });
        }
    }
}

impl Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.done {
            return Err(io::Error::other("write after commit"));
        }
        self.buf.extend_from_slice(data);
        let next = self.upload.as_ref().map_or(0, |u| u.parts.len()) + 1;
        if self.buf.len() >= self.client.shared.cfg.part_size(next) {
            self.flush_part()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn commit(mut self: Box<Self>, mode: WriteMode) -> io::Result<WriteOutcome> {
        let shared = self.shared();
        let no_clobber = mode == WriteMode::NoClobber;
        if no_clobber {
            let (s, k) = (shared.clone(), self.key.clone());
            if self.client.block(async move { s.head(&k).await })? {
                self.abort();
                self.done = true;
                return Ok(WriteOutcome::Exists);
            }
        }
        if self.upload.is_some() && !self.buf.is_empty() {
            self.flush_part()?;
        }
        let key = self.key.clone();
        let outcome = match &self.upload {
            None => {
                let body = Bytes::from(std::mem::take(&mut self.buf));
                self.client.block(async move { put(&shared, &key, body, no_clobber).await })?
            }
            Some(upload) => {
                let mut xml = String::from("<CompleteMultipartUpload>");
                for (n, etag) in &upload.parts {
                    xml.push_str(&format!(
                        "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                        xml_escape(etag)
                    ));
                }
                xml.push_str("</CompleteMultipartUpload>");
                let id = upload.id.clone();
                self.client.block(async move { complete(&shared, &key, &id, xml, no_clobber).await })?
            }
        };
        match outcome {
            WriteOutcome::Written => self.upload = None,
            WriteOutcome::Exists => self.abort(),
        }
        self.done = true;
        Ok(outcome)
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}

fn warn_no_conditional(shared: &Shared) {
    if !shared.no_conditional.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            endpoint = %shared.cfg.authority,
            "the S3 service does not implement If-None-Match: *; writes that must not replace an object are checked \
             with HEAD first, which two simultaneous writers of the same key could both pass"
        );
    }
}

/// A single PUT; with `no_clobber`, conditional on the key being free.
async fn put(shared: &Shared, key: &str, body: Bytes, no_clobber: bool) -> io::Result<WriteOutcome> {
    loop {
        let conditional = no_clobber && !shared.no_conditional.load(Ordering::Relaxed);
        let headers = if conditional { vec![("if-none-match".to_string(), "*".to_string())] } else { Vec::new() };
        let r = shared.request(Method::PUT, Some(key), &[], &headers, body.clone()).await?;
        match r.status {
            200 => return Ok(WriteOutcome::Written),
            412 if conditional => return Ok(WriteOutcome::Exists),
            // A concurrent conditional write to the same key is in flight: ask again.
            409 if conditional => {
                if shared.head(key).await? {
                    return Ok(WriteOutcome::Exists);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            501 if conditional => warn_no_conditional(shared),
            _ => return Err(shared.fail(&Method::PUT, Some(key), &r)),
        }
    }
}

/// CompleteMultipartUpload; with `no_clobber`, conditional on the key being free.
async fn complete(shared: &Shared, key: &str, id: &str, xml: String, no_clobber: bool) -> io::Result<WriteOutcome> {
    let q = [("uploadId".to_string(), id.to_string())];
    let body = Bytes::from(xml);
    loop {
        let conditional = no_clobber && !shared.no_conditional.load(Ordering::Relaxed);
        let headers = if conditional { vec![("if-none-match".to_string(), "*".to_string())] } else { Vec::new() };
        let r = shared.request(Method::POST, Some(key), &q, &headers, body.clone()).await?;
        let text = String::from_utf8_lossy(&r.body);
        match r.status {
            // A 200 can still carry an error (S3 answers early and keeps the connection busy).
            200 if !text.contains("<Error>") => return Ok(WriteOutcome::Written),
            412 if conditional => return Ok(WriteOutcome::Exists),
            409 if conditional => {
                if shared.head(key).await? {
                    return Ok(WriteOutcome::Exists);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            501 if conditional => warn_no_conditional(shared),
            _ => return Err(shared.fail(&Method::POST, Some(key), &r)),
        }
    }
}

/// The contents of every `<tag>...</tag>` (not nested in one another).
fn xml_blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The text of the first `<tag>...</tag>`, unescaped.
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    xml_blocks(xml, tag).first().map(|v| xml_unescape(v))
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(end) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_endpoints() {
        {
            assert_eq!(parse_endpoint("http://127.0.0.1:9000").unwrap(), (false, "127.0.0.1:9000".into()));
            assert_eq!(parse_endpoint("http://minio/").unwrap(), (false, "minio:80".into()));
            assert_eq!(parse_endpoint("http://[::1]:9000").unwrap(), (false, "[::1]:9000".into()));
            assert_eq!(parse_endpoint("https://s3.amazonaws.com").unwrap(), (true, "s3.amazonaws.com:443".into()));
            assert!(parse_endpoint("ftp://h").unwrap_err().to_string().contains("https://HOST"));
            assert!(parse_endpoint("127.0.0.1:9000").is_err());
            assert!(parse_endpoint("http://h:1/bucket").is_err());
            assert!(S3Config::from_url("s3://Bad_Bucket/x?endpoint=http://h:1").is_err());
            assert!(S3Config::from_url("s3://bucket/../x?endpoint=http://h:1").is_err());
            assert!(S3Config::from_url("s3://bucket/x?endpoint=http://h:1&colour=red")
                .unwrap_err()
                .to_string()
                .contains("unknown option"));
        }
    }

    #[test]
    fn keys_and_prefixes() {
        let cfg = |prefix: &str| S3Config {
            bucket: "b".into(),
            prefix: prefix.into(),
            authority: "h:1".into(),
            tls: None,
            region: "r".into(),
            credentials: Credentials { access_key: "a".into(), secret_key: "s".into(), session_token: None },
            part_size: DEFAULT_PART_SIZE,
            list_page: 1000,
        };
        let c = cfg("pre/fix");
        assert_eq!(c.full_key("c/wal/x.zst"), "pre/fix/c/wal/x.zst");
        assert_eq!(c.dir_prefix(""), "pre/fix/");
        assert_eq!(c.dir_prefix("c/wal"), "pre/fix/c/wal/");
        assert_eq!(c.strip("pre/fix/c/x").as_deref(), Some("c/x"));
        assert_eq!(c.strip("pre/fixx/c"), None);
        let c = cfg("");
        assert_eq!(c.full_key("c/x"), "c/x");
        assert_eq!(c.dir_prefix(""), "");
        assert_eq!(c.dir_prefix("c"), "c/");
        assert_eq!(c.part_size(1), DEFAULT_PART_SIZE);
        assert_eq!(c.part_size(1000), DEFAULT_PART_SIZE);
        assert_eq!(c.part_size(1001), 2 * DEFAULT_PART_SIZE);
        assert_eq!(c.describe(), "s3://b at http://h:1");
    }

    #[test]
    fn xml_helpers() {
        let x = "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>a&amp;b</Key><Size>3</Size>\
                 </Contents><Contents><Key>c&#47;d</Key></Contents><CommonPrefixes><Prefix>p/</Prefix>\
                 </CommonPrefixes><NextContinuationToken>t&lt;1</NextContinuationToken></ListBucketResult>";
        let keys: Vec<String> = xml_blocks(x, "Contents").iter().filter_map(|c| xml_value(c, "Key")).collect();
        assert_eq!(keys, ["a&b", "c/d"]);
        assert_eq!(xml_value(x, "IsTruncated").as_deref(), Some("true"));
        assert_eq!(xml_value(x, "NextContinuationToken").as_deref(), Some("t<1"));
        assert_eq!(xml_unescape("a & b &bogus; &#x41;"), "a & b &bogus; A");
        assert_eq!(xml_escape("\"e&t\""), "&quot;e&amp;t&quot;");
    }
}
