//! The seam between the proxy core and wherever targets live.
//!
//! The core (routing, counting, holding, forwarding) knows targets only through [`Provider`]:
//! a stream of route sets, a watchable set of ready endpoints per target, and a wake signal.
//! Local mode implements it with child processes; the Kubernetes provider implements it with
//! HTTPScaledObjects and EndpointSlices.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio::sync::watch;

use crate::routing::{HeaderMatch, RouteMatch};
pub use crate::tls::upstream::{Trust, UpstreamTls};

/// A route's identity, `namespace/name` in Kubernetes and the route name in local mode. It keys
/// `/queue` and the metrics.
pub type RouteId = Arc<str>;

/// A target's identity: the thing that wakes and has endpoints.
pub type TargetId = Arc<str>;

/// Everything the core needs to know about one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Unique id of the route.
    pub id: RouteId,
    /// The route's rules, OR'd: hosts AND path prefixes AND headers within each.
    pub rules: Vec<RouteMatch>,
    /// The target requests are forwarded to.
    pub target: TargetId,
    /// How long a request waits for a ready endpoint; `None` uses the global default.
    pub readiness_timeout: Option<Duration>,
    /// How long to wait for the upstream's response headers; `None` uses the global default.
    pub response_header_timeout: Option<Duration>,
    /// The whole-request deadline; `None` uses the global one, zero turns it off.
    pub request_timeout: Option<Duration>,
    /// Optional cap on requests in flight per endpoint, spreading a release over endpoints.
    pub max_in_flight_per_endpoint: Option<NonZeroUsize>,
    /// Optional cap on requests held at once for this route; past it, 503 (or the cold
    /// response, with `cold_response_on_overflow`).
    pub max_held: Option<NonZeroUsize>,
    /// The cold response answers only requests past `max_held`; the rest are held (an
    /// InterceptorRoute's `overflow: Placeholder`).
    pub cold_response_on_overflow: bool,
    /// Where a held request goes once it has waited too long, instead of a 504.
    pub failover: Option<FailoverSpec>,
    /// What a request for a cold target gets instead of being held, if anything.
    pub cold_response: Option<ColdResponse>,
    /// Requests the interceptor answers itself (an InterceptorRoute's `staticRoutes`), first
    /// match wins; they are never counted and never wake the target.
    pub static_routes: Vec<StaticRoute>,
    /// Cookie affinity to one endpoint (an InterceptorRoute's `sessionPersistence`).
    pub session: Option<SessionAffinity>,
    /// The protocol spoken to the target.
    pub protocol: UpstreamProtocol,
    /// Whether, and how, the target is reached over TLS.
    pub upstream_tls: Option<UpstreamTls>,
    /// The longest a backend's `Wakegate-Keep-Awake` header may keep the target up; zero
    /// ignores the header.
    pub keep_awake_max: Duration,
}

/// The protocol spoken to a target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (upgrades pass through).
    #[default]
    Http1,
    /// HTTP/2: with prior knowledge in cleartext (gRPC backends), or negotiated by ALPN when
    /// the route has upstream TLS.
    H2c,
}

/// An answer given at once while the target wakes, instead of holding the request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per route, built with the route table
pub enum ColdResponse {
    /// Browsers (Accept includes text/html) get a small page that refreshes itself every
    /// `refresh`; other clients are still held.
    WaitingPage {
        /// Seconds between refreshes (also the Retry-After).
        refresh: u32,
    },
    /// Every request gets this response.
    Placeholder {
        /// Status code.
        status: http::StatusCode,
        /// Content type.
        content_type: http::HeaderValue,
        /// Body.
        body: bytes::Bytes,
        /// More headers (one named Content-Type replaces `content_type`).
        headers: http::HeaderMap,
        /// The body comes from a labelled ConfigMap instead, looked up per request.
        config_map: Option<ConfigMapBody>,
    },
}

/// A response body kept in a ConfigMap (`bodyFromConfigMap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapBody {
    /// The route's namespace.
    pub namespace: Arc<str>,
    /// The ConfigMap.
    pub name: Arc<str>,
    /// The key; `None` takes it from the request path (`/` is `index.html`).
    pub key: Option<Arc<str>>,
}

/// What a ConfigMap lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigMapValue {
    /// No such (labelled) ConfigMap.
    NoConfigMap,
    /// The ConfigMap has no such key.
    NoKey,
    /// The value.
    Value(bytes::Bytes),
}

/// Cookie affinity: a client's requests go to the endpoint its cookie names while that
/// endpoint is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionAffinity {
    /// The cookie's name.
    pub cookie: Arc<str>,
    /// How long after it was issued a cookie is honoured; `None`: as long as its endpoint.
    pub absolute_timeout: Option<Duration>,
}

impl SessionAffinity {
    /// The add-on's default cookie name for route `namespace/name`: `keda-session-` and the
    /// first 4 bytes of its SHA-256 in hex, so routes sharing a host do not clash.
    pub fn default_cookie(route: &str) -> String {
        format!(
            "keda-session-{}",
            hex(&sha256(route.as_bytes()).as_ref()[..4])
        )
    }
}

