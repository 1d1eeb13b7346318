//! Checking an HTTPScaledObject's spec once, into values with defaults applied and durations
//! parsed, so the interceptor and the controller never re-validate. Errors name the field.

use std::time::Duration;

use crate::options::RouteOptions;
use crate::{parse_go_duration, HTTPScaledObject, HTTPScaledObjectSpec, HeaderMatch};

/// Replicas at most, when the spec does not say.
pub const DEFAULT_MAX_REPLICAS: i32 = 100;
/// Idle seconds before scaling to zero, when the spec does not say (KEDA's cooldownPeriod).
pub const DEFAULT_SCALEDOWN_PERIOD_SECONDS: i32 = 300;
/// Target value of either scaling metric, when the spec does not say.
pub const DEFAULT_TARGET_VALUE: i64 = 100;
const DEFAULT_FAILOVER_TIMEOUT_SECONDS: i32 = 30;

/// A Service port, by number or by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// The Service's `port` number.
    Number(u16),
    /// The Service port's `name`.
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => n.fmt(f),
            Self::Name(name) => name.fmt(f),
        }
    }
}

/// What the replica count follows.
#[derive(Clone, Debug, PartialEq)]
pub enum ScalingMetric {
    /// Requests in flight, `target` per replica.
    Concurrency {
        /// Target per replica.
        target: f64,
    },
    /// Requests per second over `window` in `granularity` buckets, `target` per replica.
    RequestRate {
        /// Target per replica.
        target: f64,
        /// Averaging window.
        window: Duration,
        /// Bucket size.
        granularity: Duration,
    },
}

/// The failover destination for requests that waited too long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverTarget {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: PortRef,
    /// Time to wait before failing over.
    pub timeout: Duration,
}

/// A checked spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// Hosts to route.
    pub hosts: Vec<String>,
    /// Path prefixes to route.
    pub path_prefixes: Vec<String>,
    /// Header matchers.
    pub headers: Vec<HeaderMatch>,
    /// Workload API version.
    pub workload_api_version: String,
    /// Workload kind.
    pub workload_kind: String,
    /// Workload name.
    pub workload_name: String,
    /// Service in front of the workload.
    pub service: String,
    /// Port of that Service.
    pub port: PortRef,
    /// Where requests go after waiting too long.
    pub failover: Option<FailoverTarget>,
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Idle time before scaling in to `min_replicas`.
    pub scaledown_period: Duration,
    /// Time after creation before scaling in is allowed.
    pub initial_cooldown: Duration,
    /// The scaling metric.
    pub metric: ScalingMetric,
    /// Per-route readiness wait.
    pub condition_wait: Option<Duration>,
    /// Per-route response-header timeout.
    pub response_header: Option<Duration>,
    /// Wakegate's own options, from `wakegate.dev/*` annotations (filled in by
    /// [`HTTPScaledObject::validate`]).
    pub options: RouteOptions,
}

impl ValidSpec {
    /// `apiVersion/kind/name`, as the status reports it.
    pub fn target_workload(&self) -> String {
        format!(
            "{}/{}/{}",
            self.workload_api_version, self.workload_kind, self.workload_name
        )
    }

    /// `service:port`, as the status reports it.
    pub fn target_service(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }
}

/// A spec field with a value that is not allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {problem}", if field.starts_with("metadata.") { "" } else { "spec." })]
pub struct SpecError {
    /// The field, e.g. `scaleTargetRef.port` (under `spec`), or a `metadata.annotations[..]`
    /// key.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

fn port_ref(field: &str, port: Option<i32>, name: Option<&str>) -> Result<PortRef, SpecError> {
    match (port, name.filter(|n| !n.is_empty())) {
        (Some(_), Some(_)) => Err(bad(field, "set exactly one of port and portName, not both")),
        (None, None) => Err(bad(field, "set one of port and portName")),
        (Some(p), None) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .map(PortRef::Number)
            .ok_or_else(|| {
                bad(
                    &format!("{field}.port"),
                    format!("{p} is not a port number (1-65535)"),
                )
            }),
        (None, Some(n)) => Ok(PortRef::Name(n.to_owned())),
    }
}

fn duration(field: &str, value: Option<&str>) -> Result<Option<Duration>, SpecError> {
    value
        .map(|v| parse_go_duration(v).map_err(|e| bad(field, e.to_string())))
        .transpose()
}

fn seconds(field: &str, value: Option<i32>, default: i32) -> Result<Duration, SpecError> {
    let v = value.unwrap_or(default);
    u64::try_from(v)
        .map(Duration::from_secs)
        .map_err(|_| bad(field, format!("{v} is negative")))
}

impl HTTPScaledObject {
    /// Checks the spec and the `wakegate.dev/*` annotations, applying defaults.
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        let mut spec = self.spec.validate()?;
        spec.options = match &self.metadata.annotations {
            Some(annotations) => RouteOptions::from_annotations(annotations)?,
            None => RouteOptions::default(),
        };
        Ok(spec)
    }
}

