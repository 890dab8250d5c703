//! WAL positions (LSNs) in postgres' text form `HI/LO` (two hexadecimal 32-bit halves).

/// Parses an LSN like `0/3000148` into its 64-bit value.
///
/// Returns `None` for anything that is not two hexadecimal numbers of at most 8 digits
/// separated by `/` (the same rule postgres' `pg_lsn` input uses).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let half = |p: &str| -> Option<u64> {
        if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(p, 16).ok()
    };
    Some((half(hi)? << 32) | half(lo)?)
}

/// Formats a 64-bit LSN the way postgres prints it: uppercase hex, no leading zeros,
/// e.g. `0/3000148`.
pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn(" 1/a "), Some((1 << 32) | 0xA));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for v in [0u64, 0x3000148, (0x16 << 32) | 0xB374D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(v)), Some(v));
        }
        assert_eq!(format_lsn(0x3000148), "0/3000148");
        assert_eq!(format_lsn((0x16 << 32) | 0xB374D848), "16/B374D848");
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in ["", "0", "/", "0/", "/0", "x/0", "0/g", "123456789/0", "0/-1", "+1/0", "0/1/2"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
