//! Test harness: runs the real `wakegate-interceptor` binary on 127.0.0.1 with a config file, and
//! talks to it over real sockets. Waiting is always for a condition under a deadline.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

/// The interceptor binary under test; also the example backend (`backend` subcommand).
pub const BIN: &str = env!("CARGO_BIN_EXE_wakegate-interceptor");

/// A port nobody listens on right now, and that this test process has not handed out before.
///
/// The kernel can give the same free port to two binds in a row once the first socket is
/// closed: a backend's port chosen by a test, then the interceptor's admin port chosen by the
/// harness, were once the same, and the backend could never start.
pub fn free_port() -> u16 {
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

/// A free port below the kernel's ephemeral range, for a backend that binds only after many
/// client connections are open: a port from [`free_port`] is in that range, and one of those
/// connections can take it as its local port before the backend binds.
pub fn free_port_below_ephemeral() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Spread over the range by pid and time, so parallel tests rarely try the same ports.
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    let span = u64::from(low.saturating_sub(20_000).max(1));
    (0..span)
        .map(|i| 20_000 + ((seed + i * 7919) % span) as u16)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Waits until `check` is true, polling every 10 ms; panics naming `what` after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn cold_start(&self) -> Option<&str> {
        self.headers
            .get("x-keda-http-cold-start")
            .and_then(|v| v.to_str().ok())
    }

    pub fn pid(&self) -> u32 {
        self.headers["x-backend-pid"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }
}

impl Http {
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let rsp = self.0.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = rsp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", host)
            .body(Full::default())
            .unwrap();
        self.send(req).await
    }
}

/// A running interceptor.
pub struct Interceptor {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// Where the TLS listener binds, if the arguments give it a certificate.
    pub tls: SocketAddr,
    pub http: Http,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Interceptor {
    /// Starts the interceptor on `config` (YAML) and waits until `/readyz` says ready.
    pub async fn start(config: &str) -> Self {
        Self::start_with(config, &[]).await
    }

    pub async fn start_with(config: &str, args: &[&str]) -> Self {
        Self::start_with_env(config, args, &[]).await
    }

    /// Starts the interceptor with `env` added to its environment.
    pub async fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        // `free_port` can race with a parallel test taking the same port: when the interceptor
        // exits because its address is in use, start it again on new ports.
        for _ in 0..5 {
            let mut this = Self::spawn_with_env(config, args, env);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let ready = this.http.get(this.admin, "admin", "/readyz").await;
                if matches!(ready, Ok(r) if r.status == StatusCode::OK) {
                    return this;
                }
                if let Ok(Some(_)) = this.child.as_mut().unwrap().try_wait() {
                    assert!(
                        this.log().contains("Address already in use"),
                        "interceptor exited at start:\n{}",
                        this.log()
                    );
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out after 10s waiting for: interceptor /readyz = 200\n{}",
                    this.log()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("no free ports for the interceptor after 5 tries");
    }

    /// Starts the interceptor without waiting for it.
    pub fn spawn(config: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(config, args, &[])
    }

    pub fn spawn_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("interceptor.log");
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .arg("--proxy-addr")
            .arg(proxy.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--tls-addr")
            .arg(tls.to_string())
            // Held requests would otherwise keep a stopping interceptor draining for 30 s. A
            // test that drains requests in flight gives its own.
            .args(if args.contains(&"--drain-timeout") {
                &[][..]
            } else {
                &["--drain-timeout", "1s"][..]
            })
            .args(args)
            .env("RUST_LOG", "info,wakegate_interceptor=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            proxy,
            admin,
            tls,
            http: Http::default(),
            log,
            dir,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.http.get(self.proxy, host, path).await.unwrap()
    }

    /// Sends a GET in its own task, so many can be in flight at once.
    pub fn spawn_get(
        &self,
        host: &str,
        path: &str,
    ) -> tokio::task::JoinHandle<Result<Reply, String>> {
        let (http, proxy) = (self.http.clone(), self.proxy);
        let (host, path) = (host.to_owned(), path.to_owned());
        tokio::spawn(async move { http.get(proxy, &host, &path).await })
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        self.http.get(self.admin, "admin", path).await.unwrap()
    }

    pub async fn queue(&self) -> serde_json::Value {
        serde_json::from_slice(&self.admin_get("/queue").await.body).unwrap()
    }

    /// The `/status` entry of one target.
    pub async fn target(&self, name: &str) -> serde_json::Value {
        let status: serde_json::Value =
            serde_json::from_slice(&self.admin_get("/status").await.body).unwrap();
        status["targets"][name].clone()
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text()
    }

    /// Waits until the route's `/queue` Concurrency equals `n`.
    pub async fn wait_concurrency(&self, route: &str, n: u64) {
        eventually(
            &format!("/queue {route} Concurrency = {n}"),
            Duration::from_secs(10),
            || async { self.queue().await[route]["Concurrency"].as_u64() == Some(n) },
        )
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id().unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        tokio::time::timeout(deadline, child.wait())
            .await
            .expect("interceptor did not exit in time")
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- interceptor log ----\n{}", self.log());
        }
        if let Some(child) = &mut self.child {
            if let Some(pid) = child.id() {
                // SIGTERM, and wait for it to exit, so it stops its children: a SIGKILL (what
                // dropping the handle sends) would leave them behind.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// A config route whose target is the example backend with a boot delay.
pub fn backend_route(name: &str, host: &str, port: u16, boot_delay: &str, extra: &str) -> String {
    format!(
        r#"  - name: {name}
    hosts: ["{host}"]
    target:
      command: ["{BIN}", "backend", "--port", "{port}", "--boot-delay", "{boot_delay}", "--name", "{name}"]
      port: {port}
      stopGracePeriod: 2s
{extra}"#
    )
}

/// A config route whose target is the example backend, started only once `gate` exists: a
/// test that must see requests held before the backend is up opens the gate when it has,
/// however slow the machine (qemu runs these tests for aarch64). Give it a port from
/// [`free_port_below_ephemeral`].
pub fn gated_backend_route(
    name: &str,
    host: &str,
    port: u16,
    gate: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        r#"  - name: {name}
    hosts: ["{host}"]
    target:
      command: ["/bin/sh", "-c", "while [ ! -e '{gate}' ]; do sleep 0.01; done; exec '{BIN}' backend --port {port} --name {name}"]
      port: {port}
      stopGracePeriod: 2s
{extra}"#,
        gate = gate.display()
    )
}

/// An h2c connection (HTTP/2 with prior knowledge) to `addr`, driven in a task of its own.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// An in-process upstream that answers with its name and counts requests and peak concurrency.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub requests: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
}

impl Upstream {
    /// `delay` is how long each request takes, to build up concurrency.
    pub async fn start(name: &'static str, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let up = Self {
            addr,
            name,
            requests: requests.clone(),
            peak: peak.clone(),
        };
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (requests, peak, now) = (requests.clone(), peak.clone(), now.clone());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (requests, peak, now) = (requests.clone(), peak.clone(), now.clone());
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(current, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        let mut headers = String::new();
                        for (k, v) in req.headers() {
                            headers.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        let body = format!("{name} {}\n{headers}", req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        up
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Opens a WebSocket upgrade of `path` on `host` through the proxy: the connection, and the
/// response head it got (lowercased).
pub async fn websocket(
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&head).to_ascii_lowercase())
}
