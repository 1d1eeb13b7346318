//! The example backend (`wakegate-interceptor backend`): a small HTTP app with a configurable
//! boot delay, to play a slow-starting app in the quick start, the tests and load tests. It binds
//! its port only after the delay, as a real app does once it has booted.
//!
//! Paths: `/healthz`; `/echo` streams the request body back; `/upgrade-echo` accepts any
//! HTTP/1.1 upgrade (WebSocket included) and echoes the raw bytes; `/headers` lists the request
//! headers; `/sleep?ms=N` answers after N ms; `/bytes?n=N` answers N bytes (at most 16 MiB);
//! `/exit` ends the process mid-request; anything else says hello. Every response carries `X-Backend-Pid`,
//! and a request with `?keep-awake=<value>` (on any path, the upgrade's 101 and gRPC included)
//! gets `Wakegate-Keep-Awake: <value>` back, to try the interceptor's keep-awake by hand.
//!
//! It also speaks gRPC on the same port (h2c, or h2 over `--tls-cert`): requests whose content
//! type is `application/grpc` go to the standard health service, `grpc.health.v1.Health`, which
//! answers `Check` and streams `Watch` with SERVING, so a gRPC client can be tried through the
//! interceptor.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::server::{self, ConnectionSettings};

/// Flags of the example backend.
#[derive(Clone, Debug, clap::Args)]
pub struct BackendArgs {
    /// Port to listen on (local mode sets PORT for the commands it starts).
    #[arg(long, env = "PORT", default_value_t = 18001)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "WAKEGATE_BACKEND_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Time to wait before binding the port, to play a slow boot (e.g. 2s, 500ms).
    #[arg(long, env = "WAKEGATE_BACKEND_BOOT_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub boot_delay: Duration,
    /// Name used in the greeting.
    #[arg(
        long,
        env = "WAKEGATE_BACKEND_NAME",
        default_value = "wakegate example backend"
    )]
    pub name: String,
    /// Serve HTTPS with this certificate chain (PEM), to play an upstream that speaks TLS.
    #[arg(long, env = "WAKEGATE_BACKEND_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "WAKEGATE_BACKEND_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Most connections open at once (the benchmarks raise it to hold thousands in flight).
    #[arg(long, env = "WAKEGATE_BACKEND_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

type Body = UnsyncBoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The gRPC health service every gRPC request is handed to.
type Grpc = tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// Runs the backend until SIGTERM or SIGINT.
pub async fn run(args: BackendArgs) -> anyhow::Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    tracing::info!(%addr, boot_delay_ms = args.boot_delay.as_millis() as u64, "backend booting");
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let certs = crate::tls::Certificates::load(&crate::tls::CertSources {
                default: Some((cert.clone(), key.clone())),
                stores: Vec::new(),
            })?;
            Some(crate::tls::server_config(crate::tls::SniResolver::new(
                certs,
            ))?)
        }
        _ => None,
    };
    tokio::time::sleep(args.boot_delay).await;
    let listener = server::bind(addr)?;
    tracing::info!(%addr, pid = std::process::id(), "backend listening");
    let stop = crate::signal::stop_on_terminate();
    let name: std::sync::Arc<str> = args.name.into();
    // A new reporter has the server-wide service ("") SERVING; it stays so while we run.
    let grpc: Grpc = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(
            tonic_health::server::HealthReporter::new(),
        ),
    );
    let settings = ConnectionSettings {
        connections: std::sync::Arc::new(server::Connections::new(args.max_connections as usize)),
        ..ConnectionSettings::internal(Duration::from_secs(10))
    };
    server::serve(
        listener,
        tls,
        move |req, _remote| handle(req, name.clone(), grpc.clone()),
        settings,
        stop,
        Duration::from_secs(5),
    )
    .await;
    Ok(())
}

async fn handle(
    mut req: Request<Incoming>,
    name: std::sync::Arc<str>,
    grpc: Grpc,
) -> Response<Body> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    let keep_awake = query(&req, "keep-awake").and_then(|v| HeaderValue::from_str(v).ok());
    let mut rsp = match req.uri().path() {
        _ if is_grpc => {
            // tonic's generated servers are always ready, so no `poll_ready` first.
            let mut grpc = grpc;
            match tower::Service::call(&mut grpc, req).await {
                Ok(rsp) => rsp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                Err(never) => match never {},
            }
        }
        "/upgrade-echo" if req.headers().contains_key(http::header::UPGRADE) => {
            // Any HTTP/1.1 upgrade: switch protocols, then echo every byte back.
            let protocol = req.headers()[http::header::UPGRADE].clone();
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut reader, mut writer) =
                        tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                }
            });
            let mut rsp = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
            rsp.headers_mut().insert(http::header::UPGRADE, protocol);
            rsp.headers_mut().insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            rsp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/echo" => Response::new(req.into_body().map_err(BoxError::from).boxed_unsync()),
        "/headers" => {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            text(StatusCode::OK, out)
        }
        "/sleep" => {
            let ms = query_u64(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        "/bytes" => {
            let n = query_u64(&req, "n").unwrap_or(1024).min(MAX_BYTES) as usize;
            let mut rsp = Response::new(
                Full::new(Bytes::from(vec![b'x'; n]))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            );
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            rsp
        }
        "/exit" => {
            tracing::warn!("exiting on request to /exit");
            std::process::exit(3);
        }
        path => text(
            StatusCode::OK,
            format!("hello from {name} (pid {}) at {path}\n", std::process::id()),
        ),
    };
    rsp.headers_mut()
        .insert("x-backend-pid", HeaderValue::from(std::process::id()));
    if let Some(value) = keep_awake {
        rsp.headers_mut().insert("wakegate-keep-awake", value);
    }
    rsp
}

/// The largest `/bytes` answer.
const MAX_BYTES: u64 = 16 << 20;

fn query_u64<B>(req: &Request<B>, key: &str) -> Option<u64> {
    query(req, key).and_then(|v| v.parse().ok())
}

fn query<'r, B>(req: &'r Request<B>, key: &str) -> Option<&'r str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut rsp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *rsp.status_mut() = status;
    rsp
}
