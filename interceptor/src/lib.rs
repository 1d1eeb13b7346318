//! Wakegate's interceptor: a reverse proxy that holds requests while their target is scaled to
//! zero, raises a wake signal at once, and forwards the held requests the moment an endpoint is
//! ready.
//!
//! The core ([`proxy`], [`routing`], [`load`]) knows targets only through the [`provider`] seam;
//! [`local`] implements it with child processes.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod client_conn;
pub mod connect;
pub mod events;
pub mod load;
pub mod local;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod signal;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::cli::ServeArgs;
use crate::events::WakeEvents;
use crate::load::Loads;
use crate::local::{ConfigError, LocalConfig, LocalProvider};
use crate::metrics::ProxyMetrics;
use crate::proxy::{DefaultTimeouts, Proxy};
use crate::server::ConnectionSettings;

/// Why the interceptor could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The local config file is missing, unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No `--config` was given, and Kubernetes mode is not part of this build yet.
    #[error("no --config given: pass a local-mode config file (see examples/local.yaml)")]
    NoConfig,
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
    /// The metrics could not be registered (a bug: names clash).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl RunError {
    /// The process exit status: 64 (EX_USAGE) for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::NoConfig => 64,
            Self::Bind { .. } | Self::Metrics(_) => 1,
        }
    }
}

/// Runs the interceptor until SIGTERM or SIGINT, then drains and stops.
pub async fn run(args: ServeArgs) -> Result<(), RunError> {
    raise_fd_limit();
    let config = match &args.config {
        Some(path) => LocalConfig::load(path)?,
        None => return Err(RunError::NoConfig),
    };
    let bind =
        |addr, flag| server::bind(addr).map_err(|source| RunError::Bind { addr, flag, source });
    let proxy_listener = bind(args.proxy_addr, "--proxy-addr")?;
    let admin_listener = bind(args.admin_addr, "--admin-addr")?;

    let registry = Registry::new();
    let loads = Arc::new(Loads::default());
    let stop_children = CancellationToken::new();
    let (provider, supervisors) = LocalProvider::start(config, &loads, stop_children.clone());
    let metrics = ProxyMetrics::register(&registry, loads.clone())?;
    let timeouts = DefaultTimeouts {
        readiness: args.readiness_timeout,
        response_header: args.response_header_timeout,
    };
    let wakes = WakeEvents::default();
    let proxy = Proxy::new(
        provider.clone(),
        loads.clone(),
        metrics,
        timeouts,
        wakes.clone(),
    );
    tokio::spawn(proxy.clone().follow_routes());
    let admin = Admin::new(proxy.clone(), provider, loads, registry, wakes);

    let settings = ConnectionSettings {
        header_read_timeout: args.header_read_timeout,
    };
    let stop_proxy = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    tracing::info!(proxy = %args.proxy_addr, admin = %args.admin_addr, config = ?args.config, "interceptor listening");
    let proxy_server = tokio::spawn(server::serve(
        proxy_listener,
        move |req, client| {
            let proxy = proxy.clone();
            async move { proxy.handle(req, client).await }
        },
        settings,
        stop_proxy.clone(),
        args.drain_timeout,
    ));
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        {
            let admin = admin.clone();
            move |req, _remote| {
                let rsp = admin.handle(&req);
                async move { rsp }
            }
        },
        settings,
        stop_admin.clone(),
        std::time::Duration::from_secs(1),
    ));

    signal::terminated().await;
    admin.start_draining();
    tracing::info!(delay = ?args.shutdown_delay, "shutting down: reporting not ready");
    tokio::select! {
        () = tokio::time::sleep(args.shutdown_delay) => {}
        () = signal::terminated() => tracing::info!("second signal: skipping the shutdown delay"),
    }
    stop_proxy.cancel();
    match proxy_server.await {
        Ok(drain) if drain.complete => {
            tracing::info!("drain complete: every in-flight request finished")
        }
        Ok(drain) => {
            tracing::warn!(abandoned_connections = drain.abandoned, timeout = ?args.drain_timeout, "drain incomplete: deadline passed with requests in flight")
        }
        Err(err) => tracing::error!(error = %err, "proxy server task failed"),
    }
    stop_children.cancel();
    supervisors.wait().await;
    stop_admin.cancel();
    let _ = admin_server.await;
    tracing::info!("stopped");
    Ok(())
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
