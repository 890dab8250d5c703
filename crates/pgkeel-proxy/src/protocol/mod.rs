//! The PostgreSQL wire protocol (version 3) as a codec with no I/O.
//!
//! Bytes come in through a [`BytesMut`] the caller fills from its socket; the decoders take
//! one whole message off the front when it is there and return `Ok(None)` (consuming
//! nothing) when more bytes are needed. Encoders append to a `BytesMut`. Three kinds of
//! input, decoded separately because the same bytes mean different things in each:
//!
//! - the first packet of a connection, which has no type byte: [`StartupPacket`]
//!   (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest);
//! - client messages after startup: [`FrontendDecoder`] → [`FrontendMessage`];
//! - server messages: [`BackendDecoder`] → [`BackendMessage`].
//!
//! Each decoder also has `decode_frame`, which checks only the type byte and length and
//! returns the whole raw message ([`Frame`]) for forwarding without re-encoding; a frame can
//! be parsed later with [`FrontendMessage::parse`] / [`BackendMessage::parse`] if the proxy
//! needs to look inside.
//!
//! # Safety against hostile input
//! No input makes the codec panic, and it never allocates more than the bytes actually
//! received: declared lengths are checked against [`Limits`] before waiting for the body,
//! and element counts are checked against the bytes left in the message before anything is
//! reserved for them. Every failure is a [`ProtocolError`] naming the message and what was
//! wrong with it. After an error the connection cannot be resynchronised and must be
//! closed; the buffer's content is then unspecified (a message whose length was valid has
//! been consumed).
//!
//! Decoding is zero-copy: strings ([`Text`]) and values (`Bytes`) are slices of the buffer
//! the message arrived in.

mod backend;
mod error;
mod fields;
mod frontend;
pub mod fuzz;
mod read;
mod startup;
mod text;
mod write;

#[cfg(test)]
mod tests;

use bytes::{Bytes, BytesMut};

pub use backend::{Authentication, BackendDecoder, BackendMessage, CopyResponse, FieldDescription, TransactionStatus};
pub use error::{Direction, ProtocolError, Tag};
pub use fields::{error_code, field, sqlstate, ErrorFields, Severity};
pub use frontend::{AuthExpect, Bind, FrontendDecoder, FrontendMessage, FunctionCall, Parse, Target};
pub use startup::{
    CancelRequest, ProtocolVersion, StartupMessage, StartupPacket, CANCEL_REQUEST_CODE, FORWARDED_CANCEL_CODE,
    GSSENC_REQUEST_CODE, SSL_REQUEST_CODE,
};
pub use text::Text;

/// Size limits applied while decoding. Lengths are compared with the declared length field,
/// which counts itself (4 bytes) but not the type byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest message in either direction (Query, Parse, Bind, CopyData, DataRow, ...).
    /// PostgreSQL itself accepts up to 1 GiB; 64 MiB keeps one client from making the
    /// proxy buffer a gigabyte. Raise it for applications that send or read larger values.
    pub max_message_len: usize,
    /// The largest client control message (Sync, Flush, Terminate, Close, Describe,
    /// Execute, CopyDone, CopyFail): PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`, 10000.
    pub max_small_message_len: usize,
    /// The largest client authentication message ('p': password, SASL, GSS):
    /// PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`, 65535.
    pub max_auth_message_len: usize,
    /// The largest startup packet: PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`, 10000.
    pub max_startup_len: usize,
}

impl Limits {
    /// 64 MiB.
    pub const DEFAULT_MAX_MESSAGE_LEN: usize = 64 << 20;
    /// PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`.
    pub const DEFAULT_MAX_SMALL_MESSAGE_LEN: usize = 10_000;
    /// PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`.
    pub const DEFAULT_MAX_AUTH_MESSAGE_LEN: usize = 65_535;
    /// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
    pub const DEFAULT_MAX_STARTUP_LEN: usize = 10_000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_len: Self::DEFAULT_MAX_MESSAGE_LEN,
            max_small_message_len: Self::DEFAULT_MAX_SMALL_MESSAGE_LEN,
            max_auth_message_len: Self::DEFAULT_MAX_AUTH_MESSAGE_LEN,
            max_startup_len: Self::DEFAULT_MAX_STARTUP_LEN,
        }
    }
}

/// One whole tagged message as received: type byte, length, body. Forwarding a frame
/// writes [`Frame::as_bytes`] unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Invariant: at least 5 bytes, and the length field matches.
    bytes: Bytes,
}

impl Frame {
    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.bytes.first().copied().unwrap_or(0)
    }

    /// The body: everything after the type byte and length.
    pub fn body(&self) -> Bytes {
        self.bytes.slice(5.min(self.bytes.len())..)
    }

    /// The body, borrowed (no reference count taken).
    pub fn body_slice(&self) -> &[u8] {
        self.bytes.get(5..).unwrap_or_default()
    }

    /// The whole message, type byte and length included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A copy of one whole message measured by [`BackendDecoder::frame_len`].
    pub fn copy_from_slice(whole: &[u8]) -> Frame {
        Frame { bytes: Bytes::copy_from_slice(whole) }
    }

    /// The whole message as a cheap `Bytes` handle.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Total size on the wire (type byte included).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true (a frame has at least a type byte and a length); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("tag", &format_args!("{}", Tag(self.tag())))
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The Int32 length after the type byte, when 5 bytes are there.
fn peek_len(buf: &[u8]) -> Option<i32> {
    let header: [u8; 4] = buf.get(1..5)?.try_into().ok()?;
    Some(i32::from_be_bytes(header))
}

/// Takes one tagged message off `buf` once it is complete, after checking its length
/// against `limit`. `message` names it in errors.
fn split_frame(buf: &mut BytesMut, message: &'static str, limit: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(total) = frame_len(buf, message, limit)? else { return Ok(None) };
    Ok(Some(Frame { bytes: buf.split_to(total).freeze() }))
}

/// The size of the whole message at the start of `buf` (type byte included) once all of it
/// is there; an error for a length below 4 or above `limit`.
fn frame_len(buf: &[u8], message: &'static str, limit: usize) -> Result<Option<usize>, ProtocolError> {
    let Some(len) = peek_len(buf) else { return Ok(None) };
    let Ok(len) = usize::try_from(len) else {
        return Err(ProtocolError::BadLength { message, len, min: 4 });
    };
    if len < 4 {
        // `len` came from a non-negative i32 below 4.
        return Err(ProtocolError::BadLength { message, len: len as i32, min: 4 });
    }
    if len > limit {
        return Err(ProtocolError::TooLong { message, len, limit });
    }
    let total = len + 1;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(total))
}
