//! One checked route model for both kinds. An `InterceptorRoute` and an `HTTPScaledObject` are
//! validated into the same [`ValidRoute`] (the add-on's own mapping: an HTTPScaledObject's
//! hosts, path prefixes and headers are one rule, `conditionWait` is the readiness timeout, and
//! its failover ref is `coldStart.fallback` with `timeoutSeconds` as the readiness timeout), so
//! the interceptor and the controller never look at which kind a route came from, except where
//! the kinds really differ (who names the workload, and the metric names KEDA sees).

use std::num::NonZeroUsize;
use std::time::Duration;

use crate::interceptor_route::{
    InterceptorRoute, InterceptorRouteSpec, Overflow, ResponseMode, RoutingRule, StaticResponse,
};
use crate::options::{self, RouteOptions};
use crate::validate::{
    bad, check_header_name, check_host, check_path, duration, is_token, port_ref, rate_window,
};
use crate::{HeaderMatch, PortRef, ScalingMetric, SpecError};

/// With a fallback and `timeouts.readiness: 0s`, a request still fails over after this long.
pub const FALLBACK_READINESS: Duration = Duration::from_secs(30);
/// The longest inline static body, in characters.
pub const MAX_STATIC_BODY: usize = 32768;

/// Which kind of object a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `http.keda.sh/v1alpha1` HTTPScaledObject.
    HTTPScaledObject,
    /// `http.keda.sh/v1beta1` InterceptorRoute.
    InterceptorRoute,
}

impl RouteKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HTTPScaledObject => "HTTPScaledObject",
            Self::InterceptorRoute => "InterceptorRoute",
        }
    }
}

/// One rule: host AND path AND headers. Empty fields match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Hosts: exact names, `*.suffix` wildcards, or `*`.
    pub hosts: Vec<String>,
    /// Path prefixes, on whole segments.
    pub paths: Vec<String>,
    /// Header matchers.
    pub headers: Vec<HeaderMatch>,
}

/// The workload a route scales, with its bounds: an HTTPScaledObject's `scaleTargetRef` and
/// `replicas`, or an InterceptorRoute's `wakegate.dev/*` standalone annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// API version (`apps/v1`).
    pub api_version: String,
    /// Kind (`Deployment`).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Fewest replicas.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Idle time before scaling in to `min_replicas`.
    pub scaledown_period: Duration,
    /// Time after creation before scaling in is allowed.
    pub initial_cooldown: Duration,
}

impl Workload {
    /// `apiVersion/kind/name`, as statuses report it.
    pub fn target_workload(&self) -> String {
        format!("{}/{}/{}", self.api_version, self.kind, self.name)
    }
}

/// A Service port in the route's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRef {
    /// Service name.
    pub service: String,
    /// Its port.
    pub port: PortRef,
}

/// Where a static response's body comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// Inline text.
    Inline(String),
    /// A key of a labelled ConfigMap in the route's namespace; no key means the request path.
    ConfigMap {
        /// ConfigMap name.
        name: String,
        /// Key; `None` derives it from the request path.
        key: Option<String>,
    },
}

/// A response the interceptor serves itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code, 100-599.
    pub status: u16,
    /// Body.
    pub body: ResponseBody,
    /// Headers (checked names and values), in name order.
    pub headers: Vec<(String, String)>,
}

/// A static route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRouteSpec {
    /// Rules, OR'd (at least one).
    pub rules: Vec<Rule>,
    /// The response.
    pub response: Response,
    /// `Always` (never contact the target) rather than `WhenUnavailable`.
    pub always: bool,
}

/// What a request meets while the target is cold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColdStartPolicy {
    /// Where a request goes once it waited the readiness timeout.
    pub fallback: Option<ServicePortRef>,
    /// Served at once while no endpoint is ready (or only past the cap, with
    /// `overflow_placeholder` and `max_pending`).
    pub placeholder: Option<Response>,
    /// Most requests held at once, per interceptor replica.
    pub max_pending: Option<NonZeroUsize>,
    /// Past `max_pending`, the placeholder instead of a 503.
    pub overflow_placeholder: bool,
}

/// Per-route timeouts: `None` is the interceptor's default, zero disables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTimeouts {
    /// Cold-start wait.
    pub readiness: Option<Duration>,
    /// The whole request.
    pub request: Option<Duration>,
    /// From the request sent to the response headers.
    pub response_header: Option<Duration>,
}

