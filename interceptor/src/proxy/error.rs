//! The errors a proxied request can end in, and the one place that turns them into responses.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::provider::{RouteId, TargetId};

/// The status recorded for a request whose client left (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(code) => code,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Why a request was answered by the proxy instead of the upstream.
///
/// `Display` is for the log: it names endpoints and causes. What a client reads is
/// [`ProxyError::public_text`], which says what happened without saying where.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request itself is malformed: two Host headers, none, one that is not an authority,
    /// a Host that disagrees with HTTP/2's `:authority`, userinfo in the target, or a
    /// Transfer-Encoding other than `chunked`.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong, in words.
        reason: &'static str,
    },

    /// The client failed while its body was being sent upstream: malformed framing, a hangup
    /// or a trickle.
    #[error("route {route}: {}", client_fault_text(*.fault))]
    ClientBody {
        /// The route that matched.
        route: RouteId,
        /// How the client failed.
        fault: super::body::ClientFault,
    },

    /// The whole-request deadline (`timeouts.request`, `--request-timeout`) passed before the
    /// response headers.
    #[error("route {route}: no response within the request timeout of {}", humantime::format_duration(*.timeout))]
    RequestTimeout {
        /// The route that matched.
        route: RouteId,
        /// The timeout that passed.
        timeout: Duration,
    },

    /// No route matches the request's host, path and headers.
    #[error("no route for host {host:?}")]
    NoRoute {
        /// The host the request named (as sent).
        host: String,
    },

    /// No route set was loaded within the readiness timeout: the interceptor is starting, or
    /// cannot reach its source of routes (the Kubernetes API).
    #[error("no route set loaded after waiting {}: the interceptor is starting", humantime::format_duration(*.waited))]
    NotLoaded {
        /// How long the request waited.
        waited: Duration,
    },

    /// CONNECT (tunnelling) is not something this proxy does.
    #[error("method {method} is not allowed here")]
    MethodNotAllowed {
        /// The method.
        method: http::Method,
    },

    /// Holding the request would pass a cap on held requests (the route's or the total).
    #[error(
        "route {route}: too many requests are waiting for target {target} ({limit}); retry shortly"
    )]
    Overloaded {
        /// The route that matched.
        route: RouteId,
        /// Its target.
        target: TargetId,
        /// Which cap, e.g. "route cap 100" or "total cap 10000".
        limit: String,
    },

    /// The target is waking; the route answers at once instead of holding this request.
    #[error("route {route}: target {target} is starting")]
    Waking {
        /// The route that matched.
        route: RouteId,
        /// Its target.
        target: TargetId,
        /// What to answer (boxed: it is much larger than the other variants).
        response: Box<crate::provider::ColdResponse>,
    },

    /// A static route of the route answered.
    #[error("route {route}: answered by a static route")]
    Static {
        /// The route that matched.
        route: RouteId,
        /// The answer (boxed: it is much larger than the other variants).
        response: Box<crate::provider::ColdResponse>,
    },

    /// The request was held, and no endpoint of its target became ready in time.
    #[error("route {route}: target {target} had no ready endpoint after waiting {}", humantime::format_duration(*.waited))]
    ReadinessTimeout {
        /// The route that matched.
        route: RouteId,
        /// The target that was waited for.
        target: TargetId,
        /// How long the request waited.
        waited: Duration,
    },

    /// The request was held because every ready endpoint was at the route's per-endpoint cap,
    /// and no slot freed up in time.
    #[error("route {route}: all {ready} ready endpoints of target {target} stayed at their cap of {cap} requests for {}", humantime::format_duration(*.waited))]
    CapacityTimeout {
        /// The route that matched.
        route: RouteId,
        /// The target that was waited for.
        target: TargetId,
        /// How many endpoints were ready.
        ready: usize,
        /// The route's per-endpoint cap.
        cap: std::num::NonZeroUsize,
        /// How long the request waited.
        waited: Duration,
    },

    /// The client closed its connection while its request was held.
    #[error("route {route}: client went away after waiting {}", humantime::format_duration(*.waited))]
    ClientGone {
        /// The route that matched.
        route: RouteId,
        /// How long the request had waited.
        waited: Duration,
    },

    /// The upstream did not send response headers in time.
    #[error("route {route}: upstream {endpoint} sent no response headers within {}", humantime::format_duration(*.timeout))]
    ResponseHeaderTimeout {
        /// The route that matched.
        route: RouteId,
        /// The endpoint the request was sent to.
        endpoint: String,
        /// The timeout that passed.
        timeout: Duration,
    },

    /// The upstream's TLS handshake failed: its certificate was not trusted or not for the
    /// route's server name, or it does not speak TLS.
    #[error("route {route}: TLS with upstream {endpoint} failed: {reason}")]
    UpstreamTls {
        /// The route that matched.
        route: RouteId,
        /// The endpoint the request was sent to.
        endpoint: String,
        /// What rustls said.
        reason: String,
    },

    /// The connection to the upstream could not be made.
    #[error("route {route}: could not connect to upstream {endpoint}")]
    UpstreamConnect {
        /// The route that matched.
        route: RouteId,
        /// The endpoint the request was sent to.
        endpoint: String,
        /// The connect failure.
        #[source]
        source: super::upstream::BoxError,
    },

    /// The upstream failed after the connection was made (closed early, sent garbage).
    #[error("route {route}: upstream {endpoint} failed before sending a response")]
    Upstream {
        /// The route that matched.
        route: RouteId,
        /// The endpoint the request was sent to.
        endpoint: String,
        /// The failure.
        #[source]
        source: super::upstream::BoxError,
    },
}

