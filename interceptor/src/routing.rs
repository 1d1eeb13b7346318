//! The routing table: which route a request belongs to, by host, path prefix and headers.
//!
//! The table is built once from a full set of routes and never mutated; the proxy swaps a new
//! table in whole when routes change. Precedence follows the KEDA HTTP Add-on: exact host with the
//! longest matching path prefix, then wildcard hosts from most to least specific, then the
//! catch-all. Among routes with the same host and prefix, more header matchers win, then more
//! valued matchers, then the route given first (providers order routes oldest first).

use std::borrow::Cow;
use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};

/// What a route matches on: the same fields as an HTTPScaledObject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Hosts: exact names, `*.suffix` wildcards, or `*`. Empty means any host.
    pub hosts: Vec<String>,
    /// Path prefixes matched on whole segments. Empty means `/`.
    pub path_prefixes: Vec<String>,
    /// Headers that must all be present (and equal, when a value is given).
    pub headers: Vec<HeaderMatch>,
}

/// One header matcher: the header must be present, and equal `value` when one is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Header name (case-insensitive by construction).
    pub name: HeaderName,
    /// Required value, compared exactly; `None` means "present with any value".
    pub value: Option<HeaderValue>,
}

/// An immutable routing table mapping requests to values of type `T`.
#[derive(Debug)]
pub struct RouteTable<T> {
    exact: HashMap<Box<str>, Vec<Entry>>,
    /// Keyed by the suffix after `*.`, e.g. `example.com` for `*.example.com`.
    wildcard: HashMap<Box<str>, Vec<Entry>>,
    catch_all: Vec<Entry>,
    values: Vec<T>,
}

#[derive(Debug)]
struct Entry {
    prefix: Box<str>,
    headers: Box<[HeaderMatch]>,
    valued: usize,
    /// Index into `values`; also the tie-breaker (earlier routes win).
    index: usize,
}

impl Entry {
    fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        path_has_prefix(path, &self.prefix)
            && self.headers.iter().all(|m| match headers.get(&m.name) {
                None => false,
                Some(v) => m.value.as_ref().is_none_or(|want| want == v),
            })
    }

    /// Sort key: longest prefix first, then more header matchers, then more valued matchers,
    /// then the route that came first.
    fn precedence(
        &self,
    ) -> (
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
        usize,
    ) {
        use std::cmp::Reverse;
        (
            Reverse(self.prefix.len()),
            Reverse(self.headers.len()),
            Reverse(self.valued),
            self.index,
        )
    }
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            catch_all: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Builds a table. Routes given earlier win ties, so callers pass them oldest first.
    pub fn build(routes: impl IntoIterator<Item = (RouteMatch, T)>) -> Self {
        Self::build_rules(routes.into_iter().map(|(m, value)| (vec![m], value)))
    }

    /// Builds a table of routes with several rules each, OR'd (an InterceptorRoute's): a
    /// request matching any rule of a route belongs to it, and each rule takes its place in
    /// the precedence on its own. Routes given earlier win ties.
    pub fn build_rules(routes: impl IntoIterator<Item = (Vec<RouteMatch>, T)>) -> Self {
        let mut table = Self::default();
        for (index, (matchers, value)) in routes.into_iter().enumerate() {
            table.values.push(value);
            for matcher in matchers {
                table.add(index, &matcher);
            }
        }
        let sort = |entries: &mut Vec<Entry>| entries.sort_by_key(Entry::precedence);
        table.exact.values_mut().for_each(sort);
        table.wildcard.values_mut().for_each(sort);
        sort(&mut table.catch_all);
        table
    }

    fn add(&mut self, index: usize, matcher: &RouteMatch) {
        let prefixes: Vec<Box<str>> = if matcher.path_prefixes.is_empty() {
            vec!["/".into()]
        } else {
            matcher
                .path_prefixes
                .iter()
                .map(|p| normalize_prefix(p))
                .collect()
        };
        let headers: Box<[HeaderMatch]> = matcher.headers.clone().into_boxed_slice();
        let valued = headers.iter().filter(|h| h.value.is_some()).count();
        let entries = prefixes.into_iter().map(|prefix| Entry {
            prefix,
            headers: headers.clone(),
            valued,
            index,
        });
        if matcher.hosts.is_empty() {
            self.catch_all.extend(entries);
            return;
        }
        let entries: Vec<Entry> = entries.collect();
        for host in &matcher.hosts {
            let host = host.trim().to_ascii_lowercase();
            let bucket = if host == "*" {
                &mut self.catch_all
            } else if let Some(suffix) = host.strip_prefix("*.") {
                self.wildcard.entry(suffix.into()).or_default()
            } else {
                self.exact
                    .entry(host.trim_end_matches('.').into())
                    .or_default()
            };
            bucket.extend(entries.iter().map(|e| Entry {
                prefix: e.prefix.clone(),
                headers: e.headers.clone(),
                valued: e.valued,
                index: e.index,
            }));
        }
    }

    /// Finds the route for a request. `host` is the raw Host header or authority; its port is
    /// ignored and it is compared case-insensitively.
    pub fn lookup(&self, host: &str, path: &str, headers: &HeaderMap) -> Option<&T> {
        let host = normalize_host(host);
        let host: &str = &host;
        fn first<'e>(entries: &'e [Entry], path: &str, headers: &HeaderMap) -> Option<&'e Entry> {
            entries.iter().find(|e| e.matches(path, headers))
        }
        let found = self
            .exact
            .get(host)
            .and_then(|entries| first(entries, path, headers))
            .or_else(|| {
                if self.wildcard.is_empty() {
                    return None;
                }
                // Most specific suffix first: for a.b.example.com try b.example.com, then
                // example.com, then com.
                host.match_indices('.').find_map(|(dot, _)| {
                    self.wildcard
                        .get(&host[dot + 1..])
                        .and_then(|entries| first(entries, path, headers))
                })
            })
            .or_else(|| first(&self.catch_all, path, headers))?;
        self.values.get(found.index)
    }

    /// All values in the order they were given.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }

    /// Number of routes in the table.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Whether `path` is under `prefix` on a whole-segment boundary: `/api` matches `/api` and
