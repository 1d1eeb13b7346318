//! Kubernetes mode: the [`Provider`] fed by watches of HTTPScaledObjects, InterceptorRoutes,
//! Services and EndpointSlices through the real kube client.
//!
//! Routes are published only once every watch has listed for the first time, so `/readyz`
//! stays 503 until then. A cluster without the InterceptorRoute CRD (or RBAC that does not grant
//! it yet) routes its HTTPScaledObjects all the same: that watch counts as listed, empty, and
//! keeps retrying. If the API server goes away, the watches retry with backoff
//! and the last known routes and endpoints keep serving.
//!
//! Wake signals reach the controller through the admin `/events` stream, which the proxy core
//! feeds (see [`crate::events`]); this provider's `wake` has nothing more to do.

mod index;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wakegate_crds::{HTTPScaledObject, InterceptorRoute, RouteKind};

pub use self::index::{ClusterIndex, EndpointMode, Touched};
use crate::provider::{ConfigMapValue, Provider, ReadyEndpoints, RouteSpec, TargetId, Trust};

const ROUTES_SYNCED: u8 = 1;
const SERVICES_SYNCED: u8 = 2;
const SLICES_SYNCED: u8 = 4;
const INTERCEPTOR_ROUTES_SYNCED: u8 = 8;
const CONFIG_MAPS_SYNCED: u8 = 16;
const ALL_SYNCED: u8 = ROUTES_SYNCED
    | SERVICES_SYNCED
    | SLICES_SYNCED
    | INTERCEPTOR_ROUTES_SYNCED
    | CONFIG_MAPS_SYNCED;
/// Watches that may be unserved or forbidden without holding routing back.
const OPTIONAL: u8 = INTERCEPTOR_ROUTES_SYNCED | CONFIG_MAPS_SYNCED;
/// The label a ConfigMap needs for its values to be served as response bodies.
pub const RESPONSE_BODY_LABEL: &str = "http.keda.sh/response-body";

/// Whether a watch error says the API server does not serve (404) or does not grant (403) the
/// resource.
fn not_served(err: &watcher::Error) -> bool {
    let api = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(e))
        | watcher::Error::WatchStartFailed(kube::Error::Api(e)) => e,
        watcher::Error::WatchError(e) => e,
        _ => return false,
    };
    matches!(api.code, 403 | 404)
}

/// Routes and endpoints from the cluster.
#[derive(Debug)]
pub struct KubeProvider {
    routes: watch::Sender<Option<Arc<[RouteSpec]>>>,
    /// One watch per target, created when the proxy first asks for it.
    targets: Mutex<HashMap<TargetId, watch::Sender<ReadyEndpoints>>>,
    /// Written by the watch tasks, read on every change; never locked across an `.await`.
    index: Mutex<ClusterIndex>,
    synced: AtomicU8,
    mode: EndpointMode,
}

