//! End to end, keep-awake (`Wakegate-Keep-Awake`) in Kubernetes mode: the interceptors report a
//! backend's deadline in `/queue`, the standalone controller holds the workload up until it
//! passes (across a controller restart), then scales it to zero after the scale-down period,
//! and in KEDA mode `IsActive` stays true until the deadline.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wakegate_controller::proto::external_scaler_client::ExternalScalerClient;
use wakegate_controller::proto::ScaledObjectRef;
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

/// Long enough for a controller restart inside it on a slow machine.
const KEEP_AWAKE_S: u64 = 10;

/// The add-on's example, scaling from zero with a 1 s scale-down period.
fn app() -> String {
    wakegate_e2e::ADDON_EXAMPLE
        .replace("min: 5", "min: 0")
        .replace("scaledownPeriod: 300", "scaledownPeriod: 1")
        .replace(
            "requestRate:\n            granularity: 1s\n            targetValue: 100\n            window: 1m",
            "concurrency:\n            targetValue: 100",
        )
}

/// The route's keep-awake time left, as the interceptor reports it in `/queue`.
async fn keep_awake_ms(admin: SocketAddr, route: &str) -> Option<u64> {
    let (_, _, body) = Http::default().get(admin, "admin", "/queue").await.unwrap();
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    queue[route]["KeepAwakeMs"].as_u64()
}

fn sample_rounds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("wakegate_controller_sample_rounds_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits for `n` more of the controller's sample rounds (each followed by its decisions).
async fn rounds(controller: &Controller, n: f64) {
    let from = sample_rounds(&controller.metrics().await);
    eventually("more sample rounds", Duration::from_secs(20), || async {
        sample_rounds(&controller.metrics().await) >= from + n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_controller_keeps_the_workload_up_until_the_deadline_across_a_restart() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(&app()).await;
    let interceptor = Interceptor::start(&cluster).await;
    let route = format!("{}/xkcd", cluster.namespace);
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;

    let http = Http::default();
    let path = format!("/test/?keep-awake={KEEP_AWAKE_S}");
    let (status, headers, body) = http
        .get(interceptor.proxy, "myhost.com", &path)
        .await
        .unwrap();
    let answered = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    assert!(!headers.contains_key("wakegate-keep-awake"));
    assert_eq!(cluster.replicas("xkcd").await, 1);

    // Idle for longer than the 1 s scale-down period, several decisions later: still up,
    // because the deadline is still ahead (read after the replicas, so it was ahead then).
    eventually(
        "idle past the scale-down period",
        Duration::from_secs(20),
        || async {
            keep_awake_ms(interceptor.admin, &route)
                .await
                .is_some_and(|ms| ms < (KEEP_AWAKE_S - 2) * 1000)
        },
    )
    .await;
    rounds(&controller, 3.0).await;
    assert_eq!(
        cluster.replicas("xkcd").await,
        1,
        "scaled in while kept awake"
    );
    assert!(keep_awake_ms(interceptor.admin, &route).await.is_some());

    // A controller restart changes nothing: the interceptor still reports the deadline.
    controller.stop().await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    rounds(&controller, 3.0).await;
    let replicas = cluster.replicas("xkcd").await;
    let still_ahead = keep_awake_ms(interceptor.admin, &route).await.is_some();
    assert!(
        still_ahead,
        "the machine was too slow to restart the controller within the deadline"
    );
    assert_eq!(
        replicas, 1,
        "the new controller scaled in a workload kept awake"
    );

    // Once it passes, the scale-down period runs from it, then zero.
    eventually(
        "scaled to zero after the deadline",
        Duration::from_secs(30),
        || async { cluster.replicas("xkcd").await == 0 },
    )
    .await;
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_secs(KEEP_AWAKE_S) + Duration::from_millis(900),
        "scaled to zero {took:?} after the answer, before the deadline and the period after it"
    );
    assert!(controller
        .metrics()
        .await
        .contains("wakegate_controller_scale_actions_total{reason=\"idle\"} 1"));

    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_keda_mode_is_active_follows_the_deadline() {
    let Some(cluster) = Cluster::start_keda(env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await
    else {
        return;
    };
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(&app()).await;
    let interceptor = Interceptor::start(&cluster).await;
    let route = format!("{}/xkcd", cluster.namespace);
    // A 1 s activity window, so only the keep-awake can keep the route active for long.
    let controller = Controller::start_with_args(
        &cluster,
        "auto",
        interceptor.admin,
        &cluster.namespace,
        &cluster.kubeconfig,
        &["--activity-window", "1s"],
    )
    .await;
    let keda = ExternalScalerClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let sref = ScaledObjectRef {
        name: "xkcd".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: HashMap::from([("httpScaledObject".to_owned(), "xkcd".to_owned())]),
    };
    let is_active = {
        let sref = sref.clone();
        move || {
            let (mut keda, sref) = (keda.clone(), sref.clone());
            async move { keda.is_active(sref).await.unwrap().into_inner().result }
        }
    };

    // KEDA would scale 0 -> 1 on the push; the test does it, then asks to be kept awake.
    cluster
        .apply(
            &cluster
                .app_yaml("xkcd")
                .replace("replicas: 0", "replicas: 1"),
        )
        .await;
    let http = Http::default();
    let path = format!("/test/?keep-awake={KEEP_AWAKE_S}");
    let (status, _, body) = http
        .get(interceptor.proxy, "myhost.com", &path)
        .await
        .unwrap();
    let answered = Instant::now();
    assert_eq!(status, 200, "{body}");
    eventually(
        "the controller sees the deadline",
        Duration::from_secs(10),
        || async { is_active().await },
    )
    .await;
    // Well past the activity window with no request: active, while the deadline is ahead.
    eventually(
        "past the activity window",
        Duration::from_secs(20),
        || async {
            keep_awake_ms(interceptor.admin, &route)
                .await
                .is_some_and(|ms| ms < (KEEP_AWAKE_S - 3) * 1000)
        },
    )
    .await;
    rounds(&controller, 2.0).await;
    let active = is_active().await;
    assert!(keep_awake_ms(interceptor.admin, &route).await.is_some());
    assert!(active, "inactive while a keep-awake deadline is ahead");

    // After it: inactive, so KEDA's cooldown can run.
    eventually(
        "inactive after the deadline",
        Duration::from_secs(30),
        || async { !is_active().await },
    )
    .await;
    assert!(answered.elapsed() >= Duration::from_secs(KEEP_AWAKE_S));

    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}
