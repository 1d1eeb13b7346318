//! Holding requests through a cold start: a backend that binds late, bodies kept intact, the
//! readiness timeout, client disconnects, and the counts `/queue` and `/metrics` report.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_held_requests_all_get_200_once_the_backend_binds() {
    let port = free_port_below_ephemeral();
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let config = format!(
        "routes:\n{}",
        gated_backend_route(
            "hello",
            "hello.test",
            port,
            &gate_file,
            "    timeouts: { readiness: 120s }\n"
        )
    );
    let ic = Interceptor::start(&config).await;

    let mut tasks = Vec::new();
    for i in 0..1000 {
        let http = ic.http.clone();
        let proxy = ic.proxy;
        tasks.push(tokio::spawn(async move {
            http.get(proxy, "hello.test", &format!("/r/{i}")).await
        }));
    }
    // All of them are held at once: the backend is still booting.
    ic.wait_concurrency("hello", 1000).await;
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains("wakegate_held_requests{route=\"hello\"} 1000"),
        "{metrics}"
    );
    // Now the backend may boot.
    std::fs::write(&gate_file, b"").unwrap();

    let mut cold = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = task.await.unwrap().unwrap();
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
        assert!(
            reply.text().ends_with(&format!("at /r/{i}\n")),
            "{}",
            reply.text()
        );
        if reply.cold_start() == Some("true") {
            cold += 1;
        }
    }
    assert_eq!(cold, 1000, "every request waited for the cold start");
    let queue = ic.queue().await;
    assert_eq!(queue["hello"]["Concurrency"], 0);
    assert_eq!(queue["hello"]["RequestCount"], 1000);
    let target = ic.target("hello").await;
    assert_eq!(
        target["starts"], 1,
        "one process for all held requests: {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_body_sent_during_a_cold_start_arrives_intact() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("echo", "echo.test", port, "300ms", "")
    );
    let ic = Interceptor::start(&config).await;
    // 4 MiB of varied bytes: bigger than any socket buffer, so it has to stream.
    let body: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{}/echo", ic.proxy))
        .header("host", "echo.test")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let reply = ic.http.send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cold_start(), Some("true"));
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "echoed body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_timeout_gives_504_naming_what_was_awaited() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "slow",
            "slow.test",
            port,
            "60s",
            "    timeouts: { readiness: 300ms }\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let started = std::time::Instant::now();
    let reply = ic.get("slow.test", "/").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        reply
            .text()
            .contains("route slow: target slow had no ready endpoint after waiting"),
        "{}",
        reply.text()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(ic.queue().await["slow"]["Concurrency"], 0);
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="504",method="GET",route="slow"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_leaves_the_counts_at_once() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "gone",
            "gone.test",
            port,
            "60s",
            "    timeouts: { readiness: 60s }\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ic.spawn_get("gone.test", "/"));
    }
    ic.wait_concurrency("gone", 3).await;
    assert!(ic
        .metrics()
        .await
        .contains("wakegate_held_requests{route=\"gone\"} 3"));
    // Aborting the client tasks closes their connections.
    for task in &held {
        task.abort();
    }
    ic.wait_concurrency("gone", 0).await;
    assert!(ic
        .metrics()
        .await
        .contains("wakegate_held_requests{route=\"gone\"} 0"));

    // An upload cut off mid-body: hyper is not reading the held body, yet the hangup is seen.
    // (The part sent fits in the socket buffers; a FIN stuck behind flow-controlled body bytes
    // cannot be seen without reading them, and waits for the readiness timeout.)
    use tokio::io::AsyncWriteExt;
    let mut upload = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    upload
        .write_all(b"POST /echo HTTP/1.1\r\nHost: gone.test\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    upload.write_all(&[b'x'; 40_000]).await.unwrap();
    ic.wait_concurrency("gone", 1).await;
    drop(upload);
    ic.wait_concurrency("gone", 0).await;
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="499",method="POST",route="gone"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_and_metrics_count_requests_in_flight_at_a_ready_backend() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("busy", "busy.test", port, "0s", "")
    );
    let ic = Interceptor::start(&config).await;
    assert_eq!(ic.get("busy.test", "/").await.cold_start(), Some("true"));
    let warm = ic.get("busy.test", "/").await;
    assert_eq!(warm.cold_start(), Some("false"));

    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(ic.spawn_get("busy.test", "/sleep?ms=1500"));
    }
    ic.wait_concurrency("busy", 4).await;
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains("wakegate_in_flight_requests{route=\"busy\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wakegate_held_requests{route=\"busy\"} 0"),
        "{metrics}"
    );
    for task in slow {
        assert_eq!(task.await.unwrap().unwrap().status, StatusCode::OK);
    }
    let queue = ic.queue().await;
    assert_eq!(queue["busy"]["Concurrency"], 0);
    assert_eq!(queue["busy"]["RequestCount"], 6);
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="200",method="GET",route="busy"} 6"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wakegate_cold_starts_total{route="busy"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("wakegate_cold_start_wait_seconds_count{route=\"busy\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_held_request_is_pushed_on_the_events_stream() {
    use http_body_util::BodyExt;
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("wake", "wake.test", port, "300ms", "")
    );
    let ic = Interceptor::start(&config).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let rsp = client
        .get(format!("http://{}/events", ic.admin).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rsp.headers()["content-type"], "application/x-ndjson");
    let mut body = rsp.into_body();
    let mut next_line = async || -> serde_json::Value {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event line in time")
            .unwrap()
            .unwrap();
        serde_json::from_slice(frame.data_ref().unwrap()).unwrap()
    };
    let hello = next_line().await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["queue"]["wake"]["Concurrency"], 0);

    let first = ic.spawn_get("wake.test", "/");
    let second = ic.spawn_get("wake.test", "/");
    let wake = next_line().await;
    assert_eq!(wake["type"], "wake");
    assert_eq!(wake["route"], "wake");
    assert!(wake["at"].as_u64().unwrap() > 0);
    // Then one `ready` when the held requests are released, at least the boot delay later.
    let ready = next_line().await;
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["route"], "wake");
    let boot = ready["atUs"].as_u64().unwrap() - wake["atUs"].as_u64().unwrap();
    assert!(boot >= 300_000, "ready {boot} us after the wake");
    // And one `served` when the first released request's response headers arrive.
    let served = next_line().await;
    assert_eq!(served["type"], "served");
    assert_eq!(served["route"], "wake");
    assert!(served["atUs"].as_u64().unwrap() >= ready["atUs"].as_u64().unwrap());
    assert_eq!(first.await.unwrap().unwrap().status, StatusCode::OK);
    assert_eq!(second.await.unwrap().unwrap().status, StatusCode::OK);
    // One wake, one ready and one served per cold start, not one per held request.
    let more = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(more.is_err(), "no second event for the same cold start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_request_caps_answer_503_with_retry_after_and_free_up_when_clients_leave() {
    let (pa, pb) = (free_port(), free_port());
    let config = format!(
        "routes:\n{}{}",
        backend_route(
            "a",
            "a.test",
            pa,
            "60s",
            "    maxHeldRequests: 2\n    timeouts: { readiness: 60s }\n"
        ),
        backend_route(
            "b",
            "b.test",
            pb,
            "60s",
            "    timeouts: { readiness: 60s }\n"
        ),
    );
    let ic = Interceptor::start_with(&config, &["--max-held-requests", "3"]).await;
    let a1 = ic.spawn_get("a.test", "/");
    let _a2 = ic.spawn_get("a.test", "/");
    ic.wait_concurrency("a", 2).await;

    let over = ic.get("a.test", "/").await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(over.headers["retry-after"], "1");
    assert_eq!(
        over.text(),
        "route a: too many requests are waiting for target a (route cap 2); retry shortly\n"
    );

    let _b1 = ic.spawn_get("b.test", "/");
    ic.wait_concurrency("b", 1).await;
    let total = ic.get("b.test", "/").await;
    assert_eq!(total.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(total.text().contains("(total cap 3)"), "{}", total.text());

    // A client that leaves frees its place at once.
    a1.abort();
    ic.wait_concurrency("a", 1).await;
    let _a3 = ic.spawn_get("a.test", "/");
    ic.wait_concurrency("a", 2).await;
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="503",method="GET",route="a"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="499",method="GET",route="a"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_failover_timeout_the_failover_target_answers() {
    let fallback = Upstream::start("fallback", Duration::ZERO).await;
    let port = free_port();
    let extra = format!(
        "    failover: {{ upstream: \"{}\", timeout: 300ms }}\n    timeouts: {{ readiness: 60s }}\n",
        fallback.addr
    );
    let config = format!(
        "routes:\n{}",
        backend_route("slowboot", "slowboot.test", port, "60s", &extra)
    );
    let ic = Interceptor::start(&config).await;
    let started = std::time::Instant::now();
    let reply = ic.get("slowboot.test", "/page").await;
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.text().starts_with("fallback /page\n"),
        "{}",
        reply.text()
    );
    assert_eq!(reply.headers["x-wakegate-failover"], "true");
    assert_eq!(reply.cold_start(), Some("true"));
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(fallback.count(), 1);
    assert!(ic
        .metrics()
        .await
        .contains(r#"wakegate_failovers_total{route="slowboot"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_a_waiting_page_while_api_clients_are_held() {
    let port = free_port();
    let extra = "    coldStart: { waitingPage: { refreshSeconds: 3 } }\n";
    let config = format!(
        "routes:\n{}",
        backend_route("page", "page.test", port, "500ms", extra)
    );
    let ic = Interceptor::start(&config).await;
    let browser = |accept: &'static str| {
        http::Request::get(format!("http://{}/", ic.proxy))
            .header("host", "page.test")
            .header("accept", accept)
            .body(http_body_util::Full::<Bytes>::default())
            .unwrap()
    };
    let page = ic
        .http
        .send(browser("text/html,application/xhtml+xml,*/*;q=0.8"))
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page.headers["retry-after"], "3");
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert!(
        page.text()
            .contains(r#"<meta http-equiv="refresh" content="3">"#),
        "{}",
        page.text()
    );
    // The wake goes on: the command is starting, and an API client is held until it is ready.
    let api = ic.http.send(browser("application/json")).await.unwrap();
    assert_eq!(api.status, StatusCode::OK);
    assert_eq!(api.cold_start(), Some("true"));
    assert_eq!(ic.target("page").await["starts"], 1);
    // Once ready, the browser gets the app.
    let ready = ic.http.send(browser("text/html")).await.unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    assert!(ready.text().starts_with("hello from page"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placeholder_answers_every_request_while_the_target_wakes() {
    let port = free_port();
    let extra = "    coldStart:\n      placeholder: { status: 202, contentType: application/json, body: '{\"status\":\"waking\"}' }\n";
    let config = format!(
        "routes:\n{}",
        backend_route("ph", "ph.test", port, "300ms", extra)
    );
    let ic = Interceptor::start(&config).await;
    let first = ic.get("ph.test", "/").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(first.headers["content-type"], "application/json");
    assert_eq!(first.text(), r#"{"status":"waking"}"#);
    eventually(
        "the command becomes ready",
        Duration::from_secs(10),
        || async { ic.target("ph").await["state"] == "ready" },
    )
    .await;
    let later = ic.get("ph.test", "/").await;
    assert_eq!(later.status, StatusCode::OK);
    assert!(later.text().starts_with("hello from ph"));
}