impl KubeProvider {
    /// Starts watching, cluster-wide or in `namespace`, until `stop` fires.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        mode: EndpointMode,
        upstream_trust: Trust,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let provider = Arc::new(Self {
            routes: watch::channel(None).0,
            targets: Mutex::new(HashMap::new()),
            index: Mutex::new(ClusterIndex::new(upstream_trust)),
            synced: AtomicU8::new(0),
            mode,
        });
        let routes: Api<HTTPScaledObject> = api(&client, namespace);
        let services: Api<Service> = api(&client, namespace);
        let slices: Api<EndpointSlice> = api(&client, namespace);
        let interceptor_routes: Api<InterceptorRoute> = api(&client, namespace);
        let config_maps: Api<ConfigMap> = api(&client, namespace);
        tokio::spawn(
            provider.clone().follow(
                routes,
                ROUTES_SYNCED,
                stop.clone(),
                |ix, change| match change {
                    Change::Apply(o) => ix.apply_route(o),
                    Change::Delete(o) => ix.delete_route(o),
                    Change::Prune(listed) => ix.prune_routes(RouteKind::HTTPScaledObject, listed),
                },
            ),
        );
        tokio::spawn(provider.clone().follow(
            interceptor_routes,
            INTERCEPTOR_ROUTES_SYNCED,
            stop.clone(),
            |ix, change| match change {
                Change::Apply(o) => ix.apply_route(o),
                Change::Delete(o) => ix.delete_route(o),
                Change::Prune(listed) => ix.prune_routes(RouteKind::InterceptorRoute, listed),
            },
        ));
        tokio::spawn(provider.clone().follow_with(
            config_maps,
            watcher::Config::default().labels(&format!("{RESPONSE_BODY_LABEL}=true")),
            CONFIG_MAPS_SYNCED,
            stop.clone(),
            |ix, change| match change {
                Change::Apply(o) => ix.apply_config_map(o),
                Change::Delete(o) => ix.delete_config_map(o),
                Change::Prune(listed) => ix.prune_config_maps(listed),
            },
        ));
        tokio::spawn(provider.clone().follow(
            services,
            SERVICES_SYNCED,
            stop.clone(),
            |ix, change| match change {
                Change::Apply(o) => ix.apply_service(o),
                Change::Delete(o) => ix.delete_service(o),
                Change::Prune(listed) => ix.prune_services(listed),
            },
        ));
        tokio::spawn(provider.clone().follow(
            slices,
            SLICES_SYNCED,
            stop,
            |ix, change| match change {
                Change::Apply(o) => ix.apply_slice(o),
                Change::Delete(o) => ix.delete_slice(o),
                Change::Prune(listed) => ix.prune_slices(listed),
            },
        ));
        provider
    }

    /// Runs one watch, feeding `apply` into the index and republishing after each change.
    async fn follow<K>(
        self: Arc<Self>,
        api: Api<K>,
        synced_bit: u8,
        stop: CancellationToken,
        apply: impl Fn(&mut ClusterIndex, Change<'_, K>) -> Touched + Send + 'static,
    ) where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        self.follow_with(api, watcher::Config::default(), synced_bit, stop, apply)
            .await;
    }

    /// [`Self::follow`] with a watch configuration (a label selector).
    async fn follow_with<K>(
        self: Arc<Self>,
        api: Api<K>,
        config: watcher::Config,
        synced_bit: u8,
        stop: CancellationToken,
        apply: impl Fn(&mut ClusterIndex, Change<'_, K>) -> Touched + Send + 'static,
    ) where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        let kind = std::any::type_name::<K>()
            .rsplit("::")
            .next()
            .unwrap_or("object");
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        // A relist is applied object by object as pages arrive, not buffered whole (20,000
        // parsed EndpointSlices would be tens of MiB at once); what it did not list is dropped
        // at its end.
        let mut listed: HashSet<(String, String)> = HashSet::new();
        let key = |obj: &K| (obj.namespace().unwrap_or_default(), obj.name_any());
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => event,
            };
            let Some(event) = event else { return };
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    // The watcher retries with backoff; what was known keeps serving.
                    let not_served = synced_bit & OPTIONAL != 0 && not_served(&err);
                    let before = self.synced.load(Ordering::Acquire);
                    if not_served && before & synced_bit == 0 {
                        // Not installed, or not granted yet: nothing to route from it, and
                        // no reason to keep the HTTPScaledObjects waiting.
                        tracing::warn!(kind, error = %err, "cannot be listed (is the CRD installed, and the RBAC of deploy/ applied?); routing without them, and retrying");
                        self.synced.fetch_or(synced_bit, Ordering::AcqRel);
                        self.publish(&Touched::everything());
                    } else {
                        tracing::warn!(kind, error = %err, "watch failed; retrying");
                    }
                    continue;
                }
            };
            let touched = {
                let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    Event::Apply(obj) => apply(&mut index, Change::Apply(&obj)),
                    Event::Delete(obj) => apply(&mut index, Change::Delete(&obj)),
                    Event::Init => {
                        listed.clear();
                        continue;
                    }
                    Event::InitApply(obj) => {
                        listed.insert(key(&obj));
                        apply(&mut index, Change::Apply(&obj));
                        continue;
                    }
                    Event::InitDone => {
                        let touched = apply(&mut index, Change::Prune(&listed));
                        listed = HashSet::new();
                        let before = self.synced.fetch_or(synced_bit, Ordering::AcqRel);
                        if before & synced_bit == 0 {
                            tracing::info!(kind, "initial list done");
                        }
                        if before != ALL_SYNCED && before | synced_bit == ALL_SYNCED {
                            // The last first list: whatever it touched, everything is
                            // published now for the first time.
                            Touched::everything()
                        } else {
                            touched
                        }
                    }
                }
            };
            if touched.any() {
                self.publish(&touched);
            }
        }
    }

    /// Republishes what `touched` says changed, notifying only on change: the routes (and then
    /// every target's endpoints), or the endpoints of the targets behind the touched Services.
    fn publish(&self, touched: &Touched) {
        if self.synced.load(Ordering::Acquire) != ALL_SYNCED {
            return;
        }
        // Locks are taken one at a time (targets, then the index, then targets), never nested:
        // `endpoints()` takes them in the other order.
        // Every asked target after a route change; otherwise only the targets behind the touched
        // Services, straight from the index (targets nobody asked for are skipped when sending),
        // so a slice event never walks the whole target map.
        let asked: Option<Vec<TargetId>> = touched.routes.then(|| {
            let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            targets.keys().cloned().collect()
        });
        let (specs, ready) = {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let specs: Option<Arc<[RouteSpec]>> =
                touched.routes.then(|| index.route_specs().into());
            let which: Vec<TargetId> = asked.unwrap_or_else(|| {
                touched
                    .services
                    .iter()
                    .flat_map(|svc| index.targets_behind(svc).iter().cloned())
                    .collect()
            });
            let ready: Vec<(TargetId, ReadyEndpoints)> = which
                .into_iter()
                .map(|t| {
                    let ready = index.endpoints(&t, self.mode);
                    (t, ready)
                })
                .collect();
            (specs, ready)
        };
        if let Some(specs) = &specs {
            self.routes.send_if_modified(|current| {
                if current.as_deref() == Some(&**specs) {
                    return false;
                }
                *current = Some(specs.clone());
                true
            });
        }
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(specs) = &specs {
            // Targets of deleted routes: dropping the sender tells their last held requests
            // that nothing will become ready.
            let live: std::collections::HashSet<&TargetId> = specs
                .iter()
                .flat_map(|s| {
                    std::iter::once(&s.target).chain(s.failover.as_ref().map(|f| &f.target))
                })
                .collect();
            targets.retain(|target, _| live.contains(target));
        }
        for (target, ready) in ready {
            let Some(tx) = targets.get(&target) else {
                continue;
            };
            tx.send_if_modified(|current| {
                if *current == ready {
                    return false;
                }
                tracing::debug!(%target, endpoints = ready.as_slice().len(), "ready endpoints changed");
                *current = ready.clone();
                true
            });
        }
    }
}

