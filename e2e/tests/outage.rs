//! When the API server goes away, the interceptor keeps serving the routes and endpoints it
//! last knew. (Simulated cluster only: a test cannot take a real API server down.)

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use wakegate_e2e::{eventually, Cluster, Http, Interceptor};

const APP: &str = r#"
kind: HTTPScaledObject
apiVersion: http.keda.sh/v1alpha1
metadata:
    name: steady
spec:
    hosts: [steady.example]
    scaleTargetRef: {name: steady, service: steady, port: 8080}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_keep_serving_through_an_api_server_outage() {
    let mut cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    if !cluster.simulated() {
        eprintln!("skipped: an API server outage can only be staged on the test API server");
        cluster.cleanup().await;
        return;
    }
    cluster
        .apply(
            &cluster
                .app_yaml("steady")
                .replace("replicas: 0", "replicas: 1"),
        )
        .await;
    cluster.apply(APP).await;
    let interceptor = Interceptor::start(&cluster).await;
    let http = Http::default();
    eventually("steady serves", Duration::from_secs(20), || async {
        http.get(interceptor.proxy, "steady.example", "/")
            .await
            .is_ok_and(|(s, _, _)| s == 200)
    })
    .await;

    cluster.stop_api_server();
    for _ in 0..20 {
        let (status, headers, body) = http
            .get(interceptor.proxy, "steady.example", "/")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-keda-http-cold-start"], "false");
    }
    let (status, _, _) = http
        .get(interceptor.admin, "admin", "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 200, "still ready: it has routes to serve");
    interceptor.stop().await;
}
