//! Wakegate's interceptor: a reverse proxy that holds requests while their target is scaled to
//! zero, raises a wake signal at once, and forwards the held requests the moment an endpoint is
//! ready.
//!
//! The core ([`proxy`], [`routing`], [`load`]) knows targets only through the [`provider`] seam;
//! [`local`] implements it with child processes.

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod cli;
pub mod client_conn;
pub mod connect;
pub mod events;
pub mod jobs;
pub mod kubernetes;
pub mod load;
pub mod local;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod request_head;
pub mod routing;
pub mod server;
pub mod signal;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::cli::ServeArgs;
use crate::events::WakeEvents;
use crate::kubernetes::KubeProvider;
use crate::load::Loads;
use crate::local::{ConfigError, LocalConfig, LocalProvider, Supervisors};
use crate::metrics::ProxyMetrics;
use crate::provider::Provider;
use crate::proxy::{Proxy, ProxySettings};
use crate::server::ConnectionSettings;

/// Why the interceptor could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The local config file is missing, unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Kubernetes mode, and no cluster configuration was found.
    #[error("no --config given, so running in Kubernetes mode, but no cluster was found (set KUBECONFIG, run in a pod, or pass --config for local mode): {0}")]
    Kube(#[source] kube::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag that set it.
        flag: &'static str,
        /// The bind failure.
        #[source]
        source: std::io::Error,
    },
    /// A TLS certificate, key or CA file is unreadable, invalid or mismatched.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The metrics could not be registered (a bug: names clash).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The access log's writer thread could not start.
    #[error("starting the access log: {0}")]
    AccessLog(#[source] std::io::Error),
}

impl RunError {
    /// The process exit status: 64 (EX_USAGE) for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Tls(_) => 64,
            Self::Kube(_) | Self::Bind { .. } | Self::Metrics(_) | Self::AccessLog(_) => 1,
        }
    }
}

/// Runs the interceptor until SIGTERM or SIGINT, then drains and stops.
pub async fn run(args: ServeArgs) -> Result<(), RunError> {
    run_until(args, signal::terminated(), signal::terminated()).await
}

/// A kube client from `--kubeconfig`, or the environment (in-cluster, then `~/.kube/config`).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, kube::Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(kube::Error::InferKubeconfig)?
        }
        None => kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?,
    };
    kube::Client::try_from(config)
}

