//! Header rewriting between client and upstream: hop-by-hop headers are removed both ways, and
//! `X-Forwarded-For`, `-Proto` and `-Host` are set on the way up, trusting what a client sent in
//! them only when it is a trusted proxy.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, never forwarded (RFC 9110 section 7.6.1; HTTP2-Settings
/// belongs to an `Upgrade: h2c`, RFC 9113 section 3.1 of its predecessor).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including any the `Connection` header names, and `Upgrade`.
/// An upgrade being passed through puts its two headers back with [`set_upgrade`].
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Fast path: most messages carry none of these. One pass over the names present (a few)
    // costs less than a hashed lookup for each of the ten names.
    if !headers.keys().any(is_hop_by_hop_or_upgrade) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Whether `name` is one of [`HOP_BY_HOP`] or `Upgrade`: told apart by length first, so that
/// a name costs one comparison at most (this runs for every header of every message).
fn is_hop_by_hop_or_upgrade(name: &HeaderName) -> bool {
    let name = name.as_str();
    match name.len() {
        2 => name == "te",
        7 => name == "trailer" || name == "upgrade",
        10 => name == "connection" || name == "keep-alive",
        14 => name == "http2-settings",
        16 => name == "proxy-connection",
        17 => name == "transfer-encoding",
        18 => name == "proxy-authenticate",
        19 => name == "proxy-authorization",
        _ => false,
    }
}

/// The protocol an HTTP/1.1 message asks to upgrade to (`Connection: upgrade` plus `Upgrade`).
/// `h2c` is not one: it would upgrade this hop, not the upstream's (RFC 9113 deprecates it), so
/// such a request is forwarded as plain HTTP/1.1 with the upgrade headers removed.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
        .filter(|protocol| {
            !protocol
                .as_bytes()
                .split(|&b| b == b',')
                .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
}

/// Puts an upgrade's hop-by-hop headers back, for passing it through.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Sets the forwarding headers for a request from `client` that arrived over `proto` for
/// `host` (the authority it was routed by).
///
/// From a `trusted` peer (an Ingress), `X-Forwarded-For` gets the client appended, and
/// `X-Forwarded-Proto` / `X-Forwarded-Host` are kept when present, since that proxy saw the
/// original scheme and host; missing ones are set from this hop. From any other peer, whatever it
/// sent is replaced: `X-Forwarded-For` is its own address, and `-Proto` / `-Host` are what this
/// hop saw, so no client can claim `https` or another host.
///
/// `client` is the client's address as a header value ([`client_value`]), made once per
/// connection, so that a request costs no formatting or allocation here.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    trusted: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    if trusted {
        // Which of the three the peer sent, in one pass over the names present (a few): a
        // request that carries none of them (most do not) costs no hashed lookups.
        let (mut sent_for, mut sent_proto, mut sent_host) = (false, false, false);
        for name in headers.keys() {
            sent_for |= name == X_FORWARDED_FOR;
            sent_proto |= name == X_FORWARDED_PROTO;
            sent_host |= name == X_FORWARDED_HOST;
        }
        if !sent_for {
            headers.insert(X_FORWARDED_FOR.clone(), client.clone());
        }
        if !sent_proto {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        }
        if let (false, Some(host)) = (sent_host, host) {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        if !sent_for {
            return;
        }
        // Every earlier hop is kept, however many lines the list came in and whatever bytes
        // they hold (a header value is valid bytes by construction, so the joined list is too).
        let mut xff: Vec<u8> = Vec::new();
        for prior in headers.get_all(&X_FORWARDED_FOR) {
            let prior = prior.as_bytes().trim_ascii();
            if !prior.is_empty() {
                xff.extend_from_slice(prior);
                xff.extend_from_slice(b", ");
            }
        }
        xff.extend_from_slice(client.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&xff) {
            headers.insert(X_FORWARDED_FOR.clone(), value);
        }
        return;
    }
    headers.insert(X_FORWARDED_FOR.clone(), client.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// A client's address as `X-Forwarded-For` names it: canonical (see [`canonical`]), no port.
pub fn client_value(ip: IpAddr) -> HeaderValue {
    // An address's text is always a valid header value.
    HeaderValue::from_str(&canonical(ip).to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4 clients) as the IPv4 address they
/// are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_check_knows_every_hop_by_hop_name_and_no_other() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop_or_upgrade(name), "{name} is hop-by-hop");
        }
        for name in [
            "host",
            "content-type",
            "tee",
            "trailers",
            "upgrades",
            "connections",
            "x-connection",
            "http2-setting",
            "proxy-connectio",
            "transfer-encodings",
            "proxy-authenticatx",
            "proxy-authorizatio",
            "x-forwarded-for",
        ] {
            let name = HeaderName::from_static(name);
            assert!(!is_hop_by_hop_or_upgrade(&name), "{name} is end to end");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn from_a_trusted_peer_forwarded_for_appends_and_proto_host_are_kept_when_present() {
        let host = HeaderValue::from_static("a.example");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        set_forwarded(
            &mut h,
            &client_value("127.0.0.1".parse().unwrap()),
            true,
            "http",
            Some(&host),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example");

        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            &client_value("::1".parse().unwrap()),
            true,
            "http",
            None,
        );
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn from_an_untrusted_peer_every_forwarding_header_is_replaced() {
        let host = HeaderValue::from_static("a.example");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "10.9.9.9".parse().unwrap());
        h.append("x-forwarded-for", "10.8.8.8".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "admin.internal".parse().unwrap());
        set_forwarded(
            &mut h,
            &client_value("::ffff:203.0.113.7".parse().unwrap()),
            false,
            "http",
            Some(&host),
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["203.0.113.7"]
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.example");
    }

    #[test]
    fn an_h2c_upgrade_is_not_passed_through() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "Upgrade, HTTP2-Settings".parse().unwrap(),
        );
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert(
            "http2-settings",
            "AAMAAABkAAQAoAAAAAIAAAAA".parse().unwrap(),
        );
        assert_eq!(upgrade_protocol(&h), None);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        h.insert(header::CONNECTION, "upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(
            upgrade_protocol(&h),
            Some(HeaderValue::from_static("websocket"))
        );
    }

    #[test]
    fn forwarded_for_keeps_every_earlier_line() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2, 10.0.0.3".parse().unwrap());
        set_forwarded(
            &mut h,
            &client_value("127.0.0.1".parse().unwrap()),
            true,
            "http",
            None,
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        );
    }
}

