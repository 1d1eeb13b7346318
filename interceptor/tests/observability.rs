//! Traces and the access log, seen from outside: the real binary exports OTLP to a receiver
//! in this test, and writes its access log to stdout.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use wakegate_testotlp::{ReceivedSpan, Receiver};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn get_with_traceparent(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=kept")
        .body(Full::default())
        .unwrap()
}

/// An interceptor exporting its traces to `endpoint` every 50 ms, with `env` beside that.
async fn traced(config: &str, args: &[&str], endpoint: &str, env: &[(&str, &str)]) -> Interceptor {
    let mut vars = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    vars.extend_from_slice(env);
    Interceptor::start_with_env(config, args, &vars).await
}

/// The first access log line containing `needle`, once it is written (lines are flushed at
/// least every 100 ms).
async fn access_log_line(ic: &Interceptor, needle: &str) -> String {
    eventually(
        &format!("an access log line with {needle}"),
        Duration::from_secs(10),
        || async { ic.log().contains(needle) },
    )
    .await;
    ic.log()
        .lines()
        .find(|l| l.contains(needle))
        .unwrap()
        .to_owned()
}

fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    pick: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what} span, got {found:#?}\nall: {spans:#?}"
    );
    found[0]
}

/// The upstream's `traceparent`, from the example backend's `/headers` listing.
fn upstream_traceparent(body: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent reached the upstream:\n{body}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_cold_start_is_one_trace_that_continues_the_clients() {
    let otlp = Receiver::start().await.unwrap();
    let gate = tempfile::tempdir().unwrap();
    let gate = gate.path().join("open");
    let port = free_port_below_ephemeral();
    let config = format!(
        "routes:\n{}",
        gated_backend_route("traced", "traced.test", port, &gate, "")
    );
    let endpoint = otlp.http_endpoint();
    let ic = traced(
        &config,
        &["--access-log", "json"],
        &endpoint,
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
    )
    .await;
    let held = {
        let (http, req) = (
            ic.http.clone(),
            get_with_traceparent(ic.proxy, "traced.test", "/headers"),
        );
        tokio::spawn(async move { http.send(req).await })
    };
    ic.wait_concurrency("traced", 1).await;
    std::fs::write(&gate, b"").unwrap();
    let reply = held.await.unwrap().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.cold_start(), Some("true"));
    let upstream = upstream_traceparent(&reply.text());

    let spans = otlp
        .wait_for(Duration::from_secs(15), |spans| {
            spans.iter().any(|s| s.kind == "SERVER")
                && spans.iter().any(|s| s.name == "hold")
                && spans.iter().any(|s| s.kind == "CLIENT")
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}\n{}", ic.log()));
    let server = one(&spans, "server", |s| s.kind == "SERVER");
    assert_eq!(server.service, "wakegate-interceptor");
    assert_eq!(server.name, "GET traced");
    assert_eq!(
        server.trace_id, CLIENT_TRACE,
        "the client's trace is continued"
    );
    assert_eq!(server.parent_span_id, CLIENT_SPAN);
    assert_eq!(server.attr("http.request.method"), Some("GET"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.attr("url.path"), Some("/headers"));
    assert_eq!(server.attr("wakegate.route"), Some("traced"));
    assert_eq!(server.attr("wakegate.cold_start"), Some("true"));

    let hold = one(&spans, "hold", |s| s.name == "hold");
    assert_eq!(hold.trace_id, CLIENT_TRACE);
    assert_eq!(hold.parent_span_id, server.span_id);
    assert_eq!(hold.attr("wakegate.hold.outcome"), Some("released"));
    assert!(hold.start_unix_nano >= server.start_unix_nano);
    assert!(hold.end_unix_nano <= server.end_unix_nano);
    assert!(hold.duration() > Duration::ZERO);

    let client = one(&spans, "upstream", |s| s.kind == "CLIENT");
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(client.attr("server.port"), Some(port.to_string().as_str()));
    assert_eq!(client.attr("http.response.status_code"), Some("200"));
    assert!(
        client.start_unix_nano >= hold.end_unix_nano,
        "the upstream call follows the hold"
    );
    assert_eq!(
        upstream,
        format!("00-{CLIENT_TRACE}-{}-01", client.span_id),
        "the upstream's traceparent names the interceptor's client span"
    );
    assert!(
        reply.text().contains("tracestate: vendor=kept"),
        "{}",
        reply.text()
    );
    assert!(otlp.exports().1 > 0, "exported over HTTP/protobuf");

    // The access log line of the same request, with its trace id and cold-start wait.
    let line = access_log_line(&ic, "\"route\":\"traced\"").await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["path"], "/headers");
    assert_eq!(line["traceId"], CLIENT_TRACE);
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["upstream"], format!("127.0.0.1:{port}"));
    assert!(line["coldWaitMs"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["bytes"].as_u64().unwrap(), reply.body.len() as u64);
    assert!(line["durationMs"].as_f64().unwrap() >= line["coldWaitMs"].as_f64().unwrap());
}

/// A keep-alive connection's request is held in hyper, not parked: its hold span ends with
/// the timeout, over gRPC this time, and a request that was never held has no hold span.
#[tokio::test]
async fn a_hold_that_times_out_ends_its_span_so() {
    let otlp = Receiver::start().await.unwrap();
    let warm = Upstream::start("warm", Duration::ZERO).await;
    let port = free_port();
    let config = format!(
        "routes:\n  - name: warm\n    hosts: [\"warm.test\"]\n    target: {{ upstream: \"{}\" }}\n{}",
        warm.addr,
        backend_route("slow", "slow.test", port, "60s", "    timeouts: { readiness: 300ms }\n")
    );
    let endpoint = otlp.grpc_endpoint();
    let ic = traced(
        &config,
        &["--access-log", "text"],
        &endpoint,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "edge-a"),
        ],
    )
    .await;
    // The same pooled connection serves both, so the second is held in hyper.
    let first = ic
        .http
        .send(get_with_traceparent(ic.proxy, "warm.test", "/"))
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first
            .text()
            .contains(&format!("traceparent: 00-{CLIENT_TRACE}-")),
        "{}",
        first.text()
    );
    let second = ic.get("slow.test", "/").await;
    assert_eq!(second.status, 504, "{}", second.text());

    let spans = otlp
        .wait_for(Duration::from_secs(15), |spans| {
            spans.iter().filter(|s| s.kind == "SERVER").count() >= 2
                && spans.iter().any(|s| s.name == "hold")
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}\n{}", ic.log()));
    assert!(otlp.exports().0 > 0, "exported over gRPC");
    assert!(
        spans.iter().all(|s| s.service == "edge-a"),
        "OTEL_SERVICE_NAME names the service"
    );
    let slow = one(&spans, "slow server", |s| s.name == "GET slow");
    assert_ne!(slow.trace_id, CLIENT_TRACE, "no traceparent: a new trace");
    assert!(slow.parent_span_id.is_empty());
    assert_eq!(slow.attr("http.response.status_code"), Some("504"));
    assert_eq!(slow.status, "ERROR");
    let hold = one(&spans, "hold", |s| s.name == "hold");
    assert_eq!(hold.parent_span_id, slow.span_id);
    assert_eq!(hold.attr("wakegate.hold.outcome"), Some("timed_out"));
    assert_eq!(hold.status, "ERROR");
    assert!(
        hold.duration() >= Duration::from_millis(250),
        "{:?}",
        hold.duration()
    );
    let warm_span = one(&spans, "warm server", |s| s.name == "GET warm");
    assert_eq!(warm_span.attr("wakegate.cold_start"), Some("false"));
    assert!(
        !spans
            .iter()
            .any(|s| s.name == "hold" && s.parent_span_id == warm_span.span_id),
        "a request served at once was not held"
    );

    let line = access_log_line(&ic, "route=slow method=").await;
    for field in [
        "method=GET",
        "path=\"/\"",
        "status=504",
        "upstream=-",
        "client=127.0.0.1",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(
        line.contains(&format!("trace_id={}", slow.trace_id)),
        "{line}"
    );
    let warm_line = access_log_line(&ic, "route=warm method=").await;
    assert!(warm_line.contains("cold_wait_ms=-"), "{warm_line}");
    assert!(
        warm_line.contains(&format!("upstream={}", warm.addr)),
        "{warm_line}"
    );
}

/// Off (the default), the proxy adds no trace context, passes the client's on untouched, and
/// writes no access log.
#[tokio::test]
async fn with_traces_and_the_access_log_off_nothing_is_added() {
    let up = Upstream::start("plain", Duration::ZERO).await;
    let config = format!(
        "routes:\n  - name: plain\n    hosts: [\"plain.test\"]\n    target: {{ upstream: \"{}\" }}\n",
        up.addr
    );
    let ic = Interceptor::start(&config).await;
    let reply = ic
        .http
        .send(get_with_traceparent(ic.proxy, "plain.test", "/x"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .text()
            .contains(&format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")),
        "{}",
        reply.text()
    );
    let plain = ic.get("plain.test", "/y").await;
    assert!(!plain.text().contains("traceparent"), "{}", plain.text());
    let log = ic.log();
    assert!(
        !log.contains("route=plain") && !log.contains("\"route\":\"plain\""),
        "{log}"
    );
    assert!(!log.contains("exporting traces"), "{log}");
}

/// A client that leaves while its request is parked ends the request's span as 499, with the
/// hold's outcome `client_gone`.
#[tokio::test]
async fn a_client_gone_while_held_ends_the_hold_span_so() {
    use tokio::io::AsyncWriteExt;
    let otlp = Receiver::start().await.unwrap();
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("left", "left.test", port, "60s", "")
    );
    let endpoint = otlp.http_endpoint();
    let ic = traced(&config, &[], &endpoint, &[]).await;
    let mut conn = tokio::net::TcpStream::connect(ic.proxy).await.unwrap();
    conn.write_all(b"GET /gone HTTP/1.1\r\nhost: left.test\r\n\r\n")
        .await
        .unwrap();
    ic.wait_concurrency("left", 1).await;
    drop(conn);
    let spans = otlp
        .wait_for(Duration::from_secs(15), |spans| {
            spans.iter().any(|s| s.name == "hold") && spans.iter().any(|s| s.kind == "SERVER")
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}\n{}", ic.log()));
    let server = one(&spans, "server", |s| s.kind == "SERVER");
    assert_eq!(server.attr("http.response.status_code"), Some("499"));
    let hold = one(&spans, "hold", |s| s.name == "hold");
    assert_eq!(hold.parent_span_id, server.span_id);
    assert_eq!(hold.attr("wakegate.hold.outcome"), Some("client_gone"));
}

/// A request that waits out its failover delay and is answered by the failover target: its
/// hold ends `failed_over`, and the upstream call goes to the failover target.
#[tokio::test]
async fn a_failover_ends_the_hold_span_so() {
    let otlp = Receiver::start().await.unwrap();
    let fallback = Upstream::start("fallback", Duration::ZERO).await;
    let port = free_port();
    let extra = format!(
        "    failover: {{ upstream: \"{}\", timeout: 200ms }}\n    timeouts: {{ readiness: 60s }}\n",
        fallback.addr
    );
    let config = format!(
        "routes:\n{}",
        backend_route("fo", "fo.test", port, "60s", &extra)
    );
    let endpoint = otlp.http_endpoint();
    let ic = traced(&config, &[], &endpoint, &[]).await;
    let reply = ic.get("fo.test", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().starts_with("fallback /"), "{}", reply.text());
    let spans = otlp
        .wait_for(Duration::from_secs(15), |spans| {
            spans.iter().any(|s| s.kind == "SERVER") && spans.iter().any(|s| s.kind == "CLIENT")
        })
        .await
        .unwrap_or_else(|got| panic!("spans by the deadline: {got:#?}\n{}", ic.log()));
    let server = one(&spans, "server", |s| s.kind == "SERVER");
    assert_eq!(server.attr("wakegate.cold_start"), Some("true"));
    let hold = one(&spans, "hold", |s| s.name == "hold");
    assert_eq!(hold.attr("wakegate.hold.outcome"), Some("failed_over"));
    assert_eq!(hold.status, "UNSET");
    assert!(
        hold.duration() >= Duration::from_millis(150),
        "{:?}",
        hold.duration()
    );
    let client = one(&spans, "upstream", |s| s.kind == "CLIENT");
    assert_eq!(
        client.attr("server.port"),
        Some(fallback.addr.port().to_string().as_str())
    );
}

/// An OTLP endpoint that is not a URL stops the interceptor at start, saying so.
#[tokio::test]
async fn a_bad_otlp_endpoint_is_refused_at_start() {
    let config = "routes:\n  - name: any\n    target: { upstream: \"127.0.0.1:9\" }\n";
    let mut ic =
        Interceptor::spawn_with_env(config, &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]);
    let status = ic.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(64), "{}", ic.log());
    let log = ic.log();
    assert!(
        log.contains("OTLP trace exporter") && log.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{log}"
    );
}

/// The access log's last lines are written out when the interceptor stops, not lost with the
/// process: twenty requests, then SIGTERM at once, and twenty lines.
#[tokio::test]
async fn the_access_log_is_flushed_at_shutdown() {
    let up = Upstream::start("last", Duration::ZERO).await;
    let config = format!(
        "routes:\n  - name: last\n    hosts: [\"last.test\"]\n    target: {{ upstream: \"{}\" }}\n",
        up.addr
    );
    let mut ic = Interceptor::start_with(&config, &["--access-log", "text"]).await;
    for i in 0..20 {
        assert_eq!(ic.get("last.test", &format!("/{i}")).await.status, 200);
    }
    ic.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(ic.wait(Duration::from_secs(20)).await.success());
    let log = ic.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("route=last method="))
        .count();
    assert_eq!(lines, 20, "{log}");
}
