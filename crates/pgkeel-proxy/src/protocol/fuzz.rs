//! Consistency checks over arbitrary input, shared by the cargo-fuzz targets in
//! `crates/pgkeel-proxy/fuzz/` and the random-input unit test.
//!
//! Each function decodes `data` as a stream of messages until the decoder asks for more
//! bytes or reports an error, and checks, for every message it accepts:
//! - the frame decoder consumed exactly the same bytes;
//! - encoding the decoded message gives those bytes back (the decoders accept nothing the
//!   encoders would not write, so the proxy can re-encode what it parsed);
//! - parsing the frame gives the same message.
//!
//! They panic when a check fails — that is what a fuzzer looks for. Outside these checks the
//! codec itself must never panic, whatever `data` is.

use bytes::BytesMut;

use super::{AuthExpect, BackendDecoder, BackendMessage, FrontendDecoder, FrontendMessage, Limits, StartupPacket};

/// Decodes `data` as client messages, once for every meaning of 'p'.
pub fn decode_frontend(data: &[u8]) {
    for auth in
        [AuthExpect::None, AuthExpect::Password, AuthExpect::SaslInitial, AuthExpect::SaslContinue, AuthExpect::Gss]
    {
        let decoder = FrontendDecoder { limits: Limits::default(), auth };
        let mut buf = BytesMut::from(data);
        let mut frames = BytesMut::from(data);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(msg)) => {
                    let frame = match decoder.decode_frame(&mut frames) {
                        Ok(Some(frame)) => frame,
                        other => panic!("decode gave {msg:?} but decode_frame gave {other:?}"),
                    };
                    assert_eq!(frame.len(), before - buf.len(), "decode and decode_frame consumed different lengths");
                    let mut out = BytesMut::new();
                    msg.encode(&mut out);
                    assert_eq!(&out[..], frame.as_bytes(), "re-encoding {msg:?} changed its bytes");
                    assert_eq!(FrontendMessage::parse(&frame, auth).as_ref(), Ok(&msg));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "decode consumed bytes but returned no message");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Decodes `data` as server messages.
pub fn decode_backend(data: &[u8]) {
    let decoder = BackendDecoder::default();
    let mut buf = BytesMut::from(data);
    let mut frames = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(msg)) => {
                let frame = match decoder.decode_frame(&mut frames) {
                    Ok(Some(frame)) => frame,
                    other => panic!("decode gave {msg:?} but decode_frame gave {other:?}"),
                };
                assert_eq!(frame.len(), before - buf.len(), "decode and decode_frame consumed different lengths");
                let mut out = BytesMut::new();
                msg.encode(&mut out);
                assert_eq!(&out[..], frame.as_bytes(), "re-encoding {msg:?} changed its bytes");
                assert_eq!(BackendMessage::parse(&frame).as_ref(), Ok(&msg));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "decode consumed bytes but returned no message");
                break;
            }
            Err(_) => break,
        }
    }
}

/// Decodes `data` as a sequence of startup packets (e.g. SSLRequest, then StartupMessage).
pub fn decode_startup(data: &[u8]) {
    let limits = Limits::default();
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match StartupPacket::decode(&mut buf, &limits) {
            Ok(Some(packet)) => {
                let consumed = before - buf.len();
                let mut out = BytesMut::new();
                packet.encode(&mut out);
                assert_eq!(
                    &out[..],
                    &data[data.len() - before..][..consumed],
                    "re-encoding {packet:?} changed its bytes"
                );
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "decode consumed bytes but returned no packet");
                break;
            }
            Err(_) => break,
        }
    }
}
