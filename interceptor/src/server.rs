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
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_conn::{ClientConn, ClientIo};
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

/// A request's future, as a connection's service returns it.
type ServiceFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody<B>>, Infallible>> + Send>>;

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
    /// Who may park a new plaintext connection before hyper serves it (the proxy, for requests
    /// held at a cold target); `None` parks nothing.
    pub park: Option<Arc<dyn Park>>,
    /// A plaintext HTTP/1 keep-alive connection idle this long is taken back from hyper and
    /// parked as its bare socket until its next request head (needs `park`); `None` never.
    pub park_idle_after: Option<Duration>,
}

/// Parking a connection: a new plaintext connection whose first request head is complete in its
/// first bytes is shown to [`Park::park`] before hyper serves it. A request that would be held
/// for a cold target is then kept as its bare socket, with the head still unread in the kernel
/// (it was only peeked), until it can be served: no hyper connection, buffers or request future
/// exist for it meanwhile. Then hyper serves the connection as if it had just arrived, and the
/// first request carries what the parking left in its extensions.
pub trait Park: Send + Sync + 'static {
    /// A future that ends when the connection should be served (with extensions for its first
    /// request) or closed (`None`: the client went away); or `None` to serve it at once.
    fn park(
        &self,
        head: Request<()>,
        client: &ClientConn,
    ) -> Option<Pin<Box<dyn Future<Output = Option<http::Extensions>> + Send>>>;
}

impl std::fmt::Debug for dyn Park {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Park")
    }
}

/// Largest first read that parking looks at; a head longer than this is served by hyper at once.
const PEEK_BYTES: usize = 4096;

thread_local! {
    static PEEK: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; PEEK_BYTES].into_boxed_slice());
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
            park: None,
            park_idle_after: None,
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
    idle_parked: IntGauge,
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
        #[allow(clippy::unwrap_used)]
        let idle_parked = IntGauge::new(
            "wakegate_client_connections_idle_parked",
            "Idle keep-alive client connections parked now: kept as their bare socket, without hyper's buffers, until their next request",
        )
        .unwrap();
        Self {
            max,
            open,
            closed,
            idle_parked,
        }
    }

    /// Registers the gauge and the counter into `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.open.clone()))?;
        registry.register(Box::new(self.idle_parked.clone()))?;
        registry.register(Box::new(self.closed.clone()))
    }

    /// Idle keep-alive connections parked now (see `--park-idle-after`).
    pub fn idle_parked(&self) -> usize {
        usize::try_from(self.idle_parked.get()).unwrap_or(0)
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

/// Now, in milliseconds on the coarse monotonic clock: the precise clock's time at its last
/// tick (1-4 ms ago, as the kernel's tick rate goes), read without the timestamp counter, so at
/// a fraction of the precise clock's cost in a virtual machine. The watchdog's times are read
/// with it, twice per request: when a response ends and when the next head begins. They time
/// the idle and header-read timeouts and parking, whose settings are whole seconds or tenths,
/// so a tick's error is of no account. 0 if the clock cannot be read (never on Linux).
fn coarse_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let ms = u64::try_from(t.tv_nsec() / 1_000_000).unwrap_or(0);
        secs.saturating_mul(1000).saturating_add(ms)
    })
}

