//! `Wakegate-Keep-Awake` in local mode, through the real binary: a backend's header keeps its
//! command up past `scaledownPeriod` until the deadline, the usual scale-down applies without
//! it, the client never sees it, `keepAwakeMax` caps it, `0` releases it, and it is read from
//! h2 responses and from an upgrade's 101. Then the example job service end to end.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use support::*;

const SCALEDOWN: Duration = Duration::from_millis(300);

fn config(name: &str, port: u16, extra: &str) -> String {
    format!(
        "routes:\n{}",
        backend_route(
            name,
            &format!("{name}.test"),
            port,
            "0s",
            &format!("    scaledownPeriod: 300ms\n{extra}")
        )
    )
}

/// Waits until the route's command is stopped; how long that took from `from`.
async fn stopped_after(ic: &Interceptor, route: &str, from: Instant, within: Duration) -> Duration {
    eventually("the command is stopped", within, || async {
        ic.target(route).await["state"] == "stopped"
    })
    .await;
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_keeps_the_command_up_until_its_deadline_then_scale_down_applies() {
    let ic = Interceptor::start(&config("job", free_port(), "")).await;
    let asked = Instant::now();
    let reply = ic.get("job.test", "/?keep-awake=2").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cold_start(), Some("true"));
    assert!(
        !reply.headers.contains_key("wakegate-keep-awake"),
        "the header is the interceptor's business, not the client's: {:?}",
        reply.headers
    );
    let pid = reply.pid();

    // Seen where an operator looks: /queue, /status and /metrics.
    let queue = ic.queue().await;
    let left = queue["job"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(left > 1000 && left <= 2000, "{queue}");
    assert_eq!(queue["job"]["IdleMs"], 0, "kept awake counts as busy");
    let status = ic.admin_get("/status").await.text();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let until = status["keepAwakeUntil"]["job"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(until > now_ms && until <= now_ms + 2100, "{status}");
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains("wakegate_routes_kept_awake 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wakegate_keep_awake_remaining_seconds{route=\"job\"}"),
        "{metrics}"
    );

    // Idle for longer than the scale-down period, yet still up until the deadline, then the
    // period runs from it.
    let took = stopped_after(&ic, "job", asked, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_secs(2) + SCALEDOWN - Duration::from_millis(50),
        "stopped {took:?} after the header, before its deadline and the period after it"
    );
    assert!(!alive(pid));
    assert!(ic.metrics().await.contains("wakegate_routes_kept_awake 0"));
    assert!(ic.queue().await["job"].get("KeepAwakeMs").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_header_the_usual_scale_down_applies() {
    let ic = Interceptor::start(&config("plain", free_port(), "")).await;
    let reply = ic.get("plain.test", "/").await;
    let answered = Instant::now();
    assert_eq!(reply.status, StatusCode::OK);
    let took = stopped_after(&ic, "plain", answered, Duration::from_secs(10)).await;
    assert!(took >= SCALEDOWN - Duration::from_millis(50), "{took:?}");
    assert!(
        took < Duration::from_secs(2),
        "nothing asked to keep it up, yet it ran {took:?}"
    );
    assert!(ic.queue().await["plain"].get("KeepAwakeMs").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_awake_max_caps_what_a_backend_asks_for() {
    let ic = Interceptor::start(&config("capped", free_port(), "    keepAwakeMax: 1s\n")).await;
    let asked = Instant::now();
    let reply = ic.get("capped.test", "/?keep-awake=1h").await;
    assert_eq!(reply.status, StatusCode::OK);
    let left = ic.queue().await["capped"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(
        left <= 1000,
        "capped at keepAwakeMax, not an hour: {left} ms"
    );
    let took = stopped_after(&ic, "capped", asked, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_secs(1) + SCALEDOWN - Duration::from_millis(50),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_releases_the_deadline_and_scale_down_runs_from_then() {
    let ic = Interceptor::start(&config("release", free_port(), "")).await;
    ic.get("release.test", "/?keep-awake=60s").await;
    assert!(ic.queue().await["release"]["KeepAwakeMs"].as_u64().unwrap() > 50_000);
    let released = Instant::now();
    let reply = ic.get("release.test", "/?keep-awake=0").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!reply.headers.contains_key("wakegate-keep-awake"));
    assert!(ic.queue().await["release"].get("KeepAwakeMs").is_none());
    let took = stopped_after(&ic, "release", released, Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(5),
        "the 60 s deadline was released, yet it ran {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_header_is_removed_and_changes_nothing() {
    let ic = Interceptor::start(&config("bad", free_port(), "")).await;
    let reply = ic.get("bad.test", "/?keep-awake=forever").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!reply.headers.contains_key("wakegate-keep-awake"));
    assert!(ic.queue().await["bad"].get("KeepAwakeMs").is_none());
    eventually(
        "the warning names the header",
        Duration::from_secs(5),
        || async {
            ic.log()
                .contains("Wakegate-Keep-Awake header that is not a duration")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_responses_and_an_upgrades_101_carry_it_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "h2",
            "h2.test",
            port,
            "0s",
            "    scaledownPeriod: 300ms\n    pathPrefixes: [\"/\"]\n"
        )
        .replace(
            "      stopGracePeriod: 2s\n",
            "      stopGracePeriod: 2s\n      protocol: h2c\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    // h2c with prior knowledge to the proxy's address; HTTP/2 names the host in :authority.
    let mut send = h2c(ic.proxy).await;
    let req = Request::get("http://h2.test/?keep-awake=30")
        .body(Full::<Bytes>::default())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.version(), Version::HTTP_2);
    assert_eq!(rsp.status(), StatusCode::OK);
    assert!(
        !rsp.headers().contains_key("wakegate-keep-awake"),
        "{:?}",
        rsp.headers()
    );
    rsp.into_body().collect().await.unwrap();
    let left = ic.queue().await["h2"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(
        left > 20_000 && left <= 30_000,
        "read from an h2 response: {left}"
    );

    // The 101 of an upgrade: HTTP/1.1 upstream (an h2c route does not pass upgrades).
    let port = free_port();
    let ws_config = format!(
        "routes:\n{}",
        backend_route("ws", "ws.test", port, "0s", "    scaledownPeriod: 300ms\n")
    );
    let ws = Interceptor::start(&ws_config).await;
    let (mut stream, head) = websocket(ws.proxy, "ws.test", "/upgrade-echo?keep-awake=45").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("wakegate-keep-awake"), "{head}");
    let left = ws.queue().await["ws"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(left > 35_000 && left <= 45_000, "read from a 101: {left}");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping", "the upgraded connection still works");
}

/// A route to the example job service.
fn jobs_config(port: u16, extra: &str) -> String {
    format!(
        r#"routes:
  - name: jobs
    hosts: ["jobs.test"]
    target:
      command: ["{BIN}", "jobs", "--port", "{port}", "--boot-delay", "300ms", "--step", "100ms", "--keep-awake-margin", "2s", "--download-rate", "100000"]
      port: {port}
      readinessProbe: {{ httpGet: {{ path: /healthz }} }}
      stopGracePeriod: 2s
    scaledownPeriod: 300ms
{extra}"#
    )
}

async fn post_job(ic: &Interceptor, body: &str) -> Reply {
    let req = Request::post(format!("http://{}/jobs", ic.proxy))
        .header("host", "jobs.test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    ic.http.send(req).await.unwrap()
}

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_job_wakes_the_service_finishes_with_it_up_and_then_it_sleeps() {
    let ic = Interceptor::start(&jobs_config(free_port(), "")).await;
    let posted = Instant::now();
    let accepted = post_job(&ic, r#"{"seconds": 2}"#).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    assert_eq!(
        accepted.cold_start(),
        Some("true"),
        "the POST woke the service"
    );
    assert_eq!(accepted.headers["location"], "/jobs/1");
    assert!(!accepted.headers.contains_key("wakegate-keep-awake"));
    let job = json(&accepted);
    assert_eq!(
        (job["id"].as_u64(), job["state"].as_str()),
        (Some(1), Some("running"))
    );
    let pid = ic.target("jobs").await["pid"].as_u64().unwrap();
    let left = ic.queue().await["jobs"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(
        left > 3_000 && left <= 4_000,
        "the job's 2 s and the 2 s margin: {left}"
    );

    // No request in flight for far longer than the 300 ms scale-down period: the job runs to
    // its end with the service up. Its log says when.
    eventually("the job is done", Duration::from_secs(15), || async {
        ic.log().contains("job done")
    })
    .await;
    let target = ic.target("jobs").await;
    assert_eq!(
        (
            target["state"].as_str(),
            target["pid"].as_u64(),
            target["starts"].as_u64()
        ),
        (Some("ready"), Some(pid), Some(1)),
        "never cut off, never restarted: {target}"
    );
    assert!(posted.elapsed() >= Duration::from_secs(2));

    // The client picks up the result; the answer releases the deadline (no job runs).
    let done = ic.get("jobs.test", "/jobs/1").await;
    let released = Instant::now();
    assert_eq!(done.cold_start(), Some("false"));
    let view = json(&done);
    assert_eq!(
        (view["state"].as_str(), view["progress"].as_f64()),
        (Some("done"), Some(1.0)),
        "{view}"
    );
    assert!(ic.queue().await["jobs"].get("KeepAwakeMs").is_none());
    let took = stopped_after(&ic, "jobs", released, Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(2),
        "it sleeps once the work is done: {took:?}"
    );
    assert!(!alive(pid as u32));
}

/// A one-shot HTTP/1.1 server answering `size` bytes: a local file to download.
async fn file_server(size: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client left before its request ended");
            head.extend_from_slice(&buf[..n]);
        }
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&vec![b'v'; size]).await.unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_job_reports_progress_and_renews_its_deadline() {
    let ic = Interceptor::start(&jobs_config(free_port(), "")).await;
    let file = file_server(150_000).await;
    let accepted = post_job(&ic, &format!(r#"{{"url": "http://{file}/video.mp4"}}"#)).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let mut seen_partial = false;
    let mut last_bytes = 0;
    // Polling, as a client of the service would: every answer renews the deadline from the
    // download's progress (100 kB/s, so 1.5 s in all).
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let view = json(&ic.get("jobs.test", "/jobs/1").await);
        let bytes = view["bytes"].as_u64().unwrap();
        assert!(bytes >= last_bytes, "bytes only grow: {view}");
        last_bytes = bytes;
        assert_ne!(view["state"], "failed", "{view}");
        if view["state"] == "done" {
            break;
        }
        if bytes > 0 && bytes < 150_000 {
            seen_partial = true;
            let progress = view["progress"].as_f64().unwrap();
            assert!(progress > 0.0 && progress < 1.0, "{view}");
            let left = ic.queue().await["jobs"]["KeepAwakeMs"].as_u64().unwrap();
            // At most the 1.5 s of the whole download and the 2 s margin, rounded up to whole
            // seconds; the first guess, before the size was known, was 60 s.
            assert!(
                left <= 4_000,
                "renewed from progress, not the first guess: {left}"
            );
        }
        assert!(
            Instant::now() < until,
            "the download never finished: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // the polling client's pace
    }
    assert!(seen_partial, "progress was reported while downloading");
    assert_eq!(last_bytes, 150_000);
    assert_eq!(ic.target("jobs").await["starts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_job_gets_a_clear_400() {
    let ic = Interceptor::start(&jobs_config(free_port(), "")).await;
    let reply = post_job(&ic, r#"{"url": "ftp://example.com/x"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.text().contains("is not an http:// URL"),
        "{}",
        reply.text()
    );
    let missing = ic.get("jobs.test", "/jobs/99").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(
        ic.queue().await["jobs"].get("KeepAwakeMs").is_none(),
        "no job, nothing kept awake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_jobs_example_accepts_a_job_through_a_cold_start() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/jobs.yaml");
    let port = free_port().to_string();
    let config = std::fs::read_to_string(example)
        .unwrap()
        .replace("18002", &port);
    assert!(config.contains(&format!("port: {port}")));
    let ic = Interceptor::start(&config).await;
    let req = Request::post(format!("http://{}/jobs", ic.proxy))
        .header("host", "jobs.localhost")
        .body(Full::new(Bytes::from_static(br#"{"seconds": 20}"#)))
        .unwrap();
    let accepted = ic.http.send(req).await.unwrap();
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    assert_eq!(accepted.cold_start(), Some("true"));
    let left = ic.queue().await["jobs"]["KeepAwakeMs"].as_u64().unwrap();
    assert!(
        left > 20_000 && left <= 25_000,
        "the job's 20 s and the 5 s margin: {left}"
    );
    let target = ic.target("jobs").await;
    assert!(
        target["lastBootMs"].as_u64().unwrap() >= 2000,
        "boots in 2 s: {target}"
    );
}
