//! Command-line flags; each has a `WAKEGATE_*` environment twin and a documented default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Wakegate's controller: reconciles HTTPScaledObjects, serves KEDA's external scaler, or
/// scales workloads itself.
#[derive(Clone, Debug, Parser)]
#[command(name = "wakegate-controller", version)]
pub struct Args {
    /// Who scales: `keda` (a ScaledObject per HTTPScaledObject, scaled through this controller's
    /// external scaler), `standalone` (this controller patches `/scale`), or `auto` (KEDA when
    /// the ScaledObject kind is served).
    #[arg(long, env = "WAKEGATE_SCALER", value_enum, default_value_t = ScalerChoice::Auto)]
    pub scaler: ScalerChoice,

    /// The kubeconfig to use (default: in-cluster, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch HTTPScaledObjects in this namespace only (default: all).
    #[arg(long, env = "WAKEGATE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// The controller's own namespace: its Lease and the interceptor admin Service live here.
    #[arg(long, env = "WAKEGATE_NAMESPACE", default_value = "wakegate")]
    pub namespace: String,

    /// Address of the gRPC external scaler (and gRPC health).
    #[arg(long, env = "WAKEGATE_GRPC_ADDR", default_value = "0.0.0.0:9091")]
    pub grpc_addr: SocketAddr,

    /// Address of /livez, /readyz and /metrics.
    #[arg(long, env = "WAKEGATE_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    pub admin_addr: SocketAddr,

    /// `scalerAddress` written into ScaledObjects: this controller's Service as KEDA reaches it.
    #[arg(
        long,
        env = "WAKEGATE_SCALER_ADDRESS",
        default_value = "wakegate-controller.wakegate:9090"
    )]
    pub scaler_address: String,

    /// The interceptors' admin Service (in --namespace), whose EndpointSlices list the replicas.
    #[arg(
        long,
        env = "WAKEGATE_INTERCEPTOR_ADMIN_SERVICE",
        default_value = "wakegate-interceptor-admin"
    )]
    pub interceptor_admin_service: String,

    /// The admin port's name in that Service (empty: its first port).
    #[arg(long, env = "WAKEGATE_INTERCEPTOR_ADMIN_PORT", default_value = "admin")]
    pub interceptor_admin_port: String,

    /// Fixed interceptor admin addresses (host:port, comma-separated) instead of discovery.
    #[arg(long, env = "WAKEGATE_INTERCEPTOR_ADMIN_ADDRS", value_delimiter = ',')]
    pub interceptor_admin_addrs: Vec<String>,

    /// How often interceptor counts are sampled (wakes are pushed, not sampled).
    #[arg(long, env = "WAKEGATE_SAMPLE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample_interval: Duration,

    /// KEDA mode: a request seen this recently makes a route active (KEDA's pollingInterval).
    #[arg(long, env = "WAKEGATE_ACTIVITY_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub activity_window: Duration,

    /// Standalone mode: a higher replica count wanted this recently holds off a scale-in.
    #[arg(long, env = "WAKEGATE_SCALE_IN_STABILIZATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub scale_in_stabilization: Duration,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "WAKEGATE_LEASE_NAME",
        default_value = "wakegate-controller"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log format.
    #[arg(long, env = "WAKEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A one-off command instead of running the controller.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-off commands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Print, for every HTTPScaledObject in a manifest, the equivalent InterceptorRoute, the
    /// ScaledObject with an `interceptorRoute` trigger, and the migration steps.
    Migrate(crate::migrate::MigrateArgs),
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `--scaler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScalerChoice {
    /// KEDA scales.
    Keda,
    /// Wakegate scales.
    Standalone,
    /// KEDA when its ScaledObject kind is served, else standalone.
    Auto,
}
