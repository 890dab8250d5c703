//! Encoding helpers: the tag + length framing (length patched in after the body is
//! written, as postgres-protocol does) and the wire's integer and string forms.
//!
//! Encoders are infallible. Values that cannot fit their wire field — more than 32767
//! elements in an Int16-counted list, a message body over 2 GiB — can only come from a
//! caller's bug (decoded messages always fit, since their counts were Int16 and their
//! lengths under [`super::Limits`]); for them the encoder still writes a well-framed message,
//! clamping the count and leaving out the elements past it, and debug builds assert.

use bytes::{BufMut, BytesMut};

/// Writes `tag`, a placeholder length, the body, then the real length.
pub(crate) fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let start = buf.len();
    buf.put_i32(0);
    body(buf);
    patch_len(buf, start);
}

/// Writes the length of everything from `start` (where a placeholder Int32 was put) to the
/// end of `buf` into that placeholder.
pub(crate) fn patch_len(buf: &mut BytesMut, start: usize) {
    let len = buf.len().saturating_sub(start);
    debug_assert!(len <= i32::MAX as usize, "message of {len} bytes is too long for the protocol");
    let len = i32::try_from(len).unwrap_or(i32::MAX);
    if let Some(slot) = buf.get_mut(start..start + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// Writes `bytes` and a NUL terminator. `bytes` must not contain NUL ([`super::Text`]
/// guarantees it).
pub(crate) fn cstr(buf: &mut BytesMut, bytes: &[u8]) {
    buf.put_slice(bytes);
    buf.put_u8(0);
}

/// Writes a `String` field as a protocol string. A NUL inside it cannot be carried and is
/// left out; decoded strings never contain one, so round trips are exact.
pub(crate) fn str_cstr(buf: &mut BytesMut, s: &str) {
    if s.as_bytes().contains(&0) {
        buf.extend(s.bytes().filter(|&b| b != 0));
    } else {
        buf.put_slice(s.as_bytes());
    }
    buf.put_u8(0);
}

/// Writes an Int16 element count and returns how many elements to write after it.
pub(crate) fn count16(buf: &mut BytesMut, n: usize) -> usize {
    debug_assert!(n <= i16::MAX as usize, "{n} elements do not fit an Int16 count");
    let n = n.min(i16::MAX as usize);
    buf.put_i16(n as i16);
    n
}

/// Writes a value with an Int32 length prefix, -1 for NULL.
pub(crate) fn nullable(buf: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => buf.put_i32(-1),
        Some(v) => {
            debug_assert!(v.len() <= i32::MAX as usize);
            buf.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
            buf.put_slice(v);
        }
    }
}
