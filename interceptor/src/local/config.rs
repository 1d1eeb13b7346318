//! The local-mode config file: routes with the matching fields of an HTTPScaledObject and a
//! target that is either an always-on upstream or a command started on demand.
//!
//! Parsed once into types; every problem names the key (`routes[1].target.port`) and what is
//! wrong with it.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::provider::{
    ColdResponse, FailoverSpec, RouteSpec, Trust, UpstreamProtocol, UpstreamTls,
};
use crate::routing::{HeaderMatch, RouteMatch};

/// Idle time before a command is stopped, when a route does not say (the add-on's default).
pub const DEFAULT_SCALEDOWN_PERIOD: Duration = Duration::from_secs(300);
/// How long a request is held before failing over, when a failover does not say (the add-on's).
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL when stopping a command, when a target does not say.
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// A validated local-mode configuration.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Routes in file order (earlier routes win precedence ties).
    pub routes: Vec<LocalRoute>,
}

/// One route and its target.
#[derive(Clone, Debug)]
pub struct LocalRoute {
    /// What the proxy core needs.
    pub spec: RouteSpec,
    /// Where requests go.
    pub target: LocalTarget,
    /// Where held requests go after the route's failover timeout.
    pub failover: Option<Authority>,
    /// Idle time (no requests, none in flight) before a command target is stopped.
    pub scaledown_period: Duration,
}

/// A route's target.
#[derive(Clone, Debug)]
pub enum LocalTarget {
    /// An address that is always on.
    Upstream(Authority),
    /// A command started on the first request and stopped when idle.
    Command(CommandTarget),
}

/// A command target.
#[derive(Clone, Debug)]
pub struct CommandTarget {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The port the command listens on, on 127.0.0.1.
    pub port: u16,
    /// Extra environment variables (`PORT` is always set).
    pub env: BTreeMap<String, String>,
    /// Working directory; the interceptor's own when unset.
    pub working_dir: Option<PathBuf>,
    /// How readiness is checked.
    pub probe: Probe,
    /// Time between SIGTERM and SIGKILL.
    pub stop_grace_period: Duration,
}

/// A readiness check for a command target, repeated until it passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect to the port succeeds.
    Tcp,
    /// An HTTP GET of this path answers 2xx or 3xx.
    HttpGet(PathAndQuery),
}

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape (unknown key, wrong type, bad duration).
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and the line.
        #[source]
        source: serde_yaml::Error,
    },
    /// A value has the right shape but is not allowed.
    #[error("config file {path}: {key}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key, e.g. `routes[0].target.port`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl LocalConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            Problem::Parse(source) => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            Problem::Invalid { key, problem } => ConfigError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            },
        })
    }

    /// Parses and validates config text.
    fn parse(text: &str) -> Result<Self, Problem> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(Problem::Parse)?;
        if raw.routes.is_empty() {
            return Err(invalid("routes", "at least one route is needed"));
        }
        let mut names = HashSet::new();
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, route)| {
                let key = format!("routes[{i}]");
                if !names.insert(route.name.clone()) {
                    return Err(invalid(
                        &format!("{key}.name"),
                        &format!("route name {:?} is used twice", route.name),
                    ));
                }
                route.validate(&key)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }
}

