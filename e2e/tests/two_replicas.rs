//! End to end, KEDA mode with two controller replicas: KEDA's calls land on either replica
//! (the gRPC Service balances over both), so the follower must answer `GetMetricSpec`,
//! `IsActive`, `StreamIsActive` and `GetMetrics` from its own watch, as the leader does.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wakegate_controller::proto::external_scaler_client::ExternalScalerClient;
use wakegate_controller::proto::{GetMetricsRequest, ScaledObjectRef};
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_answers_keda_like_the_leader() {
    let Some(cluster) = Cluster::start_keda(env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await
    else {
        return;
    };
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(wakegate_e2e::ADDON_EXAMPLE).await;
    let interceptor = Interceptor::start(&cluster).await;
    let leader = Controller::start(&cluster, "keda", interceptor.admin).await;
    // The leader made it.
    cluster.scaled_object("xkcd").await;
    // The second replica starts while the first holds the lease: it follows.
    let follower = Controller::start(&cluster, "keda", interceptor.admin).await;
    assert!(
        !follower
            .metrics()
            .await
            .contains("wakegate_controller_reconciles_total{"),
        "the second replica does not reconcile: it is the follower"
    );

    let mut keda = ExternalScalerClient::connect(format!("http://{}", follower.grpc))
        .await
        .unwrap();
    let sref = ScaledObjectRef {
        name: "xkcd".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: HashMap::from([("httpScaledObject".into(), "xkcd".into())]),
    };
    // It samples the interceptor (a request it has not sampled before is part of its baseline).
    eventually(
        "the follower samples the interceptor",
        Duration::from_secs(10),
        || async {
            follower
                .metrics()
                .await
                .contains(r#"wakegate_controller_interceptor_replicas{state="answering"} 1"#)
        },
    )
    .await;
    // Its own watch fills its routes shortly after it starts.
    eventually(
        "the follower knows the route",
        Duration::from_secs(10),
        || {
            let mut keda = keda.clone();
            let sref = sref.clone();
            async move { keda.get_metric_spec(sref).await.is_ok() }
        },
    )
    .await;
    let spec = keda
        .get_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        spec.metric_specs[0].metric_name,
        format!("http-{}-xkcd", cluster.namespace)
    );
    assert!(
        !keda
            .is_active(sref.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );

    let mut stream = keda
        .stream_is_active(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!stream.message().await.unwrap().unwrap().result);
    let proxy = interceptor.proxy;
    let request =
        tokio::spawn(async move { Http::default().get(proxy, "myhost.com", "/test").await });
    let pushed = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the follower pushed the wake")
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    assert!(
        keda.is_active(sref.clone())
            .await
            .unwrap()
            .into_inner()
            .result
    );
    eventually(
        "the follower's GetMetrics counts the held request",
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
                keda.get_metrics(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .metric_values[0]
                    .metric_value_float
                    > 0.0
            }
        },
    )
    .await;

    // KEDA scales on the push; the request is served.
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
    let (status, _, body) = request.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");

    // A route deleted goes from the follower too.
    Api::<wakegate_crds::HTTPScaledObject>::namespaced(cluster.client.clone(), &cluster.namespace)
        .delete("xkcd", &Default::default())
        .await
        .unwrap();
    eventually(
        "the follower forgot the deleted route",
        Duration::from_secs(20),
        || {
            let mut keda = keda.clone();
            let sref = sref.clone();
            async move {
                keda.get_metric_spec(sref)
                    .await
                    .is_err_and(|s| s.code() == tonic::Code::NotFound)
            }
        },
    )
    .await;

    follower.stop().await;
    leader.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}
