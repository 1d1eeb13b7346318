//! The proxy core: route a request, count it, hold it while its target has no ready endpoint,
//! forward it, and account for it when its response ends.
//!
//! A request's way through: [`Proxy::handle`] routes it (and answers static routes), `hold`
//! gets it an endpoint (waking the target and waiting when none is ready), `upstream` rewrites
//! and sends it, and [`Completion`] accounts for it when its response ends. `session` reads and
//! writes the cookie that pins a client to an endpoint; `keep_awake` takes a backend's
//! `Wakegate-Keep-Awake` off its response.
//!
//! Everything here talks to targets through [`Provider`] only, so local mode and Kubernetes share
//! this path unchanged.

mod body;
mod error;
mod headers;
mod hold;
mod keep_awake;
mod observe;
mod session;
mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

pub use self::body::{ClientFault, MinRate, ProxyBody, RequestBody};
pub use self::error::ProxyError;
pub(crate) use self::headers::client_value;
use self::hold::{round_to_ms, Acquired};
use self::observe::{Observed, RequestTrace};
use self::session::{pinned_endpoint, session_cookie};
pub use self::upstream::give_back_thread_cache;
use self::upstream::{
    idempotent, upstream_request, ClientKey, Http1Conn, Http1Pool, Replay, SendError, Upstream,
    UpstreamClient, UriForm,
};
use crate::client_conn::ClientConn;
use crate::connect::{FreshEndpoints, RetryingConnector};
use crate::events::WakeEvents;
use crate::load::{EndpointLease, InFlight, Loads, RouteLoad};
use crate::metrics::{ProxyMetrics, RouteMetrics};
use crate::provider::{Endpoint, Provider, ReadyEndpoints, RouteSpec, UpstreamProtocol};
use crate::routing::RouteTable;

/// The response header telling whether the request waited for a cold start.
pub const COLD_START_HEADER: &str = "x-keda-http-cold-start";
/// [`COLD_START_HEADER`] as a name made once: a `&str` name is checked on every insert.
const COLD_START_NAME: header::HeaderName = header::HeaderName::from_static(COLD_START_HEADER);
/// What a timeout turned off (`0s`) stands for: far enough never to pass, near enough that
/// adding it to an `Instant` cannot overflow.
const NO_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The response header set when the failover target answered.
pub const FAILOVER_HEADER: &str = "x-wakegate-failover";

/// Proxy-wide settings: the timeouts used when a route does not set its own, the cap on held
/// requests over all routes, and what is trusted of a client.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// How long a request is held waiting for a ready endpoint.
    pub readiness: Duration,
    /// How long to wait for the upstream's response headers, from the request sent in full.
    pub response_header: Duration,
    /// The whole-request deadline, from arrival; `None` for none.
    pub request: Option<Duration>,
    /// Most requests held at once, over all routes.
    pub max_held_total: usize,
    /// Most requests held at once per route, for routes that set no cap (`--max-pending-requests`).
    pub default_max_held: Option<std::num::NonZeroUsize>,
    /// Most parked requests released to their upstreams at once; 0 for no bound.
    pub max_released_at_once: usize,
    /// How long the rest of a cold start's held requests wait for the first one's response head
    /// (`--first-release-alone-for`); zero releases them together.
    pub first_release_alone_for: Duration,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// The rate a request body must keep; `None` for no minimum.
    pub min_body_rate: Option<MinRate>,
    /// Where each request's access log line goes; `None` writes none.
    pub access_log: Option<crate::access_log::AccessLog>,
}

/// A route as the proxy uses it: its spec, its load, and its target's ready endpoints.
#[derive(Debug)]
pub struct RouteState {
    spec: RouteSpec,
    load: Arc<RouteLoad>,
    endpoints: watch::Receiver<ReadyEndpoints>,
    readiness_timeout: Duration,
    response_header_timeout: Duration,
    /// The whole-request deadline, if any.
    request_timeout: Option<Duration>,
    /// The failover target's endpoints, and how long to hold before using them.
    failover: Option<(watch::Receiver<ReadyEndpoints>, Duration)>,
    /// The pooled client for the target (shared by every route with the same protocol and TLS).
    client: UpstreamClient,
    /// The route's own plaintext HTTP/1.1 connections, by endpoint.
    http1: Arc<Http1Pool>,
    /// The route's per-request metric series, resolved when the table is built.
    metrics: RouteMetrics,
    /// Set when a wake is published, cleared (and a ready event published) when the first held
    /// request is released.
    awaiting_ready: AtomicBool,
    /// Set when the ready event is published, cleared (and a served event published) when the
    /// first released request's response headers arrive.
    awaiting_first_byte: AtomicBool,
    /// The static routes, in order: each one's rules as a table, its answer, and `Always`.
    statics: Vec<(RouteTable<()>, Box<crate::provider::ColdResponse>, bool)>,
    /// Whether a static route's or the placeholder's body comes from a ConfigMap.
    config_map_bodies: bool,
    /// Lets the first request released after a cold start go up alone.
    release_gate: hold::ReleaseGate,
}

