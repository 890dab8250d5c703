//! Durations and byte sizes as operators write them: a bare number or a number with a unit.
//!
//! Parsing works on the decimal digits with integer arithmetic rather than through `f64`, so
//! `"0.1s"` is exactly 100 ms and every value [`format_duration`] prints parses back to the
//! same [`Duration`].

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Fraction digits beyond this many cannot change a nanosecond or byte count for any unit we
/// accept, and capping them keeps the arithmetic below inside `u128`.
const MAX_FRACTION_DIGITS: usize = 18;

const DURATION_EXAMPLES: &str = r#"e.g. "1500ms", "2s", "1.5s", "1m" or 4 (seconds)"#;
const BYTES_EXAMPLES: &str = r#"e.g. "1048576" (bytes), "512kB", "10MB" or "1GB" (kB = 1024 bytes)"#;

/// Parse a duration: a number of seconds (`"4"`, `"1.5"`) or a number with a unit: `ms`, `s`,
/// `m` / `min`, `h` (`"1500ms"`, `"2s"`, `"1m"`). Units are case-insensitive; spaces around the
/// number and between number and unit are allowed.
///
/// The error says what is wrong and shows valid values; it does not name the config key, which
/// the caller adds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) =
        split_number(s).map_err(|why| format!("invalid duration {s:?}: {why}; {DURATION_EXAMPLES}"))?;
    let nanos_per_unit: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "s" | "sec" | "secs" => NANOS_PER_SEC,
        "ms" => 1_000_000,
        "m" | "min" | "mins" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m or h); {DURATION_EXAMPLES}"
            ))
        }
    };
    let nanos = number.scale(nanos_per_unit);
    let secs = u64::try_from(nanos / NANOS_PER_SEC)
        .map_err(|_| format!("invalid duration {s:?}: too large; {DURATION_EXAMPLES}"))?;
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).expect("remainder of a division by 10^9 fits in u32");
    Ok(Duration::new(secs, subsec))
}

/// `YYYY-MM-DD HH:MM:SS` for a unix time (civil-from-days, no time zone database needed).
pub fn format_unix_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses a retention age: a whole number and a unit, `s`, `m`, `h`, `d` or `w` (e.g. `14d`,
/// `36h`, `2w`); returns seconds.
pub fn parse_age(s: &str) -> Result<u64, String> {
    let bad = || format!("bad age {s:?}: write a whole number and a unit, e.g. 14d, 36h, 90m or 2w");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs: u64 = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).filter(|v| *v > 0).ok_or_else(bad)
}

/// Format a duration so that [`parse_duration`] gives it back exactly: whole seconds as `"4s"`,
/// whole milliseconds as `"1500ms"`, anything finer as decimal seconds (`"1.000000001s"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    // A remainder rather than `is_multiple_of`, which is newer than the workspace's rust-version.
    let sub_millis = nanos % 1_000_000;
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if sub_millis == 0 {
        format!("{}ms", d.as_millis())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

/// Parse a byte size: a number of bytes (`"1048576"`) or a number with a unit: `B`, `kB` /
/// `KiB`, `MB` / `MiB`, `GB` / `GiB`, `TB` / `TiB`. As in PostgreSQL, `kB` means 1024 bytes
/// and `MB` 1024² (so `"10MB"` is what Patroni's `?lag=10MB` means). Units are
/// case-insensitive and may follow the number after a space. A fractional value (`"1.5GB"`)
/// is rounded to the nearest byte.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (number, unit) = split_number(s).map_err(|why| format!("invalid byte size {s:?}: {why}; {BYTES_EXAMPLES}"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kb" | "kib" => 10,
        "mb" | "mib" => 20,
        "gb" | "gib" => 30,
        "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid byte size {s:?}: unknown unit {unit:?} (use B, kB, MB, GB or TB); {BYTES_EXAMPLES}"
            ))
        }
    };
    u64::try_from(number.scale(1u128 << shift))
        .map_err(|_| format!("invalid byte size {s:?}: too large, the maximum is {} bytes", u64::MAX))
}

/// A non-negative decimal number kept as its digits, so scaling by a unit is exact.
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

