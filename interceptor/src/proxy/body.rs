//! The response body the proxy returns: the upstream's body streamed through, or a small body
//! the proxy wrote itself. The upstream variant carries the request's bookkeeping, so a request
//! stays in flight until its body has been sent (or the client went away).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use super::Completion;

pin_project_lite::pin_project! {
    /// A proxied or locally-made response body.
    #[project = Proj]
    pub enum ProxyBody {
        /// Streamed from the upstream; `done` is dropped at the end of the stream.
        Upstream {
            #[pin]
            body: Incoming,
            done: Option<Completion>,
        },
        /// Written by the proxy.
        Full {
            #[pin]
            body: Full<Bytes>,
        },
    }
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

    pub(super) fn upstream(body: Incoming, done: Completion) -> Self {
        Self::Upstream {
            body,
            done: Some(done),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            Proj::Upstream { body, done } => {
                let frame = ready!(body.poll_frame(cx));
                match &frame {
                    None => drop(done.take()),
                    Some(Err(_)) => {
                        if let Some(done) = done {
                            done.body_failed();
                        }
                        drop(done.take());
                    }
                    Some(Ok(_)) => {}
                }
                Poll::Ready(frame)
            }
            Proj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Full { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Full { body } => body.size_hint(),
        }
    }
}
