//! Request heads as they arrive, below hyper: when a later head starts (its header-read
//! timeout counts from its first byte), and a request line longer than the header limit, which
//! gets `414 URI Too Long` rather than hyper's 431.
//!
//! Hyper's own HTTP/1 header-read timer starts as soon as a response is sent, so it would
//! close every idle keep-alive connection after the header-read timeout, long before the proxy
//! in front is done with it. So hyper's is off, and this wrapper tells the connection's
//! watchdog when bytes of a new head arrive on an idle connection.
//!
//! Hyper reads a request head into one buffer of `--max-header-bytes` and answers 431 when it
//! fills, whatever filled it; it cannot tell a long target from a long header block. This
//! wrapper sits between the connection's I/O and hyper and sees every byte hyper reads. While a
//! request head is due (the connection's first bytes, or after the previous request), it counts
//! the bytes of the head's first line. When that line alone reaches the limit, it takes back the
//! read, writes the 414 itself and reports end of input, so hyper ends the connection without a
//! response of its own.
//!
//! Nothing is parsed here: the only thing looked for is the first line feed. HTTP/2
//! connections (their preface) are passed through untouched. A head whose start this wrapper
//! cannot place (pipelined behind a request with a body) is left to hyper, which answers 431:
//! the fallback is the old status, never a wrong acceptance.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::Activity;

/// The response written for an overlong request line.
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 52\r\nconnection: close\r\n\r\nrequest target too long: over the header size limit\n";

/// HTTP/2's connection preface starts like this.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug)]
enum State {
    /// Looking at request heads.
    Watching {
        /// `Activity::heads` when the current head began.
        heads: u64,
        /// Bytes of the current head's first line so far.
        line: usize,
        /// Whether the current head's first line has not ended yet.
        first_line: bool,
    },
    /// An HTTP/2 connection: nothing to watch.
    Off,
    /// Writing the 414; `written` bytes of it are out.
    Rejecting { written: usize },
    /// The 414 is out: the read side reports end of input from now on.
    Rejected,
}

/// The connection's I/O, with overlong request lines answered 414.
#[derive(Debug)]
pub struct RequestHeads<IO> {
    io: IO,
    limit: usize,
    activity: Arc<Activity>,
    /// The connection's first bytes while they could still be HTTP/2's preface; `None` once
    /// they are not.
    start: Option<Vec<u8>>,
    state: State,
}

impl<IO> RequestHeads<IO> {
    pub(crate) fn new(io: IO, limit: usize, activity: Arc<Activity>) -> Self {
        let heads = activity.heads.load(Ordering::Acquire);
        Self {
            io,
            limit,
            activity,
            start: Some(Vec::new()),
            state: State::Watching {
                heads,
                line: 0,
                first_line: true,
            },
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for RequestHeads<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Off => return Pin::new(&mut this.io).poll_read(cx, buf),
                State::Rejected => return Poll::Ready(Ok(())),
                State::Rejecting { written } => {
                    while *written < URI_TOO_LONG.len() {
                        let n = ready!(
                            Pin::new(&mut this.io).poll_write(cx, &URI_TOO_LONG[*written..])
                        )?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *written += n;
                    }
                    ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                    let _ = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
                    this.state = State::Rejected;
                }
                State::Watching { .. } => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let new = &buf.filled()[before..];
                    if !new.is_empty() {
                        this.activity.head_bytes_arrived();
                    }
                    if let Some(start) = &mut this.start {
                        let take = (H2_PREFACE.len() - start.len()).min(new.len());
                        start.extend_from_slice(&new[..take]);
                        if !H2_PREFACE.starts_with(start) {
                            this.start = None;
                        } else if start.len() == H2_PREFACE.len() {
                            this.state = State::Off;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    if this.overlong(new) {
                        // Taken back: hyper never sees its buffer fill.
                        buf.set_filled(before);
                        tracing::debug!(limit = this.limit, "request line too long: 414");
                        this.state = State::Rejecting { written: 0 };
                        continue;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<IO> RequestHeads<IO> {
    /// The connection's I/O back (its bytes were only observed here, never withheld).
    pub(crate) fn into_inner(self) -> IO {
        self.io
    }

    /// Accounts for `new` bytes; true when they make a request line reach the limit.
    fn overlong(&mut self, new: &[u8]) -> bool {
        let State::Watching {
            heads,
            line,
            first_line,
        } = &mut self.state
        else {
            return false;
        };
        let now = self.activity.heads.load(Ordering::Acquire);
        if now != *heads {
            // A new head starts with these bytes (or with bytes hyper already holds, in which
            // case the count is short and hyper's 431 answers instead).
            *heads = now;
            *line = 0;
            *first_line = true;
        }
        if !*first_line || self.activity.reading_body.load(Ordering::Acquire) {
            return false;
        }
        match new.iter().position(|&b| b == b'\n') {
            Some(end) => {
                *first_line = false;
                *line + end >= self.limit
            }
            None => {
                *line += new.len();
                *line >= self.limit
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for RequestHeads<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_414_says_its_own_length() {
        let text = std::str::from_utf8(URI_TOO_LONG).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
