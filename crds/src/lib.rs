//! Wakegate's API types: the KEDA HTTP Add-on's custom resources, field for field, so existing
//! manifests apply unchanged: `HTTPScaledObject` (`http.keda.sh/v1alpha1`, deprecated by the
//! add-on) and `InterceptorRoute` (`http.keda.sh/v1beta1`, its current API).
//!
//! The Rust types are the source of truth: `crdgen` writes the CRD YAML from them, and a test
//! fails when the committed YAML drifts. [`HTTPScaledObject::validate`] turns an object into
//! checked values (defaults applied, durations parsed, `wakegate.dev/*` annotations read) for
//! the interceptor and the controller.

mod duration;
pub mod interceptor_route;
pub mod options;
mod route;
mod validate;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::duration::{parse_go_duration, DurationError};
pub use self::interceptor_route::{InterceptorRoute, InterceptorRouteSpec, InterceptorRouteStatus};
pub use self::options::{ColdStart, RouteOptions};
pub use self::route::{
    ColdStartPolicy, Response, ResponseBody, RouteKind, RouteTimeouts, Rule, ServicePortRef,
    SessionSpec, StaticRouteSpec, ValidRoute, Workload, FALLBACK_READINESS, MAX_STATIC_BODY,
};
pub use self::validate::{
    PortRef, ScalingMetric, SpecError, DEFAULT_MAX_REPLICAS, DEFAULT_SCALEDOWN_PERIOD_SECONDS,
    DEFAULT_TARGET_VALUE,
};

/// The API group.
pub const GROUP: &str = "http.keda.sh";
/// The finalizer the controller puts on every HTTPScaledObject.
pub const FINALIZER: &str = "httpscaledobject.http.keda.sh";
/// Annotation: do not create a ScaledObject (and delete an owned one).
pub const SKIP_SCALEDOBJECT_ANNOTATION: &str =
    "httpscaledobject.keda.sh/skip-scaledobject-creation";
/// Annotation: drop the ScaledObject's owner reference, so it outlives the HTTPScaledObject.
pub const ORPHAN_SCALEDOBJECT_ANNOTATION: &str = "httpscaledobject.keda.sh/orphan-scaledobject";

/// Routes HTTP traffic for some hosts and paths to a workload that scales with it, down to zero.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "http.keda.sh",
    version = "v1alpha1",
    kind = "HTTPScaledObject",
    plural = "httpscaledobjects",
    shortname = "httpso",
    namespaced,
    status = "HTTPScaledObjectStatus",
    printcolumn = r#"{"name":"TargetWorkload","type":"string","jsonPath":".status.targetWorkload"}"#,
    printcolumn = r#"{"name":"TargetService","type":"string","jsonPath":".status.targetService"}"#,
    printcolumn = r#"{"name":"MinReplicas","type":"integer","jsonPath":".spec.replicas.min"}"#,
    printcolumn = r#"{"name":"MaxReplicas","type":"integer","jsonPath":".spec.replicas.max"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPScaledObjectSpec {
    /// Hosts to route: exact names, `*.suffix` wildcards, or `*`. Empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Path prefixes to route, matched on whole segments; the longest wins. Empty means `/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    /// Headers that must all match; a header without a value only has to be present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// The workload to scale and the Service in front of it.
    pub scale_target_ref: ScaleTargetRef,
    /// Where to send a request that waited too long for the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_timeout_failover_ref: Option<ColdStartTimeoutFailoverRef>,
    /// Replica bounds; defaults 0 and 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaBounds>,
    /// Deprecated: use `scalingMetric`. Target pending requests per replica (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pending_requests: Option<i32>,
    /// Seconds without traffic before scaling to zero (KEDA's cooldownPeriod; default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaledown_period: Option<i32>,
    /// Seconds after creation before the workload may be scaled in (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_cooldown_period: Option<i32>,
    /// What the replica count follows: concurrency (default) or request rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_metric: Option<ScalingMetricSpec>,
    /// Per-route overrides of the interceptor's timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

/// A header matcher.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value to match; absent means the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// The workload to scale (anything with a `/scale` subresource) and its Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.port) != has(self.portName)").message("set exactly one of port and portName"))]
pub struct ScaleTargetRef {
    /// Name of the workload.
    #[serde(default)]
    pub name: String,
    /// API version of the workload (default `apps/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Kind of the workload (default `Deployment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The Service in front of the workload, in the same namespace.
    pub service: String,
    /// The Service port to send traffic to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// The Service port, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

/// Where to send requests that waited past `timeoutSeconds` for the target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.port) != has(self.portName)").message("set exactly one of port and portName"))]
pub struct ColdStartTimeoutFailoverRef {
    /// The failover Service, in the same namespace.
    pub service: String,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Its port, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// Seconds to wait for the target before failing over (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

/// Replica bounds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.min) || !has(self.max) || self.min <= self.max").message("min must not exceed max"))]
pub struct ReplicaBounds {
    /// Fewest replicas (default 0: scale to zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min: Option<i32>,
    /// Most replicas (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max: Option<i32>,
}

/// The scaling metric; when both are given, `requestRate` is used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingMetricSpec {
    /// Scale on requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyMetric>,
    /// Scale on requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<RequestRateMetric>,
}

/// Scale so that each replica has about `targetValue` requests in flight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyMetric {
    /// Requests in flight per replica (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_value: Option<i64>,
}

/// Scale so that each replica serves about `targetValue` requests per second, averaged over
/// `window` in buckets of `granularity`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRateMetric {
    /// Requests per second per replica (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_value: Option<i64>,
    /// Averaging window, a Go duration (default `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Bucket size, a Go duration (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<String>,
}

/// Per-route timeouts, as Go durations (`20s`, `1m30s`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// How long a request waits for the target to have a ready endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_wait: Option<String>,
    /// How long to wait for the target's response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<String>,
}

/// What the controller reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPScaledObjectStatus {
    /// The workload, as `apiVersion/kind/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_workload: Option<String>,
    /// The Service, as `service:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_service: Option<String>,
    /// Standard conditions; `Ready` says whether the object is in effect, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every CRD as YAML, as committed in the repo: `(file name under crds/, contents)`.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    let header = |source: &str, yaml: String| {
        format!(
            "# Generated from the Rust types in crds/src/{source} by `cargo run -p wakegate-crds --bin crdgen`.\n# Do not edit by hand.\n{yaml}"
        )
    };
    Ok(vec![
        (
            "httpscaledobjects.http.keda.sh.yaml",
            header("lib.rs", serde_yaml::to_string(&HTTPScaledObject::crd())?),
        ),
        (
            "interceptorroutes.http.keda.sh.yaml",
            header(
                "interceptor_route.rs",
                serde_yaml::to_string(&InterceptorRoute::crd())?,
            ),
        ),
    ])
}

/// An object that makes a route: an HTTPScaledObject or an InterceptorRoute.
pub trait RouteObject:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Which kind it is.
    const KIND: RouteKind;

    /// Checks it into the shared route model.
    fn validate_route(&self) -> Result<ValidRoute, SpecError>;
}

impl RouteObject for HTTPScaledObject {
    const KIND: RouteKind = RouteKind::HTTPScaledObject;

    fn validate_route(&self) -> Result<ValidRoute, SpecError> {
        self.validate()
    }
}

impl RouteObject for InterceptorRoute {
    const KIND: RouteKind = RouteKind::InterceptorRoute;

    fn validate_route(&self) -> Result<ValidRoute, SpecError> {
        self.validate()
    }
}
