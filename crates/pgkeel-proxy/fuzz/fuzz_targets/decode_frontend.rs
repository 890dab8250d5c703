//! Arbitrary bytes decoded as client messages after startup, once for every meaning of 'p': the
//! codec must never panic, and every message it accepts must re-encode to the same bytes
//! (`pgkeel_proxy::protocol::fuzz::decode_frontend` asserts it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgkeel_proxy::protocol::fuzz::decode_frontend(data);
});
