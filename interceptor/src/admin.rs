//! The admin server: health probes, the add-on-compatible `/queue`, Prometheus `/metrics` and a
//! `/status` view of routes and targets. It listens on its own address so the proxy port carries
//! user traffic only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::load::Loads;
use crate::provider::Provider;
use crate::proxy::Proxy;

/// What the admin endpoints read.
pub struct Admin {
    proxy: Arc<Proxy>,
    provider: Arc<dyn Provider>,
    loads: Arc<Loads>,
    registry: Registry,
    draining: AtomicBool,
}

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
    ) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            provider,
            loads,
            registry,
            draining: AtomicBool::new(false),
        })
    }

    /// Marks the process as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
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
            "/queue" => json(&self.loads.queue()),
            "/status" => json(&serde_json::json!({
                "ready": self.proxy.is_loaded() && !self.draining.load(Ordering::Acquire),
                "queue": self.loads.queue(),
                "targets": self.provider.status(),
            })),
            "/metrics" => {
                let mut buf = Vec::with_capacity(8 * 1024);
                match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
                    Ok(()) => {
                        let mut rsp = Response::new(Full::new(Bytes::from(buf)));
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
                "not found; try /livez /readyz /queue /status /metrics\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
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