fn client_fault_text(fault: super::body::ClientFault) -> &'static str {
    use super::body::ClientFault;
    match fault {
        ClientFault::Malformed => "the request body is malformed",
        ClientFault::Gone => "the client went away before its request body ended",
        ClientFault::TooSlow => "the request body arrived too slowly",
    }
}

impl ProxyError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::ClientBody { fault, .. } => fault.kind(),
            Self::RequestTimeout { .. } => "request_timeout",
            Self::NoRoute { .. } => "no_route",
            Self::NotLoaded { .. } => "not_loaded",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Overloaded { .. } => "overloaded",
            Self::Waking { .. } => "waking",
            Self::Static { .. } => "static",
            Self::ReadinessTimeout { .. } => "readiness_timeout",
            Self::CapacityTimeout { .. } => "capacity_timeout",
            Self::ClientGone { .. } => "client_gone",
            Self::ResponseHeaderTimeout { .. } => "response_header_timeout",
            Self::UpstreamConnect { .. } => "connect",
            Self::UpstreamTls { .. } => "tls",
            Self::Upstream { .. } => "upstream",
        }
    }

    /// Whether this is a failure of the upstream (counted as an upstream error).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Self::ResponseHeaderTimeout { .. }
                | Self::UpstreamConnect { .. }
                | Self::UpstreamTls { .. }
                | Self::Upstream { .. }
        )
    }

    /// Whether the client caused this (counted as a client error, never as an upstream one).
    pub fn is_client(&self) -> bool {
        matches!(
            self,
            Self::BadRequest { .. } | Self::ClientBody { .. } | Self::ClientGone { .. }
        )
    }

    /// The status a client sees.
    pub fn status(&self) -> StatusCode {
        use super::body::ClientFault;
        match self {
            Self::BadRequest { .. }
            | Self::ClientBody {
                fault: ClientFault::Malformed,
                ..
            } => StatusCode::BAD_REQUEST,
            Self::ClientBody {
                fault: ClientFault::TooSlow,
                ..
            } => StatusCode::REQUEST_TIMEOUT,
            Self::ClientBody {
                fault: ClientFault::Gone,
                ..
            } => CLIENT_CLOSED_REQUEST,
            Self::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded { .. } | Self::NotLoaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Waking { response, .. } | Self::Static { response, .. } => match **response {
                crate::provider::ColdResponse::Placeholder { status, .. } => status,
                crate::provider::ColdResponse::WaitingPage { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
            Self::ReadinessTimeout { .. }
            | Self::CapacityTimeout { .. }
            | Self::ResponseHeaderTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamConnect { .. } | Self::UpstreamTls { .. } | Self::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            // Nobody reads it; nginx's "client closed request" code keeps it apart in metrics.
            Self::ClientGone { .. } => CLIENT_CLOSED_REQUEST,
        }
    }

    /// What a client reads: the route and what happened, in words that stay the same from one
    /// failure to the next. No endpoint address, no library's reason: those go to the log and
    /// to the metric's `kind` label.
    pub fn public_text(&self) -> String {
        match self {
            Self::ResponseHeaderTimeout { route, timeout, .. } => format!(
                "route {route}: the upstream sent no response headers within {}",
                humantime::format_duration(*timeout)
            ),
            Self::UpstreamTls { route, .. } => {
                format!("route {route}: TLS with the upstream failed")
            }
            Self::UpstreamConnect { route, .. } => {
                format!("route {route}: could not connect to the upstream")
            }
            Self::Upstream { route, .. } => {
                format!("route {route}: the upstream failed before sending a response")
            }
            other => other.to_string(),
        }
    }

    /// The response a client sees: the status and a one-line plain-text body saying what
    /// happened. Upstream addresses and causes are logged, not sent.
    pub fn to_response(&self) -> Response<ProxyBody> {
        if let Self::Waking { response, .. } | Self::Static { response, .. } = self {
            return waking_response(response, self.status());
        }
        let text = format!("{}\n", self.public_text());
        let mut rsp = Response::new(ProxyBody::full(Bytes::from(text)));
        *rsp.status_mut() = self.status();
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            Self::MethodNotAllowed { .. } => {
                rsp.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"),
                );
                // A CONNECT client may already be sending tunnel bytes: they are no request.
                rsp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Overloaded { .. } | Self::NotLoaded { .. } => {
                rsp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::BadRequest { .. } | Self::ClientBody { .. } => {
                // The connection's framing may be lost: do not read another request from it.
                rsp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        rsp
    }
}

/// The waiting page or placeholder.
fn waking_response(
    response: &crate::provider::ColdResponse,
    status: StatusCode,
) -> Response<ProxyBody> {
    use crate::provider::ColdResponse;
    let mut extra = None;
    let (body, content_type, retry) = match response {
        ColdResponse::WaitingPage { refresh } => (
            Bytes::from(format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{refresh}\">\
                 <title>Starting up</title><style>body{{font-family:sans-serif;margin:4em auto;max-width:30em;color:#333}}</style></head>\
                 <body><h1>Starting up&hellip;</h1><p>This service was asleep and is waking up. This page reloads itself every {refresh} s.</p></body></html>\n"
            )),
            HeaderValue::from_static("text/html; charset=utf-8"),
            Some(*refresh),
        ),
        ColdResponse::Placeholder {
            content_type,
            body,
            headers,
            ..
        } => {
            extra = Some(headers);
            (body.clone(), content_type.clone(), None)
        }
    };
    let mut rsp = Response::new(ProxyBody::full(body));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(header::CONTENT_TYPE, content_type);
    rsp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(seconds) = retry {
        rsp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    for (name, value) in extra.into_iter().flatten() {
        rsp.headers_mut().insert(name, value.clone());
    }
    rsp
}

/// The TLS failure somewhere in an upstream error's causes, if any. (An `io::Error` hides what
/// it wraps from `source()`, so each one is opened with `get_ref`.)
pub(crate) fn tls_failure<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match err.downcast_ref::<std::io::Error>() {
            // hyper-rustls wraps tokio-rustls' io::Error (itself wrapping rustls') in another.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies_name_the_problem() {
        let no_route = ProxyError::NoRoute {
            host: "nope.example".into(),
        };
        assert_eq!(no_route.status(), StatusCode::NOT_FOUND);
        assert_eq!(no_route.to_string(), "no route for host \"nope.example\"");

        let timeout = ProxyError::ReadinessTimeout {
            route: "default/app".into(),
            target: "app".into(),
            waited: Duration::from_secs(2),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            timeout.to_string(),
            "route default/app: target app had no ready endpoint after waiting 2s"
        );
        assert!(!timeout.is_upstream());
        assert_eq!(timeout.public_text(), timeout.to_string());
        let connect = ProxyError::ResponseHeaderTimeout {
            route: "default/app".into(),
            endpoint: "10.1.2.3:8080".into(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(
            connect.public_text(),
            "route default/app: the upstream sent no response headers within 30s"
        );
    }
}
