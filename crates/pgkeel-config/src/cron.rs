//! Five-field cron expressions (`minute hour day-of-month month day-of-week`, in UTC) for
//! scheduled backups: `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, and
//! the names `@hourly`, `@daily`, `@weekly`, `@monthly`. Day of week 0 and 7 are Sunday. As
//! in Vixie cron, when both day fields are restricted a day matching either one matches.

use std::fmt;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    any_day: bool,
    any_weekday: bool,
}

const FIELDS: [(&str, u32, u32); 5] =
    [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)];

fn field(text: &str, (name, lo, hi): (&str, u32, u32)) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("{name} {part:?}: the step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{name} {part:?}: the step must be at least 1"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let num = |s: &str| -> Result<u32, String> {
            let v: u32 = s.parse().map_err(|_| format!("{name} {part:?}: {s:?} is not a number"))?;
            if v < lo || v > hi {
                return Err(format!("{name} {part:?}: {v} is outside {lo}-{hi}"));
            }
            Ok(v)
        };
        let (from, to) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if step > 1 => (num(r)?, hi),
                None => {
                    let v = num(r)?;
                    (v, v)
                }
            },
        };
        if from > to {
            return Err(format!("{name} {part:?}: the range runs backwards"));
        }
        let mut v = from;
        while v <= to {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Cron {
    /// Parse an expression; the error names the field and what is wrong with it.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let expanded = match text.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            t => t,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "{text:?} has {} fields; a schedule has 5 (minute hour day-of-month month day-of-week, UTC), \
                 e.g. \"30 2 * * *\" for 02:30 every day",
                parts.len()
            ));
        }
        let mut v = [0u64; 5];
        for (i, p) in parts.iter().enumerate() {
            v[i] = field(p, FIELDS[i])?;
        }
        let mut weekdays = v[4] as u8;
        if weekdays & 0x80 != 0 {
            weekdays = (weekdays & 0x7f) | 1; // 7 is Sunday too
        }
        Ok(Cron {
            text: text.trim().to_string(),
            minutes: v[0],
            hours: v[1] as u32,
            days: v[2] as u32,
            months: v[3] as u16,
            weekdays,
            any_day: parts[2] == "*",
            any_weekday: parts[4] == "*",
        })
    }

    /// Whether the minute containing `unix_secs` (UTC) is scheduled.
    pub fn matches(&self, unix_secs: u64) -> bool {
        let t = Utc::from_unix(unix_secs);
        let day_ok = match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (false, true) => self.days & (1 << t.day) != 0,
            (true, false) => self.weekdays & (1 << t.weekday) != 0,
            (false, false) => self.days & (1 << t.day) != 0 || self.weekdays & (1 << t.weekday) != 0,
        };
        self.minutes & (1 << t.minute) != 0
            && self.hours & (1 << t.hour) != 0
            && self.months & (1 << t.month) != 0
            && day_ok
    }

    /// The first scheduled minute at or after `unix_secs` (its first second), within about
    /// four years; `None` for a schedule that never fires (e.g. 31 February).
    pub fn next_at_or_after(&self, unix_secs: u64) -> Option<u64> {
        let mut m = unix_secs / 60;
        let end = m + 4 * 366 * 24 * 60;
        while m < end {
            if self.matches(m * 60) {
                return Some(m * 60);
            }
            m += 1;
        }
        None
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A UTC time broken down to what cron needs.
struct Utc {
    minute: u32,
    hour: u32,
    day: u32,
    month: u32,
    weekday: u32,
}

impl Utc {
    fn from_unix(secs: u64) -> Utc {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Utc {
            minute: ((rem / 60) % 60) as u32,
            hour: (rem / 3600) as u32,
            day,
            month,
            // 1970-01-01 was a Thursday (4).
            weekday: ((days + 4).rem_euclid(7)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-21 (a Saturday) 14:30:00 UTC.
    const SAT_1430: u64 = 1_795_271_400;

    #[test]
    fn breaks_down_utc() {
        let t = Utc::from_unix(SAT_1430);
        assert_eq!((t.minute, t.hour, t.day, t.month, t.weekday), (30, 14, 21, 11, 6));
        let t = Utc::from_unix(951_782_400); // 2000-02-29 00:00 Tuesday
        assert_eq!((t.day, t.month, t.weekday), (29, 2, 2));
    }

    #[test]
    fn matching_table() {
        let rows: &[(&str, u64, bool)] = &[
            ("* * * * *", SAT_1430, true),
            ("30 14 * * *", SAT_1430, true),
            ("30 14 * * *", SAT_1430 + 59, true),
            ("30 14 * * *", SAT_1430 + 60, false),
            ("*/15 * * * *", SAT_1430, true),
            ("*/20 * * * *", SAT_1430, false),
            ("0-29 * * * *", SAT_1430, false),
            ("25-35/5 14 * * *", SAT_1430, true),
            ("30 14 * * 6", SAT_1430, true),
            ("30 14 * * 0,7", SAT_1430 + 86_400, true),
            ("30 14 * * 1-5", SAT_1430, false),
            ("30 14 21 11 *", SAT_1430, true),
            ("30 14 1 * 6", SAT_1430, true), // either day field
            ("30 14 1 * 1", SAT_1430, false),
            ("@daily", SAT_1430, false),
            ("@hourly", SAT_1430 - 30 * 60, true),
        ];
        for (expr, t, want) in rows {
            assert_eq!(Cron::parse(expr).unwrap().matches(*t), *want, "{expr} at {t}");
        }
    }

    #[test]
    fn next_and_errors() {
        let c = Cron::parse("0 3 * * *").unwrap();
        assert_eq!(c.next_at_or_after(SAT_1430), Some(SAT_1430 - 14 * 3600 - 1800 + 86_400 + 3 * 3600));
        assert_eq!(Cron::parse("0 0 31 2 *").unwrap().next_at_or_after(SAT_1430), None);
        for (bad, says) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "minute \"60\": 60 is outside 0-59"),
            ("* 24 * * *", "hour"),
            ("*/0 * * * *", "step must be at least 1"),
            ("5-1 * * * *", "runs backwards"),
            ("a * * * *", "\"a\" is not a number"),
            ("* * 0 * *", "day of month"),
        ] {
            let e = Cron::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
