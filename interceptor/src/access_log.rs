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
    lines: mpsc::SyncSender<String>,
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
    /// Starts the writer thread and registers the dropped-lines counter.
    pub fn start(format: AccessLogFormat, registry: &Registry) -> std::io::Result<Self> {
        let dropped = IntCounter::new(
            "wakegate_access_log_dropped_total",
            "Access log lines dropped because stdout could not keep up",
        )
        .map_err(std::io::Error::other)?;
        registry
            .register(Box::new(dropped.clone()))
            .map_err(std::io::Error::other)?;
        let (lines, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx))?;
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
        if self.lines.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writes queued lines, flushing whenever the queue is empty; ends when every sender is gone.
fn write_lines(rx: &mpsc::Receiver<String>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    while let Ok(line) = rx.recv() {
        let mut next = Some(line);
        while let Some(line) = next {
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
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

fn json(e: &Entry<'_>) -> String {
    let mut line = serde_json::json!({
        "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "route": e.route,
        "method": e.method.as_str(),
        "path": e.path,
        "status": e.status.as_u16(),
        "bytes": e.bytes,
        "durationMs": millis(e.duration),
        "coldWaitMs": e.cold_wait.map(millis),
        "upstream": e.upstream,
        "traceId": e.trace_id,
        "client": e.client.to_string(),
    })
    .to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
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
