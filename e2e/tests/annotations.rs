//! Wakegate's `wakegate.dev/*` annotations on an HTTPScaledObject, end to end: a browser gets
//! the waiting page while the wake goes on, an API client is held and answered, and a bad
//! annotation is reported in the object's status.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use kube::api::Api;
use wakegate_crds::HTTPScaledObject;
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

const WAITING: &str = r#"
kind: HTTPScaledObject
apiVersion: http.keda.sh/v1alpha1
metadata:
    name: sleepy
    annotations:
        wakegate.dev/cold-start-response: waiting-page
        wakegate.dev/waiting-page-refresh-seconds: "3"
spec:
    hosts: [sleepy.example]
    scaleTargetRef: {name: sleepy, service: sleepy, port: 8080}
    replicas: {min: 0, max: 1}
    scaledownPeriod: 60
"#;

const TYPO: &str = r#"
kind: HTTPScaledObject
apiVersion: http.keda.sh/v1alpha1
metadata:
    name: typo
    annotations:
        wakegate.dev/cold-start: waiting-page
spec:
    hosts: [typo.example]
    scaleTargetRef: {name: typo, service: typo, port: 8080}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_the_waiting_page_while_an_api_client_is_held() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("sleepy")).await;
    cluster.apply(WAITING).await;
    cluster.apply(TYPO).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    let http = Http::default();
    eventually("the route is loaded", Duration::from_secs(20), || async {
        http.get(interceptor.admin, "admin", "/queue")
            .await
            .is_ok_and(|(_, _, body)| body.contains("sleepy"))
    })
    .await;

    let browser = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
    let (status, headers, body) = http
        .get_with(interceptor.proxy, "sleepy.example", "/", &browser)
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "3");
    assert!(
        body.contains("http-equiv=\"refresh\" content=\"3\""),
        "{body}"
    );

    // The page's request woke the target; an API client is held until it is up.
    let (status, headers, body) = http
        .get(interceptor.proxy, "sleepy.example", "/")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    // Once up, the browser gets the app, not the page.
    let (status, _, body) = http
        .get_with(interceptor.proxy, "sleepy.example", "/", &browser)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let api: Api<HTTPScaledObject> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    eventually("the typo is reported", Duration::from_secs(20), || async {
        api.get("typo")
            .await
            .ok()
            .and_then(|o| o.status)
            .is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Ready"
                        && c.status == "False"
                        && c.message.contains("wakegate.dev/cold-start")
                        && c.message.contains("is not a Wakegate annotation")
                })
            })
    })
    .await;
    controller.stop().await;
    interceptor.stop().await;
    cluster.cleanup().await;
}
