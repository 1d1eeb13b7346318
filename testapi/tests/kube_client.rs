//! The test API server against the real kube client and kube-runtime watcher.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use wakegate_crds::HTTPScaledObject;
use wakegate_testapi::{ApiServer, ResourceDef};

async fn client(server: &ApiServer) -> Client {
    let config = kube::Config::new(server.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": "app"}]}}}
    }))
    .unwrap()
}

#[tokio::test]
async fn crud_conflicts_subresources_and_selectors() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = client(&server).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");

    let created = deploys
        .create(&PostParams::default(), &deployment("web", 0))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let err = deploys
        .create(&PostParams::default(), &deployment("web", 0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    let err = deploys.get("nope").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // The scale subresource.
    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(0));
    deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    let now = deploys.get("web").await.unwrap();
    assert_eq!(now.spec.unwrap().replicas, Some(2));
    assert_eq!(now.metadata.generation, Some(2));

    // Status is written only through its subresource.
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(deploys.get("web").await.unwrap().status, None);
    deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(
        deploys.get("web").await.unwrap().status.unwrap().replicas,
        Some(9)
    );

    // JSON patch and server-side apply.
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "add", "path": "/metadata/labels/tier", "value": "front"}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let applied = deploys
        .patch(
            "api",
            &PatchParams::apply("test").force(),
            &Patch::Apply(deployment("api", 1)),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.name.as_deref(), Some("api"));
    let fronts = deploys
        .list(&ListParams::default().labels("tier=front"))
        .await
        .unwrap();
    assert_eq!(fronts.items.len(), 1);
    let named = deploys
        .list(&ListParams::default().fields("metadata.name=api"))
        .await
        .unwrap();
    assert_eq!(named.items.len(), 1);

    // Optimistic concurrency on replace.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}),
    )
    .unwrap();
    let lease = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut first = lease.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &first)
        .await
        .unwrap();
    let mut stale = lease;
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = leases
        .replace("leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_runtime_watcher_sees_custom_resources_and_finalized_deletion() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = client(&server).await;
    let api: Api<HTTPScaledObject> = Api::namespaced(client.clone(), "apps");
    let mut stream = watcher(
        Api::<HTTPScaledObject>::all(client.clone()),
        watcher::Config::default(),
    )
    .applied_objects()
    .boxed();

    let obj: HTTPScaledObject = serde_json::from_value(json!({
        "apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
        "metadata": {"name": "xkcd", "finalizers": ["httpscaledobject.http.keda.sh"]},
        "spec": {"hosts": ["myhost.com"], "scaleTargetRef": {"name": "xkcd", "service": "xkcd", "port": 8080}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.spec.hosts, ["myhost.com"]);
    assert_eq!(seen.metadata.namespace.as_deref(), Some("apps"));

    // Delete with a finalizer: marked, then gone once the finalizer is removed.
    api.delete("xkcd", &DeleteParams::default()).await.unwrap();
    let marked = api.get("xkcd").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch(
        "xkcd",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    let err = api.get("xkcd").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // Discovery finds the CRD's group, and not KEDA's unless served.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.has_group("http.keda.sh"));
    assert!(!discovery.has_group("keda.sh"));
}
