//! The client side of an accepted connection: the socket hyper serves, shared so that a request
//! held at a cold target can notice the client going away.
//!
//! Hyper reads a request body only when it is polled, and a held request does not poll its
//! body, so hyper cannot see the client hang up mid-upload. [`ClientConn::closed`] watches a
//! duplicate of the socket for read-hangup (`EPOLLRDHUP`) in its own epoll registration, which
//! leaves hyper's reads and readiness untouched. Events, not polling: the watcher wakes only when
//! bytes or a hangup arrive.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Largest single read (the size of the per-thread scratch buffer); 16 KiB takes a typical
/// request in one read.
const MAX_READ: usize = 16 * 1024;

/// What a request handler knows of its client's connection. One pointer: every request
/// future holds one, and a request clones it.
#[derive(Clone, Debug)]
pub struct ClientConn {
    stream: Arc<Socket>,
}

/// The socket, what is known of its client, and where taking an idle keep-alive connection
/// back from hyper stands.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    remote: SocketAddr,
    tls: bool,
    /// The client's address as `X-Forwarded-For` names it, made once for every request.
    forwarded_for: http::HeaderValue,
    /// [`IDLE_SERVING`], [`IDLE_PARK_ASKED`] or [`IDLE_PARKED`].
    idle: AtomicU8,
    /// Whether the client is a trusted proxy, decided at its first request.
    trusted: std::sync::OnceLock<bool>,
    /// The response-header timer, kept between requests (see [`ClientConn::header_timer`]).
    header_timer: std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
    /// The deadline kept by the connection's watchdog (see [`HeaderTimer::expire_at`]).
    deadline: WatchedDeadline,
}

/// An HTTP/1 request's response-header deadline, kept by its connection's watchdog rather than
/// by a timer of its own: the watchdog's one timer already runs while a request is in flight.
///
/// Times are milliseconds since `base`, plus one (0: none). Written by the request and by the
/// watchdog, which run in the same task (hyper polls an HTTP/1 connection's request future in
/// that connection's task), so no ordering between them is needed beyond the atomics' own.
#[derive(Debug)]
struct WatchedDeadline {
    base: tokio::time::Instant,
    /// When the watchdog's timer fires next, rounded down; 0 while no watchdog runs.
    watchdog_at: AtomicU64,
    /// The in-flight request's deadline, rounded up; 0 when none is kept here, [`OVERDUE`] once
    /// the watchdog found it passed.
    due: AtomicU64,
}

/// What [`WatchedDeadline::due`] holds once the watchdog found the deadline passed (no stamp
/// reaches it: they stop short of it).
const OVERDUE: u64 = u64::MAX;

impl WatchedDeadline {
    fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            watchdog_at: AtomicU64::new(0),
            due: AtomicU64::new(0),
        }
    }

    /// `at` in milliseconds since the base, plus one; rounded up if `up`.
    fn stamp(&self, at: tokio::time::Instant, up: bool) -> u64 {
        let since = at.saturating_duration_since(self.base);
        // At most `OVERDUE - 1`, so that a stamp is never taken for the mark.
        let ms = u64::try_from(since.as_millis()).map_or(OVERDUE - 3, |ms| ms.min(OVERDUE - 3));
        let partial = up && since.subsec_nanos() % 1_000_000 != 0;
        ms + 1 + u64::from(partial)
    }

    fn instant(&self, stamp: u64) -> tokio::time::Instant {
        self.base + std::time::Duration::from_millis(stamp.saturating_sub(1))
    }
}

