//! The interceptor as the edge, through the real binary: connections bounded in time and number,
//! the authority a request is routed by being the one forwarded, forwarding headers trusted only
//! from trusted peers, client mistakes answered as the client's, timeouts that mean what they
//! say, and error bodies that say what happened without saying where.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that reads each request body in full and answers `<bytes read>` then the request
/// line and headers it saw, one per line. `/slow-headers` answers after 2 s; `/trickle` sends
/// its headers at once and then one body byte every 200 ms for 2 s.
#[derive(Clone)]
struct Echo {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Echo {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut text = format!("{} {}\n", req.method(), req.uri());
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await;
                        let got = body.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
                        let text = format!("{got}\n{text}");
                        type Stream = StreamBody<
                            futures_util::stream::BoxStream<
                                'static,
                                Result<Frame<Bytes>, std::convert::Infallible>,
                            >,
                        >;
                        let body: Stream = match path.as_str() {
                            "/trickle" => StreamBody::new(Box::pin(futures_util::stream::unfold(
                                0,
                                |i| async move {
                                    if i == 10 {
                                        return None;
                                    }
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    Some((Ok(Frame::data(Bytes::from_static(b"x"))), i + 1))
                                },
                            ))),
                            _ => {
                                if path == "/slow-headers" {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                }
                                StreamBody::new(Box::pin(futures_util::stream::once(async move {
                                    Ok(Frame::data(Bytes::from(text)))
                                })))
                            }
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Self { addr, requests }
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// One route per host, each to `upstream`.
fn routes(upstream: SocketAddr, hosts: &[&str], extra: &str) -> String {
    let mut config = String::from("routes:\n");
    for host in hosts {
        let name = host.split('.').next().unwrap();
        config.push_str(&format!(
            "  - name: {name}\n    hosts: [\"{host}\"]\n    target: {{ upstream: \"{upstream}\" }}\n{extra}"
        ));
    }
    config
}

/// Sends raw bytes and reads until the server closes (or 10 s); returns everything read.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_line(reply: &str) -> &str {
    reply.lines().next().unwrap_or("")
}

/// The value of one sample line in a Prometheus text exposition (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads one response whose body is chunked (the echo upstream's), up to its last chunk.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    while !got.ends_with(b"0\r\n\r\n") {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Waits until the server has closed `stream` (a read returns end of input or an error).
async fn closed_within(stream: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_by_the_header_read_timeout() {
    let up = Echo::start().await;
    let ic = Interceptor::start_with(
        &routes(up.addr, &["a.test"], ""),
        &["--header-read-timeout", "1s"],
    )
    .await;

    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(ic.proxy).await.unwrap());
    }
    // A plaintext HTTP/2 connection that sends its preface and SETTINGS, then nothing.
    let mut h2 = TcpStream::connect(ic.proxy).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // An HTTP/1.1 head that never ends.
    let mut partial = TcpStream::connect(ic.proxy).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();

