//! The cluster index: HTTPScaledObjects, InterceptorRoutes, Services and EndpointSlices as the
//! interceptor needs them, fed by watch events and read synchronously. Pure: no client, no async, so routing and
//! endpoint resolution are tested with plain `#[test]`s.
//!
//! Updates are incremental. Each change says what it touched ([`Touched`]): the route set (only
//! when a route's spec, or a Service port it resolves through, really changed: a status write is
//! no change), or the endpoints behind some Services. Slices are indexed by Service and targets
//! by the Services they resolve through, so an EndpointSlice event costs the slices of one
//! Service and the targets behind it, whatever the size of the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use http::uri::Authority;
use http::HeaderValue;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use wakegate_crds::{ColdStart, PortRef, RouteKind, RouteObject, SpecError, ValidRoute};

use crate::provider::{
    rule_matchers, static_response, ColdResponse, ConfigMapValue, Endpoint, FailoverSpec,
    ReadyEndpoints, RouteSpec, SessionAffinity, StaticRoute, Trust, UpstreamProtocol, UpstreamTls,
};

/// The suffix of a route's failover target id.
const FAILOVER_SUFFIX: &str = "#failover";

/// Where held requests are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointMode {
    /// The ready pod addresses from EndpointSlices: no wait for kube-proxy to catch up.
    Pod,
    /// The Service's name and port, through cluster DNS and kube-proxy.
    Service,
}

type Key = (String, String);

#[derive(Clone, Debug)]
struct Route {
    created: String,
    spec: Result<ValidRoute, SpecError>,
}

/// The objects of both kinds with one namespace and name. A valid InterceptorRoute wins over an
/// HTTPScaledObject of the same name (the add-on's rule); an invalid one does not take a
/// working route away.
#[derive(Clone, Debug, Default)]
struct Slot {
    httpso: Option<Route>,
    interceptor_route: Option<Route>,
}

impl Slot {
    fn get(&self, kind: RouteKind) -> Option<&Route> {
        match kind {
            RouteKind::HTTPScaledObject => self.httpso.as_ref(),
            RouteKind::InterceptorRoute => self.interceptor_route.as_ref(),
        }
    }

    fn get_mut(&mut self, kind: RouteKind) -> &mut Option<Route> {
        match kind {
            RouteKind::HTTPScaledObject => &mut self.httpso,
            RouteKind::InterceptorRoute => &mut self.interceptor_route,
        }
    }

    /// The route in effect.
    fn effective(&self) -> Option<(&str, &ValidRoute)> {
        [&self.interceptor_route, &self.httpso]
            .into_iter()
            .flatten()
            .find_map(|r| r.spec.as_ref().ok().map(|s| (r.created.as_str(), s)))
    }

