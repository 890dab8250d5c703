//! Malformed input: each row is bytes and the exact error text they must produce.

use super::*;

fn frontend_err(auth: AuthExpect, bytes: &[u8]) -> String {
    let mut buf = BytesMut::from(bytes);
    match frontend(auth).decode(&mut buf) {
        Err(e) => e.to_string(),
        Ok(other) => format!("no error: {other:?}"),
    }
}

fn backend_err(bytes: &[u8]) -> String {
    let mut buf = BytesMut::from(bytes);
    match BackendDecoder::default().decode(&mut buf) {
        Err(e) => e.to_string(),
        Ok(other) => format!("no error: {other:?}"),
    }
}

fn startup_err(bytes: &[u8]) -> String {
    let mut buf = BytesMut::from(bytes);
    match StartupPacket::decode(&mut buf, &Limits::default()) {
        Err(e) => e.to_string(),
        Ok(other) => format!("no error: {other:?}"),
    }
}

fn with_len(tag: u8, len: i32) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[test]
fn malformed_frontend_messages() {
    let none = AuthExpect::None;
    let cases: Vec<(&str, AuthExpect, Vec<u8>, &str)> = vec![
        ("length below 4", none, with_len(b'Q', 3), "Query message: invalid length 3 (must be at least 4)"),
        ("negative length", none, with_len(b'Q', -1), "Query message: invalid length -1 (must be at least 4)"),
        (
            "garbage length",
            none,
            vec![b'B', 0x80, 0, 0, 0],
            "Bind message: invalid length -2147483648 (must be at least 4)",
        ),
        (
            "over the limit",
            none,
            with_len(b'Q', 64 * 1024 * 1024 + 1),
            "Query message: length 67108865 exceeds the limit of 67108864 bytes",
        ),
        (
            "control message over 10000",
            none,
            with_len(b'S', 10_001),
            "Sync message: length 10001 exceeds the limit of 10000 bytes",
        ),
        (
            "auth message over 65535",
            AuthExpect::Password,
            with_len(b'p', 65_536),
            "PasswordMessage: length 65536 exceeds the limit of 65535 bytes",
        ),
        ("unknown tag", none, tagged(b'z', b""), "unknown frontend message type 'z'"),
        ("unknown tag, unprintable", none, vec![0], "unknown frontend message type 0x00"),
        ("backend-only tag", none, tagged(b'Z', b"I"), "unknown frontend message type 'Z'"),
        ("query without NUL", none, tagged(b'Q', b"select 1"), "Query message: query string is not NUL-terminated"),
        ("empty query body", none, tagged(b'Q', b""), "Query message: query string is not NUL-terminated"),
        (
            "bytes after query",
            none,
            tagged(b'Q', b"select 1\0xy"),
            "Query message: 2 unexpected bytes after the last field",
        ),
        ("sync with a body", none, tagged(b'S', b"x"), "Sync message: 1 unexpected byte after the last field"),
        (
            "terminate with a body",
            none,
            tagged(b'X', b"\0\0"),
            "Terminate message: 2 unexpected bytes after the last field",
        ),
        (
            "bind: more formats than bytes",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(3).i16(0).bytes()),
            "Bind message: declared 3 parameter formats but only 2 bytes remain",
        ),
        (
            "bind: negative format count",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(-1).bytes()),
            "Bind message: negative parameter format count -1",
        ),
        (
            "bind: missing format count",
            none,
            tagged(b'B', Body::new().cstr("p").cstr("s").bytes()),
            "Bind message: truncated parameter format count: needs 2 bytes but only 0 remain",
        ),
        (
            "bind: portal not terminated",
            none,
            tagged(b'B', b"portal"),
            "Bind message: portal name is not NUL-terminated",
        ),
        (
            "bind: more values than bytes",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(0).i16(32767).i32(-1).bytes()),
            "Bind message: declared 32767 parameter values but only 4 bytes remain",
        ),
        (
            "bind: negative value length",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(0).i16(1).i32(-2).i16(0).bytes()),
            "Bind message: parameter 1 has invalid length -2",
        ),
        (
            "bind: value longer than the message",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(0).i16(2).i32(-1).i32(100).raw(b"abc").bytes()),
            "Bind message: parameter 2 declares 100 bytes but only 3 remain",
        ),
        (
            "bind: missing result formats",
            none,
            tagged(b'B', Body::new().cstr("").cstr("").i16(0).i16(0).bytes()),
            "Bind message: truncated result format count: needs 2 bytes but only 0 remain",
        ),
        (
            "parse: more types than bytes",
            none,
            tagged(b'P', Body::new().cstr("s").cstr("select $1, $2").i16(2).i32(23).bytes()),
            "Parse message: declared 2 parameter types but only 4 bytes remain",
        ),
        (
            "parse: query not terminated",
            none,
            tagged(b'P', Body::new().cstr("s").raw(b"select").bytes()),
            "Parse message: query string is not NUL-terminated",
        ),
        (
            "describe: bad target",
            none,
            tagged(b'D', Body::new().u8(b'X').cstr("s").bytes()),
            "Describe message: invalid target type 'X' (expected 'S' or 'P')",
        ),
        (
            "close: empty",
            none,
            tagged(b'C', b""),
            "Close message: truncated target type: needs 1 byte but only 0 remain",
        ),
        (
            "execute: short row limit",
            none,
            tagged(b'E', Body::new().cstr("").i16(0).bytes()),
            "Execute message: truncated row limit: needs 4 bytes but only 2 remain",
        ),
        (
            "copyfail: not terminated",
            none,
            tagged(b'f', b"oops"),
            "CopyFail message: error message is not NUL-terminated",
        ),
        ("copydone with a body", none, tagged(b'c', b"x"), "CopyDone message: 1 unexpected byte after the last field"),
        (
            "function call: missing result format",
            none,
            tagged(b'F', Body::new().i32(1598).i16(0).i16(1).i32(-1).bytes()),
            "FunctionCall message: truncated result format: needs 2 bytes but only 0 remain",
        ),
        (
            "function call: more args than bytes",
            none,
            tagged(b'F', Body::new().i32(1598).i16(0).i16(5).i32(-1).bytes()),
            "FunctionCall message: declared 5 arguments but only 4 bytes remain",
        ),
        (
            "password outside authentication",
            none,
            tagged(b'p', b"secret\0"),
            "PasswordMessage ('p') not expected: no authentication exchange is in progress",
        ),
        (
            "password with trailing bytes",
            AuthExpect::Password,
            tagged(b'p', b"secret\0x"),
            "PasswordMessage: 1 unexpected byte after the last field",
        ),
        (
            "password not terminated",
            AuthExpect::Password,
            tagged(b'p', b"secret"),
            "PasswordMessage: password is not NUL-terminated",
        ),
        (
            "sasl: mechanism not UTF-8",
            AuthExpect::SaslInitial,
            tagged(b'p', Body::new().raw(b"SCRAM\xff\0").i32(-1).bytes()),
            "SASLInitialResponse message: mechanism name is not valid UTF-8 (at byte 5)",
        ),
        (
            "sasl: response longer than the message",
            AuthExpect::SaslInitial,
            tagged(b'p', Body::new().cstr("SCRAM-SHA-256").i32(10).raw(b"n,,").bytes()),
            "SASLInitialResponse message: initial response declares 10 bytes but only 3 remain",
        ),
        (
            "sasl: missing response length",
            AuthExpect::SaslInitial,
            tagged(b'p', Body::new().cstr("SCRAM-SHA-256").bytes()),
            "SASLInitialResponse message: truncated initial response length: needs 4 bytes but only 0 remain",
        ),
    ];
    for (name, auth, bytes, want) in cases {
        assert_eq!(frontend_err(auth, &bytes), want, "case {name:?}");
    }
}