#[derive(Debug)]
enum Problem {
    Parse(serde_yaml::Error),
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: &str) -> Problem {
    Problem::Invalid {
        key: key.to_owned(),
        problem: problem.to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRoute {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    path_prefixes: Vec<String>,
    #[serde(default)]
    headers: Vec<RawHeader>,
    target: RawTarget,
    scaledown_period: Option<DurationValue>,
    #[serde(default)]
    timeouts: RawTimeouts,
    max_in_flight_per_endpoint: Option<NonZeroUsize>,
    max_held_requests: Option<NonZeroUsize>,
    keep_awake_max: Option<DurationValue>,
    failover: Option<RawFailover>,
    cold_start: Option<RawColdStart>,
    /// An InterceptorRoute's `rules` (instead of `hosts`/`pathPrefixes`/`headers`).
    #[serde(default)]
    rules: Vec<wakegate_crds::interceptor_route::RoutingRule>,
    /// An InterceptorRoute's `staticRoutes`.
    #[serde(default)]
    static_routes: Vec<wakegate_crds::interceptor_route::StaticRoute>,
}

/// What requests for a cold target get instead of being held.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawColdStart {
    waiting_page: Option<RawWaitingPage>,
    placeholder: Option<RawPlaceholder>,
    /// An InterceptorRoute's: most requests held at once (the route's `maxHeldRequests`).
    max_pending_requests: Option<NonZeroUsize>,
    /// An InterceptorRoute's: what the overflow past `maxPendingRequests` gets.
    overflow: Option<wakegate_crds::interceptor_route::Overflow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWaitingPage {
    refresh_seconds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPlaceholder {
    status: Option<u16>,
    content_type: Option<String>,
    body: Option<String>,
    /// An InterceptorRoute's form: `response: {statusCode, body, headers}`.
    response: Option<wakegate_crds::interceptor_route::StaticResponse>,
}

/// Where held requests go after `timeout` (the add-on's `coldStartTimeoutFailoverRef`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    upstream: String,
    timeout: Option<DurationValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    /// `conditionWait` is the add-on's name for the same timeout.
    #[serde(alias = "conditionWait")]
    readiness: Option<DurationValue>,
    response_header: Option<DurationValue>,
    /// The whole request, from arrival to the end of the response; `0s` turns the global
    /// `--request-timeout` off for this route.
    request: Option<DurationValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTarget {
    upstream: Option<String>,
    command: Option<Vec<String>>,
    port: Option<u16>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    readiness_probe: Option<RawProbe>,
    stop_grace_period: Option<DurationValue>,
    protocol: Option<RawProtocol>,
    tls: Option<RawUpstreamTls>,
}

/// `target.protocol`.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Http1,
    /// HTTP/2: with prior knowledge in cleartext, or by ALPN over `tls`.
    #[serde(alias = "h2")]
    H2c,
}

/// `target.tls`: the target speaks TLS.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawUpstreamTls {
    server_name: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProbe {
    http_get: Option<RawHttpGet>,
    tcp_socket: Option<serde_yaml::Mapping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpGet {
    path: String,
}

/// A duration written `30s`, `2m`, `1h 30m`, or as a bare number of seconds (the add-on's form).
#[derive(Clone, Copy, Debug)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Seconds(u64),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Seconds(s) => Ok(Self(Duration::from_secs(s))),
            Form::Text(t) => humantime::parse_duration(t.trim()).map(Self).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {t:?} ({e}); write it like 30s or 2m"
                ))
            }),
        }
    }
}

impl RawPlaceholder {
    /// The old form (`status`, `contentType`, `body`) or the add-on's (`response`).
    fn validate(&self, key: &str) -> Result<ColdResponse, Problem> {
        if let Some(response) = &self.response {
            if self.status.is_some() || self.content_type.is_some() || self.body.is_some() {
                return Err(invalid(
                    key,
                    "give `response` (the InterceptorRoute form) or `status`/`contentType`/`body`, not both",
                ));
            }
            return local_response(&format!("{key}.response"), response, 503);
        }
        let status = http::StatusCode::from_u16(self.status.unwrap_or(503))
            .ok()
            .filter(|s| s.as_u16() >= 200)
            .ok_or_else(|| {
                invalid(
                    &format!("{key}.status"),
                    "is not an HTTP status from 200 to 999",
                )
            })?;
        let content_type = HeaderValue::from_str(
            self.content_type
                .as_deref()
                .unwrap_or("text/plain; charset=utf-8"),
        )
        .map_err(|_| invalid(&format!("{key}.contentType"), "is not a valid header value"))?;
        Ok(ColdResponse::Placeholder {
            status,
            content_type,
            body: bytes::Bytes::from(self.body.clone().unwrap_or_default()),
            headers: http::HeaderMap::new(),
            config_map: None,
        })
    }
}

