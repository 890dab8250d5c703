//! AWS Signature Version 4 for S3 requests (header-based, `AWS4-HMAC-SHA256`).
//!
//! Pure functions: the caller passes the time, so the result is reproducible (and tested
//! against the example in AWS's documentation).

use sha2::{Digest, Sha256};

use crate::codec::hex;

/// The SHA-256 of an empty payload, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Credentials to sign with.
#[derive(Clone)]
pub struct Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("access_key", &self.access_key).finish_non_exhaustive()
    }
}

/// HMAC-SHA-256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Percent-encodes everything but the unreserved characters (`A-Z a-z 0-9 - _ . ~`), and
/// `/` too when `keep_slash` (for paths).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The canonical query string: pairs sorted, keys and values encoded.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// A request to sign.
pub struct SignRequest<'a> {
    /// `GET`, `PUT`, ...
    pub method: &'a str,
    /// The path as sent, already encoded (see [`uri_encode`] with `keep_slash`).
    pub path: &'a str,
    /// Query parameters, not encoded.
    pub query: &'a [(String, String)],
    /// Headers to sign (names in any case), including `host`; `x-amz-date` and
    /// `x-amz-content-sha256` (and `x-amz-security-token`) are added by [`sign`].
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the payload (or `UNSIGNED-PAYLOAD`).
    pub payload_sha256: &'a str,
}

/// Signs `req` at `amz_date` (`YYYYMMDDTHHMMSSZ`) for `region`; returns every header to add:
/// `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token` (with a session token) and
/// `authorization`.
pub fn sign(req: &SignRequest<'_>, creds: &Credentials, region: &str, amz_date: &str) -> Vec<(String, String)> {
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let mut added = vec![
        ("x-amz-content-sha256".to_string(), req.payload_sha256.to_string()),
        ("x-amz-date".to_string(), amz_date.to_string()),
    ];
    if let Some(t) = &creds.session_token {
        added.push(("x-amz-security-token".to_string(), t.clone()));
    }
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .chain(added.iter())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method,
        req.path,
        canonical_query(req.query),
        req.payload_sha256
    );
    let scope = format!("{date}/{region}/s3/aws4_request");
    let string_to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let k_date = hmac_sha256(format!("AWS4{}", creds.secret_key).as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, b"s3");
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    added.push((
        "authorization".to_string(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed_headers},Signature={signature}",
            creds.access_key
        ),
    ));
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn auth(headers: &[(String, String)]) -> &str {
        headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.as_str()).unwrap_or_default()
    }

    #[test]
    fn hmac_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // A key longer than the block is hashed first (RFC 4231 case 6).
        let mac = hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex(&mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    /// The GET Object example of AWS's "Signature Calculations for the Authorization Header".
    #[test]
    fn aws_documentation_get_object_example() {
        let headers = vec![
            ("Host".to_string(), "examplebucket.s3.amazonaws.com".to_string()),
            ("Range".to_string(), "bytes=0-9".to_string()),
        ];
        let req = SignRequest {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        let out = sign(&req, &creds(), "us-east-1", "20130524T000000Z");
        assert_eq!(
            auth(&out),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The GET Bucket (list objects) example of the same page: a signed query string.
    #[test]
    fn aws_documentation_list_objects_example() {
        let headers = vec![("Host".to_string(), "examplebucket.s3.amazonaws.com".to_string())];
        let query = vec![("max-keys".to_string(), "2".to_string()), ("prefix".to_string(), "J".to_string())];
        let req =
            SignRequest { method: "GET", path: "/", query: &query, headers: &headers, payload_sha256: EMPTY_SHA256 };
        let out = sign(&req, &creds(), "us-east-1", "20130524T000000Z");
        assert!(
            auth(&out).ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
            "{}",
            auth(&out)
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode("a b/c~d%e", true), "a%20b/c~d%25e");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(uri_encode("é", false), "%C3%A9");
        let q = vec![("prefix".to_string(), "c/wal/".to_string()), ("list-type".to_string(), "2".to_string())];
        assert_eq!(canonical_query(&q), "list-type=2&prefix=c%2Fwal%2F");
    }
}
