//! A minimal HTTP/1.1 reverse proxy on hyper, the floor the proxy benchmarks compare Wakegate
//! with: each client connection gets one upstream connection (`hyper::client::conn::http1`),
//! and both are driven in the client connection's task, so a request costs no channel hop to
//! another task, no pool and no per-request timer.
//!
//! It does only what proxying needs (the body streams both ways; Host is kept). It has no
//! routing, no header rewriting and no limits: it is a yardstick, not a product.
//!
//! With `duties` it also does, per request, the work any proxy at the edge owes its users and
//! that Wakegate does too, each the plain way: the Host checked against its one route, the
//! hop-by-hop headers removed both ways, `X-Forwarded-For`, `-Proto` and `-Host` set, the
//! response marked `x-keda-http-cold-start: false`, and the request counted and timed (two
//! clock reads, an in-flight gauge, a counter and a histogram, recorded when the response body
//! ends). It sets no timers: so it is a lower bound of what those duties cost, and the rest of
//! Wakegate's cost over it is Wakegate's own machinery (pool, parking, deadlines, layering).
//!
//! ```text
//! hyper-proxy LISTEN_ADDR UPSTREAM_ADDR [duties]
//! ```
//!
//! Two binaries run it: `hyper-proxy` on the system allocator (glibc's), the floor as the
//! benchmarks define it, and `hyper-proxy-jemalloc` on jemalloc, the allocator Wakegate ships
//! with, so that the figures can also be read with the allocator's share taken out.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// The proxy's `main`: arguments from the command line, on a multi-thread runtime whose worker
/// count `TOKIO_WORKER_THREADS` sets.
#[tokio::main]
pub async fn run() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper-proxy LISTEN_ADDR UPSTREAM_ADDR [duties]");
        std::process::exit(2);
    };
    let duties = match args.next().as_deref() {
        None => None,
        Some("duties") => Some(Arc::new(Duties::new())),
        Some(other) => {
            eprintln!("hyper-proxy: unknown mode {other:?} (the one mode is `duties`)");
            std::process::exit(2);
        }
    };
    let parse = |what: &str, s: String| {
        s.parse::<SocketAddr>().unwrap_or_else(|e| {
            eprintln!("hyper-proxy: bad {what} address {s:?}: {e}");
            std::process::exit(2)
        })
    };
    let (listen, upstream) = (parse("listen", listen), parse("upstream", upstream));
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, peer) = listener.accept().await?;
        let duties = duties.clone();
        tokio::spawn(async move {
            let served = match duties {
                None => serve(client, upstream).await,
                Some(duties) => serve_with_duties(client, upstream, duties, peer).await,
            };
            if let Err(e) = served {
                eprintln!("hyper-proxy: {e}");
            }
        });
    }
}

/// Serves one client connection over one upstream connection, both in this task.
async fn serve(client: TcpStream, upstream: SocketAddr) -> Result<(), hyper::Error> {
    serve_over(client, upstream, |sender| {
        service_fn(move |req: Request<Incoming>| {
            let sender = sender.clone();
            async move {
                let mut sender: tokio::sync::MutexGuard<'_, Sender> = sender.lock().await;
                sender.ready().await?;
                let rsp: Response<Incoming> = sender.send_request(req).await?;
                Ok::<_, hyper::Error>(rsp)
            }
        })
    })
    .await
}

