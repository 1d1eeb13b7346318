//! Hostile input through the real binary: each case gets its own status and forwards nothing
//! (a smuggling attempt forwards only its front request, framed safely).

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw bytes and returns the response's status line ("" when the connection closed first).
async fn raw(ic: &Interceptor, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    // The server may answer and close before it has read everything; that is fine.
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_own_status_and_reach_nothing() {
    let up = Upstream::start("up", Duration::ZERO).await;
    let config = format!(
        "routes:\n  - name: up\n    hosts: [\"*\"]\n    target: {{ upstream: \"{}\" }}\n",
        up.addr
    );
    let ic = Interceptor::start_with(&config, &["--header-read-timeout", "500ms"]).await;

    let mut big = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend(b"\r\n\r\n");
    assert_eq!(
        raw(&ic, &big).await,
        "HTTP/1.1 431 Request Header Fields Too Large",
        "oversized header block"
    );

    let mut many = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..200 {
        many.extend(format!("X-{i}: 1\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    assert_eq!(
        raw(&ic, &many).await,
        "HTTP/1.1 431 Request Header Fields Too Large",
        "too many headers"
    );

    // A smuggling attempt: Content-Length says the body is 5 bytes, chunked framing says it ends
    // at "0\r\n\r\n", and a second request hides behind. The length is dropped, the body is
    // framed by chunks, and the connection closes after one response: the hidden request never
    // reaches the upstream.
    let smuggle = b"POST /front HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    stream.write_all(smuggle).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("the connection closes")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(
        reply.matches("HTTP/1.1 ").count(),
        1,
        "one response, then close: {reply}"
    );
    assert!(!reply.contains("/smuggled"), "{reply}");
    assert!(
        !reply.contains("content-length: 5"),
        "the conflicting length was not forwarded: {reply}"
    );
    let forwarded = up.count();
    assert_eq!(forwarded, 1, "only the front request reached the upstream");

    let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    assert_eq!(
        raw(&ic, connect).await,
        "HTTP/1.1 405 Method Not Allowed",
        "CONNECT"
    );

    let garbage = b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n";
    assert_eq!(
        raw(&ic, garbage).await,
        "HTTP/1.1 400 Bad Request",
        "not HTTP"
    );

    let started = Instant::now();
    let slow = raw(&ic, b"GET / HTTP/1.1\r\nHo").await;
    let took = started.elapsed();
    assert!(
        slow.is_empty() || slow.starts_with("HTTP/1.1 408"),
        "slow header sender: {slow:?}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "cut by the header-read timeout: {took:?}"
    );

    assert_eq!(up.count(), forwarded, "nothing else reached the upstream");
    // The proxy still serves.
    assert_eq!(ic.get("a.test", "/").await.status, http::StatusCode::OK);
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="405",method="CONNECT",route=""} 1"#),
        "{metrics}"
    );
}
