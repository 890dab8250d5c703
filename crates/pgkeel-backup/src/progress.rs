//! Progress of long operations (`backup create`, `restore`): on a terminal, a line on stderr
//! redrawn with `\r` (bytes done of the total, rate, ETA); otherwise a log line about every
//! 10%.

use std::io::{self, IsTerminal, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `1.5 GiB`, `320 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1:02:03` or `2:03`.
fn clock(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
    } else {
        format!("{}:{:02}", secs / 60, secs % 60)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Terminal,
    Log,
}

#[derive(Debug)]
struct State {
    last_draw: Option<Instant>,
    /// The last 10% step logged.
    last_step: u64,
    finished: bool,
}

/// Bytes done out of a known total, shared by the threads doing the work.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    mode: Mode,
    state: Mutex<State>,
}

impl Progress {
    /// Progress of `what` (e.g. `backup 20240501T120000Z`) over `total` bytes: a bar when
    /// stderr is a terminal, log lines otherwise; nothing when `enabled` is false.
    pub fn new(what: impl Into<String>, total: u64, enabled: bool) -> Arc<Progress> {
        let mode = match (enabled, io::stderr().is_terminal()) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Terminal,
            (true, false) => Mode::Log,
        };
        Arc::new(Progress {
            what: what.into(),
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            mode,
            state: Mutex::new(State { last_draw: None, last_step: 0, finished: false }),
        })
    }

    /// A progress that shows nothing.
    pub fn off() -> Arc<Progress> {
        Progress::new("", 0, false)
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes done, and shows it when due.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if self.mode == Mode::Off {
            return;
        }
        let Ok(mut st) = self.state.lock() else { return };
        if st.finished {
            return;
        }
        match self.mode {
            Mode::Terminal => {
                if st.last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
                    st.last_draw = Some(Instant::now());
                    let mut err = io::stderr().lock();
                    let _ = write!(err, "\r{}", self.line(done));
                    let _ = err.flush();
                }
            }
            Mode::Log => {
                let step = (done.min(self.total) * 10).checked_div(self.total).unwrap_or(0);
                if step > st.last_step && step < 10 {
                    st.last_step = step;
                    tracing::info!("{}", self.line(done));
                }
            }
            Mode::Off => {}
        }
    }

    /// Shows the final state (the bar's last line, or a log line at 100%).
    pub fn finish(&self) {
        let Ok(mut st) = self.state.lock() else { return };
        if st.finished || self.mode == Mode::Off {
            return;
        }
        st.finished = true;
        let done = self.done();
        match self.mode {
            Mode::Terminal => {
                let mut err = io::stderr().lock();
                let _ = writeln!(err, "\r{}", self.line(done));
                let _ = err.flush();
            }
            _ => tracing::info!("{}", self.line(done)),
        }
    }

    /// `backup X: 1.2 GiB of 3.4 GiB (35%), 85.3 MiB/s, ETA 0:27` (padded to overwrite a
    /// longer previous line).
    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        // No rate in the first half second: it would be noise.
        let rate = if secs >= 0.5 { done as f64 / secs } else { 0.0 };
        let pct = (done.min(self.total) * 100).checked_div(self.total).unwrap_or(100);
        let eta = if rate > 0.0 && done < self.total {
            format!(", ETA {}", clock(((self.total - done) as f64 / rate) as u64))
        } else {
            String::new()
        };
        let rate = if rate > 0.0 { format!(", {}/s", human_bytes(rate as u64)) } else { String::new() };
        format!("{}: {} of {} ({pct}%){rate}{eta}{:8}", self.what, human_bytes(done), human_bytes(self.total), "")
    }
}

/// A reader that counts what passes through into a [`Progress`].
pub struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<'a, R> ProgressReader<'a, R> {
    /// Wraps `inner`.
    pub fn new(inner: R, progress: &'a Progress) -> Self {
        ProgressReader { inner, progress }
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

/// A writer that counts what passes through into a [`Progress`].
pub struct ProgressWriter<'a, W> {
    inner: W,
    progress: &'a Progress,
}

impl<'a, W> ProgressWriter<'a, W> {
    /// Wraps `inner`.
    pub fn new(inner: W, progress: &'a Progress) -> Self {
        ProgressWriter { inner, progress }
    }
}

impl<W: Write> Write for ProgressWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_units() {
        assert_eq!(human_bytes(320), "320 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(clock(27), "0:27");
        assert_eq!(clock(3723), "1:02:03");
        let p = Progress::new("backup X", 4 << 30, false);
        p.add(1 << 30);
        let line = p.line(p.done());
        assert!(line.starts_with("backup X: 1.0 GiB of 4.0 GiB (25%)"), "{line}");
        let p = Progress::new("empty", 0, false);
        assert!(p.line(0).contains("(100%)"), "{}", p.line(0));
        let mut out = Vec::new();
        let p = Progress::new("w", 10, false);
        ProgressWriter::new(&mut out, &p).write_all(b"hello").unwrap();
        let mut r = ProgressReader::new(&b"abc"[..], &p);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(p.done(), 8);
    }
}
