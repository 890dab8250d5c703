//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both sides, with no I/O, and
//! the MD5 password hash for servers that ask for it.
//!
//! - [`ServerExchange`]: the proxy checks a client against a [`ScramSecret`] (the format of
//!   `pg_authid.rolpassword`: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
//!   A successful exchange also yields the client's `ClientKey` (recovered from its proof),
//!   which lets the proxy log in to a server that holds the same secret without knowing the
//!   password (what PgBouncer calls SCRAM pass-through).
//! - [`ClientExchange`]: the proxy logs in to a server, with the password or with a
//!   `ClientKey` and the secret it was recovered for.
//!
//! Channel binding: the server side takes `SCRAM-SHA-256-PLUS` with `tls-server-end-point`
//! (RFC 5929, as PostgreSQL) where the session offers it, over TLS ([`Binding`]); it refuses a
//! client that says it supports binding but thinks the proxy does not (`y`) when the proxy
//! offered it, which is what a downgrade by someone in between looks like. The client side
//! (the proxy's logins to servers) binds when told to ([`ClientExchange::bound_to`]).
//! Passwords are not SASLprep-normalised: ASCII passwords (and any password PostgreSQL's
//! SASLprep leaves unchanged) work; a non-ASCII password that NFKC normalisation changes must
//! be given in its normalised form.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::{Digest as _, Sha256};

/// The mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The mechanism with channel binding.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The channel binding type, the only one PostgreSQL and the proxy take.
const BINDING_TYPE: &str = "tls-server-end-point";

/// Channel binding in one [`ServerExchange`], from the mechanisms offered and the one the
/// client chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `SCRAM-SHA-256-PLUS` was not offered (no TLS, or a certificate whose signature has no
    /// single hash function).
    NotOffered,
    /// Offered; the client chose `SCRAM-SHA-256`.
    Declined,
    /// The client chose `SCRAM-SHA-256-PLUS`: the `tls-server-end-point` data of the
    /// proxy's certificate on this connection.
    Chosen(Vec<u8>),
}
/// PostgreSQL's default iteration count (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Random bytes in a nonce (as PostgreSQL: 18, 24 characters of base64).
const NONCE_LEN: usize = 18;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Why a SCRAM exchange failed. The texts are for logs; a client is only told that
/// authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The peer's message does not follow RFC 5802.
    #[error("malformed SCRAM message: {0}")]
    Malformed(String),
    /// The proof (client) or signature (server) does not match: wrong password.
    #[error("wrong password")]
    WrongPassword,
    /// A feature the proxy does not support (channel binding without TLS...).
    #[error("{0}")]
    Unsupported(String),
    /// The server's salt or iteration count differs from the secret the key was recovered
    /// for, so pass-through cannot work.
    #[error("{0}")]
    SecretMismatch(String),
    /// The server reported an error in its final message (`e=...`).
    #[error("server rejected the SCRAM exchange: {0}")]
    ServerError(String),
    /// The system random number generator failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

/// The value of `c=` in a client-final-message: base64 of the GS2 header, followed by the
/// channel binding data when there are some.
fn cbind_attribute(gs2_header: &str, data: Option<&[u8]>) -> String {
    let mut cbind = gs2_header.as_bytes().to_vec();
    cbind.extend_from_slice(data.unwrap_or_default());
    B64.encode(cbind)
}

fn malformed(s: impl Into<String>) -> ScramError {
    ScramError::Malformed(s.into())
}

/// `len` random bytes from the operating system.
pub fn random_bytes(len: usize) -> Result<Vec<u8>, ScramError> {
    let mut v = vec![0u8; len];
    getrandom::fill(&mut v).map_err(|e| ScramError::Random(e.to_string()))?;
    Ok(v)
}

