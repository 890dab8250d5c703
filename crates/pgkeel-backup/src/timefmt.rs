//! Timestamps: microseconds since the Unix epoch, printed as UTC, and parsing of the
//! `--target-time` a user gives.

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// Formats microseconds since the epoch as `2024-05-01 12:00:00.123456+00` (a form both
/// people and postgres' timestamptz input read).
pub fn format_utc(unix_us: i64) -> String {
    let secs = unix_us.div_euclid(1_000_000);
    let us = unix_us.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{us:06}+00", sod / 3600, sod / 60 % 60, sod % 60)
}

/// Compact UTC form for backup labels: `20240501T120000Z`.
pub fn label_utc(unix_us: i64) -> String {
    let secs = unix_us.div_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", sod / 3600, sod / 60 % 60, sod % 60)
}

/// The current time in microseconds since the epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or_default()
}

/// Parses a timestamp with an explicit UTC offset: `YYYY-MM-DD HH:MM[:SS[.ffffff]]` (or `T`
/// between date and time) followed by `Z`, `UTC`, `+HH`, `+HHMM` or `+HH:MM` (or `-`),
/// optionally after a space. Returns microseconds since the epoch.
///
/// An offset is required: postgres would read a timestamp without one in the restored
/// server's `timezone`, which pgkeel cannot know when it picks the backup.
pub fn parse_timestamp(input: &str) -> Result<i64, String> {
    let bad = |why: &str| {
        format!(
            "bad time {input:?}: {why}; write e.g. \"2024-05-01 12:30:00+00\", \"2024-05-01T12:30:00.5Z\" or \
             \"2024-05-01 14:30:00+02:00\""
        )
    };
    let s = input.trim();
    let num = |t: &str, what: &str| -> Result<u32, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("the {what} is not a number")));
        }
        t.parse().map_err(|_| bad(&format!("the {what} is out of range")))
    };
    if s.len() < 16 || !s.is_ascii() {
        return Err(bad("too short"));
    }
    let (date, rest) = s.split_at(10);
    let mut dparts = date.split('-');
    let (y, mo, d) = match (dparts.next(), dparts.next(), dparts.next(), dparts.next()) {
        (Some(y), Some(m), Some(d), None) if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
            (num(y, "year")?, num(m, "month")?, num(d, "day")?)
        }
        _ => return Err(bad("the date must be YYYY-MM-DD")),
    };
    let rest = rest.strip_prefix(['T', 't', ' ']).ok_or_else(|| bad("expected a space or T after the date"))?;
    // The time runs up to the offset.
    let off_at = rest.find(['Z', 'z', '+', '-', ' ', 'U']).ok_or_else(|| {
        bad("a UTC offset is required (Z, +00, +02:00 ...), because postgres would otherwise use the restored server's timezone")
    })?;
    let (time, offset) = rest.split_at(off_at);
    let mut tparts = time.split(':');
    let h = num(tparts.next().unwrap_or_default(), "hour")?;
    let mi = num(tparts.next().ok_or_else(|| bad("the time must be HH:MM[:SS]"))?, "minute")?;
    let (sec, us) = match tparts.next() {
        None => (0, 0),
        Some(sec) => {
            let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
            if frac.len() > 6 {
                return Err(bad("at most 6 fractional digits"));
            }
            let us = if frac.is_empty() { 0 } else { num(frac, "fraction")? * 10u32.pow(6 - frac.len() as u32) };
            (num(whole, "second")?, us)
        }
    };
    if tparts.next().is_some() {
        return Err(bad("the time must be HH:MM[:SS]"));
    }
    let max_day = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad("the month is out of range")),
    };
    if d == 0 || d > max_day || h > 23 || mi > 59 || sec > 59 {
        return Err(bad("a field is out of range"));
    }
    let offset = offset.trim_start();
    let offset_secs: i64 = match offset {
        "Z" | "z" | "UTC" | "utc" => 0,
        o if o.starts_with(['+', '-']) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let body = &o[1..];
            let (oh, om) = match body.len() {
                2 => (num(body, "offset hours")?, 0),
                4 => (num(&body[..2], "offset hours")?, num(&body[2..], "offset minutes")?),
                5 if body.as_bytes()[2] == b':' => {
                    (num(&body[..2], "offset hours")?, num(&body[3..], "offset minutes")?)
                }
                _ => return Err(bad("the offset must be +HH, +HHMM or +HH:MM")),
            };
            if oh > 15 || om > 59 {
                return Err(bad("the offset is out of range"));
            }
            sign * (i64::from(oh) * 3600 + i64::from(om) * 60)
        }
        _ => return Err(bad("a UTC offset is required (Z, +00, +02:00 ...)")),
    };
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec) - offset_secs;
    Ok(secs * 1_000_000 + i64::from(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(format_utc(1_714_566_600_123_456), "2024-05-01 12:30:00.123456+00");
        assert_eq!(format_utc(951_782_400_000_000), "2000-02-29 00:00:00.000000+00");
        assert_eq!(label_utc(1_714_566_600_123_456), "20240501T123000Z");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59.999999+00");
    }

    #[test]
    fn parse_forms() {
        let t = 1_714_566_600_000_000;
        for s in [
            "2024-05-01 12:30:00+00",
            "2024-05-01T12:30:00Z",
            "2024-05-01 12:30Z",
            "2024-05-01 12:30:00 UTC",
            "2024-05-01 14:30:00+02:00",
            "2024-05-01 14:30:00+0200",
            "2024-05-01 14:30:00 +02",
            "2024-05-01 10:00:00-02:30",
        ] {
            assert_eq!(parse_timestamp(s), Ok(t), "{s}");
        }
        assert_eq!(parse_timestamp("2024-05-01 12:30:00.5+00"), Ok(t + 500_000));
        assert_eq!(parse_timestamp("2024-05-01 12:30:00.000001+00"), Ok(t + 1));
        assert_eq!(parse_timestamp(&format_utc(t + 123_456)), Ok(t + 123_456));
    }

    #[test]
    fn parse_rejects() {
        for s in [
            "",
            "2024-05-01",
            "2024-05-01 12:30:00",
            "2024-13-01 12:30:00+00",
            "2023-02-29 12:30:00+00",
            "2024-05-01 24:00:00+00",
            "2024-05-01 12:30:00.1234567+00",
            "2024-05-01 12:30:00+2",
            "2024/05/01 12:30:00+00",
            "yesterday",
            "2024-05-01 12:30:00 CEST",
        ] {
            assert!(parse_timestamp(s).is_err(), "{s:?}");
        }
        let err = parse_timestamp("2024-05-01 12:30:00").unwrap_err();
        assert!(err.contains("offset is required"), "{err}");
    }
}
