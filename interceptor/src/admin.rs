//! The admin server: health probes, the add-on-compatible `/queue`, Prometheus `/metrics`, a
//! `/status` view of routes and targets, the `/events` wake stream and a live `/dashboard`. It
//! listens on its own address so the proxy port carries user traffic only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::sync::broadcast;

use crate::events::WakeEvents;
use crate::load::Loads;
use crate::provider::Provider;
use crate::proxy::Proxy;

/// What the admin endpoints read.
pub struct Admin {
    proxy: Arc<Proxy>,
    provider: Arc<dyn Provider>,
    loads: Arc<Loads>,
    registry: Registry,
    wakes: WakeEvents,
    draining: AtomicBool,
}

/// Admin response bodies: small ones, or the `/events` stream.
pub type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

/// Interval of `ping` lines on `/events`.
const PING_INTERVAL: Duration = Duration::from_secs(15);

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The admin view over a running proxy.
    pub fn new(
        proxy: Arc<Proxy>,
        provider: Arc<dyn Provider>,
        loads: Arc<Loads>,
        registry: Registry,
        wakes: WakeEvents,
    ) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            provider,
            loads,
            registry,
            wakes,
            draining: AtomicBool::new(false),
        })
    }

    /// Marks the process as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<AdminBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        }
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.draining.load(Ordering::Acquire) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !self.proxy.is_loaded() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "routes not loaded yet\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            "/dashboard" | "/dashboard/" => page(DASHBOARD_HTML, "text/html; charset=utf-8"),
            "/dashboard.js" => page(DASHBOARD_JS, "text/javascript; charset=utf-8"),
            "/queue" => json(&self.loads.queue()),
            "/events" => self.events(),
            "/status" => json(&serde_json::json!({
                "ready": self.proxy.is_loaded() && !self.draining.load(Ordering::Acquire),
                "queue": self.loads.queue(),
                "held": self.loads.held(),
                "keepAwakeUntil": self.loads.kept_awake(),
                "routes": self.proxy.route_targets(),
                "targets": self.provider.status(),
            })),
            "/metrics" => {
                let mut buf = Vec::with_capacity(8 * 1024);
                match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
                    Ok(()) => {
                        let mut rsp = Response::new(Full::new(Bytes::from(buf)).boxed_unsync());
                        rsp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        rsp
                    }
                    Err(err) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("encoding metrics failed: {err}\n"),
                    ),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /livez /readyz /queue /status /metrics /events /dashboard\n",
            ),
        }
    }

    /// The wake-event stream (see [`crate::events`]).
    fn events(&self) -> Response<AdminBody> {
        let hello = line(&serde_json::json!({"type": "hello", "queue": self.loads.queue()}));
        let state = (self.wakes.subscribe(), Some(hello));
        let stream = futures_util::stream::unfold(state, |(mut rx, first)| async move {
            if let Some(hello) = first {
                return Some((Ok(Frame::data(hello)), (rx, None)));
            }
            let next = tokio::select! {
                wake = rx.recv() => match wake {
                    Ok(wake) => {
                        let value = serde_json::to_value(&wake).unwrap_or_default();
                        line(&value)
                    }
                    // Too slow a reader: tell it to resynchronise from /queue.
                    Err(broadcast::error::RecvError::Lagged(n)) => line(&serde_json::json!({"type": "lagged", "missed": n})),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = tokio::time::sleep(PING_INTERVAL) => line(&serde_json::json!({"type": "ping"})),
            };
            Some((Ok::<_, Infallible>(Frame::data(next)), (rx, None)))
        });
        let mut rsp = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        rsp
    }
}

/// The dashboard: a page and its script, served from the binary (no CDN, no build step). It
/// reads `/status`, `/metrics` and `/events` from this server, and nothing else.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");

/// A static dashboard file, locked to this origin: scripts from here only, fetches to here only.
fn page(body: &'static str, content_type: &'static str) -> Response<AdminBody> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    let headers = rsp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    rsp
}

fn line(value: &serde_json::Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn text(status: StatusCode, body: &str) -> Response<AdminBody> {
    let mut rsp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())).boxed_unsync());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn json<T: serde::Serialize>(value: &T) -> Response<AdminBody> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut rsp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            rsp
        }
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding JSON failed: {err}\n"),
        ),
    }
}
