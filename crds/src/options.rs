//! Wakegate's own per-route options, carried as `wakegate.dev/*` annotations on an
//! HTTPScaledObject or an InterceptorRoute. Annotations keep the spec identical to the add-on's,
//! so its manifests (and its CRDs, if installed) still fit, while Wakegate's extra behaviour
//! stays opt-in. Where the add-on now has a field for the same thing (an InterceptorRoute's
//! `coldStart.placeholder` and `maxPendingRequests`), the field wins.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::validate::SpecError;
use crate::Workload;

/// The annotation prefix.
pub const PREFIX: &str = "wakegate.dev/";
/// `waiting-page` or `placeholder`: what a request for a cold target gets instead of waiting.
pub const COLD_START_RESPONSE: &str = "wakegate.dev/cold-start-response";
/// Seconds between the waiting page's refreshes (default 2).
pub const WAITING_PAGE_REFRESH: &str = "wakegate.dev/waiting-page-refresh-seconds";
/// The placeholder's status (default 503).
pub const PLACEHOLDER_STATUS: &str = "wakegate.dev/placeholder-status";
/// The placeholder's content type (default `text/plain; charset=utf-8`).
pub const PLACEHOLDER_CONTENT_TYPE: &str = "wakegate.dev/placeholder-content-type";
/// The placeholder's body.
pub const PLACEHOLDER_BODY: &str = "wakegate.dev/placeholder-body";
/// Most requests held at once for the route; past it, 503 with Retry-After.
pub const MAX_HELD_REQUESTS: &str = "wakegate.dev/max-held-requests";
/// Most requests in flight per endpoint, spreading a release over endpoints.
pub const MAX_IN_FLIGHT_PER_ENDPOINT: &str = "wakegate.dev/max-in-flight-per-endpoint";
/// The longest a backend's `Wakegate-Keep-Awake` response header may keep the route up, as a
/// duration (`30m`) or seconds (default 1h; `0` ignores the header).
pub const KEEP_AWAKE_MAX: &str = "wakegate.dev/keep-awake-max";
/// The keep-awake cap when a route sets none: long enough for a long download or a batch job,
/// short enough that a backend which forgets to release it costs an hour, not forever.
pub const DEFAULT_KEEP_AWAKE_MAX: Duration = Duration::from_secs(3600);

/// InterceptorRoute, standalone mode: the workload to scale, `[apiVersion/]Kind/name` (e.g.
/// `Deployment/my-app`; `apps/v1` for Deployments and StatefulSets).
pub const SCALE_TARGET_REF: &str = "wakegate.dev/scale-target-ref";
/// InterceptorRoute, standalone mode: fewest replicas (default 0).
pub const MIN_REPLICAS: &str = "wakegate.dev/min-replicas";
/// InterceptorRoute, standalone mode: most replicas (default 100).
pub const MAX_REPLICAS: &str = "wakegate.dev/max-replicas";
/// InterceptorRoute, standalone mode: idle seconds before scaling in (default 300, like a
/// ScaledObject's `cooldownPeriod`).
pub const SCALEDOWN_PERIOD: &str = "wakegate.dev/scaledown-period";
/// InterceptorRoute, standalone mode: seconds after creation before scaling in (default 0).
pub const INITIAL_COOLDOWN_PERIOD: &str = "wakegate.dev/initial-cooldown-period";

/// The standalone workload annotations, which only an InterceptorRoute may carry.
pub const STANDALONE_WORKLOAD: [&str; 5] = [
    SCALE_TARGET_REF,
    MIN_REPLICAS,
    MAX_REPLICAS,
    SCALEDOWN_PERIOD,
    INITIAL_COOLDOWN_PERIOD,
];

const KNOWN: [&str; 13] = [
    COLD_START_RESPONSE,
    WAITING_PAGE_REFRESH,
    PLACEHOLDER_STATUS,
    PLACEHOLDER_CONTENT_TYPE,
    PLACEHOLDER_BODY,
    MAX_HELD_REQUESTS,
    MAX_IN_FLIGHT_PER_ENDPOINT,
    KEEP_AWAKE_MAX,
    SCALE_TARGET_REF,
    MIN_REPLICAS,
    MAX_REPLICAS,
    SCALEDOWN_PERIOD,
    INITIAL_COOLDOWN_PERIOD,
];

