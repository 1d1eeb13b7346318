//! Benchmark (ignored by default; it prints figures): the standalone wake path with 500 routes.
//! From the moment a request for a route at zero is sent to the interceptor until the
//! Deployment's scale is patched, while the controller samples and sweeps every route every
//! 200 ms. Run it with
//! `cargo test --release -p wakegate-e2e --test wake_path -- --ignored --nocapture`.
//!
//! The patch is seen in the test API server's own store (in process), so the figure is the
//! interceptor's hold, the wake event, the controller and one API round trip, nothing else.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wakegate_testapi::{ApiServer, ResourceDef};

const ROUTES: usize = 500;
const WAKES: usize = 200;

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn wait_ready(admin: std::net::SocketAddr) {
    let http = wakegate_e2e::Http::default();
    wakegate_e2e::eventually("ready", Duration::from_secs(30), || async {
        http.get(admin, "admin", "/readyz")
            .await
            .is_ok_and(|(s, _, _)| s == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn wake_latency_with_500_routes() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let store = server.store();
    let def = |plural: &str, group: &str| server.def(plural, group).unwrap();
    let (deploys, services, hsos) = (
        def("deployments", "apps"),
        def("services", ""),
        def("httpscaledobjects", "http.keda.sh"),
    );
    for i in 0..ROUTES {
        let name = format!("app-{i}");
        store
            .create(&deploys, "bench", json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "bench"},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": "x"}]}}}}))
            .unwrap();
        store
            .create(&services, "bench", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
                "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080}]}}))
            .unwrap();
        store
            .create(&hsos, "bench", json!({"apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject", "metadata": {"name": name, "namespace": "bench"},
                "spec": {"hosts": [format!("{name}.bench")], "scaleTargetRef": {"name": name, "service": name, "port": 8080}, "replicas": {"min": 0, "max": 3}}}))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let interceptor = wakegate_e2e::Interceptor::start_with(&kubeconfig, "bench").await;
    let (proxy, admin) = (interceptor.proxy, interceptor.admin);
    // The interceptor's admin Service, as discovery finds it.
    let (grpc, controller_admin) = (free_addr(), free_addr());
    store
        .create(&def("endpointslices", "discovery.k8s.io"), "bench", json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "wakegate-interceptor-admin-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "wakegate-interceptor-admin"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "admin", "port": admin.port(), "protocol": "TCP"}]}))
        .unwrap();

    let stop = CancellationToken::new();
    let kc = kubeconfig.to_str().unwrap().to_owned();
    let ctl = wakegate_controller::cli::Args::try_parse_from([
        "wakegate-controller",
        "--scaler",
        "standalone",
        "--kubeconfig",
        &kc,
        "--watch-namespace",
        "bench",
        "--namespace",
        "bench",
        "--grpc-addr",
        &grpc.to_string(),
        "--admin-addr",
        &controller_admin.to_string(),
        "--sample-interval",
        "200ms",
        "--identity",
        "bench",
    ])
    .unwrap();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            wakegate_controller::run_until(ctl, stop.cancelled_owned())
                .await
                .unwrap();
        }
    });
    wait_ready(controller_admin).await;
    let http = wakegate_e2e::Http::default();
    // Every route reconciled (so the scaler knows them) and a few sweeps done.
    wakegate_e2e::eventually("every route Ready", Duration::from_secs(120), || async {
        let (ready, _) = store.list(&hsos, Some("bench"), |o| {
            o["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
        ready.len() == ROUTES
    })
    .await;
    wakegate_e2e::eventually("sweeps running", Duration::from_secs(10), || async {
        http.get(controller_admin, "admin", "/metrics")
            .await
            .is_ok_and(|(_, _, m)| {
                m.lines()
                    .find_map(|l| l.strip_prefix("wakegate_controller_sample_rounds_total "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .is_some_and(|n| n >= 5.0)
            })
    })
    .await;

    let mut latencies = Vec::new();
    for i in 0..WAKES {
        let name = format!("app-{i}");
        let (mut events, _) = store.watch(None);
        let sent = Instant::now();
        let held = tokio::spawn({
            let http = http.clone();
            let host = format!("{name}.bench");
            async move { http.get(proxy, &host, "/").await }
        });
        let patched = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = events.recv().await.unwrap();
                if event.resource == "deployments.apps"
                    && event.object["metadata"]["name"] == name.as_str()
                    && event.object["spec"]["replicas"].as_i64() >= Some(1)
                {
                    return Instant::now();
                }
            }
        })
        .await
        .expect("the wake was acted on");
        latencies.push(patched - sent);
        held.abort();
    }
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).min(latencies.len()) - 1];
    println!(
        "wake path, {ROUTES} routes, sweeps every 200 ms, {WAKES} wakes: request sent -> /scale patched p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    let (_, _, metrics) = http
        .get(controller_admin, "admin", "/metrics")
        .await
        .unwrap();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("wakegate_controller_wake_latency_seconds"))
    {
        println!("{line}");
    }
    stop.cancel();
    interceptor.stop().await;
}
