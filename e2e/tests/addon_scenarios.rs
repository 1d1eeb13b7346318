//! The KEDA HTTP Add-on's own e2e scenarios, ported to InterceptorRoutes and run through the real
//! interceptor (and, where scaling is the point, the standalone controller) against the test API
//! server or a real cluster: routing by host, several hosts, wildcard host, path, header and
//! header presence, combined, several rules to one backend and port name; route update and
//! deletion; cold start with fallback, placeholder with fallback; the readiness, request and
//! response-header timeouts; concurrency scaling; gRPC (unary and streaming) woken from zero.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::{Duration, Instant};

use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

/// An InterceptorRoute to `service` with the given `rules` (YAML flow) and more spec.
fn route(name: &str, service: &str, rules: &str, extra: &str) -> String {
    format!(
        "apiVersion: http.keda.sh/v1beta1\nkind: InterceptorRoute\nmetadata:\n  name: {name}\nspec:\n  target: {{service: {service}, port: 8080}}\n  rules: {rules}\n  scalingMetric: {{concurrency: {{targetValue: 1}}}}\n{extra}---\n"
    )
}

/// Which backend answered (`hello from <name> ...`), or the status when it was not a 200.
async fn who(
    http: &Http,
    proxy: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    match http.get_with(proxy, host, path, headers).await {
        Ok((200, _, body)) => body
            .strip_prefix("hello from ")
            .and_then(|b| b.split_whitespace().next())
            .unwrap_or("?")
            .to_owned(),
        Ok((status, _, _)) => status.to_string(),
        Err(e) => e,
    }
}

