//! A minimal HTTP/1.1 client for the REST API: the CLI, the pre-race peer probe and tests use
//! it. Plain `http://` only (TLS for the API arrives with the production release).

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| anyhow::anyhow!("response is not JSON ({e}): {}", self.text()))
    }
}

/// Basic-auth credentials.
#[derive(Debug, Clone)]
pub struct Auth {
    /// User.
    pub username: String,
    /// Password.
    pub password: String,
}

/// Split `http://host:port/path` into (`host:port`, `/path`).
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        anyhow::anyhow!(
            "unsupported URL {url:?}: the REST API is reached over http://host:port (https is not supported yet)"
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        anyhow::bail!("URL {url:?} has no host");
    }
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// Send one request and read the whole response, within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    auth: Option<&Auth>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    request_with_headers(method, url, body, auth, &[], timeout).await
}

/// [`request`] with extra headers (e.g. `If-Match`).
pub async fn request_with_headers(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    auth: Option<&Auth>,
    headers: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<Response> {
    let (authority, path) = split_url(url)?;
    let fut = async {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize")).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(&path)
            .header("host", &authority)
            .header("user-agent", concat!("pgkeel/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(a) = auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", a.username, a.password));
            req = req.header("authorization", format!("Basic {token}"));
        }
        let resp = sender.send_request(req.body(Full::new(Bytes::from(bytes)))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        anyhow::Ok(Response { status, body })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{method} {url}: {e:#}")),
        Err(_) => anyhow::bail!("{method} {url}: no answer within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(split_url("http://127.0.0.1:8008/node").unwrap(), ("127.0.0.1:8008".into(), "/node".into()));
        assert_eq!(split_url("http://host:1").unwrap(), ("host:1".into(), "/".into()));
        assert_eq!(split_url("http://host/x?y=1").unwrap(), ("host:80".into(), "/x?y=1".into()));
        assert_eq!(split_url("http://[::1]:8008/a").unwrap(), ("[::1]:8008".into(), "/a".into()));
        assert!(split_url("https://host:1/").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
