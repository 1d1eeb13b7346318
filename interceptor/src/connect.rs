//! The upstream connector: hyper-util's `HttpConnector`, plus short retries for endpoints that
//! were only just reported ready.
//!
//! A provider's "ready" can run ahead of the socket: a pod is Ready before kube-proxy or the
//! pod's own listener catches up, and a local process may pass an HTTP probe on one port while
//! another is still binding. When a held request is released to an endpoint, the proxy marks
//! that endpoint fresh until the request's readiness deadline; connects to a fresh endpoint that
//! fail are retried every [`RETRY_INTERVAL`] until then. Connects to any other endpoint fail at
//! once, so a dead backend gives a prompt 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::Service;

use crate::provider::ReadyEndpoints;

/// How often a connect to a fresh endpoint is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// The longest a fresh endpoint's connects are retried: kube-proxy can lag a pod's readiness by
/// up to about 10 s.
pub const MAX_FRESH: Duration = Duration::from_secs(10);

/// Endpoints whose connects may be retried: until when, and while their provider still lists
/// them ready (a crashed backend stops the retries at once). Keyed by `host:port`.
#[derive(Clone, Debug, Default)]
pub struct FreshEndpoints(Arc<DashMap<Box<str>, Fresh>>);

/// Until when, and the ready set that must still list the endpoint.
type Fresh = (Instant, watch::Receiver<ReadyEndpoints>);

impl FreshEndpoints {
    /// Allows retrying connects to `authority` until `until` (at most [`MAX_FRESH`] from now),
    /// for as long as `ready` lists it.
    pub fn mark(&self, authority: &str, until: Instant, ready: &watch::Receiver<ReadyEndpoints>) {
        let now = Instant::now();
        let until = until.min(now + MAX_FRESH);
        if self.0.len() > 4096 {
            self.0.retain(|_, (t, _)| *t > now);
        }
        self.0.insert(authority.into(), (until, ready.clone()));
    }

    /// Until when a failed connect to `authority` may be retried, if at all.
    fn retry_until(&self, authority: &str) -> Option<Instant> {
        let entry = self.0.get(authority)?;
        let (until, ready) = &*entry;
        let listed = ready
            .borrow()
            .as_slice()
            .iter()
            .any(|e| e.authority().as_str() == authority);
        listed.then_some(*until)
    }
}

/// `HttpConnector` with retries for fresh endpoints.
#[derive(Clone, Debug)]
pub struct RetryingConnector {
    inner: HttpConnector,
    fresh: FreshEndpoints,
    /// Dial this endpoint whatever the URI names: HTTP/2 requests carry the routed authority
    /// in their URI (it becomes `:authority`), so their client is one per endpoint.
    pin: Option<http::uri::Authority>,
}

impl RetryingConnector {
    /// Wraps a plain-TCP connector.
    pub fn new(fresh: FreshEndpoints) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        // `https` URIs come through too: the TLS connector wrapped around this one does the
        // handshake once the TCP connection is up.
        inner.enforce_http(false);
        inner.set_connect_timeout(Some(Duration::from_secs(10)));
        Self {
            inner,
            fresh,
            pin: None,
        }
    }

    /// A connector that always dials `endpoint`.
    pub fn pinned(fresh: FreshEndpoints, endpoint: http::uri::Authority) -> Self {
        Self {
            pin: Some(endpoint),
            ..Self::new(fresh)
        }
    }
}

type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for RetryingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let fresh = self.fresh.clone();
        let uri = match &self.pin {
            Some(endpoint) => {
                let mut parts = uri.into_parts();
                parts.authority = Some(endpoint.clone());
                Uri::from_parts(parts).unwrap_or_default()
            }
            None => uri,
        };
        Box::pin(async move {
            loop {
                let err = match inner.call(uri.clone()).await {
                    Ok(io) => return Ok(io),
                    Err(err) => err,
                };
                let until = uri.authority().and_then(|a| fresh.retry_until(a.as_str()));
                match until {
                    Some(until) if Instant::now() + RETRY_INTERVAL < until => {
                        tracing::debug!(%uri, error = %err, "connect to a fresh endpoint failed; retrying");
                        tokio::time::sleep(RETRY_INTERVAL).await;
                    }
                    _ => return Err(err.into()),
                }
            }
        })
    }
}