/// An InterceptorRoute-shaped response, checked by the CRD's own rules. Local mode has no
/// ConfigMaps: a body must be given inline.
fn local_response(
    key: &str,
    response: &wakegate_crds::interceptor_route::StaticResponse,
    default_status: i32,
) -> Result<ColdResponse, Problem> {
    if response.body_from_config_map.is_some() {
        return Err(invalid(
            &format!("{key}.bodyFromConfigMap"),
            "needs a cluster; in local mode give `body`",
        ));
    }
    let spec = checker(
        Vec::new(),
        vec![wakegate_crds::interceptor_route::StaticRoute {
            rules: vec![Default::default()],
            response: wakegate_crds::interceptor_route::StaticResponse {
                status_code: response.status_code.or(Some(default_status)),
                ..response.clone()
            },
            response_mode: None,
        }],
    );
    let valid = spec.validate().map_err(|e| {
        let field = e.field.trim_start_matches("staticRoutes[0].response");
        invalid(&format!("{key}{field}"), &e.problem)
    })?;
    valid
        .static_routes
        .first()
        .and_then(|s| crate::provider::static_response(&s.response, ""))
        .ok_or_else(|| invalid(key, "is not a valid response"))
}

/// An InterceptorRoute spec holding only `rules` and `staticRoutes`, so local mode checks them
/// by exactly the CRD's rules.
fn checker(
    rules: Vec<wakegate_crds::interceptor_route::RoutingRule>,
    static_routes: Vec<wakegate_crds::interceptor_route::StaticRoute>,
) -> wakegate_crds::InterceptorRouteSpec {
    wakegate_crds::InterceptorRouteSpec {
        target: wakegate_crds::interceptor_route::TargetRef {
            service: "local".into(),
            port: Some(1),
            port_name: None,
        },
        rules,
        scaling_metric: wakegate_crds::interceptor_route::ScalingMetricSpec {
            concurrency: Some(wakegate_crds::interceptor_route::ConcurrencyTarget {
                target_value: 1,
            }),
            request_rate: None,
        },
        static_routes,
        ..Default::default()
    }
}

