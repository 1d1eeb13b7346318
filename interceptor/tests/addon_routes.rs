//! The KEDA HTTP Add-on's InterceptorRoute features in local mode, under the same key names:
//! `rules` OR'd, `staticRoutes` (WhenUnavailable and Always; never counted, never waking), and
//! `coldStart.placeholder.response` with `maxPendingRequests` and `overflow`. Through the real
//! binary and the example backend on 127.0.0.1.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;

/// The example backend as a route with `rules` instead of `hosts`, and static routes.
fn route(name: &str, port: u16, gate: &std::path::Path, extra: &str) -> String {
    gated_backend_route(name, "unused.test", port, gate, extra).replace(
        "    hosts: [\"unused.test\"]\n",
        "    rules:\n      - hosts: [\"a.test\"]\n        paths: [{ value: /api }]\n      - hosts: [\"b.test\"]\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_routes_answer_without_counting_or_waking_and_rules_are_ored() {
    let port = free_port_below_ephemeral();
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let extra = r#"    staticRoutes:
      - rules: [{ paths: [{ value: /healthz }] }]
        response: { body: "ok", headers: { Content-Type: text/plain } }
      - rules: [{ paths: [{ value: /maintenance }] }]
        response: { statusCode: 418, body: "teapot" }
        responseMode: Always
"#;
    let config = format!("routes:\n{}", route("app", port, &gate_file, extra));
    let ic = Interceptor::start(&config).await;

    // At zero: the static route answers, nothing is counted, nothing wakes.
    let health = ic.get("b.test", "/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
    assert_eq!(health.text(), "ok");
    assert_eq!(health.headers["content-type"], "text/plain");
    let queue = ic.queue().await;
    assert_eq!(queue["app"]["RequestCount"], 0, "{queue}");
    assert_eq!(ic.target("app").await["state"], "stopped");
    // The first rule needs its path: a.test/healthz belongs to no route.
    assert_eq!(
        ic.get("a.test", "/healthz").await.status,
        StatusCode::NOT_FOUND
    );

    // A request through the first rule wakes the target.
    std::fs::write(&gate_file, b"").unwrap();
    let woke = ic.get("a.test", "/api/x").await;
    assert_eq!(woke.status, StatusCode::OK, "{}", woke.text());
    assert_eq!(woke.cold_start(), Some("true"));
    assert_eq!(ic.queue().await["app"]["RequestCount"], 1);

    // Warm: WhenUnavailable forwards (uncounted), Always still answers itself.
    let health = ic.get("b.test", "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_ne!(health.text(), "ok", "forwarded to the backend now");
    let teapot = ic.get("b.test", "/maintenance").await;
    assert_eq!(teapot.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(teapot.text(), "teapot");
    assert_eq!(
        ic.queue().await["app"]["RequestCount"],
        1,
        "static routes are never counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_requests_holds_up_to_the_cap_and_the_overflow_gets_the_placeholder() {
    let port = free_port_below_ephemeral();
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let extra = r#"    coldStart:
      placeholder:
        response: { body: "busy waking", headers: { Retry-After: "7" } }
      maxPendingRequests: 2
      overflow: Placeholder
"#;
    let config = format!("routes:\n{}", route("cap", port, &gate_file, extra));
    let ic = Interceptor::start(&config).await;
    let held: Vec<_> = (0..2).map(|_| ic.spawn_get("b.test", "/")).collect();
    ic.wait_concurrency("cap", 2).await;
    let overflow = ic.get("b.test", "/").await;
    assert_eq!(overflow.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overflow.text(), "busy waking");
    assert_eq!(overflow.headers["retry-after"], "7");
    std::fs::write(&gate_file, b"").unwrap();
    for h in held {
        let reply = h.await.unwrap().unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.cold_start(), Some("true"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overflow_is_rejected_by_default_and_a_placeholder_alone_answers_at_once() {
    let port = free_port_below_ephemeral();
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let other_port = free_port_below_ephemeral();
    let other_gate = gate.path().join("other");
    let config =
        format!(
        "routes:\n{}{}",
        route("rej", port, &gate_file, "    coldStart: { maxPendingRequests: 1 }\n"),
        gated_backend_route(
            "ph",
            "ph.test",
            other_port,
            &other_gate,
            "    coldStart:\n      placeholder: { response: { statusCode: 202, body: soon } }\n"
        )
    );
    let ic = Interceptor::start(&config).await;
    let held = ic.spawn_get("b.test", "/");
    ic.wait_concurrency("rej", 1).await;
    let rejected = ic.get("b.test", "/").await;
    assert_eq!(rejected.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(rejected.headers.contains_key("retry-after"));
    let placeholder = ic.get("ph.test", "/").await;
    assert_eq!(
        (placeholder.status, placeholder.text().as_str()),
        (StatusCode::ACCEPTED, "soon")
    );
    std::fs::write(&gate_file, b"").unwrap();
    assert_eq!(held.await.unwrap().unwrap().status, StatusCode::OK);

    // The add-on's metric names and labels, beside Wakegate's own.
    let method = http::Request::builder()
        .method("PURGE")
        .uri(format!("http://{}/", ic.proxy))
        .header("host", "b.test")
        .body(http_body_util::Full::default())
        .unwrap();
    Http::default().send(method).await.unwrap();
    let metrics = ic.metrics().await;
    for line in [
        r#"interceptor_cold_start_rejections_total{route_name="rej",route_namespace=""} 1"#,
        r#"interceptor_request_count_total{code="200",cold_start="true",method="GET",route_name="rej",route_namespace=""} 1"#,
        r#"interceptor_request_count_total{code="503",cold_start="false",method="GET",route_name="rej",route_namespace=""} 1"#,
        r#"interceptor_request_count_total{code="200",cold_start="false",method="_OTHER",route_name="rej",route_namespace=""} 1"#,
        r#"interceptor_request_duration_seconds_bucket{code="200",cold_start="true",method="GET",route_name="rej",route_namespace="",le="0.075"}"#,
        r#"interceptor_request_concurrency{route_name="rej",route_namespace=""} 0"#,
        r#"interceptor_cold_start_duration_seconds_count{outcome="waited",route_name="rej",route_namespace=""} 1"#,
        r#"interceptor_cold_start_duration_seconds_count{outcome="warm",route_name="rej",route_namespace=""} 1"#,
        r#"wakegate_requests_total{code="200",method="GET",route="rej"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    eventually(
        "the placeholder's wake went on",
        Duration::from_secs(5),
        || async { ic.target("ph").await["state"] != "stopped" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_max_pending_requests_caps_routes_without_a_cap_of_their_own() {
    let (port, other_port) = (free_port_below_ephemeral(), free_port_below_ephemeral());
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let config = format!(
        "routes:\n{}{}",
        route("dflt", port, &gate_file, ""),
        gated_backend_route(
            "own",
            "own.test",
            other_port,
            &gate_file,
            "    coldStart:\n      placeholder: { response: { body: full } }\n      overflow: Placeholder\n      maxPendingRequests: 2\n"
        )
    );
    let ic = Interceptor::start_with(&config, &["--max-pending-requests", "1"]).await;
    let held = ic.spawn_get("b.test", "/");
    ic.wait_concurrency("dflt", 1).await;
    assert_eq!(
        ic.get("b.test", "/").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "past the default cap"
    );
    // A route's own cap wins over the default.
    let own: Vec<_> = (0..2).map(|_| ic.spawn_get("own.test", "/")).collect();
    ic.wait_concurrency("own", 2).await;
    let overflow = ic.get("own.test", "/").await;
    assert_eq!(
        (overflow.status, overflow.text().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "full")
    );
    std::fs::write(&gate_file, b"").unwrap();
    assert_eq!(held.await.unwrap().unwrap().status, StatusCode::OK);
    for h in own {
        assert_eq!(h.await.unwrap().unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_shaped_mistakes_name_the_key() {
    let cases = [
        (
            "    rules: [{ hosts: [\"x.test\"] }]\n",
            "routes[0].rules: give `rules` or `hosts`/`pathPrefixes`/`headers`, not both",
        ),
        (
            "    staticRoutes: [{ rules: [], response: { body: x } }]\n",
            "routes[0].staticRoutes[0].rules: needs at least one rule",
        ),
        (
            "    staticRoutes: [{ rules: [{}], response: { bodyFromConfigMap: { name: c } } }]\n",
            "routes[0].staticRoutes[0].response.bodyFromConfigMap: needs a cluster",
        ),
        (
            "    coldStart: { maxPendingRequests: 3, overflow: Placeholder }\n",
            "routes[0].coldStart.overflow: Placeholder needs coldStart.placeholder",
        ),
        (
            "    coldStart: { placeholder: { response: { statusCode: 700 } } }\n",
            "routes[0].coldStart.placeholder.response.statusCode: 700 is not an HTTP status",
        ),
    ];
    for (extra, expected) in cases {
        let config = format!(
            "routes:\n{}",
            backend_route("bad", "bad.test", free_port(), "0s", extra)
        );
        let mut ic = Interceptor::spawn(&config, &[]);
        let status = ic.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(64), "config {config:?}");
        let log = ic.log();
        assert!(log.contains(expected), "{log}\nshould contain {expected}");
    }
}