impl HTTPScaledObjectSpec {
    /// Checks the spec and applies the add-on's defaults.
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        let target = &self.scale_target_ref;
        if target.name.is_empty() {
            return Err(bad(
                "scaleTargetRef.name",
                "is required: the workload to scale",
            ));
        }
        if target.service.is_empty() {
            return Err(bad(
                "scaleTargetRef.service",
                "is required: the Service in front of the workload",
            ));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let ok = host == "*"
                || (!name.is_empty()
                    && name.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']')
                    }));
            if !ok {
                return Err(bad(
                    &format!("hosts[{i}]"),
                    format!("{host:?} is not a host name, a *.suffix wildcard or *"),
                ));
            }
        }
        for (i, prefix) in self.path_prefixes.iter().enumerate() {
            if prefix.is_empty() || prefix.contains(['?', '#', ' ']) {
                return Err(bad(
                    &format!("pathPrefixes[{i}]"),
                    format!("{prefix:?} is not a path prefix like /api"),
                ));
            }
        }
        for (i, header) in self.headers.iter().enumerate() {
            let valid_name = !header.name.is_empty()
                && header
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                return Err(bad(
                    &format!("headers[{i}].name"),
                    format!("{:?} is not a header name", header.name),
                ));
            }
        }
        let port = port_ref("scaleTargetRef", target.port, target.port_name.as_deref())?;
        let failover = self
            .cold_start_timeout_failover_ref
            .as_ref()
            .map(|f| {
                if f.service.is_empty() {
                    return Err(bad("coldStartTimeoutFailoverRef.service", "is required"));
                }
                Ok(FailoverTarget {
                    service: f.service.clone(),
                    port: port_ref(
                        "coldStartTimeoutFailoverRef",
                        f.port,
                        f.port_name.as_deref(),
                    )?,
                    timeout: seconds(
                        "coldStartTimeoutFailoverRef.timeoutSeconds",
                        f.timeout_seconds,
                        DEFAULT_FAILOVER_TIMEOUT_SECONDS,
                    )?,
                })
            })
            .transpose()?;
        let bounds = self.replicas.clone().unwrap_or_default();
        let min_replicas = bounds.min.unwrap_or(0);
        let max_replicas = bounds.max.unwrap_or(DEFAULT_MAX_REPLICAS);
        if min_replicas < 0 {
            return Err(bad("replicas.min", format!("{min_replicas} is negative")));
        }
        if max_replicas < 1 {
            return Err(bad(
                "replicas.max",
                format!("{max_replicas} must be at least 1"),
            ));
        }
        if min_replicas > max_replicas {
            return Err(bad(
                "replicas",
                format!("min ({min_replicas}) is greater than max ({max_replicas})"),
            ));
        }
        let target_value = |field: &str, v: Option<i64>| -> Result<f64, SpecError> {
            let v = v.unwrap_or(DEFAULT_TARGET_VALUE);
            if v <= 0 {
                return Err(bad(field, format!("{v} must be greater than 0")));
            }
            Ok(v as f64)
        };
        let metric = match &self.scaling_metric {
            Some(m) if m.request_rate.is_some() => {
                let rate = m.request_rate.clone().unwrap_or_default();
                let window = duration("scalingMetric.requestRate.window", rate.window.as_deref())?
                    .unwrap_or(Duration::from_secs(60));
                let granularity = duration(
                    "scalingMetric.requestRate.granularity",
                    rate.granularity.as_deref(),
                )?
                .unwrap_or(Duration::from_secs(1));
                if granularity.is_zero() || window < granularity {
                    return Err(bad(
                        "scalingMetric.requestRate",
                        "granularity must be greater than 0 and no longer than window",
                    ));
                }
                ScalingMetric::RequestRate {
                    target: target_value(
                        "scalingMetric.requestRate.targetValue",
                        rate.target_value,
                    )?,
                    window,
                    granularity,
                }
            }
            Some(m) if m.concurrency.is_some() => ScalingMetric::Concurrency {
                target: target_value(
                    "scalingMetric.concurrency.targetValue",
                    m.concurrency.as_ref().and_then(|c| c.target_value),
                )?,
            },
            _ => ScalingMetric::Concurrency {
                target: target_value(
                    "targetPendingRequests",
                    self.target_pending_requests.map(i64::from),
                )?,
            },
        };
        let timeouts = self.timeouts.clone().unwrap_or_default();
        Ok(ValidSpec {
            hosts: self.hosts.clone(),
            path_prefixes: self.path_prefixes.clone(),
            headers: self.headers.clone(),
            workload_api_version: target
                .api_version
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "apps/v1".into()),
            workload_kind: target
                .kind
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "Deployment".into()),
            workload_name: target.name.clone(),
            service: target.service.clone(),
            port,
            failover,
            min_replicas,
            max_replicas,
            scaledown_period: seconds(
                "scaledownPeriod",
                self.scaledown_period,
                DEFAULT_SCALEDOWN_PERIOD_SECONDS,
            )?,
            initial_cooldown: seconds("initialCooldownPeriod", self.initial_cooldown_period, 0)?,
            metric,
            condition_wait: duration("timeouts.conditionWait", timeouts.condition_wait.as_deref())?,
            response_header: duration(
                "timeouts.responseHeader",
                timeouts.response_header.as_deref(),
            )?,
            options: RouteOptions::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HTTPScaledObject;

    /// The add-on's documented example, unchanged.
    const ADDON_EXAMPLE: &str = include_str!("../../examples/httpscaledobject.yaml");

    fn spec(yaml: &str) -> HTTPScaledObjectSpec {
        serde_yaml::from_str::<HTTPScaledObject>(yaml).unwrap().spec
    }

    #[test]
    fn the_addon_example_parses_with_its_meaning() {
        let valid = spec(ADDON_EXAMPLE).validate().unwrap();
        assert_eq!(valid.target_workload(), "apps/v1/Deployment/xkcd");
        assert_eq!(valid.target_service(), "xkcd:8080");
        assert_eq!((valid.min_replicas, valid.max_replicas), (5, 10));
        assert_eq!(valid.scaledown_period, Duration::from_secs(300));
        assert_eq!(
            valid.metric,
            ScalingMetric::RequestRate {
                target: 100.0,
                window: Duration::from_secs(60),
                granularity: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn defaults_follow_the_addon() {
        let valid = spec(
            "apiVersion: http.keda.sh/v1alpha1\nkind: HTTPScaledObject\nmetadata: {name: a}\nspec:\n  scaleTargetRef: {name: a, service: a, portName: http}\n",
        )
        .validate()
        .unwrap();
        assert_eq!((valid.min_replicas, valid.max_replicas), (0, 100));
        assert_eq!(valid.scaledown_period, Duration::from_secs(300));
        assert_eq!(valid.metric, ScalingMetric::Concurrency { target: 100.0 });
        assert_eq!(valid.port, PortRef::Name("http".into()));
        assert_eq!(valid.target_workload(), "apps/v1/Deployment/a");
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = spec(ADDON_EXAMPLE);
        s.scale_target_ref.port_name = Some("http".into());
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "spec.scaleTargetRef: set exactly one of port and portName, not both"
        );
        let mut s = spec(ADDON_EXAMPLE);
        s.replicas = Some(crate::ReplicaBounds {
            min: Some(3),
            max: Some(2),
        });
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "spec.replicas: min (3) is greater than max (2)"
        );
        let mut s = spec(ADDON_EXAMPLE);
        s.timeouts = Some(crate::Timeouts {
            condition_wait: Some("soon".into()),
            response_header: None,
        });
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "spec.timeouts.conditionWait: \"soon\" is not a duration like 30s, 1m30s or 500ms"
        );
        let mut s = spec(ADDON_EXAMPLE);
        s.scale_target_ref.port = Some(70000);
        assert_eq!(s.validate().unwrap_err().field, "scaleTargetRef.port");
    }
}
