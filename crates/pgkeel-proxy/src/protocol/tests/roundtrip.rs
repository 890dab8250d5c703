//! encode → decode gives the same message, for every message type, and the frame decoder
//! agrees on the bytes.

use super::*;

/// Every frontend message, with the auth state that makes its 'p' meaning unambiguous.
pub(super) fn frontend_messages() -> Vec<(FrontendMessage, AuthExpect)> {
    use FrontendMessage as F;
    let none = AuthExpect::None;
    vec![
        (F::Query(t("select 1")), none),
        (F::Query(t("")), none),
        (F::Query(Text::new(b(b"select 'caf\xe9'")).unwrap()), none),
        (F::Parse(Parse { name: t("s1"), query: t("select $1::int"), param_types: vec![23] }), none),
        (F::Parse(Parse { name: t(""), query: t("select 1"), param_types: vec![] }), none),
        (
            F::Bind(Bind {
                portal: t("p1"),
                statement: t("s1"),
                param_formats: vec![0, 1],
                params: vec![Some(b(b"42")), None, Some(b(b""))],
                result_formats: vec![1],
            }),
            none,
        ),
        (
            F::Bind(Bind {
                portal: t(""),
                statement: t(""),
                param_formats: vec![],
                params: vec![],
                result_formats: vec![],
            }),
            none,
        ),
        (F::Describe { target: Target::Statement, name: t("s1") }, none),
        (F::Describe { target: Target::Portal, name: t("") }, none),
        (F::Execute { portal: t(""), max_rows: 0 }, none),
        (F::Execute { portal: t("p1"), max_rows: 100 }, none),
        (F::Sync, none),
        (F::Flush, none),
        (F::Close { target: Target::Statement, name: t("s1") }, none),
        (F::Close { target: Target::Portal, name: t("p1") }, none),
        (F::CopyData(b(b"1\tone\n")), none),
        (F::CopyData(b(b"")), none),
        (F::CopyDone, none),
        (F::CopyFail { message: t("client gave up") }, none),
        (F::Password(t("s3cret")), AuthExpect::Password),
        (F::Password(t("md5a3556571e93b0d20722ba62be61e8c2d")), AuthExpect::Password),
        (
            F::SaslInitialResponse { mechanism: "SCRAM-SHA-256".into(), data: Some(b(b"n,,n=,r=abc")) },
            AuthExpect::SaslInitial,
        ),
        (F::SaslInitialResponse { mechanism: "SCRAM-SHA-256".into(), data: None }, AuthExpect::SaslInitial),
        (F::SaslResponse(b(b"c=biws,r=abc,p=xyz")), AuthExpect::SaslContinue),
        (F::GssResponse(b(b"\x60\x82\x01\x00")), AuthExpect::Gss),
        (
            F::FunctionCall(FunctionCall {
                function: 1598,
                arg_formats: vec![1],
                args: vec![Some(b(b"\0\0\0\x01")), None],
                result_format: 1,
            }),
            none,
        ),
        (F::Terminate, none),
    ]
}