/// Three always-up apps (`a`, `b`, `c`, one replica each) behind their Services.
async fn three_apps(cluster: &Cluster) {
    for name in ["a", "b", "c"] {
        cluster
            .apply(&cluster.app_yaml(name).replace("replicas: 0", "replicas: 1"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_host_hosts_wildcard_path_headers_rules_and_port_name() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    three_apps(&cluster).await;
    let routes = [
        route("host", "a", "[{hosts: [host.example]}]", ""),
        route("multi", "b", "[{hosts: [m1.example, m2.example]}]", ""),
        route("wild", "c", "[{hosts: [\"*.wild.example\"]}]", ""),
        route(
            "path-api",
            "a",
            "[{hosts: [p.example], paths: [{value: /api}]}]",
            "",
        ),
        route("path-root", "b", "[{hosts: [p.example]}]", ""),
        route(
            "hdr-value",
            "c",
            "[{hosts: [h.example], headers: [{name: x-tenant, value: acme}]}]",
            "",
        ),
        route(
            "hdr-present",
            "a",
            "[{hosts: [h.example], headers: [{name: x-beta}]}]",
            "",
        ),
        route("hdr-root", "b", "[{hosts: [h.example]}]", ""),
        route(
            "combined",
            "a",
            "[{hosts: [c.example], paths: [{value: /x}], headers: [{name: x-k, value: v}]}]",
            "",
        ),
        route(
            "two-rules",
            "b",
            "[{hosts: [r1.example]}, {hosts: [r2.example], paths: [{value: /only}]}]",
            "",
        ),
        route("port-name", "c", "[{hosts: [pn.example]}]", "")
            .replace("port: 8080", "portName: http"),
    ]
    .concat();
    cluster.apply(&routes).await;
    let interceptor = Interceptor::start(&cluster).await;
    let (http, proxy) = (Http::default(), interceptor.proxy);
    eventually("every app is up", Duration::from_secs(60), || async {
        let mut up = true;
        for host in ["host.example", "m1.example", "x.wild.example", "pn.example"] {
            up &= who(&http, proxy, host, "/", &[]).await.len() == 1;
        }
        up
    })
    .await;
    /// Host, path, headers, and the app expected to answer (or the status).
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("host.example", "/", &[], "a"),
        ("HOST.example:8080", "/any", &[], "a"),
        ("m1.example", "/", &[], "b"),
        ("m2.example", "/", &[], "b"),
        ("x.wild.example", "/", &[], "c"),
        ("deep.x.wild.example", "/", &[], "c"),
        ("wild.example", "/", &[], "404"),
        ("p.example", "/api/v1", &[], "a"),
        ("p.example", "/apix", &[], "b"),
        ("h.example", "/", &[("x-tenant", "acme")], "c"),
        ("h.example", "/", &[("x-tenant", "other")], "b"),
        ("h.example", "/", &[("x-beta", "anything")], "a"),
        ("h.example", "/", &[], "b"),
        ("c.example", "/x", &[("x-k", "v")], "a"),
        ("c.example", "/x", &[], "404"),
        ("c.example", "/y", &[("x-k", "v")], "404"),
        ("r1.example", "/whatever", &[], "b"),
        ("r2.example", "/only/here", &[], "b"),
        ("r2.example", "/other", &[], "404"),
        ("pn.example", "/", &[], "c"),
        ("nobody.example", "/", &[], "404"),
    ];
    for (host, path, headers, expected) in cases {
        assert_eq!(
            who(&http, proxy, host, path, headers).await,
            *expected,
            "{host}{path} {headers:?}"
        );
    }
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_update_and_a_route_deletion_take_effect() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    three_apps(&cluster).await;
    cluster
        .apply(&route("moving", "a", "[{hosts: [move.example]}]", ""))
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let (http, proxy) = (Http::default(), interceptor.proxy);
    eventually("routed to a", Duration::from_secs(60), || async {
        who(&http, proxy, "move.example", "/", &[]).await == "a"
    })
    .await;
    cluster
        .apply(&route(
            "moving",
            "b",
            "[{hosts: [move.example, also.example]}]",
            "",
        ))
        .await;
    eventually(
        "routed to b, on both hosts",
        Duration::from_secs(60),
        || async {
            who(&http, proxy, "move.example", "/", &[]).await == "b"
                && who(&http, proxy, "also.example", "/", &[]).await == "b"
        },
    )
    .await;
    let routes: kube::Api<wakegate_crds::InterceptorRoute> =
        kube::Api::namespaced(cluster.client.clone(), &cluster.namespace);
    routes.delete("moving", &Default::default()).await.unwrap();
    eventually("no longer routed", Duration::from_secs(20), || async {
        who(&http, proxy, "move.example", "/", &[]).await == "404"
    })
    .await;
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_fallback_placeholder_and_the_three_timeouts() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    // `sleeper` stays at zero (no controller wakes it); `a` is the fallback and the slow app.
    cluster.apply(&cluster.app_yaml("sleeper")).await;
    cluster
        .apply(&cluster.app_yaml("a").replace("replicas: 0", "replicas: 1"))
        .await;
    let routes = [
        route(
            "fallback",
            "sleeper",
            "[{hosts: [fb.example]}]",
            "  coldStart: {fallback: {service: {name: a, port: 8080}}}\n  timeouts: {readiness: 500ms}\n",
        ),
        route(
            "placeholder-fallback",
            "sleeper",
            "[{hosts: [pf.example]}]",
            "  coldStart:\n    fallback: {service: {name: a, port: 8080}}\n    placeholder: {response: {body: waking}}\n  timeouts: {readiness: 500ms}\n",
        ),
        route("readiness", "sleeper", "[{hosts: [rd.example]}]", "  timeouts: {readiness: 500ms}\n"),
        route("header", "a", "[{hosts: [hd.example]}]", "  timeouts: {responseHeader: 300ms}\n"),
        route("request", "a", "[{hosts: [rq.example]}]", "  timeouts: {request: 400ms}\n"),
    ]
    .concat();
    cluster.apply(&routes).await;
    let interceptor = Interceptor::start(&cluster).await;
    let (http, proxy) = (Http::default(), interceptor.proxy);
    eventually("a is up", Duration::from_secs(60), || async {
        who(&http, proxy, "hd.example", "/", &[]).await == "a"
    })
    .await;

    // Cold start with fallback: held for the readiness timeout, then the fallback answers.
    let started = Instant::now();
    let (status, headers, body) = http.get(proxy, "fb.example", "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from a"), "{body}");
    assert_eq!(headers["x-wakegate-failover"], "true");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Placeholder with fallback: the placeholder answers at once.
    let (status, _, body) = http.get(proxy, "pf.example", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (503, "waking"));
    // Readiness timeout without a fallback: 504.
    let (status, _, _) = http.get(proxy, "rd.example", "/").await.unwrap();
    assert_eq!(status, 504);
    // Response-header timeout: the upstream is slower than 300 ms to answer.
    let (status, _, _) = http
        .get(proxy, "hd.example", "/sleep?ms=2000")
        .await
        .unwrap();
    assert_eq!(status, 504);
    let (status, _, _) = http.get(proxy, "hd.example", "/sleep?ms=10").await.unwrap();
    assert_eq!(status, 200, "a quick answer is within the deadline");
    // Request timeout: the whole request is bounded.
    let started = Instant::now();
    let (status, _, _) = http
        .get(proxy, "rq.example", "/sleep?ms=3000")
        .await
        .unwrap();
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_millis(2500));
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_scaling_follows_requests_in_flight() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("busy")).await;
    cluster
        .apply(&route(
            "busy",
            "busy",
            "[{hosts: [busy.example]}]",
            "",
        ).replace(
            "metadata:\n  name: busy\n",
            "metadata:\n  name: busy\n  annotations:\n    wakegate.dev/scale-target-ref: Deployment/busy\n    wakegate.dev/max-replicas: \"3\"\n",
        ))
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let _controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    // Six slow requests at a target of one per replica: 0 -> 1 at the wake, then out to the
    // maximum of 3.
    let proxy = interceptor.proxy;
    let requests: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                Http::default()
                    .get(proxy, "busy.example", "/sleep?ms=4000")
                    .await
            })
        })
        .collect();
    eventually("scaled out to 3", Duration::from_secs(30), || async {
        cluster.replicas("busy").await == 3
    })
    .await;
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap().0, 200);
    }
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_and_a_graceful_shutdown_through_an_interceptor_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster
        .apply(&cluster.app_yaml("ws").replace("replicas: 0", "replicas: 1"))
        .await;
    cluster
        .apply(&route("ws", "ws", "[{hosts: [ws.example]}]", ""))
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let (http, proxy) = (Http::default(), interceptor.proxy);
    eventually("ws is up", Duration::from_secs(60), || async {
        let answer = who(&http, proxy, "ws.example", "/", &[]).await;
        if answer != "ws" {
            // Shown only if the wait fails: what the route answered instead.
            eprintln!("ws.example answered {answer:?}");
        }
        answer == "ws"
    })
    .await;

    // WebSocket: the upgrade is routed by the route's rules and the bytes echo both ways.
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    conn.write_all(
        b"GET /upgrade-echo HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    conn.write_all(b"ping over the tunnel").await.unwrap();
    let mut echo = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping over the tunnel");
    drop(conn);

    // Graceful shutdown: a request in flight when the interceptor is told to stop is answered.
    let slow = tokio::spawn(async move {
        Http::default()
            .get(proxy, "ws.example", "/sleep?ms=1500")
            .await
    });
    eventually(
        "the request is in flight",
        Duration::from_secs(10),
        || async {
            let (_, _, queue) = Http::default()
                .get(interceptor.admin, "admin", "/queue")
                .await
                .unwrap();
            queue.contains("\"Concurrency\":1")
        },
    )
    .await;
    interceptor.stop().await;
    let (status, _, _) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "drained, not cut");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_service_woken_from_zero_through_an_interceptor_route() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    // The Service port says h2c, as gRPC backends' do (the add-on reads the same appProtocol).
    cluster
        .apply(&cluster.app_yaml("grpc").replace(
            "{name: http, port: 8080, targetPort: http}",
            "{name: grpc, port: 8080, targetPort: http, appProtocol: kubernetes.io/h2c}",
        ))
        .await;
    cluster
        .apply(&route("grpc", "grpc", "[{hosts: [grpc.example]}]", "").replace(
            "metadata:\n  name: grpc\n",
            "metadata:\n  name: grpc\n  annotations:\n    wakegate.dev/scale-target-ref: Deployment/grpc\n",
        ))
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let _controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    assert_eq!(cluster.replicas("grpc").await, 0);

    // A real gRPC client (h2c prior knowledge) whose :authority is the route's host.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", interceptor.proxy))
        .unwrap()
        .origin("http://grpc.example".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    // Unary at zero: held, the Deployment woken, then answered with the cold-start header.
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("the call is answered once the pod is ready")
    .unwrap();
    assert_eq!(
        reply.metadata().get("x-keda-http-cold-start").unwrap(),
        "true"
    );
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    assert!(cluster.replicas("grpc").await >= 1, "woken from zero");

    // Warm: a server-streaming call, its first message and its trailers-only status for an
    // unknown service (grpc-status NOT_FOUND passed back through the proxy).
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
    let unknown = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    drop(watch);
    drop(interceptor);
    cluster.cleanup().await;
}
