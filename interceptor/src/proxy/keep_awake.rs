//! `Wakegate-Keep-Awake`: a backend's way to say "I am still working" after its response.
//!
//! A response carrying `Wakegate-Keep-Awake: <duration>` (seconds, `90s`, `10m`) keeps the
//! route's target up for at least that long from now, even with no request in flight; `0`
//! releases it. The header is the interceptor's business only: it is removed before the
//! response reaches the client, on every kind of response (HTTP/1.1, h2, and the 101 of an
//! upgrade), and what it asks for is capped by the route's `keepAwakeMax`. The deadline itself
//! lives in the route's [`RouteLoad`](crate::load::RouteLoad), where scale-down reads it.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::load::RouteLoad;
use crate::provider::{Endpoint, RouteSpec};

/// The response header.
pub static KEEP_AWAKE: HeaderName = HeaderName::from_static("wakegate-keep-awake");

/// What a response asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// Keep the target up this long from now; zero releases.
    For(Duration),
    /// A value that is not a duration.
    Unreadable(HeaderValue),
}

/// Removes every `Wakegate-Keep-Awake` line from a response, and reads the last one (a backend
/// that sends two means the later).
pub fn take(headers: &mut HeaderMap) -> Option<Asked> {
    // Fast path: almost no response carries it. One pass over the names present (a few)
    // costs less than hashing the name for a lookup.
    if !headers.keys().any(|name| name == KEEP_AWAKE) {
        return None;
    }
    let value = match headers.entry(&KEEP_AWAKE) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1.last()?,
        http::header::Entry::Vacant(_) => return None,
    };
    let parsed = value
        .to_str()
        .ok()
        .and_then(wakegate_crds::options::parse_seconds_or_duration);
    Some(match parsed {
        Some(d) => Asked::For(d),
        None => Asked::Unreadable(value),
    })
}

/// Applies what `endpoint` of `spec`'s target asked for to the route's load.
pub fn record(spec: &RouteSpec, load: &RouteLoad, endpoint: &Endpoint, asked: Asked) {
    match asked {
        Asked::Unreadable(value) => {
            tracing::warn!(
                route = %spec.id,
                value = %String::from_utf8_lossy(value.as_bytes()).escape_debug(),
                "ignoring a Wakegate-Keep-Awake header that is not a duration (write 600, 90s or 10m)"
            );
        }
        Asked::For(_) if spec.keep_awake_max.is_zero() => {
            tracing::debug!(route = %spec.id, "keep-awake is off for this route (keepAwakeMax 0)");
        }
        Asked::For(asked) => {
            let granted = asked.min(spec.keep_awake_max);
            if granted < asked {
                tracing::debug!(route = %spec.id, asked_s = asked.as_secs(), max_s = spec.keep_awake_max.as_secs(), "keep-awake capped by keepAwakeMax");
            }
            tracing::debug!(route = %spec.id, %endpoint, keep_awake_ms = granted.as_millis() as u64, "backend asked to be kept awake");
            load.keep_awake(endpoint, granted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        for v in values {
            h.append(&KEEP_AWAKE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_header_is_always_removed_and_the_last_value_wins() {
        let mut h = response(&[]);
        assert_eq!(take(&mut h), None);
        assert_eq!(h.len(), 1);

        let mut h = response(&["90"]);
        assert_eq!(take(&mut h), Some(Asked::For(Duration::from_secs(90))));
        assert!(!h.contains_key(&KEEP_AWAKE));
        assert_eq!(h.len(), 1, "other headers stay");

        let mut h = response(&["10s", "10m"]);
        assert_eq!(take(&mut h), Some(Asked::For(Duration::from_secs(600))));
        assert!(!h.contains_key(&KEEP_AWAKE));

        let mut h = response(&["0"]);
        assert_eq!(take(&mut h), Some(Asked::For(Duration::ZERO)));

        let mut h = response(&["until done"]);
        assert!(matches!(take(&mut h), Some(Asked::Unreadable(_))));
        assert!(
            !h.contains_key(&KEEP_AWAKE),
            "an unreadable one is removed too"
        );
    }
}
