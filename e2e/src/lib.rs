//! The end-to-end harness.
//!
//! By default a [`Cluster`] is the test API server from `wakegate-testapi` with its pod
//! simulator: Deployments scaled above zero get real backend processes and ready
//! EndpointSlices on 127.0.0.1. With `WAKEGATE_E2E_KUBECONFIG` set, the same tests run against
//! that real cluster instead, in a namespace of their own that is deleted afterwards; the
//! backend pods then run `WAKEGATE_E2E_IMAGE`, and the machine running the tests must reach pod
//! IPs (run them on a node, e.g. a k3s Raspberry Pi).
//!
//! The interceptor and the controller run in-process, through their libraries, wired as their
//! `main`s wire them, against the cluster's API through the real kube client.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // test harness: a panic is the report

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::Future;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::Client;
use serde::Deserialize as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wakegate_testapi::{ApiServer, PodSimulator, ResourceDef, SimulatorConfig};

/// The KEDA HTTP Add-on's documented example HTTPScaledObject, unchanged.
pub const ADDON_EXAMPLE: &str = include_str!("../../examples/httpscaledobject.yaml");

/// Exports this process's traces to `endpoint` over gRPC, as the binaries do from the standard
/// `OTEL_*` variables (set here, before the components start), with a short batch delay. The
/// interceptor and the controller run in the test's process, so they share this exporter. Call
/// it first, in a test file of its own: the environment and the exporter are process-wide.
pub fn export_traces(endpoint: &str) -> wakegate_telemetry::Telemetry {
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "50");
    let telemetry =
        wakegate_telemetry::Telemetry::init("wakegate-e2e", wakegate_telemetry::LogFormat::Text)
            .unwrap();
    assert!(wakegate_telemetry::tracer().is_some(), "traces are on");
    telemetry
}

/// The simulated backend's boot delay.
pub const BOOT_DELAY: Duration = Duration::from_millis(300);