    fn is_empty(&self) -> bool {
        self.httpso.is_none() && self.interceptor_route.is_none()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ServicePort {
    name: String,
    port: i32,
    app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slice {
    service: String,
    /// (port name, port number) pairs.
    ports: Vec<(String, i32)>,
    /// Ready addresses.
    ready: Vec<String>,
}

/// The index.
#[derive(Clone, Debug, Default)]
pub struct ClusterIndex {
    routes: BTreeMap<Key, Slot>,
    services: HashMap<Key, Vec<ServicePort>>,
    slices: HashMap<Key, Slice>,
    /// Slice names by their Service `(namespace, service)`.
    slices_by_service: HashMap<Key, BTreeSet<String>>,
    /// Target ids by the Service they resolve through (a route's own, or its failover's).
    targets_by_service: HashMap<Key, Vec<Arc<str>>>,
    /// What upstream certificates are checked against, for Service ports that speak TLS.
    upstream_trust: Trust,
    /// ConfigMaps labelled `http.keda.sh/response-body: "true"`: their values, by key.
    config_maps: HashMap<Key, HashMap<String, bytes::Bytes>>,
}

/// What a change touched, so that only that is republished.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// The route set (or what routes resolve through) changed: republish routes, and the
    /// endpoints of every target.
    pub routes: bool,
    /// The endpoints behind these Services `(namespace, service)` may have changed.
    pub services: Vec<(String, String)>,
}

impl Touched {
    /// Nothing changed.
    pub fn nothing() -> Self {
        Self::default()
    }

    fn routes() -> Self {
        Self {
            routes: true,
            services: Vec::new(),
        }
    }

    /// The routes and every target: everything is republished.
    pub fn everything() -> Self {
        Self::routes()
    }

    fn service(key: Key) -> Self {
        Self {
            routes: false,
            services: vec![key],
        }
    }

    /// Whether anything changed.
    pub fn any(&self) -> bool {
        self.routes || !self.services.is_empty()
    }
}

/// The core's form of a `wakegate.dev/cold-start-response` option. The values were checked when
/// the annotations were read, so `None` is unreachable in practice.
fn cold_response(option: &ColdStart) -> Option<ColdResponse> {
    Some(match option {
        ColdStart::WaitingPage { refresh_seconds } => ColdResponse::WaitingPage {
            refresh: *refresh_seconds,
        },
        ColdStart::Placeholder {
            status,
            content_type,
            body,
        } => ColdResponse::Placeholder {
            status: http::StatusCode::from_u16(*status).ok()?,
            content_type: HeaderValue::from_str(content_type).ok()?,
            body: bytes::Bytes::from(body.clone()),
            headers: http::HeaderMap::new(),
            config_map: None,
        },
    })
}

fn key(ns: Option<&String>, name: Option<&String>) -> Option<Key> {
    Some((ns?.clone(), name?.clone()))
}

impl ClusterIndex {
    /// An empty index whose TLS upstreams are checked against `trust`.
    pub fn new(upstream_trust: Trust) -> Self {
        Self {
            upstream_trust,
            ..Self::default()
        }
    }

    /// Adds or replaces an HTTPScaledObject or an InterceptorRoute.
    pub fn apply_route<O: RouteObject>(&mut self, obj: &O) -> Touched {
        let meta = obj.meta();
        let Some(k) = key(meta.namespace.as_ref(), meta.name.as_ref()) else {
            return Touched::nothing();
        };
        let created = meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let spec = obj.validate_route();
        let known = self.routes.get(&k).and_then(|slot| slot.get(O::KIND));
        let known_bad = known.is_some_and(|r| r.spec.as_ref().err() == spec.as_ref().err());
        if let (Err(err), false) = (&spec, known_bad) {
            tracing::warn!(route = %format!("{}/{}", k.0, k.1), kind = O::KIND.as_str(), error = %err, "route is invalid; not routing it");
        }
        let unchanged = known.is_some_and(|r| r.created == created && r.spec == spec);
        if unchanged {
            // A status write, or a change to nothing routing reads.
            return Touched::nothing();
        }
        let slot = self.routes.entry(k).or_default();
        let before = slot.effective().map(|(c, s)| (c.to_owned(), s.clone()));
        *slot.get_mut(O::KIND) = Some(Route { created, spec });
        let after = slot.effective().map(|(c, s)| (c.to_owned(), s.clone()));
        if before == after {
            // Shadowed, or invalid beside a valid route of the other kind: nothing routes
            // differently.
            return Touched::nothing();
        }
        self.reindex_targets();
        Touched::routes()
    }

    /// Removes an HTTPScaledObject or an InterceptorRoute.
    pub fn delete_route<O: RouteObject>(&mut self, obj: &O) -> Touched {
        let meta = obj.meta();
        let Some(k) = key(meta.namespace.as_ref(), meta.name.as_ref()) else {
            return Touched::nothing();
        };
        let Some(slot) = self.routes.get_mut(&k) else {
            return Touched::nothing();
        };
        if slot.get_mut(O::KIND).take().is_none() {
            return Touched::nothing();
        }
        if slot.is_empty() {
            self.routes.remove(&k);
        }
        self.reindex_targets();
        Touched::routes()
    }

    /// Replaces every object of one kind (after a relist).
    pub fn reset_routes<O: RouteObject>(&mut self, objs: &[O]) -> Touched {
        self.routes.values_mut().for_each(|slot| {
            slot.get_mut(O::KIND).take();
        });
        self.routes.retain(|_, slot| !slot.is_empty());
        objs.iter().for_each(|o| {
            self.apply_route(o);
        });
        self.reindex_targets();
        Touched::routes()
    }

    /// After a relist applied object by object: drops the objects of `kind` it did not list.
    pub fn prune_routes(
        &mut self,
        kind: RouteKind,
        listed: &std::collections::HashSet<Key>,
    ) -> Touched {
        for (k, slot) in &mut self.routes {
            if !listed.contains(k) {
                slot.get_mut(kind).take();
            }
        }
        self.routes.retain(|_, slot| !slot.is_empty());
        self.reindex_targets();
        Touched::routes()
    }

    /// Adds or replaces a labelled ConfigMap (its `data` and `binaryData`). Bodies are looked
    /// up per request, so nothing is republished.
    pub fn apply_config_map(&mut self, cm: &ConfigMap) -> Touched {
        let Some(k) = key(cm.metadata.namespace.as_ref(), cm.metadata.name.as_ref()) else {
            return Touched::nothing();
        };
        let mut values: HashMap<String, bytes::Bytes> = cm
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), bytes::Bytes::from(v.clone())))
            .collect();
        for (k, v) in cm.binary_data.iter().flatten() {
            values.insert(k.clone(), bytes::Bytes::from(v.0.clone()));
        }
        self.config_maps.insert(k, values);
        Touched::nothing()
    }

    /// Removes a ConfigMap.
    pub fn delete_config_map(&mut self, cm: &ConfigMap) -> Touched {
        if let Some(k) = key(cm.metadata.namespace.as_ref(), cm.metadata.name.as_ref()) {
            self.config_maps.remove(&k);
        }
        Touched::nothing()
    }

    /// After a relist: drops the ConfigMaps it did not list.
    pub fn prune_config_maps(&mut self, listed: &std::collections::HashSet<Key>) -> Touched {
        self.config_maps.retain(|k, _| listed.contains(k));
        Touched::nothing()
    }

    /// A value of a labelled ConfigMap.
    pub fn config_map_value(&self, ns: &str, name: &str, key: &str) -> ConfigMapValue {
        match self.config_maps.get(&(ns.to_owned(), name.to_owned())) {
            None => ConfigMapValue::NoConfigMap,
            Some(values) => values
                .get(key)
                .map_or(ConfigMapValue::NoKey, |v| ConfigMapValue::Value(v.clone())),
        }
    }

    /// After a relist: drops the Services it did not list.
    pub fn prune_services(&mut self, listed: &std::collections::HashSet<Key>) -> Touched {
        self.services.retain(|k, _| listed.contains(k));
        Touched::routes()
    }

    /// After a relist: drops the EndpointSlices it did not list.
    pub fn prune_slices(&mut self, listed: &std::collections::HashSet<Key>) -> Touched {
        self.slices.retain(|k, _| listed.contains(k));
        let slices = &self.slices;
        self.slices_by_service.retain(|(ns, _), names| {
            names.retain(|name| slices.contains_key(&(ns.clone(), name.clone())));
            !names.is_empty()
        });
        Touched::routes()
    }

    /// Rebuilds which targets resolve through which Service (on route changes only).
    fn reindex_targets(&mut self) {
        let mut by_service: HashMap<Key, Vec<Arc<str>>> = HashMap::new();
        for ((ns, name), slot) in &self.routes {
            let Some((_, spec)) = slot.effective() else {
                continue;
            };
            by_service
                .entry((ns.clone(), spec.service.clone()))
                .or_default()
                .push(format!("{ns}/{name}").into());
            if let Some(f) = &spec.cold_start.fallback {
                by_service
                    .entry((ns.clone(), f.service.clone()))
                    .or_default()
                    .push(format!("{ns}/{name}{FAILOVER_SUFFIX}").into());
            }
        }
        self.targets_by_service = by_service;
    }

    /// The targets whose endpoints come from Service `key`.
    pub fn targets_behind(&self, key: &(String, String)) -> &[Arc<str>] {
        self.targets_by_service.get(key).map_or(&[], Vec::as_slice)
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, svc: &Service) -> Touched {
        let Some(k) = key(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref()) else {
            return Touched::nothing();
        };
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        port: p.port,
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if self.services.get(&k) == Some(&ports) {
            return Touched::nothing();
        }
        self.services.insert(k.clone(), ports);
        self.service_changed(k)
    }

    /// A Service's ports changed: routes through it may speak another protocol now, and its
    /// endpoints may resolve to other ports.
    fn service_changed(&self, k: Key) -> Touched {
        if self.targets_behind(&k).is_empty() {
            return Touched::nothing();
        }
        Touched {
            routes: true,
            services: vec![k],
        }
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, svc: &Service) -> Touched {
        let Some(k) = key(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref()) else {
            return Touched::nothing();
        };
        if self.services.remove(&k).is_none() {
            return Touched::nothing();
        }
        self.service_changed(k)
    }

    /// Replaces every Service (after a relist).
    pub fn reset_services(&mut self, svcs: &[Service]) -> Touched {
        self.services.clear();
        svcs.iter().for_each(|s| {
            self.apply_service(s);
        });
        Touched::routes()
    }

    /// Adds or replaces an EndpointSlice.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Touched {
        let Some(k) = key(
            slice.metadata.namespace.as_ref(),
            slice.metadata.name.as_ref(),
        ) else {
            return Touched::nothing();
        };
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
        else {
            return Touched::nothing();
        };
        let ports = slice
            .ports
            .as_ref()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
                    .collect()
            })
            .unwrap_or_default();
        let ready = slice
            .endpoints
            .iter()
            // A missing `ready` condition means ready (API convention).
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        let new = Slice {
            service,
            ports,
            ready,
        };
        let mut touched = Touched::nothing();
        match self.slices.get(&k) {
            Some(old) if *old == new => return touched,
            // A slice that moved to another Service (relabelled) leaves the old one too.
            Some(old) if old.service != new.service => {
                let from = (k.0.clone(), old.service.clone());
                if let Some(names) = self.slices_by_service.get_mut(&from) {
                    names.remove(&k.1);
                }
                touched.services.push(from);
            }
            _ => {}
        }
        let svc = (k.0.clone(), new.service.clone());
        self.slices_by_service
            .entry(svc.clone())
            .or_default()
            .insert(k.1.clone());
        self.slices.insert(k, new);
        touched.services.push(svc);
        touched
    }

    /// Removes an EndpointSlice.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> Touched {
        let Some(k) = key(
            slice.metadata.namespace.as_ref(),
            slice.metadata.name.as_ref(),
        ) else {
            return Touched::nothing();
        };
        let Some(old) = self.slices.remove(&k) else {
            return Touched::nothing();
        };
        let svc = (k.0.clone(), old.service);
        if let Some(names) = self.slices_by_service.get_mut(&svc) {
            names.remove(&k.1);
            if names.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        Touched::service(svc)
    }

    /// Replaces every EndpointSlice (after a relist).
    pub fn reset_slices(&mut self, slices: &[EndpointSlice]) -> Touched {
        self.slices.clear();
        self.slices_by_service.clear();
        slices.iter().for_each(|s| {
            self.apply_slice(s);
        });
        Touched::routes()
    }

    /// The routes in effect, oldest first (ties by namespace/name).
    pub fn route_specs(&self) -> Vec<RouteSpec> {
        let mut routes: Vec<(&str, &Key, &ValidRoute)> = self
            .routes
            .iter()
            .filter_map(|(k, slot)| slot.effective().map(|(created, s)| (created, k, s)))
            .collect();
        routes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        routes
            .into_iter()
            .filter_map(|(_, (ns, name), spec)| self.route_spec(ns, name, spec))
            .collect()
    }

    /// Whether an InterceptorRoute in effect hides the HTTPScaledObject `ns/name`.
    pub fn shadowed(&self, ns: &str, name: &str) -> bool {
        self.routes
            .get(&(ns.to_owned(), name.to_owned()))
            .is_some_and(|slot| {
                slot.httpso.is_some()
                    && slot
                        .effective()
                        .is_some_and(|(_, s)| s.kind == RouteKind::InterceptorRoute)
            })
    }

    fn route_spec(&self, ns: &str, name: &str, spec: &ValidRoute) -> Option<RouteSpec> {
        let id: Arc<str> = format!("{ns}/{name}").into();
        let rules = rule_matchers(&spec.rules)?;
        let static_routes = spec
            .static_routes
            .iter()
            .map(|s| {
                Some(StaticRoute {
                    rules: rule_matchers(&s.rules)?,
                    response: static_response(&s.response, ns)?,
                    always: s.always,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        // The add-on's fields win over Wakegate's annotations for the same thing.
        let cold = &spec.cold_start;
        let placeholder = cold
            .placeholder
            .as_ref()
            .and_then(|p| static_response(p, ns));
        let cold_response =
            placeholder.or_else(|| spec.options.cold_start.as_ref().and_then(cold_response));
        Some(RouteSpec {
            target: id.clone(),
            id,
            rules,
            readiness_timeout: spec.timeouts.readiness,
            response_header_timeout: spec.timeouts.response_header,
            request_timeout: spec.timeouts.request,
            max_in_flight_per_endpoint: spec.options.max_in_flight_per_endpoint,
            keep_awake_max: spec
                .options
                .keep_awake_max
                .unwrap_or(wakegate_crds::options::DEFAULT_KEEP_AWAKE_MAX),
            max_held: cold.max_pending.or(spec.options.max_held_requests),
            cold_response_on_overflow: cold.placeholder.is_some() && cold.overflow_placeholder,
            cold_response,
            static_routes,
            session: spec.session.as_ref().map(|s| SessionAffinity {
                cookie: s
                    .cookie_name
                    .clone()
                    .unwrap_or_else(|| SessionAffinity::default_cookie(&format!("{ns}/{name}")))
                    .into(),
                absolute_timeout: s.absolute_timeout,
            }),
            protocol: self.protocol(ns, &spec.service, &spec.port),
            upstream_tls: self.upstream_tls(ns, &spec.service, &spec.port),
            failover: cold.fallback.as_ref().map(|_| FailoverSpec {
                target: format!("{ns}/{name}{FAILOVER_SUFFIX}").into(),
                after: None,
            }),
        })
    }

    /// The protocol of a Service port: h2c when its `appProtocol` is `kubernetes.io/h2c`.
    fn protocol(&self, ns: &str, service: &str, port: &PortRef) -> UpstreamProtocol {
        let h2c = self
            .services
            .get(&(ns.to_owned(), service.to_owned()))
            .and_then(|ports| ports.iter().find(|p| port_matches(p, port)))
            .is_some_and(|p| p.app_protocol.as_deref() == Some("kubernetes.io/h2c"));
        if h2c {
            UpstreamProtocol::H2c
        } else {
            UpstreamProtocol::Http1
        }
    }

    /// TLS for a Service port whose `appProtocol` is `https` (or, without one, whose name is
    /// `https` or starts with `https-`), verified as `<service>.<namespace>.svc`.
    fn upstream_tls(&self, ns: &str, service: &str, port: &PortRef) -> Option<UpstreamTls> {
        let svc_port = self
            .services
            .get(&(ns.to_owned(), service.to_owned()))
            .and_then(|ports| ports.iter().find(|p| port_matches(p, port)))?;
        let tls = match svc_port.app_protocol.as_deref() {
            Some(app) => app.eq_ignore_ascii_case("https"),
            None => svc_port.name == "https" || svc_port.name.starts_with("https-"),
        };
        tls.then(|| UpstreamTls {
            server_name: Some(format!("{service}.{ns}.svc").into()),
            trust: self.upstream_trust.clone(),
        })
    }

    /// The ready endpoints of the route `ns/name`'s target (or, for `ns/name#failover`, of its
    /// failover Service).
    pub fn endpoints(&self, target: &str, mode: EndpointMode) -> ReadyEndpoints {
        let (route, failover) = match target.strip_suffix(FAILOVER_SUFFIX) {
            Some(route) => (route, true),
            None => (target, false),
        };
        let Some((ns, name)) = route.split_once('/') else {
            return ReadyEndpoints::none();
        };
        let Some((_, spec)) = self
            .routes
            .get(&(ns.to_owned(), name.to_owned()))
            .and_then(Slot::effective)
        else {
            return ReadyEndpoints::none();
        };
        match (&spec.cold_start.fallback, failover) {
            (_, false) => self.service_endpoints(ns, &spec.service, &spec.port, mode),
            (Some(f), true) => self.service_endpoints(ns, &f.service, &f.port, mode),
            (None, true) => ReadyEndpoints::none(),
        }
    }

    fn service_endpoints(
        &self,
        ns: &str,
        service: &str,
        port: &PortRef,
        mode: EndpointMode,
    ) -> ReadyEndpoints {
        let Some(ports) = self.services.get(&(ns.to_owned(), service.to_owned())) else {
            return ReadyEndpoints::none();
        };
        let Some(svc_port) = ports.iter().find(|p| port_matches(p, port)) else {
            return ReadyEndpoints::none();
        };
        let key = (ns.to_owned(), service.to_owned());
        let slices = self
            .slices_by_service
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(ns.to_owned(), name.clone())));
        let mut ready = Vec::new();
        for slice in slices {
            let Some((_, target_port)) = slice.ports.iter().find(|(n, _)| *n == svc_port.name)
            else {
                continue;
            };
            for addr in &slice.ready {
                let authority = if addr.contains(':') {
                    format!("[{addr}]:{target_port}")
                } else {
                    format!("{addr}:{target_port}")
                };
                if let Ok(a) = authority.parse::<Authority>() {
                    ready.push(Endpoint::new(a));
                }
            }
        }
        if mode == EndpointMode::Service {
            // Readiness still comes from the slices; the address is the Service's.
            if ready.is_empty() {
                return ReadyEndpoints::none();
            }
            return format!("{service}.{ns}:{}", svc_port.port)
                .parse::<Authority>()
                .map(|a| std::iter::once(Endpoint::new(a)).collect())
                .unwrap_or_default();
        }
        ready.sort_by(|a, b| a.authority().as_str().cmp(b.authority().as_str()));
        ready.dedup();
        ready.into_iter().collect()
    }
}

fn port_matches(p: &ServicePort, port: &PortRef) -> bool {
    match port {
        PortRef::Number(n) => p.port == i32::from(*n),
        PortRef::Name(name) => &p.name == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wakegate_crds::{HTTPScaledObject, InterceptorRoute};

    fn ir(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> InterceptorRoute {
        serde_json::from_value(json!({
            "apiVersion": "http.keda.sh/v1beta1", "kind": "InterceptorRoute",
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    fn hso(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> HTTPScaledObject {
        serde_json::from_value(json!({
            "apiVersion": "http.keda.sh/v1alpha1", "kind": "HTTPScaledObject",
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    fn service(ns: &str, name: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"namespace": ns, "name": name}, "spec": {"ports": ports}}),
        )
        .unwrap()
    }

    fn slice(
        ns: &str,
        name: &str,
        svc: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn addrs(e: &ReadyEndpoints) -> Vec<String> {
        e.as_slice().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn resolves_port_through_the_service_and_keeps_only_ready_addresses() {
        let mut index = ClusterIndex::default();
        index.apply_route(&hso(
            "app",
            "web",
            "2026-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "web", "service": "web", "port": 80}}),
        ));
        index.apply_route(&hso(
            "app",
            "named",
            "2026-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "web", "service": "web", "portName": "admin"}}),
        ));
        index.apply_service(&service(
            "app",
            "web",
            json!([{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]),
        ));
        assert!(
            index.endpoints("app/web", EndpointMode::Pod).is_empty(),
            "no slices yet"
        );
        index.apply_slice(&slice(
            "app",
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]),
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
            ]),
        ));
        index.apply_slice(&slice(
            "other",
            "web-x",
            "web",
            json!([{"name": "http", "port": 1}]),
            json!([{"addresses": ["10.9.9.9"]}]),
        ));
        assert_eq!(
            addrs(&index.endpoints("app/web", EndpointMode::Pod)),
            ["10.0.0.1:8080", "10.0.0.3:8080"]
        );
        assert_eq!(
            addrs(&index.endpoints("app/named", EndpointMode::Pod)),
            ["10.0.0.1:9090", "10.0.0.3:9090"]
        );
        assert_eq!(
            addrs(&index.endpoints("app/web", EndpointMode::Service)),
            ["web.app:80"]
        );
        index.delete_slice(&slice("app", "web-1", "web", json!([]), json!([])));
        assert!(index.endpoints("app/web", EndpointMode::Service).is_empty());
    }

    #[test]
    fn failover_targets_resolve_through_their_own_service() {
        let mut index = ClusterIndex::default();
        index.apply_route(&hso("ns", "a", "2026-01-01T00:00:00Z", json!({
            "scaleTargetRef": {"name": "a", "service": "a", "port": 80},
            "coldStartTimeoutFailoverRef": {"service": "sorry", "portName": "http", "timeoutSeconds": 5}
        })));
        index.apply_service(&service(
            "ns",
            "sorry",
            json!([{"name": "http", "port": 80}]),
        ));
        index.apply_slice(&slice(
            "ns",
            "sorry-1",
            "sorry",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["10.1.1.1"]}]),
        ));
        let specs = index.route_specs();
        let failover = specs[0].failover.as_ref().unwrap();
        assert_eq!(&*failover.target, "ns/a#failover");
        // The add-on's mapping: the failover's timeoutSeconds is the readiness timeout.
        assert_eq!(failover.after, None);
        assert_eq!(
            specs[0].readiness_timeout,
            Some(std::time::Duration::from_secs(5))
        );
        assert_eq!(
            addrs(&index.endpoints("ns/a#failover", EndpointMode::Pod)),
            ["10.1.1.1:8080"]
        );
        assert!(index.endpoints("ns/a", EndpointMode::Pod).is_empty());
    }

    #[test]
    fn an_h2c_app_protocol_makes_an_h2c_route() {
        let mut index = ClusterIndex::default();
        index.apply_route(&hso(
            "ns",
            "g",
            "2026-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "g", "service": "g", "port": 50051}}),
        ));
        assert_eq!(
            index.route_specs()[0].protocol,
            UpstreamProtocol::Http1,
            "no Service yet"
        );
        index.apply_service(&service(
            "ns",
            "g",
            json!([{"name": "grpc", "port": 50051, "appProtocol": "kubernetes.io/h2c"}]),
        ));
        assert_eq!(index.route_specs()[0].protocol, UpstreamProtocol::H2c);
    }

    #[test]
    fn wakegate_annotations_set_the_cold_start_response_and_caps() {
        let mut index = ClusterIndex::default();
        let mut obj = hso(
            "ns",
            "w",
            "2026-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "w", "service": "w", "port": 80}}),
        );
        obj.metadata.annotations = Some(
            [
                ("wakegate.dev/cold-start-response", "waiting-page"),
                ("wakegate.dev/waiting-page-refresh-seconds", "5"),
                ("wakegate.dev/max-held-requests", "10"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        index.apply_route(&obj);
        let spec = &index.route_specs()[0];
        assert_eq!(
            spec.cold_response,
            Some(ColdResponse::WaitingPage { refresh: 5 })
        );
        assert_eq!(spec.max_held, std::num::NonZeroUsize::new(10));

        // A bad annotation makes the route invalid, like a bad spec field: not routed.
        obj.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("wakegate.dev/max-held-requests".into(), "lots".into());
        index.apply_route(&obj);
        assert!(index.route_specs().is_empty());
    }

    #[test]
    fn an_https_service_port_makes_a_verified_tls_route() {
        let mut index = ClusterIndex::new(Trust::InsecureSkipVerify);
        for (name, port) in [("a", "web"), ("b", "https-api"), ("c", "plain")] {
            index.apply_route(&hso(
                "ns",
                name,
                "2026-01-01T00:00:00Z",
                json!({"scaleTargetRef": {"name": name, "service": name, "portName": port}}),
            ));
        }
        index.apply_service(&service(
            "ns",
            "a",
            json!([{"name": "web", "port": 443, "appProtocol": "https"}]),
        ));
        index.apply_service(&service(
            "ns",
            "b",
            json!([{"name": "https-api", "port": 8443}]),
        ));
        // An explicit appProtocol wins over the port name.
        index.apply_service(&service(
            "ns",
            "c",
            json!([{"name": "plain", "port": 80, "appProtocol": "http"}]),
        ));
        let specs = index.route_specs();
        let tls = |id: &str| {
            specs
                .iter()
                .find(|s| &*s.id == id)
                .unwrap()
                .upstream_tls
                .clone()
        };
        assert_eq!(
            tls("ns/a"),
            Some(UpstreamTls {
                server_name: Some("a.ns.svc".into()),
                trust: Trust::InsecureSkipVerify,
            })
        );
        assert_eq!(
            tls("ns/b").unwrap().server_name.as_deref(),
            Some("b.ns.svc")
        );
        assert_eq!(tls("ns/c"), None);
    }

    #[test]
    fn unnamed_single_port_and_ipv6() {
        let mut index = ClusterIndex::default();
        index.apply_route(&hso(
            "ns",
            "a",
            "2026-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "a", "service": "a", "port": 8080}}),
        ));
        index.apply_service(&service("ns", "a", json!([{"port": 8080}])));
        index.apply_slice(&slice(
            "ns",
            "a-1",
            "a",
            json!([{"port": 3000}]),
            json!([{"addresses": ["fd00::1"]}]),
        ));
        assert_eq!(
            addrs(&index.endpoints("ns/a", EndpointMode::Pod)),
            ["[fd00::1]:3000"]
        );
    }

    #[test]
    fn routes_are_oldest_first_and_invalid_objects_are_left_out() {
        let mut index = ClusterIndex::default();
        index.apply_route(&hso(
            "ns",
            "new",
            "2026-02-01T00:00:00Z",
            json!({"hosts": ["h"], "scaleTargetRef": {"name": "a", "service": "a", "port": 80}}),
        ));
        index.apply_route(&hso(
            "ns",
            "old",
            "2026-01-01T00:00:00Z",
            json!({"hosts": ["h"], "scaleTargetRef": {"name": "a", "service": "a", "port": 80}}),
        ));
        index.apply_route(&hso(
            "ns",
            "bad",
            "2025-01-01T00:00:00Z",
            json!({"scaleTargetRef": {"name": "a", "service": "a", "port": 80, "portName": "x"}}),
        ));
        let ids: Vec<String> = index
            .route_specs()
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(ids, ["ns/old", "ns/new"]);
        index.reset_routes::<HTTPScaledObject>(&[]);
        assert!(index.route_specs().is_empty());
    }

    #[test]
    fn a_change_touches_only_what_it_changed() {
        let mut index = ClusterIndex::default();
        let web = |created: &str, labels: serde_json::Value| {
            let mut o = hso(
                "app",
                "web",
                created,
                json!({"scaleTargetRef": {"name": "web", "service": "web", "port": 80},
                       "coldStartTimeoutFailoverRef": {"service": "sorry", "port": 80}}),
            );
            o.metadata.labels = serde_json::from_value(labels).unwrap();
            o
        };
        assert!(
            index
                .apply_route(&web("2026-01-01T00:00:00Z", json!({})))
                .routes
        );
        assert_eq!(
            index.targets_behind(&("app".into(), "web".into())),
            [Arc::<str>::from("app/web")]
        );
        assert_eq!(
            index.targets_behind(&("app".into(), "sorry".into())),
            [Arc::<str>::from("app/web#failover")]
        );
        // A relabel or a status write changes nothing routing reads.
        assert!(!index
            .apply_route(&web("2026-01-01T00:00:00Z", json!({"x": "1"})))
            .any());
        let ports = json!([{"name": "http", "port": 80}]);
        assert!(
            index
                .apply_service(&service("app", "web", ports.clone()))
                .routes
        );
        assert!(!index.apply_service(&service("app", "web", ports)).any());
        // A Service no route resolves through touches nothing.
        assert!(!index
            .apply_service(&service(
                "app",
                "unrelated",
                json!([{"name": "http", "port": 80}])
            ))
            .any());
        // A slice touches its own Service's targets, and a repeat of it nothing.
        let s = slice(
            "app",
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        );
        let touched = index.apply_slice(&s);
        assert_eq!(
            touched,
            Touched {
                routes: false,
                services: vec![("app".into(), "web".into())]
            }
        );
        assert!(!index.apply_slice(&s).any());
        assert_eq!(
            index.delete_slice(&s).services,
            [("app".to_owned(), "web".to_owned())]
        );
        assert!(index.endpoints("app/web", EndpointMode::Pod).is_empty());
    }

    #[test]
    fn an_interceptor_route_routes_by_its_rules_and_maps_its_cold_start() {
        let mut index = ClusterIndex::default();
        index.apply_route(&ir(
            "ns",
            "web",
            "2026-01-01T00:00:00Z",
            json!({
                "target": {"service": "web", "port": 80},
                "rules": [
                    {"hosts": ["a.example"], "paths": [{"value": "/api"}]},
                    {"hosts": ["b.example"], "headers": [{"name": "x-beta"}]}
                ],
                "scalingMetric": {"concurrency": {"targetValue": 10}},
                "coldStart": {
                    "placeholder": {"response": {"body": "soon", "headers": {"Retry-After": "3"}}},
                    "maxPendingRequests": 5,
                    "overflow": "Placeholder"
                },
                "timeouts": {"readiness": "0s", "request": "1m", "responseHeader": "5s"},
                "staticRoutes": [
                    {"rules": [{"paths": [{"value": "/healthz"}]}], "response": {"body": "ok"}},
                    {"rules": [{"hosts": ["a.example"]}], "response": {"statusCode": 410}, "responseMode": "Always"}
                ]
            }),
        ));
        let specs = index.route_specs();
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        assert_eq!(&*spec.id, "ns/web");
        assert_eq!(spec.rules.len(), 2);
        assert_eq!(spec.rules[0].path_prefixes, ["/api"]);
        assert_eq!(spec.rules[1].headers[0].value, None);
        assert_eq!(spec.max_held.map(|n| n.get()), Some(5));
        assert!(spec.cold_response_on_overflow);
        let Some(ColdResponse::Placeholder {
            status,
            body,
            headers,
            ..
        }) = &spec.cold_response
        else {
            panic!("no placeholder: {:?}", spec.cold_response);
        };
        assert_eq!(*status, 503);
        assert_eq!(&body[..], b"soon");
        assert_eq!(headers["retry-after"], "3");
        assert_eq!(spec.readiness_timeout, Some(std::time::Duration::ZERO));
        assert_eq!(spec.static_routes.len(), 2);
        assert!(!spec.static_routes[0].always && spec.static_routes[1].always);
        assert!(matches!(
            spec.static_routes[1].response,
            ColdResponse::Placeholder { status, .. } if status == 410
        ));
        assert!(matches!(
            &spec.static_routes[0].response,
            ColdResponse::Placeholder { status, body, .. } if *status == 200 && &body[..] == b"ok"
        ));
        assert_eq!(
            spec.request_timeout,
            Some(std::time::Duration::from_secs(60))
        );
        assert_eq!(
            spec.response_header_timeout,
            Some(std::time::Duration::from_secs(5))
        );
    }

    #[test]
    fn a_valid_interceptor_route_shadows_the_httpscaledobject_of_its_name() {
        let mut index = ClusterIndex::default();
        let old = hso(
            "ns",
            "app",
            "2026-01-01T00:00:00Z",
            json!({
                "hosts": ["old.example"],
                "scaleTargetRef": {"name": "app", "service": "app", "port": 80}
            }),
        );
        index.apply_route(&old);
        assert_eq!(index.route_specs()[0].rules[0].hosts, ["old.example"]);
        assert!(!index.shadowed("ns", "app"));

        // An invalid InterceptorRoute takes nothing away.
        let broken = ir(
            "ns",
            "app",
            "2026-02-01T00:00:00Z",
            json!({
                "target": {"service": "app"},
                "scalingMetric": {"concurrency": {"targetValue": 1}}
            }),
        );
        assert!(!index.apply_route(&broken).any());
        assert_eq!(index.route_specs()[0].rules[0].hosts, ["old.example"]);

        let new = ir(
            "ns",
            "app",
            "2026-02-01T00:00:00Z",
            json!({
                "target": {"service": "app", "port": 80},
                "rules": [{"hosts": ["new.example"]}],
                "scalingMetric": {"concurrency": {"targetValue": 1}}
            }),
        );
        assert!(index.apply_route(&new).routes);
        let specs = index.route_specs();
        assert_eq!(specs.len(), 1, "one route per namespace/name");
        assert_eq!(specs[0].rules[0].hosts, ["new.example"]);
        assert!(index.shadowed("ns", "app"));

        // The HTTPScaledObject comes back when the InterceptorRoute goes.
        index.delete_route(&new);
        assert_eq!(index.route_specs()[0].rules[0].hosts, ["old.example"]);
        // A relist of InterceptorRoutes that lists none leaves the HTTPScaledObject alone.
        index.apply_route(&new);
        index.prune_routes(RouteKind::InterceptorRoute, &Default::default());
        assert_eq!(index.route_specs()[0].rules[0].hosts, ["old.example"]);
        index.prune_routes(RouteKind::HTTPScaledObject, &Default::default());
        assert!(index.route_specs().is_empty());
    }
}
