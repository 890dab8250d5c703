//! A valid stream fed one byte at a time decodes to the same messages as fed whole.

use super::roundtrip::{backend_messages, frontend_messages, startup_packets};
use super::*;

#[test]
fn frontend_stream_one_byte_at_a_time() {
    // 'p' messages need the auth state of their moment, so the stream holds the others.
    let messages: Vec<FrontendMessage> =
        frontend_messages().into_iter().filter(|(_, auth)| *auth == AuthExpect::None).map(|(m, _)| m).collect();
    let mut stream = BytesMut::new();
    messages.iter().for_each(|m| m.encode(&mut stream));
    let decoder = frontend(AuthExpect::None);

    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut frames = Vec::new();
    let mut frame_buf = BytesMut::new();
    for &byte in stream.iter() {
        buf.put_u8(byte);
        frame_buf.put_u8(byte);
        while let Some(m) = decoder.decode(&mut buf).unwrap() {
            got.push(m);
        }
        while let Some(f) = decoder.decode_frame(&mut frame_buf).unwrap() {
            frames.push(f);
        }
    }
    assert!(buf.is_empty() && frame_buf.is_empty());
    assert_eq!(got, messages);
    let rejoined: Vec<u8> = frames.iter().flat_map(|f| f.as_bytes().to_vec()).collect();
    assert_eq!(rejoined, &stream[..], "frames are the stream, cut at message boundaries");
}

#[test]
fn backend_stream_one_byte_at_a_time() {
    let messages = backend_messages();
    let mut stream = BytesMut::new();
    messages.iter().for_each(|m| m.encode(&mut stream));
    let decoder = BackendDecoder::default();

    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut frame_buf = BytesMut::new();
    let mut frames = Vec::new();
    for &byte in stream.iter() {
        buf.put_u8(byte);
        frame_buf.put_u8(byte);
        while let Some(m) = decoder.decode(&mut buf).unwrap() {
            got.push(m);
        }
        while let Some(f) = decoder.decode_frame(&mut frame_buf).unwrap() {
            frames.push(f);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got, messages);
    assert_eq!(frames.len(), messages.len());
    let parsed: Vec<BackendMessage> = frames.iter().map(|f| BackendMessage::parse(f).unwrap()).collect();
    assert_eq!(parsed, messages);
}

#[test]
fn startup_packets_one_byte_at_a_time() {
    let packets = startup_packets();
    let mut stream = BytesMut::new();
    packets.iter().for_each(|p| p.encode(&mut stream));
    let limits = Limits::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &byte in stream.iter() {
        buf.put_u8(byte);
        while let Some(p) = StartupPacket::decode(&mut buf, &limits).unwrap() {
            got.push(p);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got, packets);
}

/// A realistic client conversation: startup, then authentication with the 'p' meaning
/// switched by the caller as the server's requests would, then queries.
#[test]
fn conversation_with_auth_switching() {
    let mut stream = BytesMut::new();
    let startup = StartupPacket::Startup(StartupMessage::new([("user", "app"), ("database", "db")]));
    startup.encode(&mut stream);
    let sasl_initial =
        FrontendMessage::SaslInitialResponse { mechanism: "SCRAM-SHA-256".into(), data: Some(b(b"n,,n=,r=nonce")) };
    let sasl_response = FrontendMessage::SaslResponse(b(b"c=biws,r=nonce2,p=proof"));
    let query = FrontendMessage::Query(t("select 1"));
    for m in [&sasl_initial, &sasl_response, &query, &FrontendMessage::Terminate] {
        m.encode(&mut stream);
    }

    let limits = Limits::default();
    assert_eq!(StartupPacket::decode(&mut stream, &limits).unwrap(), Some(startup));
    let mut decoder = FrontendDecoder::new(limits);
    decoder.auth = AuthExpect::after(&Authentication::Sasl { mechanisms: vec!["SCRAM-SHA-256".into()] });
    assert_eq!(decoder.decode(&mut stream).unwrap(), Some(sasl_initial));
    decoder.auth = AuthExpect::after(&Authentication::SaslContinue(b(b"r=nonce2")));
    assert_eq!(decoder.decode(&mut stream).unwrap(), Some(sasl_response));
    decoder.auth = AuthExpect::after(&Authentication::Ok);
    assert_eq!(decoder.decode(&mut stream).unwrap(), Some(query));
    assert_eq!(decoder.decode(&mut stream).unwrap(), Some(FrontendMessage::Terminate));
    assert_eq!(decoder.decode(&mut stream).unwrap(), None);
}
