//! Accepting connections and serving them with hyper, with a graceful drain.
//!
//! Each connection is its own task, so a panic while handling one request ends that connection
//! only. On stop the listener is closed, idle keep-alive connections are closed, and connections
//! with a request in flight finish it (under the drain deadline) before closing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::client_conn::ClientConn;

/// How a server's drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// Whether every connection finished before the deadline.
    pub complete: bool,
    /// Connections still open when the deadline passed.
    pub abandoned: usize,
}

/// Connection-level settings.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionSettings {
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: Duration,
    /// Largest header block accepted; larger ones get 431.
    pub max_header_bytes: usize,
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
/// `tls`, each connection is a TLS handshake first (under the header-read timeout), then HTTP/2
/// or HTTP/1.1 as ALPN (or, without ALPN, the connection preface) says.
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
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let (client, io) = ClientConn::new(stream, remote, tls.is_some());
        let service = service_fn(move |req| {
            let rsp = AssertUnwindSafe(handler(req, client.clone())).catch_unwind();
            async move {
                // A panic while handling one request answers that request with a 500 and
                // ends nothing else: not the connection, not the process.
                Ok::<_, Infallible>(rsp.await.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "request handler panicked");
                    let mut rsp = Response::new(B::default());
                    *rsp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    rsp
                }))
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let open = open.clone();
        let tls = tls.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    // The handshake is a connection's header read: the same timeout cuts a
                    // client that opens a socket and stalls.
                    let handshake =
                        tokio::time::timeout(settings.header_read_timeout, acceptor.accept(io));
                    match handshake.await {
                        Ok(Ok(io)) => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%remote, error = %err, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(err) = result {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);

    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => Drain {
            complete: true,
            abandoned: 0,
        },
        Err(_) => Drain {
            complete: false,
            abandoned: open.load(Ordering::Relaxed),
        },
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
        let settings = ConnectionSettings {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 65_536,
        };
        tokio::spawn(serve(
            listener,
            None,
            handler,
            settings,
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
