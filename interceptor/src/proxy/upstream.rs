//! The way up: the request rewritten for its endpoint, and the clients that carry it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{header, HeaderValue, Method, Request, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::time::Instant;

use super::body::{self, MinRate, RequestBody};
use super::headers;
use super::{Proxy, RoutedAuthority};
use crate::client_conn::ClientConn;
use crate::connect::RetryingConnector;
use crate::provider::{Endpoint, Trust, UpstreamProtocol, UpstreamTls};

/// A pooled upstream client. Every client can speak TLS; only `https` URIs do. Shared behind an
/// `Arc`: a request holds its client while it waits for the response, and hyper-util's client
/// is a few hundred bytes of handles, each cloned on its own.
pub(super) type UpstreamClient = Arc<Client<HttpsConnector<RetryingConnector>, RequestBody>>;

/// What keys a pooled client: the protocol, and the TLS settings if any.
pub(super) type ClientKey = (UpstreamProtocol, Option<UpstreamTls>);

impl Proxy {
    /// The pooled client for `protocol` and `tls`, made on first use.
    pub(super) fn client_for(
        &self,
        clients: &mut HashMap<ClientKey, UpstreamClient>,
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
    ) -> UpstreamClient {
        let key = (protocol, tls.cloned());
        if let Some(client) = clients.get(&key) {
            return client.clone();
        }
        let client = self.build_client(protocol, tls, None);
        clients.insert(key, client.clone());
        client
    }

    /// The HTTP/2 client for `endpoint`, made on first use.
    pub(super) fn h2_client_for(
        &self,
        tls: Option<&UpstreamTls>,
        endpoint: &Endpoint,
    ) -> UpstreamClient {
        let key = ((UpstreamProtocol::H2c, tls.cloned()), endpoint.clone());
        if let Some(client) = self.h2_clients.get(&key) {
            return client.clone();
        }
        if self.h2_clients.len() >= 4096 {
            // Endpoints come and go with pods: forget them all now and then (requests in flight
            // hold their own clients; idle connections close on their own).
            self.h2_clients.clear();
        }
        let client = self.build_client(UpstreamProtocol::H2c, tls, Some(endpoint));
        self.h2_clients.insert(key, client.clone());
        client
    }