/// Cookie affinity to one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpec {
    /// The cookie's name; `None` is the add-on's `keda-session-<hash>` default.
    pub cookie_name: Option<String>,
    /// How long a cookie is honoured after it was issued.
    pub absolute_timeout: Option<Duration>,
}

/// A checked route, of either kind.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRoute {
    /// The kind it came from.
    pub kind: RouteKind,
    /// Rules, OR'd; never empty (a catch-all is one empty rule).
    pub rules: Vec<Rule>,
    /// The Service in front of the workload.
    pub service: String,
    /// Its port.
    pub port: PortRef,
    /// The scaling metrics: one, or both (concurrency first).
    pub metrics: Vec<ScalingMetric>,
    /// The workload, where the route names one.
    pub workload: Option<Workload>,
    /// Cold-start behaviour.
    pub cold_start: ColdStartPolicy,
    /// Static routes, first match wins.
    pub static_routes: Vec<StaticRouteSpec>,
    /// Timeouts.
    pub timeouts: RouteTimeouts,
    /// Session persistence.
    pub session: Option<SessionSpec>,
    /// Wakegate's own options, from `wakegate.dev/*` annotations.
    pub options: RouteOptions,
}

impl ValidRoute {
    /// `service:port`, as statuses report it.
    pub fn target_service(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// `apiVersion/kind/name` of the workload, if the route names one.
    pub fn target_workload(&self) -> Option<String> {
        self.workload.as_ref().map(Workload::target_workload)
    }
}

pub(crate) fn check_rules(field: &str, rules: &[RoutingRule]) -> Result<Vec<Rule>, SpecError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let field = format!("{field}[{i}]");
            for (j, host) in rule.hosts.iter().enumerate() {
                check_host(&format!("{field}.hosts[{j}]"), host)?;
            }
            for (j, path) in rule.paths.iter().enumerate() {
                check_path(&format!("{field}.paths[{j}].value"), &path.value)?;
            }
            let mut names = std::collections::HashSet::new();
            for (j, header) in rule.headers.iter().enumerate() {
                let f = format!("{field}.headers[{j}]");
                check_header_name(&format!("{f}.name"), &header.name)?;
                if !names.insert(header.name.to_ascii_lowercase()) {
                    return Err(bad(
                        &f,
                        format!(
                            "{:?} is listed twice (header names are unique)",
                            header.name
                        ),
                    ));
                }
                if let Some(v) = &header.value {
                    if !header_value_ok(v) {
                        return Err(bad(&format!("{f}.value"), "is not a valid header value"));
                    }
                }
            }
            Ok(Rule {
                hosts: rule.hosts.clone(),
                paths: rule.paths.iter().map(|p| p.value.clone()).collect(),
                headers: rule
                    .headers
                    .iter()
                    .map(|h| HeaderMatch {
                        name: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
            })
        })
        .collect()
}

fn header_value_ok(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

fn response(field: &str, r: &StaticResponse, default_status: u16) -> Result<Response, SpecError> {
    let status = match r.status_code {
        None => default_status,
        Some(s) => u16::try_from(s)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| {
                bad(
                    &format!("{field}.statusCode"),
                    format!("{s} is not an HTTP status from 100 to 599"),
                )
            })?,
    };
    let body = match (&r.body, &r.body_from_config_map) {
        (Some(_), Some(_)) => {
            return Err(bad(
                field,
                "set at most one of body and bodyFromConfigMap, not both",
            ))
        }
        (Some(body), None) => {
            if body.chars().count() > MAX_STATIC_BODY {
                return Err(bad(
                    &format!("{field}.body"),
                    format!("is longer than {MAX_STATIC_BODY} characters"),
                ));
            }
            ResponseBody::Inline(body.clone())
        }
        (None, Some(cm)) => {
            if cm.name.is_empty() {
                return Err(bad(
                    &format!("{field}.bodyFromConfigMap.name"),
                    "is required",
                ));
            }
            if cm.key.as_deref() == Some("") {
                return Err(bad(
                    &format!("{field}.bodyFromConfigMap.key"),
                    "is empty: omit it to take the key from the request path",
                ));
            }
            ResponseBody::ConfigMap {
                name: cm.name.clone(),
                key: cm.key.clone(),
            }
        }
        (None, None) => ResponseBody::Inline(String::new()),
    };
    let mut headers = Vec::with_capacity(r.headers.len());
    for (name, value) in &r.headers {
        check_header_name(&format!("{field}.headers[{name:?}]"), name)?;
        if !header_value_ok(value) {
            return Err(bad(
                &format!("{field}.headers[{name:?}]"),
                "is not a valid header value",
            ));
        }
        headers.push((name.clone(), value.clone()));
    }
    Ok(Response {
        status,
        body,
        headers,
    })
}

