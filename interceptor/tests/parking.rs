//! Holding a request at a cold target both ways: parked before hyper (a new plaintext
//! connection's first request, kept as its bare socket) and held in hyper (a later request on a
//! keep-alive connection). Both count, cap, wake, time out and forget a client that leaves the
//! same way. And idle keep-alive connections parked (`--park-idle-after`): taken back from
//! hyper, kept as their socket, served again (or held) when their next request comes, closed at
//! the idle timeout and at shutdown, and never cut while hyper still has bytes to write.
//! Through the real binary, over raw sockets so that each connection is known.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a `content-length` body: (head, body). It reads no byte
/// past the response, so pipelined responses that arrive in one segment are each read whole.
async fn read_response(conn: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(Duration::from_secs(60), conn.read_u8())
            .await
            .expect("a response head within 60 s");
        match byte {
            Ok(byte) => head.push(byte),
            Err(err) => panic!("connection closed before a whole response ({err}): {head:?}"),
        }
    }
    let head = String::from_utf8_lossy(&head[..head.len() - 4]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; len];
    tokio::time::timeout(Duration::from_secs(60), conn.read_exact(&mut body))
        .await
        .expect("a response body within 60 s")
        .unwrap_or_else(|err| panic!("connection closed in the body ({err}): {head}"));
    (head, String::from_utf8_lossy(&body).into_owned())
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
    let ic = Interceptor::start_with(&config, &["--park-idle-after", "0s"]).await;

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

async fn warm_interceptor(args: &[&str]) -> (Upstream, Interceptor) {
    let warm = Upstream::start("warm", Duration::ZERO).await;
    let config = format!(
        "routes:\n  - name: warm\n    hosts: [\"warm.test\"]\n    target: {{ upstream: \"{}\" }}\n",
        warm.addr
    );
    let ic = Interceptor::start_with(&config, args).await;
    (warm, ic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_requests() {
    let (warm, ic) = warm_interceptor(&[]).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "warm.test", "/one").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.starts_with("warm /one"), "{body}");
    // Idle past --park-idle-after (100ms): hyper lets go of it, the socket stays open.
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    send_get(&mut conn, "warm.test", "/two").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.starts_with("warm /two"), "{body}");
    // Parked again; then two pipelined requests in one write are both answered, in order.
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    conn.write_all(b"GET /three HTTP/1.1\r\nhost: warm.test\r\n\r\nGET /four HTTP/1.1\r\nhost: warm.test\r\n\r\n")
        .await
        .unwrap();
    let (_, three) = read_response(&mut conn).await;
    let (_, four) = read_response(&mut conn).await;
    assert!(three.starts_with("warm /three"), "{three}");
    assert!(four.starts_with("warm /four"), "{four}");
    assert_eq!(warm.count(), 4);
    // The client leaves while parked: the connection is gone.
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    drop(conn);
    metric_line(&ic, "wakegate_client_connections_idle_parked 0").await;
    metric_line(&ic, "wakegate_client_connections_open 0").await;
}

/// A parked idle connection older than the header-read timeout whose next head comes in two
/// writes: its head's deadline runs from the head's first byte, not from accept, so it is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_idle_connections_next_head_in_pieces_is_served() {
    let (warm, ic) = warm_interceptor(&["--header-read-timeout", "300ms"]).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    let accepted = tokio::time::Instant::now();
    send_get(&mut conn, "warm.test", "/one").await;
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    // Not synchronisation: the connection is to outlive its first head's deadline, parked.
    tokio::time::sleep_until(accepted + Duration::from_millis(400)).await;
    conn.write_all(b"GET /two HTTP/1.1\r\nho").await.unwrap();
    // The partial head takes the connection out of parking, back to hyper.
    metric_line(&ic, "wakegate_client_connections_idle_parked 0").await;
    conn.write_all(b"st: warm.test\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.starts_with("warm /two"), "{body}");
    assert_eq!(warm.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_idle_connection_whose_target_went_to_zero_holds_its_next_request() {
    let port = free_port_below_ephemeral();
    let route = backend_route(
        "nap",
        "nap.test",
        port,
        "0s",
        "    scaledownPeriod: 300ms\n",
    );
    let ic = Interceptor::start(&format!("routes:\n{route}")).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "nap.test", "/first").await;
    let (head, _) = read_response(&mut conn).await;
    assert!(head.contains("x-keda-http-cold-start: true"), "{head}");
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    eventually("nap is back at zero", Duration::from_secs(30), || async {
        ic.target("nap").await["readyEndpoints"] == 0
    })
    .await;
    // The next request on the kept connection is held as a parked one, wakes the target and
    // is answered on the same connection.
    send_get(&mut conn, "nap.test", "/second").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-keda-http-cold-start: true"), "{head}");
    assert!(body.ends_with("at /second\n"), "{body}");
    metric_line(&ic, "wakegate_cold_starts_total{route=\"nap\"} 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_idle_connection_is_closed_at_its_idle_timeout_and_at_shutdown() {
    let (_warm, mut ic) = warm_interceptor(&["--client-idle-timeout", "1s"]).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "warm.test", "/").await;
    read_response(&mut conn).await;
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte))
        .await
        .expect("closed within the idle timeout")
        .unwrap();
    assert_eq!(n, 0, "closed, not answered");
    metric_line(
        &ic,
        "wakegate_client_connections_closed_total{reason=\"idle_timeout\"} 1",
    )
    .await;
    metric_line(&ic, "wakegate_client_connections_idle_parked 0").await;

    // Shutdown: a parked idle connection is closed at once; nothing is in flight to drain.
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    send_get(&mut conn, "warm.test", "/").await;
    read_response(&mut conn).await;
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    ic.signal(nix::sys::signal::Signal::SIGTERM);
    let status = ic.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", ic.log());
    assert!(
        ic.log()
            .contains("drain complete: every in-flight request finished"),
        "{}",
        ic.log()
    );
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_an_idle_connection_never_cuts_a_response_hyper_is_still_writing() {
    let port = free_port_below_ephemeral();
    let route = backend_route("big", "big.test", port, "0s", "");
    let ic = Interceptor::start(&format!("routes:\n{route}")).await;
    let mut conn = TcpStream::connect(ic.proxy).await.unwrap();
    // 16 MiB in one chunk: its body ends (nothing is in flight) at once, while most of it
    // still waits in hyper for a client that does not read yet.
    let size: usize = 16 << 20;
    send_get(&mut conn, "big.test", &format!("/bytes?n={size}")).await;
    // The client stays away past --park-idle-after several times over (its behaviour under
    // test, not a wait for the interceptor).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut got = Vec::with_capacity(size + 1024);
    let mut chunk = vec![0u8; 1 << 16];
    let body_start = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&chunk[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    while got.len() < body_start + size {
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "cut after {} of {size} body bytes",
            got.len() - body_start
        );
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got.len(), body_start + size);
    // Then the connection is parked like any idle one, and serves on.
    metric_line(&ic, "wakegate_client_connections_idle_parked 1").await;
    send_get(&mut conn, "big.test", "/after").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.ends_with("at /after\n"), "{body}");
}