/// The proxy: a routing table swapped whole on change, and a pooled upstream client.
pub struct Proxy {
    /// Read on every request, replaced rarely: an immutable snapshot behind `ArcSwap`.
    table: ArcSwap<RouteTable<Arc<RouteState>>>,
    loaded: AtomicBool,
    /// Wakes the requests that arrived before the first route set (see [`Proxy::first_routes`]).
    first_routes: tokio::sync::Notify,
    provider: Arc<dyn Provider>,
    /// Pooled clients by protocol and TLS settings. Read when the route table is rebuilt, so a
    /// plain mutex; kept across rebuilds so pools survive route changes.
    clients: std::sync::Mutex<HashMap<ClientKey, UpstreamClient>>,
    /// HTTP/2 clients, one per endpoint: an HTTP/2 request's URI carries the routed authority
    /// (its `:authority`), so the pool cannot be keyed by the endpoint's address. Read per
    /// request, so a `DashMap`.
    h2_clients: dashmap::DashMap<(ClientKey, Endpoint), UpstreamClient>,
    fresh: FreshEndpoints,
    /// Dials the route pools' connections (with retries for fresh endpoints).
    connector: RetryingConnector,
    loads: Arc<Loads>,
    metrics: ProxyMetrics,
    settings: ProxySettings,
    wakes: WakeEvents,
    /// Requests held now, over all routes, against `settings.max_held_total`.
    held_total: Arc<std::sync::atomic::AtomicUsize>,
    /// Permits for parked requests on their way to an upstream (`max_released_at_once`).
    releasing: Option<Arc<tokio::sync::Semaphore>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("routes", &self.table.load().len())
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Builds a proxy over `provider`. Routes arrive through [`Proxy::follow_routes`].
    pub fn new(
        provider: Arc<dyn Provider>,
        loads: Arc<Loads>,
        metrics: ProxyMetrics,
        settings: ProxySettings,
        wakes: WakeEvents,
    ) -> Arc<Self> {
        let fresh = FreshEndpoints::default();
        let releasing = (settings.max_released_at_once > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(settings.max_released_at_once)));
        Arc::new(Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            loaded: AtomicBool::new(false),
            first_routes: tokio::sync::Notify::new(),
            provider,
            clients: std::sync::Mutex::default(),
            h2_clients: dashmap::DashMap::new(),
            connector: RetryingConnector::new(fresh.clone()),
            fresh,
            loads,
            metrics,
            settings,
            wakes,
            held_total: Arc::default(),
            releasing,
        })
    }

    /// Whether `client` is a trusted proxy, whose `X-Forwarded-*` headers are kept (decided once
    /// per connection).
    fn is_trusted(&self, client: &ClientConn) -> bool {
        client.trusted_by(|ip| {
            let ip = headers::canonical(ip);
            self.settings
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&ip))
        })
    }

    /// Each route and the target it forwards to, for `/status`.
    pub fn route_targets(&self) -> serde_json::Map<String, serde_json::Value> {
        self.table
            .load()
            .values()
            .map(|r| {
                (
                    r.spec.id.to_string(),
                    serde_json::json!({ "target": r.spec.target.to_string() }),
                )
            })
            .collect()
    }

    /// Whether the first route set has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Replaces the routing table with one built from `specs` (oldest first).
    pub fn apply_routes(&self, specs: &[RouteSpec]) {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.retain(|(protocol, tls), _| {
            tls.is_none()
                || specs
                    .iter()
                    .any(|s| s.protocol == *protocol && s.upstream_tls == *tls)
        });
        let pools: HashMap<_, _> = self
            .table
            .load()
            .values()
            .map(|r| (r.spec.id.clone(), r.http1.clone()))
            .collect();
        let table = RouteTable::build_rules(specs.iter().map(|spec| {
            // A route's `0s` turns the wait's deadline off: the request is held until it is
            // served, the client leaves, or the request timeout passes.
            let readiness_timeout = match spec.readiness_timeout.unwrap_or(self.settings.readiness)
            {
                Duration::ZERO => NO_DEADLINE,
                t => t,
            };
            let statics = spec
                .static_routes
                .iter()
                .map(|s| {
                    (
                        RouteTable::build_rules([(s.rules.clone(), ())]),
                        Box::new(s.response.clone()),
                        s.always,
                    )
                })
                .collect();
            let has_config_map = |r: &crate::provider::ColdResponse| {
                matches!(
                    r,
                    crate::provider::ColdResponse::Placeholder {
                        config_map: Some(_),
                        ..
                    }
                )
            };
            let config_map_bodies = spec.cold_response.as_ref().is_some_and(has_config_map)
                || spec
                    .static_routes
                    .iter()
                    .any(|s| has_config_map(&s.response));
            let state = RouteState {
                config_map_bodies,
                statics,
                client: self.client_for(&mut clients, spec.protocol, spec.upstream_tls.as_ref()),
                // A route keeps its idle connections across table rebuilds.
                http1: pools.get(&spec.id).cloned().unwrap_or_default(),
                metrics: self.metrics.route(&spec.id),
                awaiting_ready: AtomicBool::new(false),
                awaiting_first_byte: AtomicBool::new(false),
                release_gate: hold::ReleaseGate::new(self.settings.first_release_alone_for),
                load: self.loads.get(&spec.id),
                endpoints: self.provider.endpoints(&spec.target),
                readiness_timeout,
                response_header_timeout: match spec
                    .response_header_timeout
                    .unwrap_or(self.settings.response_header)
                {
                    Duration::ZERO => NO_DEADLINE,
                    t => t,
                },
                // A route's `0s` turns the global deadline off for it, as in the add-on.
                request_timeout: spec
                    .request_timeout
                    .or(self.settings.request)
                    .filter(|t| !t.is_zero()),
                failover: spec.failover.as_ref().map(|f| {
                    (
                        self.provider.endpoints(&f.target),
                        f.after.unwrap_or(readiness_timeout),
                    )
                }),
                spec: spec.clone(),
            };
            (spec.rules.clone(), Arc::new(state))
        }));
        self.loads.retain(|id| specs.iter().any(|s| &s.id == id));
        tracing::info!(routes = table.len(), "routing table updated");
        self.table.store(Arc::new(table));
        if !self.loaded.swap(true, Ordering::AcqRel) {
            self.first_routes.notify_waiters();
        }
    }

    /// Waits until the first route set is loaded, for at most the readiness timeout (none if
    /// it is `0s`). A request that arrives before it, while the interceptor starts or waits
    /// for the Kubernetes API, would otherwise find no route and be answered 404 for a host
    /// that is routed a moment later: it is held instead, like a request for a cold target.
    async fn first_routes(&self, method: &Method) -> Result<(), ProxyError> {
        let since = Instant::now();
        let deadline = match self.settings.readiness {
            Duration::ZERO => since + NO_DEADLINE,
            timeout => since + timeout,
        };
        loop {
            // Registered before the flag is read: a set loaded in between still wakes it.
            let loaded = self.first_routes.notified();
            if self.is_loaded() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, loaded).await.is_err() && !self.is_loaded() {
                let waited = since.elapsed();
                let err = ProxyError::NotLoaded {
                    waited: round_to_ms(waited),
                };
                tracing::warn!(error = %err, "request answered before any route set was loaded");
                self.metrics
                    .request("", method, err.status(), waited, false);
                return Err(err);
            }
        }
    }

    /// Applies every route set the provider publishes, until the provider goes away.
    /// Idle upstream connections past their idle timeout are closed as this goes.
    pub async fn follow_routes(self: Arc<Self>) {
        let mut rx = self.provider.routes();
        let mut sweep = tokio::time::interval(Duration::from_secs(30));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let specs = rx.borrow_and_update().clone();
            if let Some(specs) = specs {
                self.apply_routes(&specs);
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => match changed {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    _ = sweep.tick() => {
                        for route in self.table.load().values() {
                            route.http1.sweep();
                        }
                    }
                }
            }
        }
    }

    /// A static response with its body looked up, if it comes from a ConfigMap: the key it
    /// names, or (with none) the request path without its leading `/` (`index.html` for `/`),
    /// whose extension then gives the content type unless the response's headers set one. A
    /// missing ConfigMap or named key is a 500; a missing path-derived key, an empty body.
    fn with_body(
        &self,
        route: &crate::provider::RouteId,
        response: &crate::provider::ColdResponse,
        path: &str,
    ) -> crate::provider::ColdResponse {
        use crate::provider::{ColdResponse, ConfigMapValue};
        let ColdResponse::Placeholder {
            status,
            content_type,
            headers,
            config_map: Some(cm),
            ..
        } = response
        else {
            return response.clone();
        };
        let key = match &cm.key {
            Some(key) => &**key,
            None => match path.trim_start_matches('/') {
                "" => "index.html",
                derived => derived,
            },
        };
        let found = |body: bytes::Bytes, content_type: HeaderValue| ColdResponse::Placeholder {
            status: *status,
            content_type,
            body,
            headers: headers.clone(),
            config_map: None,
        };
        match self.provider.config_map_value(&cm.namespace, &cm.name, key) {
            ConfigMapValue::Value(body) => {
                let guessed = cm
                    .key
                    .is_none()
                    .then(|| mime_guess::from_path(key).first_raw())
                    .flatten()
                    .map(HeaderValue::from_static);
                found(body, guessed.unwrap_or_else(|| content_type.clone()))
            }
            ConfigMapValue::NoKey if cm.key.is_none() => {
                found(bytes::Bytes::new(), content_type.clone())
            }
            missing => {
                let what = if missing == ConfigMapValue::NoConfigMap {
                    "is not there (or lacks the label http.keda.sh/response-body: \"true\")"
                } else {
                    "has no such key"
                };
                tracing::warn!(%route, config_map = %cm.name, key, "the response body's ConfigMap {what}");
                ColdResponse::Placeholder {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    content_type: HeaderValue::from_static("text/plain; charset=utf-8"),
                    body: bytes::Bytes::from(format!(
                        "route {route}: the response body is missing from its ConfigMap\n"
                    )),
                    headers: http::HeaderMap::new(),
                    config_map: None,
                }
            }
        }
    }

    /// Handles one request from `client`. Never fails: errors become responses here.
    #[allow(clippy::manual_async_fn)] // see the comment in its body
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: ClientConn,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + 'static {
        // The request is boxed until it is rewritten for the upstream: a future keeps the room
        // of what it captured for its whole life, even once that has been moved on, so `handle`
        // and `forward` would each keep 264 bytes of a request long since sent, for as long as
        // the response takes. Boxed, each keeps 8.
        let req = Box::new(Routed {
            req,
            authority: RoutedAuthority {
                value: None,
                from_host: false,
            },
        });
        // An async block, not an async fn: an async fn's arguments are copied into its body's
        // locals, so the future would hold each of them twice.
        async move {
            if !self.is_loaded() {
                // Boxed: only a request that arrives before the first route set waits here,
                // and the request future would otherwise keep room for the wait.
                if let Err(err) = Box::pin(self.first_routes(req.req.method())).await {
                    return err.to_response();
                }
            }
            // Only what the response needs is kept across the forward: the routing that came
            // before it is done in `begin`, whose locals are gone by then.
            let mut done;
            let path;
            let deadline;
            let forwarded = {
                let Begun {
                    req,
                    done: begun,
                    path: asked,
                    span,
                } = match self.begin(req, &client) {
                    Ok(begun) => begun,
                    Err(err) => return err.to_response(),
                };
                done = begun;
                path = asked;
                deadline = done.route.request_timeout.map(|t| done.start + t);
                self.forward(req, &client, &mut done).instrument(span)
            };
            let outcome = match deadline {
                None => forwarded.await,
                // Boxed: a timer in the request future would take its room in every request,
                // with or without a request timeout.
                Some(at) => {
                    let timed = Box::pin(tokio::time::timeout_at(at, forwarded)).await;
                    timed.unwrap_or_else(|_elapsed| {
                        Err(ProxyError::RequestTimeout {
                            route: done.route.spec.id.clone(),
                            timeout: done.route.request_timeout.unwrap_or_default(),
                        })
                    })
                }
            };
            match outcome {
                Ok((rsp, Some(tunnel), _)) => {
                    let (parts, _) = rsp.into_parts();
                    done.code = parts.status;
                    // The tunnel is in flight until either side closes it: it keeps the route awake.
                    tokio::spawn(tunnel.run(done));
                    Response::from_parts(parts, ProxyBody::default())
                }
                Ok((rsp, None, conn)) => {
                    let (parts, body) = rsp.into_parts();
                    done.code = parts.status;
                    Response::from_parts(parts, ProxyBody::upstream(body, conn, done, deadline))
                }
                Err(mut err) => {
                    if let (
                        ProxyError::Waking {
                            route, response, ..
                        }
                        | ProxyError::Static { route, response },
                        Some(path),
                    ) = (&mut err, &path)
                    {
                        **response = self.with_body(route, response, path);
                    }
                    done.code = err.status();
                    if err.is_upstream() {
                        self.metrics.upstream_error(&done.route.spec.id, err.kind());
                        tracing::warn!(error = %err, cause = ?std::error::Error::source(&err), "upstream error");
                    } else if err.is_client() {
                        self.metrics.client_error(&done.route.spec.id, err.kind());
                        tracing::debug!(error = %err, "client error");
                    } else if matches!(
                        err,
                        ProxyError::ClientGone { .. }
                            | ProxyError::Waking { .. }
                            | ProxyError::Static { .. }
                    ) {
                        tracing::debug!(error = %err, "answered without forwarding");
                    } else {
                        tracing::info!(error = %err, "request not forwarded");
                    }
                    let rsp = err.to_response();
                    if let Some(observed) = done.observed.as_mut() {
                        observed.bytes =
                            http_body::Body::size_hint(rsp.body()).exact().unwrap_or(0);
                    }
                    rsp
                }
            }
        }
    }

    /// A request's routing, before it is forwarded: refused, unrouted and static answers come
    /// back as `Err` (counted already), and a request to forward comes back with its bookkeeping started. Not
    /// part of `handle`'s future: its locals would keep their room there for as long as the
    /// upstream takes.
    fn begin(
        self: &Arc<Self>,
        mut routed: Box<Routed>,
        client: &ClientConn,
    ) -> Result<Begun, ProxyError> {
        let req = &mut routed.req;
        // A request parked before hyper arrived when it began to wait.
        let parked = req.extensions_mut().remove::<hold::Parked>();
        let start = parked.as_ref().map_or_else(Instant::now, |p| p.since);
        let framing = Framing::of(req.headers());
        let authority =
            match refuse(req, &framing).map_or_else(|| routed_authority(req, &framing), Err) {
                Ok(authority) => authority,
                Err(err) => {
                    tracing::info!(method = %req.method(), error = %err, "request refused");
                    if err.is_client() {
                        self.metrics.client_error("", err.kind());
                    }
                    self.metrics
                        .request("", req.method(), err.status(), start.elapsed(), false);
                    return Err(err);
                }
            };
        let host = authority.as_str();
        let route = {
            let table = self.table.load();
            table.lookup(host, req.uri().path(), req.headers()).cloned()
        };
        let Some(route) = route else {
            let err = ProxyError::NoRoute {
                host: host.to_owned(),
            };
            tracing::debug!(method = %req.method(), path = req.uri().path(), error = %err, "no route");
            self.metrics
                .request("", req.method(), err.status(), start.elapsed(), false);
            return Err(err);
        };
        // A static route answers without counting or waking: always, or (WhenUnavailable) while
        // no endpoint is ready; otherwise the request is forwarded, still uncounted.
        let static_match = route.static_for(host, req.uri().path(), req.headers());
        if let Some((response, always)) = static_match {
            if always || route.endpoints.borrow().is_empty() {
                let err = ProxyError::Static {
                    route: route.spec.id.clone(),
                    response: Box::new(self.with_body(&route.spec.id, response, req.uri().path())),
                };
                route
                    .metrics
                    .request(req.method(), err.status(), start.elapsed(), false);
                return Err(err);
            }
        }
        // A body kept in a ConfigMap may be named by the request path: kept only for those.
        let path = route.config_map_bodies.then(|| req.uri().path().to_owned());
        let span = tracing::debug_span!("request", route = %route.spec.id, method = %req.method(), path = req.uri().path());
        let tracer = wakegate_telemetry::tracer();
        let observed = if tracer.is_some() || self.settings.access_log.is_some() {
            parked
                .as_ref()
                .filter(|p| p.route == route.spec.id)
                .and_then(|p| p.take_observed())
                .or_else(|| {
                    let trace = tracer.map(|tracer| {
                        RequestTrace::start(tracer, req, host, &route.spec.id, client, start)
                    });
                    let access_log = self.settings.access_log.is_some();
                    Observed::new(trace, access_log, req.uri().path(), client)
                })
        } else {
            None
        };
        let mut done = Completion {
            observed,
            uncounted: static_match.map(|(response, _)| Box::new(response.clone())),
            cold: false,
            ended: false,
            proxy: self.clone(),
            method: req.method().clone(),
            // Every path that answers sets the code; a future dropped before that means the
            // client went away.
            code: error::CLIENT_CLOSED_REQUEST,
            start,
            in_flight: static_match.is_none().then(|| {
                parked
                    .as_ref()
                    .filter(|p| p.route == route.spec.id)
                    .and_then(|p| {
                        p.in_flight
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .take()
                    })
                    // Counted in as of its arrival, read above, unless it waited parked.
                    .unwrap_or_else(|| match parked {
                        None => route.load.start_request_at(start.into_std()),
                        Some(_) => route.load.start_request(),
                    })
            }),
            _released: None,
            first_out: None,
            parked_since: parked.as_ref().map(|p| p.since),
            _lease: None,
            route,
        };
        if let Some(p) = &parked {
            let release = std::mem::take(
                &mut *p
                    .released
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            done._released = release.permit;
            done.first_out = release.first;
        }
        routed.authority = authority;
        Ok(Begun {
            req: routed,
            done,
            path,
            span,
        })
    }

    #[allow(clippy::manual_async_fn)] // see `handle`
    fn forward<'a>(
        &'a self,
        mut routed: Box<Routed>,
        client: &'a ClientConn,
        done: &'a mut Completion,
    ) -> impl std::future::Future<Output = Result<Forwarded, ProxyError>> + Send + 'a {
        // An async block for the same reason as `handle`'s.
        async move {
            // Boxed: the request future keeps it across the send, and few requests upgrade.
            let upgrade = match routed.req.version() {
                Version::HTTP_11 => headers::upgrade_protocol(routed.req.headers()),
                _ => None,
            }
            .map(|protocol| {
                Box::new(Upgrading {
                    protocol,
                    client: hyper::upgrade::on(&mut routed.req),
                })
            });
            let route = done.route.clone();
            let session = route.spec.session.as_ref();
            // The endpoint is chosen in a block of its own: what choosing it needs is not kept
            // in the request future across the send.
            let (endpoint, cold, failed_over, was_pinned) = {
                let deadline = done.start + route.readiness_timeout;
                let hold_until = match &route.failover {
                    Some((_, after)) => deadline.min(done.start + *after),
                    None => deadline,
                };
                let mut failed_over = false;
                // Hyper notices a client leave by itself while the request has no body left to read;
                // only a request with an unread body needs the socket watched (which costs a file
                // descriptor per held request).
                let watch_client = !http_body::Body::is_end_stream(routed.req.body());
                let watched = watch_client.then_some(client);
                // Session affinity: a valid cookie naming a ready endpoint pins the request to it.
                let pinned = session
                    .and_then(|s| pinned_endpoint(s, routed.req.headers(), &route.endpoints));
                let uncounted = done.uncounted.clone();
                let was_pinned = pinned.is_some();
                let acquired = if let Some(endpoint) = pinned {
                    route.metrics.warm();
                    Acquired {
                        endpoint,
                        first: None,
                        lease: None,
                        waited: None,
                    }
                } else if let Some(response) = uncounted {
                    // Let through by a static route: forwarded only to an endpoint ready now.
                    let ready = route.endpoints.borrow().clone();
                    match route
                        .load
                        .pick(&ready, route.spec.max_in_flight_per_endpoint)
                    {
                        Some((endpoint, lease)) => Acquired {
                            endpoint,
                            first: None,
                            lease,
                            waited: None,
                        },
                        None => {
                            return Err(ProxyError::Static {
                                route: route.spec.id.clone(),
                                response,
                            })
                        }
                    }
                } else {
                    let parked_since = done.parked_since;
                    // Boxed: the request future keeps it across the hold.
                    let trace = done.observed.as_mut().and_then(|o| {
                        o.holding = Some(parked_since.unwrap_or_else(Instant::now));
                        o.trace.as_ref().map(|t| Box::new(t.context().clone()))
                    });
                    let acquired = self
                        .acquire(
                            &route,
                            hold_until,
                            watched,
                            routed.req.headers(),
                            parked_since,
                            trace.as_deref(),
                        )
                        .await;
                    if let Some(observed) = done.observed.as_mut() {
                        match &acquired {
                            Ok(Acquired {
                                waited: Some(waited),
                                ..
                            }) => {
                                observed.cold_wait = Some(*waited);
                                observed.hold_ended("released");
                            }
                            Err(
                                ProxyError::ReadinessTimeout { .. }
                                | ProxyError::CapacityTimeout { .. },
                            ) if route.failover.is_some() => observed.hold_ended("failed_over"),
                            Err(
                                ProxyError::ReadinessTimeout { .. }
                                | ProxyError::CapacityTimeout { .. },
                            ) => observed.hold_ended("timed_out"),
                            Err(ProxyError::ClientGone { .. }) => {
                                observed.hold_ended("client_gone")
                            }
                            // Served at once, or answered without holding.
                            _ => observed.holding = None,
                        }
                    }
                    match acquired {
                        Err(
                            ProxyError::ReadinessTimeout { .. }
                            | ProxyError::CapacityTimeout { .. },
                        ) if route.failover.is_some() => {
                            // Waited long enough: the failover target answers instead of a 504.
                            let picked = route
                                .failover
                                .as_ref()
                                .and_then(|(ready, _)| route.load.pick(&ready.borrow(), None));
                            let Some((endpoint, _)) = picked else {
                                return Err(ProxyError::ReadinessTimeout {
                                    route: route.spec.id.clone(),
                                    target: route.spec.target.clone(),
                                    waited: round_to_ms(done.start.elapsed()),
                                });
                            };
                            failed_over = true;
                            self.metrics.failover(&route.spec.id);
                            tracing::info!(endpoint = %endpoint, "failing over after the cold-start timeout");
                            Acquired {
                                endpoint,
                                first: None,
                                lease: None,
                                waited: None,
                            }
                        }
                        other => other?,
                    }
                };
                // Taken apart: only the endpoint is kept across the send.
                let Acquired {
                    endpoint,
                    first,
                    lease,
                    waited,
                } = acquired;
                done._lease = lease;
                if first.is_some() {
                    done.first_out = first;
                }
                let cold = waited.is_some() || failed_over;
                done.cold = cold;
                if let Some(waited) = waited {
                    // The endpoint was only just reported ready: let connects retry until the deadline.
                    self.fresh
                        .mark(endpoint.authority().as_str(), deadline, &route.endpoints);
                    self.metrics.cold_start(&route.spec.id, waited);
                    tracing::debug!(endpoint = %endpoint, waited_ms = waited.as_millis() as u64, "released held request");
                }
                (endpoint, cold, failed_over, was_pinned)
            };

            let tls = route.spec.upstream_tls.is_some() && !failed_over;
            let trusted = self.is_trusted(client);
            let forwarded_https = session.is_some()
                && routed
                    .req
                    .headers()
                    .get("x-forwarded-proto")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let upstream = match (route.spec.protocol, failed_over) {
                // HTTP/2: the URI carries the routed authority, so the client is the endpoint's.
                (UpstreamProtocol::H2c, false) => Upstream::Legacy(
                    self.h2_client_for(route.spec.upstream_tls.as_ref(), &endpoint),
                ),
                // The failover target is a different service: it is spoken to in the route's
                // protocol, without TLS.
                (UpstreamProtocol::H2c, true) => {
                    Upstream::Legacy(self.h2_client_for(None, &endpoint))
                }
                (UpstreamProtocol::Http1, true) => {
                    let mut clients = self
                        .clients
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    Upstream::Legacy(self.client_for(&mut clients, route.spec.protocol, None))
                }
                // Upgrades need hyper-util's client, which hands the upgraded connection over.
                (UpstreamProtocol::Http1, false) if upgrade.is_some() || tls => {
                    Upstream::Legacy(route.client.clone())
                }
                (UpstreamProtocol::Http1, false) => Upstream::Http1(&route.http1, &self.connector),
            };
            // A request neither held nor parked is sent microseconds after it arrived: the time
            // read then stands for now, where only the order of a second matters (the pool's
            // idle timeout, the response-header timer), which spares a clock read for each.
            let arrived = (!cold && done.parked_since.is_none()).then_some(done.start);
            // An HTTP/1 request is polled in its connection's task, whose watchdog can keep its
            // response-header deadline (see `ClientConn::header_timer`).
            let http1 = routed.req.version() < http::Version::HTTP_2;
            // The request is rewritten and handed to its first send in a block of its own, so that
            // the request future does not keep the rewritten request beside the send holding it.
            let (attempt, body_watch, replay, upstream_span) = {
                // Out of its box, which goes at once rather than at the end of the request.
                let Routed { req, authority } = {
                    let boxed = routed;
                    *boxed
                };
                let (mut req, body_watch) = upstream_request(
                    req,
                    authority,
                    &endpoint,
                    client,
                    trusted,
                    route.spec.protocol,
                    match upstream {
                        Upstream::Http1(..) => UriForm::Client,
                        Upstream::Legacy(_) => UriForm::Absolute { tls },
                    },
                    self.settings.min_body_rate,
                );
                if let (Some(upgrade), UpstreamProtocol::Http1) = (&upgrade, route.spec.protocol) {
                    headers::set_upgrade(req.headers_mut(), upgrade.protocol.clone());
                }
                // The upstream's `traceparent` names the interceptor's client span.
                let upstream_span = done.observed.as_mut().and_then(|o| {
                    o.upstream = Some(endpoint.clone());
                    // Boxed: the request future keeps it across the send, and is laid out for it.
                    o.trace.as_ref().map(|t| {
                        let method = req.method().clone();
                        Box::new(t.upstream(&method, &endpoint, req.headers_mut()))
                    })
                });
                // A request without a body and with an idempotent method is sent once more, on
                // another connection, if the upstream closed the connection before any
                // response: an upstream that closes idle keep-alive connections (Node's 5 s
                // default) races the pool reusing them, and one at its connection limit closes
                // new ones unanswered; either way the request never reached the app. nginx does
                // the same (`proxy_next_upstream error`). Go's transport sends again only what
                // went out on a reused connection, which loses the second case: a burst of
                // 10,000 released at once lost 144 that way under emulation.
                // A route's own pool keeps what it needs for this itself (see `Http1Pool::send`).
                let replay = (matches!(upstream, Upstream::Legacy(_))
                    && upgrade.is_none()
                    && http_body::Body::is_end_stream(req.body())
                    && idempotent(req.method()))
                .then(|| Replay::of(&req));
                (
                    upstream.send(&endpoint, req, arrived),
                    body_watch,
                    replay,
                    upstream_span,
                )
            };
            // The response-header timeout starts once the request body is sent in full, so a slow
            // upload to a healthy upstream is not cut (as in the add-on and Go's
            // ResponseHeaderTimeout). A client too slow to send is bounded by the body's minimum
            // rate instead.
            // A request without a body that was neither held nor parked is sent microseconds
            // after it arrived: its timer starts from its arrival, read already.
            let sent_at = arrived.filter(|_| body_watch.is_none());
            let mut header_timer = client.header_timer(http1);
            let header_timeout = async {
                if let Some(watch) = &body_watch {
                    // Boxed: only a request with a body waits here, and the request future
                    // would otherwise keep room for the wait in every request.
                    Box::pin(watch.sent()).await;
                }
                let sent_at = sent_at.unwrap_or_else(Instant::now);
                header_timer
                    .expire_at(sent_at + route.response_header_timeout)
                    .await;
            };
            // The send and the timer are polled where they are, in this function's state: an
            // async block around them would hold its captures and their copies in the select. A
            // replay takes the first send's place.
            let sent = {
                tokio::pin!(attempt);
                tokio::pin!(header_timeout);
                let mut replay = replay;
                let mut first_failure: Option<SendError> = None;
                loop {
                    let result = tokio::select! {
                        // The send first: it is what a poll is usually for, and a response ready
                        // by then is taken without looking at the timer.
                        biased;
                        rsp = &mut attempt => Some(rsp),
                        () = &mut header_timeout => None,
                    };
                    let Some(result) = result else {
                        break Err(());
                    };
                    match (result, first_failure.take()) {
                        // The upstream is gone (it closed because it exited): the first failure
                        // is the one to report.
                        (Err(SendError::Connect(_)), Some(first)) => break Ok(Err(first)),
                        (Err(err), None) if err.closed_before_response() => {
                            // The pool's failure carries the request to send again.
                            let (err, again) = err.take_again();
                            match again.or_else(|| replay.take().and_then(|r| r.request())) {
                                Some(again) => {
                                    tracing::debug!(error = ?err, "upstream closed the connection before answering; sending again");
                                    attempt.set(upstream.send(&endpoint, again, None));
                                    first_failure = Some(err);
                                }
                                None => break Ok(Err(err)),
                            }
                        }
                        (other, _) => break Ok(other),
                    }
                }
            };
            // The response head (or why there is none) is here: the rest of the backlog may go.
            done.first_out = None;
            if cold
                && matches!(sent, Ok(Ok(_)))
                && route.awaiting_first_byte.swap(false, Ordering::Relaxed)
            {
                self.wakes
                    .publish_served(&route.spec.id, &route.spec.target);
            }
            if let Some(span) = upstream_span {
                observe::upstream_ended(
                    span,
                    match &sent {
                        Ok(Ok((rsp, _))) => Ok(rsp.status()),
                        Ok(Err(SendError::Connect(_))) => Err("connect"),
                        Ok(Err(SendError::Exchange(_) | SendError::Unanswered(..))) => {
                            Err("exchange")
                        }
                        Err(()) => Err("response_header_timeout"),
                    },
                );
            }
            if let Some(fault) = body_watch.as_ref().and_then(|w| w.fault()) {
                // Whatever the upstream client made of it, the client broke the exchange.
                if sent.as_ref().map_or(true, |rsp| rsp.is_err()) {
                    return Err(ProxyError::ClientBody {
                        route: route.spec.id.clone(),
                        fault,
                    });
                }
            }
            let (mut rsp, conn) = match sent {
                Ok(Ok(sent)) => sent,
                Ok(Err(SendError::Connect(source))) => {
                    if let Some(tls) = error::tls_failure(&*source) {
                        return Err(ProxyError::UpstreamTls {
                            route: route.spec.id.clone(),
                            endpoint: endpoint.to_string(),
                            reason: tls.to_string(),
                        });
                    }
                    return Err(ProxyError::UpstreamConnect {
                        route: route.spec.id.clone(),
                        endpoint: endpoint.to_string(),
                        source,
                    });
                }
                Ok(Err(SendError::Exchange(source) | SendError::Unanswered(source, _))) => {
                    return Err(ProxyError::Upstream {
                        route: route.spec.id.clone(),
                        endpoint: endpoint.to_string(),
                        source,
                    })
                }
                Err(_elapsed) => {
                    return Err(ProxyError::ResponseHeaderTimeout {
                        route: route.spec.id.clone(),
                        endpoint: endpoint.to_string(),
                        timeout: route.response_header_timeout,
                    })
                }
            };
            let mut tunnel = None;
            if let (StatusCode::SWITCHING_PROTOCOLS, Some(upgrade)) = (rsp.status(), upgrade) {
                let Upgrading { protocol, client } = *upgrade;
                let protocol = rsp
                    .headers()
                    .get(header::UPGRADE)
                    .cloned()
                    .unwrap_or(protocol);
                tunnel = Some(Tunnel {
                    client,
                    upstream: hyper::upgrade::on(&mut rsp),
                });
                headers::strip_hop_by_hop(rsp.headers_mut());
                headers::set_upgrade(rsp.headers_mut(), protocol);
            } else {
                headers::strip_hop_by_hop(rsp.headers_mut());
            }
            if let Some(asked) = keep_awake::take(rsp.headers_mut()) {
                // The failover target is another service: it cannot keep this route's target up.
                if !failed_over {
                    keep_awake::record(&route.spec, &route.load, &endpoint, asked);
                }
            }
            rsp.headers_mut().insert(
                COLD_START_NAME,
                HeaderValue::from_static(if cold { "true" } else { "false" }),
            );
            if let (Some(s), false, false) = (session, was_pinned, failed_over) {
                // A new (or replaced) session: the endpoint this request went to.
                let https = client.is_tls() || (trusted && forwarded_https);
                if let Ok(cookie) = HeaderValue::try_from(session_cookie(s, &endpoint, https)) {
                    rsp.headers_mut().append(header::SET_COOKIE, cookie);
                }
            }
            if failed_over {
                rsp.headers_mut()
                    .insert(FAILOVER_HEADER, HeaderValue::from_static("true"));
            }
            Ok((rsp, tunnel, conn))
        }
    }
}

