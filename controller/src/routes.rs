//! The HTTPScaledObjects the controller has accepted, as the scalers need them. Read-mostly, so
//! a `RwLock` that is never held across an `.await`.
//!
//! Every replica fills it from its own watch ([`follow`]), leader or not, because every replica
//! serves KEDA's gRPC calls. The leader's reconciler writes it too, adding what only a
//! reconcile learns (another owner of the workload's replicas); the watch keeps that.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures_util::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use wakegate_crds::{HTTPScaledObject, ValidSpec};

/// One accepted HTTPScaledObject.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The checked spec.
    pub spec: ValidSpec,
    /// When the object was created (for the initial cooldown).
    pub created: Option<SystemTime>,
    /// Another owner of the workload's replicas (an HPA or a ScaledObject), if any: the
    /// standalone scaler leaves such workloads alone.
    pub other_owner: Option<String>,
}

/// The registry, keyed by `namespace/name`.
#[derive(Debug, Default)]
pub struct Routes(RwLock<HashMap<String, RouteEntry>>);

impl Routes {
    /// Adds or replaces a route.
    pub fn upsert(&self, entry: RouteEntry) {
        let key = format!("{}/{}", entry.namespace, entry.name);
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry);
    }

    /// Adds or replaces a route from the watch, keeping the other owner a reconcile found.
    fn upsert_watched(&self, mut entry: RouteEntry) {
        let key = format!("{}/{}", entry.namespace, entry.name);
        let mut routes = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = routes.get(&key) {
            entry.other_owner.clone_from(&known.other_owner);
        }
        routes.insert(key, entry);
    }

    /// Keeps only the routes in `keys`.
    fn retain(&self, keys: &HashSet<String>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keys.contains(k));
    }

    /// Removes a route.
    pub fn remove(&self, key: &str) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// One route.
    pub fn get(&self, key: &str) -> Option<RouteEntry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Every route.
    pub fn all(&self) -> Vec<RouteEntry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The entry an HTTPScaledObject makes, if it is valid and not being deleted.
pub fn entry(obj: &HTTPScaledObject) -> Option<RouteEntry> {
    if obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = obj.validate().ok()?;
    Some(RouteEntry {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        spec,
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
        other_owner: None,
    })
}

/// Keeps `routes` equal to the valid HTTPScaledObjects `api` lists, until `stop`.
pub async fn follow(api: Api<HTTPScaledObject>, routes: Arc<Routes>, stop: CancellationToken) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted = HashSet::new();
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "watching HTTPScaledObjects failed; retrying");
            }
            Some(Ok(watcher::Event::Init)) => relisted.clear(),
            Some(Ok(watcher::Event::InitApply(obj))) => {
                if let Some(entry) = entry(&obj) {
                    relisted.insert(format!("{}/{}", entry.namespace, entry.name));
                    routes.upsert_watched(entry);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => routes.retain(&relisted),
            Some(Ok(watcher::Event::Apply(obj))) => match entry(&obj) {
                Some(entry) => routes.upsert_watched(entry),
                None => routes.remove(&format!(
                    "{}/{}",
                    obj.namespace().unwrap_or_default(),
                    obj.name_any()
                )),
            },
            Some(Ok(watcher::Event::Delete(obj))) => routes.remove(&format!(
                "{}/{}",
                obj.namespace().unwrap_or_default(),
                obj.name_any()
            )),
        }
    }
}
