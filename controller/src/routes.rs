//! The routes the controller has accepted (HTTPScaledObjects and InterceptorRoutes), as the
//! scalers need them. A valid InterceptorRoute wins over an HTTPScaledObject of the same
//! namespace and name, as in the add-on. Read-mostly, so
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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wakegate_crds::{RouteKind, RouteObject, ValidRoute};

/// One accepted route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The checked spec (its `kind` says which object it came from).
    pub spec: ValidRoute,
    /// When the object was created (for the initial cooldown).
    pub created: Option<SystemTime>,
    /// Another owner of the workload's replicas (an HPA or a ScaledObject), if any: the
    /// standalone scaler leaves such workloads alone.
    pub other_owner: Option<String>,
    /// The object's uid and `metadata.generation` this entry was made from (see [`seen`]).
    pub seen: Option<(String, i64)>,
}

/// The uid and generation of an object, for ordering the entries made from it: the API server
/// bumps `metadata.generation` on every change of the spec, and a reconcile that took a while
/// must not write an older spec over a newer one the watch has already put in (KEDA would see
/// the target go back, then forward again).
pub fn seen(meta: &kube::api::ObjectMeta) -> Option<(String, i64)> {
    Some((meta.uid.clone()?, meta.generation?))
}

/// Whether `entry` was made from an older generation of the object `known` was made from.
fn older(known: Option<&RouteEntry>, entry: &RouteEntry) -> bool {
    match (known.and_then(|k| k.seen.as_ref()), entry.seen.as_ref()) {
        (Some((known_uid, known_gen)), Some((uid, generation))) => {
            uid == known_uid && generation < known_gen
        }
        _ => false,
    }
}

/// Both kinds' entries for one `namespace/name`.
#[derive(Debug, Default)]
struct Slot {
    httpso: Option<RouteEntry>,
    interceptor_route: Option<RouteEntry>,
}

impl Slot {
    fn of(&mut self, kind: RouteKind) -> &mut Option<RouteEntry> {
        match kind {
            RouteKind::HTTPScaledObject => &mut self.httpso,
            RouteKind::InterceptorRoute => &mut self.interceptor_route,
        }
    }

    fn effective(&self) -> Option<&RouteEntry> {
        self.interceptor_route.as_ref().or(self.httpso.as_ref())
    }
}

/// The registry, keyed by `namespace/name`.
#[derive(Debug)]
pub struct Routes(RwLock<HashMap<String, Slot>>, watch::Sender<u64>);

impl Default for Routes {
    fn default() -> Self {
        Self(RwLock::default(), watch::channel(0).0)
    }
}

impl Routes {
    /// Ticks whenever a route is added, replaced or removed (for `StreamMetricSpec`).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.1.subscribe()
    }

    fn changed(&self) {
        self.1.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Adds or replaces a route, unless the entry in place was made from a newer generation
    /// of the same object (a reconcile finishing after the watch saw the next change).
    pub fn upsert(&self, entry: RouteEntry) {
        self.put(entry, false);
    }

    /// Adds or replaces a route from the watch, keeping the other owner a reconcile found.
    fn upsert_watched(&self, entry: RouteEntry) {
        self.put(entry, true);
    }

    /// [`Routes::upsert`]; `keep_other_owner`: the entry in place keeps the other owner it has.
    fn put(&self, mut entry: RouteEntry, keep_other_owner: bool) {
        let key = format!("{}/{}", entry.namespace, entry.name);
        let mut routes = self.0.write().unwrap_or_else(|e| e.into_inner());
        let kind = entry.spec.kind;
        let slot = routes.entry(key).or_default().of(kind);
        if older(slot.as_ref(), &entry) {
            return;
        }
        if let (true, Some(known)) = (keep_other_owner, slot.as_ref()) {
            entry.other_owner.clone_from(&known.other_owner);
        }
        let same = slot.as_ref() == Some(&entry);
        *slot = Some(entry);
        drop(routes);
        if !same {
            self.changed();
        }
    }

    /// Keeps only the routes of `kind` in `keys`.
    fn retain(&self, kind: RouteKind, keys: &HashSet<String>) {
        let mut routes = self.0.write().unwrap_or_else(|e| e.into_inner());
        for (k, slot) in routes.iter_mut() {
            if !keys.contains(k) {
                slot.of(kind).take();
            }
        }
        routes.retain(|_, slot| slot.effective().is_some());
        drop(routes);
        self.changed();
    }

    /// Removes a route of `kind`.
    pub fn remove(&self, key: &str, kind: RouteKind) {
        let mut routes = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = routes.get_mut(key) {
            let removed = slot.of(kind).take().is_some();
            if slot.effective().is_none() {
                routes.remove(key);
            }
            drop(routes);
            if removed {
                self.changed();
            }
        }
    }

    /// The route in effect for `namespace/name`.
    pub fn get(&self, key: &str) -> Option<RouteEntry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .and_then(Slot::effective)
            .cloned()
    }

    /// Whether an accepted InterceptorRoute hides the HTTPScaledObject `namespace/name`.
    pub fn shadowed(&self, key: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|slot| slot.interceptor_route.is_some())
    }

    /// Every route in effect.
    pub fn all(&self) -> Vec<RouteEntry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(Slot::effective)
            .cloned()
            .collect()
    }
}

