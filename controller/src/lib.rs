//! Wakegate's controller. It reconciles HTTPScaledObjects into a status and (in KEDA mode) an
//! owned KEDA ScaledObject; aggregates counts and wake events from every interceptor replica;
//! serves KEDA's external scaler over gRPC; and, where KEDA is absent, scales workloads itself.

pub mod cli;
pub mod decide;
pub mod interceptor_route;
pub mod interceptors;
pub mod keda;
pub mod leader;
pub mod metrics;
pub mod migrate;
pub mod reconcile;
pub mod reflect;
pub mod routes;
pub mod standalone;
pub mod workloads;

/// Code generated from `proto/externalscaler.proto`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, ResourceExt};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;
use wakegate_crds::{HTTPScaledObject, InterceptorRoute};

use crate::cli::{Args, ScalerChoice};
use crate::interceptors::{Discovery, Interceptors};
use crate::keda::KedaScaler;
use crate::leader::LeaseConfig;
use crate::metrics::ControllerMetrics;
use crate::proto::external_scaler_server::ExternalScalerServer;
use crate::reconcile::{Context, ScalerMode};
use crate::routes::Routes;
use crate::standalone::StandaloneScaler;

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No cluster configuration.
    #[error("no cluster found (set KUBECONFIG or run in a pod): {0}")]
    Kube(#[source] kube::Error),
    /// Discovery failed.
    #[error("cannot discover the API server's resources: {0}")]
    Discovery(#[source] kube::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A kube client from `--kubeconfig`, or the environment.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, kube::Error> {
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
    Client::try_from(config)
}

/// Runs the controller until `shutdown` completes.
pub async fn run_until(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let client = kube_client(args.kubeconfig.as_deref())
        .await
        .map_err(RunError::Kube)?;
    let discovery = kube::Discovery::new(client.clone())
        .filter(&["keda.sh"])
        .run()
        .await
        .map_err(RunError::Discovery)?;
    let keda_served = discovery.get("keda.sh").is_some_and(|g| {
        g.recommended_resources()
            .iter()
            .any(|(r, _)| r.kind == "ScaledObject")
    });
    let mode = match args.scaler {
        ScalerChoice::Keda => ScalerMode::Keda,
        ScalerChoice::Standalone => ScalerMode::Standalone,
        ScalerChoice::Auto if keda_served => ScalerMode::Keda,
        ScalerChoice::Auto => ScalerMode::Standalone,
    };
    tracing::info!(?mode, keda_served, "scaler chosen");

    let started = tokio::time::Instant::now();
    let registry = Registry::new();
    let metrics = ControllerMetrics::register(&registry)?;
    let stop = CancellationToken::new();
    let routes = Arc::new(Routes::default());
    let found = if args.interceptor_admin_addrs.is_empty() {
        Discovery::Service {
            namespace: args.namespace.clone(),
            name: args.interceptor_admin_service.clone(),
            port_name: args.interceptor_admin_port.clone(),
        }
    } else {
        Discovery::Static(args.interceptor_admin_addrs.clone())
    };
    let interceptors =
        Interceptors::start(client.clone(), found, args.sample_interval, stop.clone());
    interceptors.register(&registry)?;
    let watched: Api<HTTPScaledObject> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let watched_routes: Api<InterceptorRoute> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Every replica keeps its own route table: any of them may answer KEDA.
    tokio::spawn(routes::follow(watched, routes.clone(), stop.clone()));
    tokio::spawn(routes::follow(watched_routes, routes.clone(), stop.clone()));

    // The external scaler and gRPC health serve on every replica: any of them can answer KEDA.
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: args.grpc_addr,
            source,
        })?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: args.admin_addr,
            source,
        })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExternalScalerServer<KedaScaler>>()
        .await;
    let scaler = KedaScaler {
        routes: routes.clone(),
        interceptors: interceptors.clone(),
        activity_window: args.activity_window,
        metrics: metrics.clone(),
        stop: stop.clone(),
    };
    let grpc = tokio::spawn({
        let stop = stop.clone();
        let incoming = futures_util::stream::unfold(grpc_listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                s
            });
            Some((conn, l))
        });
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ExternalScalerServer::new(scaler))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
    });
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_admin(
        admin_listener,
        registry,
        ready.clone(),
        stop.clone(),
    ));
    tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, "controller listening");

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("wakegate-controller-{}", std::process::id()));
    let mut leading = leader::campaign(
        client.clone(),
        LeaseConfig {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        },
        stop.clone(),
    );
    ready.store(true, Ordering::Release);
    tokio::pin!(shutdown);

    // Standalone: replica counts and other owners from watches, kept across leadership terms
    // so a new term starts with them listed.
    let workloads =
        (mode == ScalerMode::Standalone).then(|| workloads::Workloads::start(&client, &stop));
    // Only the leader reconciles and scales; leadership lost means stop acting at once.
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = leading.wait_for(|l| *l) => if changed.is_err() { break },
        }
        tracing::info!("leading: reconciling and scaling");
        let term = stop.child_token();
        let ctx = Arc::new(Context {
            client: client.clone(),
            routes: routes.clone(),
            mode,
            scaler_address: args.scaler_address.clone(),
            keda_served,
            workloads: workloads.clone(),
            forbidden_logged: Default::default(),
            metrics: metrics.clone(),
        });
        let api: Api<HTTPScaledObject> = match &args.watch_namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let interceptor_routes: Api<InterceptorRoute> = match &args.watch_namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        // An InterceptorRoute coming or going changes what its same-named HTTPScaledObject
        // does (shadowed or not): that one is reconciled again.
        let controller = Controller::new(api, watcher::Config::default())
            .watches(
                interceptor_routes.clone(),
                watcher::Config::default(),
                |route: InterceptorRoute| {
                    let ns = route.namespace()?;
                    Some(ObjectRef::<HTTPScaledObject>::new(&route.name_any()).within(&ns))
                },
            )
            .graceful_shutdown_on(term.clone().cancelled_owned())
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|_| async {});
        let route_controller = Controller::new(interceptor_routes, watcher::Config::default())
            .graceful_shutdown_on(term.clone().cancelled_owned())
            .run(
                interceptor_route::reconcile,
                interceptor_route::error_policy,
                ctx,
            )
            .for_each(|_| async {});
        let controller = tokio::spawn(async move {
            tokio::join!(controller, route_controller);
        });
        if let Some(workloads) = &workloads {
            let scaler = StandaloneScaler {
                client: client.clone(),
                routes: routes.clone(),
                interceptors: interceptors.clone(),
                metrics: metrics.clone(),
                stabilization: args.scale_in_stabilization,
                started,
                workloads: workloads.clone(),
            };
            tokio::spawn(scaler.run(term.clone()));
        }
        let lost = tokio::select! {
            () = &mut shutdown => false,
            _ = leading.wait_for(|l| !*l) => true,
        };
        term.cancel();
        // Running reconciles may finish, under a deadline: they are idempotent, so one cut
        // short is redone by the next leader, and a stop never hangs on one.
        let abort = controller.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), controller)
            .await
            .is_err()
        {
            tracing::warn!(
                "reconciles did not finish within 10 s of losing or leaving the lead; abandoned"
            );
            abort.abort();
        }
        if !lost {
            break;
        }
        tracing::warn!("lost leadership: stopped reconciling and scaling");
    }
    tracing::info!("shutting down");
    ready.store(false, Ordering::Release);
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), grpc)
        .await
        .is_err()
    {
        tracing::warn!("the gRPC server did not drain in 5 s");
    }
    // Give the lease task a moment to step down.
    let _ = tokio::time::timeout(Duration::from_secs(2), leading.wait_for(|l| !*l)).await;
    tracing::info!("stopped");
    Ok(())
}

/// Most admin connections served at once; more wait in the accept backlog.
const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Time a client of the admin server has to send its request head.
const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/livez`, `/readyz` and `/metrics`. Bounded as the interceptor's listeners are: a
/// header-read timeout, one request per connection (so no idle keep-alive connection is left
/// to close under a scraper), a cap on connections, and a failed accept (out of file
/// descriptors) backs off instead of spinning.
async fn serve_admin(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (code, body) = match req.uri().path() {
                        "/livez" => (200, "ok\n".to_owned()),
                        "/readyz" if ready.load(Ordering::Acquire) => (200, "ready\n".to_owned()),
                        "/readyz" => (503, "not ready\n".to_owned()),
                        "/metrics" => {
                            let mut buf = Vec::new();
                            let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
                            (200, String::from_utf8_lossy(&buf).into_owned())
                        }
                        _ => (404, "not found; try /livez /readyz /metrics\n".to_owned()),
                    };
                    let mut rsp = http::Response::new(Full::new(Bytes::from(body)));
                    *rsp.status_mut() =
                        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                    async move { Ok::<_, Infallible>(rsp) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