/// Property tests over arbitrary header sets: what must hold whatever a client sends.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Header names: the ones with meaning here, plus arbitrary valid tokens.
    fn name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            prop::sample::select(vec![
                "connection",
                "keep-alive",
                "te",
                "trailer",
                "transfer-encoding",
                "upgrade",
                "proxy-authorization",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-keep",
                "x-secret",
            ])
            .prop_map(HeaderName::from_static),
            "[a-z0-9!#$%&'*+.^_`|~-]{1,12}"
                .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
        ]
    }

    /// Header values: comma lists of names, and arbitrary valid bytes (obs-text included).
    fn value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            prop::collection::vec(
                prop::sample::select(vec![
                    "close",
                    "upgrade",
                    "keep-alive",
                    "x-secret",
                    " X-Keep ",
                    "",
                    "te"
                ]),
                0..4
            )
            .prop_map(|parts| HeaderValue::from_str(&parts.join(",")).unwrap()),
            prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..40)
                .prop_filter_map("valid value", |b| HeaderValue::from_bytes(&b).ok()),
        ]
    }

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec((name(), value()), 0..12).prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.append(k, v);
            }
            map
        })
    }

    proptest! {
        #[test]
        fn no_hop_by_hop_header_survives_stripping(mut headers in header_map()) {
            let named: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect();
            let before = headers.clone();
            strip_hop_by_hop(&mut headers);
            for h in HOP_BY_HOP.iter().chain(named.iter()).chain([&header::UPGRADE]) {
                prop_assert!(!headers.contains_key(h), "{h} survived");
            }
            // Nothing else is touched.
            for (k, v) in &headers {
                prop_assert!(before.get_all(k).iter().any(|b| b == v));
            }
        }

        #[test]
        fn forwarding_headers_are_always_valid_and_end_with_the_client(
            mut headers in header_map(),
            client in any::<std::net::IpAddr>(),
            host in prop::option::of(any::<String>()),
            trusted in any::<bool>(),
        ) {
            let earlier: Vec<Vec<u8>> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(|v| v.as_bytes().trim_ascii().to_vec())
                .filter(|v| !v.is_empty())
                .collect();
            let host = host.and_then(|h| HeaderValue::from_str(&h).ok());
            set_forwarded(&mut headers, &client_value(client), trusted, "https", host.as_ref());
            let xff: Vec<&HeaderValue> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
            prop_assert_eq!(xff.len(), 1);
            let xff = xff[0].as_bytes();
            let client_text = canonical(client).to_string();
            prop_assert!(xff.ends_with(client_text.as_bytes()));
            if !trusted {
                prop_assert_eq!(xff, client_text.as_bytes());
                prop_assert_eq!(&headers[&X_FORWARDED_PROTO], "https");
                prop_assert_eq!(headers.get(&X_FORWARDED_HOST), host.as_ref());
            }
            let mut at = 0;
            for e in earlier.iter().filter(|_| trusted) {
                let found = xff[at..].windows(e.len()).position(|w| w == e.as_slice());
                prop_assert!(found.is_some(), "an earlier hop was lost");
                at += found.unwrap_or(0) + e.len();
            }
            prop_assert!(headers.contains_key(&X_FORWARDED_PROTO));
        }

        #[test]
        fn an_upgrade_needs_both_headers(headers in header_map()) {
            if let Some(protocol) = upgrade_protocol(&headers) {
                prop_assert_eq!(headers.get(header::UPGRADE), Some(&protocol));
                let asked = headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
                prop_assert!(asked);
            }
        }
    }
}