/// An InterceptorRoute's workload from its standalone annotations: `None` without
/// `wakegate.dev/scale-target-ref` (the user's ScaledObject scales it, or nothing does), and an
/// error for a bound without it.
pub fn standalone_workload(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Workload>, SpecError> {
    let Some(target) = annotations.get(SCALE_TARGET_REF).map(|t| t.trim()) else {
        if let Some(k) = STANDALONE_WORKLOAD
            .iter()
            .find(|k| annotations.contains_key(**k))
        {
            return Err(bad(k, format!("has no effect without {SCALE_TARGET_REF}")));
        }
        return Ok(None);
    };
    let parts: Vec<&str> = target.split('/').collect();
    let (api_version, kind, name) = match parts.as_slice() {
        [kind, name] => {
            let api = match *kind {
                "Deployment" | "StatefulSet" | "ReplicaSet" => "apps/v1",
                _ => {
                    return Err(bad(
                        SCALE_TARGET_REF,
                        format!(
                        "{target:?}: give the apiVersion for a {kind} (group/version/{kind}/name)"
                    ),
                    ))
                }
            };
            (api.to_owned(), *kind, *name)
        }
        [version, kind, name] => ((*version).to_owned(), *kind, *name),
        [group, version, kind, name] => (format!("{group}/{version}"), *kind, *name),
        _ => {
            return Err(bad(
                SCALE_TARGET_REF,
                format!("{target:?} is not Kind/name or apiVersion/Kind/name"),
            ))
        }
    };
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !dns_label(name) || kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad(
            SCALE_TARGET_REF,
            format!("{target:?} is not Kind/name or apiVersion/Kind/name"),
        ));
    }
    let int = |key: &str, default: i32| -> Result<i32, SpecError> {
        match annotations.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad(key, format!("{v:?} is not a whole number from 0"))),
        }
    };
    let min_replicas = int(MIN_REPLICAS, 0)?;
    let max_replicas = int(MAX_REPLICAS, crate::DEFAULT_MAX_REPLICAS)?;
    if max_replicas < 1 {
        return Err(bad(MAX_REPLICAS, "must be at least 1"));
    }
    if min_replicas > max_replicas {
        return Err(bad(
            MIN_REPLICAS,
            format!("{min_replicas} is greater than {MAX_REPLICAS} ({max_replicas})"),
        ));
    }
    let secs = |key: &str, default: i32| int(key, default).map(|s| Duration::from_secs(s as u64));
    Ok(Some(Workload {
        api_version,
        kind: kind.to_owned(),
        name: name.to_owned(),
        min_replicas,
        max_replicas,
        scaledown_period: secs(SCALEDOWN_PERIOD, crate::DEFAULT_SCALEDOWN_PERIOD_SECONDS)?,
        initial_cooldown: secs(INITIAL_COOLDOWN_PERIOD, 0)?,
    }))
}

/// Per-route options from annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// What a request for a cold target gets instead of being held.
    pub cold_start: Option<ColdStart>,
    /// Cap on requests held at once.
    pub max_held_requests: Option<NonZeroUsize>,
    /// Cap on requests in flight per endpoint.
    pub max_in_flight_per_endpoint: Option<NonZeroUsize>,
    /// Cap on what a backend's keep-awake header may ask for; `None` for the default.
    pub keep_awake_max: Option<Duration>,
}

/// An answer given while the target wakes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColdStart {
    /// A self-refreshing page for browsers; API clients are still held.
    WaitingPage {
        /// Seconds between refreshes.
        refresh_seconds: u32,
    },
    /// A fixed response for every request.
    Placeholder {
        /// Status, 200-999.
        status: u16,
        /// Content type (a valid header value).
        content_type: String,
        /// Body.
        body: String,
    },
}

fn bad(key: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: format!("metadata.annotations[{key:?}]"),
        problem: problem.into(),
    }
}

