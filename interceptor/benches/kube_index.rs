//! The Kubernetes index at scale: 5,000 routes, 5,000 Services and 20,000 EndpointSlices (four
//! per Service). What one watch event costs the interceptor: a slice changing its ready
//! addresses (the common event: pods coming and going), a status write to an HTTPScaledObject
//! (no change to routing), and a real route change (the route set rebuilt).
//!
//! `cargo bench -p wakegate-interceptor --bench kube_index`.

#![allow(clippy::unwrap_used)] // a panic is how a bench reports failure

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use wakegate_crds::HTTPScaledObject;
use wakegate_interceptor::kubernetes::{ClusterIndex, EndpointMode};

const ROUTES: usize = 5_000;
const SLICES_PER_SERVICE: usize = 4;

fn hso(i: usize, max: u32) -> HTTPScaledObject {
    serde_json::from_value(json!({
        "apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
        "metadata": {"namespace": format!("ns-{}", i % 50), "name": format!("app-{i}"), "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"hosts": [format!("app-{i}.example.com")], "scaleTargetRef": {"name": format!("app-{i}"), "service": format!("app-{i}"), "port": 80},
                 "replicas": {"min": 0, "max": max}},
    }))
    .unwrap()
}

fn service(i: usize) -> Service {
    serde_json::from_value(
        json!({"metadata": {"namespace": format!("ns-{}", i % 50), "name": format!("app-{i}")},
        "spec": {"ports": [{"name": "http", "port": 80}]}}),
    )
    .unwrap()
}

fn slice(i: usize, j: usize, ready: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ready)
        .map(|k| json!({"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, j * 10 + k)], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns-{}", i % 50), "name": format!("app-{i}-{j}"), "labels": {"kubernetes.io/service-name": format!("app-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints,
    }))
    .unwrap()
}

fn index() -> ClusterIndex {
    let mut index = ClusterIndex::default();
    let routes: Vec<_> = (0..ROUTES).map(|i| hso(i, 10)).collect();
    let services: Vec<_> = (0..ROUTES).map(service).collect();
    let slices: Vec<_> = (0..ROUTES)
        .flat_map(|i| (0..SLICES_PER_SERVICE).map(move |j| slice(i, j, 2)))
        .collect();
    index.reset_routes(&routes);
    index.reset_services(&services);
    index.reset_slices(&slices);
    index
}

fn bench(c: &mut Criterion) {
    let mut index = index();
    let mut group = c.benchmark_group("kube_index_5000_routes_20000_slices");
    // A slice event, as the provider handles it: apply it, then recompute the endpoints of
    // the targets behind the Service it belongs to.
    let (a, b) = (slice(2500, 1, 1), slice(2500, 1, 2));
    let mut flip = false;
    group.bench_function("slice_event", |bench| {
        bench.iter(|| {
            flip = !flip;
            let touched = index.apply_slice(if flip { &a } else { &b });
            for svc in &touched.services {
                for target in index.targets_behind(svc).to_vec() {
                    black_box(index.endpoints(&target, EndpointMode::Pod));
                }
            }
        })
    });
    // A status write: the object changes, routing does not.
    let same = hso(1234, 10);
    group.bench_function("status_write", |bench| {
        bench.iter(|| black_box(index.apply_route(&same)))
    });
    // A real route change: the route set is rebuilt and republished.
    let (x, y) = (hso(1234, 10), hso(1234, 11));
    // The index holds x: the first change is to y.
    let mut flip = true;
    group.bench_function("route_change", |bench| {
        bench.iter(|| {
            flip = !flip;
            let touched = index.apply_route(if flip { &x } else { &y });
            assert!(touched.routes);
            black_box(index.route_specs())
        })
    });
    // What every event used to cost: the whole index cloned, the route set rebuilt, and every
    // target's endpoints recomputed. (A lower bound: endpoints are now found through the
    // by-Service index; before, each target scanned every slice.)
    let targets: Vec<String> = (0..ROUTES)
        .map(|i| format!("ns-{}/app-{i}", i % 50))
        .collect();
    group.sample_size(10);
    group.bench_function("before_full_republish", |bench| {
        bench.iter(|| {
            let copy = index.clone();
            black_box(copy.route_specs());
            for t in &targets {
                black_box(copy.endpoints(t, EndpointMode::Pod));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
