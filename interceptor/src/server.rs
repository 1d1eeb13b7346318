//! Accepting connections and serving them with hyper: every connection bounded in time and
//! number, and a graceful drain.
//!
//! Each connection is its own task, so a panic while handling one request ends that connection
//! only. A watchdog beside hyper closes a connection that has not completed a request head by the
//! header-read deadline (TLS handshake and HTTP/2 preface included), and one with no request in
//! flight for the idle timeout. On stop the listener is closed, idle connections are closed, and
//! connections with a request in flight finish it (under the drain deadline) before closing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_conn::ClientConn;
use crate::request_head::RequestHeads;

/// HTTP/2 keep-alive: a PING this often while a connection is open, and the connection is
/// dropped when the peer does not answer within [`H2_PING_TIMEOUT`]. Pings never count as
/// activity, so they cannot keep an idle connection open; they only find dead peers behind
/// long-lived streams.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// How long a PING may go unanswered.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection told to close gracefully (idle, or draining without a request) may
/// take to do so before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How a server's drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// Whether every connection finished before the deadline.
    pub complete: bool,
    /// Connections still open when the deadline passed.
    pub abandoned: usize,
}

/// Connection-level settings.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// Time from accept to the first complete request head (TLS handshake included), and for
    /// each later request head once its first byte arrived.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY first).
    pub idle_timeout: Duration,
    /// Largest header block accepted; larger ones get 431 (414 when the request line alone
    /// is that long).
    pub max_header_bytes: usize,
    /// The open-connection count and cap shared by the listeners this serves.
    pub connections: Arc<Connections>,
}

impl ConnectionSettings {
    /// Settings for an internal listener (the admin server, the example backend): the given
    /// header-read timeout, a 64 KiB header limit, a 5 minute idle timeout and 1,024
    /// connections, counted in metrics nobody registers.
    pub fn internal(header_read_timeout: Duration) -> Self {
        Self {
            header_read_timeout,
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 64 * 1024,
            connections: Arc::new(Connections::new(1024)),
        }
    }
}

/// Why a connection was closed by a limit, as the metric's `reason` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head by the header-read deadline.
    HeaderReadTimeout,
    /// No request in flight for the idle timeout.
    IdleTimeout,
    /// Accepted past `--max-client-connections`, and closed at once.
    ConnectionLimit,
}

impl CloseReason {
    /// The bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::HeaderReadTimeout => "header_read_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::ConnectionLimit => "connection_limit",
        }
    }
}

/// Open client connections, their cap, and the connections each limit closed. Shared by every
/// listener that serves clients (plaintext and TLS), so the cap is one number.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    open: IntGauge,
    closed: IntCounterVec,
}

impl Connections {
    /// A cap of `max` open connections, with metrics that are not registered anywhere.
    pub fn new(max: usize) -> Self {
        // Fixed names and labels: creating them cannot fail.
        #[allow(clippy::unwrap_used)]
        let open = IntGauge::new(
            "wakegate_client_connections_open",
            "Client connections open now",
        )
        .unwrap();
        #[allow(clippy::unwrap_used)]
        let closed = IntCounterVec::new(
            Opts::new(
                "wakegate_client_connections_closed_total",
                "Client connections closed by a limit: header_read_timeout, idle_timeout, connection_limit",
            ),
            &["reason"],
        )
        .unwrap();
        for reason in [
            CloseReason::HeaderReadTimeout,
            CloseReason::IdleTimeout,
            CloseReason::ConnectionLimit,
        ] {
            closed.with_label_values(&[reason.label()]);
        }
        Self { max, open, closed }
    }

    /// Registers the gauge and the counter into `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.open.clone()))?;
        registry.register(Box::new(self.closed.clone()))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        usize::try_from(self.open.get()).unwrap_or(0)
    }

    fn closed_by(&self, reason: CloseReason) {
        self.closed.with_label_values(&[reason.label()]).inc();
    }

    /// Counts a new connection in, unless the cap is reached.
    fn admit(self: &Arc<Self>) -> Option<OpenConnection> {
        // Accepts happen on one task per listener, but two listeners share the cap: counted
        // first, then checked, so they cannot both slip under it.
        let before = self.open.get();
        self.open.inc();
        if usize::try_from(before).unwrap_or(0) >= self.max {
            self.open.dec();
            self.closed_by(CloseReason::ConnectionLimit);
            return None;
        }
        Some(OpenConnection(self.clone()))
    }
}