/// Runs the interceptor until `shutdown` completes, then drains and stops; `hurry` cuts the
/// shutdown delay short. `main` passes the first and second SIGTERM/SIGINT.
pub async fn run_until(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()>,
    hurry: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    raise_fd_limit();
    let config = args.config.as_deref().map(LocalConfig::load).transpose()?;
    let bind =
        |addr, flag| server::bind(addr).map_err(|source| RunError::Bind { addr, flag, source });
    let cert_sources = tls::CertSources {
        default: args.tls_cert.clone().zip(args.tls_key.clone()),
        stores: args.tls_cert_store.clone(),
    };
    let tls_resolver = if cert_sources == tls::CertSources::default() {
        None
    } else {
        let certs = tls::Certificates::load(&cert_sources)?;
        tracing::info!(names = ?certs.names(), "TLS certificates loaded");
        Some(tls::SniResolver::new(certs))
    };
    let upstream_trust = match (
        &args.upstream_ca_file,
        args.upstream_tls_insecure_skip_verify,
    ) {
        (Some(path), _) => tls::upstream::Trust::from_ca_file(path)?,
        (None, true) => tls::upstream::Trust::InsecureSkipVerify,
        (None, false) => tls::upstream::Trust::PublicRoots,
    };
    let proxy_listener = bind(args.proxy_addr, "--proxy-addr")?;
    let tls_listener = tls_resolver
        .as_ref()
        .map(|_| bind(args.tls_addr, "--tls-addr"))
        .transpose()?;
    let admin_listener = bind(args.admin_addr, "--admin-addr")?;

    let registry = Registry::new();
    let loads = Arc::new(Loads::default());
    let stop_provider = CancellationToken::new();
    let (provider, supervisors): (Arc<dyn Provider>, Option<Supervisors>) = match config {
        Some(config) => {
            let (provider, supervisors) =
                LocalProvider::start(config, &loads, stop_provider.clone());
            (provider, Some(supervisors))
        }
        None => {
            let client = kube_client(args.kubeconfig.as_deref())
                .await
                .map_err(RunError::Kube)?;
            let provider = KubeProvider::start(
                client,
                args.namespace.as_deref(),
                args.endpoint_mode,
                upstream_trust,
                stop_provider.clone(),
            );
            (provider, None)
        }
    };
    let metrics = ProxyMetrics::register(&registry, loads.clone())?;
    let access_log = args
        .access_log
        .map(|format| access_log::AccessLog::start(format, &registry))
        .transpose()
        .map_err(RunError::AccessLog)?;
    let proxy_settings = ProxySettings {
        readiness: args.readiness_timeout,
        response_header: args.response_header_timeout,
        request: Some(args.request_timeout).filter(|t| !t.is_zero()),
        max_held_total: args.max_held_requests,
        default_max_held: args.max_pending_requests,
        max_released_at_once: args.max_released_at_once,
        first_release_alone_for: args.first_release_alone_for,
        trusted_proxies: args.trusted_proxies.iter().filter_map(|t| t.0).collect(),
        min_body_rate: (args.min_request_body_rate > 0).then_some(proxy::MinRate {
            bytes_per_second: args.min_request_body_rate,
            grace: args.header_read_timeout,
        }),
        access_log: access_log.clone(),
    };
    let client_connections = Arc::new(server::Connections::new(
        args.max_client_connections as usize,
    ));
    client_connections.register(&registry)?;
    warn_if_fd_limit_is_low(args.max_client_connections);
    let wakes = WakeEvents::default();
    let proxy = Proxy::new(
        provider.clone(),
        loads.clone(),
        metrics,
        proxy_settings,
        wakes.clone(),
    );
    tokio::spawn(proxy.clone().follow_routes());
    let admin = Admin::new(proxy.clone(), provider, loads, registry, wakes);

    let connection = ConnectionSettings {
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.client_idle_timeout,
        max_header_bytes: args.max_header_bytes as usize,
        connections: client_connections,
        park: None,
        park_idle_after: None,
    };
    // The plaintext listener parks new connections whose first request waits for a cold
    // target (`server::Park`); TLS connections are held in hyper.
    let plaintext = ConnectionSettings {
        park: Some(Arc::new(proxy.clone())),
        park_idle_after: (!args.park_idle_after.is_zero()).then_some(args.park_idle_after),
        ..connection.clone()
    };
    let stop_proxy = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    tracing::info!(proxy = %args.proxy_addr, admin = %args.admin_addr, config = ?args.config, "interceptor listening");
    let handler = move |req, client| proxy.clone().handle(req, client);
    let proxy_server = tokio::spawn(server::serve(
        proxy_listener,
        None,
        handler.clone(),
        plaintext,
        stop_proxy.clone(),
        args.drain_timeout,
    ));
    let tls_server = match (tls_listener, tls_resolver) {
        (Some(listener), Some(resolver)) => {
            tracing::info!(tls = %args.tls_addr, "TLS listener up");
            tokio::spawn(tls::reload_on_change(
                resolver.clone(),
                cert_sources,
                args.tls_reload_interval,
                stop_provider.clone(),
            ));
            Some(tokio::spawn(server::serve(
                listener,
                Some(tls::server_config(resolver)?),
                handler,
                connection.clone(),
                stop_proxy.clone(),
                args.drain_timeout,
            )))
        }
        _ => None,
    };
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        None,
        {
            let admin = admin.clone();
            move |req, _remote| {
                let rsp = admin.handle(&req);
                async move { rsp }
            }
        },
        ConnectionSettings::internal(args.header_read_timeout),
        stop_admin.clone(),
        std::time::Duration::from_secs(1),
    ));

    shutdown.await;
    admin.start_draining();
    tracing::info!(delay = ?args.shutdown_delay, "shutting down: reporting not ready");
    tokio::select! {
        () = tokio::time::sleep(args.shutdown_delay) => {}
        () = hurry => tracing::info!("told again: skipping the shutdown delay"),
    }
    stop_proxy.cancel();
    // Both listeners drain at once, under the same deadline.
    let tls_drain = async {
        match tls_server {
            Some(server) => Some(server.await),
            None => None,
        }
    };
    let (plain, tls) = tokio::join!(proxy_server, tls_drain);
    for drain in std::iter::once(plain).chain(tls) {
        match drain {
            Ok(drain) if drain.complete => {
                tracing::info!("drain complete: every in-flight request finished")
            }
            Ok(drain) => {
                tracing::warn!(abandoned_connections = drain.abandoned, timeout = ?args.drain_timeout, "drain incomplete: deadline passed with requests in flight")
            }
            Err(err) => tracing::error!(error = %err, "proxy server task failed"),
        }
    }
    stop_provider.cancel();
    if let Some(supervisors) = supervisors {
        supervisors.wait().await;
    }
    stop_admin.cancel();
    let _ = admin_server.await;
    if let Some(log) = access_log {
        // Off the runtime's threads: it may wait for the writer.
        let _ =
            tokio::task::spawn_blocking(move || log.flush(std::time::Duration::from_secs(2))).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Says so at start when the open-file limit cannot hold the connection cap: each client
/// connection can need an upstream connection too.
fn warn_if_fd_limit_is_low(max_client_connections: u32) {
    use nix::sys::resource::{getrlimit, Resource};
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // In the platform's rlim_t (u32 on 32-bit arm): computed in u32, then widened.
        let needed: nix::libc::rlim_t = max_client_connections
            .saturating_mul(2)
            .saturating_add(256)
            .into();
        if soft < needed {
            tracing::warn!(
                open_file_limit = soft,
                needed,
                "--max-client-connections {max_client_connections} needs about {needed} file descriptors (a client and an upstream socket each); lower it or raise the limit"
            );
        }
    }
}

/// Raises the open-file limit to its hard maximum: every held request is a socket, and a burst
/// at a cold target holds thousands.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %err, "cannot raise the open-file limit");
            }
        }
    }
}