impl Decimal<'_> {
    /// `self × unit`, rounded to the nearest integer; saturates at `u128::MAX`, which every
    /// caller then reports as "too large".
    fn scale(&self, unit: u128) -> u128 {
        let mut int: u128 = 0;
        for d in self.int.bytes() {
            int = match int.checked_mul(10).and_then(|v| v.checked_add(u128::from(d - b'0'))) {
                Some(v) => v,
                None => return u128::MAX,
            };
        }
        let frac_digits = &self.frac[..self.frac.len().min(MAX_FRACTION_DIGITS)];
        let denom = 10u128.pow(u32::try_from(frac_digits.len()).expect("at most 18 digits"));
        let frac_num: u128 = frac_digits.bytes().fold(0, |acc, d| acc * 10 + u128::from(d - b'0'));
        // unit ≤ 2^42 and frac_num < 10^18 < 2^60, so the product cannot overflow.
        let frac = (frac_num * unit + denom / 2) / denom;
        int.checked_mul(unit).and_then(|v| v.checked_add(frac)).unwrap_or(u128::MAX)
    }
}

/// Split `" 1.5 GB "` into the number `1.5` and the unit `"GB"`; the error says what is wrong
/// with the number, the caller adds the examples.
fn split_number(s: &str) -> Result<(Decimal<'_>, &str), String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty value".into());
    }
    if t.starts_with('-') {
        return Err("must not be negative".into());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..end], t[end..].trim_start());
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return Err("expected a number first".into());
    }
    if frac.contains('.') {
        return Err("more than one decimal point".into());
    }
    Ok((Decimal { int, frac }, unit))
}

/// Turn a number of seconds from TOML or JSON into a duration, refusing what no timeout can be.
fn duration_from_secs_f64(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() {
        return Err(format!("invalid duration {secs}: must be a finite number of seconds; {DURATION_EXAMPLES}"));
    }
    if secs < 0.0 {
        return Err(format!("invalid duration {secs}: must not be negative; {DURATION_EXAMPLES}"));
    }
    // 2^64 is exactly representable, u64::MAX is not; anything at or above it cannot be a u64.
    if secs >= 18_446_744_073_709_551_616.0 {
        return Err(format!("invalid duration {secs}: too large; {DURATION_EXAMPLES}"));
    }
    let whole = secs.trunc();
    // Round to whole nanoseconds so 0.1 (binary 0.1000000000000000055...) is 100 ms exactly.
    let nanos = ((secs - whole) * 1e9).round() as u32;
    let (whole, nanos) = if nanos >= 1_000_000_000 { (whole + 1.0, 0) } else { (whole, nanos) };
    Ok(Duration::new(whole as u64, nanos))
}

/// `#[serde(with = "units::duration_serde")]` for a [`Duration`]: written as a number of
/// seconds (`1.5`); read from a number of seconds or a string such as `"1500ms"`.
pub(crate) mod duration_serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Seconds as a float: the one representation both TOML and JSON readers take without a
    /// unit parser.
    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// A number of seconds (integer or float) or a string with a unit.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"a duration: a number of seconds (4, 1.5) or a string such as "1500ms", "2s" or "1m""#)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v).map(Duration::from_secs).map_err(|_| {
                E::custom(format!("invalid duration {v}: must not be negative; {}", super::DURATION_EXAMPLES))
            })
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            super::duration_from_secs_f64(v).map_err(E::custom)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }
}

