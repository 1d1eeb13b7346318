//! HTTP/2: h2c with prior knowledge in, h2c out (`protocol: h2c`), with trailers and
//! `te: trailers` passed end to end as gRPC needs them, and HTTP/1.1 clients translated.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// An h2c-only upstream that answers with the request's version and `te`, then trailers.
async fn h2c_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let te = req
                    .headers()
                    .get("te")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let host = req
                    .headers()
                    .get("host")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let text = format!(
                    "{:?} te={te} authority={authority} host={host}",
                    req.version()
                );
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from(text))),
                    Ok(Frame::trailers(trailers)),
                ];
                Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                    frames,
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_in_and_out_with_trailers() {
    let up = h2c_upstream().await;
    let config =
        format!("routes:\n  - name: grpc\n    target: {{ upstream: \"{up}\", protocol: h2c }}\n");
    let ic = Interceptor::start(&config).await;

    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{}/pkg.Echo/Say", ic.proxy))
        // HTTP/2 names the host in `:authority` (the URI's); a differing Host header is a 400.
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let rsp = h2.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(
        rsp.version(),
        Version::HTTP_2,
        "h2c with prior knowledge in"
    );
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers came through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        collected.to_bytes(),
        format!(
            "HTTP/2.0 te=trailers authority={0} host={0}",
            ic.proxy
        ),
        "h2c out, te: trailers kept, and the authority routed by is the one forwarded (not the upstream's address)"
    );

    // An HTTP/1.1 client is translated to h2c upstream.
    let reply = ic.get("grpc.test", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.text(),
        "HTTP/2.0 te= authority=grpc.test host=grpc.test",
        "the HTTP/1.1 client's Host becomes the upstream's :authority"
    );
}
