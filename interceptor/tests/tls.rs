//! TLS through the real binary: certificates picked by SNI from a store, a certificate replaced
//! while running, h2 over ALPN, TLS 1.2, bad key files, and TLS to an upstream with its
//! verification on, off, and failing.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::ServerName;
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// Issues a certificate for `names`, writing `<stem>.crt` and `<stem>.key` in `dir`, and
    /// returns the certificate's DER.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        // Written to a temporary name and renamed, as a secret volume swaps files atomically.
        let tmp = dir.join(format!(".{stem}.tmp"));
        std::fs::write(&tmp, key.serialize_pem()).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{stem}.key"))).unwrap();
        std::fs::write(&tmp, cert.pem()).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{stem}.crt"))).unwrap();
        cert.der().to_vec()
    }

    fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.issuer.pem()).unwrap();
    }

    /// Starts the interceptor with `config` and `args`, serving TLS with a certificate for
    /// `names` issued into `dir`.
    async fn serve(&self, dir: &Path, names: &[&str], config: &str, args: &[&str]) -> Interceptor {
        self.issue(dir, "site", names);
        let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
        let mut all = vec![
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        Interceptor::start_with(config, &all).await
    }

    fn client(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

async fn handshake(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

fn peer_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// An HTTP/1.1 connection over `stream`.
async fn http1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// An HTTP/2 connection over `stream`.
async fn http2(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

async fn get1(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> (StatusCode, String) {
    send.ready().await.unwrap();
    let rsp = send
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = rsp.status();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_a_replaced_one_is_served_without_dropping_connections() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let store = certs.path().join("store");
    let a_der = ca.issue(&store, "a", &["a.test"]);
    // A secret mounted as a subdirectory, with Kubernetes' file names.
    let b_der = ca.issue(&store.join("b-secret"), "tls", &["b.test", "*.b.test"]);
    let default_der = ca.issue(certs.path(), "default", &["default.test"]);

    let port = free_port();
    let config = format!("routes:\n{}", backend_route("site", "*", port, "0s", ""));
    let default_cert = certs.path().join("default.crt");
    let default_key = certs.path().join("default.key");
    let ic = Interceptor::start_with(
        &config,
        &[
            "--tls-cert-store",
            store.to_str().unwrap(),
            "--tls-cert",
            default_cert.to_str().unwrap(),
            "--tls-key",
            default_key.to_str().unwrap(),
            "--tls-reload-interval",
            "50ms",
        ],
    )
    .await;
    let connector = ca.client(BOTH, &[b"http/1.1"]);

    let a = handshake(&connector, ic.tls, "a.test").await.unwrap();
    assert_eq!(peer_cert(&a), a_der, "a.test gets its own certificate");
    let mut a_conn = http1(a).await;
    let (status, body) = get1(&mut a_conn, "a.test", "/headers").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    assert!(body.contains("host: a.test"), "{body}");

    let b = handshake(&connector, ic.tls, "x.b.test").await.unwrap();
    assert_eq!(peer_cert(&b), b_der, "the wildcard covers x.b.test");
    let b = handshake(&connector, ic.tls, "b.test").await.unwrap();
    assert_eq!(peer_cert(&b), b_der);
    let mut b_conn = http1(b).await;
    assert_eq!(get1(&mut b_conn, "b.test", "/").await.0, StatusCode::OK);

    // A name no store certificate covers gets the default one (and fails verification, as
    // it should: the default is for another name).
    let other = handshake(&connector, ic.tls, "other.test").await;
    assert!(
        other.is_err(),
        "the default certificate is not valid for other.test"
    );

    // Replace a.test's certificate (new key too) while a connection made with the old one
    // stays open.
    let new_a_der = ca.issue(&store, "a", &["a.test"]);
    assert_ne!(new_a_der, a_der);
    let mut last = Vec::new();
    for _ in 0..500 {
        let s = handshake(&connector, ic.tls, "a.test").await.unwrap();
        last = peer_cert(&s);
        if last == new_a_der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        last, new_a_der,
        "the replaced certificate is served within 10 s"
    );
    assert!(
        ic.log().contains("TLS certificates reloaded"),
        "{}",
        ic.log()
    );
    let (status, _) = get1(&mut a_conn, "a.test", "/").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the connection from before the reload still works"
    );

    // A half-written pair (certificate without its key) is refused and the previous set kept.
    let orphan_dir = store.join("c");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    std::fs::write(orphan_dir.join("c.crt"), b"-----BEGIN CERTIFICATE-----\n").unwrap();
    eventually(
        "the broken store is reported",
        Duration::from_secs(10),
        || async {
            ic.log()
                .contains("cannot be loaded; keeping the previous ones")
        },
    )
    .await;
    let s = handshake(&connector, ic.tls, "a.test").await.unwrap();
    assert_eq!(peer_cert(&s), new_a_der);
    drop(default_der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_is_negotiated_by_alpn_and_tls_1_2_works() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "routes:\n{}",
        backend_route("h2", "h2.test", port, "0s", "")
    );
    let ic = ca.serve(certs.path(), &["h2.test"], &config, &[]).await;

    // h2 over ALPN: two requests multiplexed on one connection, one of them from cold.
    let connector = ca.client(BOTH, &[b"h2", b"http/1.1"]);
    let stream = handshake(&connector, ic.tls, "h2.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let send = http2(stream).await;
    let mut replies = Vec::new();
    for path in ["/headers", "/"] {
        let mut send = send.clone();
        replies.push(tokio::spawn(async move {
            let rsp = send
                .send_request(
                    Request::get(format!("https://h2.test{path}"))
                        .body(Empty::<Bytes>::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            let version = rsp.version();
            let status = rsp.status();
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            (version, status, String::from_utf8_lossy(&body).into_owned())
        }));
    }
    for reply in replies {
        let (version, status, body) = reply.await.unwrap();
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(status, StatusCode::OK, "{body}");
        if body.starts_with("GET") {
            // The upstream hop is HTTP/1.1 with the client's authority as Host.
            assert!(body.contains("host: h2.test"), "{body}");
            assert!(body.contains("x-forwarded-proto: https"), "{body}");
        }
    }

    // A TLS 1.2-only client is served too; without ALPN it speaks HTTP/1.1.
    let connector = ca.client(&[&rustls::version::TLS12], &[]);
    let stream = handshake(&connector, ic.tls, "h2.test").await.unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let mut conn = http1(stream).await;
    assert_eq!(get1(&mut conn, "h2.test", "/").await.0, StatusCode::OK);

    // The plaintext listener keeps working beside the TLS one.
    assert_eq!(ic.get("h2.test", "/").await.status, StatusCode::OK);

    // Not TLS at all on the TLS port: the handshake fails and nothing is forwarded.
    let mut raw = TcpStream::connect(ic.tls).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET / HTTP/1.1\r\nhost: h2.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"), "{buf:?}");
}

const ANY_ROUTE: &str = "routes:\n  - name: a\n    target: { upstream: \"127.0.0.1:1\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_stop_the_start_with_a_clear_message() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    ca.issue(certs.path(), "a", &["a.test"]);
    ca.issue(certs.path(), "b", &["b.test"]);
    std::fs::write(certs.path().join("garbage.pem"), "not a certificate\n").unwrap();
    let p = |n: &str| certs.path().join(n).to_str().unwrap().to_owned();
    let pair = |cert: &str, key: &str| {
        vec![
            "--tls-cert".to_owned(),
            p(cert),
            "--tls-key".to_owned(),
            p(key),
        ]
    };
    let cases = [
        (pair("a.crt", "b.key"), "does not match the certificate"),
        (pair("missing.crt", "a.key"), "cannot read"),
        (pair("garbage.pem", "a.key"), "holds no PEM certificate"),
        (pair("a.crt", "a.crt"), "no usable PEM private key"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut ic = Interceptor::spawn(ANY_ROUTE, &args);
        let status = ic.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(64), "{}", ic.log());
        assert!(
            ic.log().contains(expected),
            "expected {expected:?} in:\n{}",
            ic.log()
        );
    }
    // A cert without the key flag is a usage error from the flag parser.
    let mut ic = Interceptor::spawn(ANY_ROUTE, &["--tls-cert", &p("a.crt")]);
    let status = ic.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(64), "{}", ic.log());
    assert!(ic.log().contains("--tls-key"), "{}", ic.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_is_verified_and_can_be_told_not_to() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.issue(dir.path(), "backend", &["backend.test"]);
    let ca_file = dir.path().join("ca.pem");
    ca.write_pem(&ca_file);
    let cert = dir.path().join("backend.crt");
    let key = dir.path().join("backend.key");
    let route = |name: &str, port: u16, tls: &str| {
        format!(
            r#"  - name: {name}
    hosts: ["{name}.test"]
    target:
      command: ["{BIN}", "backend", "--port", "{port}", "--tls-cert", "{cert}", "--tls-key", "{key}", "--name", "{name}"]
      port: {port}
      stopGracePeriod: 2s
      tls: {tls}
"#,
            cert = cert.display(),
            key = key.display(),
        )
    };
    let config = format!(
        "routes:\n{}{}{}{}",
        route(
            "verified",
            free_port(),
            &format!(
                "{{ caFile: \"{}\", serverName: backend.test }}",
                ca_file.display()
            )
        ),
        route(
            "wrongname",
            free_port(),
            &format!(
                "{{ caFile: \"{}\", serverName: other.test }}",
                ca_file.display()
            )
        ),
        route("publicroots", free_port(), "{ serverName: backend.test }"),
        route("insecure", free_port(), "{ insecureSkipVerify: true }"),
    );
    let ic = Interceptor::start(&config).await;

    let r = ic.get("verified.test", "/headers").await;
    assert_eq!(r.status, StatusCode::OK, "{}\n{}", r.text(), ic.log());
    assert_eq!(r.cold_start(), Some("true"));
    assert!(r.text().contains("host: verified.test"), "{}", r.text());
    let r = ic.get("insecure.test", "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let r = ic.get("publicroots.test", "/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    // The client reads what happened; the operator's log has rustls' reason.
    assert_eq!(
        r.text(),
        "route publicroots: TLS with the upstream failed\n"
    );
    assert!(ic.log().contains("UnknownIssuer"), "{}", ic.log());
    let r = ic.get("wrongname.test", "/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.text(), "route wrongname: TLS with the upstream failed\n");
    assert!(
        ic.log().contains("not valid for name \"other.test\""),
        "{}",
        ic.log()
    );
    let metrics = ic.metrics().await;
    assert!(metrics.contains("kind=\"tls\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_config_mistakes_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "nope\n").unwrap();
    let cases = [
        (
            format!("routes:\n  - name: a\n    target: {{ upstream: \"127.0.0.1:1\", tls: {{ caFile: \"{}\" }} }}\n", dir.path().join("missing.pem").display()),
            "routes[0].target.tls.caFile",
        ),
        (
            format!("routes:\n  - name: a\n    target: {{ upstream: \"127.0.0.1:1\", tls: {{ caFile: \"{}\" }} }}\n", dir.path().join("bad.pem").display()),
            "holds no PEM certificate",
        ),
        (
            "routes:\n  - name: a\n    target: { upstream: \"127.0.0.1:1\", tls: { caFile: x, insecureSkipVerify: true } }\n".to_owned(),
            "not both",
        ),
        (
            "routes:\n  - name: a\n    target: { upstream: \"127.0.0.1:1\", tls: { serverName: \"not a name\" } }\n".to_owned(),
            "routes[0].target.tls.serverName",
        ),
        (
            "routes:\n  - name: a\n    target: { command: [x], port: 1, readinessProbe: { httpGet: { path: /healthz } }, tls: {} }\n".to_owned(),
            "readinessProbe.httpGet",
        ),
    ];
    for (config, expected) in cases {
        let mut ic = Interceptor::spawn(&config, &[]);
        let status = ic.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(64), "{}", ic.log());
        assert!(
            ic.log().contains(expected),
            "expected {expected:?} in:\n{}",
            ic.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_that_never_sends_a_request_is_closed_at_the_header_read_deadline() {
    use tokio::io::AsyncReadExt;
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let config = "routes:\n  - name: quiet\n    target: { upstream: \"127.0.0.1:9\" }\n";
    let ic = ca
        .serve(
            certs.path(),
            &["quiet.test"],
            config,
            &["--header-read-timeout", "800ms"],
        )
        .await;
    let connector = ca.client(BOTH, &[b"h2", b"http/1.1"]);
    let started = std::time::Instant::now();
    // Handshaken, then silent: over HTTP/1.1 and over h2 (preface never sent).
    let mut h1 = handshake(&ca.client(BOTH, &[b"http/1.1"]), ic.tls, "quiet.test")
        .await
        .unwrap();
    let mut h2 = handshake(&connector, ic.tls, "quiet.test").await.unwrap();
    // A bare TCP connection that never starts the handshake.
    let mut bare = TcpStream::connect(ic.tls).await.unwrap();
    for stream in [
        &mut h1 as &mut (dyn tokio::io::AsyncRead + Unpin + Send),
        &mut h2,
        &mut bare,
    ] {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a silent TLS connection stayed open");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "one deadline from accept, handshake included: {took:?}"
    );
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(
            r#"wakegate_client_connections_closed_total{reason="header_read_timeout"} 3"#
        ),
        "{metrics}"
    );
}

/// The response-header timeout over TLS, on a connection whose protocol is found after the
/// handshake: HTTP/1.1 (its connection's watchdog, looking every second here, keeps the
/// deadline) and HTTP/2 (each stream has a timer of its own). Each slow request gets its 504
/// after its own 1.2 s; a missed deadline would let the upstream answer 200 after 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_header_timeout_holds_over_tls_for_http1_and_h2() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().unwrap();
    let slow = Upstream::start("slow", Duration::from_secs(3)).await;
    let config = format!(
        "routes:\n  - name: slow\n    hosts: [slow.test]\n    timeouts: {{ responseHeader: 1200ms }}\n    target: {{ upstream: \"{}\" }}\n",
        slow.addr
    );
    // The handshake and the head must fit in the header-read timeout (slow under emulation).
    let args = ["--header-read-timeout", "1s"];
    let ic = ca.serve(certs.path(), &["slow.test"], &config, &args).await;

    // HTTP/1.1, twice on one connection: each request its own deadline.
    let connector = ca.client(BOTH, &[b"http/1.1"]);
    let stream = handshake(&connector, ic.tls, "slow.test").await.unwrap();
    let mut conn = http1(stream).await;
    for _ in 0..2 {
        let sent = std::time::Instant::now();
        let (status, body) = get1(&mut conn, "slow.test", "/").await;
        let took = sent.elapsed();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(
            took >= Duration::from_millis(1190),
            "HTTP/1.1: 504 after only {took:?}"
        );
    }

    // HTTP/2: two streams at once, each with its own deadline.
    let connector = ca.client(BOTH, &[b"h2"]);
    let stream = handshake(&connector, ic.tls, "slow.test").await.unwrap();
    let send = http2(stream).await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut send = send.clone();
        streams.push(tokio::spawn(async move {
            let sent = std::time::Instant::now();
            let rsp = send
                .send_request(
                    Request::get("https://slow.test/")
                        .body(Empty::<Bytes>::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            (rsp.status(), sent.elapsed())
        }));
    }
    for stream in streams {
        let (status, took) = stream.await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            took >= Duration::from_millis(1190),
            "h2: 504 after only {took:?}"
        );
    }
    let metrics = ic.metrics().await;
    assert!(
        metrics.contains(
            r#"wakegate_upstream_errors_total{kind="response_header_timeout",route="slow"} 4"#
        ),
        "{metrics}"
    );
}