/// The entry an object makes, if it is valid and not being deleted.
pub fn entry<O: RouteObject>(obj: &O) -> Option<RouteEntry> {
    let meta = obj.meta();
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let spec = obj.validate_route().ok()?;
    Some(RouteEntry {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        spec,
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
        other_owner: None,
        seen: seen(meta),
    })
}

/// Keeps the routes of one kind equal to the valid objects `api` lists, until `stop`. A kind
/// the API server does not serve (the InterceptorRoute CRD not installed yet) only logs, and
/// the watch retries with backoff.
pub async fn follow<O: RouteObject>(api: Api<O>, routes: Arc<Routes>, stop: CancellationToken) {
    let kind = O::KIND;
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relisted = HashSet::new();
    let key = |obj: &O| format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Err(err)) => {
                tracing::warn!(kind = kind.as_str(), error = %err, "watching routes failed; retrying");
            }
            Some(Ok(watcher::Event::Init)) => relisted.clear(),
            Some(Ok(watcher::Event::InitApply(obj))) => {
                if let Some(entry) = entry(&obj) {
                    relisted.insert(key(&obj));
                    routes.upsert_watched(entry);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => routes.retain(kind, &relisted),
            Some(Ok(watcher::Event::Apply(obj))) => match entry(&obj) {
                Some(entry) => routes.upsert_watched(entry),
                None => routes.remove(&key(&obj), kind),
            },
            Some(Ok(watcher::Event::Delete(obj))) => routes.remove(&key(&obj), kind),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;
    use wakegate_crds::InterceptorRoute;

    use super::{entry, RouteEntry, Routes};

    /// The entry an InterceptorRoute `shop` with `uid` at `generation` makes, asking for
    /// `concurrency` requests per replica.
    fn shop(uid: &str, generation: i64, concurrency: i64) -> RouteEntry {
        let obj: InterceptorRoute = serde_json::from_value(json!({
            "apiVersion": "http.keda.sh/v1beta1", "kind": "InterceptorRoute",
            "metadata": {"name": "shop", "namespace": "apps", "uid": uid, "generation": generation},
            "spec": {
                "target": {"service": "shop", "port": 8080},
                "rules": [{"hosts": ["shop.example"]}],
                "scalingMetric": {"concurrency": {"targetValue": concurrency}}
            }
        }))
        .unwrap();
        entry(&obj).unwrap()
    }

    /// A reconcile that finishes after the watch put in the object's next generation does not
    /// write its older spec back over it (the stream of metric specs would go 10, 25, 10, 25);
    /// a newer generation, or an object of the same name made again (another uid, its
    /// generation back at 1), does replace it.
    #[test]
    fn an_older_generation_of_the_same_object_does_not_replace_a_newer_one() {
        let routes = Routes::default();
        let changes = routes.changes();
        let (v1, v2) = (shop("uid-a", 1, 10), shop("uid-a", 2, 25));
        routes.upsert(v1.clone());
        routes.upsert_watched(v2.clone());
        let version = *changes.borrow();
        routes.upsert(v1.clone());
        assert_eq!(routes.get("apps/shop"), Some(v2.clone()));
        assert_eq!(*changes.borrow(), version, "no change announced");
        routes.upsert_watched(v1);
        assert_eq!(routes.get("apps/shop"), Some(v2.clone()));

        let v3 = shop("uid-a", 3, 30);
        routes.upsert(v3.clone());
        assert_eq!(routes.get("apps/shop"), Some(v3));
        let remade = shop("uid-b", 1, 5);
        routes.upsert(remade.clone());
        assert_eq!(routes.get("apps/shop"), Some(remade));
    }
}