impl RawRoute {
    /// The route's rules (its `rules`, or the one rule its `hosts`/`pathPrefixes`/`headers`
    /// make) and its static routes.
    fn checked_rules(
        &self,
        key: &str,
        single: RouteMatch,
    ) -> Result<(Vec<RouteMatch>, Vec<crate::provider::StaticRoute>), Problem> {
        let single_given = !(single.hosts.is_empty()
            && single.path_prefixes.is_empty()
            && single.headers.is_empty());
        if single_given && !self.rules.is_empty() {
            return Err(invalid(
                &format!("{key}.rules"),
                "give `rules` or `hosts`/`pathPrefixes`/`headers`, not both",
            ));
        }
        for (i, s) in self.static_routes.iter().enumerate() {
            if s.response.body_from_config_map.is_some() {
                return Err(invalid(
                    &format!("{key}.staticRoutes[{i}].response.bodyFromConfigMap"),
                    "needs a cluster; in local mode give `body`",
                ));
            }
        }
        let valid = checker(self.rules.clone(), self.static_routes.clone())
            .validate()
            .map_err(|e| invalid(&format!("{key}.{}", e.field), &e.problem))?;
        let converted = || invalid(key, "has a rule that cannot be used");
        let rules = if self.rules.is_empty() {
            vec![single]
        } else {
            crate::provider::rule_matchers(&valid.rules).ok_or_else(converted)?
        };
        let static_routes = valid
            .static_routes
            .iter()
            .map(|s| {
                Some(crate::provider::StaticRoute {
                    rules: crate::provider::rule_matchers(&s.rules)?,
                    response: crate::provider::static_response(&s.response, "")?,
                    always: s.always,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(converted)?;
        Ok((rules, static_routes))
    }

    fn validate(self, key: &str) -> Result<LocalRoute, Problem> {
        if self.name.is_empty() || self.name.chars().any(|c| c.is_whitespace() || c == '"') {
            return Err(invalid(
                &format!("{key}.name"),
                "must be non-empty, without spaces or quotes",
            ));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            validate_host(host).map_err(|p| invalid(&format!("{key}.hosts[{i}]"), &p))?;
        }
        for (i, prefix) in self.path_prefixes.iter().enumerate() {
            if prefix.is_empty()
                || prefix.contains(['?', '#'])
                || prefix.chars().any(char::is_whitespace)
            {
                return Err(invalid(
                    &format!("{key}.pathPrefixes[{i}]"),
                    &format!("{prefix:?} is not a path prefix like /api"),
                ));
            }
        }
        let headers = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    invalid(
                        &format!("{key}.headers[{i}].name"),
                        &format!("{:?} is not a valid header name", h.name),
                    )
                })?;
                let value = h
                    .value
                    .as_deref()
                    .map(HeaderValue::from_str)
                    .transpose()
                    .map_err(|_| {
                        invalid(
                            &format!("{key}.headers[{i}].value"),
                            "is not a valid header value",
                        )
                    })?;
                Ok(HeaderMatch { name, value })
            })
            .collect::<Result<Vec<_>, Problem>>()?;

        let protocol = match self.target.protocol {
            Some(RawProtocol::H2c) => UpstreamProtocol::H2c,
            Some(RawProtocol::Http1) | None => UpstreamProtocol::Http1,
        };
        let upstream_tls = self
            .target
            .tls
            .as_ref()
            .map(|tls| tls.validate(&format!("{key}.target.tls")))
            .transpose()?;
        if let (
            Some(_),
            Some(RawProbe {
                http_get: Some(_), ..
            }),
        ) = (&upstream_tls, &self.target.readiness_probe)
        {
            return Err(invalid(
                &format!("{key}.target.readinessProbe.httpGet"),
                "probes in plain HTTP, so it cannot check a `tls` target; use `tcpSocket: {}`",
            ));
        }
        let (rules, static_routes) = self.checked_rules(
            key,
            RouteMatch {
                hosts: self.hosts.clone(),
                path_prefixes: self.path_prefixes.clone(),
                headers,
            },
        )?;
        let target = self.target.validate(&format!("{key}.target"))?;
        let cold_key = format!("{key}.coldStart");
        let cold_response = match &self.cold_start {
            None => None,
            Some(RawColdStart {
                waiting_page: Some(_),
                placeholder: Some(_),
                ..
            }) => {
                return Err(invalid(
                    &cold_key,
                    "give either `waitingPage` or `placeholder`, not both",
                ))
            }
            Some(RawColdStart {
                waiting_page: Some(page),
                ..
            }) => Some(ColdResponse::WaitingPage {
                refresh: page.refresh_seconds.unwrap_or(2).max(1),
            }),
            Some(RawColdStart {
                placeholder: Some(p),
                ..
            }) => Some(p.validate(&format!("{cold_key}.placeholder"))?),
            Some(RawColdStart {
                max_pending_requests: Some(_),
                ..
            }) => None,
            Some(_) => {
                return Err(invalid(
                    &cold_key,
                    "give `waitingPage`, `placeholder` or `maxPendingRequests`",
                ))
            }
        };
        let cold = self.cold_start.as_ref();
        let max_pending = cold.and_then(|c| c.max_pending_requests);
        let overflow_placeholder = cold.and_then(|c| c.overflow)
            == Some(wakegate_crds::interceptor_route::Overflow::Placeholder);
        if overflow_placeholder && cold.is_none_or(|c| c.placeholder.is_none()) {
            return Err(invalid(
                &format!("{cold_key}.overflow"),
                "Placeholder needs coldStart.placeholder",
            ));
        }
        if max_pending.is_some() && self.max_held_requests.is_some() {
            return Err(invalid(
                &format!("{cold_key}.maxPendingRequests"),
                "give it or the route's maxHeldRequests, not both",
            ));
        }
        let failover = self
            .failover
            .as_ref()
            .map(|f| {
                let authority = parse_upstream(&format!("{key}.failover.upstream"), &f.upstream)?;
                Ok::<_, Problem>((
                    authority,
                    f.timeout.map_or(DEFAULT_FAILOVER_TIMEOUT, |d| d.0),
                ))
            })
            .transpose()?;
        let id: Arc<str> = self.name.as_str().into();
        Ok(LocalRoute {
            spec: RouteSpec {
                target: id.clone(),
                id,
                rules,
                readiness_timeout: self.timeouts.readiness.map(|d| d.0),
                response_header_timeout: self.timeouts.response_header.map(|d| d.0),
                request_timeout: self.timeouts.request.map(|d| d.0),
                max_in_flight_per_endpoint: self.max_in_flight_per_endpoint,
                keep_awake_max: self
                    .keep_awake_max
                    .map_or(wakegate_crds::options::DEFAULT_KEEP_AWAKE_MAX, |d| d.0),
                max_held: max_pending.or(self.max_held_requests),
                cold_response_on_overflow: overflow_placeholder,
                cold_response,
                static_routes,
                // One command is one endpoint: nothing to be affine to.
                session: None,
                protocol,
                upstream_tls,
                failover: failover.as_ref().map(|(_, after)| FailoverSpec {
                    target: format!("{}#failover", self.name).into(),
                    after: Some(*after),
                }),
            },
            target,
            failover: failover.map(|(authority, _)| authority),
            scaledown_period: self
                .scaledown_period
                .map_or(DEFAULT_SCALEDOWN_PERIOD, |d| d.0),
        })
    }
}

