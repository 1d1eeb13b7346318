//! Routing-table lookup and rebuild for 10, 1,000 and 10,000 routes.
//!
//! `cargo bench -p wakegate-interceptor --bench routing`. Each table mixes what real clusters
//! have: exact hosts with path prefixes, wildcard hosts, and header-matched canaries. Lookups
//! hit an exact host, a wildcard host and a miss (which walks every bucket that could match).

#![allow(clippy::unwrap_used)] // a panic is how a bench reports failure

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use wakegate_interceptor::routing::{HeaderMatch, RouteMatch, RouteTable};

fn routes(n: usize) -> Vec<(RouteMatch, usize)> {
    (0..n)
        .map(|i| {
            let m = match i % 10 {
                // One in ten is a wildcard host.
                0 => RouteMatch {
                    hosts: vec![format!("*.team-{i}.example.com")],
                    ..RouteMatch::default()
                },
                // One in ten is a header-matched canary on a shared host.
                1 => RouteMatch {
                    hosts: vec![format!("svc-{}.example.com", i - 1)],
                    headers: vec![HeaderMatch {
                        name: HeaderName::from_static("x-canary"),
                        value: Some(HeaderValue::from_static("1")),
                    }],
                    ..RouteMatch::default()
                },
                _ => RouteMatch {
                    hosts: vec![format!("svc-{i}.example.com")],
                    path_prefixes: vec!["/api".into(), "/".into()],
                    ..RouteMatch::default()
                },
            };
            (m, i)
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in [10usize, 1_000, 10_000] {
        let table = RouteTable::build(routes(n));
        let headers = HeaderMap::new();
        let exact = format!("svc-{}.example.com:8080", n / 2 + 2);
        let wildcard = format!("app.team-{}.example.com", (n / 20) * 10);
        assert!(table.lookup(&exact, "/api/v1/items", &headers).is_some());
        assert!(table.lookup(&wildcard, "/", &headers).is_some());
        group.bench_with_input(BenchmarkId::new("exact", n), &n, |b, _| {
            b.iter(|| table.lookup(black_box(&exact), black_box("/api/v1/items"), &headers))
        });
        group.bench_with_input(BenchmarkId::new("wildcard", n), &n, |b, _| {
            b.iter(|| table.lookup(black_box(&wildcard), black_box("/"), &headers))
        });
        group.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| {
                table.lookup(
                    black_box("a.b.c.nowhere.example.org"),
                    black_box("/"),
                    &headers,
                )
            })
        });
    }
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild");
    group.sample_size(20);
    for n in [10usize, 1_000, 10_000] {
        let specs = routes(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| RouteTable::build(black_box(specs.clone())))
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, rebuild);
criterion_main!(benches);