/// One connection counted as open, until dropped.
struct OpenConnection(Arc<Connections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

/// What a connection's requests tell its watchdog and its request-line limit.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests whose response has not ended (or whose handler is still running).
    active: AtomicUsize,
    /// Whether a request head has been completed on this connection.
    seen_request: AtomicBool,
    /// Bumped whenever the next bytes read start a new request head (see `request_line`).
    pub(crate) heads: AtomicU64,
    /// Whether a request body may be arriving now (its bytes are not a request head).
    pub(crate) reading_body: AtomicBool,
    /// When bytes of a new request head began arriving on an idle connection.
    head_started: std::sync::Mutex<Option<Instant>>,
    /// Bumped when a request begins or ends: idle time counts from the last bump.
    events: AtomicU64,
    /// Wakes the watchdog on every change.
    changed: Notify,
}

impl Activity {
    /// Bytes were read from the client. On an idle connection that has served a request, they
    /// start the next head, and its header-read timeout.
    pub(crate) fn head_bytes_arrived(&self) {
        if self.active.load(Ordering::Acquire) > 0 || !self.seen_request.load(Ordering::Acquire) {
            return;
        }
        let mut started = self
            .head_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if started.is_none() {
            *started = Some(Instant::now());
            self.changed.notify_one();
        }
    }

    fn head_started(&self) -> Option<Instant> {
        *self
            .head_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(self: &Arc<Self>, has_body: bool) -> ActiveRequest {
        *self
            .head_started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.active.fetch_add(1, Ordering::AcqRel);
        self.seen_request.store(true, Ordering::Release);
        if has_body {
            self.reading_body.store(true, Ordering::Release);
        } else {
            // No body: whatever comes next is the next request's head.
            self.heads.fetch_add(1, Ordering::AcqRel);
        }
        self.events.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        ActiveRequest(self.clone())
    }
}

/// One request counted as active on its connection, until its response ends.
struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.reading_body.swap(false, Ordering::AcqRel)
        {
            // Nothing in flight after a request with a body: that body has been read (or the
            // connection will close), so the next bytes are a request head. (After a request
            // without one, the head began when it was handled.)
            self.0.heads.fetch_add(1, Ordering::AcqRel);
        }
        self.0.events.fetch_add(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as active on the connection until the
    /// body ends or is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        active: Option<ActiveRequest>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.active.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Binds a listener with a deep accept backlog: a burst of clients at a cold target all connect
/// at once.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves `handler` on `listener` until `stop`, then drains for at most `drain_timeout`. With
/// `tls`, each connection is a TLS handshake first (within the header-read deadline), then
/// HTTP/2 or HTTP/1.1 as ALPN (or, without ALPN, the connection preface) says.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: H,
    settings: ConnectionSettings,
    stop: CancellationToken,
    drain_timeout: Duration,
) -> Drain
where
    H: Fn(Request<Incoming>, ClientConn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Hyper's timer would start when a response ends and so close idle keep-alive
        // connections; the watchdog times heads from their first byte instead.
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let tracker = TaskTracker::new();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);