/// The opaque id an endpoint has in session cookies: 8 bytes of the SHA-256 of its address, in
/// hex. The same on every interceptor replica, and it reveals no address.
pub fn session_id(endpoint: &Endpoint) -> String {
    hex(&sha256(endpoint.authority().as_str().as_bytes()).as_ref()[..8])
}

fn sha256(data: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, data)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A request the route answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRoute {
    /// Rules, OR'd, checked against requests that matched the route.
    pub rules: Vec<RouteMatch>,
    /// The answer (a [`ColdResponse::Placeholder`]).
    pub response: ColdResponse,
    /// Answer even while the target has ready endpoints (`responseMode: Always`); otherwise
    /// only while it has none, and forward (uncounted) when it has.
    pub always: bool,
}

/// A failover destination: another target, used after a request has been held `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverSpec {
    /// The failover target (its endpoints come from the provider like any target's).
    pub target: TargetId,
    /// How long a request waits for the route's own target first; `None` is the route's
    /// readiness timeout.
    pub after: Option<Duration>,
}

/// One address a request can be forwarded to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    authority: Authority,
}

impl Endpoint {
    /// An endpoint at `authority` (`host:port`).
    pub fn new(authority: Authority) -> Self {
        Self { authority }
    }

    /// The `host:port` requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.authority.fmt(f)
    }
}

/// The endpoints of a target that can take requests now. Cheap to clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadyEndpoints(Arc<[Endpoint]>);

impl ReadyEndpoints {
    /// No endpoint is ready: requests are held.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether any endpoint is ready.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ready endpoints.
    pub fn as_slice(&self) -> &[Endpoint] {
        &self.0
    }
}

impl FromIterator<Endpoint> for ReadyEndpoints {
    fn from_iter<I: IntoIterator<Item = Endpoint>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Where routes and targets come from.
pub trait Provider: Send + Sync + 'static {
    /// The full route set; `None` until the provider has loaded it for the first time. Each new
    /// value replaces the previous set whole.
    fn routes(&self) -> watch::Receiver<Option<Arc<[RouteSpec]>>>;

    /// The ready endpoints of `target`. An unknown target yields a set that stays empty.
    fn endpoints(&self, target: &TargetId) -> watch::Receiver<ReadyEndpoints>;

    /// Raises the wake signal: a request for `target` is being held. Called for every held
    /// request; providers deduplicate.
    fn wake(&self, target: &TargetId);

    /// A value of a ConfigMap labelled `http.keda.sh/response-body: "true"`, for static
    /// response bodies. Providers without ConfigMaps find none.
    fn config_map_value(&self, namespace: &str, name: &str, key: &str) -> ConfigMapValue {
        let _ = (namespace, name, key);
        ConfigMapValue::NoConfigMap
    }

    /// A JSON description of the targets' state, for the admin `/status` endpoint.
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The core's form of a route's rules (validated, so `None` is unreachable in practice).
pub(crate) fn rule_matchers(rules: &[wakegate_crds::Rule]) -> Option<Vec<RouteMatch>> {
    rules
        .iter()
        .map(|rule| {
            let headers = rule
                .headers
                .iter()
                .map(|h| {
                    Some(HeaderMatch {
                        name: http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        value: match &h.value {
                            Some(v) => Some(http::HeaderValue::from_str(v).ok()?),
                            None => None,
                        },
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(RouteMatch {
                hosts: rule.hosts.clone(),
                path_prefixes: rule.paths.clone(),
                headers,
            })
        })
        .collect()
}

/// The core's form of an InterceptorRoute's static response (a placeholder or a static route's),
/// in `namespace`, where its body's ConfigMap lives.
pub(crate) fn static_response(
    r: &wakegate_crds::Response,
    namespace: &str,
) -> Option<ColdResponse> {
    let mut headers = http::HeaderMap::new();
    for (name, value) in &r.headers {
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).ok()?,
            http::HeaderValue::from_str(value).ok()?,
        );
    }
    Some(ColdResponse::Placeholder {
        status: http::StatusCode::from_u16(r.status).ok()?,
        content_type: http::HeaderValue::from_static("text/plain; charset=utf-8"),
        body: match &r.body {
            wakegate_crds::ResponseBody::Inline(text) => bytes::Bytes::from(text.clone()),
            wakegate_crds::ResponseBody::ConfigMap { .. } => bytes::Bytes::new(),
        },
        headers,
        config_map: match &r.body {
            wakegate_crds::ResponseBody::Inline(_) => None,
            wakegate_crds::ResponseBody::ConfigMap { name, key } => Some(ConfigMapBody {
                namespace: namespace.into(),
                name: name.as_str().into(),
                key: key.as_deref().map(Arc::from),
            }),
        },
    })
}

/// A receiver whose set stays empty forever, for targets a provider does not know.
pub fn never_ready() -> watch::Receiver<ReadyEndpoints> {
    watch::channel(ReadyEndpoints::none()).1
}
