//! What the standalone scaler reads from watches instead of the API, per route: the replicas of
//! the workloads it scales, and the HPAs and ScaledObjects that may already scale them.
//!
//! Deployments and StatefulSets (`apps/v1`) are watched cluster-wide; each entry keeps
//! `spec.replicas` and the object's resourceVersion, which a wake uses as the precondition of
//! its one `/scale` patch. Other kinds with a `/scale` subresource keep the GET-then-patch path:
//! where their replica count lives is theirs to say. Until a watch has listed, or when it is
//! forbidden, readers fall back to asking the API (replicas) or report what they could not
//! check (owners).

use std::sync::Arc;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::reflect::{reflect, usable, Reflected, WatchStatus};

/// A workload: `apiVersion`, kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What the watch last saw of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `spec.replicas` (1 when unset, the API's default).
    pub replicas: i32,
    /// The object's resourceVersion (also its Scale's).
    pub resource_version: String,
}

/// The kind and name a scaler (an HPA or a ScaledObject) targets.
pub type ScaleTarget = (String, String);

/// Watched workloads and their possible other owners.
pub struct Workloads {
    deployments: Arc<Reflected<Seen>>,
    stateful_sets: Arc<Reflected<Seen>>,
    hpas: Arc<Reflected<ScaleTarget>>,
    scaled_objects: Arc<Reflected<ScaleTarget>>,
}

impl std::fmt::Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workloads").finish_non_exhaustive()
    }
}

/// What the search for another owner of a workload's replicas found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OtherOwners {
    /// The HPA or ScaledObject that scales the workload, if any.
    pub owner: Option<String>,
    /// Kinds that could not be checked because RBAC forbids watching them.
    pub forbidden: Vec<&'static str>,
    /// Kinds not listed yet: the caller asks the API.
    pub unknown: Vec<&'static str>,
}

fn seen(obj: &DynamicObject) -> Seen {
    Seen {
        replicas: obj.data["spec"]["replicas"]
            .as_i64()
            .and_then(|r| i32::try_from(r).ok())
            .unwrap_or(1),
        resource_version: obj.resource_version().unwrap_or_default(),
    }
}

fn dynamic(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

impl Workloads {
    /// Starts the watches, until `stop`.
    pub fn start(client: &Client, stop: &CancellationToken) -> Arc<Self> {
        let deployments = reflect(
            dynamic(client, "apps", "v1", "Deployment", "deployments"),
            "Deployments",
            seen,
            stop.clone(),
        );
        let stateful_sets = reflect(
            dynamic(client, "apps", "v1", "StatefulSet", "statefulsets"),
            "StatefulSets",
            seen,
            stop.clone(),
        );
        let hpas = reflect(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            "HorizontalPodAutoscalers",
            |hpa: &HorizontalPodAutoscaler| {
                hpa.spec.as_ref().map_or_else(Default::default, |s| {
                    (
                        s.scale_target_ref.kind.clone(),
                        s.scale_target_ref.name.clone(),
                    )
                })
            },
            stop.clone(),
        );
        let scaled_objects = reflect(
            dynamic(
                client,
                "keda.sh",
                "v1alpha1",
                "ScaledObject",
                "scaledobjects",
            ),
            "ScaledObjects",
            |so: &DynamicObject| {
                let target = &so.data["spec"]["scaleTargetRef"];
                (
                    target["kind"].as_str().unwrap_or("Deployment").to_owned(),
                    target["name"].as_str().unwrap_or_default().to_owned(),
                )
            },
            stop.clone(),
        );
        Arc::new(Self {
            deployments,
            stateful_sets,
            hpas,
            scaled_objects,
        })
    }

    /// What is known of `key`: `None` when its kind is not watched, or not listed yet.
    pub fn get(&self, key: &WorkloadKey) -> Option<Seen> {
        let reflected = match (key.api_version.as_str(), key.kind.as_str()) {
            ("apps/v1", "Deployment") => &self.deployments,
            ("apps/v1", "StatefulSet") => &self.stateful_sets,
            _ => return None,
        };
        if reflected.status() != WatchStatus::Synced {
            return None;
        }
        reflected.get(&(key.namespace.clone(), key.name.clone()))
    }

    /// Whether an HPA or a ScaledObject in `namespace` scales `kind`/`name`.
    pub fn other_owners(&self, namespace: &str, kind: &str, name: &str) -> OtherOwners {
        let mut found = OtherOwners::default();
        for (what, label, reflected) in [
            (
                "HorizontalPodAutoscalers",
                "HorizontalPodAutoscaler",
                &self.hpas,
            ),
            ("ScaledObjects", "ScaledObject", &self.scaled_objects),
        ] {
            match reflected.status() {
                status if usable(status) => {
                    let owners = reflected.find(namespace, |(k, n)| k == kind && n == name);
                    if let (None, Some((owner, _))) = (&found.owner, owners.first()) {
                        found.owner = Some(format!("{label} {owner}"));
                    }
                }
                WatchStatus::Forbidden => found.forbidden.push(what),
                _ => found.unknown.push(what),
            }
        }
        found
    }
}
