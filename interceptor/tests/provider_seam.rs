//! The provider seam, driven by hand: a provider that is not local mode plugs into the same
//! proxy core. Also proves the core's side of the contract: wake is raised when a request is
//! held, route updates replace the table whole, and an endpoint reported ready before its socket
//! listens is retried rather than failed.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use prometheus::Registry;
use support::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wakegate_interceptor::load::Loads;
use wakegate_interceptor::metrics::ProxyMetrics;
use wakegate_interceptor::provider::{Endpoint, Provider, ReadyEndpoints, RouteSpec, TargetId};
use wakegate_interceptor::proxy::{Proxy, ProxySettings};
use wakegate_interceptor::routing::RouteMatch;
use wakegate_interceptor::server::{self, ConnectionSettings};

/// A provider whose routes and endpoints the test sets.
struct ManualProvider {
    routes: watch::Sender<Option<Arc<[RouteSpec]>>>,
    endpoints: watch::Sender<ReadyEndpoints>,
    wakes: Mutex<Vec<(TargetId, tokio::time::Instant)>>,
}

impl ManualProvider {
    /// A provider with these routes (`None`: not loaded yet) and no ready endpoint.
    fn new(routes: Option<Vec<RouteSpec>>) -> Arc<Self> {
        Arc::new(Self {
            routes: watch::channel(routes.map(Arc::from)).0,
            endpoints: watch::channel(ReadyEndpoints::none()).0,
            wakes: Mutex::new(Vec::new()),
        })
    }
}

impl Provider for ManualProvider {
    fn routes(&self) -> watch::Receiver<Option<Arc<[RouteSpec]>>> {
        self.routes.subscribe()
    }
    fn endpoints(&self, _target: &TargetId) -> watch::Receiver<ReadyEndpoints> {
        self.endpoints.subscribe()
    }
    fn wake(&self, target: &TargetId) {
        self.wakes
            .lock()
            .unwrap()
            .push((target.clone(), tokio::time::Instant::now()));
    }
}

fn h2c_route(id: &str, host: &str) -> RouteSpec {
    RouteSpec {
        protocol: wakegate_interceptor::provider::UpstreamProtocol::H2c,
        ..route(id, host)
    }
}

fn route(id: &str, host: &str) -> RouteSpec {
    RouteSpec {
        id: id.into(),
        rules: vec![RouteMatch {
            hosts: vec![host.into()],
            ..RouteMatch::default()
        }],
        target: "target".into(),
        readiness_timeout: Some(Duration::from_secs(10)),
        response_header_timeout: None,
        request_timeout: None,
        max_in_flight_per_endpoint: None,
        max_held: None,
        cold_response_on_overflow: false,
        static_routes: Vec::new(),
        session: None,
        failover: None,
        cold_response: None,
        protocol: Default::default(),
        upstream_tls: None,
        keep_awake_max: Duration::from_secs(3600),
    }
}

/// A provider with no route set yet, whose target's one endpoint is an upstream that answers.
async fn unloaded_with_upstream() -> (Arc<ManualProvider>, Upstream) {
    let provider = ManualProvider::new(None);
    let up = Upstream::start("up", Duration::ZERO).await;
    provider.endpoints.send_replace(
        std::iter::once(Endpoint::new(up.addr.to_string().parse().unwrap())).collect(),
    );
    (provider, up)
}

async fn start(provider: Arc<ManualProvider>) -> (SocketAddr, Arc<Proxy>, CancellationToken) {
    start_with(provider, None).await
}

/// `parking`: park new connections' held first requests, releasing at most this many at once.
async fn start_with(
    provider: Arc<ManualProvider>,
    parking: Option<usize>,
) -> (SocketAddr, Arc<Proxy>, CancellationToken) {
    start_gated(provider, parking, Duration::from_millis(5)).await
}

/// As [`start_with`], with the first request after a cold start going up alone for at most
/// `first_alone_for`.
async fn start_gated(
    provider: Arc<ManualProvider>,
    parking: Option<usize>,
    first_alone_for: Duration,
) -> (SocketAddr, Arc<Proxy>, CancellationToken) {
    start_full(provider, parking, first_alone_for, Duration::from_secs(10)).await
}