/// Waits until `check` is true, polling every 20 ms; panics naming `what` after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the admin server at `admin` answers `/readyz` with 200.
async fn wait_ready(what: &str, admin: SocketAddr) {
    let http = Http::default();
    eventually(
        &format!("{what} /readyz = 200"),
        Duration::from_secs(20),
        || async {
            http.get(admin, "admin", "/readyz")
                .await
                .is_ok_and(|(s, _, _)| s == 200)
        },
    )
    .await;
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Never the same port twice in one process: the kernel can hand a just-closed free port
    // to the next bind, and two parts of one test would then share it.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

enum Backing {
    Simulated {
        server: Option<ApiServer>,
        _pods: PodSimulator,
    },
    Real,
}

/// A cluster to test against.
pub struct Cluster {
    /// A client for it.
    pub client: Client,
    /// The namespace the test's objects go in.
    pub namespace: String,
    /// A kubeconfig file for it.
    pub kubeconfig: PathBuf,
    backing: Backing,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The test API server with simulated pods running `backend` (serving KEDA's ScaledObject
    /// when `keda`), or the real cluster `WAKEGATE_E2E_KUBECONFIG` points at. Tests pass
    /// `env!("CARGO_BIN_EXE_wakegate-e2e-backend")`.
    pub async fn start(keda: bool, backend: &str) -> Self {
        Self::start_inner(keda, false, backend).await
    }

    /// As [`Cluster::start`] with KEDA's ScaledObject kind defined but not served until
    /// [`Cluster::install_keda_crd`]: KEDA installed while Wakegate runs (simulated only).
    pub async fn start_with_keda_later(backend: &str) -> Self {
        Self::start_inner(true, true, backend).await
    }

    /// Starts serving KEDA's ScaledObject kind (see [`Cluster::start_with_keda_later`]).
    pub fn install_keda_crd(&self) {
        if let Backing::Simulated {
            server: Some(server),
            ..
        } = &self.backing
        {
            server.serve("scaledobjects.keda.sh");
        }
    }

    async fn start_inner(keda: bool, keda_later: bool, backend: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        if let Ok(path) = std::env::var("WAKEGATE_E2E_KUBECONFIG") {
            static N: AtomicU32 = AtomicU32::new(0);
            let kubeconfig = PathBuf::from(path);
            let client = wakegate_interceptor::kube_client(Some(&kubeconfig))
                .await
                .unwrap();
            let namespace = format!(
                "wakegate-e2e-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let cluster = Self {
                client,
                namespace: namespace.clone(),
                kubeconfig,
                backing: Backing::Real,
                _dir: dir,
            };
            cluster
                .apply(&format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"
                ))
                .await;
            return cluster;
        }
        let mut defs = ResourceDef::standard();
        if keda {
            defs.push(ResourceDef::keda_scaled_object());
        }
        let later = if keda_later {
            vec!["scaledobjects.keda.sh".to_owned()]
        } else {
            Vec::new()
        };
        let server = ApiServer::start_with_unserved(defs, later).await.unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        let pods = PodSimulator::start(
            &server,
            SimulatorConfig {
                program: backend.into(),
                args: Vec::new(),
                boot_delay: BOOT_DELAY,
            },
        )
        .unwrap();
        let client = wakegate_interceptor::kube_client(Some(&kubeconfig))
            .await
            .unwrap();
        Self {
            client,
            namespace: "e2e".into(),
            kubeconfig,
            backing: Backing::Simulated {
                server: Some(server),
                _pods: pods,
            },
            _dir: dir,
        }
    }

    /// Takes the simulated API server away (an outage); simulated pods keep running.
    pub fn stop_api_server(&mut self) {
        if let Backing::Simulated { server, .. } = &mut self.backing {
            drop(server.take());
        }
    }

    /// Whether this is the simulated cluster.
    /// A cluster for a KEDA-mode test, or `None` (after saying why) on a real cluster without
    /// KEDA's CRDs.
    pub async fn start_keda(backend: &str) -> Option<Self> {
        let cluster = Self::start(true, backend).await;
        if !cluster.simulated() && std::env::var("WAKEGATE_E2E_KEDA").is_err() {
            eprintln!("skipped: set WAKEGATE_E2E_KEDA=1 when the real cluster has KEDA's CRDs");
            cluster.cleanup().await;
            return None;
        }
        Some(cluster)
    }

    pub fn simulated(&self) -> bool {
        matches!(self.backing, Backing::Simulated { .. })
    }

    /// Server-side applies every document in `yaml` (objects without a namespace go in the
    /// test's namespace).
    pub async fn apply(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_yaml::from_value(value).unwrap();
            let types = obj.types.clone().unwrap();
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .unwrap();
            let name = obj.metadata.name.clone().unwrap();
            let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
                let ns = obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone());
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            api.patch(
                &name,
                &PatchParams::apply("wakegate-e2e").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", types.kind));
        }
    }

    /// A Deployment of the example backend at zero replicas, and its Service on port 8080.
    pub fn app_yaml(&self, name: &str) -> String {
        let image = backend_image();
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: 0
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: app
          image: {image}
          args: ["backend", "--host", "0.0.0.0", "--port", "8080", "--name", "{name}"]
          ports: [{{containerPort: 8080, name: http}}]
          readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080, targetPort: http}}]
"#
        )
    }

    /// The KEDA ScaledObjects in the test namespace.
    pub fn scaled_objects(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &wakegate_controller::reconcile::scaled_object_resource(),
        )
    }

    /// The ScaledObject `name`, once the controller has made it (20 s at most).
    pub async fn scaled_object(&self, name: &str) -> DynamicObject {
        let sos = self.scaled_objects();
        eventually(
            &format!("the ScaledObject {name} exists"),
            Duration::from_secs(20),
            || async { sos.get_opt(name).await.unwrap().is_some() },
        )
        .await;
        sos.get(name).await.unwrap()
    }

    /// The workload's desired replicas.
    pub async fn replicas(&self, deployment: &str) -> i32 {
        let api: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.client.clone(), &self.namespace);
        api.get(deployment)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.replicas)
            .unwrap_or(1)
    }

    /// Publishes an interceptor's admin address the way its admin Service would, so the
    /// controller discovers it through EndpointSlices (simulated cluster only).
    pub async fn publish_interceptor(&self, admin: SocketAddr, controller_ns: &str) {
        self.apply(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: wakegate-interceptor-admin, namespace: {controller_ns}}}
