//! Arbitrary bytes decoded as a sequence of startup packets (SSLRequest, StartupMessage,
//! CancelRequest, ...): the codec must never panic, and every message it accepts must re-encode to
//! the same bytes (`pgkeel_proxy::protocol::fuzz::decode_startup` asserts it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgkeel_proxy::protocol::fuzz::decode_startup(data);
});
