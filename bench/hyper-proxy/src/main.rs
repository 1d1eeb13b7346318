//! A minimal HTTP/1.1 reverse proxy on hyper, the floor the proxy benchmarks compare Wakegate
//! with: each client connection gets one upstream connection (`hyper::client::conn::http1`),
//! and both are driven in the client connection's task, so a request costs no channel hop to
//! another task, no pool and no per-request timer.
//!
//! It does only what proxying needs (the body streams both ways; Host is kept). It has no
//! routing, no header rewriting and no limits: it is a yardstick, not a product.
//!
//!     hyper-proxy LISTEN_ADDR UPSTREAM_ADDR

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper-proxy LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
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
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(client, upstream).await {
                eprintln!("hyper-proxy: {e}");
            }
        });
    }
}

/// Serves one client connection over one upstream connection, both in this task.
async fn serve(client: TcpStream, upstream: SocketAddr) -> Result<(), hyper::Error> {
    let _ = client.set_nodelay(true);
    let Ok(up) = TcpStream::connect(upstream).await else {
        return Ok(());
    };
    let _ = up.set_nodelay(true);
    let (sender, up_conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    // HTTP/1.1 requests on one connection come one at a time, so the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender: tokio::sync::MutexGuard<'_, Sender> = sender.lock().await;
            sender.ready().await?;
            let rsp: Response<Incoming> = sender.send_request(req).await?;
            Ok::<_, hyper::Error>(rsp)
        }
    });
    let server = http1::Builder::new().serve_connection(TokioIo::new(client), service);
    tokio::select! {
        served = server => served,
        // The upstream closed: the client connection has nothing left to talk to.
        _ = up_conn => Ok(()),
    }
}