/// What a connection's requests tell its watchdog and its request-head watch. Written on every
/// request with plain atomics and read by the watchdog only when its timer fires: the watchdog
/// is never woken per request (that would re-poll the connection twice per request).
#[derive(Debug)]
pub(crate) struct Activity {
    /// The connection's start: times below are milliseconds since it, on the coarse clock
    /// (see [`coarse_ms`]).
    base: Instant,
    /// `base` on the coarse clock.
    base_coarse: u64,
    /// Requests whose response has not ended (or whose handler is still running).
    active: AtomicUsize,
    /// Whether a request head has been completed on this connection.
    seen_request: AtomicBool,
    /// Bumped whenever the next bytes read start a new request head (see `request_head`).
    pub(crate) heads: AtomicU64,
    /// Whether a request body may be arriving now (its bytes are not a request head).
    pub(crate) reading_body: AtomicBool,
    /// One more than the time the connection last went idle (0: never).
    idle_since: AtomicU64,
    /// One more than the time bytes of a new head began arriving on an idle connection (0:
    /// none since the last request began).
    head_started: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            base_coarse: coarse_ms(),
            active: AtomicUsize::new(0),
            seen_request: AtomicBool::new(false),
            heads: AtomicU64::new(0),
            reading_body: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        coarse_ms()
            .saturating_sub(self.base_coarse)
            .min(u64::MAX - 1)
            .saturating_add(1)
    }

    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp > 0).then(|| self.base + Duration::from_millis(stamp - 1))
    }

    /// Bytes were read from the client. On an idle connection that has served a request, they
    /// start the next head, and its header-read timeout.
    pub(crate) fn head_bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) > 0
            || self.head_started.load(Ordering::Relaxed) != 0
            || !self.seen_request.load(Ordering::Relaxed)
        {
            return;
        }
        let _ =
            self.head_started
                .compare_exchange(0, self.now(), Ordering::AcqRel, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>, has_body: bool) -> ActiveRequest {
        self.head_started.store(0, Ordering::Release);
        self.active.fetch_add(1, Ordering::AcqRel);
        self.seen_request.store(true, Ordering::Release);
        if has_body {
            self.reading_body.store(true, Ordering::Release);
        } else {
            // No body: whatever comes next is the next request's head.
            self.heads.fetch_add(1, Ordering::AcqRel);
        }
        ActiveRequest(self.clone())
    }
}

