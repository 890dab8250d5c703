//! The codec's error type. Every error names the message (or packet) that was wrong and what
//! was wrong with it, in words a log reader can act on.

use std::fmt;

/// Which side of a connection sent a message: their tags overlap (`'H'` is Flush from a
/// client and CopyOutResponse from a server), so a tag alone does not name a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server.
    Frontend,
    /// Server to client.
    Backend,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Frontend => "frontend",
            Direction::Backend => "backend",
        })
    }
}

/// A message type byte, shown as `'Q'` when printable and `0x00` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Why bytes could not be decoded as a protocol message.
///
/// Any of these means the peer does not speak the protocol (or is hostile): the connection
/// cannot be resynchronised and should be closed, after sending the client an
/// ErrorResponse ([`ProtocolError::to_error_response`]) where that makes sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The length field is smaller than the message's fixed part (at least 4, the length
    /// field itself), or negative.
    #[error("{message}: invalid length {len} (must be at least {min})")]
    BadLength {
        /// The message or packet, e.g. `"Query message"`.
        message: &'static str,
        /// The declared length, as a signed 32-bit value.
        len: i32,
        /// The smallest valid length.
        min: usize,
    },

    /// The length field is larger than the configured limit ([`crate::protocol::Limits`]).
    #[error("{message}: length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        /// The message or packet.
        message: &'static str,
        /// The declared length.
        len: usize,
        /// The limit that applies to this message.
        limit: usize,
    },

    /// A message type byte this side of the protocol does not define.
    #[error("unknown {direction} message type {tag}")]
    UnknownMessage {
        /// Who sent it.
        direction: Direction,
        /// The type byte.
        tag: Tag,
    },

    /// A startup packet asked for a protocol version other than 3.x.
    #[error("unsupported frontend protocol {major}.{minor}: only protocol 3.x is supported")]
    UnsupportedVersion {
        /// Major version (the high 16 bits of the version field).
        major: u16,
        /// Minor version (the low 16 bits).
        minor: u16,
    },

    /// A message whose length was acceptable but whose content is not: truncated fields,
    /// missing NUL terminators, counts that do not match the bytes present, invalid values,
    /// trailing bytes.
    #[error("{message}: {detail}")]
    Malformed {
        /// The message or packet.
        message: &'static str,
        /// What is wrong, e.g. "declared 3 parameter formats but only 2 bytes remain".
        detail: String,
    },

    /// A well-formed message that cannot be interpreted in the current state, e.g. a
    /// PasswordMessage ('p') when no authentication exchange is in progress.
    #[error("{message} not expected: {detail}")]
    Unexpected {
        /// The message.
        message: &'static str,
        /// Why it is not expected now.
        detail: String,
    },

    /// A value could not be turned into protocol text (it contains a NUL byte, which
    /// the wire format uses as the string terminator).
    #[error("{what} contains a NUL byte at offset {offset}, which the protocol cannot carry in a string")]
    InteriorNul {
        /// What was being built.
        what: &'static str,
        /// Offset of the first NUL byte.
        offset: usize,
    },
}

impl ProtocolError {
    pub(crate) fn malformed(message: &'static str, detail: impl Into<String>) -> Self {
        ProtocolError::Malformed { message, detail: detail.into() }
    }

    /// The ErrorResponse a proxy sends a client before closing a connection that broke the
    /// protocol: severity FATAL, SQLSTATE 08P01 (protocol_violation), this error's text.
    pub fn to_error_response(&self) -> crate::protocol::BackendMessage {
        crate::protocol::BackendMessage::error(
            crate::protocol::Severity::Fatal,
            crate::protocol::sqlstate::PROTOCOL_VIOLATION,
            &self.to_string(),
        )
    }
}
