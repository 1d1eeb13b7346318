//! Command-line flags. Every flag has a `WAKEGATE_*` environment twin and a documented default;
//! values are parsed into their types here so nothing downstream re-validates them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::backend::BackendArgs;
use crate::kubernetes::EndpointMode;

/// Wakegate's interceptor: a reverse proxy that holds requests while their target wakes from
/// zero, and forwards them the moment it is ready.
#[derive(Debug, Parser)]
#[command(
    name = "wakegate-interceptor",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Something other than the interceptor.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The interceptor's flags.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log format.
    #[arg(long, env = "WAKEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the example backend: a small HTTP app with a configurable boot delay.
    Backend(BackendArgs),
    /// Run the example job service: `POST /jobs` answers at once and works in the background,
    /// asking to be kept awake (`Wakegate-Keep-Awake`) until the work is done.
    Jobs(crate::jobs::JobsArgs),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of the interceptor itself.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address the proxy listens on.
    #[arg(long, env = "WAKEGATE_PROXY_ADDR", default_value = "0.0.0.0:8080")]
    pub proxy_addr: SocketAddr,

    /// Address the TLS listener binds, when a certificate is given (`--tls-cert` or
    /// `--tls-cert-store`).
    #[arg(long, env = "WAKEGATE_TLS_ADDR", default_value = "0.0.0.0:8443")]
    pub tls_addr: SocketAddr,

    /// Default TLS certificate chain (PEM), for clients without SNI or with a name no store
    /// certificate covers.
    #[arg(long, env = "WAKEGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "WAKEGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Directory of certificates picked by SNI: every `<name>.crt` (or `.pem`) with
    /// `<name>.key` beside it, walked recursively, serves the DNS names it carries. Repeat the
    /// flag, or separate directories with commas.
    #[arg(long, env = "WAKEGATE_TLS_CERT_STORE", value_delimiter = ',')]
    pub tls_cert_store: Vec<PathBuf>,

    /// How often certificate files are checked for changes; changed files are reloaded
    /// without a restart.
    #[arg(long, env = "WAKEGATE_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,

    /// Kubernetes mode: CA certificates (PEM) that upstream Services speaking TLS are checked
    /// against, instead of the public roots.
    #[arg(long, env = "WAKEGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Kubernetes mode: accept any certificate from upstream Services speaking TLS. Encrypts
    /// without authenticating; prefer `--upstream-ca-file`.
    #[arg(
        long,
        env = "WAKEGATE_UPSTREAM_TLS_INSECURE_SKIP_VERIFY",
        conflicts_with = "upstream_ca_file"
    )]
    pub upstream_tls_insecure_skip_verify: bool,

    /// Address the admin server (/livez, /readyz, /queue, /status, /metrics) listens on.
    #[arg(long, env = "WAKEGATE_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Local-mode config file (YAML). Without it the interceptor runs in Kubernetes mode,
    /// using the in-cluster service account or `KUBECONFIG`.
    #[arg(long, env = "WAKEGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Kubernetes mode: the kubeconfig to use (default: in-cluster, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes mode: watch HTTPScaledObjects in this namespace only (default: all).
    #[arg(long, env = "WAKEGATE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Kubernetes mode: forward to the ready pod addresses from EndpointSlices (`pod`, which
    /// does not wait for kube-proxy), or to the Service (`service`).
    #[arg(long, env = "WAKEGATE_ENDPOINT_MODE", value_enum, default_value_t = EndpointMode::Pod)]
    pub endpoint_mode: EndpointMode,

    /// How long a request is held waiting for its target to have a ready endpoint, unless its
    /// route sets `timeouts.readiness`.
    #[arg(long, env = "WAKEGATE_READINESS_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub readiness_timeout: Duration,

    /// How long to wait for an upstream's response headers, unless the route sets
    /// `timeouts.responseHeader`.
    #[arg(long, env = "WAKEGATE_RESPONSE_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub response_header_timeout: Duration,

    /// The whole-request deadline, from arrival (the cold-start wait included) to the end of
    /// the response: 504 before the response headers, the response cut after. `0s` means none;
    /// a route's `timeouts.request` overrides it.
    #[arg(long, env = "WAKEGATE_REQUEST_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long a new connection may take from accept to its first complete request head (TLS
    /// handshake and HTTP/2 preface included), and a later request its headers.
    #[arg(long, env = "WAKEGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// A client connection with no request in flight for this long is closed (HTTP/2: GOAWAY,
    /// then close). Keep it above the idle timeout of the proxy in front (nginx 60s, Traefik
    /// 90s), so that proxy closes first and never sends on a connection being closed.
    #[arg(long, env = "WAKEGATE_CLIENT_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub client_idle_timeout: Duration,

    /// A plaintext HTTP/1.1 keep-alive connection with no request for this long is parked: hyper
    /// lets go of its buffers and connection state (about 20 KiB), and only the socket is kept
    /// until the next request arrives, which is then served (or held, if its target went cold)
    /// as on a new connection. Under a second of idleness costs a few microseconds per
    /// request; kept connections then cost about what the kernel's socket does. 0s: never.
    #[arg(long, env = "WAKEGATE_PARK_IDLE_AFTER", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub park_idle_after: Duration,

    /// Most client connections open at once, over the plaintext and TLS listeners; past it, new
    /// connections are closed at once (and counted) while open ones keep being served.
    #[arg(long, env = "WAKEGATE_MAX_CLIENT_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections: u32,

    /// After the header-read timeout's worth of grace, a request body must arrive at least this
    /// fast on average (bytes per second, counting only time spent waiting for the client);
    /// slower bodies get 408. gRPC requests are exempt. `0` turns it off.
    #[arg(long, env = "WAKEGATE_MIN_REQUEST_BODY_RATE", default_value_t = 240)]
    pub min_request_body_rate: u64,

    /// Peers whose `X-Forwarded-For`, `-Proto` and `-Host` are believed (CIDRs or addresses,
    /// comma-separated; `none` trusts nobody). The default is loopback and the private ranges,
    /// where an in-cluster Ingress lives. Any other peer's forwarding headers are replaced.
    #[arg(
        long,
        env = "WAKEGATE_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
    )]
    pub trusted_proxies: Vec<TrustedProxy>,

    /// Most requests held at once over all routes (waiting for a cold target); past it, 503
    /// with Retry-After. Each held request costs a socket and a few KiB.
    #[arg(long, env = "WAKEGATE_MAX_HELD_REQUESTS", default_value_t = 20_000)]
    pub max_held_requests: usize,

    /// Most parked requests (held before hyper served their connection) released to their
    /// upstreams at once when a target becomes ready; the rest follow as those finish. It
    /// bounds the memory a burst takes at its release (every released request opens its own
    /// upstream connection), at the cost of a few milliseconds per thousand. 0: no bound.
    #[arg(long, env = "WAKEGATE_MAX_RELEASED_AT_ONCE", default_value_t = 1024)]
    pub max_released_at_once: usize,

    /// After a cold start, how long the rest of the held requests wait for the first one's
    /// response head before they follow it anyway. The first goes up alone so that the backend
    /// that has just booted answers it first (a slow start for the new endpoint, at its
    /// smallest). 0s releases them all at once.
    #[arg(long, env = "WAKEGATE_FIRST_RELEASE_ALONE_FOR", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub first_release_alone_for: Duration,

    /// Most requests held at once per route, for routes that set no cap of their own (an
    /// InterceptorRoute's `coldStart.maxPendingRequests`, `wakegate.dev/max-held-requests`, or a
    /// local route's `maxHeldRequests`); past it, 503 or the route's overflow placeholder.
    /// Counted per interceptor replica. Unset: no per-route default.
    #[arg(long, env = "WAKEGATE_MAX_PENDING_REQUESTS")]
    pub max_pending_requests: Option<std::num::NonZeroUsize>,

    /// Write one access log line per proxied request to stdout, as `text` (logfmt) or `json`:
    /// route, method, path, status, bytes, duration, cold-start wait, upstream and trace id.
    /// Off by default.
    #[arg(long, env = "WAKEGATE_ACCESS_LOG", value_enum)]
    pub access_log: Option<crate::access_log::AccessLogFormat>,

    /// Largest request header block accepted (bytes); larger ones get 431. At least 8192.
    #[arg(long, env = "WAKEGATE_MAX_HEADER_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,

    /// On shutdown, how long in-flight requests may take to finish.
    #[arg(long, env = "WAKEGATE_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// On shutdown, how long to keep serving while reporting not-ready, so load balancers stop
    /// sending new requests first. Set it to a few seconds in Kubernetes.
    #[arg(long, env = "WAKEGATE_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
}