    eventually(
        "1,000 silent connections open",
        Duration::from_secs(10),
        || async { sample(&ic.metrics().await, "wakegate_client_connections_open") >= 1000.0 },
    )
    .await;
    // Meanwhile normal requests are served.
    let reply = exchange(
        ic.proxy,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK");

    let named = silent
        .iter_mut()
        .enumerate()
        .map(|(i, s)| (format!("silent connection {i}"), s))
        .chain([
            ("the h2c connection".to_owned(), &mut h2),
            ("the partial head".to_owned(), &mut partial),
        ]);
    for (name, stream) in named {
        if !closed_within(stream, Duration::from_secs(10)).await {
            panic!(
                "{name} stayed open {:?} after the first connect\n{}",
                started.elapsed(),
                ic.metrics().await
            );
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed too soon: {took:?}"
    );
    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_connections_closed_total{reason="header_read_timeout"}"#
        ) >= 1001.0,
        "{metrics}"
    );
    eventually(
        "no connection left open",
        Duration::from_secs(5),
        || async {
            // The scrape itself goes to the admin listener, which is not counted.
            sample(&ic.metrics().await, "wakegate_client_connections_open") == 0.0
        },
    )
    .await;
    assert_eq!(
        up.count(),
        1,
        "only the normal request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_and_h2c_connections_are_closed_by_the_idle_timeout() {
    let up = Echo::start().await;
    let ic = Interceptor::start_with(
        &routes(up.addr, &["a.test"], ""),
        &[
            "--client-idle-timeout",
            "700ms",
            "--header-read-timeout",
            "300ms",
        ],
    )
    .await;

    // An idle keep-alive connection lives for the idle timeout, not the header-read timeout,
    // which counts only from a head's first byte: the proxy in front decides when it is done.
    let mut kept = TcpStream::connect(ic.proxy).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    // Idle for longer than the header-read timeout: the passing time is what is tested.
    tokio::time::sleep(Duration::from_millis(450)).await;
    kept.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let reply = read_response(&mut kept).await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "kept alive past the header-read timeout: {reply:?}"
    );
    // A later head that stalls is cut by the header-read timeout from its first byte: the
    // metric says which limit closed it (timing alone cannot tell under emulation).
    let header_closes = |m: &str| {
        sample(
            m,
            r#"wakegate_client_connections_closed_total{reason="header_read_timeout"}"#,
        )
    };
    let before = header_closes(&ic.metrics().await);
    let mut stalled = TcpStream::connect(ic.proxy).await.unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut stalled)
        .await
        .starts_with("HTTP/1.1 200"));
    stalled.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed_within(&mut stalled, Duration::from_secs(5)).await);
    assert_eq!(
        header_closes(&ic.metrics().await),
        before + 1.0,
        "closed by the header-read timeout, not the idle one"
    );

    // HTTP/1.1 keep-alive: one request, then idle.
    let mut h1 = TcpStream::connect(ic.proxy).await.unwrap();
    h1.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = h1.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = Instant::now();
    assert!(closed_within(&mut h1, Duration::from_secs(5)).await);
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(600) && idle < Duration::from_secs(3),
        "HTTP/1.1 idle close after {idle:?}"
    );

    // h2c: one request, then no open stream: GOAWAY, then close.
    let stream = TcpStream::connect(ic.proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let rsp = send
        .send_request(
            Request::get("http://a.test/")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    rsp.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle h2c connection was closed")
        .unwrap()
        .unwrap();
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(600) && idle < Duration::from_secs(3),
        "h2c idle close after {idle:?}"
    );

    // A request that takes longer than the idle timeout is not cut: only idle time counts.
    let slow = ic.get("a.test", "/slow-headers").await;
    assert_eq!(slow.status, StatusCode::OK);

    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_connections_closed_total{reason="idle_timeout"}"#
        ) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_closed_and_open_ones_served() {
    let up = Echo::start().await;
    let ic = Interceptor::start_with(
        &routes(up.addr, &["a.test"], ""),
        &["--max-client-connections", "20"],
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..20 {
        open.push(TcpStream::connect(ic.proxy).await.unwrap());
    }
    eventually(
        "20 connections counted",
        Duration::from_secs(10),
        || async { sample(&ic.metrics().await, "wakegate_client_connections_open") == 20.0 },
    )
    .await;
    let mut over = TcpStream::connect(ic.proxy).await.unwrap();
    let _ = over
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the connection over the cap was closed at once"
    );
    assert!(buf.is_empty(), "nothing was answered over the cap");
    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_connections_closed_total{reason="connection_limit"}"#
        ) >= 1.0,
        "{metrics}"
    );
    // The connections already open are served.
    let first = &mut open[0];
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // Once some close, new connections are taken again.
    open.truncate(10);
    eventually(
        "new connections served again",
        Duration::from_secs(10),
        || async { ic.http.get(ic.proxy, "a.test", "/").await.is_ok() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_a_request_is_routed_by_is_the_one_forwarded() {
    let up = Echo::start().await;
    let ic = Interceptor::start(&routes(
        up.addr,
        &["internal.example", "public.example"],
        "",
    ))
    .await;

    // Absolute form: routed by the target's authority, and that is what the upstream sees.
    let reply = exchange(
        ic.proxy,
        b"GET http://internal.example/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK", "{reply}");
    assert!(reply.contains("\nhost: internal.example\n"), "{reply}");
    assert!(
        reply.contains("\nx-forwarded-host: internal.example\n"),
        "{reply}"
    );
    assert!(!reply.contains("public.example"), "{reply}");

    // Origin form: the Host header routes and is forwarded.
    let reply = exchange(
        ic.proxy,
        b"GET /x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK", "{reply}");
    assert!(reply.contains("\nhost: public.example\n"), "{reply}");

    let before = up.count();
    for (what, request) in [
        (
            "two Host headers",
            &b"GET / HTTP/1.1\r\nHost: public.example\r\nHost: internal.example\r\n\r\n"[..],
        ),
        ("no Host header", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "a Host that is not an authority",
            b"GET / HTTP/1.1\r\nHost: public.example/evil\r\n\r\n",
        ),
        (
            "userinfo in the target",
            b"GET http://user@internal.example/ HTTP/1.1\r\nHost: internal.example\r\n\r\n",
        ),
    ] {
        let reply = exchange(ic.proxy, request).await;
        assert_eq!(
            status_line(&reply),
            "HTTP/1.1 400 Bad Request",
            "{what}: {reply}"
        );
    }
    assert_eq!(up.count(), before, "no bad request reached the upstream");

    // HTTP/2: routed by :authority, which is forwarded as the Host.
    let mut send = h2c(ic.proxy).await;
    let rsp = send
        .send_request(
            Request::get("http://internal.example/h2")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let text =
        String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("\nhost: internal.example\n"), "{text}");
    let rsp = send
        .send_request(
            Request::get("http://internal.example/h2")
                .header("host", "public.example")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        rsp.status(),
        StatusCode::BAD_REQUEST,
        "Host disagreeing with :authority"
    );
    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_errors_total{kind="bad_request",route=""}"#
        ) >= 5.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_kept_from_trusted_peers_and_replaced_from_others() {
    let up = Echo::start().await;
    let config = routes(up.addr, &["a.test"], "");
    let spoof = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: admin.internal\r\nConnection: close\r\n\r\n";

    // The default trusts loopback: the test's peer is an Ingress here.
    let trusting = Interceptor::start(&config).await;
    let reply = exchange(trusting.proxy, spoof).await;
    assert!(
        reply.contains("\nx-forwarded-for: 10.9.9.9, 127.0.0.1\n"),
        "{reply}"
    );
    assert!(reply.contains("\nx-forwarded-proto: https\n"), "{reply}");
    assert!(
        reply.contains("\nx-forwarded-host: admin.internal\n"),
        "{reply}"
    );
    drop(trusting);

    // Trusting only another range, the same peer is a client like any other.
    let strict = Interceptor::start_with(&config, &["--trusted-proxies", "192.0.2.0/24"]).await;
    let reply = exchange(strict.proxy, spoof).await;
    assert!(reply.contains("\nx-forwarded-for: 127.0.0.1\n"), "{reply}");
    assert!(reply.contains("\nx-forwarded-proto: http\n"), "{reply}");
    assert!(reply.contains("\nx-forwarded-host: a.test\n"), "{reply}");
    assert!(
        !reply.contains("10.9.9.9") && !reply.contains("admin.internal"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_abandoned_bodies_are_client_errors_not_upstream_ones() {
    let up = Echo::start().await;
    let ic = Interceptor::start(&routes(up.addr, &["a.test"], "")).await;

    let chunked = "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bad_size = format!("{chunked}5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n");
    let reply = exchange(ic.proxy, bad_size.as_bytes()).await;
    assert_eq!(
        status_line(&reply),
        "HTTP/1.1 400 Bad Request",
        "bad chunk size: {reply}"
    );
    assert!(reply.contains("the request body is malformed"), "{reply}");

    let bare_lf = format!("{chunked}5\nhello\n0\n\n");
    let reply = exchange(ic.proxy, bare_lf.as_bytes()).await;
    assert_eq!(
        status_line(&reply),
        "HTTP/1.1 400 Bad Request",
        "bare LF chunks: {reply}"
    );

    let reply = exchange(
        ic.proxy,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_line(&reply),
        "HTTP/1.1 400 Bad Request",
        "identity, chunked: {reply}"
    );

    // A client that hangs up mid-upload.
    let before = up.count();
    let mut stream = TcpStream::connect(ic.proxy).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\nonly a bit")
        .await
        .unwrap();
    eventually(
        "the upload reached the upstream",
        Duration::from_secs(5),
        || async { up.count() > before },
    )
    .await;
    drop(stream);

    eventually(
        "the hangup counted as the client's",
        Duration::from_secs(5),
        || async {
            let m = ic.metrics().await;
            sample(
                &m,
                r#"wakegate_client_errors_total{kind="client_gone",route="a"}"#,
            ) == 1.0
                && sample(
                    &m,
                    r#"wakegate_requests_total{code="499",method="POST",route="a"}"#,
                ) == 1.0
        },
    )
    .await;
    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_errors_total{kind="malformed_body",route="a"}"#
        ) == 2.0,
        "{metrics}"
    );
    assert!(
        !metrics.contains("wakegate_upstream_errors_total{"),
        "no upstream error was counted: {metrics}"
    );

    // `Upgrade: h2c` is this hop's business: not passed to an HTTP/1.1 upstream.
    let reply = exchange(
        ic.proxy,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK", "{reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(
        !lower.contains("\nupgrade:") && !lower.contains("http2-settings"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_target_over_the_limit_gets_414() {
    let up = Echo::start().await;
    let ic = Interceptor::start(&routes(up.addr, &["a.test"], "")).await;
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "a".repeat(70_000)
    );
    let reply = exchange(ic.proxy, long.as_bytes()).await;
    assert_eq!(status_line(&reply), "HTTP/1.1 414 URI Too Long", "{reply}");
    assert!(
        reply.ends_with("request target too long: over the header size limit\n"),
        "{reply}"
    );

    // On a keep-alive connection, after a first request.
    let mut stream = TcpStream::connect(ic.proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    let _ = stream.write_all(long.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        rest.starts_with(b"HTTP/1.1 414 URI Too Long")
            && rest.ends_with(b"request target too long: over the header size limit\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    // A header block over the limit is still 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let reply = exchange(ic.proxy, big.as_bytes()).await;
    assert_eq!(
        status_line(&reply),
        "HTTP/1.1 431 Request Header Fields Too Large",
        "{reply}"
    );
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_outlives_a_short_response_header_timeout_and_a_trickle_is_cut() {
    let up = Echo::start().await;
    let ic = Interceptor::start_with(
        &routes(up.addr, &["a.test"], ""),
        &[
            "--response-header-timeout",
            "300ms",
            "--header-read-timeout",
            "500ms",
            "--min-request-body-rate",
            "1000",
        ],
    )
    .await;

    // 160 KiB over about 2 s (80 KiB/s): far slower than the response-header timeout, far
    // faster than the minimum rate.
    let chunks = 20;
    let body = StreamBody::new(futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'u'; 8192]))),
            i + 1,
        ))
    }));
    let stream = TcpStream::connect(ic.proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let rsp = send
        .send_request(
            Request::post("/upload")
                .header("host", "a.test")
                .header("content-length", (chunks * 8192).to_string())
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let text =
        String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.starts_with(&format!("{}\n", chunks * 8192)), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(1900));

    // But a response slower than the timeout, once the body is in, is still a 504.
    let slow = ic.get("a.test", "/slow-headers").await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{}", slow.text());

    // Slow POST: a byte every 200 ms is under the minimum rate once the grace is over.
    let started = Instant::now();
    let stream = TcpStream::connect(ic.proxy).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Meanwhile everyone else is served.
    assert_eq!(ic.get("a.test", "/").await.status, StatusCode::OK);
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut reply)).await;
    let took = started.elapsed();
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(
        status_line(&reply),
        "HTTP/1.1 408 Request Timeout",
        "{reply}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    trickle.abort();
    let metrics = ic.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"wakegate_client_errors_total{kind="slow_body",route="a"}"#
        ) == 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_bounds_the_whole_request() {
    let up = Echo::start().await;
    let config = format!(
        "{}{}",
        routes(up.addr, &["a.test"], "    timeouts: { request: 500ms }\n"),
        routes(up.addr, &["b.test"], "    timeouts: { request: 0s }\n")
            .trim_start_matches("routes:\n"),
    );
    let ic = Interceptor::start_with(&config, &["--request-timeout", "1s"]).await;

    // Before the response headers: 504.
    let started = Instant::now();
    let reply = ic.get("a.test", "/slow-headers").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        reply.text(),
        "route a: no response within the request timeout of 500ms\n"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(480) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    // After the headers: the response is cut, and the log says so.
    let rsp = ic.http.get(ic.proxy, "a.test", "/trickle").await;
    assert!(rsp.is_err(), "the response body was cut: {rsp:?}");
    eventually(
        "the log says the response was cut",
        Duration::from_secs(5),
        || async { ic.log().contains("request timeout passed mid-response") },
    )
    .await;

    // `0s` turns the global deadline off for a route.
    let reply = ic.get("b.test", "/slow-headers").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let metrics = ic.metrics().await;
    assert!(
        !metrics.contains("wakegate_upstream_errors_total{"),
        "a request timeout is not the upstream's failure: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_say_what_happened_not_where() {
    let up = Echo::start().await;
    let dead = free_port();
    let config = format!(
        "routes:\n  - name: dead\n    hosts: [\"dead.test\"]\n    target: {{ upstream: \"127.0.0.1:{dead}\" }}\n  - name: tls\n    hosts: [\"tls.test\"]\n    target: {{ upstream: \"{}\", tls: {{}} }}\n  - name: slow\n    hosts: [\"slow.test\"]\n    timeouts: {{ responseHeader: 200ms }}\n    target: {{ upstream: \"{}\" }}\n",
        up.addr, up.addr
    );
    let ic = Interceptor::start(&config).await;
    let cases = [
        (
            "dead.test",
            "/",
            StatusCode::BAD_GATEWAY,
            "route dead: could not connect to the upstream\n",
            "connect",
        ),
        (
            "tls.test",
            "/",
            StatusCode::BAD_GATEWAY,
            "route tls: TLS with the upstream failed\n",
            "tls",
        ),
        (
            "slow.test",
            "/slow-headers",
            StatusCode::GATEWAY_TIMEOUT,
            "route slow: the upstream sent no response headers within 200ms\n",
            "response_header_timeout",
        ),
    ];
    for (host, path, status, text, kind) in cases {
        let reply = ic.get(host, path).await;
        assert_eq!(reply.status, status, "{host}");
        assert_eq!(reply.text(), text, "{host}");
        let route = host.trim_end_matches(".test");
        let metrics = ic.metrics().await;
        assert!(
            metrics.contains(&format!(
                "wakegate_upstream_errors_total{{kind=\"{kind}\",route=\"{route}\"}} 1"
            )),
            "{metrics}"
        );
    }
    // The log keeps the address for the operator.
    assert!(
        ic.log().contains(&format!("127.0.0.1:{dead}")),
        "{}",
        ic.log()
    );
}

/// A request head read from `conn`, up to its blank line; `None` if it closes first.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(head)
}

/// An upstream that answers the first request on each connection and keeps it open, then
/// closes it without answering when the next request arrives: what an app with a short
/// keep-alive timeout does when its close crosses the proxy's reuse of the connection.
/// Each answered request's head is recorded.
async fn closes_reused_connections() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut conn).await else {
                    return;
                };
                count.lock().unwrap().push(head);
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // The next request on this connection is read, then the connection dropped.
                let _ = conn.read(&mut [0u8; 8192]).await;
            });
        }
    });
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_on_a_connection_the_upstream_closed_is_sent_again() {
    let (upstream, answered) = closes_reused_connections().await;
    let config = format!(
        "routes:\n  - name: app\n    hosts: [\"app.test\"]\n    target: {{ upstream: \"{upstream}\" }}\n"
    );
    let ic = Interceptor::start(&config).await;
    let http = Http::default();
    // The first GET opens the pooled connection; the second is sent on it, meets the close,
    // and is sent again on a new connection, and so is the third.
    for i in 0..3 {
        let req = Request::get(format!("http://{}/items?page={i}&q=a%20b", ic.proxy))
            .header("host", "app.test")
            .header("x-tag", "one")
            .header("x-tag", "two")
            .header(
                "x-note",
                HeaderValue::from_bytes(b"caf\xc3\xa9 \"q\"").unwrap(),
            )
            .body(Full::default())
            .unwrap();
        let reply = http.send(req).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "GET {i}: {}", reply.text());
    }
    // The requests sent again (the second and third) arrive as the first did: request line,
    // Host, repeated fields in order, and a non-ASCII value byte for byte.
    let heads = answered.lock().unwrap().clone();
    assert_eq!(heads.len(), 3);
    for (i, head) in heads.iter().enumerate() {
        let text = String::from_utf8_lossy(head);
        assert!(
            head.starts_with(format!("GET /items?page={i}&q=a%20b HTTP/1.1\r\n").as_bytes()),
            "{text}"
        );
        assert!(text.contains("host: app.test\r\n"), "{text}");
        assert!(text.contains("x-tag: one\r\nx-tag: two\r\n"), "{text}");
        assert!(
            head.windows(17).any(|w| w == b"x-note: caf\xc3\xa9 \"q\""),
            "{text}"
        );
    }
    // A POST with a body is not sent twice: its failure is the upstream's.
    let _ = ic.get("app.test", "/").await;
    let post = Request::post(format!("http://{}/", ic.proxy))
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(b"order=1")))
        .unwrap();
    let reply = http.send(post).await.unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(
        reply.text().contains("failed before sending a response"),
        "{}",
        reply.text()
    );
}

