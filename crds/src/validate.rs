//! Checking an HTTPScaledObject's spec once, into the shared [`ValidRoute`] with defaults
//! applied and durations parsed, so the interceptor and the controller never re-validate.
//! Errors name the field. The checks both kinds share live here too.

use std::time::Duration;

use crate::options::{self, RouteOptions};
use crate::route::{ColdStartPolicy, RouteKind, RouteTimeouts, Rule, ServicePortRef, Workload};
use crate::{parse_go_duration, HTTPScaledObject, HTTPScaledObjectSpec, ValidRoute};

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

impl ScalingMetric {
    /// The target value per replica.
    pub fn target(&self) -> f64 {
        match self {
            Self::Concurrency { target } | Self::RequestRate { target, .. } => *target,
        }
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

pub(crate) fn bad(field: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

pub(crate) fn port_ref(
    field: &str,
    port: Option<i32>,
    name: Option<&str>,
) -> Result<PortRef, SpecError> {
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

pub(crate) fn duration(field: &str, value: Option<&str>) -> Result<Option<Duration>, SpecError> {
    value
        .map(|v| parse_go_duration(v).map_err(|e| bad(field, e.to_string())))
        .transpose()
}

pub(crate) fn seconds(
    field: &str,
    value: Option<i32>,
    default: i32,
) -> Result<Duration, SpecError> {
    let v = value.unwrap_or(default);
    u64::try_from(v)
        .map(Duration::from_secs)
        .map_err(|_| bad(field, format!("{v} is negative")))
}

/// `scalingMetric.requestRate`'s window and granularity, with the add-on's defaults (1m, 1s).
pub(crate) fn rate_window(
    window: Option<&str>,
    granularity: Option<&str>,
) -> Result<(Duration, Duration), SpecError> {
    let window =
        duration("scalingMetric.requestRate.window", window)?.unwrap_or(Duration::from_secs(60));
    let granularity = duration("scalingMetric.requestRate.granularity", granularity)?
        .unwrap_or(Duration::from_secs(1));
    if granularity.is_zero() || window < granularity {
        return Err(bad(
            "scalingMetric.requestRate",
            "granularity must be greater than 0 and no longer than window",
        ));
    }
    Ok((window, granularity))
}

pub(crate) fn check_host(field: &str, host: &str) -> Result<(), SpecError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = host == "*"
        || (!name.is_empty()
            && name.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']')
            }));
    if ok {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{host:?} is not a host name, a *.suffix wildcard or *"),
        ))
    }
}

pub(crate) fn check_path(field: &str, prefix: &str) -> Result<(), SpecError> {
    if prefix.is_empty() || prefix.contains(['?', '#', ' ']) {
        return Err(bad(
            field,
            format!("{prefix:?} is not a path prefix like /api"),
        ));
    }
    Ok(())
}

/// An HTTP token (RFC 9110 §5.6.2): what header and cookie names are made of.
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(crate) fn check_header_name(field: &str, name: &str) -> Result<(), SpecError> {
    if is_token(name) {
        Ok(())
    } else {
        Err(bad(field, format!("{name:?} is not a header name")))
    }
}

impl HTTPScaledObject {
    /// Checks the spec and the `wakegate.dev/*` annotations, applying defaults.
    pub fn validate(&self) -> Result<ValidRoute, SpecError> {
        let mut spec = self.spec.validate()?;
        if let Some(annotations) = &self.metadata.annotations {
            spec.options = RouteOptions::from_annotations(annotations)?;
            if let Some(key) = options::STANDALONE_WORKLOAD
                .iter()
                .find(|k| annotations.contains_key(**k))
            {
                return Err(bad(
                    &format!("metadata.annotations[{key:?}]"),
                    "is for InterceptorRoutes: an HTTPScaledObject names its workload in spec.scaleTargetRef",
                ));
            }
        }
        Ok(spec)
    }
}