impl RawUpstreamTls {
    fn validate(&self, key: &str) -> Result<UpstreamTls, Problem> {
        let trust = match (&self.ca_file, self.insecure_skip_verify) {
            (Some(_), true) => {
                return Err(invalid(
                    key,
                    "give either `caFile` or `insecureSkipVerify: true`, not both",
                ))
            }
            (Some(path), false) => Trust::from_ca_file(path)
                .map_err(|e| invalid(&format!("{key}.caFile"), &e.to_string()))?,
            (None, true) => Trust::InsecureSkipVerify,
            (None, false) => Trust::PublicRoots,
        };
        let server_name = match &self.server_name {
            None => None,
            Some(name) => {
                rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                    invalid(
                        &format!("{key}.serverName"),
                        &format!("{name:?} is not a DNS name or IP address"),
                    )
                })?;
                Some(name.as_str().into())
            }
        };
        Ok(UpstreamTls { server_name, trust })
    }
}

impl RawTarget {
    fn validate(self, key: &str) -> Result<LocalTarget, Problem> {
        match (self.upstream, self.command) {
            (Some(_), Some(_)) => Err(invalid(
                key,
                "give either `upstream` or `command` (with `port`), not both",
            )),
            (None, None) => Err(invalid(
                key,
                "give either `upstream: host:port` or `command: [...]` with `port`",
            )),
            (Some(upstream), None) => {
                let command_only = [
                    ("port", self.port.is_some()),
                    ("env", !self.env.is_empty()),
                    ("workingDir", self.working_dir.is_some()),
                    ("readinessProbe", self.readiness_probe.is_some()),
                    ("stopGracePeriod", self.stop_grace_period.is_some()),
                ];
                if let Some((field, _)) = command_only.iter().find(|(_, set)| *set) {
                    return Err(invalid(
                        &format!("{key}.{field}"),
                        "applies only to a `command` target",
                    ));
                }
                Ok(LocalTarget::Upstream(parse_upstream(
                    &format!("{key}.upstream"),
                    &upstream,
                )?))
            }
            (None, Some(argv)) => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid(
                        &format!("{key}.command"),
                        "needs a program to run as its first element",
                    ));
                }
                let port = match self.port {
                    None => {
                        return Err(invalid(
                            &format!("{key}.port"),
                            "is required with `command`: the port the command listens on",
                        ))
                    }
                    Some(0) => return Err(invalid(&format!("{key}.port"), "must not be 0")),
                    Some(port) => port,
                };
                let probe = match self.readiness_probe {
                    None => Probe::Tcp,
                    Some(RawProbe {
                        http_get: Some(_),
                        tcp_socket: Some(_),
                    }) => {
                        return Err(invalid(
                            &format!("{key}.readinessProbe"),
                            "give either `httpGet` or `tcpSocket`, not both",
                        ))
                    }
                    Some(RawProbe {
                        http_get: Some(get),
                        ..
                    }) => Probe::HttpGet(
                        get.path
                            .parse()
                            .ok()
                            .filter(|p: &PathAndQuery| p.as_str().starts_with('/'))
                            .ok_or_else(|| {
                                invalid(
                                    &format!("{key}.readinessProbe.httpGet.path"),
                                    &format!("{:?} is not a path like /healthz", get.path),
                                )
                            })?,
                    ),
                    Some(_) => Probe::Tcp,
                };
                Ok(LocalTarget::Command(CommandTarget {
                    argv,
                    port,
                    env: self.env,
                    working_dir: self.working_dir,
                    probe,
                    stop_grace_period: self
                        .stop_grace_period
                        .map_or(DEFAULT_STOP_GRACE_PERIOD, |d| d.0),
                }))
            }
        }
    }
}