/// `/api/x` but not `/apix`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Gives a prefix a leading slash and drops trailing ones, so `api/` and `/api` are the same.
fn normalize_prefix(prefix: &str) -> Box<str> {
    let trimmed = prefix.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else if trimmed.starts_with('/') {
        trimmed.into()
    } else {
        format!("/{trimmed}").into()
    }
}

/// Lowercases a Host header value and removes its port and any trailing dot. Allocates only when
/// the host has upper-case letters.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let without_port = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split_once(']').map_or(raw, |(ip, _)| ip)
    } else {
        // A port is the digits after the last `:`: walked back over from the end, which for a
        // name without a port stops at its last byte (this runs for every request).
        let bytes = raw.as_bytes();
        let digits = bytes
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let colon = bytes.len() - digits;
        match colon.checked_sub(1) {
            Some(at) if bytes[at] == b':' => &raw[..at],
            _ => raw,
        }
    };
    let host = without_port.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixture builder: `route().host("a.example").path("/api")`.
    #[derive(Default, Clone)]
    struct R(RouteMatch);

    fn route() -> R {
        R::default()
    }

    impl R {
        fn host(mut self, h: &str) -> Self {
            self.0.hosts.push(h.into());
            self
        }
        fn path(mut self, p: &str) -> Self {
            self.0.path_prefixes.push(p.into());
            self
        }
        fn header(mut self, name: &str, value: Option<&str>) -> Self {
            self.0.headers.push(HeaderMatch {
                name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value: value.map(|v| HeaderValue::from_str(v).unwrap()),
            });
            self
        }
    }

    fn table(routes: Vec<(&'static str, R)>) -> RouteTable<&'static str> {
        RouteTable::build(routes.into_iter().map(|(name, r)| (r.0, name)))
    }

    fn get<'t>(t: &'t RouteTable<&'static str>, host: &str, path: &str) -> Option<&'t str> {
        t.lookup(host, path, &HeaderMap::new()).copied()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn rules_of_one_route_are_ored_and_each_keeps_its_own_precedence() {
        let t = RouteTable::build_rules(vec![
            (
                vec![
                    route().host("a.example.com").path("/api").0,
                    route()
                        .host("b.example.com")
                        .header("x-tenant", Some("acme"))
                        .0,
                ],
                "multi",
            ),
            (vec![route().host("a.example.com").0], "a-root"),
            (vec![route().host("b.example.com").0], "b-root"),
        ]);
        assert_eq!(get(&t, "a.example.com", "/api/x"), Some("multi"));
        assert_eq!(get(&t, "a.example.com", "/other"), Some("a-root"));
        // Host AND headers within a rule: the header alone, or the host alone, is not enough.
        assert_eq!(get(&t, "b.example.com", "/"), Some("b-root"));
        assert_eq!(
            t.lookup("b.example.com", "/", &headers(&[("x-tenant", "acme")]))
                .copied(),
            Some("multi")
        );
        assert_eq!(
            t.lookup("c.example.com", "/api", &headers(&[("x-tenant", "acme")]))
                .copied(),
            None
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn exact_host_is_case_insensitive_and_ignores_port() {
        let t = table(vec![("a", route().host("App.Example.com"))]);
        assert_eq!(get(&t, "app.example.com", "/"), Some("a"));
        assert_eq!(get(&t, "APP.example.COM:8080", "/x"), Some("a"));
        assert_eq!(get(&t, "app.example.com.", "/"), Some("a"));
        assert_eq!(get(&t, "other.example.com", "/"), None);
    }

    #[test]
    fn path_prefix_matches_whole_segments_and_longest_wins() {
        let t = table(vec![
            ("root", route().host("h")),
            ("api", route().host("h").path("/api")),
            ("v2", route().host("h").path("/api/v2/")),
        ]);
        assert_eq!(get(&t, "h", "/api"), Some("api"));
        assert_eq!(get(&t, "h", "/api/x"), Some("api"));
        assert_eq!(get(&t, "h", "/apix"), Some("root"));
        assert_eq!(get(&t, "h", "/api/v2"), Some("v2"));
        assert_eq!(get(&t, "h", "/api/v2/users"), Some("v2"));
        assert_eq!(get(&t, "h", "/api/v20"), Some("api"));
    }

    #[test]
    fn path_without_root_route_does_not_match() {
        let t = table(vec![("api", route().host("h").path("api"))]);
        assert_eq!(get(&t, "h", "/api/1"), Some("api"));
        assert_eq!(get(&t, "h", "/"), None);
    }

    #[test]
    fn wildcards_from_most_to_least_specific_then_catch_all() {
        let t = table(vec![
            ("any", route().host("*")),
            ("com", route().host("*.com")),
            ("example", route().host("*.example.com")),
            ("exact", route().host("a.example.com")),
        ]);
        assert_eq!(get(&t, "a.example.com", "/"), Some("exact"));
        assert_eq!(get(&t, "b.example.com", "/"), Some("example"));
        assert_eq!(get(&t, "x.b.example.com", "/"), Some("example"));
        assert_eq!(get(&t, "example.com", "/"), Some("com"));
        assert_eq!(get(&t, "localhost", "/"), Some("any"));
    }

    #[test]
    fn exact_host_without_matching_path_falls_through_to_wildcard() {
        let t = table(vec![
            ("exact-api", route().host("a.example.com").path("/api")),
            ("wild", route().host("*.example.com")),
        ]);
        assert_eq!(get(&t, "a.example.com", "/api/1"), Some("exact-api"));
        assert_eq!(get(&t, "a.example.com", "/web"), Some("wild"));
    }

    #[test]
    fn empty_hosts_mean_any_host() {
        let t = table(vec![("all", route()), ("h", route().host("h"))]);
        assert_eq!(get(&t, "h", "/"), Some("h"));
        assert_eq!(get(&t, "z", "/"), Some("all"));
        assert_eq!(get(&t, "", "/"), Some("all"));
    }

    #[test]
    fn header_matchers_all_must_match_and_more_specific_sets_win() {
        let t = table(vec![
            ("plain", route().host("h")),
            ("present", route().host("h").header("x-canary", None)),
            ("valued", route().host("h").header("x-canary", Some("yes"))),
            (
                "two",
                route()
                    .host("h")
                    .header("x-canary", None)
                    .header("x-user", None),
            ),
        ]);
        let lookup = |pairs: &[(&str, &str)]| t.lookup("h", "/", &headers(pairs)).copied();
        assert_eq!(lookup(&[]), Some("plain"));
        assert_eq!(lookup(&[("x-canary", "no")]), Some("present"));
        assert_eq!(lookup(&[("x-canary", "yes")]), Some("valued"));
        assert_eq!(lookup(&[("x-canary", "no"), ("x-user", "1")]), Some("two"));
        assert_eq!(lookup(&[("X-User", "1")]), Some("plain"));
    }

    #[test]
    fn path_beats_headers_and_older_route_wins_ties() {
        let t = table(vec![
            ("old", route().host("h").path("/a")),
            ("new", route().host("h").path("/a")),
            ("hdr", route().host("h").header("x", None)),
        ]);
        let h = headers(&[("x", "1")]);
        assert_eq!(t.lookup("h", "/a/b", &h).copied(), Some("old"));
        assert_eq!(t.lookup("h", "/b", &h).copied(), Some("hdr"));
    }

    #[test]
    fn normalize_host_handles_ipv6_and_ports() {
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("[::1]"), "::1");
        assert_eq!(normalize_host("Example.COM"), "example.com");
        assert_eq!(normalize_host("host:notaport"), "host:notaport");
        assert_eq!(normalize_host("a.test:8080"), "a.test");
        assert_eq!(normalize_host("a.test:"), "a.test");
        assert_eq!(normalize_host("a.test."), "a.test");
        assert_eq!(normalize_host("a:b:80"), "a:b");
        assert_eq!(normalize_host("8080"), "8080");
        assert_eq!(normalize_host(":80"), "");
        assert_eq!(normalize_host(""), "");
    }

    #[test]
    fn many_hosts_share_one_route_value() {
        let t = table(vec![(
            "r",
            route().host("a").host("*.b").path("/x").path("/y"),
        )]);
        assert_eq!(t.len(), 1);
        assert_eq!(get(&t, "a", "/y/1"), Some("r"));
        assert_eq!(get(&t, "c.b", "/x"), Some("r"));
        assert_eq!(get(&t, "a", "/z"), None);
    }
}

/// Property tests: the table against a plain reference implementation of the documented
/// precedence, over random tables and requests drawn from small alphabets (so routes collide),
/// and lookups of arbitrary strings. `PROPTEST_CASES` sets how many cases each property runs.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const HOSTS: &[&str] = &[
        "a.example",
        "A.Example.",
        "b.example",
        "*.example",
        "*.a.example",
        "*",
        "[::1]",
    ];
    const PREFIXES: &[&str] = &["/", "/api", "api/", "/api/v2", "/apix", "/api/v2/"];
    const REQUEST_HOSTS: &[&str] = &[
        "a.example",
        "A.EXAMPLE.:8080",
        "x.a.example",
        "y.x.a.example",
        "b.example",
        "c.example",
        "example",
        "other",
        "[::1]:80",
        "",
    ];
    const PATHS: &[&str] = &[
        "/",
        "/api",
        "/api/",
        "/api/v2",
        "/api/v2/x",
        "/apix",
        "/x",
        "",
    ];

    fn header_match() -> impl Strategy<Value = HeaderMatch> {
        (
            prop::sample::select(vec!["x-a", "x-b"]),
            prop::option::of(prop::sample::select(vec!["1", "2"])),
        )
            .prop_map(|(name, value)| HeaderMatch {
                name: HeaderName::from_static(name),
                value: value.map(HeaderValue::from_static),
            })
    }

    fn route_match() -> impl Strategy<Value = RouteMatch> {
        (
            prop::collection::vec(prop::sample::select(HOSTS), 0..3),
            prop::collection::vec(prop::sample::select(PREFIXES), 0..3),
            prop::collection::vec(header_match(), 0..3),
        )
            .prop_map(|(hosts, prefixes, headers)| RouteMatch {
                hosts: hosts.into_iter().map(str::to_owned).collect(),
                path_prefixes: prefixes.into_iter().map(str::to_owned).collect(),
                headers,
            })
    }

    fn request_headers() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec(
            (
                prop::sample::select(vec!["x-a", "x-b", "x-c"]),
                prop::sample::select(vec!["1", "2", "3"]),
            ),
            0..3,
        )
        .prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            map
        })
    }

    /// Which host bucket a route host falls in, for a normalised request host: 0 exact, then
    /// 1.. for wildcards by how specific the suffix is (fewer labels stripped first), then the
    /// catch-all last. `None` when it does not apply to this host.
    fn host_rank(route_host: Option<&str>, host: &str) -> Option<usize> {
        let Some(route_host) = route_host else {
            return Some(usize::MAX);
        };
        let route_host = route_host.trim().to_ascii_lowercase();
        if route_host == "*" {
            return Some(usize::MAX);
        }
        if let Some(suffix) = route_host.strip_prefix("*.") {
            return host
                .match_indices('.')
                .position(|(dot, _)| &host[dot + 1..] == suffix)
                .map(|i| i + 1);
        }
        (route_host.trim_end_matches('.') == host).then_some(0)
    }

    /// Host bucket, then (reversed) prefix length, header matchers and valued ones, then index.
    type Rank = (
        usize,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
        usize,
    );

    /// The documented precedence, computed by brute force over every (host, prefix) a route
    /// has: the best host bucket that has any match, then longest prefix, most header
    /// matchers, most valued ones, earliest route.
    fn reference(
        routes: &[RouteMatch],
        host: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<usize> {
        let host = normalize_host(host);
        let mut best: Option<(Rank, usize)> = None;
        for (index, m) in routes.iter().enumerate() {
            let hosts: Vec<Option<&str>> = if m.hosts.is_empty() {
                vec![None]
            } else {
                m.hosts.iter().map(|h| Some(h.as_str())).collect()
            };
            let prefixes: Vec<Box<str>> = if m.path_prefixes.is_empty() {
                vec!["/".into()]
            } else {
                m.path_prefixes
                    .iter()
                    .map(|p| normalize_prefix(p))
                    .collect()
            };
            let headers_ok = m.headers.iter().all(|h| match headers.get(&h.name) {
                None => false,
                Some(v) => h.value.as_ref().is_none_or(|want| want == v),
            });
            if !headers_ok {
                continue;
            }
            let valued = m.headers.iter().filter(|h| h.value.is_some()).count();
            for h in &hosts {
                let Some(rank) = host_rank(*h, &host) else {
                    continue;
                };
                for p in &prefixes {
                    if !path_has_prefix(path, p) {
                        continue;
                    }
                    use std::cmp::Reverse;
                    let key = (
                        rank,
                        Reverse(p.len()),
                        Reverse(m.headers.len()),
                        Reverse(valued),
                        index,
                    );
                    if best.as_ref().is_none_or(|(b, _)| key < *b) {
                        best = Some((key, index));
                    }
                }
            }
        }
        best.map(|(_, index)| index)
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_the_reference(
            routes in prop::collection::vec(route_match(), 0..8),
            host in prop::sample::select(REQUEST_HOSTS),
            path in prop::sample::select(PATHS),
            headers in request_headers(),
        ) {
            let table = RouteTable::build(routes.iter().cloned().enumerate().map(|(i, m)| (m, i)));
            prop_assert_eq!(table.lookup(host, path, &headers).copied(), reference(&routes, host, path, &headers));
        }

        #[test]
        fn lookup_of_arbitrary_input_never_panics(
            routes in prop::collection::vec(route_match(), 0..4),
            host in any::<String>(),
            path in any::<String>(),
        ) {
            let table = RouteTable::build(routes.into_iter().enumerate().map(|(i, m)| (m, i)));
            let _ = table.lookup(&host, &path, &HeaderMap::new());
            let normalized = normalize_host(&host);
            // Normalising is idempotent only up to the port a second pass would strip; it
            // never grows the host.
            prop_assert!(normalized.len() <= host.len());
        }

        #[test]
        fn host_case_port_and_trailing_dot_do_not_change_the_route(
            routes in prop::collection::vec(route_match(), 0..8),
            host in prop::sample::select(vec!["a.example", "x.a.example", "b.example", "other"]),
            port in prop::option::of(1u16..),
            upper in any::<bool>(),
            dot in any::<bool>(),
            path in prop::sample::select(PATHS),
        ) {
            let table = RouteTable::build(routes.into_iter().enumerate().map(|(i, m)| (m, i)));
            let mut variant = if upper { host.to_ascii_uppercase() } else { host.to_owned() };
            if dot { variant.push('.'); }
            if let Some(port) = port { variant = format!("{variant}:{port}"); }
            let headers = HeaderMap::new();
            prop_assert_eq!(table.lookup(&variant, path, &headers), table.lookup(host, path, &headers));
        }
    }
}
