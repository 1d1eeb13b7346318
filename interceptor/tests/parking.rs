//! Holding a request at a cold target both ways: parked before hyper (a new plaintext
//! connection's first request, kept as its bare socket) and held in hyper (a later request on a
//! keep-alive connection). Both count, cap, wake, time out and forget a client that leaves the
//! same way. Through the real binary, over raw sockets so that each connection is known.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a `content-length` body: (head, body).
async fn read_response(conn: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut chunk))
            .await
            .expect("a response within 60 s")
            .unwrap();
        assert!(n > 0, "connection closed before a whole response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn send_get(conn: &mut TcpStream, host: &str, path: &str) {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
}

fn gated(name: &str, extra: &str) -> (String, tempfile::TempDir, std::path::PathBuf) {
    let port = free_port_below_ephemeral();
    let gate = tempfile::tempdir().unwrap();
    let file = gate.path().join("open");
    let route = gated_backend_route(name, &format!("{name}.test"), port, &file, extra);
    (route, gate, file)
}

async fn metric_line(ic: &Interceptor, line: &str) {
    eventually(line, Duration::from_secs(20), || async {
        ic.metrics().await.lines().any(|l| l == line)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_at_a_cold_target_is_parked_then_served_with_keep_alive() {
    let (route, _gate, open) = gated("park", "    timeouts: { readiness: 120s }\n");
    let ic = Interceptor::start(&format!("routes:\n{route}")).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "park.test", "/p").await;
    // Counted as held and in flight while parked, and it woke the target.
    metric_line(&ic, "wakegate_held_requests{route=\"park\"} 1").await;
    metric_line(&ic, "wakegate_in_flight_requests{route=\"park\"} 1").await;
    assert!(ic.log().contains("request parked"), "{}", ic.log());
    std::fs::write(&open, b"").unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-keda-http-cold-start: true"), "{head}");
    assert!(body.ends_with("at /p\n"), "{body}");
    // The connection goes on as any keep-alive connection.
    send_get(&mut conn, "park.test", "/again").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.contains("x-keda-http-cold-start: false"), "{head}");
    assert!(body.ends_with("at /again\n"), "{body}");
    let metrics = ic.metrics().await;
    for line in [
        "interceptor_cold_start_duration_seconds_count{outcome=\"waited\",route_name=\"park\",route_namespace=\"\"} 1",
        "wakegate_cold_starts_total{route=\"park\"} 1",
        "wakegate_held_requests{route=\"park\"} 0",
        "wakegate_requests_total{code=\"200\",method=\"GET\",route=\"park\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_while_parked_is_forgotten_at_once() {
    let (route, _gate, _open) = gated("gone", "    timeouts: { readiness: 120s }\n");
    let ic = Interceptor::start(&format!("routes:\n{route}")).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "gone.test", "/").await;
    metric_line(&ic, "wakegate_held_requests{route=\"gone\"} 1").await;
    drop(conn);
    metric_line(&ic, "wakegate_held_requests{route=\"gone\"} 0").await;
    metric_line(&ic, "wakegate_in_flight_requests{route=\"gone\"} 0").await;
    metric_line(
        &ic,
        "interceptor_cold_start_duration_seconds_count{outcome=\"cancelled\",route_name=\"gone\",route_namespace=\"\"} 1",
    )
    .await;
    metric_line(
        &ic,
        "wakegate_requests_total{code=\"499\",method=\"GET\",route=\"gone\"} 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_request_at_a_cold_target_is_held_in_hyper() {
    let warm = Upstream::start("warm", Duration::ZERO).await;
    let (route, _gate, open) = gated("later", "    timeouts: { readiness: 120s }\n");
    let config = format!(
        "routes:\n  - name: warm\n    hosts: [\"warm.test\"]\n    target: {{ upstream: \"{}\" }}\n{route}",
        warm.addr
    );
    let ic = Interceptor::start(&config).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "warm.test", "/").await;
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // The second request on the connection: hyper has the connection already.
    send_get(&mut conn, "later.test", "/held").await;
    metric_line(&ic, "wakegate_held_requests{route=\"later\"} 1").await;
    assert!(!ic.log().contains("request parked"), "{}", ic.log());
    std::fs::write(&open, b"").unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.contains("x-keda-http-cold-start: true"), "{head}");
    assert!(body.ends_with("at /held\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_and_in_hyper_holds_time_out_and_overflow_alike() {
    let warm = Upstream::start("warm", Duration::ZERO).await;
    let (route, _gate, _open) = gated(
        "slow",
        "    timeouts: { readiness: 300ms }\n    coldStart: { maxPendingRequests: 1 }\n",
    );
    let config = format!(
        "routes:\n  - name: warm\n    hosts: [\"warm.test\"]\n    target: {{ upstream: \"{}\" }}\n{route}",
        warm.addr
    );
    let ic = Interceptor::start(&config).await;

    // The readiness timeout: parked, then held in hyper.
    let mut parked = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut parked, "slow.test", "/").await;
    let (parked_head, parked_body) = read_response(&mut parked).await;
    let mut kept = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut kept, "warm.test", "/").await;
    read_response(&mut kept).await;
    send_get(&mut kept, "slow.test", "/").await;
    let (kept_head, kept_body) = read_response(&mut kept).await;
    for (head, body) in [(&parked_head, &parked_body), (&kept_head, &kept_body)] {
        assert!(head.starts_with("http/1.1 504"), "{head}");
        assert!(
            body.starts_with("route slow: target slow had no ready endpoint after waiting"),
            "{body}"
        );
    }
    metric_line(
        &ic,
        "interceptor_cold_start_duration_seconds_count{outcome=\"timeout\",route_name=\"slow\",route_namespace=\"\"} 2",
    )
    .await;

    // The cap: one parked request fills it; the next is refused with the cap's 503, whether it
    // would have been parked or held in hyper.
    let mut first = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut first, "slow.test", "/").await;
    metric_line(&ic, "wakegate_held_requests{route=\"slow\"} 1").await;
    let mut new_conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut new_conn, "slow.test", "/").await;
    let (head, body) = read_response(&mut new_conn).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    send_get(&mut kept, "slow.test", "/").await;
    let (kept_head, kept_body) = read_response(&mut kept).await;
    assert!(kept_head.starts_with("http/1.1 503"), "{kept_head}");
    assert_eq!(body, kept_body);
    let (head, _) = read_response(&mut first).await;
    assert!(head.starts_with("http/1.1 504"), "{head}");
}
