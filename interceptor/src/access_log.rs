//! The access log (`--access-log text|json`): one line per proxied request, written to stdout
//! by a thread of its own.
//!
//! A request's line is formatted when its response ends and handed over through a bounded
//! queue; the data path never waits for stdout. When the queue is full (stdout is slower than
//! the traffic) the line is dropped and counted in `wakegate_access_log_dropped_total`, so a
//! stalled log collector cannot stall requests. Off, nothing is formatted or queued.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use http::{Method, StatusCode};
use prometheus::{IntCounter, Registry};

/// How access log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccessLogFormat {
    /// `key=value` pairs (logfmt).
    Text,
    /// One JSON object per line.
    Json,
}

/// Lines queued and not yet written, at most; past this they are dropped.
const QUEUE: usize = 16 * 1024;

/// The access log's sending half, shared by every request.
#[derive(Clone)]
pub struct AccessLog {
    format: AccessLogFormat,
    lines: mpsc::SyncSender<Line>,
    dropped: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// One request, as the access log records it.
#[derive(Debug)]
pub struct Entry<'a> {
    pub route: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub status: StatusCode,
    /// Response body bytes sent.
    pub bytes: u64,
    pub duration: Duration,
    /// How long it was held for a cold start; `None` when it was not held.
    pub cold_wait: Option<Duration>,
    /// The endpoint it was forwarded to, if any.
    pub upstream: Option<&'a str>,
    /// The trace it belongs to, when traces are on.
    pub trace_id: Option<String>,
    pub client: IpAddr,
}

impl AccessLog {
    /// Starts the writer thread on stdout and registers the dropped-lines counter.
    pub fn start(format: AccessLogFormat, registry: &Registry) -> std::io::Result<Self> {
        Self::start_writing_to(format, registry, QUEUE, std::io::stdout())
    }

    fn start_writing_to(
        format: AccessLogFormat,
        registry: &Registry,
        queue: usize,
        out: impl std::io::Write + Send + 'static,
    ) -> std::io::Result<Self> {
        let dropped = IntCounter::new(
            "wakegate_access_log_dropped_total",
            "Access log lines dropped because stdout could not keep up",
        )
        .map_err(std::io::Error::other)?;
        registry
            .register(Box::new(dropped.clone()))
            .map_err(std::io::Error::other)?;
        let (lines, rx) = mpsc::sync_channel::<Line>(queue);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(Self {
            format,
            lines,
            dropped,
        })
    }

    /// Queues `entry`'s line; never waits.
    pub fn record(&self, entry: &Entry<'_>) {
        let line = match self.format {
            AccessLogFormat::Text => text(entry),
            AccessLogFormat::Json => json(entry),
        };
        if self.lines.try_send(Line::Text(line)).is_err() {
            self.dropped.inc();
        }
    }

