//! Unit tests of the codec: round trips of every message, malformed input tables, byte-at-
//! a-time streams, and random input.

mod malformed;
mod random;
mod roundtrip;
mod stream;

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

fn t(s: &'static str) -> Text {
    Text::from_static(s)
}

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

/// A tagged message with a correct length: tag, Int32 length, body.
fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A startup packet with a correct length: Int32 length, code, body.
fn untagged(code: i32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(body.len() as i32 + 8).to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Body builder for hand-made messages.
#[derive(Default)]
struct Body(BytesMut);

impl Body {
    fn new() -> Body {
        Body::default()
    }
    fn cstr(mut self, s: &str) -> Body {
        self.0.put_slice(s.as_bytes());
        self.0.put_u8(0);
        self
    }
    fn raw(mut self, s: &[u8]) -> Body {
        self.0.put_slice(s);
        self
    }
    fn u8(mut self, v: u8) -> Body {
        self.0.put_u8(v);
        self
    }
    fn i16(mut self, v: i16) -> Body {
        self.0.put_i16(v);
        self
    }
    fn i32(mut self, v: i32) -> Body {
        self.0.put_i32(v);
        self
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

fn frontend(auth: AuthExpect) -> FrontendDecoder {
    FrontendDecoder { limits: Limits::default(), auth }
}

#[test]
fn error_response_helper() {
    let msg = BackendMessage::error(Severity::Fatal, sqlstate::TOO_MANY_CONNECTIONS, "too many clients");
    let BackendMessage::ErrorResponse(fields) = &msg else { panic!("{msg:?}") };
    assert_eq!(fields.severity().unwrap(), "FATAL");
    assert_eq!(fields.code().unwrap(), "53300");
    assert_eq!(fields.message().unwrap(), "too many clients");
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    let body = b"SFATAL\0VFATAL\0C53300\0Mtoo many clients\0\0";
    assert_eq!(&buf[..], &tagged(b'E', body)[..]);

    let notice = BackendMessage::error(Severity::Warning, "01000", "careful\0 now");
    let BackendMessage::NoticeResponse(fields) = &notice else { panic!("{notice:?}") };
    assert_eq!(fields.message().unwrap(), "careful now", "NUL bytes are dropped");
    let with_hint = ErrorFields::new(Severity::Error, "42601", "syntax").with(field::HINT, t("add a comma"));
    assert_eq!(with_hint.hint().unwrap(), "add a comma");
    assert_eq!(with_hint.detail(), None);
}

#[test]
fn protocol_error_to_error_response() {
    let err = frontend(AuthExpect::None).decode(&mut BytesMut::from(&tagged(b'z', b"")[..])).unwrap_err();
    let BackendMessage::ErrorResponse(fields) = err.to_error_response() else { panic!() };
    assert_eq!(fields.severity().unwrap(), "FATAL");
    assert_eq!(fields.code().unwrap(), "08P01");
    assert_eq!(fields.message().unwrap(), "unknown frontend message type 'z'");
}

#[test]
fn auth_expect_follows_the_server() {
    use Authentication as A;
    let cases = [
        (A::Ok, AuthExpect::None),
        (A::CleartextPassword, AuthExpect::Password),
        (A::Md5Password { salt: *b"salt" }, AuthExpect::Password),
        (A::Gss, AuthExpect::Gss),
        (A::GssContinue(b(b"x")), AuthExpect::Gss),
        (A::Sspi, AuthExpect::Gss),
        (A::Sasl { mechanisms: vec!["SCRAM-SHA-256".into()] }, AuthExpect::SaslInitial),
        (A::SaslContinue(b(b"r=...")), AuthExpect::SaslContinue),
        (A::SaslFinal(b(b"v=...")), AuthExpect::None),
    ];
    for (request, expect) in cases {
        assert_eq!(AuthExpect::after(&request), expect, "{request:?}");
    }
}

#[test]
fn startup_message_helpers() {
    let m = StartupMessage::new([("user", "alice"), ("application_name", "psql"), ("_pq_.opt", "1")]);
    assert_eq!(m.user(), Some("alice"));
    assert_eq!(m.database(), Some("alice"), "database defaults to the user name");
    assert_eq!(m.protocol_options().collect::<Vec<_>>(), vec![("_pq_.opt", "1")]);
    let m = StartupMessage::new([("user", "alice"), ("database", "app"), ("database", "app2")]);
    assert_eq!(m.database(), Some("app2"), "the last repeated parameter wins");
}

#[test]
fn text_refuses_nul() {
    assert!(Text::new(b(b"ok")).is_ok());
    let err = Text::try_from("a\0b").unwrap_err();
    assert_eq!(err.to_string(), "text contains a NUL byte at offset 1, which the protocol cannot carry in a string");
    assert_eq!(Text::lossy("a\0b"), "ab");
    let latin1 = Text::new(b(b"caf\xe9")).unwrap();
    assert!(latin1.to_str().is_err(), "non-UTF-8 text is kept as bytes");
    assert_eq!(latin1.to_string_lossy(), "caf\u{fffd}");
}

#[test]
fn frame_accessors() {
    let mut buf = BytesMut::from(&tagged(b'Q', b"select 1\0")[..]);
    let frame = frontend(AuthExpect::None).decode_frame(&mut buf).unwrap().unwrap();
    assert_eq!(frame.tag(), b'Q');
    assert_eq!(&frame.body()[..], b"select 1\0");
    assert_eq!(frame.len(), 14);
    assert_eq!(format!("{frame:?}"), "Frame { tag: 'Q', len: 14 }");
    assert_eq!(FrontendMessage::parse(&frame, AuthExpect::None).unwrap(), FrontendMessage::Query(t("select 1")));
}