/// As [`start_gated`], with this readiness timeout.
async fn start_full(
    provider: Arc<ManualProvider>,
    parking: Option<usize>,
    first_alone_for: Duration,
    readiness: Duration,
) -> (SocketAddr, Arc<Proxy>, CancellationToken) {
    let loads = Arc::new(Loads::default());
    let metrics = ProxyMetrics::register(&Registry::new(), loads.clone()).unwrap();
    let settings = ProxySettings {
        readiness,
        response_header: Duration::from_secs(10),
        request: None,
        max_held_total: 10_000,
        default_max_held: None,
        max_released_at_once: parking.unwrap_or(0),
        first_release_alone_for: first_alone_for,
        trusted_proxies: Vec::new().into(),
        min_body_rate: None,
        access_log: None,
    };
    let proxy = Proxy::new(provider, loads, metrics, settings, Default::default());
    tokio::spawn(proxy.clone().follow_routes());
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let handler = {
        let proxy = proxy.clone();
        move |req, client| proxy.clone().handle(req, client)
    };
    let mut settings = ConnectionSettings::internal(Duration::from_secs(5));
    if parking.is_some() {
        settings.park = Some(Arc::new(proxy.clone()));
    }
    tokio::spawn(server::serve(
        listener,
        None,
        handler,
        settings,
        stop.clone(),
        Duration::from_secs(1),
    ));
    (addr, proxy, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_on_hold_then_retry_connects_to_an_endpoint_reported_ready_early() {
    let provider = ManualProvider::new(Some(vec![route("ns/app", "app.test")]));
    let (addr, proxy, _stop) = start(provider.clone()).await;
    eventually("routes loaded", Duration::from_secs(5), || async {
        proxy.is_loaded()
    })
    .await;

    let http = Http::default();
    let sent_at = tokio::time::Instant::now();
    let request = tokio::spawn({
        let http = http.clone();
        async move { http.get(addr, "app.test", "/hello").await }
    });
    eventually("wake raised", Duration::from_secs(5), || async {
        !provider.wakes.lock().unwrap().is_empty()
    })
    .await;
    let (target, woke_at) = provider.wakes.lock().unwrap()[0].clone();
    assert_eq!(&*target, "target");
    assert!(woke_at.duration_since(sent_at) < Duration::from_secs(1));

    // Report an endpoint ready before anything listens on it, as a pod can be Ready before its
    // address routes. The proxy must keep trying, not answer 502.
    let port = free_port();
    provider.endpoints.send_replace(
        std::iter::once(Endpoint::new(format!("127.0.0.1:{port}").parse().unwrap())).collect(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // the socket is late on purpose
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let up = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(format!("late {}", req.uri())),
                )))
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let reply = request.await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "late /hello");
    assert_eq!(reply.cold_start(), Some("true"));
    up.abort();
}

/// A request that arrives before the provider's first route set (the interceptor starting, or
/// waiting for the Kubernetes API) is held until the set comes, not answered 404 for a host
/// that is routed a moment later. The listener parks new connections, as the plaintext one
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_before_the_first_route_set_waits_for_it() {
    let (provider, _up) = unloaded_with_upstream().await;
    let (addr, proxy, _stop) = start_with(provider.clone(), Some(16)).await;
    let http = Http::default();
    let early = tokio::spawn({
        let http = http.clone();
        async move { http.get(addr, "one.test", "/early").await }
    });
    // The route set comes late on purpose: long after the proxy has read the request, which
    // it used to answer 404 at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if early.is_finished() {
        let reply = early.await.unwrap();
        panic!("answered before any route set was loaded: {reply:?}");
    }
    assert!(!proxy.is_loaded());
    provider
        .routes
        .send_replace(Some(Arc::from(vec![route("ns/one", "one.test")])));
    let reply = tokio::time::timeout(Duration::from_secs(5), early)
        .await
        .expect("the held request is answered once the routes load")
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.text().starts_with("up /early"), "{}", reply.text());
}