    /// Writes out every line queued so far, waiting up to `deadline` (at shutdown: the last
    /// lines are not lost with the process).
    pub fn flush(&self, deadline: Duration) {
        let until = std::time::Instant::now() + deadline;
        let (done, flushed) = mpsc::sync_channel(1);
        let mut flush = Line::Flush(done);
        // The queue may be full behind a slow stdout: retry until there is room or time is up.
        loop {
            match self.lines.try_send(flush) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(again)) if std::time::Instant::now() < until => {
                    flush = again;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = flushed.recv_timeout(until.saturating_duration_since(std::time::Instant::now()));
    }
}

/// What the writer thread is sent.
enum Line {
    Text(String),
    /// Flush, then say so.
    Flush(mpsc::SyncSender<()>),
}

/// How long a line may wait before it is written: under load, one wake-up and one `write` per
/// this much.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Writes queued lines. Idle, it waits for a line; once one comes it works in ticks of
/// [`FLUSH_EVERY`]: each tick takes every line queued meanwhile and writes them at once. So
/// under load a request never wakes the writer (a `try_send` into a queue nobody waits on is
/// a few atomic operations), and the writer wakes ten times a second. Ends when every sender is
/// gone, writing what is left.
fn write_lines(rx: &mpsc::Receiver<Line>, out: impl std::io::Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let write = |line: Line, out: &mut std::io::BufWriter<_>| match line {
        Line::Text(text) => out.write_all(text.as_bytes()).is_ok(),
        Line::Flush(done) => {
            let flushed = out.flush().is_ok();
            let _ = done.try_send(());
            flushed
        }
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Ticks, while lines keep coming.
        while let Some(line) = next.take() {
            if !write(line, &mut out) {
                return;
            }
            std::thread::sleep(FLUSH_EVERY);
            loop {
                match rx.try_recv() {
                    Ok(line) => {
                        if !write(line, &mut out) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                }
            }
            if out.flush().is_err() {
                return;
            }
            // A quiet tick ends the ticking: wait for the next line instead.
            next = rx.try_recv().ok();
        }
    }
    let _ = out.flush();
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn text(e: &Entry<'_>) -> String {
    let mut line = String::with_capacity(256);
    let _ = write!(
        line,
        "ts={} route={} method={} path={:?} status={} bytes={} duration_ms={}",
        humantime::format_rfc3339_millis(SystemTime::now()),
        e.route,
        e.method,
        e.path,
        e.status.as_u16(),
        e.bytes,
        millis(e.duration),
    );
    match e.cold_wait {
        Some(wait) => write!(line, " cold_wait_ms={}", millis(wait)),
        None => write!(line, " cold_wait_ms=-"),
    }
    .ok();
    let _ = writeln!(
        line,
        " upstream={} trace_id={} client={}",
        e.upstream.unwrap_or("-"),
        e.trace_id.as_deref().unwrap_or("-"),
        e.client,
    );
    line
}

/// A JSON line's fields, in order, serialised straight from the entry's borrows.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonLine<'a> {
    ts: String,
    route: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    cold_wait_ms: Option<f64>,
    upstream: Option<&'a str>,
    trace_id: Option<&'a str>,
    client: IpAddr,
}

fn json(e: &Entry<'_>) -> String {
    let line = JsonLine {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        route: e.route,
        method: e.method.as_str(),
        path: e.path,
        status: e.status.as_u16(),
        bytes: e.bytes,
        duration_ms: millis(e.duration),
        cold_wait_ms: e.cold_wait.map(millis),
        upstream: e.upstream,
        trace_id: e.trace_id.as_deref(),
        client: e.client,
    };
    let mut text = serde_json::to_string(&line).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            route: "default/hello",
            method: &Method::GET,
            path: "/a \"b\"",
            status: StatusCode::OK,
            bytes: 13,
            duration: Duration::from_micros(1_234_567),
            cold_wait: Some(Duration::from_millis(800)),
            upstream: Some("127.0.0.1:9000"),
            trace_id: None,
            client: IpAddr::from([10, 0, 0, 1]),
        }
    }

    #[test]
    fn a_text_line_has_every_field_and_escapes_the_path() {
        let line = text(&entry());
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        for field in [
            "route=default/hello",
            "method=GET",
            r#"path="/a \"b\"""#,
            "status=200",
            "bytes=13",
            "duration_ms=1234.567",
            "cold_wait_ms=800",
            "upstream=127.0.0.1:9000",
            "trace_id=-",
            "client=10.0.0.1",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }

    /// A writer that takes nothing until it is let go, like a stdout nobody reads; `entered`
    /// tells that the writer thread is stuck in it.
    #[derive(Default)]
    struct Stalled {
        open: Mutex<bool>,
        opened: Condvar,
        entered: AtomicBool,
        written: Mutex<Vec<u8>>,
    }

    struct StalledWriter(Arc<Stalled>);

    impl std::io::Write for StalledWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.entered.store(true, Ordering::SeqCst);
            let mut open = self.0.open.lock().unwrap();
            while !*open {
                open = self.0.opened.wait(open).unwrap();
            }
            self.0.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_stalled_stdout_drops_lines_and_never_blocks_a_request() {
        let stalled = Arc::new(Stalled::default());
        let registry = Registry::new();
        let log = AccessLog::start_writing_to(
            AccessLogFormat::Text,
            &registry,
            8,
            StalledWriter(stalled.clone()),
        )
        .unwrap();
        log.record(&entry());
        until("the writer stuck in stdout", || {
            stalled.entered.load(Ordering::SeqCst)
        });
        // Eight lines fill the queue; every other one is dropped, at once.
        for _ in 0..100 {
            log.record(&entry());
        }
        assert_eq!(log.dropped.get(), 92);
        *stalled.open.lock().unwrap() = true;
        stalled.opened.notify_all();
        until("the queued lines written", || {
            String::from_utf8_lossy(&stalled.written.lock().unwrap())
                .lines()
                .count()
                == 9
        });
        let written = String::from_utf8(stalled.written.lock().unwrap().clone()).unwrap();
        assert!(written
            .lines()
            .all(|l| l.starts_with("ts=") && l.contains("route=default/hello")));
        assert!(registry
            .gather()
            .iter()
            .any(|m| m.name() == "wakegate_access_log_dropped_total"));
    }

    #[test]
    fn a_json_line_parses_back() {
        let line = json(&entry());
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["status"], 200);
        assert_eq!(v["path"], "/a \"b\"");
        assert_eq!(v["coldWaitMs"], 800.0);
        assert!(v["traceId"].is_null());
    }
}