/// `#[serde(with = "units::bytes_serde")]` for a byte count: written as an integer; read from
/// an integer or a string such as `"10MB"`.
pub(crate) mod bytes_serde {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// An integer number of bytes. TOML integers are signed 64-bit, so a count above
    /// `i64::MAX` is written as a decimal string instead, which [`deserialize`] reads back.
    pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(*v) {
            Ok(_) => s.serialize_u64(*v),
            Err(_) => s.serialize_str(&v.to_string()),
        }
    }

    /// An integer number of bytes or a string with a unit.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(BytesVisitor)
    }

    struct BytesVisitor;

    impl Visitor<'_> for BytesVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"a byte size: a number of bytes or a string such as "512kB" or "10MB""#)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| {
                E::custom(format!("invalid byte size {v}: must not be negative; {}", super::BYTES_EXAMPLES))
            })
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "invalid byte size {v}: must be a whole number of bytes or a string with a unit; {}",
                super::BYTES_EXAMPLES
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_bytes(v).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc() {
        assert_eq!(format_unix_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_unix_utc(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn parse_duration_accepts() {
        let cases: &[(&str, Duration)] = &[
            ("1500ms", Duration::from_millis(1500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("1min", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("4", Duration::from_secs(4)),
            ("0.1", Duration::from_millis(100)),
            (".5s", Duration::from_millis(500)),
            ("  3 s ", Duration::from_secs(3)),
            ("10 MS", Duration::from_millis(10)),
            ("0", Duration::ZERO),
            ("1.000000001s", Duration::new(1, 1)),
            ("0.0015m", Duration::from_millis(90)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input).as_ref(), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn parse_duration_rejects() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("-1s", "negative"),
            ("s", "expected a number"),
            ("1.2.3s", "decimal point"),
            ("5 sec onds", "unknown unit"),
            ("1d", "unknown unit"),
            ("1e3", "unknown unit"),
            ("abc", "expected a number"),
            ("99999999999999999999999h", "too large"),
        ];
        for (input, want) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(want), "input {input:?}: error {err:?} should mention {want:?}");
            assert!(err.contains("1500ms"), "input {input:?}: error {err:?} should show an example");
        }
    }

    #[test]
    fn format_duration_round_trips() {
        let cases: &[(Duration, &str)] = &[
            (Duration::from_secs(4), "4s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_millis(100), "100ms"),
            (Duration::ZERO, "0s"),
            (Duration::new(1, 500_000), "1.0005s"),
            (Duration::new(0, 1), "0.000000001s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(*d), *want);
            assert_eq!(parse_duration(want), Ok(*d), "round trip of {want}");
        }
        let big = Duration::new(u64::MAX, 999_999_999);
        assert_eq!(parse_duration(&format_duration(big)), Ok(big));
    }

    #[test]
    fn parse_bytes_accepts() {
        let cases: &[(&str, u64)] = &[
            ("1048576", 1_048_576),
            ("0", 0),
            ("1B", 1),
            ("512kB", 512 * 1024),
            ("512KB", 512 * 1024),
            ("512KiB", 512 * 1024),
            ("10MB", 10 << 20),
            ("10mb", 10 << 20),
            ("10 MiB", 10 << 20),
            ("1GB", 1 << 30),
            ("1gib", 1 << 30),
            ("2TB", 2 << 40),
            ("1.5GB", 3 << 29),
            (" 7 ", 7),
            ("18446744073709551615", u64::MAX),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input).as_ref(), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn parse_bytes_rejects() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("-1", "negative"),
            ("-10MB", "negative"),
            ("MB", "expected a number"),
            ("10 XB", "unknown unit"),
            ("10 bytes", "unknown unit"),
            ("1,000", "unknown unit"),
            ("18446744073709551616", "too large"),
            ("16777216TB", "too large"),
        ];
        for (input, want) in cases {
            let err = parse_bytes(input).expect_err(input);
            assert!(err.contains(want), "input {input:?}: error {err:?} should mention {want:?}");
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Holder {
        #[serde(with = "duration_serde")]
        d: Duration,
        #[serde(with = "bytes_serde")]
        b: u64,
    }

    #[test]
    fn serde_reads_numbers_and_strings() {
        let cases: &[(&str, Duration, u64)] = &[
            ("d = 4\nb = 100", Duration::from_secs(4), 100),
            ("d = 1.5\nb = \"10MB\"", Duration::from_millis(1500), 10 << 20),
            ("d = \"1500ms\"\nb = \"1 kB\"", Duration::from_millis(1500), 1024),
            ("d = 0.1\nb = 0", Duration::from_millis(100), 0),
        ];
        for (text, d, b) in cases {
            let h: Holder = toml::from_str(text).expect(text);
            assert_eq!(h, Holder { d: *d, b: *b }, "{text}");
        }
        for bad in ["d = -1\nb = 0", "d = nan\nb = 0", "d = -0.5\nb = 0", "d = 1\nb = -1", "d = 1\nb = 1.5"] {
            assert!(toml::from_str::<Holder>(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn serde_round_trips_through_json_and_toml() {
        let h = Holder { d: Duration::from_millis(1500), b: u64::MAX };
        let json = serde_json::to_value(&h).expect("serializes");
        assert_eq!(json["d"], serde_json::json!(1.5));
        assert_eq!(serde_json::from_value::<Holder>(json).expect("reads back"), h);
        let text = toml::to_string(&h).expect("serializes");
        assert_eq!(toml::from_str::<Holder>(&text).expect("reads back"), h);
    }
}
