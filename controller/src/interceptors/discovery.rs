//! Finding interceptor replicas: the ready endpoints of their admin Service's EndpointSlices.

use std::collections::HashMap;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Follows the admin Service's EndpointSlices into a list of `ip:port`.
pub(super) async fn discover(
    client: kube::Client,
    namespace: String,
    service: String,
    port_name: String,
    addrs: watch::Sender<Vec<String>>,
    stop: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut slices: HashMap<String, Vec<String>> = HashMap::new();
    let mut relist: HashMap<String, Vec<String>> = HashMap::new();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "watching the interceptor admin Service failed; retrying");
                continue;
            }
            None => return,
        };
        match event {
            watcher::Event::Apply(slice) => {
                slices.insert(
                    slice.metadata.name.clone().unwrap_or_default(),
                    ready_addrs(&slice, &port_name),
                );
            }
            watcher::Event::Delete(slice) => {
                slices.remove(&slice.metadata.name.clone().unwrap_or_default());
            }
            watcher::Event::Init => {
                relist.clear();
                continue;
            }
            watcher::Event::InitApply(slice) => {
                relist.insert(
                    slice.metadata.name.clone().unwrap_or_default(),
                    ready_addrs(&slice, &port_name),
                );
                continue;
            }
            watcher::Event::InitDone => slices = std::mem::take(&mut relist),
        }
        let mut all: Vec<String> = slices.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        addrs.send_if_modified(|current| {
            if *current == all {
                return false;
            }
            tracing::info!(replicas = all.len(), "interceptor replicas changed");
            *current = all;
            true
        });
    }
}

/// The ready `ip:port` admin addresses in one slice.
fn ready_addrs(slice: &EndpointSlice, port_name: &str) -> Vec<String> {
    let port = slice.ports.as_ref().and_then(|ports| {
        ports
            .iter()
            .find(|p| port_name.is_empty() || p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
    });
    let Some(port) = port else { return Vec::new() };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .map(|a| {
            if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            }
        })
        .collect()
}