    pub(super) fn build_client(
        &self,
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
        pin: Option<&Endpoint>,
    ) -> UpstreamClient {
        let default_tls = UpstreamTls {
            server_name: None,
            trust: Trust::PublicRoots,
        };
        let connector = match crate::tls::upstream::client_config(tls.unwrap_or(&default_tls))
        {
            Ok(config) => HttpsConnectorBuilder::new().with_tls_config(config),
            Err(err) => {
                // Only reachable through a rustls bug (versions and provider are fixed):
                // fail closed, verifying against the public roots.
                tracing::error!(error = %err, "upstream TLS settings unusable; verifying against the public roots");
                HttpsConnectorBuilder::new().with_webpki_roots()
            }
        }
        .https_or_http();
        // The name checked is the configured one, else the upstream's host: for a pinned
        // client that is the endpoint's, not the routed authority its URIs carry.
        let name = tls
            .and_then(|t| t.server_name.as_deref())
            .or_else(|| pin.map(|e| e.authority().host()));
        let connector = match name.map(|n| ServerName::try_from(n.to_owned())) {
            Some(Ok(name)) => {
                connector.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            _ => connector,
        };
        let tcp = match pin {
            Some(endpoint) => {
                RetryingConnector::pinned(self.fresh.clone(), endpoint.authority().clone())
            }
            None => RetryingConnector::new(self.fresh.clone()),
        };
        let connector = match protocol {
            UpstreamProtocol::Http1 => connector.enable_http1().wrap_connector(tcp),
            UpstreamProtocol::H2c => connector.enable_http2().wrap_connector(tcp),
        };
        Arc::new(pooled(protocol).build(connector))
    }
}

/// Rewrites a client request for `endpoint`: the URI in the form its client takes (see
/// [`UriForm`]), HTTP/1.1, the routed authority as Host, hop-by-hop headers removed, forwarding
/// headers set, and the body watched on its way up.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
pub(super) fn upstream_request(
    req: Request<Incoming>,
    authority: RoutedAuthority,
    endpoint: &Endpoint,
    client: &ClientConn,
    trusted: bool,
    protocol: UpstreamProtocol,
    form: UriForm,
    min_body_rate: Option<MinRate>,
) -> (Request<RequestBody>, Option<Arc<body::BodyWatch>>) {
    let (mut parts, body) = req.into_parts();
    // Taken, not cloned: the value points into the client connection's read buffer, and the
    // request is the last to need it (see `Replay`).
    let host = authority.value;
    // gRPC streams may be quiet for minutes by design: no minimum rate for them. gRPC needs
    // `te: trailers` end to end; it is the one TE value HTTP/2 allows. Both are read in one
    // pass over the fields (a few), which costs less than two hashed lookups.
    // The first line of each counts, as `HeaderMap::get` reads it.
    let (mut grpc, mut te_trailers) = (None, None);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_TYPE {
            grpc.get_or_insert_with(|| value.as_bytes().starts_with(b"application/grpc"));
        } else if name == header::TE {
            te_trailers.get_or_insert_with(|| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
        }
    }
    let (grpc, te_trailers) = (grpc == Some(true), te_trailers == Some(true));
    let (body, watch) = RequestBody::new(body, min_body_rate.filter(|_| !grpc));
    if let UriForm::Absolute { tls } = form {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
        // HTTP/1.1 is sent in origin form with the Host header; the URI's authority picks the
        // pooled connection. HTTP/2 sends the URI's authority as `:authority`, so it is the
        // routed one (its client is pinned to the endpoint).
        uri.authority = match (protocol, host.as_ref().and_then(|h| h.to_str().ok())) {
            (UpstreamProtocol::H2c, Some(host)) => http::uri::Authority::try_from(host).ok(),
            _ => None,
        }
        .or_else(|| Some(endpoint.authority().clone()));
        uri.path_and_query = Some(path_of(&parts.uri));
        // Scheme, authority and path are all set, so this cannot fail.
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.version = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => {
            if te_trailers {
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            Version::HTTP_2
        }
    };
    // Routed by its one Host header, the request keeps it as it is: inserting the same value
    // again would cost a hashed lookup for nothing.
    match &host {
        Some(_) if authority.from_host => {}
        Some(host) => {
            parts.headers.insert(header::HOST, host.clone());
        }
        None => {
            parts.headers.remove(header::HOST);
        }
    }
    headers::set_forwarded(
        &mut parts.headers,
        client.forwarded_for(),
        trusted,
        if client.is_tls() { "https" } else { "http" },
        host.as_ref(),
    );
    (Request::from_parts(parts, body), watch)
}

/// `uri`'s path and query, `/` if it has none (an absolute URI without a path).
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// The form of the URI a rewritten request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UriForm {
    /// As the client sent it: a route's own pool writes the URI as given, and puts it in
    /// origin form only if the client used another (see `Http1Pool::send`). A client's
    /// HTTP/1.1 request line is in origin form already, so it goes up untouched.
    Client,
    /// Absolute, as hyper-util's client needs: its authority picks the pooled connection.
    Absolute { tls: bool },
}

/// A request head kept to send the request once more, owning its bytes.
///
/// A client's header values and path point into its connection's read buffer (hyper slices
/// them out of it). A copy sharing them would keep that buffer from being reused while the
/// request waits for its response, and hyper, reading on to notice the client leave, would
/// allocate another one for every request in flight. So the head is written out as an HTTP/1.1
/// head in one allocation, and read back with httparse only if the request is sent again.
///
/// Only hyper-util's client (TLS, h2c, failover) needs one made for each request: a route's
/// own pool keeps the head as hyper writes it (see [`SharedStream`]).
pub(super) struct Replay {
    head: Box<[u8]>,
    version: Version,
}

impl Replay {
    /// A copy of `req`'s head.
    pub(super) fn of<B>(req: &Request<B>) -> Self {
        const VERSION: &[u8] = b" HTTP/1.1\r\n";
        let fields: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        let uri = req.uri();
        // The exact length, so that the boxed slice is the allocation made here, not a copy
        // shrunk to fit.
        let len = req.method().as_str().len()
            + 1
            + uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path().len()
            + uri.query().map_or(0, |q| q.len() + 1)
            + VERSION.len()
            + fields
            + 2;
        let mut head = Vec::with_capacity(len);
        head.extend_from_slice(req.method().as_str().as_bytes());
        head.push(b' ');
        // The URI as `Uri`'s Display writes it, without the formatting machinery.
        if let Some(scheme) = uri.scheme() {
            head.extend_from_slice(scheme.as_str().as_bytes());
            head.extend_from_slice(b"://");
        }
        if let Some(authority) = uri.authority() {
            head.extend_from_slice(authority.as_str().as_bytes());
        }
        head.extend_from_slice(uri.path().as_bytes());
        if let Some(query) = uri.query() {
            head.push(b'?');
            head.extend_from_slice(query.as_bytes());
        }
        head.extend_from_slice(VERSION);
        for (name, value) in req.headers() {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        debug_assert_eq!(
            head.len(),
            head.capacity(),
            "a replay's length is counted exactly"
        );
        Self {
            head: head.into_boxed_slice(),
            version: req.version(),
        }
    }

    /// The request again, without a body; `None` if its head does not read back (it was
    /// written from valid parts, so this would be a bug, and the first failure is reported).
    pub(super) fn request(&self) -> Option<Request<RequestBody>> {
        read_back(&self.head, Some(self.version))
    }
}

/// The request an HTTP/1 request head (`head`) describes, without a body, in `version` or the
/// head's own. `None` if it does not parse, or is not a whole head.
fn read_back(head: &[u8], version: Option<Version>) -> Option<Request<RequestBody>> {
    // A field per line at most.
    let lines = head.iter().filter(|&&b| b == b'\n').count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(_) = parsed.parse(head).ok()? else {
        return None;
    };
    let mut req = Request::new(RequestBody::empty());
    *req.method_mut() = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    *req.uri_mut() = Uri::try_from(parsed.path?).ok()?;
    *req.version_mut() = match (version, parsed.version?) {
        (Some(version), _) => version,
        (None, 0) => Version::HTTP_10,
        (None, _) => Version::HTTP_11,
    };
    let headers = req.headers_mut();
    headers.reserve(parsed.headers.len());
    for field in parsed.headers.iter() {
        headers.append(
            http::HeaderName::from_bytes(field.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(field.value).ok()?,
        );
    }
    Some(req)
}

/// Methods whose requests may be sent twice (RFC 9110 §9.2.2).
pub(super) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A client builder with the proxy's pool settings; HTTP/2 targets get HTTP/2 only.
pub(super) fn pooled(protocol: UpstreamProtocol) -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(protocol == UpstreamProtocol::H2c);
    builder
}
/// An upstream failure: the connection could not be made, or the exchange on it failed.
#[derive(Debug)]
pub(super) enum SendError {
    Connect(BoxError),
    Exchange(BoxError),
    /// The connection closed before any response to a request that may be sent once more
    /// (see [`Http1Pool::send`]): the failure, and the request again.
    Unanswered(BoxError, Box<Request<RequestBody>>),
}

/// What an upstream client's failure carries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl SendError {
    fn from_legacy(err: hyper_util::client::legacy::Error) -> Self {
        if err.is_connect() {
            Self::Connect(Box::new(err))
        } else {
            Self::Exchange(Box::new(err))
        }
    }

    /// The failure as an `Exchange`, and the request to send once more if it came with one.
    pub(super) fn take_again(self) -> (Self, Option<Request<RequestBody>>) {
        match self {
            Self::Unanswered(err, again) => (Self::Exchange(err), Some(*again)),
            other => (other, None),
        }
    }

    /// Whether the connection closed before a response began (not a connect failure, and not
    /// a response that broke off).
    pub(super) fn closed_before_response(&self) -> bool {
        let (Self::Exchange(err) | Self::Unanswered(err, _)) = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
        while let Some(e) = next {
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_canceled() {
                    return true;
                }
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                );
            }
            next = e.source();
        }
        false
    }
}

