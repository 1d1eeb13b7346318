//! A map of what a watch of one kind has seen, kept current: how the controller knows replica
//! counts, HPAs and ScaledObjects without a GET or LIST per route.
//!
//! The watch says where it stands ([`WatchStatus`]), because readers treat the cases apart:
//! not listed yet (ask the API directly), forbidden by RBAC (report it and carry on), or the
//! kind not served (nothing of it exists). A forbidden or unserved kind keeps being retried with
//! a backoff, so a grant made later, or KEDA installed later, is picked up without a restart.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Where a watch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStatus {
    /// Not listed yet (or relisting after a failure).
    Listing,
    /// Listed; the map is current.
    Synced,
    /// RBAC forbids listing or watching the kind.
    Forbidden,
    /// The API server does not serve the kind (its CRD is not installed).
    NotServed,
}

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

/// What a watch saw, as `V` per object.
#[derive(Debug)]
pub struct Reflected<V> {
    state: RwLock<(WatchStatus, HashMap<ObjectKey, V>)>,
}

impl<V: Clone> Reflected<V> {
    /// The watch's status.
    pub fn status(&self) -> WatchStatus {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// One object's value.
    pub fn get(&self, key: &ObjectKey) -> Option<V> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .get(key)
            .cloned()
    }

    /// Every value in `namespace` that `keep` accepts.
    pub fn find(&self, namespace: &str, keep: impl Fn(&V) -> bool) -> Vec<(String, V)> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .iter()
            .filter(|((ns, _), v)| ns == namespace && keep(v))
            .map(|((_, name), v)| (name.clone(), v.clone()))
            .collect()
    }
}

/// Watches `api` until `stop`, keeping `value(obj)` per object; `what` names the kind in logs.
pub fn reflect<K, V>(
    api: Api<K>,
    what: &'static str,
    value: impl Fn(&K) -> V + Send + 'static,
    stop: CancellationToken,
) -> Arc<Reflected<V>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: Clone + Debug + Send + Sync + 'static,
{
    let reflected = Arc::new(Reflected {
        state: RwLock::new((WatchStatus::Listing, HashMap::new())),
    });
    tokio::spawn(follow(api, what, value, reflected.clone(), stop));
    reflected
}

async fn follow<K, V>(
    api: Api<K>,
    what: &'static str,
    value: impl Fn(&K) -> V,
    reflected: Arc<Reflected<V>>,
    stop: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: Clone,
{
    let key = |obj: &K| (obj.namespace().unwrap_or_default(), obj.name_any());
    let mut backoff = Duration::from_millis(200);
    let mut reported: Option<WatchStatus> = None;
    'watch: loop {
        let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
        let mut relist = HashMap::new();
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => event,
            };
            let state = || {
                reflected
                    .state
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => relist.clear(),
                Some(Ok(watcher::Event::InitApply(obj))) => {
                    relist.insert(key(&obj), value(&obj));
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    *state() = (WatchStatus::Synced, std::mem::take(&mut relist));
                    if reported.is_some_and(|r| r != WatchStatus::Synced) {
                        tracing::info!(what, "now watching {what}");
                    }
                    reported = Some(WatchStatus::Synced);
                    backoff = Duration::from_millis(200);
                }
                Some(Ok(watcher::Event::Apply(obj))) => {
                    state().1.insert(key(&obj), value(&obj));
                }
                Some(Ok(watcher::Event::Delete(obj))) => {
                    state().1.remove(&key(&obj));
                }
                Some(Err(err)) => {
                    let code = match &err {
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
                        _ => None,
                    };
                    let status = match code {
                        Some(403) => WatchStatus::Forbidden,
                        Some(404) => WatchStatus::NotServed,
                        _ => WatchStatus::Listing,
                    };
                    if status == WatchStatus::Forbidden && reported != Some(status) {
                        tracing::warn!(what, error = %err, "cannot watch {what}: forbidden to the controller's service account; retrying now and then");
                    } else {
                        tracing::debug!(what, error = %err, "watch of {what} failed; retrying");
                    }
                    reported = Some(status);
                    if status != WatchStatus::Listing {
                        *state() = (status, HashMap::new());
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue 'watch;
                }
            }
        }
    }
}

/// Whether a reader can answer from the map (synced, or the kind does not exist); otherwise
/// it asks the API itself (first listing) or reports what it could not check (forbidden).
/// While a synced watch relists after a failure it stays `Synced`: what was known keeps
/// serving.
pub fn usable(status: WatchStatus) -> bool {
    matches!(status, WatchStatus::Synced | WatchStatus::NotServed)
}
