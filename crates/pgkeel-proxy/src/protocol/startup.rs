//! The first packet of a connection, which has no type byte: Int32 length, Int32 code, body.
//! The code is a protocol version (StartupMessage) or one of three magic numbers (and a
//! fourth that only pgkeel proxies send each other).

use bytes::{BufMut, Bytes, BytesMut};

use super::backend::MAX_CANCEL_KEY_LEN;
use super::read::Reader;
use super::{write, Limits, ProtocolError};

/// SSLRequest code (1234.5679).
pub const SSL_REQUEST_CODE: i32 = (1234 << 16) | 5679;
/// GSSENCRequest code (1234.5680).
pub const GSSENC_REQUEST_CODE: i32 = (1234 << 16) | 5680;
/// CancelRequest code (1234.5678).
pub const CANCEL_REQUEST_CODE: i32 = (1234 << 16) | 5678;
/// A CancelRequest one pgkeel proxy passes on to the others (1234.5699, not a PostgreSQL
/// code): the same body, for the receiving proxy's own clients only, never passed on again.
pub const FORWARDED_CANCEL_CODE: i32 = (1234 << 16) | 5699;

/// First byte of a TLS handshake record: what a client using `sslnegotiation=direct`
/// (PostgreSQL 17) sends instead of a length.
const TLS_HANDSHAKE: u8 = 0x16;

/// A protocol version as sent in StartupMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Major version: 3.
    pub major: u16,
    /// Minor version: 0, or 2 since PostgreSQL 18.
    pub minor: u16,
}

impl ProtocolVersion {
    /// Protocol 3.0 (PostgreSQL 7.4 to 17).
    pub const V3_0: ProtocolVersion = ProtocolVersion { major: 3, minor: 0 };
    /// Protocol 3.2 (PostgreSQL 18: longer cancel keys).
    pub const V3_2: ProtocolVersion = ProtocolVersion { major: 3, minor: 2 };

    fn code(self) -> i32 {
        ((u32::from(self.major) << 16) | u32::from(self.minor)) as i32
    }
}

/// StartupMessage: protocol version and session parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Requested protocol version (major 3; any minor is accepted here, the proxy answers
    /// a newer minor with NegotiateProtocolVersion).
    pub version: ProtocolVersion,
    /// Parameters in the order sent: `user`, `database`, `options`, `replication`,
    /// `application_name`, any run-time setting, and `_pq_.*` protocol options. Decoding
    /// requires UTF-8: the proxy matches user and database names against its UTF-8
    /// configuration.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// A protocol 3.0 StartupMessage with these parameters.
    pub fn new<K: Into<String>, V: Into<String>>(params: impl IntoIterator<Item = (K, V)>) -> StartupMessage {
        StartupMessage {
            version: ProtocolVersion::V3_0,
            params: params.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    /// A parameter's value. When a name is repeated the last one wins, as in PostgreSQL.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The `user` parameter (required by PostgreSQL).
    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }

    /// The database: the `database` parameter, defaulting to the user name as in PostgreSQL.
    pub fn database(&self) -> Option<&str> {
        self.get("database").filter(|d| !d.is_empty()).or_else(|| self.user())
    }

    /// The `_pq_.` protocol options the client asked for.
    pub fn protocol_options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// CancelRequest: sent on a new connection, which the server closes after reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    /// Process id from BackendKeyData.
    pub pid: i32,
    /// Secret key from BackendKeyData: 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub secret_key: Bytes,
}

/// The first packet a client sends (and the packet after a refused SSLRequest or
/// GSSENCRequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Start a session.
    Startup(StartupMessage),
    /// Ask for TLS; the server answers with one byte, `S` or `N`.
    SslRequest,
    /// Ask for GSSAPI encryption; the server answers `G` or `N`.
    GssEncRequest,
    /// Cancel a running query of another connection.
    CancelRequest(CancelRequest),
    /// A CancelRequest another pgkeel proxy passed on ([`FORWARDED_CANCEL_CODE`]).
    ForwardedCancel(CancelRequest),
}