impl RouteState {
    /// The first static route matching the request: its answer, and whether it is `Always`.
    fn static_for(
        &self,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<(&crate::provider::ColdResponse, bool)> {
        self.statics
            .iter()
            .find(|(table, _, _)| table.lookup(host, path, headers).is_some())
            .map(|(_, response, always)| (&**response, *always))
    }

    /// The answer a request gets at once while the target is cold, if the route has one.
    fn cold_response_for(&self, wants_html: bool) -> Option<&crate::provider::ColdResponse> {
        use crate::provider::ColdResponse;
        match self.spec.cold_response.as_ref()? {
            page @ ColdResponse::WaitingPage { .. } if wants_html => Some(page),
            ColdResponse::WaitingPage { .. } => None,
            placeholder @ ColdResponse::Placeholder { .. } => Some(placeholder),
        }
    }
}

/// What forwarding a request ends with: the upstream's response, the tunnel if it switched
/// protocols, and the route pool's connection if the response body drives it.
type Forwarded = (Response<Incoming>, Option<Tunnel>, Option<Http1Conn>);

/// A request asking to upgrade its connection: the protocol it names, and the client side of
/// the upgrade.
struct Upgrading {
    protocol: HeaderValue,
    client: hyper::upgrade::OnUpgrade,
}

/// An upgraded connection (WebSocket or another HTTP/1.1 upgrade) being passed through.
struct Tunnel {
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
}

impl Tunnel {
    /// Copies bytes both ways until either side closes; the request counts as in flight until
    /// then, because `done` lives here.
    async fn run(self, done: Completion) {
        let (client, upstream) = tokio::join!(self.client, self.upstream);
        match (client, upstream) {
            (Ok(client), Ok(upstream)) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((up, down)) => {
                        tracing::debug!(route = %done.route.spec.id, up, down, "upgraded connection closed")
                    }
                    Err(err) => {
                        tracing::debug!(route = %done.route.spec.id, error = %err, "upgraded connection ended")
                    }
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::debug!(route = %done.route.spec.id, error = %err, "upgrade did not complete");
            }
        }
        drop(done);
    }
}

