//! The `InterceptorRoute` custom resource (`http.keda.sh/v1beta1`), the KEDA HTTP Add-on's
//! current API, field for field: routing rules, the scaling metric, static routes, the cold-start
//! behaviour, timeouts and session persistence. It names no workload: the user's own KEDA
//! ScaledObject (trigger metadata `interceptorRoute: <name>`) scales it, or, without KEDA,
//! Wakegate's `wakegate.dev/scale-target-ref` annotations do (see [`crate::options`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Routes HTTP traffic matching its rules to a Service, and reports the traffic as a scaling
/// metric.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "http.keda.sh",
    version = "v1beta1",
    kind = "InterceptorRoute",
    plural = "interceptorroutes",
    namespaced,
    status = "InterceptorRouteStatus",
    printcolumn = r#"{"name":"TargetService","type":"string","jsonPath":".spec.target.service"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InterceptorRouteSpec {
    /// The Service requests are forwarded to.
    pub target: TargetRef,
    /// Routing rules, OR'd: a request matching any rule belongs to the route. Omitted: every
    /// request (a catch-all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub rules: Vec<RoutingRule>,
    /// What the route reports for scaling: concurrency, request rate, or both.
    pub scaling_metric: ScalingMetricSpec,
    /// Requests answered by the interceptor itself, never counted and never waking the target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_routes: Vec<StaticRoute>,
    /// What a request gets while the target is cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStartSpec>,
    /// Per-route timeouts; unset means the interceptor's default, `0s` disables one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    /// Keeps a client on one pod with a cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<SessionPersistence>,
}

/// A Service and one of its ports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.port) != has(self.portName)").message("set exactly one of port and portName"))]
pub struct TargetRef {
    /// The Service, in the route's namespace.
    #[schemars(length(min = 1))]
    pub service: String,
    /// The Service port to send traffic to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// The Service port, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

/// One routing rule: host AND path AND headers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RoutingRule {
    /// Hosts: exact names, `*.suffix` wildcards, or `*`. Empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub hosts: Vec<String>,
    /// Path prefixes, matched on whole segments; the longest wins. Empty means any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    /// Headers that must all match; a header without a value only has to be present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub headers: Vec<RuleHeader>,
}

/// A path prefix.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PathMatch {
    /// The prefix, e.g. `/api`.
    #[schemars(length(min = 1))]
    pub value: String,
}

/// A header matcher.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RuleHeader {
    /// Header name (case-insensitive).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Exact value to match; absent means the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// The scaling metric: at least one of the two. With both, both are reported and the larger
/// replica demand wins.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.concurrency) || has(self.requestRate)").message("set at least one of concurrency and requestRate"))]
pub struct ScalingMetricSpec {
    /// Scale on requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyTarget>,
    /// Scale on requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<RequestRateTarget>,
}

/// Requests in flight per replica.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyTarget {
    /// Requests in flight per replica.
    #[schemars(range(min = 1))]
    pub target_value: i32,
}

/// Requests per second per replica, averaged over `window` in buckets of `granularity`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRateTarget {
    /// Requests per second per replica.
    #[schemars(range(min = 1))]
    pub target_value: i32,
    /// Averaging window, a duration (default `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "1m"))]
    pub window: Option<String>,
    /// Bucket size, a duration (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "1s"))]
    pub granularity: Option<String>,
}

/// Requests the interceptor answers itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticRoute {
    /// Rules, OR'd; at least one.
    #[schemars(length(min = 1))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub rules: Vec<RoutingRule>,
    /// The response.
    pub response: StaticResponse,
    /// `WhenUnavailable` (default): forward while the target has a ready endpoint, answer with
    /// the response otherwise. `Always`: never contact the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "WhenUnavailable"))]
    pub response_mode: Option<ResponseMode>,
}

/// When a static route answers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ResponseMode {
    /// Only while the target has no ready endpoint.
    #[default]
    WhenUnavailable,
    /// Always.
    Always,
}

/// A response the interceptor serves itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.body) && has(self.bodyFromConfigMap))").message("set at most one of body and bodyFromConfigMap"))]
pub struct StaticResponse {
    /// Status code (default 503 for a placeholder, 200 for a static route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub status_code: Option<i32>,
    /// The body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub body: Option<String>,
    /// The body, from a ConfigMap in the route's namespace labelled
    /// `http.keda.sh/response-body: "true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_from_config_map: Option<BodyFromConfigMap>,
    /// Response headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A body kept in a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BodyFromConfigMap {
    /// The ConfigMap's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key; omitted, the key is the request path without its leading `/` (`index.html` for
    /// `/`), and the content type follows the key's extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Cold-start behaviour: at least one of fallback, placeholder and maxPendingRequests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fallback) || has(self.placeholder) || has(self.maxPendingRequests)").message("set at least one of fallback, placeholder and maxPendingRequests"))]
#[x_kube(validation = Rule::new("!has(self.overflow) || self.overflow != 'Placeholder' || has(self.placeholder)").message("overflow Placeholder needs a placeholder"))]
pub struct ColdStartSpec {
    /// Where a request goes once it waited `timeouts.readiness` for the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Served at once while the target has no ready endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<Placeholder>,
    /// Most requests held at once for the route, per interceptor replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<i32>,
    /// What a request past `maxPendingRequests` gets: `Reject` (503, the default) or
    /// `Placeholder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Reject"))]
    pub overflow: Option<Overflow>,
}

/// What a request past `maxPendingRequests` gets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Overflow {
    /// 503.
    #[default]
    Reject,
    /// The placeholder.
    Placeholder,
}

/// The fallback Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Fallback {
    /// The Service and port.
    pub service: FallbackService,
}

/// A Service by name and port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.port) != has(self.portName)").message("set exactly one of port and portName"))]
pub struct FallbackService {
    /// The Service, in the route's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Its port, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

/// The placeholder.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Placeholder {
    /// The response.
    pub response: StaticResponse,
}

/// Per-route timeouts, as durations (`20s`, `1m30s`); `0s` disables one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// How long a request waits for the target to have a ready endpoint (30 s with a fallback
    /// and `0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<String>,
    /// The whole request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// From the request fully sent to the response headers; the cold-start wait is not part of
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<String>,
}

/// Cookie affinity to one pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionPersistence {
    /// The kind of persistence; only `Cookie`.
    #[serde(rename = "type")]
    pub kind: SessionKind,
    /// The cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<SessionCookie>,
    /// How long a session lasts from when its cookie was issued; unset, it lasts as long as
    /// its pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_timeout: Option<String>,
}

/// The kind of session persistence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SessionKind {
    /// A cookie.
    #[default]
    Cookie,
}

/// The session cookie.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SessionCookie {
    /// Its name; unset, `keda-session-<8 hex digits of the route's namespace/name hash>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the controller reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterceptorRouteStatus {
    /// Standard conditions; `Ready` says whether the route is in effect, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