/// A fresh nonce: 18 random bytes in base64 (printable, no comma).
pub fn new_nonce() -> Result<String, ScramError> {
    Ok(B64.encode(random_bytes(NONCE_LEN)?))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> ! {
    // HMAC's KeyInit accepts every key length (long keys are hashed); this cannot happen.
    unreachable!("HMAC-SHA-256 accepts keys of any length")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PBKDF2-HMAC-SHA-256 with one output block: SCRAM's `Hi()`.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

fn client_key_of(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Client Key"])
}

fn server_key_of(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Server Key"])
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.iter_mut().zip(a.iter().zip(b.iter())).for_each(|(o, (x, y))| *o = x ^ y);
    out
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A SCRAM-SHA-256 verifier: what PostgreSQL stores in `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// `H(ClientKey)`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl ScramSecret {
    /// The secret of `password` with this salt and iteration count.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key_of(&salted)),
            server_key: server_key_of(&salted),
        }
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
    /// The error says which part is wrong.
    pub fn parse(s: &str) -> Result<ScramSecret, String> {
        const SHAPE: &str = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, \
                             as in pg_authid.rolpassword";
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or_else(|| format!("not a SCRAM-SHA-256 secret; {SHAPE}"))?;
        let (params, keys) = rest.split_once('$').ok_or_else(|| format!("missing the second '$'; {SHAPE}"))?;
        let (iter, salt) =
            params.split_once(':').ok_or_else(|| format!("missing ':' after the iterations; {SHAPE}"))?;
        let (stored, server) = keys.split_once(':').ok_or_else(|| format!("missing ':' between the keys; {SHAPE}"))?;
        let iterations: u32 = iter
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("iteration count {iter:?} is not a positive integer; {SHAPE}"))?;
        let salt = B64.decode(salt).map_err(|e| format!("salt is not base64 ({e}); {SHAPE}"))?;
        let key = |what: &str, v: &str| -> Result<[u8; 32], String> {
            let bytes = B64.decode(v).map_err(|e| format!("{what} is not base64 ({e}); {SHAPE}"))?;
            bytes.try_into().map_err(|b: Vec<u8>| format!("{what} has {} bytes instead of 32; {SHAPE}", b.len()))
        };
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: key("StoredKey", stored)?,
            server_key: key("ServerKey", server)?,
        })
    }
}

impl std::fmt::Display for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Splits `a=value` attributes separated by commas, checking the names in order.
fn attribute<'a>(part: Option<&'a str>, name: char, what: &str) -> Result<&'a str, ScramError> {
    let part = part.ok_or_else(|| malformed(format!("missing {what} ({name}=)")))?;
    let mut chars = part.chars();
    match (chars.next(), chars.next()) {
        (Some(c), Some('=')) if c == name => Ok(&part[2..]),
        _ => Err(malformed(format!("expected {what} ({name}=...), found {:?}", truncate(part)))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn printable_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn utf8(data: &[u8], what: &str) -> Result<String, ScramError> {
    String::from_utf8(data.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

// ---------------------------------------------------------------------------------------------
// Server side

enum ServerState {
    /// Waiting for client-first-message.
    Initial,
    /// server-first sent; waiting for client-final-message.
    SentFirst {
        /// base64 of the GS2 header the client sent and the binding data (expected in `c=`).
        cbind: String,
        /// client nonce + server nonce.
        nonce: String,
        client_first_bare: String,
        server_first: String,
    },
    Done,
}

/// The server side of one SCRAM-SHA-256 exchange.
pub struct ServerExchange {
    secret: ScramSecret,
    server_nonce: String,
    binding: Binding,
    state: ServerState,
}

impl ServerExchange {
    /// An exchange against `secret` with a fresh server nonce.
    pub fn new(secret: ScramSecret, binding: Binding) -> Result<ServerExchange, ScramError> {
        Ok(ServerExchange::with_nonce(secret, binding, new_nonce()?))
    }

    /// An exchange with a given server nonce (tests).
    pub fn with_nonce(secret: ScramSecret, binding: Binding, server_nonce: String) -> ServerExchange {
        ServerExchange { secret, server_nonce, binding, state: ServerState::Initial }
    }

    /// Checks the client's channel binding flag (the GS2 header's first field) against what
    /// was offered and chosen, as PostgreSQL does.
    fn check_binding_flag(&self, flag: &str) -> Result<(), ScramError> {
        match (flag, &self.binding) {
            ("n" | "y", Binding::Chosen(_)) => {
                Err(malformed("the client chose SCRAM-SHA-256-PLUS but sent no channel binding (GS2 flag p=)"))
            }
            ("n", _) | ("y", Binding::NotOffered) => Ok(()),
            ("y", Binding::Declined) => Err(ScramError::Unsupported(
                "the client supports channel binding but thinks the proxy does not, and the proxy offered it \
                 (SCRAM-SHA-256-PLUS): something between them removed it from the offer"
                    .into(),
            )),
            (f, Binding::Chosen(_)) if f.strip_prefix("p=") == Some(BINDING_TYPE) => Ok(()),
            (f, Binding::Chosen(_)) if f.starts_with("p=") => Err(ScramError::Unsupported(format!(
                "channel binding type {:?} is not supported; the proxy takes {BINDING_TYPE}",
                truncate(&f[2..])
            ))),
            (f, Binding::NotOffered) if f.starts_with("p=") => Err(ScramError::Unsupported(
                "the client requires channel binding (SCRAM-SHA-256-PLUS), which the proxy offers only over \
                 TLS with a certificate signed with RSA or ECDSA: connect with sslmode=require (or \
                 verify-full), or with channel_binding=prefer"
                    .into(),
            )),
            (f, Binding::Declined) if f.starts_with("p=") => {
                Err(malformed("channel binding data (GS2 flag p=) with SCRAM-SHA-256: choose SCRAM-SHA-256-PLUS"))
            }
            (other, _) => Err(malformed(format!("invalid channel binding flag {:?}", truncate(other)))),
        }
    }

    /// Takes the client-first-message (the data of SASLInitialResponse) and returns the
    /// server-first-message (the data of AuthenticationSASLContinue).
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(malformed("client-first-message sent twice"));
        }
        let text = utf8(data, "client-first-message")?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or_else(|| malformed("missing the GS2 header"))?;
        self.check_binding_flag(flag)?;
        let (authzid, bare) = rest.split_once(',').ok_or_else(|| malformed("GS2 header is not terminated"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Unsupported("SCRAM authorization identities (a=) are not supported".into()));
        }
        let gs2_header = &text[..text.len() - bare.len()];
        let mut parts = bare.split(',');
        let first = parts.next();
        if first.is_some_and(|p| p.starts_with("m=")) {
            return Err(ScramError::Unsupported("SCRAM extensions (m=) are not supported".into()));
        }
        // The user name is ignored, as in PostgreSQL: the startup packet named the user.
        attribute(first, 'n', "user name")?;
        let client_nonce = attribute(parts.next(), 'r', "client nonce")?;
        if !printable_nonce(client_nonce) {
            return Err(malformed("client nonce is empty or has characters outside printable ASCII"));
        }
        // Extensions may follow; each must at least look like an attribute.
        if let Some(bad) = parts.find(|p| p.as_bytes().get(1).is_none_or(|b| *b != b'=')) {
            return Err(malformed(format!("invalid attribute {:?} after the nonce", truncate(bad))));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&self.secret.salt), self.secret.iterations);
        let data = match &self.binding {
            Binding::Chosen(data) => Some(data.as_slice()),
            _ => None,
        };
        self.state = ServerState::SentFirst {
            cbind: cbind_attribute(gs2_header, data),
            nonce,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
        };
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message (the data of SASLResponse). On success returns the
    /// server-final-message (for AuthenticationSASLFinal) and the client's `ClientKey`.
    pub fn client_final(&mut self, data: &[u8]) -> Result<(Vec<u8>, [u8; 32]), ScramError> {
        let ServerState::SentFirst { cbind, nonce, client_first_bare, server_first } =
            std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(malformed("client-final-message out of order"));
        };
        let text = utf8(data, "client-final-message")?;
        let proof_at = text.rfind(",p=").ok_or_else(|| malformed("missing the proof (p=)"))?;
        let without_proof = &text[..proof_at];
        let proof_b64 = &text[proof_at + 3..];
        let mut parts = without_proof.split(',');
        let c = attribute(parts.next(), 'c', "channel binding")?;
        if c != cbind {
            return Err(malformed("channel binding data (c=) does not match the GS2 header"));
        }
        let r = attribute(parts.next(), 'r', "nonce")?;
        if !constant_time_eq(r.as_bytes(), nonce.as_bytes()) {
            return Err(malformed("nonce (r=) does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof_b64)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| malformed("proof (p=) is not 32 bytes of base64"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        if !constant_time_eq(&sha256(&client_key), &self.secret.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok((format!("v={}", B64.encode(server_signature)).into_bytes(), client_key))
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// What the proxy proves its identity with when it logs in to a server.
#[derive(Clone)]
pub enum ClientCredential {
    /// The password.
    Password(String),
    /// A `ClientKey` recovered from a client's proof, with the secret it belongs to: works
    /// with a server whose verifier has the same salt and iteration count.
    Keys {
        /// The client's `ClientKey`.
        client_key: [u8; 32],
        /// The secret (salt, iterations, ServerKey) the key belongs to.
        secret: ScramSecret,
    },
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientCredential::Password(_) => "Password(..)",
            ClientCredential::Keys { .. } => "Keys(..)",
        })
    }
}

/// The client side of one SCRAM-SHA-256 exchange, without channel binding unless
/// [`ClientExchange::bound_to`] says otherwise.
pub struct ClientExchange {
    credential: ClientCredential,
    nonce: String,
    /// `tls-server-end-point` data (SCRAM-SHA-256-PLUS), if binding.
    binding: Option<Vec<u8>>,
    /// Set after server-first: the ServerSignature to expect.
    expected_server_signature: Option<[u8; 32]>,
}

const CLIENT_GS2_HEADER: &str = "n,,";
const CLIENT_GS2_HEADER_PLUS: &str = "p=tls-server-end-point,,";

impl ClientExchange {
    /// An exchange with a fresh nonce.
    pub fn new(credential: ClientCredential) -> Result<ClientExchange, ScramError> {
        Ok(ClientExchange::with_nonce(credential, new_nonce()?))
    }

    /// An exchange with a given client nonce (tests).
    pub fn with_nonce(credential: ClientCredential, nonce: String) -> ClientExchange {
        ClientExchange { credential, nonce, binding: None, expected_server_signature: None }
    }

    /// The same exchange as SCRAM-SHA-256-PLUS, bound to the TLS channel whose server
    /// certificate has the `tls-server-end-point` data `data` ([`crate::tls::endpoint_hash`]).
    pub fn bound_to(mut self, data: Vec<u8>) -> ClientExchange {
        self.binding = Some(data);
        self
    }

    fn gs2_header(&self) -> &'static str {
        if self.binding.is_some() {
            CLIENT_GS2_HEADER_PLUS
        } else {
            CLIENT_GS2_HEADER
        }
    }

    /// The client-first-message. The user name is left empty, as libpq does: PostgreSQL
    /// takes it from the startup packet.
    pub fn client_first(&self) -> Vec<u8> {
        self.client_first_with_user("")
    }

    fn client_first_with_user(&self, user: &str) -> Vec<u8> {
        format!("{}n={user},r={}", self.gs2_header(), self.nonce).into_bytes()
    }

    fn client_first_bare(&self, user: &str) -> String {
        format!("n={user},r={}", self.nonce)
    }

    /// Takes the server-first-message and returns the client-final-message.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        self.server_first_with_user("", data)
    }

    fn server_first_with_user(&mut self, user: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = utf8(data, "server-first-message")?;
        let mut parts = text.split(',');
        let first = parts.next();
        if first.is_some_and(|p| p.starts_with("m=")) {
            return Err(ScramError::Unsupported("the server asked for a SCRAM extension (m=)".into()));
        }
        let nonce = attribute(first, 'r', "nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() || !printable_nonce(nonce) {
            return Err(malformed("the server's nonce does not extend the client's"));
        }
        let salt = B64.decode(attribute(parts.next(), 's', "salt")?).map_err(|_| malformed("salt is not base64"))?;
        let iterations: u32 = attribute(parts.next(), 'i', "iteration count")?
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| malformed("iteration count is not a positive integer"))?;
        let (client_key, server_key) = match &self.credential {
            ClientCredential::Password(p) => {
                let salted = salted_password(p.as_bytes(), &salt, iterations);
                (client_key_of(&salted), server_key_of(&salted))
            }
            ClientCredential::Keys { client_key, secret } => {
                if secret.salt != salt || secret.iterations != iterations {
                    return Err(ScramError::SecretMismatch(
                        "the server's SCRAM secret has another salt or iteration count than the one in the \
                         userlist (the password was changed?); copy the current pg_authid.rolpassword into the \
                         userlist, or put the plaintext password there"
                            .into(),
                    ));
                }
                (*client_key, secret.server_key)
            }
        };
        let without_proof = format!("c={},r={nonce}", cbind_attribute(self.gs2_header(), self.binding.as_deref()));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare(user));
        let stored_key = sha256(&client_key);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&client_key, &client_signature);
        self.expected_server_signature = Some(hmac(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server proved it knows the secret.
    pub fn server_final(&self, data: &[u8]) -> Result<(), ScramError> {
        let text = utf8(data, "server-final-message")?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(truncate(e)));
        }
        let v = attribute(text.split(',').next(), 'v', "server signature")?;
        let v = B64.decode(v).map_err(|_| malformed("server signature is not base64"))?;
        match &self.expected_server_signature {
            Some(expected) if constant_time_eq(&v, expected) => Ok(()),
            Some(_) => Err(ScramError::WrongPassword),
            None => Err(malformed("server-final-message before server-first-message")),
        }
    }
}

/// The answer to AuthenticationMD5Password: `"md5" + md5(md5(password + user) + salt)` in hex.
pub fn md5_password(user: &str, password: &str, salt: &[u8; 4]) -> String {
    md5_response(&md5_hash(user, password), salt)
}

/// What `pg_authid.rolpassword` holds for an MD5 password: `md5` + hex(md5(password + user)).
pub fn md5_hash(user: &str, password: &str) -> String {
    format!("md5{}", hex(&md5::Md5::digest([password.as_bytes(), user.as_bytes()].concat())))
}

/// The answer to an MD5 challenge from the stored hash (`md5...`) alone: what a client sends,
/// and what the proxy checks a client's answer against.
pub fn md5_response(stored: &str, salt: &[u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    format!("md5{}", hex(&md5::Md5::digest([inner.as_bytes(), &salt[..]].concat())))
}

/// Whether a client's answer to an MD5 challenge matches the stored hash (constant time).
pub fn md5_verify(stored: &str, salt: &[u8; 4], answer: &[u8]) -> bool {
    constant_time_eq(md5_response(stored, salt).as_bytes(), answer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_from_the_stored_hash() {
        // libpq: "md5" + md5(md5(password + user) + salt).
        let salt = [1, 2, 3, 4];
        let stored = md5_hash("alice", "secret");
        assert_eq!(stored.len(), 35);
        let answer = md5_password("alice", "secret", &salt);
        assert_eq!(md5_response(&stored, &salt), answer);
        assert!(md5_verify(&stored, &salt, answer.as_bytes()));
        assert!(!md5_verify(&stored, &[1, 2, 3, 5], answer.as_bytes()));
        assert!(!md5_verify(&md5_hash("alice", "other"), &salt, answer.as_bytes()));
    }

    // RFC 7677, section 3.
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SALT_B64: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_secret() -> ScramSecret {
        ScramSecret::from_password("pencil", &B64.decode(SALT_B64).unwrap(), 4096)
    }

    #[test]
    fn rfc7677_server_side() {
        let mut ex = ServerExchange::with_nonce(rfc_secret(), Binding::NotOffered, SERVER_NONCE.into());
        assert_eq!(ex.client_first(CLIENT_FIRST.as_bytes()).unwrap(), SERVER_FIRST.as_bytes());
        let (server_final, client_key) = ex.client_final(CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(server_final, SERVER_FINAL.as_bytes());
        let salted = salted_password(b"pencil", &B64.decode(SALT_B64).unwrap(), 4096);
        assert_eq!(client_key, client_key_of(&salted), "the recovered ClientKey is the real one");
    }

    #[test]
    fn rfc7677_client_side() {
        let mut ex = ClientExchange::with_nonce(ClientCredential::Password("pencil".into()), CLIENT_NONCE.into());
        assert_eq!(ex.client_first_with_user("user"), CLIENT_FIRST.as_bytes());
        let fin = ex.server_first_with_user("user", SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(fin, CLIENT_FINAL.as_bytes());
        ex.server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert_eq!(ex.server_final(b"v=AAAA"), Err(ScramError::WrongPassword));
        assert!(matches!(ex.server_final(b"e=invalid-proof"), Err(ScramError::ServerError(_))));
    }

    #[test]
    fn rfc7677_client_side_with_recovered_keys() {
        let salted = salted_password(b"pencil", &B64.decode(SALT_B64).unwrap(), 4096);
        let cred = ClientCredential::Keys { client_key: client_key_of(&salted), secret: rfc_secret() };
        let mut ex = ClientExchange::with_nonce(cred, CLIENT_NONCE.into());
        assert_eq!(ex.server_first_with_user("user", SERVER_FIRST.as_bytes()).unwrap(), CLIENT_FINAL.as_bytes());
        ex.server_final(SERVER_FINAL.as_bytes()).unwrap();
        // Another salt: pass-through cannot work, and says why.
        let other = ScramSecret::from_password("pencil", b"other salt", 4096);
        let cred = ClientCredential::Keys { client_key: client_key_of(&salted), secret: other };
        let mut ex = ClientExchange::with_nonce(cred, CLIENT_NONCE.into());
        assert!(matches!(ex.server_first(SERVER_FIRST.as_bytes()), Err(ScramError::SecretMismatch(_))));
    }

    #[test]
    fn wrong_password_is_refused() {
        let mut ex = ServerExchange::with_nonce(
            ScramSecret::from_password("other", b"salt", 4096),
            Binding::NotOffered,
            "xyz".into(),
        );
        let mut client = ClientExchange::with_nonce(ClientCredential::Password("pencil".into()), "abc".into());
        let first = ex.client_first(&client.client_first()).unwrap();
        let fin = client.server_first(&first).unwrap();
        assert_eq!(ex.client_final(&fin), Err(ScramError::WrongPassword));
    }

    #[test]
    fn round_trip_with_random_nonces() {
        let secret = ScramSecret::from_password("s3cret", &random_bytes(16).unwrap(), 4096);
        let mut server = ServerExchange::new(secret.clone(), Binding::NotOffered).unwrap();
        let mut client = ClientExchange::new(ClientCredential::Password("s3cret".into())).unwrap();
        let first = server.client_first(&client.client_first()).unwrap();
        let (fin, key) = server.client_final(&client.server_first(&first).unwrap()).unwrap();
        client.server_final(&fin).unwrap();
        // The recovered key logs in to a server holding the same secret.
        let mut server2 = ServerExchange::new(secret.clone(), Binding::NotOffered).unwrap();
        let mut client2 = ClientExchange::new(ClientCredential::Keys { client_key: key, secret }).unwrap();
        let first = server2.client_first(&client2.client_first()).unwrap();
        let (fin, _) = server2.client_final(&client2.server_first(&first).unwrap()).unwrap();
        client2.server_final(&fin).unwrap();
    }

    #[test]
    fn secret_text_round_trips_and_bad_secrets_say_why() {
        let s = rfc_secret();
        let text = s.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"), "{text}");
        assert_eq!(ScramSecret::parse(&text).unwrap(), s);
        for (bad, why) in [
            ("md5abc", "not a SCRAM-SHA-256 secret"),
            ("SCRAM-SHA-256$4096:c2FsdA==", "missing the second '$'"),
            ("SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA", "iteration count \"x\""),
            ("SCRAM-SHA-256$4096:!!$AAAA:AAAA", "salt is not base64"),
            ("SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA", "StoredKey has 3 bytes instead of 32"),
        ] {
            let err = ScramSecret::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_client_messages_are_errors_not_panics() {
        let firsts: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=,r=abc",
            b"n,a=someone,n=,r=abc",
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=a,b",
            b"n,,r=abc",
            b"\xff\xfe",
        ];
        for f in firsts {
            let mut ex = ServerExchange::with_nonce(rfc_secret(), Binding::NotOffered, "srv".into());
            assert!(ex.client_first(f).is_err(), "{:?} must be refused", String::from_utf8_lossy(f));
        }
        let finals: &[&[u8]] = &[
            b"",
            b"c=biws,r=abcsrv",
            b"c=eSws,r=abcsrv,p=AAAA",
            b"c=biws,r=abcxxx,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"c=biws,r=abcsrv,p=!!!",
            b"r=abcsrv,c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ];
        for f in finals {
            let mut ex = ServerExchange::with_nonce(rfc_secret(), Binding::NotOffered, "srv".into());
            ex.client_first(b"n,,n=,r=abc").unwrap();
            assert!(ex.client_final(f).is_err(), "{:?} must be refused", String::from_utf8_lossy(f));
        }
        let mut ex = ServerExchange::with_nonce(rfc_secret(), Binding::NotOffered, "srv".into());
        assert!(ex.client_final(b"c=biws,r=x,p=AAAA").is_err(), "final before first");
    }

    /// One exchange between `client` and a server with `binding`: the server's verdict.
    fn exchange(client: ClientExchange, binding: Binding) -> Result<(), ScramError> {
        let mut client = client;
        let mut server = ServerExchange::new(rfc_secret(), binding).unwrap();
        let first = server.client_first(&client.client_first())?;
        let (fin, _) = server.client_final(&client.server_first(&first)?)?;
        client.server_final(&fin)
    }

    #[test]
    fn channel_binding_is_checked_and_a_downgrade_refused() {
        let pencil = || ClientExchange::new(ClientCredential::Password("pencil".into())).unwrap();
        let data = vec![7u8; 32];
        // SCRAM-SHA-256-PLUS with the proxy's certificate's data.
        exchange(pencil().bound_to(data.clone()), Binding::Chosen(data.clone())).expect("bound to the same channel");
        // Another channel's data (a relay in between, with a certificate of its own).
        let err = exchange(pencil().bound_to(vec![8u8; 32]), Binding::Chosen(data.clone())).unwrap_err();
        assert!(err.to_string().contains("channel binding data (c=) does not match"), "{err}");
        // PLUS chosen, but the client does not bind.
        let err = exchange(pencil(), Binding::Chosen(data.clone())).unwrap_err();
        assert!(err.to_string().contains("sent no channel binding"), "{err}");
        // SCRAM-SHA-256 with binding data.
        let err = exchange(pencil().bound_to(data.clone()), Binding::Declined).unwrap_err();
        assert!(err.to_string().contains("choose SCRAM-SHA-256-PLUS"), "{err}");
        // Binding required by the client where the proxy offers none (no TLS).
        let err = exchange(pencil().bound_to(data.clone()), Binding::NotOffered).unwrap_err();
        assert!(err.to_string().contains("offers only over TLS"), "{err}");
        // Plain SCRAM either way.
        exchange(pencil(), Binding::Declined).expect("declined");
        exchange(pencil(), Binding::NotOffered).expect("not offered");
        // `y`: the client could bind but saw no offer. Fine without one; with one, the offer
        // was tampered with.
        let y_first = |server: &mut ServerExchange| server.client_first(b"y,,n=,r=abc");
        let mut server = ServerExchange::new(rfc_secret(), Binding::NotOffered).unwrap();
        y_first(&mut server).expect("no offer: y is fine");
        let mut server = ServerExchange::new(rfc_secret(), Binding::Declined).unwrap();
        let err = y_first(&mut server).unwrap_err();
        assert!(err.to_string().contains("removed it from the offer"), "{err}");
        // Another binding type.
        let mut server = ServerExchange::new(rfc_secret(), Binding::Chosen(data)).unwrap();
        let err = server.client_first(b"p=tls-unique,,n=,r=abc").unwrap_err();
        assert!(err.to_string().contains("\"tls-unique\" is not supported"), "{err}");
    }

    #[test]
    fn md5_matches_postgres() {
        // md5(md5("secret" + "postgres") + salt), computed independently with Python's hashlib.
        assert_eq!(md5_password("postgres", "secret", &[1, 2, 3, 4]), "md5bb41a296aab6baccb36ff243a562abff");
    }
}