/// An upstream that closed a pooled connection while it sat idle (its keep-alive timeout ran
/// out): the close has arrived, so the pool never hands that connection out, and a request
/// that is never sent twice (a POST) goes up on a new connection instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let mut close = close_rx.clone();
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                while read_head(&mut conn).await.is_some() {
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // The first connection is closed, idle, once the test says so, and the
                    // test hears of it only once the socket is closed.
                    if close.wait_for(|c| *c).await.is_ok() {
                        drop(conn);
                        let _ = closed.send(());
                        return;
                    }
                }
            });
        }
    });
    let config = format!(
        "routes:\n  - name: app\n    hosts: [\"app.test\"]\n    target: {{ upstream: \"{upstream}\" }}\n"
    );
    let ic = Interceptor::start(&config).await;
    let first = ic.get("app.test", "/").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    close_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
        .await
        .expect("the upstream closes its idle connection")
        .unwrap();
    let post = Request::post(format!("http://{}/", ic.proxy))
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(b"order=1")))
        .unwrap();
    let reply = Http::default().send(post).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An upstream that closes every connection unanswered, new ones too (one at its connection
/// limit does this to a burst): an idempotent request is sent once more, on another new
/// connection, and no more; then it is answered 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_on_a_new_connection_is_sent_once_more_and_no_more() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                if read_head(&mut conn).await.is_some() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                // Dropped without an answer.
            });
        }
    });
    let config = format!(
        "routes:\n  - name: app\n    hosts: [\"app.test\"]\n    target: {{ upstream: \"{upstream}\" }}\n"
    );
    let ic = Interceptor::start(&config).await;
    let reply = ic.get("app.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(
        heads.load(Ordering::SeqCst),
        2,
        "the GET reached the upstream twice"
    );
}

