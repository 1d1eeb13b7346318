//! The supervisor of one command target: starts the command when a request is held for it,
//! reports it ready once its probe passes, restarts it after a crash when requests wait, and
//! stops it (SIGTERM to its process group, SIGKILL after the grace period) once its route has
//! been idle for the scale-down period or the interceptor stops. A keep-awake deadline the
//! command asked for (`Wakegate-Keep-Awake`) counts as busy until it passes.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::uri::Authority;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{CommandTarget, Probe};
use crate::load::RouteLoad;
use crate::provider::{Endpoint, ReadyEndpoints, RouteId};

/// Time between readiness probes of a starting command. Every cold start pays up to one
/// interval, so it is short; a probe is one loopback connect.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// Time one probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A command that exits within this time of starting counts as crash-looping, and its next
/// start is delayed by a growing backoff.
const MIN_HEALTHY_RUN: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What `/status` shows about a command target.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessStatus {
    /// `stopped`, `starting`, `ready` or `stopping`.
    pub state: &'static str,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// How many times the command was started.
    pub starts: u64,
    /// When the command was last spawned (Unix milliseconds).
    pub spawned_at_ms: Option<u64>,
    /// When it last became ready (Unix milliseconds).
    pub ready_at_ms: Option<u64>,
    /// Spawn-to-ready time of the last start.
    pub last_boot_ms: Option<u64>,
    /// How the last process ended, or why it could not start.
    pub last_exit: Option<String>,
}

/// The wake signal of one command target: a notification, and a count so that a wake is not
/// lost between two looks and an old one is not taken for a new one.
#[derive(Debug, Default)]
pub struct WakeSignal {
    notify: Notify,
    count: std::sync::atomic::AtomicU64,
}