/// Every backend message.
pub(super) fn backend_messages() -> Vec<BackendMessage> {
    use Authentication as A;
    use BackendMessage as B;
    vec![
        B::Authentication(A::Ok),
        B::Authentication(A::CleartextPassword),
        B::Authentication(A::Md5Password { salt: [1, 2, 0, 255] }),
        B::Authentication(A::Gss),
        B::Authentication(A::GssContinue(b(b"token"))),
        B::Authentication(A::Sspi),
        B::Authentication(A::Sasl { mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()] }),
        B::Authentication(A::Sasl { mechanisms: vec![] }),
        B::Authentication(A::SaslContinue(b(b"r=abc,s=c2FsdA==,i=4096"))),
        B::Authentication(A::SaslFinal(b(b"v=signature"))),
        B::BackendKeyData { pid: 4242, secret_key: b(b"\x01\x02\x03\x04") },
        B::BackendKeyData { pid: 7, secret_key: Bytes::from(vec![9u8; 32]) },
        B::ParameterStatus { name: t("server_version"), value: t("17.2") },
        B::ParameterStatus { name: t("application_name"), value: t("") },
        B::ReadyForQuery(TransactionStatus::Idle),
        B::ReadyForQuery(TransactionStatus::InTransaction),
        B::ReadyForQuery(TransactionStatus::Failed),
        B::RowDescription(vec![
            FieldDescription {
                name: t("id"),
                table_oid: 16384,
                column_id: 1,
                type_oid: 23,
                type_size: 4,
                type_modifier: -1,
                format: 0,
            },
            FieldDescription {
                name: t("?column?"),
                table_oid: 0,
                column_id: 0,
                type_oid: 25,
                type_size: -1,
                type_modifier: -1,
                format: 1,
            },
        ]),
        B::RowDescription(vec![]),
        B::DataRow(vec![Some(b(b"1")), None, Some(b(b""))]),
        B::DataRow(vec![]),
        B::CommandComplete { tag: t("SELECT 1") },
        B::CommandComplete { tag: t("INSERT 0 3") },
        B::EmptyQueryResponse,
        B::ErrorResponse(
            ErrorFields::new(Severity::Error, "42P01", "relation \"nope\" does not exist")
                .with(field::POSITION, t("15"))
                .with(field::FILE, t("parse_relation.c"))
                .with(b'Z', t("unknown field types are kept")),
        ),
        B::ErrorResponse(ErrorFields::default()),
        B::NoticeResponse(ErrorFields::new(Severity::Notice, "00000", "hello").with(field::DETAIL, t("d"))),
        B::ParseComplete,
        B::BindComplete,
        B::CloseComplete,
        B::NoData,
        B::ParameterDescription(vec![23, 25, 0]),
        B::ParameterDescription(vec![]),
        B::PortalSuspended,
        B::CopyInResponse(CopyResponse { format: 0, column_formats: vec![0, 0] }),
        B::CopyOutResponse(CopyResponse { format: 1, column_formats: vec![1] }),
        B::CopyBothResponse(CopyResponse { format: 0, column_formats: vec![] }),
        B::CopyData(b(b"1\tone\n")),
        B::CopyDone,
        B::NotificationResponse { pid: 99, channel: t("jobs"), payload: t("{\"id\":1}") },
        B::NegotiateProtocolVersion { newest_minor: 0, unrecognized_options: vec![t("_pq_.compression")] },
        B::NegotiateProtocolVersion { newest_minor: 2, unrecognized_options: vec![] },
        B::FunctionCallResponse(Some(b(b"\0\0\0\x02"))),
        B::FunctionCallResponse(None),
    ]
}

pub(super) fn startup_packets() -> Vec<StartupPacket> {
    vec![
        StartupPacket::SslRequest,
        StartupPacket::GssEncRequest,
        StartupPacket::CancelRequest(CancelRequest { pid: 1234, secret_key: b(b"\xde\xad\xbe\xef") }),
        StartupPacket::CancelRequest(CancelRequest { pid: 1, secret_key: Bytes::from(vec![7u8; 256]) }),
        StartupPacket::ForwardedCancel(CancelRequest { pid: 77, secret_key: b(b"\x01\x02\x03\x04") }),
        StartupPacket::Startup(StartupMessage::new([("user", "postgres"), ("database", "app")])),
        StartupPacket::Startup(StartupMessage::new(Vec::<(String, String)>::new())),
        StartupPacket::Startup(StartupMessage {
            version: ProtocolVersion::V3_2,
            params: vec![
                ("user".into(), "zoë".into()),
                ("options".into(), "-c search_path=app".into()),
                ("_pq_.x".into(), "".into()),
            ],
        }),
    ]
}