/// How a request reaches its endpoint.
pub(super) enum Upstream<'a> {
    /// Plaintext HTTP/1.1: a route's own pool of `client::conn` connections, each driven by
    /// the request using it, in its client connection's task.
    Http1(&'a Arc<Http1Pool>, &'a RetryingConnector),
    /// hyper-util's pooled client: TLS, h2c, upgrades and failover.
    Legacy(UpstreamClient),
}

impl<'a> Upstream<'a> {
    /// Sends `req` to `endpoint` and waits for the response head. An `Http1Conn` comes back
    /// with a response from the route's pool: the response body drives it. `now`: the time,
    /// if the caller has just read it.
    pub(super) fn send<'s>(
        &'s self,
        endpoint: &'s Endpoint,
        req: Request<RequestBody>,
        now: Option<Instant>,
    ) -> impl Future<Output = Result<(hyper::Response<Incoming>, Option<Http1Conn>), SendError>>
           + Send
           + use<'a, 's>
           + 's {
        // Either future as it is, not wrapped in an async block that would hold the request
        // a second time (see `Proxy::handle`).
        use futures_util::future::{Either, FutureExt};
        match self {
            Self::Legacy(client) => Either::Left(
                client
                    .request(req)
                    .map(|sent| sent.map(|rsp| (rsp, None)).map_err(SendError::from_legacy)),
            ),
            Self::Http1(pool, connector) => Either::Right(
                pool.send(connector, endpoint.authority(), req, now)
                    .map(|sent| sent.map(|(rsp, conn)| (rsp, Some(conn)))),
            ),
        }
    }
}

/// An idle upstream connection is dropped after this long unused (hyper-util's pool default
/// is the same).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept per endpoint; more are closed as they come back. Enough for a burst
/// of keep-alive clients, few enough to bound the file descriptors an idle route keeps.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

type Io = hyper_util::rt::TokioIo<SharedStream>;
type Sender = hyper::client::conn::http1::SendRequest<RequestBody>;
type Conn = Pin<Box<hyper::client::conn::http1::Connection<Io, RequestBody>>>;

/// The pool's map, by endpoint address. Its keys come from the provider, never from a client,
/// so it needs no DoS-resistant hash. Keyed by the address's text rather than its `Authority`:
/// that hashes and compares byte by byte, ignoring case, which made hashing the costlier part
/// of taking a connection and giving it back; an endpoint's text is always written the same.
type IdleMap = HashMap<Box<str>, Vec<Idle>, foldhash::fast::RandomState>;

/// A route's idle plaintext HTTP/1.1 connections, by endpoint. A connection is owned by one
/// request at a time and polled only by it, so no task or channel sits between a request and
/// its socket; the lock is taken once to take a connection and once to give it back.
#[derive(Default)]
pub(super) struct Http1Pool {
    idle: std::sync::Mutex<IdleMap>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").finish_non_exhaustive()
    }
}

struct Idle {
    sender: Sender,
    conn: Conn,
    /// The connection's socket, to ask whether anything arrived while it sat idle.
    socket: Arc<Socket>,
    since: Instant,
}

/// A pooled connection's socket: hyper reads and writes it through a [`SharedStream`], and
/// the pool keeps a second handle to look at its readiness without polling hyper's connection.
struct Socket {
    stream: tokio::net::TcpStream,
    /// The request handed to the connection next may be sent once more: its head is kept as
    /// it is written. Set by the request's send, cleared by that write.
    keep_head: std::sync::atomic::AtomicBool,
}