impl WakeSignal {
    /// Raises the signal.
    pub fn wake(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_one();
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Runs one command target.
pub struct Supervisor {
    pub(super) route: RouteId,
    pub(super) target: CommandTarget,
    pub(super) scaledown_period: Duration,
    pub(super) load: Arc<RouteLoad>,
    pub(super) wake: Arc<WakeSignal>,
    pub(super) ready: watch::Sender<ReadyEndpoints>,
    pub(super) status: Arc<Mutex<ProcessStatus>>,
    pub(super) stop: CancellationToken,
}

enum Boot {
    Ready,
    Exited(std::io::Result<ExitStatus>),
    Stop,
}

enum Run {
    Idle,
    Exited(std::io::Result<ExitStatus>),
    Stop,
}

impl Supervisor {
    /// The supervisor's main loop; returns once `stop` is cancelled and the process is gone.
    pub async fn run(self) {
        let endpoint: ReadyEndpoints =
            Authority::try_from(format!("127.0.0.1:{}", self.target.port))
                .map(Endpoint::new)
                .into_iter()
                .collect();
        let mut backoff = Duration::ZERO;
        let mut seen = self.wake.count();
        loop {
            if !self.wait_for_demand(seen).await {
                return;
            }
            if !backoff.is_zero() {
                tracing::info!(route = %self.route, backoff_ms = backoff.as_millis() as u64, "delaying restart of a crash-looping command");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = self.stop.cancelled() => return,
                }
            }

            // Something else already answering on the port would pass the readiness probe and
            // take this route's requests: refuse, and say why.
            let addr = SocketAddr::from(([127, 0, 0, 1], self.target.port));
            if probe_once(addr, &Probe::Tcp).await {
                let problem = format!(
                    "port {} is already in use by another process",
                    self.target.port
                );
                tracing::error!(route = %self.route, "cannot start command: {problem}");
                self.update(|s| {
                    s.state = "stopped";
                    s.last_exit = Some(format!("could not start: {problem}"));
                });
                backoff = next_backoff(backoff);
                continue;
            }
            let spawned = Instant::now();
            let mut child = match self.spawn() {
                Ok(child) => child,
                Err(err) => {
                    tracing::error!(route = %self.route, command = ?self.target.argv, error = %err, "cannot start command");
                    self.update(|s| {
                        s.state = "stopped";
                        s.last_exit = Some(format!("could not start: {err}"));
                    });
                    backoff = next_backoff(backoff);
                    continue;
                }
            };

            let boot = tokio::select! {
                () = self.probe_until_ready() => Boot::Ready,
                status = child.wait() => Boot::Exited(status),
                () = self.stop.cancelled() => Boot::Stop,
            };
            match boot {
                Boot::Ready => {}
                Boot::Exited(status) => {
                    self.exited(status, "before it became ready");
                    backoff = next_backoff(backoff);
                    continue;
                }
                Boot::Stop => {
                    self.terminate(&mut child).await;
                    return;
                }
            }
            let boot_time = spawned.elapsed();
            tracing::info!(route = %self.route, pid = child.id(), boot_ms = boot_time.as_millis() as u64, "backend ready");
            self.update(|s| {
                s.state = "ready";
                s.ready_at_ms = Some(unix_ms());
                s.last_boot_ms = Some(boot_time.as_millis() as u64);
            });
            self.ready.send_replace(endpoint.clone());

            let run = self.run_until_idle(&mut child).await;
            self.ready.send_replace(ReadyEndpoints::none());
            seen = self.wake.count();
            match run {
                Run::Idle => {
                    tracing::info!(route = %self.route, idle_s = self.scaledown_period.as_secs_f64(), "stopping idle command");
                    self.terminate(&mut child).await;
                    backoff = Duration::ZERO;
                }
                Run::Exited(status) => {
                    self.exited(status, "while serving");
                    backoff = if spawned.elapsed() < MIN_HEALTHY_RUN {
                        next_backoff(backoff)
                    } else {
                        Duration::ZERO
                    };
                }
                Run::Stop => {
                    self.terminate(&mut child).await;
                    return;
                }
            }
        }
    }

    /// Waits until a request is held for this target, or a wake came after `seen` (the wake
    /// count when the command last stopped). Returns false when told to stop.
    async fn wait_for_demand(&self, seen: u64) -> bool {
        loop {
            let woken = self.wake.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Wakes from requests of an earlier start do not count: only a held request now, or
            // a wake since the last stop (a placeholder or waiting page answered one).
            if self.load.held() > 0 || self.wake.count() > seen {
                return true;
            }
            tokio::select! {
                () = &mut woken => {}
                () = self.stop.cancelled() => return false,
            }
        }
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let argv = &self.target.argv;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(&self.target.env)
            .env("PORT", self.target.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so stopping it reaches whatever it spawned too.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(path) = path_with_own_dir() {
            cmd.env("PATH", path);
        }
        if let Some(dir) = &self.target.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn()?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(self.route.clone(), "stdout", out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(self.route.clone(), "stderr", err));
        }
        tracing::info!(route = %self.route, pid = child.id(), command = ?argv, "command started");
        self.update(|s| {
            s.state = "starting";
            s.pid = child.id();
            s.starts += 1;
            s.spawned_at_ms = Some(unix_ms());
        });
        Ok(child)
    }

    async fn probe_until_ready(&self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.target.port));
        loop {
            let start = Instant::now();
            if probe_once(addr, &self.target.probe).await {
                return;
            }
            tokio::time::sleep_until(start + PROBE_INTERVAL).await;
        }
    }

    async fn run_until_idle(&self, child: &mut Child) -> Run {
        loop {
            let went_idle = self.load.went_idle();
            tokio::pin!(went_idle);
            went_idle.as_mut().enable();
            // A backend that moves or releases its keep-awake deadline moves the stop.
            let keep_awake_changed = self.load.keep_awake_changed();
            tokio::pin!(keep_awake_changed);
            keep_awake_changed.as_mut().enable();
            // While requests are in flight there is nothing to time: wait for the last to end.
            // Otherwise the stop is `scaledownPeriod` after the route was last busy, and a
            // keep-awake deadline ahead counts as busy until it passes.
            let idle_check = if self.load.in_flight() > 0 {
                None
            } else {
                let left = (self.scaledown_period
                    + self.load.keep_awake_left().unwrap_or_default())
                .saturating_sub(self.load.idle_for());
                if left.is_zero() {
                    return Run::Idle;
                }
                Some(left)
            };
            let sleep = async {
                match idle_check {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = child.wait() => return Run::Exited(status),
                () = sleep => {}
                () = &mut went_idle => {}
                () = &mut keep_awake_changed => {}
                () = self.stop.cancelled() => return Run::Stop,
            }
        }
    }

    /// Stops the process group: SIGTERM, then SIGKILL after the grace period. Reaps the child.
    async fn terminate(&self, child: &mut Child) {
        self.update(|s| s.state = "stopping");
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(self.target.stop_grace_period, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(route = %self.route, grace_s = self.target.stop_grace_period.as_secs_f64(), "command ignored SIGTERM; killing it");
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                child.wait().await
            }
        };
        // Anything it left behind in its group goes too.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let text = describe(&status);
        tracing::info!(route = %self.route, status = %text, "command stopped");
        self.update(|s| {
            s.state = "stopped";
            s.pid = None;
            s.last_exit = Some(text);
        });
    }

    /// Records a process that ended by itself, and kills whatever it left in its group.
    fn exited(&self, status: std::io::Result<ExitStatus>, when: &str) {
        let text = describe(&status);
        tracing::warn!(route = %self.route, status = %text, "command exited {when}");
        if let Some(pgid) = self
            .status
            .lock()
            .ok()
            .and_then(|s| s.pid)
            .and_then(|id| i32::try_from(id).ok())
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        self.update(|s| {
            s.state = "stopped";
            s.pid = None;
            s.last_exit = Some(format!("{text} {when}"));
        });
    }

    fn update(&self, f: impl FnOnce(&mut ProcessStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut status);
    }
}

fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(Duration::from_millis(100), MAX_BACKOFF)
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("unknown ({err})"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `PATH` with the interceptor's own directory first, so a config can name
/// `wakegate-interceptor backend` (or any binary shipped beside it) without a full path.
fn path_with_own_dir() -> Option<std::ffi::OsString> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&rest))).ok()
}

async fn forward_lines(route: RouteId, stream: &'static str, out: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(target: "wakegate::child", route = %route, stream, "{}", text.trim_end());
            }
        }
    }
}

async fn probe_once(addr: SocketAddr, probe: &Probe) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        match probe {
            Probe::Tcp => Some(true),
            Probe::HttpGet(path) => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(conn);
                let req = Request::get(path.as_str())
                    .header(header::HOST, addr.to_string())
                    .body(Empty::<Bytes>::new())
                    .ok()?;
                let rsp = sender.send_request(req).await.ok()?;
                let code = rsp.status().as_u16();
                Some((200..400).contains(&code))
            }
        }
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Some(true))
    )
}