#[test]
fn malformed_backend_messages() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("length below 4", with_len(b'Z', 0), "ReadyForQuery message: invalid length 0 (must be at least 4)"),
        (
            "over the limit",
            with_len(b'D', i32::MAX),
            "DataRow message: length 2147483647 exceeds the limit of 67108864 bytes",
        ),
        ("unknown tag", tagged(b'x', b""), "unknown backend message type 'x'"),
        ("frontend-only tag", tagged(b'Q', b"select 1\0"), "unknown backend message type 'Q'"),
        (
            "ready for query: bad status",
            tagged(b'Z', b"X"),
            "ReadyForQuery message: invalid transaction status 'X' (expected 'I', 'T' or 'E')",
        ),
        (
            "ready for query: no status",
            tagged(b'Z', b""),
            "ReadyForQuery message: truncated transaction status: needs 1 byte but only 0 remain",
        ),
        (
            "ready for query: two bytes",
            tagged(b'Z', b"II"),
            "ReadyForQuery message: 1 unexpected byte after the last field",
        ),
        (
            "data row: more columns than bytes",
            tagged(b'D', Body::new().i16(2).i32(-1).bytes()),
            "DataRow message: declared 2 columns but only 4 bytes remain",
        ),
        (
            "data row: negative count",
            tagged(b'D', Body::new().i16(-3).bytes()),
            "DataRow message: negative column count -3",
        ),
        (
            "data row: value too long",
            tagged(b'D', Body::new().i16(1).i32(5).raw(b"abc").bytes()),
            "DataRow message: column 1 declares 5 bytes but only 3 remain",
        ),
        (
            "error: no final NUL",
            tagged(b'E', b"SERROR\0MBoom\0"),
            "ErrorResponse message: missing the NUL byte that ends the field list",
        ),
        (
            "error: field not terminated",
            tagged(b'E', b"SERROR\0MBoom"),
            "ErrorResponse message: field 'M' value is not NUL-terminated",
        ),
        (
            "notice: trailing bytes",
            tagged(b'N', b"Mhi\0\0x"),
            "NoticeResponse message: 1 unexpected byte after the last field",
        ),
        (
            "auth: unknown type",
            tagged(b'R', Body::new().i32(2).bytes()),
            "Authentication message: unsupported authentication request type 2",
        ),
        (
            "auth: no type",
            tagged(b'R', b""),
            "Authentication message: truncated authentication request type: needs 4 bytes but only 0 remain",
        ),
        (
            "auth: short MD5 salt",
            tagged(b'R', Body::new().i32(5).raw(b"abc").bytes()),
            "Authentication message: truncated MD5 salt: needs 4 bytes but only 3 remain",
        ),
        (
            "auth: long MD5 salt",
            tagged(b'R', Body::new().i32(5).raw(b"abcde").bytes()),
            "Authentication message: 1 unexpected byte after the last field",
        ),
        (
            "auth ok with a body",
            tagged(b'R', Body::new().i32(0).u8(0).bytes()),
            "Authentication message: 1 unexpected byte after the last field",
        ),
        (
            "auth: SASL list without terminator",
            tagged(b'R', Body::new().i32(10).cstr("SCRAM-SHA-256").bytes()),
            "Authentication message: SASL mechanism list is missing its terminating empty string",
        ),
        (
            "auth: SASL name not UTF-8",
            tagged(b'R', Body::new().i32(10).raw(b"\xc3\0\0").bytes()),
            "Authentication message: SASL mechanism name is not valid UTF-8 (at byte 0)",
        ),
        (
            "backend key: short key",
            tagged(b'K', Body::new().i32(1).raw(b"abc").bytes()),
            "BackendKeyData message: secret key of 3 bytes (must be 4 to 256)",
        ),
        (
            "backend key: long key",
            tagged(b'K', Body::new().i32(1).raw(&[0; 257]).bytes()),
            "BackendKeyData message: secret key of 257 bytes (must be 4 to 256)",
        ),
        (
            "row description: more fields than bytes",
            tagged(b'T', Body::new().i16(1).raw(&[0; 10]).bytes()),
            "RowDescription message: declared 1 field but only 10 bytes remain",
        ),
        (
            "row description: name not terminated",
            tagged(b'T', Body::new().i16(1).raw(&[b'a'; 19]).bytes()),
            "RowDescription message: field 1 name is not NUL-terminated",
        ),
        (
            "negotiate: negative option count",
            tagged(b'v', Body::new().i32(0).i32(-1).bytes()),
            "NegotiateProtocolVersion message: negative option count -1",
        ),
        (
            "negotiate: more options than bytes",
            tagged(b'v', Body::new().i32(0).i32(1_000_000).cstr("x").bytes()),
            "NegotiateProtocolVersion message: declared 1000000 options but only 2 bytes remain",
        ),
        (
            "parameter status: no value",
            tagged(b'S', Body::new().cstr("TimeZone").bytes()),
            "ParameterStatus message: parameter value is not NUL-terminated",
        ),
        (
            "copy out: no format",
            tagged(b'H', b""),
            "CopyOutResponse message: truncated overall format: needs 1 byte but only 0 remain",
        ),
        (
            "copy in: more formats than bytes",
            tagged(b'G', Body::new().u8(0).i16(3).i16(0).bytes()),
            "CopyInResponse message: declared 3 column formats but only 2 bytes remain",
        ),
        (
            "notification: payload not terminated",
            tagged(b'A', Body::new().i32(1).cstr("chan").raw(b"x").bytes()),
            "NotificationResponse message: payload is not NUL-terminated",
        ),
        (
            "parse complete with a body",
            tagged(b'1', b"\0"),
            "ParseComplete message: 1 unexpected byte after the last field",
        ),
        (
            "function result: bad length",
            tagged(b'V', Body::new().i32(-7).bytes()),
            "FunctionCallResponse message: result has invalid length -7",
        ),
        (
            "parameter description: more types than bytes",
            tagged(b't', Body::new().i16(2).i32(23).bytes()),
            "ParameterDescription message: declared 2 parameter types but only 4 bytes remain",
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(backend_err(&bytes), want, "case {name:?}");
    }
}

