//! Benchmark (ignored by default; it prints figures): the interceptor binary's idle memory in
//! Kubernetes mode with 5,000 routes, 5,000 Services and 20,000 EndpointSlices, against the
//! test API server, beside the same with none. Run it with
//! `cargo test --release -p wakegate-interceptor --test kube_index_memory -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use wakegate_testapi::{ApiServer, ResourceDef};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn idle_rss(routes: usize) -> (u64, Duration) {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let store = server.store();
    let def = |plural: &str, group: &str| server.def(plural, group).unwrap();
    let (services, hsos, slices) = (
        def("services", ""),
        def("httpscaledobjects", "http.keda.sh"),
        def("endpointslices", "discovery.k8s.io"),
    );
    for i in 0..routes {
        let (ns, name) = (format!("ns-{}", i % 50), format!("app-{i}"));
        store.create(&services, &ns, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80}]}})).unwrap();
        store.create(&hsos, &ns, json!({"apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject", "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"hosts": [format!("{name}.example.com")], "scaleTargetRef": {"name": name, "service": name, "port": 80}}})).unwrap();
        for j in 0..4 {
            store.create(&slices, &ns, json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-{j}"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, j * 2)], "conditions": {"ready": true}},
                              {"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, j * 2 + 1)], "conditions": {"ready": true}}]})).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(BIN)
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--proxy-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-addr", &admin])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = Http::default();
    let started = std::time::Instant::now();
    eventually("routes loaded", Duration::from_secs(120), || async {
        http.get(admin.parse().unwrap(), "admin", "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let loaded = started.elapsed();
    // Let the allocator settle after the initial lists: a reading, not synchronisation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id().unwrap());
    child.kill().await.unwrap();
    (rss, loaded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn idle_memory_with_5000_routes_and_20000_slices() {
    let (empty, _) = idle_rss(0).await;
    let (full, loaded) = idle_rss(5_000).await;
    println!(
        "interceptor idle RSS in Kubernetes mode: {:.1} MiB with no routes; {:.1} MiB with 5,000 routes, 5,000 Services and 20,000 EndpointSlices (ready {:.1} s after start)",
        empty as f64 / 1024.0,
        full as f64 / 1024.0,
        loaded.as_secs_f64()
    );
}
