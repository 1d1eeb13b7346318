//! Routing and forwarding through the real binary: 404 for unknown hosts with nothing forwarded,
//! wildcard / path-segment / header precedence, forwarding headers, the per-endpoint cap.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;

fn upstream_route(name: &str, up: &Upstream, matching: &str) -> String {
    format!(
        "  - name: {name}\n{matching}    target: {{ upstream: \"{}\" }}\n",
        up.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_gets_404_and_nothing_is_forwarded() {
    let up = Upstream::start("known", Duration::ZERO).await;
    let config = format!(
        "routes:\n{}",
        upstream_route("known", &up, "    hosts: [known.test]\n")
    );
    let ic = Interceptor::start(&config).await;

    let reply = ic.get("unknown.test:8080", "/anything").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.text(), "no route for host \"unknown.test:8080\"\n");
    assert_eq!(reply.headers["content-type"], "text/plain; charset=utf-8");

    // An absolute-form request names its host in the URI; it is routed by that, not forwarded.
    let mut stream = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET http://elsewhere.test/x HTTP/1.1\r\nHost: known.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert!(
        raw.contains("no route for host \"elsewhere.test\""),
        "{raw}"
    );

    assert_eq!(up.count(), 0, "nothing reached the upstream");
    assert_eq!(ic.get("KNOWN.test", "/").await.status, StatusCode::OK);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_path_and_header_precedence() {
    let names = [
        "catchall",
        "wild",
        "deepwild",
        "exact",
        "exactapi",
        "canary",
        "canaryyes",
    ];
    let mut ups = Vec::new();
    for name in names {
        ups.push(Upstream::start(name, Duration::ZERO).await);
    }
    let config = format!(
        "routes:\n{}{}{}{}{}{}{}",
        upstream_route("catchall", &ups[0], "    hosts: [\"*\"]\n"),
        upstream_route("wild", &ups[1], "    hosts: [\"*.example.test\"]\n"),
        upstream_route("deepwild", &ups[2], "    hosts: [\"*.b.example.test\"]\n"),
        upstream_route("exact", &ups[3], "    hosts: [a.example.test]\n"),
        upstream_route("exactapi", &ups[4], "    hosts: [a.example.test]\n    pathPrefixes: [/api]\n"),
        upstream_route("canary", &ups[5], "    hosts: [a.example.test]\n    pathPrefixes: [/api]\n    headers: [{ name: x-canary }]\n"),
        upstream_route("canaryyes", &ups[6], "    hosts: [a.example.test]\n    pathPrefixes: [/api]\n    headers: [{ name: x-canary, value: \"yes\" }]\n"),
    );
    let ic = Interceptor::start(&config).await;
    let who = |host: &'static str, path: &'static str, canary: Option<&'static str>| {
        let http = ic.http.clone();
        let proxy = ic.proxy;
        async move {
            let mut req = Request::get(format!("http://{proxy}{path}")).header("host", host);
            if let Some(v) = canary {
                req = req.header("x-canary", v);
            }
            let reply = http
                .send(req.body(Full::<Bytes>::default()).unwrap())
                .await
                .unwrap();
            reply.text().split(' ').next().unwrap().to_owned()
        }
    };
    assert_eq!(who("a.example.test", "/", None).await, "exact");
    assert_eq!(who("a.example.test", "/api", None).await, "exactapi");
    assert_eq!(who("a.example.test", "/api/v1", None).await, "exactapi");
    assert_eq!(
        who("a.example.test", "/apix", None).await,
        "exact",
        "prefixes match whole segments"
    );
    assert_eq!(who("a.example.test", "/api/v1", Some("no")).await, "canary");
    assert_eq!(
        who("a.example.test", "/api/v1", Some("yes")).await,
        "canaryyes"
    );
    assert_eq!(who("a.example.test", "/web", Some("yes")).await, "exact");
    assert_eq!(who("z.example.test", "/", None).await, "wild");
    assert_eq!(who("c.b.example.test", "/", None).await, "deepwild");
    assert_eq!(who("example.test", "/", None).await, "catchall");
    assert_eq!(who("other.test:9999", "/", None).await, "catchall");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_kept_hop_by_hop_headers_dropped_and_forwarding_headers_set() {
    let up = Upstream::start("up", Duration::ZERO).await;
    let config = format!(
        "routes:\n{}",
        upstream_route("up", &up, "    hosts: [app.test]\n")
    );
    let ic = Interceptor::start(&config).await;
    let req = Request::get(format!("http://{}/p?q=1", ic.proxy))
        .header("host", "App.test:8080")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-custom", "kept")
        .body(Full::<Bytes>::default())
        .unwrap();
    let reply = ic.http.send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.text();
    assert!(seen.starts_with("up /p?q=1\n"), "{seen}");
    assert!(seen.contains("host: App.test:8080\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: App.test:8080\n"), "{seen}");
    assert!(seen.contains("x-custom: kept\n"), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");
    assert!(!seen.contains("te: trailers"), "{seen}");
    assert_eq!(reply.cold_start(), Some("false"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_endpoint_cap_limits_requests_in_flight_and_holds_the_rest() {
    let up = Upstream::start("capped", Duration::from_millis(200)).await;
    let config = format!(
        "routes:\n{}",
        upstream_route(
            "capped",
            &up,
            "    hosts: [capped.test]\n    maxInFlightPerEndpoint: 2\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(ic.spawn_get("capped.test", "/"));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, StatusCode::OK);
    }
    assert_eq!(up.count(), 8);
    assert_eq!(
        up.peak.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "never more than the cap at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_gives_502_at_once() {
    let port = free_port();
    let config =
        format!("routes:\n  - name: down\n    target: {{ upstream: \"127.0.0.1:{port}\" }}\n");
    let ic = Interceptor::start(&config).await;
    let started = std::time::Instant::now();
    let reply = ic.get("any.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // The address is the operator's business (the log has it), not the client's.
    assert_eq!(
        reply.text(),
        "route down: could not connect to the upstream\n"
    );
    assert!(ic.log().contains(&format!("127.0.0.1:{port}")));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no retries for an endpoint that was never cold"
    );
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_upstream_errors_total{kind="connect",route="down"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_504_after_the_response_header_timeout() {
    let up = Upstream::start("slow", Duration::from_secs(3)).await;
    let config = format!(
        "routes:\n{}",
        upstream_route("slow", &up, "    timeouts: { responseHeader: 200ms }\n")
    );
    let ic = Interceptor::start(&config).await;
    let reply = ic.get("slow.test", "/").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        reply.text(),
        "route slow: the upstream sent no response headers within 200ms\n"
    );
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(
            r#"wakegate_upstream_errors_total{kind="response_header_timeout",route="slow"} 1"#
        ),
        "{metrics}"
    );
}

/// Each request on a keep-alive connection gets its own response-header deadline: later (a
/// fast route's 30 s after a slow one's 200 ms) and earlier again. Each slow request gets its
/// 504 after its own 200 ms, neither sooner (a deadline left from the request before) nor later
/// (the fast route's; the slow upstream would answer 200 after 3 s).
///
/// Here the connection's watchdog looks every 100 ms while a request is in flight (the default
/// `--park-idle-after`), so it keeps each deadline with its own timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_header_timeout_holds_for_every_request_on_a_keep_alive_connection() {
    response_header_timeouts_on_one_connection(&[]).await;
}

/// The same where the watchdog next looks only after the deadline (no parking: it looks every
/// header-read timeout, 10 s): each request has a timer, kept by the connection between
/// requests and moved to each one's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_before_the_watchdog_looks_has_a_timer_of_its_own() {
    response_header_timeouts_on_one_connection(&["--park-idle-after", "0s"]).await;
}

async fn response_header_timeouts_on_one_connection(args: &[&str]) {
    let slow = Upstream::start("slow", Duration::from_secs(3)).await;
    let fast = Upstream::start("fast", Duration::ZERO).await;
    let config = format!(
        "routes:\n{}{}",
        upstream_route(
            "slow",
            &slow,
            "    hosts: [slow.test]\n    timeouts: { responseHeader: 200ms }\n"
        ),
        upstream_route(
            "fast",
            &fast,
            "    hosts: [fast.test]\n    timeouts: { responseHeader: 30s }\n"
        ),
    );
    let ic = Interceptor::start_with(&config, args).await;
    let stream = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for host in [
        "slow.test",
        "fast.test",
        "slow.test",
        "fast.test",
        "slow.test",
    ] {
        let req = Request::get("/")
            .header("host", host)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        // hyper's HTTP/1 sender takes a request only once the connection has finished the
        // one before; under a slow emulator that can trail the end of the body.
        sender.ready().await.unwrap();
        let sent = std::time::Instant::now();
        let rsp = sender.send_request(req).await.unwrap();
        let took = sent.elapsed();
        let status = rsp.status();
        // Read to the end, so that the connection is free for the next request.
        http_body_util::BodyExt::collect(rsp.into_body())
            .await
            .unwrap();
        if host == "fast.test" {
            assert_eq!(status, StatusCode::OK, "{host}");
        } else {
            assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{host}");
            assert!(
                took >= Duration::from_millis(190),
                "{host}: 504 after only {took:?}"
            );
        }
    }
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(
            r#"wakegate_upstream_errors_total{kind="response_header_timeout",route="slow"} 3"#
        ),
        "{metrics}"
    );
}

/// Whatever form the client's request target came in, the upstream's request line is in origin
/// form, with the routed authority as Host: HTTP/1.1 in origin form (sent on as it came),
/// HTTP/1.1 in absolute form, and h2c (whose URI carries `:scheme` and `:authority`). Each one
/// is sent twice on its connection, so the second goes up on a pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_origin_form_whatever_form_the_client_used() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = Upstream::start("known", Duration::ZERO).await;
    let config = format!(
        "routes:\n{}",
        upstream_route("known", &up, "    hosts: [known.test]\n")
    );
    let ic = Interceptor::start(&config).await;
    let echoed = |text: &str| {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default().to_owned();
        let host = lines
            .find_map(|l| l.strip_prefix("host: "))
            .unwrap_or_default()
            .to_owned();
        (first, host)
    };
    let expected = ("known /x?y=1".to_owned(), "known.test".to_owned());

    for _ in 0..2 {
        let reply = ic.get("known.test", "/x?y=1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(echoed(&reply.text()), expected, "origin form");
    }

    let mut stream = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    for close in [false, true] {
        let head = format!(
            "GET http://known.test/x?y=1 HTTP/1.1\r\nHost: known.test\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        if !close {
            // The first answer is read in full before the second request goes.
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&raw).contains("host: known.test") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
                raw.extend_from_slice(&buf[..n]);
            }
            let raw = String::from_utf8_lossy(&raw).into_owned();
            let body = raw.split_once("\r\n\r\n").unwrap().1;
            assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
            assert!(body.starts_with("known /x?y=1\n"), "absolute form: {raw}");
        }
    }
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(
        echoed(body),
        expected,
        "absolute form, second request: {raw}"
    );

    let mut send = h2c(ic.proxy).await;
    for _ in 0..2 {
        let rsp = send
            .send_request(
                Request::get("http://known.test/x?y=1")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed(&String::from_utf8_lossy(&body)), expected, "h2c");
    }
    assert_eq!(up.count(), 6);
}
