//! Bodies on their way through: the request body streamed up, which records how the client
//! behaved, and the response body the proxy returns (the upstream's streamed through, or a small
//! one the proxy wrote itself).
//!
//! The request side tells the proxy two things the upstream client cannot: when the body has
//! been sent in full (the response-header timeout starts there), and whether a failure while
//! sending it was the client's (a malformed body, a hangup, a body that trickles) rather than
//! the upstream's. The response side carries the request's bookkeeping, so a request stays in
//! flight until its body has been sent (or the client went away), and cuts the body when the
//! request timeout passes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::upstream::Http1Conn;
use super::Completion;

/// How a client failed while its request body was being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// The body was not valid framing: a bad chunk size, bare-LF chunk lines, an HTTP/2
    /// protocol error on the stream.
    Malformed,
    /// The client hung up or reset the stream before the body ended.
    Gone,
    /// The body arrived slower than `--min-request-body-rate`.
    TooSlow,
}

impl ClientFault {
    /// A bounded label for metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Malformed => "malformed_body",
            Self::Gone => "client_gone",
            Self::TooSlow => "slow_body",
        }
    }

    /// Classifies an error hyper reported while reading a request body.
    fn of(err: &hyper::Error) -> Self {
        if err.is_incomplete_message() || err.is_canceled() || err.is_closed() {
            return Self::Gone;
        }
        let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
        while let Some(cause) = next {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                return if h2.is_io() || h2.reason() == Some(h2::Reason::CANCEL) {
                    Self::Gone
                } else {
                    Self::Malformed
                };
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                return match io.kind() {
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut => {
                        Self::Gone
                    }
                    _ => Self::Malformed,
                };
            }
            next = cause.source();
        }
        Self::Malformed
    }
}

/// The request body failed on the client's side; the proxy answers from [`BodyWatch`].
#[derive(Debug, thiserror::Error)]
#[error("request body from the client: {}", .fault.kind())]
pub struct ClientBodyError {
    fault: ClientFault,
    #[source]
    source: Option<hyper::Error>,
}

/// What the proxy learns about a request body while it streams upstream.
#[derive(Debug, Default)]
pub struct BodyWatch {
    fault: OnceLock<ClientFault>,
    sent: AtomicBool,
    sent_changed: Notify,
}

impl BodyWatch {
    /// How the client failed, if it did.
    pub fn fault(&self) -> Option<ClientFault> {
        self.fault.get().copied()
    }

    fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.sent_changed.notify_waiters();
        }
    }

    /// Completes once the whole body has been handed to the upstream connection.
    pub async fn sent(&self) {
        loop {
            let changed = self.sent_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.sent.load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }
}

/// The least average rate a request body must keep, after a grace period, counting only the
/// time spent waiting for the client (not for a slow upstream to read).
#[derive(Clone, Copy, Debug)]
pub struct MinRate {
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// Time before the rate applies.
    pub grace: Duration,
}

#[derive(Debug)]
struct RateState {
    min: MinRate,
    received: u64,
    /// Time spent waiting for the client before the current wait.
    waited: Duration,
    /// When the current wait began.
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl RateState {
    /// When the client's time runs out, given the bytes it has sent.
    fn allowed(&self) -> Duration {
        let per_byte = self.received as f64 / self.min.bytes_per_second.max(1) as f64;
        self.min.grace + Duration::from_secs_f64(per_byte.min(1e9))
    }
}

/// A client's request body on its way upstream.
///
/// One pointer: hyper's dispatch channel keeps room for 32 requests per upstream connection
/// (a block of them is allocated with the connection), so every byte of a request is 32 bytes
/// of every connection. A request without a body (most) has nothing here and costs no
/// allocation; one with a body keeps it, its watch and its rate boxed together.
#[derive(Debug)]
pub struct RequestBody {
    /// `None` for a request without a body, or replayed without one (see `RequestBody::empty`):
    /// it is sent with its head, and its client cannot fail it.
    streaming: Option<Pin<Box<Streaming>>>,
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    struct Streaming {
        #[pin]
        body: Incoming,
        watch: Arc<BodyWatch>,
        rate: Option<RateState>,
    }
}

impl RequestBody {
    /// Wraps `body`; `rate`, if any, is enforced on it. A request without a body gets no
    /// watch (nothing to report, and no allocation for it): it counts as sent at once.
    pub fn new(body: Incoming, rate: Option<MinRate>) -> (Self, Option<Arc<BodyWatch>>) {
        if body.is_end_stream() {
            return (Self::empty(), None);
        }
        let watch = Arc::new(BodyWatch::default());
        let rate = rate.map(|min| RateState {
            min,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        });
        let streaming = Box::pin(Streaming {
            body,
            watch: watch.clone(),
            rate,
        });
        (
            Self {
                streaming: Some(streaming),
            },
            Some(watch),
        )
    }