/// One change to feed into the index.
enum Change<'a, K> {
    Apply(&'a K),
    Delete(&'a K),
    /// A relist is done: drop what it did not list.
    Prune(&'a HashSet<(String, String)>),
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

impl Provider for KubeProvider {
    fn routes(&self) -> watch::Receiver<Option<Arc<[RouteSpec]>>> {
        self.routes.subscribe()
    }

    fn config_map_value(&self, namespace: &str, name: &str, key: &str) -> ConfigMapValue {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_map_value(namespace, name, key)
    }

    fn endpoints(&self, target: &TargetId) -> watch::Receiver<ReadyEndpoints> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = targets.get(target) {
            return tx.subscribe();
        }
        let current = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints(target, self.mode);
        let (tx, rx) = watch::channel(current);
        targets.insert(target.clone(), tx);
        rx
    }

    fn wake(&self, _target: &TargetId) {}

    fn status(&self) -> serde_json::Value {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = serde_json::Map::new();
        for (target, tx) in targets.iter() {
            let ready: Vec<String> = tx
                .borrow()
                .as_slice()
                .iter()
                .map(|e| e.to_string())
                .collect();
            out.insert(target.to_string(), serde_json::json!({"kind": "kubernetes", "readyEndpoints": ready.len(), "endpoints": ready}));
        }
        serde_json::Value::Object(out)
    }
}
