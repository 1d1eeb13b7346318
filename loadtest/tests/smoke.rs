//! The load tester end to end against a real interceptor in local mode, whose example backend
//! boots in 200 ms and is stopped 300 ms after going idle: each subcommand runs, its JSON and SVG
//! are checked, Ctrl-C gives a partial report, and bad arguments get clear messages.
//!
//! The interceptor binary is the one `cargo test --workspace` builds beside this package's
//! binary (or `WAKEGATE_INTERCEPTOR_BIN`).

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOADTEST: &str = env!("CARGO_BIN_EXE_wakegate-loadtest");

fn interceptor_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WAKEGATE_INTERCEPTOR_BIN") {
        return bin.into();
    }
    let bin = PathBuf::from(LOADTEST).with_file_name("wakegate-interceptor");
    assert!(
        bin.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace) or build it first (cargo build -p wakegate-interceptor)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    // Never the same port twice in one process: the kernel can hand a just-closed free port
    // to the next bind, and two parts of one test would then share it.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

struct Interceptor {
    child: Child,
    proxy: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Interceptor {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = interceptor_bin();
        let backend_port = free_port();
        let config = format!(
            r#"routes:
  - name: app
    hosts: ["app.test"]
    target:
      command: ["{bin}", "backend", "--port", "{backend_port}", "--boot-delay", "200ms"]
      port: {backend_port}
      readinessProbe: {{ httpGet: {{ path: /healthz }} }}
      stopGracePeriod: 2s
    scaledownPeriod: 300ms
"#,
            bin = bin.display()
        );
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let (proxy, admin) = (free_port(), free_port());
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&path)
            .args(["--proxy-addr", &format!("127.0.0.1:{proxy}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--drain-timeout", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let this = Self {
            child,
            proxy,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
            assert!(Instant::now() < deadline, "interceptor did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        this
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--url".into(),
            format!("http://127.0.0.1:{}/", self.proxy),
            "--host".into(),
            "app.test".into(),
            "--admin".into(),
            format!("http://127.0.0.1:{}/", self.admin),
        ]
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn loadtest(mode: &str, ic: &Interceptor, extra: &[&str]) -> (Output, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("plot.svg");
    let out = Command::new(LOADTEST)
        .arg(mode)
        .args(ic.args())
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mode} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let svg = std::fs::read_to_string(&svg).unwrap();
    (out, report, svg)
}

#[test]
fn cold_start_rate_and_burst_against_local_mode() {
    let ic = Interceptor::start();

    // cold-start: two iterations of three requests, each from zero.
    let (out, report, svg) = loadtest("cold-start", &ic, &["-k", "2", "-n", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ready -> 1st byte"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for app to be at zero"),
        "plain progress lines: {stderr}"
    );
    let iterations = report["coldStarts"].as_array().unwrap();
    assert_eq!(iterations.len(), 2, "{report}");
    for it in iterations {
        assert_eq!(it["ok"], 3, "{it}");
        let boot = it["bootUs"].as_i64().unwrap();
        assert!(boot >= 200_000, "boot {boot} us is at least the boot delay");
        let overhead = it["overheadUs"].as_i64().unwrap();
        assert!((0..1_000_000).contains(&overhead), "overhead {overhead} us");
        assert!(it["firstByteUs"].as_u64().unwrap() >= 200_000);
    }
    assert!(report["records"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["cold"] == true));
    assert_eq!(report["coldStartSummary"]["firstByte"]["count"], 2);
    assert!(!report["samples"].as_array().unwrap().is_empty());
    assert!(
        svg.contains("<circle") && svg.contains("stroke-dasharray"),
        "{svg}"
    );

    // rate: 200/s for 1 s, open loop, warm target.
    let (_, report, _) = loadtest("rate", &ic, &["--rate", "200", "--duration", "1s"]);
    let sent = report["requests"]["sent"].as_u64().unwrap();
    assert!((195..=200).contains(&sent), "{sent} sent");
    assert_eq!(report["requests"]["ok"], sent);
    assert!(report["latency"]["p99"].as_u64().unwrap() > 0);

    // A ramp and closed loop run too.
    let (_, report, _) = loadtest(
        "rate",
        &ic,
        &[
            "--rate",
            "100",
            "--ramp-from",
            "10",
            "--ramp",
            "1s",
            "--duration",
            "1s",
        ],
    );
    let sent = report["requests"]["sent"].as_u64().unwrap();
    assert!(
        (50..=60).contains(&sent),
        "about (10 + 100) / 2 over the ramp: {sent}"
    );
    let (_, report, _) = loadtest(
        "rate",
        &ic,
        &["--rate", "max", "-c", "4", "--requests", "300"],
    );
    assert_eq!(report["requests"]["ok"], 300);
    assert_eq!(report["rate"]["connections"], 4);

    // burst: 300 at once against zero.
    let (_, report, _) = loadtest("burst", &ic, &["-m", "300"]);
    assert_eq!(report["burst"]["succeeded"], 300, "{}", report["burst"]);
    assert!(report["burst"]["peakHeld"].as_u64().unwrap() > 0);
    assert!(report["burst"]["allAnsweredUs"].as_u64().unwrap() >= 200_000);
}

#[test]
fn ctrl_c_gives_a_partial_report() {
    let ic = Interceptor::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("partial.json");
    let child = Command::new(LOADTEST)
        .arg("rate")
        .args(ic.args())
        .args(["--rate", "100", "--duration", "60s", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once some requests have been answered (the progress lines say so).
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut interrupted = false;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let status = queued_requests(ic.admin);
        if status.is_some_and(|count| count >= 50) {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
            interrupted = true;
            break;
        }
    }
    assert!(interrupted, "requests never reached the interceptor");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("INTERRUPTED"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true);
    // Every request the interceptor saw was sent; those still unanswered at the interrupt
    // are reported as unfinished (under emulation most of them can still be held).
    let requests = &report["requests"];
    let sent = requests["sent"].as_u64().unwrap();
    assert!((50..6000).contains(&sent), "{sent}");
    assert_eq!(
        sent,
        requests["ok"].as_u64().unwrap()
            + requests["failed"].as_u64().unwrap()
            + requests["unfinished"].as_u64().unwrap(),
        "{requests}"
    );
    assert!(report["durationUs"].as_u64().unwrap() < 30_000_000);
}

/// The route's request count from `/queue`, with a raw HTTP/1.0 GET.
fn queued_requests(admin: u16) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    s.write_all(b"GET /queue HTTP/1.0\r\nHost: admin\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = body.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["app"]["RequestCount"].as_u64()
}

#[test]
fn bad_arguments_and_a_wrong_route_get_clear_messages() {
    let out = Command::new(LOADTEST)
        .args(["rate", "--rate=-5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a rate"));

    let ic = Interceptor::start();
    let out = Command::new(LOADTEST)
        .arg("cold-start")
        .args(ic.args())
        .args(["--route", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--route \"nope\" is not a route") && stderr.contains("app"),
        "{stderr}"
    );

    let out = Command::new(LOADTEST)
        .args([
            "burst",
            "--admin",
            &format!("http://127.0.0.1:{}/", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
