//! A bounds-checked cursor over one message body. Every read checks the bytes left and
//! fails with an error naming the message and the field; slices share the message's
//! buffer (`Bytes::slice`), so reading copies nothing.

use std::fmt;

use bytes::Bytes;

use super::{ProtocolError, Text};

pub(crate) struct Reader {
    /// The message name used in errors, e.g. "Bind message".
    message: &'static str,
    body: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(message: &'static str, body: Bytes) -> Reader {
        Reader { message, body, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.body.len().saturating_sub(self.pos)
    }

    pub(crate) fn err(&self, detail: impl Into<String>) -> ProtocolError {
        ProtocolError::malformed(self.message, detail)
    }

    fn take(&mut self, n: usize, field: impl fmt::Display + Copy) -> Result<Bytes, ProtocolError> {
        let remaining = self.remaining();
        if n > remaining {
            return Err(self.err(format!(
                "truncated {field}: needs {n} byte{} but only {remaining} remain",
                if n == 1 { "" } else { "s" }
            )));
        }
        let out = self.body.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: impl fmt::Display + Copy) -> Result<[u8; N], ProtocolError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: impl fmt::Display + Copy) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn i16(&mut self, field: impl fmt::Display + Copy) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn i32(&mut self, field: impl fmt::Display + Copy) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: impl fmt::Display + Copy) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn bytes(&mut self, n: usize, field: impl fmt::Display + Copy) -> Result<Bytes, ProtocolError> {
        self.take(n, field)
    }

    /// Everything left in the message.
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.body.slice(self.pos.min(self.body.len())..);
        self.pos = self.body.len();
        out
    }

    /// A NUL-terminated string; the terminator is consumed, not returned.
    pub(crate) fn cstr(&mut self, field: impl fmt::Display + Copy) -> Result<Text, ProtocolError> {
        let rest = self.body.get(self.pos..).unwrap_or_default();
        match rest.iter().position(|&b| b == 0) {
            Some(n) => {
                let s = self.body.slice(self.pos..self.pos + n);
                self.pos += n + 1;
                Ok(Text::from_bytes_unchecked(s))
            }
            None => Err(self.err(format!("{field} is not NUL-terminated"))),
        }
    }

    /// A NUL-terminated string that must be UTF-8.
    pub(crate) fn utf8(&mut self, field: impl fmt::Display + Copy) -> Result<String, ProtocolError> {
        let text = self.cstr(field)?;
        match text.to_str() {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.err(format!("{field} is not valid UTF-8 (at byte {})", e.valid_up_to()))),
        }
    }

    /// A 16-bit element count, checked to be non-negative and to fit: `count` elements of
    /// at least `min_size` bytes each must fit in what is left. Bounding by the bytes present
    /// is what keeps `Vec::with_capacity(count)` safe on untrusted input.
    pub(crate) fn count(&mut self, what: impl fmt::Display + Copy, min_size: usize) -> Result<usize, ProtocolError> {
        let n = self.i16(format_args!("{what} count"))?;
        let Ok(n) = usize::try_from(n) else {
            return Err(self.err(format!("negative {what} count {n}")));
        };
        let remaining = self.remaining();
        if n.saturating_mul(min_size) > remaining {
            return Err(self.err(format!(
                "declared {n} {what}{} but only {remaining} byte{} remain",
                if n == 1 { "" } else { "s" },
                if remaining == 1 { "" } else { "s" }
            )));
        }
        Ok(n)
    }

    /// A value prefixed by a 32-bit length, where -1 means NULL.
    pub(crate) fn nullable(&mut self, field: impl fmt::Display + Copy) -> Result<Option<Bytes>, ProtocolError> {
        let len = self.i32(format_args!("{field} length"))?;
        if len == -1 {
            return Ok(None);
        }
        let Ok(len) = usize::try_from(len) else {
            return Err(self.err(format!("{field} has invalid length {len}")));
        };
        let remaining = self.remaining();
        if len > remaining {
            return Err(self.err(format!("{field} declares {len} bytes but only {remaining} remain")));
        }
        self.bytes(len, field).map(Some)
    }

    /// Fails unless the whole body was consumed.
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.err(format!("{n} unexpected byte{} after the last field", if n == 1 { "" } else { "s" }))),
        }
    }
}