/// A pooled connection's socket as hyper reads and writes it.
///
/// It keeps the head of a request that may be sent once more, as it goes out: hyper writes a
/// request head whole, in its first write, and a request without a body is nothing else. A
/// copy of the head made for every request, in case the upstream closes the connection before
/// answering, cost about 900 instructions per request (3% of a request's user-space work: a
/// field at a time, and an allocation); this is one copy of bytes already laid out, into a
/// buffer the connection keeps.
/// The head is read back only if the request is sent again (see [`Http1Pool::send`]).
struct SharedStream {
    socket: Arc<Socket>,
    /// The last head kept.
    head: Vec<u8>,
    /// A read waited for the head to be written (see `poll_read`).
    deferred: bool,
}

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let stream = &this.socket.stream;
        // A head to keep is about to be written. On an idle connection hyper reads before it
        // writes, to see whether the upstream closed it, and a close seen then would fail the
        // request unwritten, with nothing kept to send again (hyper's send gives no request
        // back). So that read waits, once, until the request is out; the socket still wakes
        // the task, and a close already there is read right after the write.
        if this
            .socket
            .keep_head
            .load(std::sync::atomic::Ordering::Relaxed)
            && !this.deferred
        {
            this.deferred = true;
            if stream.poll_read_ready(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        loop {
            std::task::ready!(stream.poll_read_ready(cx))?;
            let want = buf.remaining();
            let mut got = None;
            // As tokio's own reads do: a read that did not fill the buffer drained the socket,
            // so it clears the readiness it was woken for (the closure reports `WouldBlock`),
            // and the next read waits for an event rather than costing a failed `recv`.
            let result = stream.try_io(tokio::io::Interest::READABLE, || {
                let n = stream.try_read_buf(buf)?;
                got = Some(n);
                if n > 0 && n < want {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (result, got) {
                (_, Some(_)) | (Ok(()), None) => return Poll::Ready(Ok(())),
                (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        use std::sync::atomic::Ordering::Relaxed;
        let this = self.get_mut();
        // Only the task polling the connection sets the flag, just before the request is
        // handed over, and nothing else reads it: ordering does not matter.
        if this.socket.keep_head.load(Relaxed) {
            this.socket.keep_head.store(false, Relaxed);
            this.deferred = false;
            this.head.clear();
            for buf in bufs {
                this.head.extend_from_slice(buf);
            }
        }
        let stream = &this.socket.stream;
        loop {
            std::task::ready!(stream.poll_write_ready(cx))?;
            match stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        use std::os::fd::AsRawFd;
        let shut = nix::sys::socket::shutdown(
            self.socket.stream.as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        );
        Poll::Ready(match shut {
            Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            other => other.map_err(std::io::Error::from),
        })
    }
}

/// What an idle connection is worth to a request about to use it.
enum Revived {
    Usable(Live),
    /// Idle for the idle timeout or longer.
    Expired,
    /// Closed, or not ready for a request.
    Unusable,
}

/// `idle` as of `now`: usable, expired, or not usable. It is polled once: that notices a close
/// the upstream sent while it sat idle, and finishes the previous exchange's bookkeeping so
/// that it is ready.
///
/// Polled with a waker that does nothing: the request that takes the connection sends on it
/// and polls it with its own context at once, and a real waker registered here would only be
/// woken by that send, for a poll with nothing to do.
#[inline]
fn revive(idle: Idle, now: Instant, endpoint: &http::uri::Authority) -> Revived {
    let Idle {
        mut sender,
        mut conn,
        socket,
        since,
    } = idle;
    if now.saturating_duration_since(since) >= IDLE_TIMEOUT {
        return Revived::Expired;
    }
    let cx = &mut Context::from_waker(std::task::Waker::noop());
    // Nothing arrived on the socket since hyper last read it (no bytes, no close) and the
    // connection takes a request: it is usable as it is. Otherwise it is polled, which reads
    // what came and tells.
    let quiet = socket.stream.poll_read_ready(cx).is_pending()
        && matches!(sender.poll_ready(cx), Poll::Ready(Ok(())));
    let usable = quiet
        || (conn.as_mut().poll(cx).is_pending()
            && matches!(sender.poll_ready(cx), Poll::Ready(Ok(()))));
    if usable {
        return Revived::Usable((sender, conn, socket));
    }
    tracing::debug!(%endpoint, closed = sender.is_closed(), "idle upstream connection unusable");
    Revived::Unusable
}

/// Where a connection goes back to: its route's pool, under its endpoint.
struct Home {
    pool: Arc<Http1Pool>,
    endpoint: http::uri::Authority,
}

/// A worker thread's most recent connections back from responses, kept out of their pools for
/// the thread's next requests.
///
/// Under load a route's pool empties and refills with every request: a connection goes back
/// when a response ends, and a request on the same thread soon takes it again. Kept here, it is
/// taken without the pool's lock, which every worker thread shares, and without looking its
/// endpoint up in the pool's map, twice per request: like an allocator's per-thread cache in
/// front of its shared arenas. A request takes the newest kept for its route and endpoint (the
/// endpoint is still chosen by the route's balancing first); with none, it goes to the pool.
/// A thread keeps [`HOT_PER_THREAD`] at most, the oldest going back to its pool when another
/// comes, and gives all of them back whenever it runs out of work ([`give_back_thread_cache`],
/// run as the runtime parks the thread). So a thread with nothing to do keeps none, and the
/// pool's idle timeout and sweep see every idle connection as before; one taken from here is
/// checked as a pooled one is (the idle timeout, a close).
struct Hot {
    home: Home,
    idle: Idle,
}

/// Connections a worker thread keeps out of their pools at most (see [`Hot`]).
const HOT_PER_THREAD: usize = 16;

thread_local! {
    static HOT: std::cell::RefCell<std::collections::VecDeque<Hot>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

impl Hot {
    /// The newest connection this thread keeps that is `pool`'s to `endpoint`.
    fn take(pool: &Arc<Http1Pool>, endpoint: &http::uri::Authority) -> Option<Idle> {
        HOT.try_with(|kept| {
            let mut kept = kept.try_borrow_mut().ok()?;
            let goes = |hot: &Hot| {
                Arc::ptr_eq(&hot.home.pool, pool) && hot.home.endpoint.as_str() == endpoint.as_str()
            };
            // Usually the newest: a thread serving one route takes back what it just gave.
            if kept.back().is_some_and(goes) {
                return kept.pop_back().map(|hot| hot.idle);
            }
            let at = kept.iter().rposition(goes)?;
            kept.remove(at).map(|hot| hot.idle)
        })
        .ok()
        .flatten()
    }

    /// Keeps this connection for the thread's next requests; with [`HOT_PER_THREAD`] kept
    /// already, the oldest goes back to its pool, as of `now`. Without a cache (the thread is
    /// ending) this one goes there.
    fn keep(self, now: Instant) {
        let mut back = Some(self);
        let _ = HOT.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut() {
                if let Some(hot) = back.take() {
                    kept.push_back(hot);
                }
                if kept.len() > HOT_PER_THREAD {
                    back = kept.pop_front();
                }
            }
        });
        if let Some(hot) = back {
            hot.go_back(now);
        }
    }

    fn go_back(self, now: Instant) {
        let Hot { home, idle } = self;
        home.pool.checkin(&home.endpoint, idle, now);
    }
}

/// Gives every upstream connection this thread keeps out of its pool (a per-thread cache in
/// front of each route's HTTP/1 pool, for the thread's next requests) back to its pool. The
/// interceptor's runtime runs it each time a worker thread runs out of work, before the thread
/// parks.
pub fn give_back_thread_cache() {
    let _ = HOT.try_with(|kept| {
        // Given back in place: the cache keeps its allocation for the thread's next requests.
        let Ok(mut kept) = kept.try_borrow_mut() else {
            return;
        };
        if kept.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some(hot) = kept.pop_front() {
            hot.go_back(now);
        }
    });
}

impl Http1Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleMap> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection to `endpoint` that is still usable: this
    /// thread's own (see [`Hot`]), else the pool's.
    fn checkout(self: &Arc<Self>, endpoint: &http::uri::Authority, now: Instant) -> Option<Live> {
        if let Some(Revived::Usable(live)) =
            Hot::take(self, endpoint).map(|idle| revive(idle, now, endpoint))
        {
            return Some(live);
        }
        loop {
            let idle = {
                // An emptied list stays, with its allocation, for the connection to come back
                // to: under load a route's pool empties and refills with every request. The
                // sweep removes lists left empty.
                let mut idle = self.lock();
                idle.get_mut(endpoint.as_str())?.pop()?
            };
            match revive(idle, now, endpoint) {
                Revived::Usable(live) => return Some(live),
                Revived::Expired => {
                    // The rest are older still.
                    if let Some(list) = self.lock().get_mut(endpoint.as_str()) {
                        list.clear();
                    }
                    return None;
                }
                Revived::Unusable => {}
            }
        }
    }

    /// Takes back `idle`, a connection idle since its own `since`, as of `now`.
    fn checkin(&self, endpoint: &http::uri::Authority, idle: Idle, now: Instant) {
        let mut pool = self.lock();
        // Looked up by reference first: the key is made only for an endpoint new to the pool.
        let list = match pool.get_mut(endpoint.as_str()) {
            Some(list) => list,
            None => pool.entry(endpoint.as_str().into()).or_default(),
        };
        if list
            .first()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.since) >= IDLE_TIMEOUT)
        {
            list.retain(|c| now.saturating_duration_since(c.since) < IDLE_TIMEOUT);
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            // In the order they went idle (checkout takes the newest and, finding it expired,
            // drops the rest): one that waited in a thread's cache (see `Hot`) may be older
            // than the last one in.
            if list.last().is_none_or(|newest| newest.since <= idle.since) {
                list.push(idle);
            } else {
                let at = list.partition_point(|c| c.since <= idle.since);
                list.insert(at, idle);
            }
        }
    }

    /// Closes the connections idle for longer than the idle timeout, and forgets endpoints with
    /// none left.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            list.retain(|c| now.duration_since(c.since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    async fn connect(
        connector: &RetryingConnector,
        endpoint: &http::uri::Authority,
    ) -> Result<Live, SendError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(endpoint.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        let io = tower::Service::call(&mut connector.clone(), uri)
            .await
            .map_err(SendError::Connect)?;
        Self::handshake(io.into_inner()).await
    }

    /// A pooled connection over `stream`, connected.
    async fn handshake(stream: tokio::net::TcpStream) -> Result<Live, SendError> {
        let socket = Arc::new(Socket {
            stream,
            keep_head: false.into(),
        });
        let io = hyper_util::rt::TokioIo::new(SharedStream {
            socket: socket.clone(),
            head: Vec::new(),
            deferred: false,
        });
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        Ok((sender, Box::pin(conn), socket))
    }

    /// Sends `req` on an idle connection to `endpoint`, or a new one, driving the connection
    /// until the response head arrives. `now`: the time, if the caller has just read it.
    fn send<'s>(
        self: &'s Arc<Self>,
        connector: &'s RetryingConnector,
        endpoint: &'s http::uri::Authority,
        mut req: Request<RequestBody>,
        now: Option<Instant>,
    ) -> PoolSend<'s, impl Future<Output = hyper::Result<hyper::Response<Incoming>>> + Send> {
        // `client::conn` writes the URI as given, and the request line wants origin form: a
        // client's HTTP/1.1 request is in it already; an absolute-form one, or an HTTP/2 one
        // (whose URI carries `:scheme` and `:authority`), is put in it.
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            *req.uri_mut() = Uri::from(path_of(req.uri()));
        }
        let send = |sender: &mut Sender, req| sender.send_request(req);
        let bodiless = http_body::Body::is_end_stream(req.body());
        // Sent once more if the connection closes before any response (see `Proxy::forward`):
        // the connection keeps its head as it writes it.
        let replayable = bodiless && idempotent(req.method());
        // The connection is taken now, so that the request goes straight to it: the future
        // never keeps the request itself, only hyper's send of it (or, while a new connection
        // is dialled, a box).
        let state = match self.checkout(endpoint, now.unwrap_or_else(Instant::now)) {
            Some(idle) => SendState::sending(send, idle, req, replayable),
            None => {
                let connector = connector.clone();
                let endpoint = endpoint.clone();
                let connecting =
                    Box::pin(async move { Http1Pool::connect(&connector, &endpoint).await });
                SendState::Dialling {
                    req: Some(Box::new(req)),
                    connecting,
                }
            }
        };
        PoolSend {
            pool: self,
            endpoint,
            send,
            bodiless,
            replayable,
            sent: false,
            state,
        }
    }
}