impl Socket {
    /// The response-header timer kept between requests, locked.
    fn kept_timer(&self) -> std::sync::MutexGuard<'_, Option<Pin<Box<tokio::time::Sleep>>>> {
        self.header_timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::ops::Deref for Socket {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

/// Hyper serves the connection as usual.
const IDLE_SERVING: u8 = 0;
/// The connection has been idle long enough: hyper's next read that finds the socket empty
/// (and nothing left to write) ends its session.
const IDLE_PARK_ASKED: u8 = 1;
/// Hyper's session ended that way: the socket is to be parked, not closed.
const IDLE_PARKED: u8 = 2;

impl ClientConn {
    pub(crate) fn new(stream: TcpStream, remote: SocketAddr, tls: bool) -> (Self, ClientIo) {
        let stream = Arc::new(Socket {
            stream,
            remote,
            tls,
            forwarded_for: crate::proxy::client_value(remote.ip()),
            idle: AtomicU8::new(IDLE_SERVING),
            trusted: std::sync::OnceLock::new(),
            header_timer: std::sync::Mutex::new(None),
            deadline: WatchedDeadline::new(),
        });
        (
            Self {
                stream: stream.clone(),
            },
            ClientIo {
                stream,
                after_parking: false,
                write_pending: false,
            },
        )
    }

    /// Asks hyper's session on this idle keep-alive connection to end, leaving the socket open
    /// (see [`ClientIo`]); hyper must then be polled, so that it reads.
    pub(crate) fn ask_idle_park(&self) {
        let _ = self.stream.idle.compare_exchange(
            IDLE_SERVING,
            IDLE_PARK_ASKED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether hyper's session ended because the idle connection was taken back; resets the
    /// state for the next session.
    pub(crate) fn take_idle_parked(&self) -> bool {
        self.stream.idle.swap(IDLE_SERVING, Ordering::AcqRel) == IDLE_PARKED
    }

    /// The client's address.
    pub fn remote(&self) -> SocketAddr {
        self.stream.remote
    }

    /// The client's address as a forwarding header value.
    pub(crate) fn forwarded_for(&self) -> &http::HeaderValue {
        &self.stream.forwarded_for
    }

    /// Whether the client is trusted, as `is_trusted` says of its address: asked once per
    /// connection, not for every request on it.
    pub(crate) fn trusted_by(&self, is_trusted: impl FnOnce(std::net::IpAddr) -> bool) -> bool {
        *self
            .stream
            .trusted
            .get_or_init(|| is_trusted(self.stream.remote.ip()))
    }

    /// A timer for one request's response-header timeout, given back to the connection when
    /// the guard drops. `http1`: the request came over HTTP/1, so its future is polled in the
    /// connection's task, and the connection's watchdog can keep its deadline (see
    /// [`HeaderTimer::expire_at`]).
    ///
    /// Otherwise (HTTP/2 streams, or a deadline before the watchdog next looks) the request
    /// has a timer. Setting one up and removing it again takes the timer wheel's lock twice; a
    /// timer kept armed between requests is moved on to a later deadline without it (an
    /// earlier one registers it again). A request that finds the connection's timer taken
    /// (HTTP/2 streams at once) gets one of its own.
    pub(crate) fn header_timer(&self, http1: bool) -> HeaderTimer<'_> {
        HeaderTimer {
            client: self,
            http1,
            watched: false,
            sleep: None,
        }
    }

    /// The connection's watchdog set its timer for `at` (`None`: it stopped watching).
    pub(crate) fn watchdog_at(&self, at: Option<tokio::time::Instant>) {
        let deadline = &self.stream.deadline;
        let stamp = at.map_or(0, |at| deadline.stamp(at, false));
        deadline.watchdog_at.store(stamp, Ordering::Relaxed);
    }

    /// For the watchdog, when its timer fires at `now`: marks a kept response-header deadline
    /// that has passed (the request, polled next in this task, then gives up), and returns
    /// one still to come, for the timer.
    pub(crate) fn response_due(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let deadline = &self.stream.deadline;
        let due = deadline.due.load(Ordering::Relaxed);
        if due == 0 || due == OVERDUE {
            return None;
        }
        if deadline.stamp(now, false) >= due {
            deadline.due.store(OVERDUE, Ordering::Relaxed);
            return None;
        }
        Some(deadline.instant(due))
    }

    /// Drops the kept response-header timer: a connection that is parked holds no more than
    /// parking needs.
    pub(crate) fn forget_header_timer(&self) {
        self.stream.kept_timer().take();
    }

    /// Whether the connection came in over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.tls
    }

    /// Peeks at bytes that arrived, without taking them from the socket (hyper reads them later).
    pub(crate) fn poll_peek(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        self.stream.poll_peek(cx, buf)
    }

    /// Completes when the client closes or resets a connection that hyper is not serving yet
    /// (a parked one), watching the connection's own registration: no file descriptor is
    /// duplicated. The readiness this clears is why [`ClientIo::after_parking`] exists.
    pub(crate) async fn hung_up(&self) -> io::Result<()> {
        hangup(&self.stream.stream).await
    }

    /// Completes when the client closes or resets the connection. Fails only when the socket
    /// cannot be duplicated (out of file descriptors); callers then just don't watch.
    pub async fn closed(&self) -> io::Result<()> {
        let dup = std::net::TcpStream::from(self.stream.as_fd().try_clone_to_owned()?);
        hangup(&TcpStream::from_std(dup)?).await
    }
}

/// One request's use of its connection's response-header timer (see
/// [`ClientConn::header_timer`]).
pub(crate) struct HeaderTimer<'a> {
    client: &'a ClientConn,
    http1: bool,
    /// The deadline is kept by the watchdog: cleared when the request is done with it.
    watched: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HeaderTimer<'_> {
    /// Completes at `at`.
    ///
    /// An HTTP/1 request whose deadline is no earlier than the watchdog's next look leaves it
    /// to the watchdog: that timer fires by then, re-arms for the deadline, and marks it passed
    /// when it is. This future registers no waker: the watchdog runs in the task that polls
    /// this request (the connection's), and the connection is polled again right after the
    /// watchdog's timer fires, which polls the request.
    pub(crate) async fn expire_at(&mut self, at: tokio::time::Instant) {
        let deadline = &self.client.stream.deadline;
        if self.http1 {
            let due = deadline.stamp(at, true);
            let watchdog_at = deadline.watchdog_at.load(Ordering::Relaxed);
            if watchdog_at != 0 && watchdog_at <= due {
                deadline.due.store(due, Ordering::Relaxed);
                self.watched = true;
                return std::future::poll_fn(|_| {
                    if deadline.due.load(Ordering::Relaxed) == OVERDUE {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            }
        }
        let sleep = self
            .sleep
            .take()
            .or_else(|| self.client.stream.kept_timer().take());
        let sleep = self.sleep.insert(match sleep {
            Some(mut sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        });
        sleep.as_mut().await;
    }
}

impl Drop for HeaderTimer<'_> {
    fn drop(&mut self) {
        if self.watched {
            self.client.stream.deadline.due.store(0, Ordering::Relaxed);
        }
        if let Some(sleep) = self.sleep.take() {
            self.client.stream.kept_timer().get_or_insert(sleep);
        }
    }
}

/// Completes when `stream`'s peer closes or resets. Readiness that is only data (a body nobody
/// has read yet) is cleared on this registration, and the wait goes on to the next event.
async fn hangup(stream: &TcpStream) -> io::Result<()> {
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        if ready.is_read_closed() {
            return Ok(());
        }
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
}

/// The connection's I/O as hyper sees it (through `TokioIo`).
///
/// It can also end a hyper session on an idle keep-alive connection without closing the
/// socket: once the server asked for it (`ClientConn::ask_idle_park`), a read that finds the
/// socket empty, with every byte hyper wrote accepted by the kernel, reports end of stream, and
/// the shutdown hyper then asks for leaves the socket open. The server gets the socket back and parks it
/// (no hyper buffers, no connection state) until the next request head arrives.
#[derive(Debug)]
pub struct ClientIo {
    stream: Arc<Socket>,
    /// See [`ClientIo::after_parking`].
    after_parking: bool,
    /// The last write did not take everything hyper offered: hyper still holds bytes to send.
    write_pending: bool,
}

impl ClientIo {
    /// The connection was parked, and watching it cleared its read readiness while its
    /// request head was still unread: reads try the socket before waiting for an event (the
    /// bytes that would signal one came before the watch) until it has nothing left.
    pub(crate) fn after_parking(&mut self) {
        self.after_parking = true;
    }

    /// Ends hyper's session if an idle park was asked for and nothing is waiting either way:
    /// `Some` answers the read.
    fn idle_park(&mut self, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        if self.write_pending || self.stream.idle.load(Ordering::Acquire) != IDLE_PARK_ASKED {
            return None;
        }
        let want = buf.remaining().min(MAX_READ);
        match recv_into(self.stream.as_raw_fd(), buf, want) {
            // Bytes came after all (or the client closed): hyper serves them as usual.
            Ok(_) => {
                self.stream.idle.store(IDLE_SERVING, Ordering::Release);
                Some(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.stream.idle.store(IDLE_PARKED, Ordering::Release);
                Some(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Reading straight into hyper's uninitialised buffer needs `unsafe`; zeroing it first
        // would commit memory for every idle or held connection. So read into a per-thread
        // scratch buffer and copy just the bytes that arrived.
        // After parking: read straight from the socket until it runs dry (the readiness that
        // would announce the bytes already there was used up by the parked watch); from then
        // on, wait for events as usual.
        if let Some(answer) = self.idle_park(buf) {
            return Poll::Ready(answer);
        }
        if self.after_parking {
            let want = buf.remaining().min(MAX_READ);
            match recv_into(self.stream.as_raw_fd(), buf, want) {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.after_parking = false
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            let want = buf.remaining().min(MAX_READ);
            let mut got = None;
            // The read runs inside `try_io` so that a short read can clear the readiness it
            // was woken for (the closure reports `WouldBlock` after reading), as tokio's own
            // reads do: the socket is drained, and the next read waits for an event instead of
            // costing a `recv` that fails with EAGAIN. Readiness that arrived during the read
            // carries a newer tick and is not cleared.
            let stream = &self.stream;
            let result = stream.try_io(Interest::READABLE, || {
                let n = recv_into(stream.as_raw_fd(), buf, want)?;
                got = Some(n);
                if n > 0 && n < want {
                    Err(io::Error::from(io::ErrorKind::WouldBlock))
                } else {
                    Ok(())
                }
            });
            match (result, got) {
                (_, Some(_)) => return Poll::Ready(Ok(())),
                (Err(e), None)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                (Err(e), None) => return Poll::Ready(Err(e)),
                (Ok(()), None) => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// One `recv` of at most `want` bytes from `fd` into `buf`, through the per-thread scratch
/// buffer.
fn recv_into(fd: std::os::fd::RawFd, buf: &mut ReadBuf<'_>, want: usize) -> io::Result<usize> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let n = nix::sys::socket::recv(
            fd,
            &mut scratch[..want],
            nix::sys::socket::MsgFlags::empty(),
        )?;
        buf.put_slice(&scratch[..n]);
        Ok(n)
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; MAX_READ].into_boxed_slice());
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_pending = true;
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => {
                    self.write_pending = !matches!(result, Ok(n) if n == buf.len());
                    return Poll::Ready(result);
                }
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_pending = true;
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => {
                    let offered: usize = bufs.iter().map(|b| b.len()).sum();
                    self.write_pending = !matches!(result, Ok(n) if n == offered);
                    return Poll::Ready(result);
                }
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.stream.idle.load(Ordering::Acquire) == IDLE_PARKED {
            // The session ended to park the connection: the socket stays open.
            return Poll::Ready(Ok(()));
        }
        let fd = self.stream.as_raw_fd();
        Poll::Ready(
            nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write).or_else(|e| {
                if e == nix::errno::Errno::ENOTCONN {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    /// A client connection over a real loopback socket.
    fn client() -> ClientConn {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dialled =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, remote) = listener.accept().expect("accept");
        drop(dialled);
        accepted.set_nonblocking(true).expect("nonblocking");
        let stream = TcpStream::from_std(accepted).expect("tokio stream");
        ClientConn::new(stream, remote, false).0
    }

    fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
        fut.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// An HTTP/1 request's deadline that the watchdog looks at in time is left to it: no timer
    /// of the request's own fires, and the request gives up when the watchdog finds the
    /// deadline passed, not before.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_keeps_an_http1_deadline_it_looks_at_in_time() {
        let client = client();
        let start = Instant::now();
        client.watchdog_at(Some(start + Duration::from_secs(1)));
        {
            let mut timer = client.header_timer(true);
            let expired = timer.expire_at(start + Duration::from_secs(5));
            tokio::pin!(expired);
            assert!(poll_once(expired.as_mut()).is_pending());
            // The watchdog looks at 1 s: the deadline is still to come, and it is told when.
            let due = client.response_due(start + Duration::from_secs(1));
            assert_eq!(due, Some(start + Duration::from_secs(5)));
            tokio::time::advance(Duration::from_secs(10)).await;
            assert!(
                poll_once(expired.as_mut()).is_pending(),
                "no timer of its own"
            );
            // The watchdog looks at the deadline: passed.
            assert_eq!(client.response_due(start + Duration::from_secs(5)), None);
            assert!(poll_once(expired.as_mut()).is_ready());
        }
        // Done with: nothing is kept for the next request.
        assert_eq!(client.response_due(Instant::now()), None);
        let mut next = client.header_timer(true);
        let expired = next.expire_at(Instant::now() + Duration::from_secs(5));
        tokio::pin!(expired);
        assert!(
            poll_once(expired.as_mut()).is_pending(),
            "a passed mark is not left for the next request"
        );
    }

    /// A deadline is never marked early: a look a millisecond before it leaves it standing.
    #[tokio::test(start_paused = true)]
    async fn a_kept_deadline_is_not_marked_before_it_passes() {
        let client = client();
        let start = Instant::now();
        client.watchdog_at(Some(start));
        let mut timer = client.header_timer(true);
        let at = start + Duration::from_micros(2_500);
        let expired = timer.expire_at(at);
        tokio::pin!(expired);
        assert!(poll_once(expired.as_mut()).is_pending());
        let due = client
            .response_due(start + Duration::from_millis(2))
            .expect("still to come");
        assert!(
            due >= at,
            "the watchdog looks again no earlier than the deadline"
        );
        assert!(poll_once(expired.as_mut()).is_pending());
        assert_eq!(client.response_due(due), None);
        assert!(poll_once(expired.as_mut()).is_ready());
    }

    /// A request gets a timer of its own when the watchdog would look too late, when no
    /// watchdog runs, and for HTTP/2 (its streams are polled in tasks of their own).
    #[tokio::test(start_paused = true)]
    async fn other_deadlines_get_a_timer_of_their_own() {
        let client = client();
        for (watchdog, http1) in [(Some(10), true), (None, true), (Some(0), false)] {
            let start = Instant::now();
            client.watchdog_at(watchdog.map(|s| start + Duration::from_secs(s)));
            let mut timer = client.header_timer(http1);
            timer.expire_at(start + Duration::from_secs(1)).await;
            assert_eq!(
                Instant::now() - start,
                Duration::from_secs(1),
                "watchdog {watchdog:?}, HTTP/1 {http1}"
            );
            assert_eq!(client.response_due(Instant::now()), None);
        }
    }
}