/// A `host:port` upstream address.
fn parse_upstream(key: &str, upstream: &str) -> Result<Authority, Problem> {
    let authority: Authority = upstream
        .parse()
        .map_err(|_| invalid(key, &format!("{upstream:?} is not a host:port address")))?;
    if authority.port_u16().is_none() {
        return Err(invalid(
            key,
            &format!("{upstream:?} has no port; write it like 127.0.0.1:8000"),
        ));
    }
    Ok(authority)
}

/// Accepts `*`, `*.suffix`, host names and IP addresses.
fn validate_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name, a `*.suffix` wildcard or `*`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        match LocalConfig::parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(Problem::Parse(e)) => e.to_string(),
            Err(Problem::Invalid { key, problem }) => format!("{key}: {problem}"),
        }
    }

    #[test]
    fn the_documented_shape_parses() {
        let config = LocalConfig::parse(
            r#"
routes:
  - name: hello
    hosts: ["hello.localhost"]
    pathPrefixes: ["/"]
    target:
      command: ["some-server", "--port", "18001"]
      port: 18001
    scaledownPeriod: 30s
    timeouts: { readiness: 60s }
  - name: always-on
    hosts: ["static.localhost"]
    headers: [{ name: x-canary }, { name: x-user, value: "1" }]
    target:
      upstream: 127.0.0.1:18002
    scaledownPeriod: 120
    keepAwakeMax: 10m
    timeouts: { conditionWait: 2m, responseHeader: 500ms }
"#,
        )
        .unwrap();
        let hello = &config.routes[0];
        assert_eq!(hello.scaledown_period, Duration::from_secs(30));
        assert_eq!(hello.spec.readiness_timeout, Some(Duration::from_secs(60)));
        match &hello.target {
            LocalTarget::Command(c) => {
                assert_eq!(c.port, 18001);
                assert_eq!(c.probe, Probe::Tcp);
                assert_eq!(c.stop_grace_period, DEFAULT_STOP_GRACE_PERIOD);
            }
            other => panic!("wrong target {other:?}"),
        }
        let always = &config.routes[1];
        assert_eq!(always.scaledown_period, Duration::from_secs(120));
        assert_eq!(always.spec.keep_awake_max, Duration::from_secs(600));
        assert_eq!(
            hello.spec.keep_awake_max,
            wakegate_crds::options::DEFAULT_KEEP_AWAKE_MAX
        );
        assert_eq!(
            always.spec.readiness_timeout,
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            always.spec.response_header_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(always.spec.rules[0].headers.len(), 2);
        assert!(matches!(always.target, LocalTarget::Upstream(_)));
    }

    #[test]
    fn problems_name_the_key() {
        let base = |target: &str| format!("routes:\n  - name: a\n    target: {target}\n");
        assert_eq!(
            problem(&base("{ command: [x] }")),
            "routes[0].target.port: is required with `command`: the port the command listens on"
        );
        assert_eq!(
            problem(&base("{}")),
            "routes[0].target: give either `upstream: host:port` or `command: [...]` with `port`"
        );
        assert_eq!(
            problem(&base("{ upstream: localhost }")),
            "routes[0].target.upstream: \"localhost\" has no port; write it like 127.0.0.1:8000"
        );
        assert_eq!(
            problem(&base("{ upstream: \"a:1\", port: 3 }")),
            "routes[0].target.port: applies only to a `command` target"
        );
        assert!(problem(&base("{ comand: [x] }")).contains("unknown field `comand`"));
        assert!(problem(
            "routes:\n  - name: a\n    scaledownPeriod: soon\n    target: { upstream: \"a:1\" }\n"
        )
        .contains("invalid duration \"soon\""));
        assert_eq!(
            problem("routes: []\n"),
            "routes: at least one route is needed"
        );
        assert_eq!(
            problem(
                "routes:\n  - name: a\n    hosts: [\"a b\"]\n    target: { upstream: \"a:1\" }\n"
            ),
            "routes[0].hosts[0]: \"a b\" is not a host name, a `*.suffix` wildcard or `*`"
        );
        assert_eq!(
            problem("routes:\n  - { name: a, target: { upstream: \"a:1\" } }\n  - { name: a, target: { upstream: \"a:1\" } }\n"),
            "routes[1].name: route name \"a\" is used twice"
        );
    }

    #[test]
    fn http_probe_path_is_checked() {
        let text = "routes:\n  - name: a\n    target: { command: [x], port: 1, readinessProbe: { httpGet: { path: healthz } } }\n";
        assert_eq!(
            problem(text),
            "routes[0].target.readinessProbe.httpGet.path: \"healthz\" is not a path like /healthz"
        );
    }
}

