//! The HTTPScaledObjects the controller has accepted, as the scalers need them. Written by the
//! reconciler, read by the KEDA scaler service and the standalone scaler: read-mostly, so a
//! `RwLock` that is never held across an `.await`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::SystemTime;

use wakegate_crds::ValidSpec;

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
