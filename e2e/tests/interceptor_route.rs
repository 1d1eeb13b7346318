//! End to end, InterceptorRoutes (`http.keda.sh/v1beta1`), the add-on's current API:
//!
//! - KEDA mode: the user's own ScaledObject with an `interceptorRoute` trigger; this test plays
//!   KEDA with the generated gRPC client: no metric spec before the route exists, both metrics
//!   once it does, `true` pushed when a request is held at zero, the metric values, and an
//!   edited `targetValue` streamed by `StreamMetricSpec` (the add-on's TestMetricUpdate).
//! - Standalone mode: the `wakegate.dev/scale-target-ref` annotation names the workload, a
//!   request at zero wakes it through several OR'd rules, a same-named HTTPScaledObject is
//!   shadowed and says so, and an invalid InterceptorRoute is rejected in its status.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::time::Duration;

use kube::api::Api;
use wakegate_controller::proto::external_scaler_client::ExternalScalerClient;
use wakegate_controller::proto::{GetMetricsRequest, ScaledObjectRef};
use wakegate_crds::{HTTPScaledObject, InterceptorRoute};
use wakegate_e2e::{eventually, Cluster, Controller, Http, Interceptor};

fn route_yaml(name: &str, concurrency: i32, extra_metadata: &str) -> String {
    format!(
        r#"apiVersion: http.keda.sh/v1beta1
kind: InterceptorRoute
metadata:
  name: {name}
{extra_metadata}spec:
  target:
    service: {name}
    port: 8080
  rules:
    - hosts: [{name}.example]
      paths: [{{value: /api}}]
    - hosts: [{name}.example.org]
  scalingMetric:
    concurrency:
      targetValue: {concurrency}
    requestRate:
      targetValue: 20
"#
    )
}