#[test]
fn frontend_round_trips() {
    let tags: std::collections::BTreeSet<u8> = frontend_messages().iter().map(|(m, _)| m.tag()).collect();
    assert_eq!(tags.len(), 14, "every frontend tag is covered: {tags:?}");
    for (msg, auth) in frontend_messages() {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let encoded = buf.clone().freeze();
        let decoded = frontend(auth).decode(&mut buf).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
        assert_eq!(decoded.as_ref(), Some(&msg));
        assert!(buf.is_empty(), "{msg:?} left {} bytes", buf.len());

        let mut buf = BytesMut::from(&encoded[..]);
        let frame = frontend(auth).decode_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(frame.as_bytes(), &encoded[..]);
        assert_eq!(frame.tag(), msg.tag());
        assert_eq!(FrontendMessage::parse(&frame, auth).unwrap(), msg);
    }
}

#[test]
fn backend_round_trips() {
    let tags: std::collections::BTreeSet<u8> = backend_messages().iter().map(|m| m.tag()).collect();
    assert_eq!(tags.len(), 24, "every backend tag is covered: {tags:?}");
    let decoder = BackendDecoder::default();
    for msg in backend_messages() {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let encoded = buf.clone().freeze();
        let decoded = decoder.decode(&mut buf).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
        assert_eq!(decoded.as_ref(), Some(&msg));
        assert!(buf.is_empty(), "{msg:?} left {} bytes", buf.len());

        let mut buf = BytesMut::from(&encoded[..]);
        let frame = decoder.decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.as_bytes(), &encoded[..]);
        assert_eq!(BackendMessage::parse(&frame).unwrap(), msg);
    }
}

#[test]
fn startup_round_trips() {
    for packet in startup_packets() {
        let mut buf = BytesMut::new();
        packet.encode(&mut buf);
        let decoded = StartupPacket::decode(&mut buf, &Limits::default()).unwrap_or_else(|e| panic!("{packet:?}: {e}"));
        assert_eq!(decoded.as_ref(), Some(&packet));
        assert!(buf.is_empty());
    }
}

/// The encoders write exactly what the protocol documentation shows, checked against
/// hand-made bytes for a few messages (so a symmetric bug in encoder and decoder cannot hide).
#[test]
fn known_encodings() {
    let mut buf = BytesMut::new();
    FrontendMessage::Query(t("select 1")).encode(&mut buf);
    assert_eq!(&buf[..], b"Q\0\0\0\x0dselect 1\0");

    let mut buf = BytesMut::new();
    FrontendMessage::Sync.encode(&mut buf);
    assert_eq!(&buf[..], b"S\0\0\0\x04");

    let mut buf = BytesMut::new();
    StartupPacket::SslRequest.encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x08\x04\xd2\x16\x2f");

    let mut buf = BytesMut::new();
    StartupPacket::Startup(StartupMessage::new([("user", "u")])).encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x10\0\x03\0\0user\0u\0\0");

    let mut buf = BytesMut::new();
    BackendMessage::ReadyForQuery(TransactionStatus::InTransaction).encode(&mut buf);
    assert_eq!(&buf[..], b"Z\0\0\0\x05T");

    let mut buf = BytesMut::new();
    BackendMessage::DataRow(vec![Some(b(b"1")), None]).encode(&mut buf);
    assert_eq!(&buf[..], b"D\0\0\0\x0f\0\x02\0\0\0\x011\xff\xff\xff\xff");

    let mut buf = BytesMut::new();
    FrontendMessage::Bind(Bind {
        portal: t(""),
        statement: t("s"),
        param_formats: vec![],
        params: vec![Some(b(b"7"))],
        result_formats: vec![],
    })
    .encode(&mut buf);
    assert_eq!(&buf[..], &tagged(b'B', b"\0s\0\0\0\0\x01\0\0\0\x017\0\0")[..]);
}

/// Decoded strings and values are slices of the received buffer, not copies.
#[test]
fn decoding_is_zero_copy() {
    let mut buf = BytesMut::from(&tagged(b'Q', b"select 1\0")[..]);
    let start = buf.as_ptr() as usize;
    let Some(FrontendMessage::Query(q)) = frontend(AuthExpect::None).decode(&mut buf).unwrap() else { panic!() };
    assert_eq!(q.as_bytes().as_ptr() as usize, start + 5);
}