    /// An empty body: a request's that had none, or sent again (which had none the first time
    /// either).
    pub fn empty() -> Self {
        Self { streaming: None }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let Some(streaming) = self.streaming.as_mut() else {
            return Poll::Ready(None);
        };
        let this = streaming.as_mut().project();
        let (mut body, watch) = (this.body, this.watch);
        match body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                let Some(rate) = this.rate else {
                    return Poll::Pending;
                };
                let now = Instant::now();
                let since = *rate.waiting_since.get_or_insert(now);
                let allowed = rate.allowed();
                let waited = rate.waited + (now - since);
                if waited < allowed {
                    let at = since + (allowed - rate.waited);
                    let timer = rate
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    timer.as_mut().reset(at);
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                let _ = watch.fault.set(ClientFault::TooSlow);
                Poll::Ready(Some(Err(ClientBodyError {
                    fault: ClientFault::TooSlow,
                    source: None,
                })))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(rate) = this.rate {
                    if let Some(since) = rate.waiting_since.take() {
                        rate.waited += since.elapsed();
                    }
                    if let Some(data) = frame.data_ref() {
                        rate.received += data.remaining() as u64;
                    }
                }
                if body.is_end_stream() {
                    watch.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                let fault = ClientFault::of(&err);
                let _ = watch.fault.set(fault);
                Poll::Ready(Some(Err(ClientBodyError {
                    fault,
                    source: Some(err),
                })))
            }
            Poll::Ready(None) => {
                watch.mark_sent();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.streaming
            .as_ref()
            .is_none_or(|s| s.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.streaming
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |s| s.body.size_hint())
    }
}

/// The error a response body ends with when the upstream's body fails or the request timeout
/// passes mid-response.
pub type ResponseBodyError = Box<dyn std::error::Error + Send + Sync>;

/// The request timeout passed while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("the request timeout passed while the response was streaming")]
pub struct CutByRequestTimeout;

pin_project_lite::pin_project! {
    /// A proxied or locally-made response body.
    ///
    /// Small, because hyper's server keeps room for a response body on every connection it
    /// serves, from its first request to its end (and a response is moved several times on
    /// its way out): a proxied body's state is boxed, allocated only while a response streams.
    #[project = Proj]
    pub enum ProxyBody {
        /// Streamed from the upstream.
        Upstream { body: Box<FromUpstream> },
        /// Written by the proxy.
        Full {
            #[pin]
            body: Full<Bytes>,
        },
    }
}

/// A body streamed from the upstream, and what ends with it.
pub struct FromUpstream {
    body: Incoming,
    /// The upstream connection, when the body drives it (the route's own HTTP/1 pool).
    conn: Option<Http1Conn>,
    /// Dropped at the end of the stream.
    done: Option<Completion>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Default for ProxyBody {
    fn default() -> Self {
        Self::full(Bytes::new())
    }
}

impl ProxyBody {
    /// A body of fixed bytes.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full {
            body: Full::new(bytes),
        }
    }

    pub(super) fn upstream(
        body: Incoming,
        conn: Option<Http1Conn>,
        done: Completion,
        deadline: Option<Instant>,
    ) -> Self {
        Self::Upstream {
            body: Box::new(FromUpstream {
                body,
                conn,
                done: Some(done),
                deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            }),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.project() {
            Proj::Upstream { body } => body.poll_frame(cx),
            Proj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body } => body.body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body } => body.body.size_hint(),
            Self::Full { body } => body.size_hint(),
        }
    }
}

impl FromUpstream {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let Self {
            body,
            conn,
            done,
            deadline,
        } = self;
        if let Some(timer) = deadline {
            if timer.as_mut().poll(cx).is_ready() {
                if let Some(done) = done.take() {
                    done.cut_by_request_timeout();
                }
                return Poll::Ready(Some(Err(Box::new(CutByRequestTimeout))));
            }
        }
        let frame = ready!(match conn.as_mut() {
            Some(conn) => conn.poll_body(body, cx),
            None => Pin::new(&mut *body).poll_frame(cx),
        });
        match &frame {
            None => {}
            Some(Err(_)) => {
                if let Some(done) = done {
                    done.body_failed();
                }
                drop(done.take());
            }
            Some(Ok(frame)) => {
                if let Some(observed) = done.as_mut().and_then(|d| d.observed.as_mut()) {
                    observed.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
            }
        }
        // A body of known length ends with its last frame (hyper then asks no more): the
        // connection goes back to the pool and the request is accounted for now, not when
        // hyper drops the body, and both from one clock read.
        if frame.is_none() || (frame.as_ref().is_some_and(Result::is_ok) && body.is_end_stream()) {
            let now = Instant::now();
            if let Some(conn) = conn.take() {
                conn.body_ended_at(now);
            }
            if let Some(mut done) = done.take() {
                done.end_at(now);
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as ResponseBodyError)))
    }
}

#[cfg(test)]
mod tests {
    /// Hyper keeps room for one per connection it serves (see `ProxyBody`).
    #[test]
    fn a_response_body_is_small() {
        assert!(std::mem::size_of::<super::ProxyBody>() <= 48);
    }

    /// hyper's dispatch channel allocates room for 32 requests with every upstream connection,
    /// so a request body's size counts 32 times per connection: it stays one pointer.
    #[test]
    fn a_request_body_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<super::RequestBody>(),
            std::mem::size_of::<usize>()
        );
    }
}