impl StartupPacket {
    /// Takes the startup packet off `buf`: `Ok(None)` (nothing consumed) until it is
    /// complete. The length is checked against [`Limits::max_startup_len`] as soon as its 4
    /// bytes are there.
    pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<StartupPacket>, ProtocolError> {
        const MESSAGE: &str = "startup packet";
        let Some(header) = buf.get(..4) else { return Ok(None) };
        let first = header.first().copied();
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(header);
        let len = i32::from_be_bytes(len_bytes);
        let Ok(ulen) = usize::try_from(len) else {
            return Err(ProtocolError::BadLength { message: MESSAGE, len, min: 8 });
        };
        if ulen < 8 {
            return Err(ProtocolError::BadLength { message: MESSAGE, len, min: 8 });
        }
        if ulen > limits.max_startup_len {
            if first == Some(TLS_HANDSHAKE) {
                return Err(ProtocolError::malformed(
                    MESSAGE,
                    "the client started a TLS handshake without SSLRequest (sslnegotiation=direct), \
                     which is not supported; use sslnegotiation=postgres",
                ));
            }
            return Err(ProtocolError::TooLong { message: MESSAGE, len: ulen, limit: limits.max_startup_len });
        }
        if buf.len() < ulen {
            return Ok(None);
        }
        let packet = buf.split_to(ulen).freeze();
        StartupPacket::parse(packet.slice(4..)).map(Some)
    }

    /// Parses a packet body: everything after the length (code first).
    fn parse(body: Bytes) -> Result<StartupPacket, ProtocolError> {
        let mut r = Reader::new("startup packet", body);
        let code = r.i32("protocol version")?;
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
                let (message, packet) = if code == SSL_REQUEST_CODE {
                    ("SSLRequest", StartupPacket::SslRequest)
                } else {
                    ("GSSENCRequest", StartupPacket::GssEncRequest)
                };
                if r.remaining() != 0 {
                    return Err(ProtocolError::malformed(
                        message,
                        format!("length {} (must be exactly 8)", r.remaining() + 8),
                    ));
                }
                Ok(packet)
            }
            CANCEL_REQUEST_CODE | FORWARDED_CANCEL_CODE => {
                let mut r = Reader::new("CancelRequest", r.rest());
                let pid = r.i32("process id")?;
                let secret_key = r.rest();
                if secret_key.len() < 4 || secret_key.len() > MAX_CANCEL_KEY_LEN {
                    return Err(
                        r.err(format!("secret key of {} bytes (must be 4 to {MAX_CANCEL_KEY_LEN})", secret_key.len()))
                    );
                }
                let c = CancelRequest { pid, secret_key };
                Ok(if code == CANCEL_REQUEST_CODE {
                    StartupPacket::CancelRequest(c)
                } else {
                    StartupPacket::ForwardedCancel(c)
                })
            }
            _ => {
                let version = ProtocolVersion { major: (code as u32 >> 16) as u16, minor: code as u16 };
                if version.major != 3 {
                    return Err(ProtocolError::UnsupportedVersion { major: version.major, minor: version.minor });
                }
                let mut r = Reader::new("StartupMessage", r.rest());
                let mut params = Vec::new();
                loop {
                    if r.remaining() == 0 {
                        return Err(r.err("missing the NUL byte that ends the parameter list"));
                    }
                    let name = r.utf8("parameter name")?;
                    if name.is_empty() {
                        break;
                    }
                    if r.remaining() == 0 {
                        return Err(r.err(format!("parameter {name:?} has no value")));
                    }
                    let value = r.utf8(format_args!("value of parameter {name:?}"))?;
                    params.push((name, value));
                }
                r.finish()?;
                Ok(StartupPacket::Startup(StartupMessage { version, params }))
            }
        }
    }

    /// Appends the packet to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_i32(0);
        match self {
            StartupPacket::Startup(m) => {
                buf.put_i32(m.version.code());
                for (k, v) in &m.params {
                    // An empty name would end the list early; it cannot be carried.
                    if !k.is_empty() {
                        write::str_cstr(buf, k);
                        write::str_cstr(buf, v);
                    }
                }
                buf.put_u8(0);
            }
            StartupPacket::SslRequest => buf.put_i32(SSL_REQUEST_CODE),
            StartupPacket::GssEncRequest => buf.put_i32(GSSENC_REQUEST_CODE),
            StartupPacket::CancelRequest(c) | StartupPacket::ForwardedCancel(c) => {
                let forwarded = matches!(self, StartupPacket::ForwardedCancel(_));
                buf.put_i32(if forwarded { FORWARDED_CANCEL_CODE } else { CANCEL_REQUEST_CODE });
                buf.put_i32(c.pid);
                buf.put_slice(&c.secret_key);
            }
        }
        write::patch_len(buf, start);
    }
}
