//! End to end, KEDA mode: the controller (in `auto` mode, finding KEDA's ScaledObject kind
//! served) creates the ScaledObject the add-on would, and serves the external scaler. This test
//! plays KEDA with a gRPC client generated from the same proto: it streams activity, sees `true`
//! pushed the moment a request is held at zero, asks for the metric spec and metrics, and
//! patches the scale as KEDA would.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wakegate_controller::proto::external_scaler_client::ExternalScalerClient;
use wakegate_controller::proto::{GetMetricsRequest, ScaledObjectRef};
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

/// The KEDA HTTP Add-on's documented example, unchanged.
const XKCD: &str = wakegate_e2e::ADDON_EXAMPLE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_plays_through_the_external_scaler_from_zero() {
    let Some(cluster) = Cluster::start_keda(env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await
    else {
        return;
    };
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(XKCD).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "auto", interceptor.admin).await;

    // The ScaledObject, exactly as the add-on makes it.
    let sos = cluster.scaled_objects();
    let so = cluster.scaled_object("xkcd").await;
    let hso_uid = Api::<wakegate_crds::HTTPScaledObject>::namespaced(
        cluster.client.clone(),
        &cluster.namespace,
    )
    .get("xkcd")
    .await
    .unwrap()
    .metadata
    .uid
    .unwrap();
    let owner = &so.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("HTTPScaledObject", hso_uid.as_str(), Some(true))
    );
    let spec = &so.data["spec"];
    assert_eq!(
        spec["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "xkcd"})
    );
    assert_eq!(
        (
            spec["minReplicaCount"].as_i64(),
            spec["maxReplicaCount"].as_i64()
        ),
        (Some(5), Some(10))
    );
    assert_eq!(spec["cooldownPeriod"], 300);
    assert_eq!(spec["advanced"]["restoreToOriginalReplicaCount"], true);
    let trigger = &spec["triggers"][0];
    assert_eq!(trigger["type"], "external-push");
    assert_eq!(trigger["metadata"]["httpScaledObject"], "xkcd");
    assert_eq!(
        trigger["metadata"]["scalerAddress"],
        "wakegate-controller.wakegate:9090"
    );

    // Play KEDA: connect with the scaler's metadata, as KEDA passes the trigger's.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", controller.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "externalscaler.ExternalScaler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut keda = ExternalScalerClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let metadata: HashMap<String, String> = trigger["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let sref = ScaledObjectRef {
        name: "xkcd".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: metadata,
    };
    let spec = keda
        .get_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        spec.metric_specs[0].metric_name,
        format!("http-{}-xkcd", cluster.namespace)
    );
    assert_eq!(spec.metric_specs[0].target_size_float, 100.0);
    assert!(
        !keda
            .is_active(sref.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let unknown = ScaledObjectRef {
        name: "nope".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: HashMap::new(),
    };
    assert_eq!(
        keda.is_active(unknown).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let mut stream = keda
        .stream_is_active(sref.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.result, "at zero and idle: not active");

    // A request at zero: held, and `true` is pushed at once.
    let http = Http::default();
    let proxy = interceptor.proxy;
    let started = Instant::now();
    let request = tokio::spawn(async move { http.get(proxy, "myhost.com", "/test").await });
    let pushed = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    let pushed_after = started.elapsed();
    assert!(
        keda.is_active(sref.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let metrics = controller.metrics().await;
    let latency = metrics
        .lines()
        .find(|l| l.starts_with("wakegate_controller_wake_latency_seconds_sum{action=\"push\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    println!("StreamIsActive pushed true {pushed_after:?} after the request was sent; held -> push: {:.2} ms", latency * 1000.0);

    // KEDA scales 0 -> 1 on the push (the test does what KEDA would), and the request is served.
    let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    deploys
        .patch_scale(
            "xkcd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let (status, headers, body) = request.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");

    // The request rate KEDA polls for: a single request is not rounded away. (The one above
    // may predate the controller's first sample of this interceptor, which is a baseline.)
    let (status, _, _) = Http::default()
        .get(interceptor.proxy, "myhost.com", "/test")
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually(
        "GetMetrics reports the request",
        Duration::from_secs(10),
        || {
            let mut keda = keda.clone();
            let sref = sref.clone();
            let metric_name = format!("http-{}-xkcd", cluster.namespace);
            async move {
                let req = GetMetricsRequest {
                    scaled_object_ref: Some(sref),
                    metric_name,
                };
                let values = keda
                    .get_metrics(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .metric_values;
                #[allow(deprecated)]
                let whole = values[0].metric_value;
                values[0].metric_value_float > 0.0 && whole >= 1
            }
        },
    )
    .await;

    // The skip annotation removes the owned ScaledObject.
    cluster
        .apply(&XKCD.replace("    name: xkcd\nspec", "    name: xkcd\n    annotations:\n        httpscaledobject.keda.sh/skip-scaledobject-creation: \"true\"\nspec"))
        .await;
    eventually(
        "the ScaledObject is deleted",
        Duration::from_secs(20),
        || async { sos.get_opt("xkcd").await.unwrap().is_none() },
    )
    .await;

    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}