/// With no route set within the readiness timeout, a request is answered 503 with
/// `Retry-After`, in words that say why and name no address; once the set loads, requests are
/// routed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gets_503_when_no_route_set_loads_in_time() {
    let (provider, _up) = unloaded_with_upstream().await;
    let (addr, _proxy, _stop) = start_full(
        provider.clone(),
        None,
        Duration::from_millis(5),
        Duration::from_millis(300),
    )
    .await;
    let http = Http::default();
    let sent = tokio::time::Instant::now();
    let reply = http.get(addr, "one.test", "/").await.unwrap();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "answered before the timeout"
    );
    assert_eq!(reply.headers["retry-after"], "1");
    assert!(
        reply.text().contains("no route set loaded") && !reply.text().contains("127.0.0.1"),
        "{}",
        reply.text()
    );

    provider
        .routes
        .send_replace(Some(Arc::from(vec![route("ns/one", "one.test")])));
    eventually(
        "routed once the set loads",
        Duration::from_secs(5),
        || async { http.get(addr, "one.test", "/").await.unwrap().status == StatusCode::OK },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_updates_replace_the_table_whole() {
    let (provider, _up) = unloaded_with_upstream().await;
    let (addr, proxy, _stop) = start(provider.clone()).await;
    assert!(
        !proxy.is_loaded(),
        "not loaded before the provider's first route set"
    );

    provider
        .routes
        .send_replace(Some(Arc::from(vec![route("ns/one", "one.test")])));
    eventually("routes loaded", Duration::from_secs(5), || async {
        proxy.is_loaded()
    })
    .await;
    let http = Http::default();
    assert_eq!(
        http.get(addr, "one.test", "/").await.unwrap().status,
        StatusCode::OK
    );

    provider
        .routes
        .send_replace(Some(Arc::from(vec![route("ns/two", "two.test")])));
    eventually("new table in place", Duration::from_secs(5), || async {
        http.get(addr, "two.test", "/").await.unwrap().status == StatusCode::OK
    })
    .await;
    assert_eq!(
        http.get(addr, "one.test", "/").await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert!(
        provider.wakes.lock().unwrap().is_empty(),
        "ready targets are never woken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_service_is_called_through_a_cold_start_unary_and_streaming() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let provider = ManualProvider::new(Some(vec![h2c_route("ns/grpc", "*")]));
    let (addr, proxy, _stop) = start(provider.clone()).await;
    eventually("routes loaded", Duration::from_secs(5), || async {
        proxy.is_loaded()
    })
    .await;

    // The client calls before the backend exists: the call is held (h2c in).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    let unary = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    });
    eventually(
        "the call is held and the target woken",
        Duration::from_secs(5),
        || async { !provider.wakes.lock().unwrap().is_empty() },
    )
    .await;

    // The backend boots: a real tonic server (gRPC health, unary and server-streaming).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    provider.endpoints.send_replace(
        std::iter::once(Endpoint::new(backend.to_string().parse().unwrap())).collect(),
    );

    let reply = unary.await.unwrap().unwrap();
    assert_eq!(
        reply.metadata().get("x-keda-http-cold-start").unwrap(),
        "true"
    );
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);

    // Server streaming through the warm route: the first status, then a change pushed later.
    let mut watch = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_burst_is_released_a_bounded_number_at_a_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (bound, burst) in [(Some(2), 8), (Some(0), 8)] {
        let provider = ManualProvider::new(Some(vec![route("ns/app", "app.test")]));
        let (addr, proxy, _stop) = start_with(provider.clone(), bound).await;
        eventually("routes loaded", Duration::from_secs(5), || async {
            proxy.is_loaded()
        })
        .await;
        let mut conns = Vec::new();
        for _ in 0..burst {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(b"GET /b HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            conns.push(conn);
        }
        eventually("all parked", Duration::from_secs(10), || async {
            provider.wakes.lock().unwrap().len() >= burst
        })
        .await;
        let up = Upstream::start("up", Duration::from_millis(500)).await;
        provider.endpoints.send_replace(
            std::iter::once(Endpoint::new(up.addr.to_string().parse().unwrap())).collect(),
        );
        for mut conn in conns {
            let mut out = String::new();
            conn.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            assert!(out.contains("x-keda-http-cold-start: true"), "{out}");
        }
        assert_eq!(up.count(), burst);
        let peak = up.peak.load(std::sync::atomic::Ordering::SeqCst);
        match bound {
            Some(2) => assert!(peak <= 2, "peak {peak} past the bound of 2"),
            // No bound: the whole burst reaches the upstream together.
            _ => assert_eq!(peak, burst, "unbounded release"),
        }
    }
}

/// An upstream that notes when each request arrived and when it was answered: a path under
/// `/slow` is answered after three seconds, any other at once.
async fn timing_upstream() -> (SocketAddr, TimingLog) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = TimingLog::default();
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let arrived = tokio::time::Instant::now();
                        if req.uri().path().starts_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        let answered = tokio::time::Instant::now();
                        seen.lock().unwrap().push((arrived, answered));
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    (addr, log)
}

/// Each request's (arrived, answered), in the order answered.
type TimingLog = Arc<Mutex<Vec<(tokio::time::Instant, tokio::time::Instant)>>>;

/// One cold start of four parked connections to `path` through an interceptor whose first
/// released request goes up alone for at most `first_alone_for`: every client gets its answer,
/// and the upstream's (arrived, answered) for each request comes back in arrival order.
async fn cold_start_of_four(
    path: &str,
    first_alone_for: Duration,
) -> Vec<(tokio::time::Instant, tokio::time::Instant)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = ManualProvider::new(Some(vec![route("ns/app", "app.test")]));
    let (addr, proxy, _stop) = start_gated(provider.clone(), Some(0), first_alone_for).await;
    eventually("routes loaded", Duration::from_secs(5), || async {
        proxy.is_loaded()
    })
    .await;
    let (up, log) = timing_upstream().await;
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            format!("GET {path}/{i} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        conns.push(conn);
    }
    eventually("all four held", Duration::from_secs(10), || async {
        provider.wakes.lock().unwrap().len() >= 4
    })
    .await;
    provider
        .endpoints
        .send_replace(std::iter::once(Endpoint::new(up.to_string().parse().unwrap())).collect());
    for mut conn in conns {
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("x-keda-http-cold-start: true"), "{out}");
    }
    let mut seen = log.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen.len(), 4, "every request reached the upstream once");
    seen
}