/// Property tests: no config text, however wrong, panics the parser, and every rejection names
/// where the problem is.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_yaml::{Mapping, Value};

    /// Scalars that are sometimes right and often wrong for any key.
    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec![
                "a",
                "",
                "a b",
                "\"",
                "30s",
                "2m",
                "-1s",
                "soon",
                "0",
                "127.0.0.1:8000",
                "host",
                "*.x",
                "*",
                "/",
                "/api",
                "h2c",
                "http1",
                "h3",
                "waiting",
                "\u{0}",
                "300",
                "x:99999",
            ])
            .prop_map(|s| Value::String(s.to_owned())),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            (0u16..4).prop_map(|n| Value::Number(n.into())),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            any::<String>().prop_map(Value::String),
        ]
    }

    const KEYS: &[&str] = &[
        "name",
        "hosts",
        "pathPrefixes",
        "headers",
        "target",
        "upstream",
        "command",
        "port",
        "env",
        "workingDir",
        "readinessProbe",
        "httpGet",
        "tcpSocket",
        "path",
        "protocol",
        "tls",
        "serverName",
        "insecureSkipVerify",
        "scaledownPeriod",
        "timeouts",
        "readiness",
        "conditionWait",
        "responseHeader",
        "request",
        "maxInFlightPerEndpoint",
        "maxHeldRequests",
        "keepAwakeMax",
        "failover",
        "timeout",
        "coldStart",
        "waitingPage",
        "refreshSeconds",
        "placeholder",
        "status",
        "contentType",
        "body",
        "value",
        "stopGracePeriod",
        "unknownKey",
    ];

    /// YAML trees built from the config's own keys, nested a few levels.
    fn tree() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(
                    |pairs| {
                        let mut map = Mapping::new();
                        for (k, v) in pairs {
                            map.insert(Value::String(k.to_owned()), v);
                        }
                        Value::Mapping(map)
                    }
                ),
            ]
        })
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        match LocalConfig::parse(text) {
            Ok(config) => {
                prop_assert!(!config.routes.is_empty());
                let mut names = HashSet::new();
                for r in &config.routes {
                    prop_assert!(!r.spec.id.is_empty());
                    prop_assert!(names.insert(r.spec.id.clone()), "duplicate name accepted");
                }
            }
            Err(Problem::Invalid { key, problem }) => {
                prop_assert!(key.starts_with("routes"), "key {key:?} names no place");
                prop_assert!(!problem.is_empty());
            }
            Err(Problem::Parse(e)) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn structured_configs_never_panic_and_errors_name_a_key(
            routes in prop::collection::vec(tree(), 0..4),
        ) {
            let mut root = Mapping::new();
            root.insert(Value::String("routes".into()), Value::Sequence(routes));
            let text = serde_yaml::to_string(&Value::Mapping(root)).unwrap();
            check(&text)?;
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            check(&text)?;
        }

        #[test]
        fn nearly_valid_routes_are_accepted_or_named(
            name in prop::sample::select(vec!["a", "b", "", "two words"]),
            upstream in prop::sample::select(vec!["127.0.0.1:8000", "127.0.0.1", "[::1]:80", "no port", ":1"]),
            host in prop::sample::select(vec!["a.test", "*.test", "*", "bad host", ""]),
            readiness in prop::sample::select(vec!["30s", "1m 30s", "5", "-1", "never"]),
            held in prop::sample::select(vec!["1", "0", "100", "-5"]),
        ) {
            let text = format!(
                "routes:\n  - name: \"{name}\"\n    hosts: [\"{host}\"]\n    timeouts: {{ readiness: \"{readiness}\" }}\n    maxHeldRequests: {held}\n    target: {{ upstream: \"{upstream}\" }}\n"
            );
            check(&text)?;
        }
    }
}