/// Requests refused before routing, so nothing of them is forwarded: tunnels, and transfer
/// codings other than plain `chunked` (`identity, chunked` included: a proxy that reads the
/// list differently would frame the body differently). (Conflicting lengths never get here:
/// hyper rejects them, and for Content-Length with Transfer-Encoding it drops the length,
/// frames by chunked and closes the connection after the response, as RFC 9112 requires, so
/// nothing can be smuggled behind the body.)
fn refuse<B>(req: &Request<B>, framing: &Framing<'_>) -> Option<ProxyError> {
    if req.method() == Method::CONNECT {
        return Some(ProxyError::MethodNotAllowed {
            method: Method::CONNECT,
        });
    }
    if let Some(first) = framing.transfer_encoding {
        let plain_chunked = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !plain_chunked || framing.more_transfer_encodings {
            return Some(ProxyError::BadRequest {
                reason: "Transfer-Encoding must be exactly \"chunked\"",
            });
        }
    }
    None
}

/// The fields [`refuse`] and [`routed_authority`] read: the first Host and Transfer-Encoding
/// lines, and whether either comes again. Found in one pass over the fields (a request has a
/// few), which costs less than a hashed lookup for each.
#[derive(Default)]
struct Framing<'a> {
    host: Option<&'a HeaderValue>,
    more_hosts: bool,
    transfer_encoding: Option<&'a HeaderValue>,
    more_transfer_encodings: bool,
}