// The bounds are far from the times they guard (seconds against a quick loopback answer), so
// the test holds on a slow machine too: the aarch64 tests run under qemu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_released_after_a_cold_start_goes_up_alone() {
    // A quick first answer: the rest go up once it has come, not on the (long) bound.
    let seen = cold_start_of_four("/fast", Duration::from_secs(10)).await;
    let (_, first_answered) = seen[0];
    for (i, (arrived, _)) in seen.iter().enumerate().skip(1) {
        assert!(
            *arrived >= first_answered,
            "request {i} arrived {:?} before the first was answered",
            first_answered - *arrived
        );
    }
    // The last one came soon after the answer, so the bound was not what let it go.
    assert!(
        seen[3].0 - first_answered < Duration::from_secs(5),
        "the rest waited {:?} after the first answer",
        seen[3].0 - first_answered
    );

    // A slow first answer (three seconds) holds the rest back only for the bound.
    let bound = Duration::from_millis(300);
    let seen = cold_start_of_four("/slow", bound).await;
    let (first_arrived, first_answered) = seen[0];
    let second_arrived = seen[1].0;
    assert!(
        second_arrived - first_arrived >= bound / 2,
        "the first did not go up alone: the second came {:?} after it",
        second_arrived - first_arrived
    );
    assert!(
        second_arrived < first_answered,
        "the rest waited out the slow first answer"
    );
}

/// Zero turns the gate off: a cold start's held requests go up together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_bound_releases_a_cold_start_together() {
    let seen = cold_start_of_four("/slow", Duration::ZERO).await;
    let (_, first_answered) = seen[0];
    assert!(
        seen.iter().all(|(arrived, _)| *arrived < first_answered),
        "with no gate, every request is up before the slow first answer"
    );
}