/// A pooled connection: its sender, the connection itself, and its socket.
type Live = (Sender, Conn, Arc<Socket>);

/// A connection being dialled.
type Connecting = Pin<Box<dyn Future<Output = Result<Live, SendError>> + Send>>;

pin_project_lite::pin_project! {
    /// A request on its way up through a route's pool, until its response head arrives.
    ///
    /// Written out rather than an async block: a block keeps the request it captured for its
    /// whole life, beside the send that took it over, and this future is part of every request
    /// in flight. Here a request goes to a pooled connection as the send is made; one that
    /// waits for a new connection waits boxed, beside the boxed dial (a few hundred bytes of
    /// state), so a request in flight carries only hyper's send.
    pub(super) struct PoolSend<'s, F> {
        pool: &'s Arc<Http1Pool>,
        endpoint: &'s http::uri::Authority,
        send: fn(&mut Sender, Request<RequestBody>) -> F,
        // The request has no body: once it is written, nothing but the response needs this
        // task woken (see `PoolSend::poll`).
        bodiless: bool,
        // The request is sent once more if the connection closes before any response.
        replayable: bool,
        // The connection has been polled since the request was handed to it.
        sent: bool,
        #[pin]
        state: SendState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = SendProj]
    enum SendState<F> {
        /// No idle connection: a new one is being dialled.
        Dialling { req: Option<Box<Request<RequestBody>>>, connecting: Connecting },
        /// The request is in the connection's hands, until it has `ended` (closed).
        Sending {
            #[pin]
            response: F,
            sender: Option<Sender>,
            conn: Option<(Conn, Arc<Socket>)>,
            ended: bool,
        },
        Done,
    }
}

impl<F> SendState<F> {
    /// `req` handed to the connection `(sender, conn, socket)`; its head is kept as it is
    /// written if it is `replayable`.
    fn sending(
        send: fn(&mut Sender, Request<RequestBody>) -> F,
        (mut sender, conn, socket): Live,
        req: Request<RequestBody>,
        replayable: bool,
    ) -> Self {
        socket
            .keep_head
            .store(replayable, std::sync::atomic::Ordering::Relaxed);
        Self::Sending {
            response: send(&mut sender, req),
            sender: Some(sender),
            conn: Some((conn, socket)),
            ended: false,
        }
    }
}