impl<'a> Framing<'a> {
    fn of(headers: &'a http::HeaderMap) -> Self {
        let mut framing = Self::default();
        for (name, value) in headers {
            let (first, more) = if name == header::HOST {
                (&mut framing.host, &mut framing.more_hosts)
            } else if name == header::TRANSFER_ENCODING {
                (
                    &mut framing.transfer_encoding,
                    &mut framing.more_transfer_encodings,
                )
            } else {
                continue;
            };
            if first.is_some() {
                *more = true;
            } else {
                *first = Some(value);
            }
        }
        framing
    }
}

/// The authority a request was routed by, which is also the one forwarded (Host, HTTP/2's
/// `:authority`, `X-Forwarded-Host`): a front proxy that authorised the request by it sees the
/// upstream get the same one.
#[derive(Clone, Debug)]
struct RoutedAuthority {
    value: Option<HeaderValue>,
    /// The value is the request's one Host header, so the upstream request has it already.
    from_host: bool,
}

impl RoutedAuthority {
    fn as_str(&self) -> &str {
        self.value
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// The authority a request names, by RFC 9112 section 3.2: the target's in absolute form (the
/// Host header is then ignored), HTTP/2's `:authority`, or else the one Host header.
/// HTTP/1.1 needs exactly one Host header; HTTP/2 needs one of the two, and they must agree.
fn routed_authority<B>(
    req: &Request<B>,
    framing: &Framing<'_>,
) -> Result<RoutedAuthority, ProxyError> {
    let bad = |reason| Err(ProxyError::BadRequest { reason });
    if framing.more_hosts {
        return bad("more than one Host header");
    }
    let host = match framing.host {
        Some(value) if valid_host(value.as_bytes()) => Some(value),
        Some(_) => return bad("the Host header is not a valid host[:port]"),
        None => None,
    };
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return bad("the request target carries userinfo");
        }
        if req.version() == Version::HTTP_2 {
            if let Some(host) = host {
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
                {
                    return bad("the Host header disagrees with :authority");
                }
            }
        }
        return Ok(RoutedAuthority {
            value: HeaderValue::from_str(authority.as_str()).ok(),
            from_host: false,
        });
    }
    match (host, req.version()) {
        (Some(host), _) => Ok(RoutedAuthority {
            value: Some(host.clone()),
            from_host: true,
        }),
        (None, Version::HTTP_09 | Version::HTTP_10) => Ok(RoutedAuthority {
            value: None,
            from_host: false,
        }),
        (None, Version::HTTP_2 | Version::HTTP_3) => bad("no :authority and no Host header"),
        (None, _) => bad("no Host header"),
    }
}

