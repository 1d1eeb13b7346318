//! End to end, KEDA mode, traced: the `true` the controller pushes on KEDA's StreamIsActive
//! stream when a request is held at zero is a span in the held request's trace. The test plays
//! KEDA (as `keda.rs` does) and receives the spans with an OTLP receiver of its own.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wakegate_controller::proto::external_scaler_client::ExternalScalerClient;
use wakegate_controller::proto::ScaledObjectRef;
use wakegate_e2e::{Cluster, Controller, Http, Interceptor};
use wakegate_testotlp::Receiver;

const CLIENT_TRACE: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const CLIENT_SPAN: &str = "051581bf3cb55c13";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_to_keda_is_a_span_in_the_held_requests_trace() {
    let otlp = Receiver::start().await.unwrap();
    let telemetry = wakegate_e2e::export_traces(&otlp.grpc_endpoint());
    let Some(cluster) = Cluster::start_keda(env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await
    else {
        return;
    };
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(wakegate_e2e::ADDON_EXAMPLE).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "auto", interceptor.admin).await;
    let so = cluster.scaled_object("xkcd").await;
    let metadata: HashMap<String, String> = so.data["spec"]["triggers"][0]["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let mut keda = ExternalScalerClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let sref = ScaledObjectRef {
        name: "xkcd".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: metadata,
    };
    let mut stream = keda.stream_is_active(sref).await.unwrap().into_inner();
    assert!(!stream.message().await.unwrap().unwrap().result);

    let proxy = interceptor.proxy;
    let request = tokio::spawn(async move {
        let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
        Http::default()
            .get_with(
                proxy,
                "myhost.com",
                "/test",
                &[("traceparent", &traceparent)],
            )
            .await
    });
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    // KEDA scales on the push; the held request is served.
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

    let spans = otlp
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.name == "StreamIsActive push")
                && spans
                    .iter()
                    .any(|s| s.kind == "SERVER" && s.trace_id == CLIENT_TRACE)
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}"));
    let server = spans
        .iter()
        .find(|s| s.kind == "SERVER" && s.trace_id == CLIENT_TRACE)
        .unwrap();
    assert_eq!(server.parent_span_id, CLIENT_SPAN);
    let push = spans
        .iter()
        .find(|s| s.name == "StreamIsActive push")
        .unwrap();
    assert_eq!(push.trace_id, CLIENT_TRACE, "{push:#?}");
    assert_eq!(push.parent_span_id, server.span_id);
    assert_eq!(
        push.attr("wakegate.route"),
        Some(format!("{}/xkcd", cluster.namespace).as_str())
    );
    assert!(push.start_unix_nano >= server.start_unix_nano);

    controller.stop().await;
    interceptor.stop().await;
    telemetry.shutdown();
    cluster.cleanup().await;
}
