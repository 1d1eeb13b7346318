//! End to end, standalone scaling (no KEDA): the add-on's example HTTPScaledObject, a request
//! held at zero, the controller scaling the Deployment from the wake, the request answered,
//! the scale back to zero after the scale-down period, and an invalid object that disturbs
//! nothing.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::{Duration, Instant};

use kube::api::Api;
use wakegate_crds::HTTPScaledObject;
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

/// The KEDA HTTP Add-on's documented example, with min 0 (so it can scale to zero), a 2 s
/// scale-down period and the concurrency metric.
fn xkcd() -> String {
    wakegate_e2e::ADDON_EXAMPLE
        .replace("min: 5", "min: 0")
        .replace("scaledownPeriod: 300", "scaledownPeriod: 2")
        .replace(
            "requestRate:\n            granularity: 1s\n            targetValue: 100\n            window: 1m",
            "concurrency:\n            targetValue: 100",
        )
}

async fn ready(cluster: &Cluster, name: &str) -> Option<(String, String, String)> {
    let api: Api<HTTPScaledObject> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let obj = api.get(name).await.ok()?;
    let c = obj
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_wakes_serves_scales_to_zero_and_isolates_invalid_objects() {
    assert!(
        xkcd().contains("concurrency:") && xkcd().contains("min: 0"),
        "{}",
        xkcd()
    );
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(&xkcd()).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    eventually("xkcd Ready=True", Duration::from_secs(20), || async {
        ready(&cluster, "xkcd")
            .await
            .is_some_and(|(s, r, _)| s == "True" && r == "Reconciled")
    })
    .await;
    let api: Api<HTTPScaledObject> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let status = api.get("xkcd").await.unwrap().status.unwrap();
    assert_eq!(
        status.target_workload.as_deref(),
        Some("apps/v1/Deployment/xkcd")
    );
    assert_eq!(status.target_service.as_deref(), Some("xkcd:8080"));
    assert_eq!(cluster.replicas("xkcd").await, 0);

    // A request at zero is held; the wake reaches the controller, which scales to 1; the pod
    // becomes ready and the request is answered.
    let http = Http::default();
    let started = Instant::now();
    let (status, headers, body) = http
        .get(interceptor.proxy, "myhost.com", "/test/comic")
        .await
        .unwrap();
    let cold_start = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    assert!(body.contains("hello from xkcd"), "{body}");
    assert_eq!(cluster.replicas("xkcd").await, 1);
    let metrics = controller.metrics().await;
    assert!(
        metrics.contains("wakegate_controller_scale_actions_total{reason=\"wake\"} 1"),
        "{metrics}"
    );
    let latency = metric_value(
        &metrics,
        "wakegate_controller_wake_latency_seconds_sum{action=\"scale\"}",
    );
    println!("cold start through the cluster: {cold_start:?}; wake latency (held -> scale call): {:.2} ms", latency * 1000.0);
    assert!(latency > 0.0);

    // Warm: no hold.
    let (status, headers, _) = http
        .get(interceptor.proxy, "myhost.com", "/test")
        .await
        .unwrap();
    assert_eq!(
        (status, headers["x-keda-http-cold-start"].to_str().unwrap()),
        (200, "false")
    );
    let (status, _, body) = http
        .get(interceptor.proxy, "myhost.com", "/other")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");

    // An invalid object ends Ready=False with a clear reason; the valid one keeps working.
    cluster
        .apply(
            &xkcd()
                .replace("name: xkcd\nspec", "name: broken\nspec")
                .replace("port: 8080", "port: 8080\n        portName: http")
                .replace("myhost.com", "broken.com"),
        )
        .await;
    eventually("broken Ready=False", Duration::from_secs(20), || async {
        ready(&cluster, "broken")
            .await
            .is_some_and(|(s, r, _)| s == "False" && r == "InvalidSpec")
    })
    .await;
    let (_, _, message) = ready(&cluster, "broken").await.unwrap();
    assert!(
        message.contains("spec.scaleTargetRef: set exactly one of port and portName"),
        "{message}"
    );
    let (status, _, _) = http
        .get(interceptor.proxy, "myhost.com", "/test")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = http
        .get(interceptor.proxy, "broken.com", "/test")
        .await
        .unwrap();
    assert_eq!(status, 404, "an invalid object is not routed");

    // After the scale-down period with no traffic, back to zero.
    eventually("xkcd scaled back to 0", Duration::from_secs(30), || async {
        cluster.replicas("xkcd").await == 0
    })
    .await;
    let metrics = controller.metrics().await;
    assert!(
        metrics.contains("wakegate_controller_scale_actions_total{reason=\"idle\"} 1"),
        "{metrics}"
    );

    // And it wakes again.
    let (status, headers, _) = http
        .get(interceptor.proxy, "myhost.com", "/test")
        .await
        .unwrap();
    assert_eq!(
        (status, headers["x-keda-http-cold-start"].to_str().unwrap()),
        (200, "true")
    );

    // A workload that an HPA already scales: reported, and left alone.
    cluster.apply(&cluster.app_yaml("owned")).await;
    cluster
        .apply(
            r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: owned}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: owned}
  minReplicas: 1
  maxReplicas: 3
---
kind: HTTPScaledObject
apiVersion: http.keda.sh/v1alpha1
metadata: {name: owned}
spec:
  hosts: [owned.example]
  scaleTargetRef: {name: owned, service: owned, port: 8080}
"#,
        )
        .await;
    eventually(
        "owned reports its other owner",
        Duration::from_secs(20),
        || async {
            let obj = api.get("owned").await.ok();
            let scaling = obj
                .and_then(|o| o.status)
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Scaling"));
            scaling.is_some_and(|c| {
                c.status == "False"
                    && c.reason == "ScaledByAnotherOwner"
                    && c.message.contains("HorizontalPodAutoscaler owned")
            })
        },
    )
    .await;
    let held = tokio::spawn({
        let http = http.clone();
        let proxy = interceptor.proxy;
        async move { http.get(proxy, "owned.example", "/").await }
    });
    eventually("the request is held", Duration::from_secs(5), || async {
        let (_, _, queue) = http
            .get(interceptor.admin, "admin", "/queue")
            .await
            .unwrap();
        queue.contains(r#""e2e/owned":{"Concurrency":1"#)
            || queue.contains(&format!(
                r#""{}/owned":{{"Concurrency":1"#,
                cluster.namespace
            ))
    })
    .await;
    // Several sample rounds later (each followed by the scaler's decisions), the controller has
    // not touched its replicas.
    let rounds = metric_value(
        &controller.metrics().await,
        "wakegate_controller_sample_rounds_total",
    );
    eventually(
        "five more sample rounds",
        Duration::from_secs(10),
        || async {
            metric_value(
                &controller.metrics().await,
                "wakegate_controller_sample_rounds_total",
            ) >= rounds + 5.0
        },
    )
    .await;
    assert_eq!(
        cluster.replicas("owned").await,
        0,
        "the HPA owns this workload's scale"
    );
    held.abort();

    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}

fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
