//! End to end, one cold start as one trace: the client's request held by the interceptor, the
//! wake the controller saw and the scale it patched, the release and the upstream call, all
//! under the client's trace id, as an OTLP receiver in this test got them.
//!
//! The interceptor and the controller run in this process, so they share its one exporter
//! (set up from the standard `OTEL_*` variables, as the binaries do); the wake still travels
//! between them over the interceptor's real `/events` stream.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use wakegate_e2e::{Cluster, Controller, Http, Interceptor};
use wakegate_testotlp::{ReceivedSpan, Receiver};

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn xkcd() -> String {
    wakegate_e2e::ADDON_EXAMPLE
        .replace("min: 5", "min: 0")
        .replace(
            "requestRate:\n            granularity: 1s\n            targetValue: 100\n            window: 1m",
            "concurrency:\n            targetValue: 100",
        )
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "expected one {name} span: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_through_the_controller_is_one_trace() {
    let otlp = Receiver::start().await.unwrap();
    let telemetry = wakegate_e2e::export_traces(&otlp.grpc_endpoint());

    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(&xkcd()).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    wakegate_e2e::eventually("xkcd routed", Duration::from_secs(20), || async {
        let status = Http::default()
            .get(interceptor.admin, "admin", "/status")
            .await
            .map(|(_, _, b)| b)
            .unwrap_or_default();
        status.contains("xkcd")
    })
    .await;
    assert_eq!(cluster.replicas("xkcd").await, 0);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let (status, headers, body) = Http::default()
        .get_with(
            interceptor.proxy,
            "myhost.com",
            "/test",
            &[("traceparent", &traceparent)],
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");

    let spans = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
            ["wake", "hold", "GET"].iter().all(|n| names.contains(n))
                && names.contains(&"PATCH scale")
                && spans.iter().any(|s| s.kind == "SERVER")
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}"));
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE)
        .cloned()
        .collect();
    let server = in_trace
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("the interceptor's server span");
    assert_eq!(server.parent_span_id, CLIENT_SPAN);
    let hold = one(&in_trace, "hold");
    assert_eq!(hold.parent_span_id, server.span_id);
    assert_eq!(hold.attr("wakegate.hold.outcome"), Some("released"));
    // The controller's wake, joined to the held request's trace through the wake event.
    let wake = one(&in_trace, "wake");
    assert_eq!(wake.parent_span_id, server.span_id, "{wake:#?}");
    assert_eq!(
        wake.attr("wakegate.route"),
        Some(format!("{}/xkcd", cluster.namespace).as_str())
    );
    let scale = one(&in_trace, "PATCH scale");
    assert_eq!(
        scale.attr("wakegate.workload"),
        Some("apps/v1/Deployment/xkcd")
    );
    assert_eq!(scale.parent_span_id, wake.span_id);
    assert_eq!(scale.kind, "CLIENT");
    assert_eq!(scale.attr("wakegate.replicas"), Some("1"));
    let upstream = in_trace
        .iter()
        .find(|s| s.kind == "CLIENT" && s.name == "GET")
        .expect("the upstream call");
    assert_eq!(upstream.parent_span_id, server.span_id);
    // One picture, in order: held -> wake seen -> scale patched -> released -> first byte.
    assert!(hold.start_unix_nano <= wake.start_unix_nano);
    assert!(wake.start_unix_nano <= scale.start_unix_nano);
    assert!(scale.end_unix_nano <= hold.end_unix_nano);
    assert!(hold.end_unix_nano <= upstream.start_unix_nano);
    assert!(upstream.end_unix_nano <= server.end_unix_nano);
    let at = |ns: u64| (ns - server.start_unix_nano) as f64 / 1e6;
    println!("one cold start, as the receiver got it (ms from the request's arrival):");
    let mut picture: Vec<_> = in_trace.iter().collect();
    picture.sort_by_key(|s| s.start_unix_nano);
    for s in picture {
        println!(
            "  {:>9.2} .. {:>9.2}  {:<28} {:<8} span {} parent {}",
            at(s.start_unix_nano),
            at(s.end_unix_nano),
            s.name,
            s.kind,
            s.span_id,
            s.parent_span_id
        );
    }

    // The dashboard's data in Kubernetes mode: each route names its target, whose ready
    // endpoints `/status` reports, and the page itself is served.
    let (_, _, status) = Http::default()
        .get(interceptor.admin, "admin", "/status")
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let route = format!("{}/xkcd", cluster.namespace);
    let target = status["routes"][&route]["target"].as_str().unwrap();
    assert_eq!(status["targets"][target]["readyEndpoints"], 1, "{status}");
    let (code, headers, page) = Http::default()
        .get(interceptor.admin, "admin", "/dashboard")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(page.contains("/dashboard.js"), "{page}");

    controller.stop().await;
    interceptor.stop().await;
    telemetry.shutdown();
    cluster.cleanup().await;
}