/// Whether a Host header's value is a valid `host[:port]`, without userinfo.
///
/// It is parsed as an [`http::uri::Authority`], which copies a valid value into an allocation
/// of its own, only to drop it here. Nearly every request names the host the one before it on
/// the same thread named, so the last valid value is remembered per thread (up to 255 bytes)
/// and a request naming it again is not parsed a second time: the check is a function of the
/// bytes alone.
fn valid_host(host: &[u8]) -> bool {
    const REMEMBERED: usize = 255;
    thread_local! {
        static LAST_VALID: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let seen = LAST_VALID.with_borrow(|last| !last.is_empty() && last.as_slice() == host);
    if seen {
        return true;
    }
    let valid = std::str::from_utf8(host)
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .is_some_and(|authority| !authority.as_str().contains('@'));
    if valid && host.len() <= REMEMBERED {
        LAST_VALID.with_borrow_mut(|last| {
            last.clear();
            last.extend_from_slice(host);
        });
    }
    valid
}

/// A request and the authority it was routed by, boxed together until the request is rewritten
/// for the upstream: a future keeps room for what it captured for its whole life, so each would
/// otherwise stay in the request future long after it was sent.
struct Routed {
    req: Request<Incoming>,
    authority: RoutedAuthority,
}

/// A request routed and counted, on its way to [`Proxy::forward`].
struct Begun {
    req: Box<Routed>,
    done: Completion,
    /// The request path, kept when a static route's or the placeholder's body may be named by it.
    path: Option<String>,
    span: tracing::Span,
}

/// A request's bookkeeping, ended when the response body ends or is dropped: the in-flight
/// count, the per-endpoint lease, and the request metrics.
pub struct Completion {
    /// The request's spans and access-log fields, when traces or the access log are on.
    observed: Option<Box<Observed>>,
    proxy: Arc<Proxy>,
    route: Arc<RouteState>,
    method: Method,
    code: StatusCode,
    start: Instant,
    /// `None` for a request a static route lets through: it is not counted.
    in_flight: Option<InFlight>,
    _lease: Option<EndpointLease>,
    /// A static route's answer, for a request it let through uncounted: if no endpoint is
    /// ready after all, this is the answer instead of holding (which would count and wake).
    uncounted: Option<Box<crate::provider::ColdResponse>>,
    /// The request waited for a cold start (or failed over after one).
    cold: bool,
    /// It has been accounted for (see [`Completion::end_at`]).
    ended: bool,
    /// When the request began to wait, if it was parked before hyper served it.
    parked_since: Option<Instant>,
    /// A parked request's place among those released at once, given back when it ends.
    _released: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Held by the first request released after a cold start until its response head arrives.
    first_out: Option<hold::FirstOut>,
}

impl Completion {
    fn body_failed(&self) {
        self.proxy
            .metrics
            .upstream_error(&self.route.spec.id, "response_body");
    }

    fn cut_by_request_timeout(self) {
        tracing::warn!(
            route = %self.route.spec.id,
            timeout = ?self.route.request_timeout,
            "request timeout passed mid-response: the response was cut"
        );
    }
}

impl Completion {
    /// Accounts for the request as ended at `now`: its duration and its route's last
    /// activity, from one clock read. Once only: dropping it after does nothing more.
    fn end_at(&mut self, now: Instant) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let elapsed = now.saturating_duration_since(self.start);
        self.route
            .metrics
            .request(&self.method, self.code, elapsed, self.cold);
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.end_at(now.into_std());
        }
        if let Some(observed) = self.observed.take() {
            observed.finish(
                self.proxy.settings.access_log.as_ref(),
                &self.route.spec.id,
                &self.method,
                self.code,
                elapsed,
                self.cold,
            );
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.ended {
            self.end_at(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, read off its type: no request is made.
    fn returned_size<A, B, C, R>(_: fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A request in flight holds its future for as long as the upstream takes, and each one
    /// is written into the room hyper keeps for it: its size is memory per request and a copy
    /// per request. It was 5.3 KiB while `handle` and `forward` were async fns (each argument
    /// held twice) and the send and its replay were laid out side by side, and 2.9 KiB while
    /// the pool's send kept its request beside hyper's, hyper-util's client was held by value
    /// and every request had room for a hold, and 1.5 KiB with room for a request timeout's
    /// timer and a request body's wait, and 1.3 KiB while the routing before the forward kept
    /// its locals in it. Keep it down.
    #[test]
    fn a_request_future_stays_small() {
        let size = returned_size(Proxy::handle);
        println!("Proxy::handle's future: {size} bytes");
        // 976 bytes in the test profile when this bound was set.
        assert!(size <= 1152, "Proxy::handle's future grew to {size} bytes");
    }

    /// The host remembered as valid never changes an answer: each value is judged on its
    /// bytes, whatever came before it on the thread.
    #[test]
    fn a_remembered_host_changes_no_answer() {
        let valid: &[&[u8]] = &[b"app.test", b"app.test:8080", b"[::1]:80", b"10.0.0.7"];
        let invalid: &[&[u8]] = &[
            b"",
            b"user@app.test",
            b"app test",
            b"app.test/path",
            b"app.test:80:80",
            b"caf\xc3\xa9.test",
            b"app.test\t",
        ];
        let long_name = format!("{}.test", "a".repeat(300));
        // Each in turn after each other one, the remembered value being the last valid one.
        for _ in 0..2 {
            for first in valid.iter().chain(invalid) {
                for second in valid.iter().chain(invalid) {
                    valid_host(first);
                    assert_eq!(
                        valid_host(second),
                        valid.contains(second),
                        "{second:?} after {first:?}"
                    );
                    assert_eq!(
                        valid_host(second),
                        valid.contains(second),
                        "{second:?} twice"
                    );
                }
            }
        }
        // Too long to remember, and still valid each time.
        assert!(valid_host(long_name.as_bytes()));
        assert!(valid_host(long_name.as_bytes()));
        assert!(valid_host(b"app.test"));
    }
}