spec:
  selector: {{app: wakegate-interceptor}}
  ports: [{{name: admin, port: 9090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: wakegate-interceptor-admin-test
  namespace: {controller_ns}
  labels: {{kubernetes.io/service-name: wakegate-interceptor-admin}}
addressType: IPv4
endpoints: [{{addresses: ["{}"], conditions: {{ready: true}}}}]
ports: [{{name: admin, port: {}, protocol: TCP}}]
"#,
            admin.ip(),
            admin.port()
        ))
        .await;
    }

    /// A kubeconfig for this cluster that acts as `user` (impersonation, kubeconfig's `as:`):
    /// how a test runs a component under exactly the RBAC a service account has, on the test
    /// API server and on a real cluster alike.
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let mut config = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        for named in &mut config.auth_infos {
            named
                .auth_info
                .get_or_insert_with(Default::default)
                .impersonate = Some(user.into());
        }
        let path = self
            ._dir
            .path()
            .join(format!("kubeconfig-{}", user.replace(':', "_")));
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        path
    }

    /// Deletes the test namespace on a real cluster.
    pub async fn cleanup(self) {
        if let Backing::Real = self.backing {
            let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
            let _ = api.delete(&self.namespace, &Default::default()).await;
        }
    }
}

/// The image the real-cluster mode runs the example backend from: the interceptor image that
/// `deploy/images/Dockerfile` builds and `deploy/base` names (its entrypoint is the binary, so
/// the pods pass only `backend ...` as arguments), or `WAKEGATE_E2E_IMAGE`.
pub fn backend_image() -> String {
    std::env::var("WAKEGATE_E2E_IMAGE").unwrap_or_else(|_| {
        format!(
            "ghcr.io/wakegate/wakegate-interceptor:{}",
            env!("CARGO_PKG_VERSION")
        )
    })
}

/// An interceptor running in-process in Kubernetes mode.
pub struct Interceptor {
    /// Its proxy address.
    pub proxy: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Interceptor {
    /// Starts it against `cluster`, watching the test namespace.
    pub async fn start(cluster: &Cluster) -> Self {
        Self::start_with(&cluster.kubeconfig, &cluster.namespace).await
    }

    /// Starts it against the cluster `kubeconfig` points at, watching `namespace`.
    pub async fn start_with(kubeconfig: &std::path::Path, namespace: &str) -> Self {
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cli = wakegate_interceptor::cli::Cli::try_parse_from([
            "wakegate-interceptor",
            "--proxy-addr",
            &proxy.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--namespace",
            namespace,
            "--readiness-timeout",
            "60s",
        ])
        .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                wakegate_interceptor::run_until(
                    cli.serve,
                    stop.clone().cancelled_owned(),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
            }
        });
        let this = Self {
            proxy,
            admin,
            stop,
            task,
        };
        wait_ready("interceptor", admin).await;
        this
    }

    /// Stops it and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        // Bounded: a stop that hangs is a bug to report, not a test to wait on forever.
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the interceptor stopped within 40 s")
            .ok();
    }
}

/// A controller running in-process.
pub struct Controller {
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), wakegate_controller::RunError>>,
}

