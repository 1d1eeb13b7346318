//! The service under test: one pooled HTTP/1.1 client, and what one request measures.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::record::RequestRecord;

/// The response header the interceptor sets on every forwarded response.
const COLD_START_HEADER: &str = "x-keda-http-cold-start";

/// Sends requests to the service under test.
#[derive(Clone, Debug)]
pub struct Target {
    client: Client<HttpConnector, Empty<Bytes>>,
    url: Uri,
    host: HeaderValue,
    timeout: Duration,
}

/// What one request got.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The status, if a response came.
    pub status: Option<u16>,
    /// Send to response headers (or to the failure).
    pub latency: Duration,
    /// Send to the end of the body.
    pub total: Duration,
    /// Whether the response waited for a cold start.
    pub cold: bool,
    /// Why it failed: `timeout`, `connect`, `request` or `body`.
    pub error: Option<&'static str>,
}

impl Outcome {
    /// The outcome as a record sent at `sent_us`.
    pub fn record(&self, sent_us: u64, iteration: u32) -> RequestRecord {
        RequestRecord {
            sent_us,
            latency_us: self.latency.as_micros() as u64,
            total_us: self.total.as_micros() as u64,
            status: self.status.unwrap_or(0),
            cold: self.cold,
            iteration,
        }
    }

    /// Whether the request got a 2xx or 3xx.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..400).contains(&s))
    }
}

impl Target {
    /// A client for `url`, sending `host` as the Host header.
    pub fn new(url: Uri, host: &str, timeout: Duration) -> anyhow::Result<Self> {
        let host = HeaderValue::from_str(host)
            .map_err(|_| anyhow::anyhow!("--host {host:?} is not a valid Host header value"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            url,
            host,
            timeout,
        })
    }

    /// Sends one GET, measured from `sent` (the intended send time, for open-loop runs, so a
    /// late send counts against the latency).
    pub async fn send(&self, sent: Instant) -> Outcome {
        let req = Request::get(self.url.clone())
            .header(http::header::HOST, self.host.clone())
            .body(Empty::new());
        let Ok(req) = req else {
            return failed(sent, "request");
        };
        let exchange = async {
            let rsp = match self.client.request(req).await {
                Ok(rsp) => rsp,
                Err(e) if e.is_connect() => return failed(sent, "connect"),
                Err(_) => return failed(sent, "request"),
            };
            let latency = sent.elapsed();
            let status = rsp.status().as_u16();
            let cold = rsp
                .headers()
                .get(COLD_START_HEADER)
                .is_some_and(|v| v == "true");
            let mut body = rsp.into_body();
            let mut error = None;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    error = Some("body");
                    break;
                }
            }
            Outcome {
                status: Some(status),
                latency,
                total: sent.elapsed(),
                cold,
                error,
            }
        };
        match tokio::time::timeout_at((sent + self.timeout).into(), exchange).await {
            Ok(outcome) => outcome,
            Err(_) => failed(sent, "timeout"),
        }
    }
}

fn failed(sent: Instant, error: &'static str) -> Outcome {
    let elapsed = sent.elapsed();
    Outcome {
        status: None,
        latency: elapsed,
        total: elapsed,
        cold: false,
        error: Some(error),
    }
}