/// One request counted as active on its connection, until its response ends.
struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.idle_since.store(activity.now(), Ordering::Release);
        if activity.active.fetch_sub(1, Ordering::AcqRel) == 1
            && activity.reading_body.swap(false, Ordering::AcqRel)
        {
            // Nothing in flight after a request with a body: that body has been read (or the
            // connection will close), so the next bytes are a request head. (After a request
            // without one, the head began when it was handled.)
            activity.heads.fetch_add(1, Ordering::AcqRel);
        }
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
    H: Fn(Request<Incoming>, ClientConn) -> F + Clone + Send + Sync + Unpin + 'static,
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
    // The same HTTP/1 settings, for connections known to be HTTP/1 (their head was parsed while
    // parked), whose sessions can end to park them when idle.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    let tracker = TaskTracker::new();
    // What every connection needs of the listener, shared: each connection's task holds one
    // handle to it rather than its own copies (the two builders alone are 344 bytes), and the
    // task is memory per open connection.
    let shared = Arc::new(Listening {
        builder,
        http1,
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        handler,
        settings,
        stop: ServerStop::new(),
    });

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
        let Some(open) = shared.settings.connections.admit() else {
            tracing::debug!(%remote, "connection refused: --max-client-connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, io) = ClientConn::new(stream, remote, shared.tls.is_some());
        let shared = shared.clone();
        tracker.spawn(async move {
            let _open = open;
            let Listening {
                builder,
                http1,
                tls,
                handler,
                settings,
                stop,
            } = &*shared;
            // One deadline from accept to the first complete request head, whatever the
            // connection spends it on: the TLS handshake, the HTTP/2 preface, the head itself.
            let mut first_head = accepted_at + settings.header_read_timeout;
            // Once hyper's session on an idle keep-alive connection ended to park it: since
            // when the connection has been idle.
            let mut idle_since = None;
            let mut io = io;
            loop {
                let activity = Arc::new(Activity::new());
                let mut parked = None;
                let mut is_http1 = idle_since.is_some();
                if let (None, Some(park)) = (tls, &settings.park) {
                    // The wait for a head is boxed like the session below, so that the task
                    // keeps room for neither: a connection is in one or the other.
                    let parking = match idle_since {
                        None => {
                            Box::pin(park_first(park.as_ref(), &client, first_head, None)).await
                        }
                        Some(since) => {
                            let deadline = since + settings.idle_timeout;
                            settings.connections.idle_parked.inc();
                            let parking =
                                Box::pin(park_first(park.as_ref(), &client, deadline, Some(&stop.token)))
                                    .await;
                            settings.connections.idle_parked.dec();
                            parking
                        }
                    };
                    match parking {
                        Parking::Serve { extensions, http1 } => {
                            if extensions.is_some() {
                                io.after_parking();
                            }
                            parked = extensions;
                            is_http1 |= http1;
                            if http1 || idle_since.is_some() {
                                // The head is complete (it was peeked), and hyper reads it at
                                // once; or an idle keep-alive connection's next head has begun.
                                // A new connection's anything else keeps the deadline it had
                                // since accept: one silent until then is closed at it, not
                                // given a second one.
                                first_head =
                                    first_head.max(Instant::now() + settings.header_read_timeout);
                            }
                        }
                        Parking::Close => return,
                        Parking::IdleTimeout => {
                            settings.connections.closed_by(CloseReason::IdleTimeout);
                            return;
                        }
                    }
                }
                let session = Session {
                    client: &client,
                    activity,
                    parked,
                    first_head,
                    settings,
                    stop,
                };
                // Served in a future of its own, boxed: a parked connection's task holds only
                // what parking needs, not room for hyper's connection.
                let back = if is_http1 && settings.park_idle_after.is_some() {
                    Box::pin(session.serve_http1(io, http1, handler.clone())).await
                } else {
                    Box::pin(session.serve_any(io, tls.clone(), builder, handler.clone())).await;
                    None
                };
                match back {
                    Some((back, since)) => {
                        tracing::trace!(remote = %client.remote(), "idle keep-alive connection parked");
                        client.forget_header_timer();
                        io = back;
                        idle_since = Some(since);
                    }
                    None => return,
                }
            }
        });
    }
    drop(listener);
    shared.stop.stop();
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

/// The listener's stop as its connections see it: a flag, which a connection reads on every poll
/// without a lock (a token's `is_cancelled` takes a mutex that every connection on every core
/// shares), and a token, whose waiter each connection registers once to be woken. The flag is
/// set before the token wakes anyone, so a connection woken by it finds it set.
struct ServerStop {
    stopped: AtomicBool,
    token: CancellationToken,
}

impl ServerStop {
    fn new() -> Self {
        Self {
            stopped: AtomicBool::new(false),
            token: CancellationToken::new(),
        }
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// A listener's settings and handler, shared by its connections.
struct Listening<H> {
    /// Serves a connection whose protocol is still to be told (TLS, or parking off).
    builder: auto::Builder<TokioExecutor>,
    /// Serves a plaintext connection known to be HTTP/1 (its head was parsed while parked).
    http1: hyper::server::conn::http1::Builder,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    settings: ConnectionSettings,
    stop: ServerStop,
}

/// How parking a connection ended.
enum Parking {
    /// Serve it; its first request gets these extensions. `http1`: its head parsed as
    /// HTTP/1.x, so it is served without HTTP/2's detection (and may be parked again when idle).
    Serve {
        extensions: Option<http::Extensions>,
        http1: bool,
    },
    /// The client went away while it was parked.
    Close,
    /// An idle keep-alive connection, parked, reached its idle timeout.
    IdleTimeout,
}

/// What serves a connection's requests (the proxy, the admin API, the example backend).
trait Handler<F>:
    Fn(Request<Incoming>, ClientConn) -> F + Clone + Send + Sync + Unpin + 'static
{
}
impl<H, F> Handler<F> for H where
    H: Fn(Request<Incoming>, ClientConn) -> F + Clone + Send + Sync + Unpin + 'static
{
}

/// The response bodies a handler may answer with.
trait ResponseBody:
    Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Default + Send + 'static
{
}
impl<B> ResponseBody for B where
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Default
        + Send
        + 'static
{
}

/// One hyper session on a client connection: from a first head to the connection's end, or
/// until the connection, idle, is taken back to be parked.
struct Session<'a> {
    client: &'a ClientConn,
    activity: Arc<Activity>,
    parked: Option<http::Extensions>,
    first_head: Instant,
    settings: &'a ConnectionSettings,
    stop: &'a ServerStop,
}

impl<'a> Session<'a> {
    /// Serves the connection (TLS or not, HTTP/1 or HTTP/2) to its end.
    // Not an async fn: that would hold `self` twice, as an argument and as a local.
    #[allow(clippy::manual_async_fn)]
    fn serve_any<H, F, B>(
        self,
        io: ClientIo,
        tls: Option<tokio_rustls::TlsAcceptor>,
        builder: &'a auto::Builder<TokioExecutor>,
        handler: H,
    ) -> impl Future<Output = ()> + 'a
    where
        H: Handler<F> + 'a,
        F: Future<Output = Response<B>> + Send + 'static,
        B: ResponseBody,
    {
        async move {
            // Each request's future is boxed here: hyper's HTTP/1 server keeps room for its
            // service's future for the connection's whole life, and these sessions keep idle
            // keep-alive connections in hyper (TLS, parking off), which would otherwise each hold
            // the size of a request future for nothing.
            let request = request_fn(handler, self.parked, &self.activity, self.client);
            let service = service_fn(move |req| -> ServiceFuture<B> { Box::pin(request(req)) });
            let limit = self.settings.max_header_bytes;
            let io = match tls {
                None => Either::Left(io),
                Some(acceptor) => {
                    match tokio::time::timeout_at(self.first_head, acceptor.accept(io)).await {
                        Ok(Ok(io)) => Either::Right(io),
                        Ok(Err(err)) => {
                            tracing::debug!(remote = %self.client.remote(), error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(remote = %self.client.remote(), "TLS handshake timed out");
                            self.settings
                                .connections
                                .closed_by(CloseReason::HeaderReadTimeout);
                            return;
                        }
                    }
                }
            };
            let io = RequestHeads::new(io, limit, self.activity.clone());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            let served = watch(
                conn.as_mut(),
                |c| c.graceful_shutdown(),
                &self.activity,
                self.client,
                self.first_head,
                self.settings,
                self.stop,
                None,
            );
            if let Err(err) = served.await {
                tracing::debug!(remote = %self.client.remote(), error = %err, "connection ended with an error");
            }
        }
    }

    /// Serves a plaintext HTTP/1 connection until it ends, or until it has been idle for
    /// `--park-idle-after`: then hyper's session ends with the socket open, and the socket
    /// comes back, with the moment it went idle, to be parked.
    // Not an async fn: that would hold `self` twice, as an argument and as a local.
    #[allow(clippy::manual_async_fn)]
    fn serve_http1<H, F, B>(
        self,
        io: ClientIo,
        http1: &'a hyper::server::conn::http1::Builder,
        handler: H,
    ) -> impl Future<Output = Option<(ClientIo, Instant)>> + 'a
    where
        H: Handler<F> + 'a,
        F: Future<Output = Response<B>> + Send + 'static,
        B: ResponseBody,
    {
        // The connection is made here, not in the future below, which then keeps room only for
        // what it still needs (a future keeps room for everything it captures, used up or not).
        let Session {
            client,
            activity,
            parked,
            first_head,
            settings,
            stop,
        } = self;
        // Each request's future is kept unboxed, in the room hyper keeps for it: that room
        // lives only while the connection is busy (it goes with hyper's state when the
        // connection is parked), so a request costs no allocation of its future.
        let service = service_fn(request_fn(handler, parked, &activity, client));
        let io = RequestHeads::new(io, settings.max_header_bytes, activity.clone());
        let mut conn = http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        async move {
            let served = watch(
                Pin::new(&mut conn),
                |c| c.graceful_shutdown(),
                &activity,
                client,
                first_head,
                settings,
                stop,
                settings.park_idle_after,
            )
            .await;
            if let Err(err) = served {
                tracing::debug!(remote = %client.remote(), error = %err, "connection ended with an error");
            }
            if !client.take_idle_parked() {
                return None;
            }
            let parts = conn.into_parts()?;
            // Hyper asked for more bytes only with none of the next request buffered.
            if !parts.read_buf.is_empty() {
                return None;
            }
            let idle_since = activity
                .at(activity.idle_since.load(Ordering::Acquire))
                .unwrap_or_else(Instant::now);
            Some((parts.io.into_inner().into_inner(), idle_since))
        }
    }
}

/// The service hyper calls for each request of a session: the handler, with the parked
/// extensions on the first request and the connection's activity tracked, and a panic
/// answered by a 500.
fn request_fn<H, F, B>(
    handler: H,
    parked: Option<http::Extensions>,
    activity: &Arc<Activity>,
    client: &ClientConn,
) -> impl Fn(Request<Incoming>) -> Handled<F, B> + Send + Sync + Unpin + 'static
where
    H: Handler<F>,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Default + Send + 'static,
{
    let first = std::sync::Mutex::new(parked);
    let activity = activity.clone();
    let client = client.clone();
    move |mut req: Request<Incoming>| {
        if let Some(parked) = first.lock().ok().and_then(|mut p| p.take()) {
            req.extensions_mut().extend(parked);
        }
        let active = activity.begin(!req.body().is_end_stream());
        Handled {
            handler: AssertUnwindSafe(handler(req, client.clone())).catch_unwind(),
            active: Some(active),
            body: std::marker::PhantomData,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's future as hyper polls it. A future of its own, not an async block: a block
    /// awaiting the handler's future would hold it twice (as its capture and as its awaitee).
    struct Handled<F, B> {
        #[pin]
        handler: futures_util::future::CatchUnwind<AssertUnwindSafe<F>>,
        active: Option<ActiveRequest>,
        body: std::marker::PhantomData<fn() -> B>,
    }
}

impl<F, B> Future for Handled<F, B>
where
    F: Future<Output = Response<B>>,
    B: Default,
{
    type Output = Result<Response<TrackedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = std::task::ready!(this.handler.poll(cx));
        // A panic while handling one request answers that request with a 500 and ends
        // nothing else: not the connection, not the process.
        let rsp = rsp.unwrap_or_else(|panic| {
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
        let active = this.active.take();
        Poll::Ready(Ok(rsp.map(|body| TrackedBody { body, active })))
    }
}

/// Peeks at a connection's first bytes (until `deadline`) and, if they hold a complete
/// request head that `park` wants, waits as it says. Anything else is served at once: a head
/// split over several reads, an HTTP/2 preface, garbage (hyper then answers it).
///
/// `idle` is set for a keep-alive connection parked while idle, waiting for its next head:
/// then the deadline is its idle timeout, and `stop` (the server's) closes it at once while no
/// head has come; a request it then holds is not cut by `stop`, as no held request is.
async fn park_first(
    park: &dyn Park,
    client: &ClientConn,
    deadline: Instant,
    idle: Option<&CancellationToken>,
) -> Parking {
    enum Peeked {
        Head(Box<Request<()>>),
        Closed,
        Other,
    }
    // The bytes are peeked into a per-thread buffer and parsed at once, so nothing of them is
    // kept across a wait.
    let peeked = std::future::poll_fn(|cx| {
        PEEK.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut read = tokio::io::ReadBuf::new(&mut buf[..]);
            match client.poll_peek(cx, &mut read) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Peeked::Other),
                Poll::Ready(Ok(0)) => Poll::Ready(Peeked::Closed),
                Poll::Ready(Ok(_)) => {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut parsed = httparse::Request::new(&mut headers);
                    Poll::Ready(match parsed.parse(read.filled()) {
                        Ok(httparse::Status::Complete(_)) => {
                            head_of(&parsed).map_or(Peeked::Other, |h| Peeked::Head(Box::new(h)))
                        }
                        _ => Peeked::Other,
                    })
                }
            }
        })
    });
    let stopped = async {
        match idle {
            Some(stop) => stop.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let peeked = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, peeked) => peeked,
        () = stopped => return Parking::Close,
    };
    let head = match (peeked, idle) {
        (Ok(Peeked::Head(head)), _) => head,
        (Ok(Peeked::Closed), _) => return Parking::Close,
        // Not a whole HTTP/1 head, or a new connection's first-head deadline: hyper serves it
        // (and that deadline closes it).
        (Ok(Peeked::Other), _) | (Err(_), None) => {
            return Parking::Serve {
                extensions: None,
                http1: false,
            }
        }
        (Err(_), Some(_)) => return Parking::IdleTimeout,
    };
    match park.park(*head, client) {
        None => Parking::Serve {
            extensions: None,
            http1: true,
        },
        Some(wait) => match wait.await {
            Some(extensions) => Parking::Serve {
                extensions: Some(extensions),
                http1: true,
            },
            None => Parking::Close,
        },
    }
}

/// A parsed head as an `http::Request`, if every part of it is valid there (hyper checks it
/// again when it serves the connection).
fn head_of(parsed: &httparse::Request<'_, '_>) -> Option<Request<()>> {
    let mut req = Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .version(match parsed.version? {
            0 => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    for h in parsed.headers.iter() {
        req = req.header(h.name, h.value);
    }
    req.body(()).ok()
}

/// Drives `conn` to its end, closing it when a deadline passes: the first request head not
/// complete by `first_head` (dropped at once: nothing is in flight), a later head not complete
/// within the header-read timeout of its first byte (dropped), or no request in flight for the
/// idle timeout (closed gracefully: HTTP/1.1 closes, HTTP/2 sends GOAWAY). `stop` closes it
/// gracefully too, once its requests are done.
///
/// One timer, re-armed only when it fires: it then reads the connection's [`Activity`] and
/// either acts or sleeps until the next moment something could be due. While requests are in
/// flight, or the connection is idle, it looks again at least every header-read timeout, so a
/// head that starts on an idle connection is cut within that time of its deadline.
///
/// The same timer keeps an HTTP/1 request's response-header deadline when the request finds it
/// set to fire no later (see `HeaderTimer::expire_at`): so `client` is told each time it is set.
/// `idle_park`: park the connection after it has been idle this long.
// Not an async fn: that would keep each argument twice, as an argument and as a local.
#[allow(clippy::too_many_arguments)] // two call sites; a struct would only rename them
#[allow(clippy::manual_async_fn)]
fn watch<'a, C, E>(
    mut conn: Pin<&'a mut C>,
    shutdown: impl Fn(Pin<&mut C>) + 'a,
    activity: &'a Activity,
    client: &'a ClientConn,
    first_head: Instant,
    settings: &'a ConnectionSettings,
    stop: &'a ServerStop,
    idle_park: Option<Duration>,
) -> impl Future<Output = Result<(), E>> + 'a
where
    C: Future<Output = Result<(), E>> + ?Sized + 'a,
    E: 'a,
{
    async move {
        // Where idle connections are parked, the watchdog looks at least this often, so that one
        // is parked soon after it goes idle (without being woken per request).
        let soon = |at: Instant| match idle_park {
            Some(after) => at.min(Instant::now() + after),
            None => at,
        };
        // While the watchdog runs, the client connection knows when its timer fires next.
        struct Watching<'a>(&'a ClientConn);
        impl Drop for Watching<'_> {
            fn drop(&mut self) {
                self.0.watchdog_at(None);
            }
        }
        let _watching = Watching(client);
        let arm = |timer: Pin<&mut tokio::time::Sleep>, at: Instant| {
            timer.reset(at);
            client.watchdog_at(Some(at));
        };
        let first = soon(first_head);
        client.watchdog_at(Some(first));
        let timer = tokio::time::sleep_until(first);
        tokio::pin!(timer);
        let cancelled = stop.token.cancelled();
        tokio::pin!(cancelled);
        let mut stop_registered = false;
        let mut timer_registered = false;
        let mut closing = false;
        let mut stopping = false;
        enum Event<R> {
            Served(R),
            Stop,
            Timer,
        }
        loop {
            // The connection first: nearly every poll is for it. Then the token and the timer, in
            // the same order every time.
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Event::Served(result));
                }
                // The token's waiter is registered once, with this task's waker, which stays valid
                // for the task's life (the connection is always driven by its own task); then a
                // poll only reads the flag. Polling the waiter again would take the token's lock on
                // every poll of the connection.
                if !stopping
                    && (stop.is_stopped()
                        || (!std::mem::replace(&mut stop_registered, true)
                            && cancelled.as_mut().poll(cx).is_ready()))
                {
                    return Poll::Ready(Event::Stop);
                }
                // The timer too is polled once each time it is set, which registers this task's
                // waker with it; then a poll only reads whether it has fired. A poll that found
                // the task's cooperative budget spent (a busy connection can spend it all) has
                // registered nothing, not even the timer's entry: it is polled again next time.
                let fired = if timer_registered {
                    timer.is_elapsed()
                } else {
                    let fired = timer.as_mut().poll(cx).is_ready();
                    timer_registered = fired || tokio::task::coop::has_budget_remaining();
                    fired
                };
                if fired {
                    Poll::Ready(Event::Timer)
                } else {
                    Poll::Pending
                }
            })
            .await;
            match event {
                Event::Served(result) => return result,
                Event::Stop => {
                    stopping = true;
                    shutdown(conn.as_mut());
                }
                Event::Timer => {
                    // Every way on from here sets the timer again (or returns).
                    timer_registered = false;
                    let now = Instant::now();
                    if closing {
                        // Told to close and still open: drop it.
                        return Ok(());
                    }
                    if !activity.seen_request.load(Ordering::Acquire) {
                        if now < first_head {
                            arm(timer.as_mut(), soon(first_head));
                            continue;
                        }
                        settings
                            .connections
                            .closed_by(CloseReason::HeaderReadTimeout);
                        return Ok(());
                    }
                    let look_again = now + settings.header_read_timeout;
                    if activity.active.load(Ordering::Acquire) > 0 {
                        // A response-header deadline kept here that has passed is marked (the
                        // request, polled next, answers 504); one still to come is looked at then.
                        let next = soon(look_again.min(now + settings.idle_timeout));
                        let next = client.response_due(now).map_or(next, |due| next.min(due));
                        arm(timer.as_mut(), next);
                        continue;
                    }
                    if let Some(at) = activity.at(activity.head_started.load(Ordering::Acquire)) {
                        let due = at + settings.header_read_timeout;
                        if due <= now {
                            // A head begun and not finished in time; nothing is in flight.
                            settings
                                .connections
                                .closed_by(CloseReason::HeaderReadTimeout);
                            return Ok(());
                        }
                        arm(timer.as_mut(), due);
                        continue;
                    }
                    let idle_since = activity
                        .at(activity.idle_since.load(Ordering::Acquire))
                        .unwrap_or(first_head);
                    let idle_due = idle_since + settings.idle_timeout;
                    if idle_due <= now {
                        settings.connections.closed_by(CloseReason::IdleTimeout);
                        shutdown(conn.as_mut());
                        closing = true;
                        arm(timer.as_mut(), now + CLOSE_GRACE);
                        continue;
                    }
                    let mut next = idle_due.min(look_again);
                    if let Some(after) = idle_park {
                        let park_due = idle_since + after;
                        if park_due <= now {
                            // Idle long enough: hyper's next read ends its session (the loop polls
                            // it at once), and the connection is parked without hyper's buffers.
                            client.ask_idle_park();
                        } else {
                            next = next.min(park_due);
                        }
                    }
                    arm(timer.as_mut(), next);
                }
            }
        }
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

    /// Reads from `conn` until the peer closes it, within `within`; returns what came.
    async fn read_to_close(conn: &mut tokio::net::TcpStream, within: Duration) -> String {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        tokio::time::timeout(within, conn.read_to_end(&mut got))
            .await
            .expect("the connection is closed in time")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A stop reaches a connection that hyper holds while it sleeps between requests, and
    /// one whose request is in flight once its response is out: both close at once, not at
    /// their idle timeout (5 minutes here), and the drain completes.
    #[tokio::test]
    async fn a_stop_closes_idle_and_busy_keep_alive_connections_gracefully() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let release = Arc::new(tokio::sync::Notify::new());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (release, arrived) = (release.clone(), arrived.clone());
            move |req: Request<Incoming>, _client: ClientConn| {
                let (release, arrived) = (release.clone(), arrived.clone());
                async move {
                    if req.uri().path() == "/slow" {
                        arrived.notify_one();
                        release.notified().await;
                    }
                    Response::new(Full::new(Bytes::from_static(b"fine")))
                }
            }
        };
        let served = tokio::spawn(serve(
            listener,
            None,
            handler,
            ConnectionSettings::internal(Duration::from_secs(60)),
            stop.clone(),
            Duration::from_secs(10),
        ));
        let head = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        // One connection served a request and sleeps in hyper, waiting for the next.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(head("/a").as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let mut first = String::new();
        while !first.ends_with("fine") {
            let n = idle.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the response: {first:?}");
            first.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // Another has a request in flight.
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        busy.write_all(head("/slow").as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), arrived.notified())
            .await
            .expect("the slow request reaches its handler");

        stop.cancel();
        assert_eq!(read_to_close(&mut idle, Duration::from_secs(5)).await, "");
        release.notify_one();
        let answer = read_to_close(&mut busy, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("fine"), "{answer}");
        let drain = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the server drains in time")
            .unwrap();
        assert!(drain.complete, "{drain:?}");
    }

    /// A connection that spends its task's whole cooperative budget on the poll that would
    /// register the watchdog's timer is still closed at its header-read deadline.
    #[tokio::test]
    async fn the_watchdog_fires_after_a_poll_that_spent_the_budget() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, remote) = listener.accept().await.unwrap();
        let (client, _io) = ClientConn::new(stream, remote, false);
        let settings = ConnectionSettings::internal(Duration::from_millis(50));
        let stop = ServerStop::new();
        let activity = Activity::new();
        // A connection that never ends, and whose first poll spends the budget as a busy one
        // does (reads and writes that each make progress).
        let mut first = true;
        let mut conn = std::pin::pin!(std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                while let Poll::Ready(progress) = tokio::task::coop::poll_proceed(cx) {
                    progress.made_progress();
                }
            }
            Poll::<Result<(), ()>>::Pending
        }));
        let served = watch(
            conn.as_mut(),
            |_| {},
            &activity,
            &client,
            Instant::now() + settings.header_read_timeout,
            &settings,
            &stop,
            None,
        );
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the watchdog closed the connection")
            .unwrap();
        assert_eq!(
            settings
                .connections
                .closed
                .with_label_values(&["header_read_timeout"])
                .get(),
            1
        );
    }
}
