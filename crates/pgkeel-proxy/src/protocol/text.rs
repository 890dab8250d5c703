//! [`Text`]: a protocol string (the wire's NUL-terminated `String` type) kept as raw bytes.
//!
//! Query text, statement and portal names, error messages and parameter values travel in
//! the connection's `client_encoding`, which need not be UTF-8 (LATIN1 clients exist). A
//! proxy must forward them byte for byte, so the codec does not force them into `String`:
//! [`Text`] is a zero-copy slice of the received message that is guaranteed to contain no
//! NUL byte (so it always encodes back to the same bytes), with [`Text::to_str`] for the
//! places that need UTF-8. SASL mechanism names (ASCII by definition) and startup
//! parameters (matched against the proxy's UTF-8 configuration; they arrive before any
//! `client_encoding` applies) are decoded as `String` instead, and must be valid UTF-8.

use std::fmt;

use bytes::Bytes;

use super::ProtocolError;

/// A protocol string without its NUL terminator. Never contains a NUL byte.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(Bytes);

impl Text {
    /// Wraps `bytes`, refusing a NUL byte anywhere in it.
    pub fn new(bytes: impl Into<Bytes>) -> Result<Text, ProtocolError> {
        let bytes = bytes.into();
        match bytes.iter().position(|&b| b == 0) {
            Some(offset) => Err(ProtocolError::InteriorNul { what: "text", offset }),
            None => Ok(Text(bytes)),
        }
    }

    /// A text from a string constant.
    ///
    /// # Panics
    /// If `s` contains a NUL byte: that is a bug in the calling code, like
    /// `http::HeaderValue::from_static` with an invalid header. Never use it on input.
    pub fn from_static(s: &'static str) -> Text {
        assert!(!s.as_bytes().contains(&0), "Text::from_static: {s:?} contains a NUL byte");
        Text(Bytes::from_static(s.as_bytes()))
    }

    /// A text from any string, with NUL bytes removed. For messages the proxy composes
    /// itself (error texts that may quote user input), where failing is worse than dropping
    /// an invisible byte.
    pub fn lossy(s: &str) -> Text {
        if s.as_bytes().contains(&0) {
            Text(Bytes::from(s.replace('\0', "")))
        } else {
            Text(Bytes::copy_from_slice(s.as_bytes()))
        }
    }

    /// Wraps bytes already known to contain no NUL (the decoder found them between
    /// terminators).
    pub(crate) fn from_bytes_unchecked(bytes: Bytes) -> Text {
        debug_assert!(!bytes.contains(&0));
        Text(bytes)
    }

    /// The raw bytes, without terminator.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw bytes as a cheap `Bytes` handle.
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Length in bytes, without terminator.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this is the empty string (e.g. the unnamed statement or portal).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text as UTF-8, when it is valid UTF-8.
    pub fn to_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.0)
    }

    /// The text as UTF-8 with invalid sequences replaced by U+FFFD.
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.to_string_lossy(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl TryFrom<&str> for Text {
    type Error = ProtocolError;
    fn try_from(s: &str) -> Result<Text, ProtocolError> {
        Text::new(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for Text {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Text, ProtocolError> {
        Text::new(Bytes::from(s))
    }
}