fn count(
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<NonZeroUsize>, SpecError> {
    annotations
        .get(key)
        .map(|v| {
            v.trim()
                .parse::<NonZeroUsize>()
                .map_err(|_| bad(key, format!("{v:?} is not a whole number above 0")))
        })
        .transpose()
}

/// A duration given as whole or decimal seconds (`90`, `1.5`) or in Go's form (`90s`, `10m`,
/// `1h30m`): how a keep-awake header and its cap are written.
pub fn parse_seconds_or_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return value
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
    }
    crate::duration::parse_go_duration(value).ok()
}

/// Whether `value` can be sent as a header value (visible ASCII, spaces and tabs).
fn header_safe(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

impl RouteOptions {
    /// Reads the `wakegate.dev/*` annotations. An unknown `wakegate.dev/` key is an error, so a
    /// typo does not silently do nothing.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, SpecError> {
        if let Some(unknown) = annotations
            .keys()
            .find(|k| k.starts_with(PREFIX) && !KNOWN.contains(&k.as_str()))
        {
            return Err(bad(
                unknown,
                format!("is not a Wakegate annotation (known: {})", KNOWN.join(", ")),
            ));
        }
        let placeholder_keys = [
            PLACEHOLDER_STATUS,
            PLACEHOLDER_CONTENT_TYPE,
            PLACEHOLDER_BODY,
        ];
        let cold_start = match annotations.get(COLD_START_RESPONSE).map(|v| v.trim()) {
            None => {
                if let Some(k) = placeholder_keys
                    .iter()
                    .chain([&WAITING_PAGE_REFRESH])
                    .find(|k| annotations.contains_key(**k))
                {
                    return Err(bad(
                        k,
                        format!("has no effect without {COLD_START_RESPONSE}"),
                    ));
                }
                None
            }
            Some("waiting-page") => {
                if let Some(k) = placeholder_keys
                    .iter()
                    .find(|k| annotations.contains_key(**k))
                {
                    return Err(bad(k, "applies to the placeholder, not the waiting page"));
                }
                let refresh_seconds = match annotations.get(WAITING_PAGE_REFRESH) {
                    None => 2,
                    Some(v) => v
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|s| (1..=3600).contains(s))
                        .ok_or_else(|| {
                            bad(
                                WAITING_PAGE_REFRESH,
                                format!("{v:?} is not a number of seconds from 1 to 3600"),
                            )
                        })?,
                };
                Some(ColdStart::WaitingPage { refresh_seconds })
            }
            Some("placeholder") => {
                if annotations.contains_key(WAITING_PAGE_REFRESH) {
                    return Err(bad(
                        WAITING_PAGE_REFRESH,
                        "applies to the waiting page, not the placeholder",
                    ));
                }
                let status = match annotations.get(PLACEHOLDER_STATUS) {
                    None => 503,
                    Some(v) => v
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|s| (200..=999).contains(s))
                        .ok_or_else(|| {
                            bad(
                                PLACEHOLDER_STATUS,
                                format!("{v:?} is not an HTTP status from 200 to 999"),
                            )
                        })?,
                };
                let content_type = annotations
                    .get(PLACEHOLDER_CONTENT_TYPE)
                    .cloned()
                    .unwrap_or_else(|| "text/plain; charset=utf-8".to_owned());
                if !header_safe(&content_type) {
                    return Err(bad(PLACEHOLDER_CONTENT_TYPE, "is not a valid header value"));
                }
                Some(ColdStart::Placeholder {
                    status,
                    content_type,
                    body: annotations
                        .get(PLACEHOLDER_BODY)
                        .cloned()
                        .unwrap_or_default(),
                })
            }
            Some(other) => {
                return Err(bad(
                    COLD_START_RESPONSE,
                    format!("{other:?} is not `waiting-page` or `placeholder`"),
                ))
            }
        };
        Ok(Self {
            cold_start,
            max_held_requests: count(annotations, MAX_HELD_REQUESTS)?,
            max_in_flight_per_endpoint: count(annotations, MAX_IN_FLIGHT_PER_ENDPOINT)?,
            keep_awake_max: annotations
                .get(KEEP_AWAKE_MAX)
                .map(|v| {
                    parse_seconds_or_duration(v).ok_or_else(|| {
                        bad(
                            KEEP_AWAKE_MAX,
                            format!("{v:?} is not a duration like 30m or a number of seconds"),
                        )
                    })
                })
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<RouteOptions, String> {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        RouteOptions::from_annotations(&map).map_err(|e| e.to_string())
    }

    #[test]
    fn no_annotations_no_options_and_foreign_ones_are_ignored() {
        assert_eq!(parse(&[]).unwrap(), RouteOptions::default());
        assert_eq!(
            parse(&[("example.com/anything", "x")]).unwrap(),
            RouteOptions::default()
        );
    }

    #[test]
    fn waiting_page_placeholder_and_caps() {
        assert_eq!(
            parse(&[(COLD_START_RESPONSE, "waiting-page")])
                .unwrap()
                .cold_start,
            Some(ColdStart::WaitingPage { refresh_seconds: 2 })
        );
        let o = parse(&[
            (COLD_START_RESPONSE, "placeholder"),
            (PLACEHOLDER_STATUS, "200"),
            (PLACEHOLDER_BODY, "back soon"),
            (MAX_HELD_REQUESTS, "100"),
            (MAX_IN_FLIGHT_PER_ENDPOINT, "8"),
        ])
        .unwrap();
        assert_eq!(
            o.cold_start,
            Some(ColdStart::Placeholder {
                status: 200,
                content_type: "text/plain; charset=utf-8".into(),
                body: "back soon".into()
            })
        );
        assert_eq!(o.max_held_requests, NonZeroUsize::new(100));
        assert_eq!(o.max_in_flight_per_endpoint, NonZeroUsize::new(8));
        assert_eq!(o.keep_awake_max, None);
        let o = parse(&[(KEEP_AWAKE_MAX, "30m")]).unwrap();
        assert_eq!(o.keep_awake_max, Some(Duration::from_secs(1800)));
        let o = parse(&[(KEEP_AWAKE_MAX, "90")]).unwrap();
        assert_eq!(o.keep_awake_max, Some(Duration::from_secs(90)));
    }

    #[test]
    fn seconds_or_durations() {
        let ok = |s: &str| parse_seconds_or_duration(s);
        assert_eq!(ok("90"), Some(Duration::from_secs(90)));
        assert_eq!(ok(" 1.5 "), Some(Duration::from_millis(1500)));
        assert_eq!(ok("0"), Some(Duration::ZERO));
        assert_eq!(ok("10m"), Some(Duration::from_secs(600)));
        assert_eq!(ok("1h30m"), Some(Duration::from_secs(5400)));
        for bad in ["", "soon", "-1", "1e9999", "10 m", "."] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mistakes_name_the_annotation() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("wakegate.dev/waiting-page", "true")],
                "is not a Wakegate annotation",
            ),
            (
                &[(COLD_START_RESPONSE, "page")],
                "is not `waiting-page` or `placeholder`",
            ),
            (&[(PLACEHOLDER_BODY, "x")], "has no effect without"),
            (
                &[
                    (COLD_START_RESPONSE, "waiting-page"),
                    (PLACEHOLDER_STATUS, "200"),
                ],
                "applies to the placeholder",
            ),
            (
                &[
                    (COLD_START_RESPONSE, "placeholder"),
                    (PLACEHOLDER_STATUS, "99"),
                ],
                "is not an HTTP status",
            ),
            (
                &[
                    (COLD_START_RESPONSE, "waiting-page"),
                    (WAITING_PAGE_REFRESH, "0"),
                ],
                "from 1 to 3600",
            ),
            (&[(MAX_HELD_REQUESTS, "0")], "above 0"),
            (&[(KEEP_AWAKE_MAX, "forever")], "not a duration like 30m"),
            (&[(KEEP_AWAKE_MAX, "-5s")], "not a duration like 30m"),
            (
                &[
                    (COLD_START_RESPONSE, "placeholder"),
                    (PLACEHOLDER_CONTENT_TYPE, "a\nb"),
                ],
                "not a valid header value",
            ),
        ];
        for (pairs, expected) in cases {
            let err = parse(pairs).unwrap_err();
            assert!(
                err.starts_with("metadata.annotations[\"wakegate.dev/"),
                "{err}"
            );
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }
}