fn positive(field: &str, v: i32) -> Result<f64, SpecError> {
    if v < 1 {
        return Err(bad(field, format!("{v} must be at least 1")));
    }
    Ok(f64::from(v))
}

impl InterceptorRoute {
    /// Checks the spec and the `wakegate.dev/*` annotations, applying the add-on's defaults.
    /// Every rule the CRD's CEL validations state is checked here too, for API servers (and
    /// CRDs) that did not.
    pub fn validate(&self) -> Result<ValidRoute, SpecError> {
        let annotations = self.metadata.annotations.clone().unwrap_or_default();
        let mut route = self.spec.validate()?;
        route.options = RouteOptions::from_annotations(&annotations)?;
        route.workload = options::standalone_workload(&annotations)?;
        Ok(route)
    }
}

impl InterceptorRouteSpec {
    /// Checks the spec (annotations aside).
    pub fn validate(&self) -> Result<ValidRoute, SpecError> {
        let target = &self.target;
        if target.service.is_empty() {
            return Err(bad(
                "target.service",
                "is required: the Service to route to",
            ));
        }
        let port = port_ref("target", target.port, target.port_name.as_deref())?;
        let mut rules = check_rules("rules", &self.rules)?;
        if rules.is_empty() {
            rules.push(Rule::default());
        }

        let m = &self.scaling_metric;
        let mut metrics = Vec::new();
        if let Some(c) = &m.concurrency {
            metrics.push(ScalingMetric::Concurrency {
                target: positive("scalingMetric.concurrency.targetValue", c.target_value)?,
            });
        }
        if let Some(r) = &m.request_rate {
            let (window, granularity) = rate_window(r.window.as_deref(), r.granularity.as_deref())?;
            metrics.push(ScalingMetric::RequestRate {
                target: positive("scalingMetric.requestRate.targetValue", r.target_value)?,
                window,
                granularity,
            });
        }
        if metrics.is_empty() {
            return Err(bad(
                "scalingMetric",
                "set at least one of concurrency and requestRate",
            ));
        }

        let static_routes = self
            .static_routes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("staticRoutes[{i}]");
                if s.rules.is_empty() {
                    return Err(bad(&format!("{field}.rules"), "needs at least one rule"));
                }
                Ok(StaticRouteSpec {
                    rules: check_rules(&format!("{field}.rules"), &s.rules)?,
                    response: response(&format!("{field}.response"), &s.response, 200)?,
                    always: s.response_mode == Some(ResponseMode::Always),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let t = self.timeouts.clone().unwrap_or_default();
        let mut timeouts = RouteTimeouts {
            readiness: duration("timeouts.readiness", t.readiness.as_deref())?,
            request: duration("timeouts.request", t.request.as_deref())?,
            response_header: duration("timeouts.responseHeader", t.response_header.as_deref())?,
        };

        let cold_start = match &self.cold_start {
            None => ColdStartPolicy::default(),
            Some(c) => {
                if c.fallback.is_none()
                    && c.placeholder.is_none()
                    && c.max_pending_requests.is_none()
                {
                    return Err(bad(
                        "coldStart",
                        "set at least one of fallback, placeholder and maxPendingRequests",
                    ));
                }
                let overflow_placeholder = c.overflow == Some(Overflow::Placeholder);
                if overflow_placeholder && c.placeholder.is_none() {
                    return Err(bad(
                        "coldStart.overflow",
                        "Placeholder needs coldStart.placeholder",
                    ));
                }
                let fallback = c
                    .fallback
                    .as_ref()
                    .map(|f| {
                        if f.service.name.is_empty() {
                            return Err(bad("coldStart.fallback.service.name", "is required"));
                        }
                        Ok(ServicePortRef {
                            service: f.service.name.clone(),
                            port: port_ref(
                                "coldStart.fallback.service",
                                f.service.port,
                                f.service.port_name.as_deref(),
                            )?,
                        })
                    })
                    .transpose()?;
                let max_pending = c
                    .max_pending_requests
                    .map(|n| {
                        usize::try_from(n)
                            .ok()
                            .and_then(NonZeroUsize::new)
                            .ok_or_else(|| {
                                bad(
                                    "coldStart.maxPendingRequests",
                                    format!("{n} must be at least 1"),
                                )
                            })
                    })
                    .transpose()?;
                ColdStartPolicy {
                    fallback,
                    placeholder: c
                        .placeholder
                        .as_ref()
                        .map(|p| response("coldStart.placeholder.response", &p.response, 503))
                        .transpose()?,
                    max_pending,
                    overflow_placeholder,
                }
            }
        };
        // The add-on: a fallback with readiness disabled still fails over after 30 s.
        if cold_start.fallback.is_some() && timeouts.readiness == Some(Duration::ZERO) {
            timeouts.readiness = Some(FALLBACK_READINESS);
        }

        let session = self
            .session_persistence
            .as_ref()
            .map(|s| {
                let cookie_name = s.cookie.as_ref().and_then(|c| c.name.clone());
                if let Some(name) = &cookie_name {
                    if !is_token(name) {
                        return Err(bad(
                            "sessionPersistence.cookie.name",
                            format!("{name:?} is not a cookie name"),
                        ));
                    }
                }
                Ok(SessionSpec {
                    cookie_name,
                    absolute_timeout: duration(
                        "sessionPersistence.absoluteTimeout",
                        s.absolute_timeout.as_deref(),
                    )?
                    .filter(|d| !d.is_zero()),
                })
            })
            .transpose()?;

        Ok(ValidRoute {
            kind: RouteKind::InterceptorRoute,
            rules,
            service: target.service.clone(),
            port,
            metrics,
            workload: None,
            cold_start,
            static_routes,
            timeouts,
            session,
            options: RouteOptions::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An add-on-shaped InterceptorRoute with every field set.
    const FULL: &str = include_str!("../../examples/interceptorroute-full.yaml");

    fn route(yaml: &str) -> InterceptorRoute {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn every_field_of_an_addon_route_is_read() {
        let r = route(FULL).validate().unwrap();
        assert_eq!(r.kind, RouteKind::InterceptorRoute);
        assert_eq!(r.target_service(), "my-app:http");
        assert_eq!(r.rules.len(), 2);
        assert_eq!(r.rules[0].hosts, ["app.example.com", "*.app.example.com"]);
        assert_eq!(r.rules[0].paths, ["/api"]);
        assert_eq!(r.rules[0].headers[0].name, "X-Tenant");
        assert_eq!(r.rules[0].headers[1].value, None);
        assert_eq!(
            r.metrics,
            [
                ScalingMetric::Concurrency { target: 50.0 },
                ScalingMetric::RequestRate {
                    target: 100.0,
                    window: Duration::from_secs(120),
                    granularity: Duration::from_secs(2)
                }
            ]
        );
        assert_eq!(r.static_routes.len(), 2);
        assert!(!r.static_routes[0].always);
        assert!(r.static_routes[1].always);
        assert_eq!(r.static_routes[0].response.status, 200);
        assert_eq!(
            r.static_routes[1].response.body,
            ResponseBody::ConfigMap {
                name: "docs".into(),
                key: None
            }
        );
        let c = &r.cold_start;
        assert_eq!(
            c.fallback,
            Some(ServicePortRef {
                service: "my-app-fallback".into(),
                port: PortRef::Number(8080)
            })
        );
        let placeholder = c.placeholder.as_ref().unwrap();
        assert_eq!(placeholder.status, 503);
        assert_eq!(
            placeholder.headers,
            [("Retry-After".to_owned(), "5".to_owned())]
        );
        assert_eq!(c.max_pending, NonZeroUsize::new(200));
        assert!(c.overflow_placeholder);
        assert_eq!(
            r.timeouts,
            RouteTimeouts {
                readiness: Some(Duration::from_secs(45)),
                request: Some(Duration::from_secs(120)),
                response_header: Some(Duration::from_secs(20)),
            }
        );
        assert_eq!(
            r.session,
            Some(SessionSpec {
                cookie_name: Some("app-session".into()),
                absolute_timeout: Some(Duration::from_secs(3600))
            })
        );
        assert_eq!(r.workload, None);
    }

    #[test]
    fn the_minimal_route_is_a_catch_all_with_defaults() {
        let r = route(
            "apiVersion: http.keda.sh/v1beta1\nkind: InterceptorRoute\nmetadata: {name: a}\nspec:\n  target: {service: a, port: 80}\n  scalingMetric: {requestRate: {targetValue: 10}}\n",
        )
        .validate()
        .unwrap();
        assert_eq!(r.rules, [Rule::default()]);
        assert_eq!(
            r.metrics,
            [ScalingMetric::RequestRate {
                target: 10.0,
                window: Duration::from_secs(60),
                granularity: Duration::from_secs(1)
            }]
        );
        assert_eq!(r.timeouts, RouteTimeouts::default());
        assert_eq!(r.cold_start, ColdStartPolicy::default());
    }

    #[test]
    fn a_fallback_with_readiness_off_still_fails_over_after_30s() {
        let mut r = route(FULL);
        r.spec.timeouts.as_mut().unwrap().readiness = Some("0s".into());
        assert_eq!(
            r.validate().unwrap().timeouts.readiness,
            Some(FALLBACK_READINESS)
        );
        r.spec.cold_start.as_mut().unwrap().fallback = None;
        assert_eq!(
            r.validate().unwrap().timeouts.readiness,
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn every_cel_rule_is_checked_and_names_the_field() {
        type Edit = Box<dyn Fn(&mut InterceptorRouteSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.target.port = Some(80)),
                "spec.target: set exactly one of port and portName, not both",
            ),
            (
                Box::new(|s| s.target.port_name = None),
                "spec.target: set one of port and portName",
            ),
            (
                Box::new(|s| s.scaling_metric = Default::default()),
                "spec.scalingMetric: set at least one of concurrency and requestRate",
            ),
            (
                Box::new(|s| s.scaling_metric.concurrency.as_mut().unwrap().target_value = 0),
                "spec.scalingMetric.concurrency.targetValue: 0 must be at least 1",
            ),
            (
                Box::new(|s| {
                    let c = s.cold_start.as_mut().unwrap();
                    c.fallback = None;
                    c.placeholder = None;
                    c.max_pending_requests = None;
                    c.overflow = None;
                }),
                "spec.coldStart: set at least one of fallback, placeholder and maxPendingRequests",
            ),
            (
                Box::new(|s| s.cold_start.as_mut().unwrap().placeholder = None),
                "spec.coldStart.overflow: Placeholder needs coldStart.placeholder",
            ),
            (
                Box::new(|s| {
                    s.static_routes[0].response.body_from_config_map = Some(Default::default())
                }),
                "spec.staticRoutes[0].response: set at most one of body and bodyFromConfigMap, not both",
            ),
            (
                Box::new(|s| s.static_routes[0].response.status_code = Some(600)),
                "spec.staticRoutes[0].response.statusCode: 600 is not an HTTP status from 100 to 599",
            ),
            (
                Box::new(|s| s.static_routes[0].rules.clear()),
                "spec.staticRoutes[0].rules: needs at least one rule",
            ),
            (
                Box::new(|s| s.rules[1].hosts.push("bad host".into())),
                "spec.rules[1].hosts[1]: \"bad host\" is not a host name, a *.suffix wildcard or *",
            ),
            (
                Box::new(|s| s.rules[0].paths[0].value.clear()),
                "spec.rules[0].paths[0].value: \"\" is not a path prefix like /api",
            ),
            (
                Box::new(|s| s.timeouts.as_mut().unwrap().request = Some("soon".into())),
                "spec.timeouts.request: \"soon\" is not a duration like 30s, 1m30s or 500ms",
            ),
            (
                Box::new(|s| {
                    s.static_routes[0].response.body = Some("x".repeat(MAX_STATIC_BODY + 1))
                }),
                "spec.staticRoutes[0].response.body: is longer than 32768 characters",
            ),
        ];
        for (edit, expected) in cases {
            let mut s = route(FULL).spec;
            edit(&mut s);
            assert_eq!(s.validate().unwrap_err().to_string(), expected);
        }
    }

    #[test]
    fn standalone_annotations_name_the_workload() {
        let mut r = route(FULL);
        r.metadata.annotations = Some(
            [
                (options::SCALE_TARGET_REF, "Deployment/my-app"),
                (options::MIN_REPLICAS, "1"),
                (options::MAX_REPLICAS, "4"),
                (options::SCALEDOWN_PERIOD, "60"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let w = r.validate().unwrap().workload.unwrap();
        assert_eq!(w.target_workload(), "apps/v1/Deployment/my-app");
        assert_eq!((w.min_replicas, w.max_replicas), (1, 4));
        assert_eq!(w.scaledown_period, Duration::from_secs(60));
        assert_eq!(w.initial_cooldown, Duration::ZERO);
    }
}
