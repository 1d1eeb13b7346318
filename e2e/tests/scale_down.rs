//! End to end, standalone: when a workload goes back to zero. The rule is `scaledownPeriod`
//! after the last request any interceptor saw, plus at most one sample interval, for both
//! metrics, and a controller restart in between changes nothing.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::{Duration, Instant};

use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

/// The add-on's example HTTPScaledObject named `name`, at min 0 with a 4 s scale-down period,
/// on the concurrency metric or (with `rate`) the request rate over a 1 m window.
fn route(name: &str, host: &str, rate: bool) -> String {
    let metric = if rate {
        "requestRate:\n            granularity: 1s\n            targetValue: 1\n            window: 1m"
    } else {
        "concurrency:\n            targetValue: 100"
    };
    wakegate_e2e::ADDON_EXAMPLE
        .replace("name: xkcd", &format!("name: {name}"))
        .replace("service: xkcd", &format!("service: {name}"))
        .replace("myhost.com", host)
        .replace("min: 5", "min: 0")
        .replace("scaledownPeriod: 300", "scaledownPeriod: 4")
        .replace(
            "requestRate:\n            granularity: 1s\n            targetValue: 100\n            window: 1m",
            metric,
        )
}

const PERIOD: Duration = Duration::from_secs(4);

/// Watches `deployment` until it reaches zero, failing if that happens sooner than `not_before`
/// after `last_request`; returns how long after the last request it took.
async fn time_to_zero(cluster: &Cluster, deployment: &str, last_request: Instant) -> Duration {
    let until = last_request + PERIOD + Duration::from_secs(10);
    loop {
        let replicas = cluster.replicas(deployment).await;
        let since = last_request.elapsed();
        if replicas == 0 {
            assert!(
                since >= PERIOD,
                "{deployment} went to zero {since:?} after its last request, before the scale-down period"
            );
            return since;
        }
        assert!(
            Instant::now() < until,
            "{deployment} still at {replicas} replicas {since:?} after its last request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_comes_a_scaledown_period_after_the_last_request_for_both_metrics_across_a_restart() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    for name in ["conc", "rate"] {
        cluster.apply(&cluster.app_yaml(name)).await;
    }
    cluster.apply(&route("conc", "conc.example", false)).await;
    cluster.apply(&route("rate", "rate.example", true)).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    let http = Http::default();

    // Wake both; the rate route gets a burst, so its 1 m window still shows traffic long
    // after the last request.
    for host in ["conc.example", "rate.example"] {
        let (status, _, body) = http.get(interceptor.proxy, host, "/test").await.unwrap();
        assert_eq!(status, 200, "{host}: {body}");
    }
    for _ in 0..20 {
        let (status, _, _) = http
            .get(interceptor.proxy, "rate.example", "/test")
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let (status, _, _) = http
        .get(interceptor.proxy, "conc.example", "/test")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let last_request = Instant::now();

    // The controller restarts a second later. The new one must not take "not seen since I
    // started" for idle: the interceptor tells it when the last request was.
    eventually(
        "a sample after the last request",
        Duration::from_secs(5),
        || async { last_request.elapsed() >= Duration::from_secs(1) },
    )
    .await;
    controller.stop().await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;

    let (conc, rate) = tokio::join!(
        time_to_zero(&cluster, "conc", last_request),
        time_to_zero(&cluster, "rate", last_request)
    );
    println!(
        "scale-down after the last request (scaledownPeriod 4 s, sample interval 200 ms, controller restarted 1 s in): concurrency {conc:?}, request rate {rate:?}"
    );
    // At most one sample interval late, plus the restarted controller's start and the
    // test's own 50 ms polling.
    let slack = Duration::from_millis(1500);
    assert!(conc <= PERIOD + slack, "concurrency route late: {conc:?}");
    assert!(rate <= PERIOD + slack, "request-rate route late: {rate:?}");

    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_during_a_failover_is_not_lost() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("conc")).await;
    cluster.apply(&route("conc", "conc.example", false)).await;
    let interceptor = Interceptor::start(&cluster).await;
    let first = Controller::start(&cluster, "standalone", interceptor.admin).await;
    first.stop().await;
    // No controller leads: the wake is pushed to nobody, and the request is held.
    let proxy = interceptor.proxy;
    let held =
        tokio::spawn(async move { Http::default().get(proxy, "conc.example", "/test").await });
    let http = Http::default();
    eventually("the request is held", Duration::from_secs(5), || async {
        let (_, _, queue) = http
            .get(interceptor.admin, "admin", "/queue")
            .await
            .unwrap();
        queue.contains(r#"/conc":{"Concurrency":1"#)
    })
    .await;
    assert_eq!(cluster.replicas("conc").await, 0);
    // The next leader finds the held request at its first sample and wakes the workload.
    let second = Controller::start(&cluster, "standalone", interceptor.admin).await;
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    second.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}