impl<F> Future for PoolSend<'_, F>
where
    F: Future<Output = hyper::Result<hyper::Response<Incoming>>>,
{
    type Output = Result<(hyper::Response<Incoming>, Http1Conn), SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                SendProj::Dialling { req, connecting } => {
                    let connected = std::task::ready!(connecting.as_mut().poll(cx));
                    match (connected, req.take()) {
                        (Ok(connected), Some(req)) => {
                            SendState::sending(*this.send, connected, *req, *this.replayable)
                        }
                        (Err(err), _) => {
                            this.state.set(SendState::Done);
                            return Poll::Ready(Err(err));
                        }
                        (Ok(_), None) => return Poll::Ready(Err(polled_after_completion())),
                    }
                }
                SendProj::Sending {
                    mut response,
                    sender,
                    conn,
                    ended,
                } => {
                    // The connection first: it writes the request and reads the response head
                    // into the send's channel, so a head that has arrived is taken in this
                    // poll. Only this future polls the connection until the head is here, so
                    // the channel can only fill during that call: it is looked at with a waker
                    // that does nothing, sparing the task a wakeup (and a poll through every
                    // layer above) for a head it has already taken.
                    //
                    // Once a bodiless request is written, this task is polled again only for
                    // the response, and the connection is polled first with that waker too.
                    // Hyper registers the waker it is polled with on the response body's
                    // channel and on its request queue, and wakes them from inside this task:
                    // when the body is taken, and when the connection, back in its pool, is
                    // sent its next request. Each wakeup is a poll of every layer for nothing.
                    // The socket is what must wake this task: a response not all in yet has
                    // the connection polled once more with the task's waker, which hyper then
                    // registers with the socket.
                    let quiet = &mut Context::from_waker(std::task::Waker::noop());
                    let first = if *this.bodiless && *this.sent {
                        &mut *quiet
                    } else {
                        &mut *cx
                    };
                    *this.sent = true;
                    poll_conn(conn, ended, first);
                    let mut polled = response.as_mut().poll(quiet);
                    if polled.is_pending() && !*ended && *this.bodiless {
                        poll_conn(conn, ended, cx);
                        polled = response.as_mut().poll(quiet);
                    }
                    let rsp = match polled {
                        Poll::Ready(rsp) => rsp,
                        // With the connection gone, only the channel's end can wake this.
                        Poll::Pending if *ended => std::task::ready!(response.as_mut().poll(cx)),
                        Poll::Pending => return Poll::Pending,
                    };
                    let rsp = match rsp {
                        Ok(rsp) => rsp,
                        Err(failed) => {
                            let err = SendError::Exchange(Box::new(failed));
                            let again = if *this.replayable && err.closed_before_response() {
                                conn.take().and_then(|(c, _)| kept_request(c))
                            } else {
                                None
                            };
                            this.state.set(SendState::Done);
                            return Poll::Ready(Err(match (err, again) {
                                (SendError::Exchange(err), Some(again)) => {
                                    SendError::Unanswered(err, Box::new(again))
                                }
                                (err, _) => err,
                            }));
                        }
                    };
                    let live = sender
                        .take()
                        .zip(conn.take())
                        .filter(|_| !*ended)
                        .map(|(sender, (conn, socket))| (sender, conn, socket));
                    this.state.set(SendState::Done);
                    let reusable = http_body::Body::is_end_stream(rsp.body());
                    return Poll::Ready(Ok((
                        rsp,
                        Http1Conn {
                            live,
                            home: Some(Home {
                                pool: this.pool.clone(),
                                endpoint: this.endpoint.clone(),
                            }),
                            reusable,
                            bodiless: *this.bodiless,
                        },
                    )));
                }
                SendProj::Done => return Poll::Ready(Err(polled_after_completion())),
            };
            this.state.set(next);
        }
    }
}

/// Polls a pooled connection while a request uses it, until it has ended (the response, or
/// why there is none, is final then).
fn poll_conn(conn: &mut Option<(Conn, Arc<Socket>)>, ended: &mut bool, cx: &mut Context<'_>) {
    if let (Some((c, _)), false) = (conn.as_mut(), *ended) {
        *ended = c.as_mut().poll(cx).is_ready();
    }
}

/// The request whose head `conn` kept as it wrote it (see [`SharedStream`]), read back; `None`
/// if it was never written.
fn kept_request(conn: Conn) -> Option<Request<RequestBody>> {
    let stream = (*Pin::into_inner(conn)).into_parts().io.into_inner();
    // Still set: the connection wrote nothing of this request (the head kept is an older one).
    if stream
        .socket
        .keep_head
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return None;
    }
    read_back(&stream.head, None)
}

/// What a [`PoolSend`] polled again after it finished answers (a bug in its caller).
fn polled_after_completion() -> SendError {
    SendError::Exchange("the upstream send was polled after it completed".into())
}

/// A connection carrying a response body: the body polls it, and it goes back to its pool when
/// the body has ended with the connection still open.
pub struct Http1Conn {
    /// `None` once the connection has closed.
    live: Option<Live>,
    /// Where it goes back to: `None` once it has.
    home: Option<Home>,
    reusable: bool,
    /// The request had no body: the connection only reads (see [`Http1Conn::poll_body`]).
    bodiless: bool,
}