    loop {
        let (stream, remote) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors or a connection reset before accept: back off
                    // briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let accepted_at = Instant::now();
        // Past the cap the socket is closed at once: the connections already open keep being
        // served, and the file descriptor is returned before the next accept.
        let Some(open) = settings.connections.admit() else {
            tracing::debug!(%remote, "connection refused: --max-client-connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let (client, io) = ClientConn::new(stream, remote, tls.is_some());
        let activity = Arc::new(Activity::default());
        let service = {
            let activity = activity.clone();
            service_fn(move |req: Request<Incoming>| {
                let active = activity.begin(!req.body().is_end_stream());
                let rsp = AssertUnwindSafe(handler(req, client.clone())).catch_unwind();
                async move {
                    // A panic while handling one request answers that request with a 500 and
                    // ends nothing else: not the connection, not the process.
                    let rsp = rsp.await.unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(panic = %what, "request handler panicked");
                        let mut rsp = Response::new(B::default());
                        *rsp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        rsp
                    });
                    Ok::<_, Infallible>(rsp.map(|body| TrackedBody {
                        body,
                        active: Some(active),
                    }))
                }
            })
        };
        let builder = builder.clone();
        let settings = settings.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _open = open;
            // One deadline from accept to the first complete request head, whatever the
            // connection spends it on: the TLS handshake, the HTTP/2 preface, the head itself.
            let first_head = accepted_at + settings.header_read_timeout;
            let limit = settings.max_header_bytes;
            let io = match tls {
                None => Either::Left(io),
                Some(acceptor) => {
                    match tokio::time::timeout_at(first_head, acceptor.accept(io)).await {
                        Ok(Ok(io)) => Either::Right(io),
                        Ok(Err(err)) => {
                            tracing::debug!(%remote, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            settings
                                .connections
                                .closed_by(CloseReason::HeaderReadTimeout);
                            return;
                        }
                    }
                }
            };
            let io = RequestHeads::new(io, limit, activity.clone());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let served = watch(
                conn,
                |c| c.graceful_shutdown(),
                &activity,
                first_head,
                &settings,
                &stop,
            );
            if let Err(err) = served.await {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracker.close();

    match tokio::time::timeout(drain_timeout, tracker.wait()).await {
        Ok(()) => Drain {
            complete: true,
            abandoned: 0,
        },
        Err(_) => Drain {
            complete: false,
            abandoned: tracker.len(),
        },
    }
}

/// Drives `conn` to its end, closing it when a deadline passes: the first request head not
/// complete by `first_head` (dropped at once: nothing is in flight), or no request in flight
/// for the idle timeout (closed gracefully: HTTP/1.1 closes, HTTP/2 sends GOAWAY). `stop` closes
/// it gracefully too, once its requests are done.
async fn watch<C, E>(
    conn: C,
    shutdown: impl Fn(Pin<&mut C>),
    activity: &Activity,
    first_head: Instant,
    settings: &ConnectionSettings,
    stop: &CancellationToken,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let mut idle_since = Instant::now();
    let mut events = u64::MAX;
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        // Registered before the state is read, so no change is missed in between.
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let seen = activity.seen_request.load(Ordering::Acquire);
        let active = activity.active.load(Ordering::Acquire);
        let now_events = activity.events.load(Ordering::Acquire);
        if now_events != events {
            // A request began or ended since the last look: idle time counts from now.
            events = now_events;
            idle_since = Instant::now();
        }
        let head_started = activity.head_started();
        let deadline = match (closing, seen, active) {
            (Some(by), _, _) => Some(by),
            (None, false, _) => Some(first_head),
            // A head on its way has its own deadline; the connection is not idle meanwhile.
            (None, true, 0) => Some(
                head_started.map_or(idle_since + settings.idle_timeout, |at| {
                    at + settings.header_read_timeout
                }),
            ),
            (None, true, _) => None,
        };
        tokio::select! {
            result = conn.as_mut() => return result,
            () = changed => {}
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                shutdown(conn.as_mut());
            }
            () = sleep_until(deadline) => {
                if closing.is_some() {
                    // Told to close and still open: drop it.
                    return Ok(());
                }
                if !activity.seen_request.load(Ordering::Acquire) {
                    settings.connections.closed_by(CloseReason::HeaderReadTimeout);
                    return Ok(());
                }
                if activity.active.load(Ordering::Acquire) > 0 {
                    continue;
                }
                match activity.head_started() {
                    Some(at) if at + settings.header_read_timeout <= Instant::now() => {
                        // A head begun and not finished in time; nothing is in flight.
                        settings.connections.closed_by(CloseReason::HeaderReadTimeout);
                        return Ok(());
                    }
                    Some(_) => {}
                    None => {
                        settings.connections.closed_by(CloseReason::IdleTimeout);
                        shutdown(conn.as_mut());
                        closing = Some(Instant::now() + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_panicking_request_gets_500_and_the_next_one_is_served() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handler = |req: Request<Incoming>, _client: ClientConn| async move {
            assert!(req.uri().path() != "/panic", "handler bug on purpose");
            Response::new(Full::new(Bytes::from_static(b"fine")))
        };
        tokio::spawn(serve(
            listener,
            None,
            handler,
            ConnectionSettings::internal(Duration::from_secs(5)),
            stop.clone(),
            Duration::from_secs(1),
        ));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>();
        let get = |path: &'static str| {
            let client = client.clone();
            async move {
                let rsp = client
                    .get(format!("http://{addr}{path}").parse().unwrap())
                    .await
                    .unwrap();
                let status = rsp.status();
                (status, rsp.into_body().collect().await.unwrap().to_bytes())
            }
        };
        assert_eq!(
            get("/panic").await.0,
            http::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            get("/ok").await,
            (http::StatusCode::OK, Bytes::from_static(b"fine"))
        );
        stop.cancel();
    }
}
