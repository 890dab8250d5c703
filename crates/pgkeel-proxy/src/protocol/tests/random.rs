//! Random input never panics, and whatever decodes re-encodes to the same bytes. A tiny
//! deterministic PRNG (xorshift64*) keeps failures reproducible without a proptest
//! dependency; the same checks run under cargo-fuzz (`protocol::fuzz`).

use super::roundtrip::{backend_messages, frontend_messages, startup_packets};
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Bytes biased towards the values parsers branch on: 0, 0xff, small numbers, tags.
    fn byte(&mut self) -> u8 {
        match self.below(8) {
            0 => 0,
            1 => 0xff,
            2 => self.below(4) as u8,
            3 => b"BCdcfDEHFPpQSXRK23GWIEVvnNAtS1sZT"[self.below(33)],
            _ => self.next() as u8,
        }
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
}

fn check_all(data: &[u8]) {
    fuzz::decode_frontend(data);
    fuzz::decode_backend(data);
    fuzz::decode_startup(data);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let data = rng.bytes(64);
        check_all(&data);
    }
}

/// Random bodies behind a valid tag and a correct length reach deep into the parsers,
/// which purely random bytes rarely do.
#[test]
fn random_bodies_behind_valid_headers_never_panic() {
    let mut rng = Rng(42);
    let tags = b"BCdcfDEHFPpQSXRK23GWIEVvnNAtS1sZT";
    let mut accepted = 0;
    for _ in 0..50_000 {
        let tag = tags[rng.below(tags.len())];
        let body = rng.bytes(48);
        let msg = tagged(tag, &body);
        check_all(&msg);
        let code = match rng.below(4) {
            0 => 3 << 16,
            1 => SSL_REQUEST_CODE,
            2 => CANCEL_REQUEST_CODE,
            _ => rng.next() as i32,
        };
        check_all(&untagged(code, &body));
        if BackendDecoder::default().decode(&mut BytesMut::from(&msg[..])).is_ok() {
            accepted += 1;
        }
    }
    assert!(accepted > 1000, "the generator should produce some valid messages too ({accepted})");
}

/// Valid streams with random bytes changed, inserted, removed or cut off.
#[test]
fn mutated_valid_streams_never_panic() {
    let mut frontend_stream = BytesMut::new();
    frontend_messages().iter().for_each(|(m, _)| m.encode(&mut frontend_stream));
    let mut backend_stream = BytesMut::new();
    backend_messages().iter().for_each(|m| m.encode(&mut backend_stream));
    let mut startup_stream = BytesMut::new();
    startup_packets().iter().for_each(|p| p.encode(&mut startup_stream));

    let mut rng = Rng(7);
    for _ in 0..3_000 {
        for stream in [&frontend_stream, &backend_stream, &startup_stream] {
            let mut data = stream.to_vec();
            for _ in 0..=rng.below(4) {
                let at = rng.below(data.len());
                match rng.below(4) {
                    0 => data[at] = rng.byte(),
                    1 => data.insert(at, rng.byte()),
                    2 => {
                        data.remove(at);
                    }
                    _ => data.truncate(at),
                }
                if data.is_empty() {
                    break;
                }
            }
            check_all(&data);
        }
    }
}