impl Http1Conn {
    /// Drives the connection: reads the response body into its channel and writes what is
    /// left of the request body.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Some((_, conn, _)) = &mut self.live {
            if conn.as_mut().poll(cx).is_ready() {
                self.live = None;
            }
        }
    }

    /// The next frame of `body`, the response this connection carries, driving the connection
    /// as needed.
    ///
    /// With a request that had no body, only the response needs this task woken, and the
    /// socket does that: the body's channel is looked at with a waker that does nothing, and
    /// the connection is polled with the task's only when the channel has nothing yet. Hyper
    /// would wake a waker it was given, from inside this task, whenever it hands on a frame or
    /// one is taken (see [`PoolSend`]'s poll). A body that arrived with its head (a small
    /// response) is taken without polling the connection at all.
    pub(super) fn poll_body(
        &mut self,
        body: &mut Incoming,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        use http_body::Body;
        if !self.bodiless {
            self.poll(cx);
            return Pin::new(body).poll_frame(cx);
        }
        let quiet = &mut Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(quiet) {
            return Poll::Ready(frame);
        }
        self.poll(cx);
        // With the connection gone, its end closes the channel, and nothing else would wake
        // this task for it.
        let cx = if self.live.is_some() { quiet } else { cx };
        Pin::new(body).poll_frame(cx)
    }

    /// The response body ended at `now`: the connection goes back to its pool, if it is open.
    pub(super) fn body_ended_at(mut self, now: Instant) {
        self.reusable = true;
        self.home(now);
    }

    fn home(&mut self, now: Instant) {
        if let (true, Some(live)) = (self.reusable, self.live.take()) {
            if let (false, Some(home)) = (live.0.is_closed(), self.home.take()) {
                let (sender, conn, socket) = live;
                let idle = Idle {
                    sender,
                    conn,
                    socket,
                    since: now,
                };
                Hot { home, idle }.keep(now);
            }
        }
    }
}