impl HTTPScaledObjectSpec {
    /// Checks the spec and applies the add-on's defaults.
    pub fn validate(&self) -> Result<ValidRoute, SpecError> {
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
            check_host(&format!("hosts[{i}]"), host)?;
        }
        for (i, prefix) in self.path_prefixes.iter().enumerate() {
            check_path(&format!("pathPrefixes[{i}]"), prefix)?;
        }
        for (i, header) in self.headers.iter().enumerate() {
            check_header_name(&format!("headers[{i}].name"), &header.name)?;
        }
        let port = port_ref("scaleTargetRef", target.port, target.port_name.as_deref())?;
        let timeouts = self.timeouts.clone().unwrap_or_default();
        let mut readiness = duration("timeouts.conditionWait", timeouts.condition_wait.as_deref())?;
        let fallback = self
            .cold_start_timeout_failover_ref
            .as_ref()
            .map(|f| {
                if f.service.is_empty() {
                    return Err(bad("coldStartTimeoutFailoverRef.service", "is required"));
                }
                // The add-on's mapping: the failover's timeout is the readiness timeout.
                readiness = Some(seconds(
                    "coldStartTimeoutFailoverRef.timeoutSeconds",
                    f.timeout_seconds,
                    DEFAULT_FAILOVER_TIMEOUT_SECONDS,
                )?);
                Ok(ServicePortRef {
                    service: f.service.clone(),
                    port: port_ref(
                        "coldStartTimeoutFailoverRef",
                        f.port,
                        f.port_name.as_deref(),
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
                let (window, granularity) =
                    rate_window(rate.window.as_deref(), rate.granularity.as_deref())?;
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
        Ok(ValidRoute {
            kind: RouteKind::HTTPScaledObject,
            rules: vec![Rule {
                hosts: self.hosts.clone(),
                paths: self.path_prefixes.clone(),
                headers: self.headers.clone(),
            }],
            service: target.service.clone(),
            port,
            metrics: vec![metric],
            workload: Some(Workload {
                api_version: target
                    .api_version
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "apps/v1".into()),
                kind: target
                    .kind
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "Deployment".into()),
                name: target.name.clone(),
                min_replicas,
                max_replicas,
                scaledown_period: seconds(
                    "scaledownPeriod",
                    self.scaledown_period,
                    DEFAULT_SCALEDOWN_PERIOD_SECONDS,
                )?,
                initial_cooldown: seconds(
                    "initialCooldownPeriod",
                    self.initial_cooldown_period,
                    0,
                )?,
            }),
            cold_start: ColdStartPolicy {
                fallback,
                ..ColdStartPolicy::default()
            },
            static_routes: Vec::new(),
            timeouts: RouteTimeouts {
                readiness,
                request: None,
                response_header: duration(
                    "timeouts.responseHeader",
                    timeouts.response_header.as_deref(),
                )?,
            },
            session: None,
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
        assert_eq!(valid.target_workload().unwrap(), "apps/v1/Deployment/xkcd");
        assert_eq!(valid.target_service(), "xkcd:8080");
        let w = valid.workload.unwrap();
        assert_eq!((w.min_replicas, w.max_replicas), (5, 10));
        assert_eq!(w.scaledown_period, Duration::from_secs(300));
        assert_eq!(
            valid.metrics,
            [ScalingMetric::RequestRate {
                target: 100.0,
                window: Duration::from_secs(60),
                granularity: Duration::from_secs(1)
            }]
        );
        assert_eq!(
            valid.rules,
            [Rule {
                hosts: vec!["myhost.com".into()],
                paths: vec!["/test".into()],
                headers: vec![]
            }]
        );
    }

    #[test]
    fn defaults_follow_the_addon() {
        let valid = spec(
            "apiVersion: http.keda.sh/v1alpha1\nkind: HTTPScaledObject\nmetadata: {name: a}\nspec:\n  scaleTargetRef: {name: a, service: a, portName: http}\n",
        )
        .validate()
        .unwrap();
        let w = valid.workload.clone().unwrap();
        assert_eq!((w.min_replicas, w.max_replicas), (0, 100));
        assert_eq!(w.scaledown_period, Duration::from_secs(300));
        assert_eq!(
            valid.metrics,
            [ScalingMetric::Concurrency { target: 100.0 }]
        );
        assert_eq!(valid.port, PortRef::Name("http".into()));
        assert_eq!(valid.target_workload().unwrap(), "apps/v1/Deployment/a");
        assert_eq!(valid.rules, [Rule::default()]);
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
