//! The replicas of the workloads the standalone scaler manages, from watches, so neither a wake
//! nor a sampling sweep reads `/scale` per route.
//!
//! Deployments and StatefulSets (`apps/v1`) are watched cluster-wide once a route names one;
//! each entry keeps `spec.replicas` and the object's resourceVersion, which a wake uses as the
//! precondition of its one `/scale` patch. Other kinds with a `/scale` subresource keep the
//! GET-then-patch path: where their replica count lives is theirs to say. A kind whose watch is
//! forbidden is logged once and left to that path too.
//!
//! Read on every wake and sample, written by the watch: a `RwLock` never held across `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

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

/// Watched workloads.
pub struct Workloads {
    client: Client,
    stop: CancellationToken,
    seen: RwLock<HashMap<WorkloadKey, Seen>>,
    /// Kinds (`apiVersion`, kind) whose watch has been started.
    watched: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workloads").finish_non_exhaustive()
    }
}

/// The kinds watched; others are read through `/scale`.
const WATCHABLE: [(&str, &str); 2] = [("apps/v1", "Deployment"), ("apps/v1", "StatefulSet")];

impl Workloads {
    /// An empty cache whose watches run until `stop`.
    pub fn new(client: Client, stop: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            client,
            stop,
            seen: RwLock::default(),
            watched: Mutex::default(),
        })
    }

    /// What is known of `key`: `None` when its kind is not watched, or not listed yet.
    pub fn get(self: &Arc<Self>, key: &WorkloadKey) -> Option<Seen> {
        let kind = (key.api_version.clone(), key.kind.clone());
        if !WATCHABLE.iter().any(|(v, k)| *v == kind.0 && *k == kind.1) {
            return None;
        }
        let start = self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(kind.clone());
        if start {
            tokio::spawn(self.clone().follow(kind));
            return None;
        }
        self.seen
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    async fn follow(self: Arc<Self>, (api_version, kind): (String, String)) {
        let (group, version) = api_version
            .split_once('/')
            .unwrap_or(("", api_version.as_str()));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &kind));
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        let key = |obj: &DynamicObject| WorkloadKey {
            api_version: api_version.clone(),
            kind: kind.clone(),
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
        };
        let seen = |obj: &DynamicObject| Seen {
            replicas: obj.data["spec"]["replicas"]
                .as_i64()
                .and_then(|r| i32::try_from(r).ok())
                .unwrap_or(1),
            resource_version: obj.resource_version().unwrap_or_default(),
        };
        let mut relist = HashMap::new();
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                () = self.stop.cancelled() => return,
                event = stream.next() => event,
            };
            let table = || {
                self.seen
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => relist.clear(),
                Some(Ok(watcher::Event::InitApply(obj))) => {
                    relist.insert(key(&obj), seen(&obj));
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let mut table = table();
                    table.retain(|k, _| k.kind != kind || k.api_version != api_version);
                    table.extend(relist.drain());
                    backoff = std::time::Duration::from_millis(100);
                }
                Some(Ok(watcher::Event::Apply(obj))) => {
                    table().insert(key(&obj), seen(&obj));
                }
                Some(Ok(watcher::Event::Delete(obj))) => {
                    table().remove(&key(&obj));
                }
                Some(Err(err)) => {
                    let forbidden = matches!(
                        &err,
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                            if s.code == 403
                    );
                    if forbidden {
                        tracing::warn!(%kind, error = %err, "cannot watch {kind}s: their replicas are read through /scale instead (grant list and watch to the controller)");
                        return;
                    }
                    tracing::debug!(%kind, error = %err, "workload watch failed; retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }
}
