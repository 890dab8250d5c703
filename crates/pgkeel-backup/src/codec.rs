//! Compression and checksums.
//!
//! An archived WAL file is one object: a 48-byte header followed by one zstd frame.
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `PGKWAL1\n` |
//! | 8..16 | size of the uncompressed content, u64 little endian |
//! | 16..48 | SHA-256 of the uncompressed content |
//! | 48.. | the content, one zstd frame (with zstd's own content checksum) |
//!
//! Base backup files are plain zstd frames; their size and SHA-256 are in the manifest.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// zstd level: 3 is zstd's default, fast with a good ratio for WAL and data files.
pub const ZSTD_LEVEL: i32 = 3;

const MAGIC: &[u8; 8] = b"PGKWAL1\n";
const HEADER_LEN: usize = 48;

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// SHA-256 of `data`, as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The header of an archived file: what its content should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveHeader {
    /// Uncompressed size.
    pub size: u64,
    /// SHA-256 of the uncompressed content, lowercase hex.
    pub sha256: String,
}

/// Encodes `content` as an archived object (header + zstd frame).
pub fn encode_archive(content: &[u8]) -> io::Result<(ArchiveHeader, Vec<u8>)> {
    let digest = Sha256::digest(content);
    let mut out = Vec::with_capacity(HEADER_LEN + content.len() / 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    out.extend_from_slice(&digest);
    let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    enc.include_contentsize(true)?;
    enc.set_pledged_src_size(Some(content.len() as u64))?;
    enc.write_all(content)?;
    let out = enc.finish()?;
    Ok((ArchiveHeader { size: content.len() as u64, sha256: hex(&digest) }, out))
}

/// Reads the header of an archived object.
pub fn decode_header(object: &[u8]) -> Result<ArchiveHeader, String> {
    if object.len() < HEADER_LEN || &object[..8] != MAGIC {
        return Err(format!(
            "not a pgkeel WAL archive object (bad header, {} bytes): the file is damaged or was not written by \
             pgkeel",
            object.len()
        ));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&object[8..16]);
    Ok(ArchiveHeader { size: u64::from_le_bytes(size), sha256: hex(&object[16..48]) })
}

/// Decodes an archived object and checks its size and SHA-256 against its header.
pub fn decode_archive(object: &[u8]) -> Result<(ArchiveHeader, Vec<u8>), String> {
    let header = decode_header(object)?;
    // The size comes from a header that may be damaged: cap what is allocated up front.
    let mut content = Vec::with_capacity(header.size.min(1 << 30) as usize);
    zstd::stream::read::Decoder::new(&object[HEADER_LEN..])
        .and_then(|mut d| d.read_to_end(&mut content))
        .map_err(|e| format!("decompressing failed: {e}"))?;
    if content.len() as u64 != header.size {
        return Err(format!("content is {} bytes, but the header says {}", content.len(), header.size));
    }
    let actual = sha256_hex(&content);
    if actual != header.sha256 {
        return Err(format!("checksum mismatch: the content has sha256 {actual}, the header says {}", header.sha256));
    }
    Ok((header, content))
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The wrapped writer, the byte count and the SHA-256 (hex) of what was written.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.count, hex(&self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams `src` through zstd into `dst`; returns the uncompressed size and SHA-256.
pub fn compress_stream(src: &mut dyn Read, dst: &mut dyn Write) -> io::Result<(u64, String)> {
    let mut enc = zstd::stream::write::Encoder::new(dst, ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    let mut hashing = HashingWriter::new(enc);
    io::copy(src, &mut hashing)?;
    let (enc, size, sha) = hashing.finish();
    enc.finish()?;
    Ok((size, sha))
}

/// Reads `src` to the end; returns its size and SHA-256.
pub fn hash_stream(src: &mut dyn Read) -> io::Result<(u64, String)> {
    let mut hashing = HashingWriter::new(io::sink());
    io::copy(src, &mut hashing)?;
    let (_, size, sha) = hashing.finish();
    Ok((size, sha))
}

/// Streams a zstd frame from `src`, decompressed, into `dst`; returns size and SHA-256.
pub fn decompress_stream(src: &mut dyn Read, dst: &mut dyn Write) -> io::Result<(u64, String)> {
    let mut dec = zstd::stream::read::Decoder::new(src)?;
    let mut hashing = HashingWriter::new(dst);
    io::copy(&mut dec, &mut hashing)?;
    let (_, size, sha) = hashing.finish();
    Ok((size, sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_round_trip_and_damage() {
        let content: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let (h, obj) = encode_archive(&content).unwrap();
        assert_eq!(h.size, content.len() as u64);
        assert_eq!(h.sha256, sha256_hex(&content));
        assert!(obj.len() < content.len() / 2, "compresses");
        assert_eq!(decode_header(&obj).unwrap(), h);
        let (h2, back) = decode_archive(&obj).unwrap();
        assert_eq!((h2, back), (h.clone(), content.clone()));

        // A flipped byte in the compressed part is caught.
        let mut bad = obj.clone();
        let i = bad.len() - 10;
        bad[i] ^= 0x55;
        assert!(decode_archive(&bad).is_err());
        // A truncated object is caught.
        assert!(decode_archive(&obj[..obj.len() / 2]).is_err());
        // A wrong checksum in the header is caught and both values are named.
        let mut bad = obj.clone();
        bad[20] ^= 1;
        let err = decode_archive(&bad).unwrap_err();
        assert!(err.contains(&h.sha256) && err.contains("mismatch"), "{err}");
        assert!(decode_header(b"garbage").unwrap_err().contains("bad header"));
        // Empty content works.
        let (_, obj) = encode_archive(b"").unwrap();
        assert_eq!(decode_archive(&obj).unwrap().1, b"");
    }

    #[test]
    fn stream_round_trip() {
        let content = b"hello hello hello hello".repeat(1000);
        let mut compressed = Vec::new();
        let (n, sha) = compress_stream(&mut &content[..], &mut compressed).unwrap();
        assert_eq!((n, sha.as_str()), (content.len() as u64, sha256_hex(&content).as_str()));
        let mut out = Vec::new();
        let (n2, sha2) = decompress_stream(&mut &compressed[..], &mut out).unwrap();
        assert_eq!((n2, sha2), (n, sha.clone()));
        assert_eq!(out, content);
        assert_eq!(hash_stream(&mut &content[..]).unwrap(), (n, sha));
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