impl Controller {
    /// Starts it against `cluster` with `--scaler scaler`, finding the interceptor at `admin`
    /// (through discovery on the simulated cluster, by address on a real one).
    pub async fn start(cluster: &Cluster, scaler: &str, interceptor_admin: SocketAddr) -> Self {
        Self::start_with(
            cluster,
            scaler,
            interceptor_admin,
            &cluster.namespace,
            &cluster.kubeconfig,
        )
        .await
    }

    /// As [`Controller::start`], with its own namespace (`--namespace`: its Lease and the
    /// interceptor admin Service) and kubeconfig (say, one from [`Cluster::kubeconfig_as`]).
    pub async fn start_with(
        cluster: &Cluster,
        scaler: &str,
        interceptor_admin: SocketAddr,
        controller_ns: &str,
        kubeconfig: &std::path::Path,
    ) -> Self {
        Self::start_with_args(
            cluster,
            scaler,
            interceptor_admin,
            controller_ns,
            kubeconfig,
            &[],
        )
        .await
    }

    /// As [`Controller::start_with`], with more flags (say, `--activity-window 1s`).
    pub async fn start_with_args(
        cluster: &Cluster,
        scaler: &str,
        interceptor_admin: SocketAddr,
        controller_ns: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        // `free_port` can race with a parallel test taking the same port: when the controller
        // cannot bind, start it again on new ports.
        for _ in 0..5 {
            let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut argv = vec![
                "wakegate-controller".to_owned(),
                "--scaler".into(),
                scaler.into(),
                "--kubeconfig".into(),
                kubeconfig.to_str().unwrap().into(),
                "--watch-namespace".into(),
                cluster.namespace.clone(),
                "--namespace".into(),
                controller_ns.to_owned(),
                "--grpc-addr".into(),
                grpc.to_string(),
                "--admin-addr".into(),
                admin.to_string(),
                "--sample-interval".into(),
                "200ms".into(),
                "--scale-in-stabilization".into(),
                "1s".into(),
                "--identity".into(),
                format!("e2e-{}", free_port()),
            ];
            argv.extend(extra.iter().map(|a| (*a).to_owned()));
            if cluster.simulated() {
                cluster
                    .publish_interceptor(interceptor_admin, controller_ns)
                    .await;
            } else {
                argv.extend([
                    "--interceptor-admin-addrs".into(),
                    interceptor_admin.to_string(),
                ]);
            }
            let args = wakegate_controller::cli::Args::try_parse_from(argv).unwrap();
            let stop = CancellationToken::new();
            let mut task = tokio::spawn({
                let stop = stop.clone();
                async move { wakegate_controller::run_until(args, stop.cancelled_owned()).await }
            });
            tokio::select! {
                () = wait_ready("controller", admin) => {
                    return Self { grpc, admin, stop, task };
                }
                ended = &mut task => match ended.unwrap() {
                    Err(wakegate_controller::RunError::Bind { .. }) => continue,
                    other => panic!("the controller stopped at start: {other:?}"),
                },
            }
        }
        panic!("no free ports for the controller after 5 tries");
    }

    /// Its Prometheus metrics.
    pub async fn metrics(&self) -> String {
        Http::default()
            .get(self.admin, "admin", "/metrics")
            .await
            .map(|(_, _, b)| b)
            .unwrap_or_default()
    }

    /// Stops it and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the controller stopped within 20 s")
            .ok();
    }
}

/// A small HTTP client.
#[derive(Clone)]
pub struct Http(HttpClient<HttpConnector, Empty<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Self(HttpClient::builder(TokioExecutor::new()).build_http())
    }
}

impl Http {
    /// GET with a Host header: status, headers, body text.
    pub async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> Result<(u16, http::HeaderMap, String), String> {
        self.get_with(addr, host, path, &[]).await
    }

    /// GET with a Host header and more headers: status, headers, body text.
    pub async fn get_with(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, http::HeaderMap, String), String> {
        let mut req = http::Request::get(format!("http://{addr}{path}")).header("host", host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::new()).unwrap();
        let rsp = self.0.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((
            parts.status.as_u16(),
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }
}