#[test]
fn malformed_startup_packets() {
    const V3: i32 = 3 << 16;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("length below 8", 7i32.to_be_bytes().to_vec(), "startup packet: invalid length 7 (must be at least 8)"),
        ("negative length", (-8i32).to_be_bytes().to_vec(), "startup packet: invalid length -8 (must be at least 8)"),
        (
            "over 10000",
            10_001i32.to_be_bytes().to_vec(),
            "startup packet: length 10001 exceeds the limit of 10000 bytes",
        ),
        (
            "direct TLS",
            vec![0x16, 0x03, 0x01, 0x02, 0x00],
            "startup packet: the client started a TLS handshake without SSLRequest (sslnegotiation=direct), \
             which is not supported; use sslnegotiation=postgres",
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\n".to_vec(),
            "startup packet: length 1195725856 exceeds the limit of 10000 bytes",
        ),
        (
            "protocol 2",
            untagged(2 << 16, b"user\0u\0\0"),
            "unsupported frontend protocol 2.0: only protocol 3.x is supported",
        ),
        (
            "protocol 4.1",
            untagged((4 << 16) | 1, b"\0"),
            "unsupported frontend protocol 4.1: only protocol 3.x is supported",
        ),
        (
            "unknown magic",
            untagged((1234 << 16) | 5681, b""),
            "unsupported frontend protocol 1234.5681: only protocol 3.x is supported",
        ),
        (
            "SSLRequest with a body",
            untagged(SSL_REQUEST_CODE, b"\0\0\0\0"),
            "SSLRequest: length 12 (must be exactly 8)",
        ),
        (
            "GSSENCRequest with a body",
            untagged(GSSENC_REQUEST_CODE, b"\0"),
            "GSSENCRequest: length 9 (must be exactly 8)",
        ),
        (
            "cancel: short pid",
            untagged(CANCEL_REQUEST_CODE, b"\0\0"),
            "CancelRequest: truncated process id: needs 4 bytes but only 2 remain",
        ),
        (
            "cancel: short key",
            untagged(CANCEL_REQUEST_CODE, b"\0\0\0\x01ab"),
            "CancelRequest: secret key of 2 bytes (must be 4 to 256)",
        ),
        (
            "cancel: key over 256 bytes",
            untagged(CANCEL_REQUEST_CODE, &[1; 4 + 257]),
            "CancelRequest: secret key of 257 bytes (must be 4 to 256)",
        ),
        ("no parameter list", untagged(V3, b""), "StartupMessage: missing the NUL byte that ends the parameter list"),
        (
            "no final NUL",
            untagged(V3, b"user\0bob\0"),
            "StartupMessage: missing the NUL byte that ends the parameter list",
        ),
        ("name without value", untagged(V3, b"user\0"), "StartupMessage: parameter \"user\" has no value"),
        ("name not terminated", untagged(V3, b"user"), "StartupMessage: parameter name is not NUL-terminated"),
        (
            "value not terminated",
            untagged(V3, b"user\0bob"),
            "StartupMessage: value of parameter \"user\" is not NUL-terminated",
        ),
        (
            "value not UTF-8",
            untagged(V3, b"user\0b\xffb\0\0"),
            "StartupMessage: value of parameter \"user\" is not valid UTF-8 (at byte 1)",
        ),
        (
            "name not UTF-8",
            untagged(V3, b"\xfe\0x\0\0"),
            "StartupMessage: parameter name is not valid UTF-8 (at byte 0)",
        ),
        (
            "bytes after the list",
            untagged(V3, b"user\0bob\0\0x"),
            "StartupMessage: 1 unexpected byte after the last field",
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(startup_err(&bytes), want, "case {name:?}");
    }
}