/// An upstream whose responses arrive in pieces, with pauses between them: the status line,
/// then the rest of the head, then the body in three parts. Requests without a body are
/// polled quietly once they are written (the proxy keeps hyper from waking its task for
/// nothing), so only the socket wakes them: every piece must still be taken as it comes, on a
/// new upstream connection and on one reused from the pool alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_arrives_in_pieces_is_taken_as_they_come() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let pause = || tokio::time::sleep(Duration::from_millis(150));
                while read_head(&mut conn).await.is_some() {
                    let pieces: [&[u8]; 5] = [
                        b"HTTP/1.1 200 OK\r\n",
                        b"content-type: text/plain\r\ncontent-length: 9\r\n\r\n",
                        b"one",
                        b"two",
                        b"six",
                    ];
                    for piece in pieces {
                        pause().await;
                        if conn.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let config = format!(
        "routes:\n  - name: app\n    hosts: [\"app.test\"]\n    target: {{ upstream: \"{upstream}\" }}\n"
    );
    // Without parking, the connection's watchdog looks only every few seconds: it cannot
    // stand in for a wakeup the socket should have given (with parking on, it looks every
    // 100 ms, and a lost wakeup would only be slow).
    let ic = Interceptor::start_with(&config, &["--park-idle-after", "0s"]).await;
    // One client connection, three requests in turn: the first dials, the others reuse the
    // pooled connection.
    let stream = TcpStream::connect(ic.proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("/piece/{i}"))
            .header("host", "app.test")
            .body(Full::<Bytes>::default())
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            // The client connection takes the next request once it has seen the last one end.
            send.ready().await.unwrap();
            let rsp = send.send_request(req).await.unwrap();
            let status = rsp.status();
            (status, rsp.into_body().collect().await.unwrap().to_bytes())
        })
        .await
        .unwrap_or_else(|_| panic!("request {i} was never answered in full"));
        assert_eq!(reply.0, StatusCode::OK, "request {i}");
        assert_eq!(&reply.1[..], b"onetwosix", "request {i}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the later requests reused the upstream connection"
    );
}