/// One `--trusted-proxies` entry: a CIDR, a single address, or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedProxy(pub Option<ipnet::IpNet>);

impl std::str::FromStr for TrustedProxy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self(None));
        }
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Self(Some(net.trunc())));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Self(Some(ipnet::IpNet::from(ip))))
            .map_err(|_| format!("{s:?} is not a CIDR (10.0.0.0/8), an address, or `none`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_parse_cidrs_addresses_and_none() {
        let cli = Cli::try_parse_from([
            "wakegate-interceptor",
            "--trusted-proxies",
            "10.1.0.0/16, 192.0.2.7,none",
        ])
        .unwrap();
        let nets: Vec<_> = cli.serve.trusted_proxies.iter().map(|t| t.0).collect();
        assert_eq!(
            nets,
            [
                Some("10.1.0.0/16".parse().unwrap()),
                Some("192.0.2.7/32".parse().unwrap()),
                None
            ]
        );
        let err = Cli::try_parse_from(["wakegate-interceptor", "--trusted-proxies", "10.0.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--trusted-proxies") && err.contains("10.0.0.0/33"),
            "{err}"
        );
        let default = Cli::try_parse_from(["wakegate-interceptor"]).unwrap();
        assert!(default.serve.trusted_proxies.len() >= 5);
    }
}