/// A length over the limit is refused as soon as the header is there, before the body
/// arrives: a client cannot make the proxy wait for (and buffer) a huge message.
#[test]
fn limits_are_checked_before_the_body() {
    let limits = Limits { max_message_len: 100, ..Limits::default() };
    let mut buf = BytesMut::from(&with_len(b'Q', 101)[..]);
    let err = FrontendDecoder::new(limits.clone()).decode(&mut buf).unwrap_err();
    assert_eq!(err, ProtocolError::TooLong { message: "Query message", len: 101, limit: 100 });
    let mut buf = BytesMut::from(&with_len(b'D', 101)[..]);
    assert!(matches!(BackendDecoder::new(limits.clone()).decode_frame(&mut buf), Err(ProtocolError::TooLong { .. })));
    // Unknown tags in frame mode get the general limit.
    let mut buf = BytesMut::from(&with_len(b'z', 101)[..]);
    let err = FrontendDecoder::new(limits).decode_frame(&mut buf).unwrap_err();
    assert_eq!(err.to_string(), "frontend message: length 101 exceeds the limit of 100 bytes");
    // At the limit is fine.
    let mut buf = BytesMut::from(&tagged(b'Q', &[b'x'; 96])[..]);
    buf[100] = 0;
    let limits = Limits { max_message_len: 100, ..Limits::default() };
    assert!(FrontendDecoder::new(limits).decode(&mut buf).unwrap().is_some());
}