/// [`serve`], with the edge's duties done for every request (see the module's comment).
async fn serve_with_duties(
    client: TcpStream,
    upstream: SocketAddr,
    duties: Arc<Duties>,
    peer: SocketAddr,
) -> Result<(), hyper::Error> {
    // The client's address as the header names it, made once per connection.
    let forwarded_for = HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    serve_over(client, upstream, |sender| {
        service_fn(move |req: Request<Incoming>| {
            let sender = sender.clone();
            let duties = duties.clone();
            let forwarded_for = forwarded_for.clone();
            async move {
                let start = Instant::now();
                let (mut parts, body) = req.into_parts();
                let host = parts.headers.get(header::HOST).cloned();
                let routed = host
                    .as_ref()
                    .is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(duties.host.as_bytes()));
                if !routed {
                    let mut rsp = Response::new(Counted::new(None, start, &duties));
                    *rsp.status_mut() = http::StatusCode::NOT_FOUND;
                    return Ok(rsp);
                }
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
                parts
                    .headers
                    .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
                if let Some(host) = host {
                    parts.headers.insert(X_FORWARDED_HOST.clone(), host);
                }
                let req = Request::from_parts(parts, body);
                let mut sender: tokio::sync::MutexGuard<'_, Sender> = sender.lock().await;
                sender.ready().await?;
                let rsp: Response<Incoming> = sender.send_request(req).await?;
                let (mut parts, body) = rsp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .insert(COLD_START.clone(), HeaderValue::from_static("false"));
                Ok::<_, hyper::Error>(Response::from_parts(
                    parts,
                    Counted::new(Some(body), start, &duties),
                ))
            }
        })
    })
    .await
}

/// Connects to `upstream` and serves `client` with the service `make` builds over that one
/// connection, driving both in this task.
async fn serve_over<S, B>(
    client: TcpStream,
    upstream: SocketAddr,
    make: impl FnOnce(Arc<Mutex<Sender>>) -> S,
) -> Result<(), hyper::Error>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = client.set_nodelay(true);
    let Ok(up) = TcpStream::connect(upstream).await else {
        return Ok(());
    };
    let _ = up.set_nodelay(true);
    let (sender, up_conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    // HTTP/1.1 requests on one connection come one at a time, so the lock is never contended.
    let service = make(Arc::new(Mutex::new(sender)));
    let server = http1::Builder::new().serve_connection(TokioIo::new(client), service);
    tokio::select! {
        served = server => served,
        // The upstream closed: the client connection has nothing left to talk to.
        _ = up_conn => Ok(()),
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static COLD_START: HeaderName = HeaderName::from_static("x-keda-http-cold-start");

/// Removes the hop-by-hop headers, with one pass over the names present when there are none
/// (the common case), as any careful proxy does.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop = |name: &HeaderName| {
        matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
        )
    };
    if !headers.keys().any(hop) {
        return;
    }
    let present: Vec<HeaderName> = headers.keys().filter(|n| hop(n)).cloned().collect();
    for name in present {
        headers.remove(name);
    }
}

/// The request metrics, resolved once, and the one route's host.
struct Duties {
    host: String,
    in_flight: prometheus::IntGauge,
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
}

impl Duties {
    /// The metrics as a proxy keeps them: made once, each a handle updated per request (a
    /// registry would only read them when scraped, which the benchmark never does).
    fn new() -> Self {
        let opts = prometheus::HistogramOpts::new("duration", "request duration");
        Self {
            host: "bench.local".to_owned(),
            in_flight: prometheus::IntGauge::new("in_flight", "requests in flight")
                .unwrap_or_else(|e| fail(e)),
            requests: prometheus::IntCounter::new("requests", "requests")
                .unwrap_or_else(|e| fail(e)),
            duration: prometheus::Histogram::with_opts(opts).unwrap_or_else(|e| fail(e)),
        }
    }
}

fn fail(e: prometheus::Error) -> ! {
    eprintln!("hyper-proxy: metrics: {e}");
    std::process::exit(1)
}

/// A response body that records its request when it ends (or is dropped).
struct Counted {
    inner: Option<Incoming>,
    start: Instant,
    duties: Arc<Duties>,
}

impl Counted {
    fn new(inner: Option<Incoming>, start: Instant, duties: &Arc<Duties>) -> Self {
        duties.in_flight.inc();
        Self {
            inner,
            start,
            duties: duties.clone(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.duties.in_flight.dec();
        self.duties.requests.inc();
        self.duties
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Body for Counted {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
