//! Local mode's process lifecycle through the real binary: idle stop after the scale-down period,
//! start again on the next request, crash recovery, a backend killed mid-response, SIGTERM with
//! requests in flight, and bad config files.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use http::StatusCode;
use nix::sys::signal::Signal;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_command_is_stopped_and_the_next_request_starts_it_again() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "idle",
            "idle.test",
            port,
            "100ms",
            "    scaledownPeriod: 700ms\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    assert_eq!(
        ic.target("idle").await["state"],
        "stopped",
        "nothing runs before a request"
    );

    let first = ic.get("idle.test", "/").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.cold_start(), Some("true"));
    let pid = first.pid();
    // Requests keep it up: each one restarts the idle clock. Three rounds of 400 ms idle (by
    // the interceptor's own clock, in /queue) add up to more than the period.
    for _ in 0..3 {
        eventually(
            "the route idle for 400 ms",
            Duration::from_secs(5),
            || async {
                ic.queue().await["idle"]["IdleMs"]
                    .as_u64()
                    .is_some_and(|ms| ms >= 400)
            },
        )
        .await;
        let warm = ic.get("idle.test", "/").await;
        assert_eq!((warm.pid(), warm.cold_start()), (pid, Some("false")));
    }
    let idle_from = std::time::Instant::now();
    eventually(
        "the idle command is stopped",
        Duration::from_secs(5),
        || async { ic.target("idle").await["state"] == "stopped" },
    )
    .await;
    assert!(
        idle_from.elapsed() >= Duration::from_millis(650),
        "stopped before the scale-down period"
    );
    assert!(!alive(pid), "the process is gone (and reaped)");
    assert_eq!(
        ic.target("idle").await["lastExit"],
        "exit status: 0",
        "stopped with SIGTERM, exited cleanly"
    );

    let again = ic.get("idle.test", "/").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.cold_start(), Some("true"));
    assert_ne!(again.pid(), pid);
    assert_eq!(ic.target("idle").await["starts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_command_makes_the_route_not_ready_and_the_next_request_restarts_it() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("crash", "crash.test", port, "0s", "")
    );
    let ic = Interceptor::start(&config).await;
    let pid = ic.get("crash.test", "/").await.pid();

    // The backend exits in the middle of this request: that request alone fails.
    let crashed = ic.get("crash.test", "/exit").await;
    assert_eq!(
        crashed.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        crashed.text()
    );
    assert!(
        crashed.text().contains("failed before sending a response"),
        "{}",
        crashed.text()
    );
    eventually(
        "the route is not ready after the crash",
        Duration::from_secs(5),
        || async { ic.target("crash").await["readyEndpoints"] == 0 },
    )
    .await;
    assert!(!alive(pid));

    let next = ic.get("crash.test", "/").await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.cold_start(), Some("true"));
    assert_ne!(next.pid(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_response_fails_only_that_request() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("kill", "kill.test", port, "0s", "")
    );
    let ic = Interceptor::start(&config).await;
    let pid = ic.get("kill.test", "/").await.pid();

    let slow = ic.spawn_get("kill.test", "/sleep?ms=10000");
    ic.wait_concurrency("kill", 1).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // "Later" means once the interceptor knows the process is gone (a request racing that
    // notice, within about a millisecond of the crash, can still meet the dead socket).
    eventually("the crash is noticed", Duration::from_secs(5), || async {
        ic.target("kill").await["readyEndpoints"] == 0
    })
    .await;

    for _ in 0..3 {
        let later = ic.get("kill.test", "/").await;
        assert_eq!(later.status, StatusCode::OK, "{}", later.text());
    }
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="502",method="GET",route="kill"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wakegate_upstream_errors_total{kind="upstream",route="kill"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_exits_0_and_leaves_no_child() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("drain", "drain.test", port, "0s", "")
    );
    // The drain outlasts the slow requests by far: they must finish, however slow the
    // machine (an emulated arm one takes its time).
    let mut ic = Interceptor::start_with(
        &config,
        &["--shutdown-delay", "300ms", "--drain-timeout", "20s"],
    )
    .await;
    let child = ic.get("drain.test", "/").await.pid();

    let mut slow = Vec::new();
    for _ in 0..5 {
        slow.push(ic.spawn_get("drain.test", "/sleep?ms=1000"));
    }
    ic.wait_concurrency("drain", 5).await;
    ic.signal(Signal::SIGTERM);
    // Through the shutdown delay the interceptor reports not ready, and still serves.
    eventually(
        "/readyz = 503 while draining",
        Duration::from_secs(2),
        || async { ic.admin_get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    assert_eq!(ic.admin_get("/readyz").await.text(), "draining\n");

    for task in slow {
        let reply = task.await.unwrap().unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let status = ic.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(!alive(child), "the backend process was stopped");
    let log = ic.log();
    assert!(log.contains("drain complete"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_64_naming_the_key() {
    let cases = [
        (
            "routes:\n  - name: a\n    target: { command: [x] }\n",
            "routes[0].target.port: is required with `command`",
        ),
        (
            "routes:\n  - name: a\n    target: { upstream: \"a:1\" }\n    scaledownPeriod: later\n",
            "invalid duration \"later\"",
        ),
        (
            "routes:\n  - name: a\n    hots: [x]\n    target: { upstream: \"a:1\" }\n",
            "unknown field `hots`",
        ),
        ("routes: [\n", "config file"),
    ];
    for (config, expected) in cases {
        let mut ic = Interceptor::spawn(config, &[]);
        let status = ic.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(64), "config {config:?}");
        let log = ic.log();
        assert!(
            log.contains(expected),
            "config {config:?}: expected {expected:?} in:\n{log}"
        );
    }
    // A missing file and a bad flag are usage errors too.
    let out = tokio::process::Command::new(BIN)
        .args(["--config", "/nonexistent/wakegate.yaml"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config file /nonexistent/wakegate.yaml"));
    let out = tokio::process::Command::new(BIN)
        .args(["--readiness-timeout", "soon"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--readiness-timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_readiness_probe_waits_for_the_path_to_answer() {
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("probe", "probe.test", port, "200ms", "").replace(
            "      stopGracePeriod: 2s\n",
            "      stopGracePeriod: 2s\n      readinessProbe: { httpGet: { path: /healthz } }\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let reply = ic.get("probe.test", "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cold_start(), Some("true"));
    let target = ic.target("probe").await;
    assert_eq!(target["state"], "ready");
    assert!(target["lastBootMs"].as_u64().unwrap() >= 200, "{target}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_example_config_serves_through_a_cold_start() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local.yaml");
    // The example as shipped, on a free port (18001 may be taken on a shared machine).
    let port = free_port().to_string();
    let config = std::fs::read_to_string(example)
        .unwrap()
        .replace("18001", &port);
    assert!(config.contains(&format!("port: {port}")));
    let ic = Interceptor::start(&config).await;
    let reply = ic.get("hello.localhost", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.cold_start(), Some("true"));
    assert!(
        reply.text().starts_with("hello from hello (pid"),
        "{}",
        reply.text()
    );
    let target = ic.target("hello").await;
    assert!(
        target["lastBootMs"].as_u64().unwrap() >= 1000,
        "the example boots in 1s: {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_passes_through_and_keeps_its_route_awake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "ws",
            "ws.test",
            port,
            "100ms",
            "    scaledownPeriod: 500ms\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let (mut stream, head) = websocket(ic.proxy, "ws.test", "/upgrade-echo").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(
        head.contains("x-keda-http-cold-start: true"),
        "woke from zero: {head}"
    );

    // Open across three scale-down periods: still echoing, still one process, counted in flight.
    for round in 0..4 {
        let msg = format!("ping-{round}");
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, msg.as_bytes());
        assert_eq!(ic.queue().await["ws"]["Concurrency"], 1);
        tokio::time::sleep(Duration::from_millis(500)).await; // time passing is the point here
    }
    let target = ic.target("ws").await;
    assert_eq!(
        (target["state"].as_str(), target["starts"].as_u64()),
        (Some("ready"), Some(1)),
        "{target}"
    );

    drop(stream);
    ic.wait_concurrency("ws", 0).await;
    eventually(
        "idle stop once the tunnel closed",
        Duration::from_secs(5),
        || async { ic.target("ws").await["state"] == "stopped" },
    )
    .await;
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(r#"wakegate_requests_total{code="101",method="GET",route="ws"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_port_is_taken_is_not_started_and_says_why() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let config = format!(
        "routes:\n{}",
        backend_route(
            "taken",
            "taken.test",
            port,
            "0s",
            "    timeouts: { readiness: 300ms }\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let reply = ic.get("taken.test", "/").await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    let target = ic.target("taken").await;
    assert_eq!(target["starts"], 0, "never spawned: {target}");
    assert_eq!(
        target["lastExit"],
        format!("could not start: port {port} is already in use by another process")
    );
    drop(squatter);
}