impl Drop for Http1Conn {
    fn drop(&mut self) {
        // A response without a body (HEAD, 204, 304) is reusable from its head on, and its
        // body is dropped unpolled: the connection goes back from here.
        if self.reusable && self.live.is_some() {
            self.home(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use http::{HeaderValue, Method, Request, Version};

    use super::Replay;

    /// A head whose path and header values are slices of one buffer, as hyper parses them.
    fn parsed_like_hyper(buffer: &Bytes) -> Request<()> {
        let text = std::str::from_utf8(buffer).unwrap();
        let at = |s: &str| {
            let start = text.find(s).unwrap();
            buffer.slice(start..start + s.len())
        };
        let mut req = Request::new(());
        *req.method_mut() = Method::PUT;
        *req.uri_mut() = http::Uri::from_maybe_shared(at("/a/b?c=d%20e")).unwrap();
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        headers.append(
            "host",
            HeaderValue::from_maybe_shared(at("app.test")).unwrap(),
        );
        headers.append("x-tag", HeaderValue::from_maybe_shared(at("one")).unwrap());
        headers.append("x-tag", HeaderValue::from_maybe_shared(at("two")).unwrap());
        headers.append("x-note", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        req
    }

    #[test]
    fn a_replay_reads_back_the_head_it_copied() {
        let buffer = Bytes::from_static(b"/a/b?c=d%20e app.test one two");
        let original = parsed_like_hyper(&buffer);
        let again = Replay::of(&original).request().unwrap();
        assert_eq!(again.method(), original.method());
        assert_eq!(again.uri(), original.uri());
        assert_eq!(again.version(), original.version());
        assert_eq!(again.headers(), original.headers());
        let tags: Vec<_> = again.headers().get_all("x-tag").iter().collect();
        assert_eq!(tags, ["one", "two"]);
        // An absolute URI (the pooled client's form) and an extension method come back too.
        let mut absolute = Request::new(());
        *absolute.method_mut() = Method::from_bytes(b"PURGE").unwrap();
        *absolute.uri_mut() = "http://10.0.0.7:8080/x?y".parse().unwrap();
        let again = Replay::of(&absolute).request().unwrap();
        assert_eq!(again.method().as_str(), "PURGE");
        assert_eq!(again.uri(), absolute.uri());
        assert!(again.headers().is_empty());
    }

    /// A connection the upstream closed before a request was handed to it. Hyper would see
    /// the close before writing and fail the request unwritten; a request that may be sent
    /// once more is written first (its read waits for it), so it comes back whole with the
    /// failure, read from the head the connection kept. One that may not (a POST) comes back
    /// as the failure alone.
    #[tokio::test]
    async fn a_request_on_a_connection_closed_before_it_was_handed_over_comes_back_whole() {
        use std::sync::Arc;

        use super::{Http1Pool, PoolSend, SendError, SendState, Sender};
        use crate::proxy::body::RequestBody;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Arc::new(Http1Pool::default());
        let endpoint: http::uri::Authority = addr.to_string().parse().unwrap();
        for (method, replayable) in [(Method::GET, true), (Method::POST, false)] {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            drop(listener.accept().await.unwrap());
            // The close has arrived before the request is handed over.
            stream.readable().await.unwrap();
            let live = Http1Pool::handshake(stream).await.unwrap();
            let mut req = Request::new(RequestBody::empty());
            *req.method_mut() = method.clone();
            *req.uri_mut() = http::Uri::from_static("/items?page=2");
            req.headers_mut()
                .insert("x-tag", HeaderValue::from_static("one"));
            let send = |sender: &mut Sender, req| sender.send_request(req);
            let sent = PoolSend {
                pool: &pool,
                endpoint: &endpoint,
                send,
                bodiless: true,
                replayable,
                sent: false,
                state: SendState::sending(send, live, req, replayable),
            }
            .await;
            match (sent, replayable) {
                (Err(SendError::Unanswered(err, again)), true) => {
                    assert!(
                        SendError::Exchange(err).closed_before_response(),
                        "{method}"
                    );
                    assert_eq!(again.method(), method);
                    assert_eq!(again.uri(), "/items?page=2");
                    assert_eq!(again.headers()["x-tag"], "one");
                }
                (Err(err @ SendError::Exchange(_)), false) => {
                    assert!(err.closed_before_response(), "{method}: {err:?}");
                }
                (other, _) => panic!("{method}: {:?}", other.map(|(rsp, _)| rsp.status())),
            }
        }
    }

    #[test]
    fn a_replay_does_not_keep_the_clients_read_buffer() {
        let buffer = Bytes::from(b"/a/b?c=d%20e app.test one two".to_vec());
        let original = parsed_like_hyper(&buffer);
        assert!(!buffer.is_unique());
        let replay = Replay::of(&original);
        drop(original);
        // With only the copy left, the buffer is the connection's alone again, so hyper can
        // read the next bytes into it instead of allocating another.
        assert!(buffer.is_unique());
        assert!(replay.request().is_some());
    }

    /// A listening upstream, and its address as an endpoint.
    async fn upstream() -> (tokio::net::TcpListener, http::uri::Authority) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string().parse().unwrap();
        (listener, endpoint)
    }

    /// A live pooled connection to `listener`'s address; the upstream's side is kept open in
    /// `held`.
    async fn live(
        listener: &tokio::net::TcpListener,
        held: &mut Vec<tokio::net::TcpStream>,
    ) -> super::Live {
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        held.push(listener.accept().await.unwrap().0);
        super::Http1Pool::handshake(stream).await.unwrap()
    }

    /// `live` as idle since `since`, going back to `pool` under `endpoint`.
    fn hot(
        pool: &std::sync::Arc<super::Http1Pool>,
        endpoint: &http::uri::Authority,
        (sender, conn, socket): super::Live,
        since: tokio::time::Instant,
    ) -> super::Hot {
        super::Hot {
            home: super::Home {
                pool: pool.clone(),
                endpoint: endpoint.clone(),
            },
            idle: super::Idle {
                sender,
                conn,
                socket,
                since,
            },
        }
    }

    fn pooled(
        pool: &super::Http1Pool,
        endpoint: &http::uri::Authority,
    ) -> Vec<*const super::Socket> {
        pool.lock()
            .get(endpoint.as_str())
            .map_or_else(Vec::new, |list| {
                list.iter()
                    .map(|idle| std::sync::Arc::as_ptr(&idle.socket))
                    .collect()
            })
    }

    /// A thread's connections back stay out of their pool, for the thread's next requests to
    /// the same route and endpoint, newest first; past the cap the oldest goes back to its
    /// pool, and all go back when the thread runs out of work. (A current-thread runtime:
    /// every step runs on this thread.)
    #[tokio::test]
    async fn a_threads_connections_back_are_taken_by_its_next_requests_there() {
        use std::sync::Arc;

        use super::{give_back_thread_cache, revive, Hot, Http1Pool, Revived, HOT_PER_THREAD};

        let (upstream, endpoint) = upstream().await;
        let mut held = Vec::new();
        let elsewhere: http::uri::Authority = "127.0.0.1:9".parse().unwrap();
        let (pool, other_pool) = (
            Arc::new(Http1Pool::default()),
            Arc::new(Http1Pool::default()),
        );
        let now = tokio::time::Instant::now();

        let first = live(&upstream, &mut held).await;
        let first_socket = Arc::as_ptr(&first.2);
        hot(&pool, &endpoint, first, now).keep(now);
        assert!(
            pooled(&pool, &endpoint).is_empty(),
            "kept by the thread, not pooled"
        );
        // Another route's pool, or another endpoint, does not get it.
        assert!(Hot::take(&other_pool, &endpoint).is_none());
        assert!(Hot::take(&pool, &elsewhere).is_none());
        // The route's next request to the endpoint does, usable as it is.
        let idle = Hot::take(&pool, &endpoint).unwrap();
        let Revived::Usable(first) = revive(idle, now, &endpoint) else {
            panic!("a connection back a moment ago is usable");
        };
        assert_eq!(Arc::as_ptr(&first.2), first_socket);
        assert!(Hot::take(&pool, &endpoint).is_none(), "taken once");

        // Newest first, past another endpoint's.
        hot(&pool, &endpoint, first, now).keep(now);
        let second = live(&upstream, &mut held).await;
        let second_socket = Arc::as_ptr(&second.2);
        hot(&pool, &endpoint, second, now).keep(now);
        let third = live(&upstream, &mut held).await;
        hot(&pool, &elsewhere, third, now).keep(now);
        let newest = Hot::take(&pool, &endpoint).unwrap();
        assert_eq!(Arc::as_ptr(&newest.socket), second_socket);
        drop(newest);

        // Past the cap, the oldest goes back to its pool.
        let mut sockets = Vec::new();
        for _ in 0..HOT_PER_THREAD {
            let conn = live(&upstream, &mut held).await;
            sockets.push(Arc::as_ptr(&conn.2));
            hot(&pool, &endpoint, conn, now).keep(now);
        }
        assert_eq!(pooled(&pool, &endpoint), [first_socket]);
        // Out of work: every one goes back, in the order they came.
        give_back_thread_cache();
        let mut all = vec![first_socket];
        all.extend(&sockets);
        assert_eq!(pooled(&pool, &endpoint), all);
        assert_eq!(pooled(&pool, &elsewhere).len(), 1);
        assert!(Hot::take(&pool, &endpoint).is_none());
    }

    /// A connection kept long by its thread goes back in the order connections went idle, so
    /// that the pool still finds its expired ones together, behind the newest; and one kept
    /// past the idle timeout is not used.
    #[tokio::test]
    async fn a_connection_kept_long_goes_back_in_idle_order_and_expires() {
        use std::sync::Arc;
        use std::time::Duration;

        use super::{give_back_thread_cache, revive, Hot, Http1Pool, Revived, IDLE_TIMEOUT};

        let (upstream, endpoint) = upstream().await;
        let mut held = Vec::new();
        let pool = Arc::new(Http1Pool::default());
        let now = tokio::time::Instant::now();
        let old = live(&upstream, &mut held).await;
        let old_socket = Arc::as_ptr(&old.2);
        hot(&pool, &endpoint, old, now).keep(now);
        let later = now + Duration::from_secs(5);
        let fresh = live(&upstream, &mut held).await;
        let fresh_socket = Arc::as_ptr(&fresh.2);
        pool.checkin(&endpoint, hot(&pool, &endpoint, fresh, later).idle, later);
        give_back_thread_cache();
        assert_eq!(pooled(&pool, &endpoint), [old_socket, fresh_socket]);

        let old = pool.lock().get_mut(endpoint.as_str()).unwrap().remove(0);
        hot(&pool, &endpoint, (old.sender, old.conn, old.socket), now).keep(now);
        let idle = Hot::take(&pool, &endpoint).unwrap();
        assert!(matches!(
            revive(idle, now + IDLE_TIMEOUT, &endpoint),
            Revived::Expired
        ));
    }
}