/// An unknown type byte is refused at once, without waiting for a length.
#[test]
fn unknown_tags_fail_fast() {
    let mut buf = BytesMut::from(&b"\x01"[..]);
    assert!(matches!(frontend(AuthExpect::None).decode(&mut buf), Err(ProtocolError::UnknownMessage { .. })));
    let mut buf = BytesMut::from(&b"q"[..]);
    assert!(matches!(BackendDecoder::default().decode(&mut buf), Err(ProtocolError::UnknownMessage { .. })));
    // Frame mode forwards what it does not know, checking only the length.
    let mut buf = BytesMut::from(&tagged(b'q', b"abc")[..]);
    let frame = frontend(AuthExpect::None).decode_frame(&mut buf).unwrap().unwrap();
    assert_eq!(frame.tag(), b'q');
    assert_eq!(
        FrontendMessage::parse(&frame, AuthExpect::None).unwrap_err().to_string(),
        "unknown frontend message type 'q'"
    );
}

/// `error_code` reads the SQLSTATE of a whole ErrorResponse at the front of the bytes and
/// nothing else: truncated, other messages, a length that lies, fields without their end.
#[test]
fn error_code_of_a_peeked_error_response() {
    let mut whole = BytesMut::new();
    BackendMessage::ErrorResponse(ErrorFields::new(Severity::Fatal, "57P05", "idle-session timeout"))
        .encode(&mut whole);
    assert_eq!(error_code(&whole), Some(*b"57P05"));
    // Followed by more (the end of the stream is no byte): the first message counts.
    let mut more = whole.to_vec();
    more.extend_from_slice(b"Z\0\0\0\x05I");
    assert_eq!(error_code(&more), Some(*b"57P05"));
    for cut in 0..whole.len() {
        assert_eq!(error_code(&whole[..cut]), None, "cut at {cut}");
    }
    assert_eq!(error_code(b"Z\0\0\0\x05I"), None);
    assert_eq!(error_code(b"E\0\0\0\x02"), None, "a length below 4");
    assert_eq!(error_code(b"E\0\0\0\x0cSFATAL\0\0"), None, "no code field");
    assert_eq!(error_code(b"E\0\0\0\x0aSFATAL"), None, "a field without its end");
    assert_eq!(error_code(b"E\0\0\0\x0bC57P0\0\0"), None, "a code of 4 characters");
}
