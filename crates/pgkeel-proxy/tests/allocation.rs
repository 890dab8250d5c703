//! The decoders allocate in proportion to the bytes received, never to the counts and
//! lengths a peer declares. A counting global allocator measures what one decode call
//! allocates on the current thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, BytesMut};
use pgkeel_proxy::protocol::{AuthExpect, BackendDecoder, FrontendDecoder, Limits, StartupPacket};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = TOTAL.try_with(|c| c.set(c.get() + size));
            let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
        }
    });
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only const-initialised
// thread-locals without destructors, which neither allocate nor re-enter the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// (total bytes allocated, largest single allocation) while running `f` on this thread.
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    TOTAL.with(|c| c.set(0));
    LARGEST.with(|c| c.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, TOTAL.with(|c| c.get()), LARGEST.with(|c| c.get()))
}

fn tagged(tag: u8, body: &[u8]) -> BytesMut {
    let mut v = BytesMut::with_capacity(body.len() + 5);
    v.put_u8(tag);
    v.put_i32(body.len() as i32 + 4);
    v.put_slice(body);
    v
}

#[test]
fn declared_counts_do_not_drive_allocation() {
    let frontend = FrontendDecoder { limits: Limits::default(), auth: AuthExpect::None };
    let backend = BackendDecoder::default();
    // Each declares the largest count its field allows and carries almost nothing.
    let hostile_frontend = [
        tagged(b'B', b"\0\0\x7f\xff\0\0"),
        tagged(b'B', b"\0\0\0\0\x7f\xff\xff\xff\xff\xff"),
        tagged(b'P', b"\0select 1\0\x7f\xff\0\0\0\x17"),
        tagged(b'F', b"\0\0\0\x01\0\0\x7f\xff"),
    ];
    for mut buf in hostile_frontend {
        let (r, total, largest) = measure(|| frontend.decode(&mut buf));
        let err = r.expect_err("must be refused");
        assert!(largest < 1024 && total < 4096, "{err}: allocated {total} bytes (largest {largest})");
    }
    let hostile_backend = [
        tagged(b'D', b"\x7f\xff\xff\xff\xff\xff"),
        tagged(b'T', b"\x7f\xffname\0"),
        tagged(b't', b"\x7f\xff\0\0\0\x17"),
        tagged(b'G', b"\0\x7f\xff\0\0"),
        tagged(b'v', b"\0\0\0\0\x7f\xff\xff\xffx\0"),
    ];
    for mut buf in hostile_backend {
        let (r, total, largest) = measure(|| backend.decode(&mut buf));
        let err = r.expect_err("must be refused");
        assert!(largest < 1024 && total < 4096, "{err}: allocated {total} bytes (largest {largest})");
    }
}

#[test]
fn declared_lengths_do_not_drive_allocation() {
    // Headers announcing large messages: the decoders wait for the bytes without reserving.
    let mut buf = BytesMut::new();
    buf.put_u8(b'Q');
    buf.put_i32(60 << 20);
    buf.put_slice(b"select");
    let frontend = FrontendDecoder::default();
    let (r, total, _) = measure(|| frontend.decode(&mut buf));
    assert_eq!(r, Ok(None));
    assert_eq!(total, 0, "waiting for a body allocates nothing");
    let (r, total, _) = measure(|| frontend.decode_frame(&mut buf));
    assert_eq!(r, Ok(None));
    assert_eq!(total, 0);

    let mut buf = BytesMut::new();
    buf.put_i32(9_999);
    buf.put_i32(3 << 16);
    let (r, total, _) = measure(|| StartupPacket::decode(&mut buf, &Limits::default()));
    assert_eq!(r, Ok(None));
    assert_eq!(total, 0);
}

#[test]
fn valid_lists_allocate_in_proportion_to_their_bytes() {
    // 10000 NULL columns: 40 KB on the wire. Each decoded value is an Option<Bytes>
    // (32 bytes), so the list costs 8× its wire size; nothing depends on a declared count.
    let mut body = BytesMut::new();
    body.put_i16(10_000);
    for _ in 0..10_000 {
        body.put_i32(-1);
    }
    let mut buf = tagged(b'D', &body);
    let wire = buf.len();
    let (r, total, _) = measure(|| BackendDecoder::default().decode(&mut buf));
    assert!(matches!(r, Ok(Some(_))));
    assert!(total <= 8 * wire + 1024, "allocated {total} bytes for {wire} bytes on the wire");
}