async fn ready(cluster: &Cluster, name: &str) -> Option<(String, String, String)> {
    let api: Api<InterceptorRoute> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let obj = api.get(name).await.ok()?;
    let c = obj
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_scales_an_interceptor_route_through_the_users_scaled_object() {
    let cluster = Cluster::start(true, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    if !cluster.simulated() && std::env::var("WAKEGATE_E2E_KEDA").is_err() {
        eprintln!("skipped: set WAKEGATE_E2E_KEDA=1 when the real cluster has KEDA's CRDs");
        cluster.cleanup().await;
        return;
    }
    cluster.apply(&cluster.app_yaml("shop")).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "keda", interceptor.admin).await;
    let mut keda = ExternalScalerClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    // The trigger metadata of the user's ScaledObject.
    let sref = ScaledObjectRef {
        name: "shop".into(),
        namespace: cluster.namespace.clone(),
        scaler_metadata: HashMap::from([
            (
                "scalerAddress".to_owned(),
                "wakegate-controller.wakegate:9090".to_owned(),
            ),
            ("interceptorRoute".to_owned(), "shop".to_owned()),
        ]),
    };

    // Before the route exists: no metric spec (KEDA falls back to CPU), not an error.
    let spec = keda
        .get_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(spec.metric_specs.is_empty(), "{spec:?}");

    cluster.apply(&route_yaml("shop", 10, "")).await;
    eventually("shop Ready=True", Duration::from_secs(20), || async {
        ready(&cluster, "shop")
            .await
            .is_some_and(|(s, r, _)| s == "True" && r == "Reconciled")
    })
    .await;
    let (_, _, message) = ready(&cluster, "shop").await.unwrap();
    assert!(message.contains("interceptorRoute: shop"), "{message}");

    // Both metrics, as floats.
    let spec = keda
        .get_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    let specs: Vec<(&str, f64)> = spec
        .metric_specs
        .iter()
        .map(|m| (m.metric_name.as_str(), m.target_size_float))
        .collect();
    assert_eq!(
        specs,
        [("http_shop_concurrency", 10.0), ("http_shop_rate", 20.0)]
    );

    // The edited targetValue reaches KEDA through StreamMetricSpec, nothing recreated.
    let mut spec_stream = keda
        .stream_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    let first = spec_stream.message().await.unwrap().unwrap();
    assert_eq!(first.metric_specs[0].target_size_float, 10.0);
    cluster.apply(&route_yaml("shop", 25, "")).await;
    let updated = tokio::time::timeout(Duration::from_secs(20), spec_stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(updated.metric_specs[0].metric_name, "http_shop_concurrency");
    assert_eq!(updated.metric_specs[0].target_size_float, 25.0);
    let again = keda
        .get_metric_spec(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, updated, "GetMetricSpec agrees with the stream");

    // A request at zero through the second rule: held, and `true` is pushed.
    let mut active = keda
        .stream_is_active(sref.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!active.message().await.unwrap().unwrap().result);
    let proxy = interceptor.proxy;
    let request =
        tokio::spawn(async move { Http::default().get(proxy, "shop.example.org", "/").await });
    let pushed = tokio::time::timeout(Duration::from_secs(5), active.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    eventually(
        "GetMetrics counts the held request",
        Duration::from_secs(10),
        || {
            let mut keda = keda.clone();
            let sref = sref.clone();
            async move {
                let values = keda
                    .get_metrics(GetMetricsRequest {
                        scaled_object_ref: Some(sref),
                        metric_name: "http_shop_concurrency".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .metric_values;
                values.len() == 1
                    && values[0].metric_name == "http_shop_concurrency"
                    && values[0].metric_value_float >= 1.0
            }
        },
    )
    .await;
    // KEDA scales 0 -> 1 (the test does what KEDA would), and the held request is served.
    let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    deploys
        .patch_scale(
            "shop",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let (status, headers, body) = request.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    // The rules are OR'd, host AND path within one: the first rule needs /api.
    let (status, _, _) = Http::default()
        .get(proxy, "shop.example", "/api/items")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = Http::default()
        .get(proxy, "shop.example", "/other")
        .await
        .unwrap();
    assert_eq!(status, 404);

    drop(controller);
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_scales_an_annotated_route_and_it_shadows_a_same_named_httpscaledobject() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("web")).await;
    // The HTTPScaledObject an add-on user had before migrating.
    cluster
        .apply(
            r#"apiVersion: http.keda.sh/v1alpha1
kind: HTTPScaledObject
metadata:
  name: web
spec:
  hosts: [old.example]
  scaleTargetRef: {name: web, service: web, port: 8080}
  replicas: {min: 0, max: 3}
"#,
        )
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let _controller = Controller::start(&cluster, "standalone", interceptor.admin).await;
    let hso: Api<HTTPScaledObject> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let hso_ready = || async {
        let c = hso.get("web").await.ok()?.status?.conditions;
        c.into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status, c.reason))
    };
    eventually(
        "web HTTPScaledObject Ready",
        Duration::from_secs(20),
        || async { hso_ready().await == Some(("True".into(), "Reconciled".into())) },
    )
    .await;

    // The InterceptorRoute of the same name, with the workload named for standalone mode.
    let annotations = "  annotations:\n    wakegate.dev/scale-target-ref: Deployment/web\n    wakegate.dev/max-replicas: \"3\"\n";
    cluster.apply(&route_yaml("web", 5, annotations)).await;
    eventually(
        "web InterceptorRoute Ready",
        Duration::from_secs(20),
        || async {
            ready(&cluster, "web")
                .await
                .is_some_and(|(s, r, _)| s == "True" && r == "Reconciled")
        },
    )
    .await;
    eventually(
        "the HTTPScaledObject says it is shadowed",
        Duration::from_secs(20),
        || async {
            hso_ready().await == Some(("False".into(), "ShadowedByInterceptorRoute".into()))
        },
    )
    .await;
    let (_, _, message) = ready(&cluster, "web").await.unwrap();
    assert!(
        message.contains("scaling apps/v1/Deployment/web between 0 and 3"),
        "{message}"
    );

    // The route in effect is the InterceptorRoute's: the old host is gone, the new rules wake
    // the workload from zero.
    let http = Http::default();
    eventually(
        "old host no longer routed",
        Duration::from_secs(10),
        || async {
            http.get(interceptor.proxy, "old.example", "/")
                .await
                .is_ok_and(|(s, _, _)| s == 404)
        },
    )
    .await;
    assert_eq!(cluster.replicas("web").await, 0);
    let (status, headers, body) = http
        .get(interceptor.proxy, "web.example", "/api/x")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-keda-http-cold-start"], "true");
    assert_eq!(cluster.replicas("web").await, 1);

    // An invalid InterceptorRoute is rejected in its status and disturbs nothing.
    cluster
        .apply(&route_yaml("bad", 0, "").replace("port: 8080", "port: 8080\n    portName: http"))
        .await;
    eventually("bad Ready=False", Duration::from_secs(20), || async {
        ready(&cluster, "bad")
            .await
            .is_some_and(|(s, r, _)| s == "False" && r == "InvalidSpec")
    })
    .await;
    let (_, _, message) = ready(&cluster, "bad").await.unwrap();
    assert!(
        message.contains("spec.target: set exactly one of port and portName"),
        "{message}"
    );
    let (status, _, _) = http
        .get(interceptor.proxy, "web.example.org", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);

    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_output_moves_an_httpscaledobject_over_and_its_scaled_object_survives() {
    use kube::api::{DeleteParams, DynamicObject};
    use wakegate_controller::reconcile::scaled_object_resource;
    let cluster = Cluster::start(true, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    if !cluster.simulated() && std::env::var("WAKEGATE_E2E_KEDA").is_err() {
        eprintln!("skipped: set WAKEGATE_E2E_KEDA=1 when the real cluster has KEDA's CRDs");
        cluster.cleanup().await;
        return;
    }
    let before = wakegate_e2e::ADDON_EXAMPLE;
    cluster.apply(&cluster.app_yaml("xkcd")).await;
    cluster.apply(before).await;
    let interceptor = Interceptor::start(&cluster).await;
    let controller = Controller::start(&cluster, "keda", interceptor.admin).await;
    let sos: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &scaled_object_resource(),
    );
    let owners = || async {
        sos.get_opt("xkcd")
            .await
            .unwrap()
            .map(|so| so.metadata.owner_references.unwrap_or_default().len())
    };
    eventually(
        "the generated ScaledObject",
        Duration::from_secs(20),
        || async { owners().await == Some(1) },
    )
    .await;

    let steps =
        wakegate_controller::migrate::migrate(before, "wakegate-controller.wakegate:9090", false)
            .unwrap();
    // Step 1: the orphan annotation.
    cluster
        .apply(&before.replace(
            "    name: xkcd\nspec",
            "    name: xkcd\n    annotations:\n        httpscaledobject.keda.sh/orphan-scaledobject: \"true\"\nspec",
        ))
        .await;
    eventually(
        "the ScaledObject is orphaned",
        Duration::from_secs(20),
        || async { owners().await == Some(0) },
    )
    .await;
    // Step 2: the InterceptorRoute and the ScaledObject `migrate` printed.
    cluster.apply(&steps).await;
    eventually(
        "the InterceptorRoute is Ready",
        Duration::from_secs(20),
        || async {
            ready(&cluster, "xkcd")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        },
    )
    .await;
    let hso: Api<HTTPScaledObject> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    eventually(
        "the HTTPScaledObject is shadowed",
        Duration::from_secs(20),
        || async {
            hso.get("xkcd")
                .await
                .ok()
                .and_then(|o| o.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "ShadowedByInterceptorRoute")
                })
        },
    )
    .await;
    // Step 3: delete the HTTPScaledObject; the ScaledObject stays, as the user's.
    hso.delete("xkcd", &DeleteParams::default()).await.unwrap();
    eventually(
        "the HTTPScaledObject is gone",
        Duration::from_secs(20),
        || async { hso.get_opt("xkcd").await.unwrap().is_none() },
    )
    .await;
    let so = sos.get("xkcd").await.unwrap();
    assert_eq!(
        so.data["spec"]["triggers"][0]["metadata"]["interceptorRoute"],
        "xkcd"
    );
    assert_eq!(so.data["spec"]["minReplicaCount"], 5);
    // KEDA, following the repointed trigger, gets the route's metric.
    let mut keda = ExternalScalerClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let spec = keda
        .get_metric_spec(ScaledObjectRef {
            name: "xkcd".into(),
            namespace: cluster.namespace.clone(),
            scaler_metadata: HashMap::from([("interceptorRoute".to_owned(), "xkcd".to_owned())]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, "http_xkcd_rate");
    assert_eq!(spec.metric_specs[0].target_size_float, 100.0);

    drop(controller);
    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_come_from_labelled_config_maps_by_key_or_by_request_path() {
    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster.apply(&cluster.app_yaml("docs")).await;
    cluster
        .apply(
            r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: site
  labels: {http.keda.sh/response-body: "true"}
data:
  index.html: "<h1>asleep</h1>"
  app.js: "console.log(1)"
  busy: "starting up"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: unlabelled
data:
  busy: "never served"
---
apiVersion: http.keda.sh/v1beta1
kind: InterceptorRoute
metadata:
  name: docs
spec:
  target: {service: docs, port: 8080}
  rules: [{hosts: [docs.example]}]
  scalingMetric: {concurrency: {targetValue: 1}}
  staticRoutes:
    - rules: [{}]
      response: {bodyFromConfigMap: {name: site}}
      responseMode: Always
---
apiVersion: http.keda.sh/v1beta1
kind: InterceptorRoute
metadata:
  name: wait
spec:
  target: {service: docs, port: 8080}
  rules: [{hosts: [wait.example]}]
  scalingMetric: {concurrency: {targetValue: 1}}
  coldStart:
    placeholder: {response: {bodyFromConfigMap: {name: site, key: busy}}}
---
apiVersion: http.keda.sh/v1beta1
kind: InterceptorRoute
metadata:
  name: broken
spec:
  target: {service: docs, port: 8080}
  rules: [{hosts: [broken.example]}]
  scalingMetric: {concurrency: {targetValue: 1}}
  coldStart:
    placeholder: {response: {bodyFromConfigMap: {name: unlabelled, key: busy}}}
"#,
        )
        .await;
    let interceptor = Interceptor::start(&cluster).await;
    let http = Http::default();
    let proxy = interceptor.proxy;
    eventually("the routes are in", Duration::from_secs(10), || async {
        http.get(proxy, "docs.example", "/")
            .await
            .is_ok_and(|(s, _, _)| s == 200)
    })
    .await;
    // No key: the request path names it, and its extension the content type.
    let (status, headers, body) = http.get(proxy, "docs.example", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "<h1>asleep</h1>"));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let (status, headers, body) = http.get(proxy, "docs.example", "/app.js").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "console.log(1)"));
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript"),
        "{headers:?}"
    );
    // A derived key the ConfigMap lacks: an empty body.
    let (status, _, body) = http.get(proxy, "docs.example", "/none.css").await.unwrap();
    assert_eq!((status, body.as_str()), (200, ""));
    // A named key: the placeholder's body, served at once while the target is cold.
    let (status, _, body) = http.get(proxy, "wait.example", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (503, "starting up"));
    // A ConfigMap without the label is never read: 500, naming no internals.
    let (status, _, body) = http.get(proxy, "broken.example", "/").await.unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(!body.contains("never served"), "{body}");
    assert!(body.contains("missing from its ConfigMap"), "{body}");
    // Nothing served statically was counted.
    let (_, _, queue) = http
        .get(interceptor.admin, "admin", "/queue")
        .await
        .unwrap();
    let queue: serde_json::Value = serde_json::from_str(&queue).unwrap();
    let docs_key = format!("{}/docs", cluster.namespace);
    assert_eq!(queue[&docs_key]["RequestCount"], 0, "{queue}");

    drop(interceptor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_persistence_pins_a_client_to_a_pod_and_repins_when_it_goes() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::DeleteParams;
    use wakegate_interceptor::provider::{session_id, Endpoint, SessionAffinity};

    let cluster = Cluster::start(false, env!("CARGO_BIN_EXE_wakegate-e2e-backend")).await;
    cluster
        .apply(
            &cluster
                .app_yaml("sticky")
                .replace("replicas: 0", "replicas: 3"),
        )
        .await;
    cluster
        .apply(
            r#"apiVersion: http.keda.sh/v1beta1
kind: InterceptorRoute
metadata:
  name: sticky
spec:
  target: {service: sticky, port: 8080}
  rules: [{hosts: [sticky.example]}]
  scalingMetric: {concurrency: {targetValue: 10}}
  sessionPersistence: {type: Cookie}
"#,
        )
        .await;
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    // The ready pods' addresses, with their pod names, as the EndpointSlices list them.
    let ready_pods = || async {
        let list = slices.list(&Default::default()).await.unwrap();
        let mut pods = Vec::new();
        for slice in list.items {
            let Some(port) = slice
                .ports
                .as_ref()
                .and_then(|p| p.first())
                .and_then(|p| p.port)
            else {
                continue;
            };
            for ep in slice.endpoints {
                let ready = ep
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(false);
                if let (true, Some(name)) = (ready, ep.target_ref.and_then(|r| r.name)) {
                    for addr in &ep.addresses {
                        pods.push((format!("{addr}:{port}"), name.clone()));
                    }
                }
            }
        }
        pods
    };
    eventually("three pods ready", Duration::from_secs(60), || async {
        ready_pods().await.len() == 3
    })
    .await;
    let interceptor = Interceptor::start(&cluster).await;
    let http = Http::default();
    let proxy = interceptor.proxy;
    eventually("the route is in", Duration::from_secs(10), || async {
        http.get(proxy, "sticky.example", "/")
            .await
            .is_ok_and(|(s, _, _)| s == 200)
    })
    .await;
    let cookie_name = SessionAffinity::default_cookie(&format!("{}/sticky", cluster.namespace));

    // The first answer sets the cookie; the next 20 with it all reach the same pod and get no
    // new cookie.
    let pin = |headers: &http::HeaderMap| -> String {
        let set = headers["set-cookie"].to_str().unwrap().to_owned();
        assert!(set.starts_with(&format!("{cookie_name}=")), "{set}");
        assert!(set.contains("; Path=/; HttpOnly; SameSite=Lax"), "{set}");
        assert!(!set.contains("Secure"), "plain HTTP: {set}");
        set.split(';').next().unwrap().to_owned()
    };
    let (_, headers, _) = http.get(proxy, "sticky.example", "/").await.unwrap();
    let cookie = pin(&headers);
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, headers, _) = http
            .get_with(proxy, "sticky.example", "/", &[("cookie", cookie.as_str())])
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            !headers.contains_key("set-cookie"),
            "an established session"
        );
        pids.insert(headers["x-backend-pid"].to_str().unwrap().to_owned());
    }
    assert_eq!(pids.len(), 1, "pinned to one pod: {pids:?}");
    // Without the cookie, the three pods share the load.
    let mut spread = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let (_, headers, _) = http.get(proxy, "sticky.example", "/").await.unwrap();
        spread.insert(headers["x-backend-pid"].to_str().unwrap().to_owned());
    }
    assert_eq!(spread.len(), 3, "{spread:?}");

    // Delete the pinned pod: the session moves to a ready pod with a new cookie, and stays.
    let id = cookie
        .split_once('=')
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let pinned = ready_pods()
        .await
        .into_iter()
        .find(|(addr, _)| session_id(&Endpoint::new(addr.parse().unwrap())) == id)
        .map(|(_, pod)| pod)
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    pods.delete(&pinned, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the pinned pod is no longer ready",
        Duration::from_secs(60),
        || async { !ready_pods().await.iter().any(|(_, pod)| *pod == pinned) },
    )
    .await;
    eventually(
        "the session is repinned",
        Duration::from_secs(10),
        || async {
            let (status, headers, _) = http
                .get_with(proxy, "sticky.example", "/", &[("cookie", cookie.as_str())])
                .await
                .unwrap();
            status == 200 && headers.contains_key("set-cookie")
        },
    )
    .await;
    let (_, headers, _) = http
        .get_with(proxy, "sticky.example", "/", &[("cookie", cookie.as_str())])
        .await
        .unwrap();
    let repinned = pin(&headers);
    assert_ne!(repinned, cookie);
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (_, headers, _) = http
            .get_with(
                proxy,
                "sticky.example",
                "/",
                &[("cookie", repinned.as_str())],
            )
            .await
            .unwrap();
        assert!(!headers.contains_key("set-cookie"));
        pids.insert(headers["x-backend-pid"].to_str().unwrap().to_owned());
    }
    assert_eq!(pids.len(), 1, "the new pin is stable: {pids:?}");
    // A malformed cookie is replaced too.
    let (_, headers, _) = http
        .get_with(
            proxy,
            "sticky.example",
            "/",
            &[("cookie", &format!("{cookie_name}=garbage"))],
        )
        .await
        .unwrap();
    pin(&headers);

    drop(interceptor);
    cluster.cleanup().await;
}
