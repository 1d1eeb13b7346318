//! Local mode: the [`Provider`] for running without a cluster. Routes come from a YAML file;
//! each target is an always-on upstream or a command that a supervisor starts on the first
//! held request and stops when idle.

pub mod config;
mod process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::config::LocalTarget;
pub use self::config::{ConfigError, LocalConfig};
pub use self::process::PROBE_INTERVAL;
use self::process::{ProcessStatus, Supervisor, WakeSignal};
use crate::load::Loads;
use crate::provider::{never_ready, Endpoint, Provider, ReadyEndpoints, RouteSpec, TargetId};

/// Routes and targets from a local config file.
#[derive(Debug)]
pub struct LocalProvider {
    routes: watch::Sender<Option<Arc<[RouteSpec]>>>,
    targets: HashMap<TargetId, Target>,
}

#[derive(Debug)]
struct Target {
    endpoints: watch::Receiver<ReadyEndpoints>,
    kind: TargetKind,
}

#[derive(Debug)]
enum TargetKind {
    Upstream(String),
    Command {
        wake: Arc<WakeSignal>,
        status: Arc<Mutex<ProcessStatus>>,
    },
}

/// The running supervisors of command targets.
#[derive(Debug)]
pub struct Supervisors(JoinSet<()>);

impl Supervisors {
    /// Waits until every supervisor has stopped its process (after the stop token fires).
    pub async fn wait(mut self) {
        while let Some(done) = self.0.join_next().await {
            if let Err(err) = done {
                tracing::error!(error = %err, "a command supervisor failed");
            }
        }
    }
}

impl LocalProvider {
    /// Starts a supervisor per command target. They stop their processes when `stop` fires.
    pub fn start(
        config: LocalConfig,
        loads: &Loads,
        stop: CancellationToken,
    ) -> (Arc<Self>, Supervisors) {
        let mut targets = HashMap::new();
        let mut supervisors = JoinSet::new();
        let specs: Arc<[RouteSpec]> = config.routes.iter().map(|r| r.spec.clone()).collect();
        for route in config.routes {
            if let (Some(authority), Some(failover)) = (&route.failover, &route.spec.failover) {
                let (_tx, endpoints) =
                    watch::channel(std::iter::once(Endpoint::new(authority.clone())).collect());
                targets.insert(
                    failover.target.clone(),
                    Target {
                        endpoints,
                        kind: TargetKind::Upstream(authority.to_string()),
                    },
                );
            }
            let id = route.spec.target.clone();
            let target = match route.target {
                LocalTarget::Upstream(authority) => {
                    let (_tx, endpoints) =
                        watch::channel(std::iter::once(Endpoint::new(authority.clone())).collect());
                    Target {
                        endpoints,
                        kind: TargetKind::Upstream(authority.to_string()),
                    }
                }
                LocalTarget::Command(command) => {
                    let (ready, endpoints) = watch::channel(ReadyEndpoints::none());
                    let wake = Arc::new(WakeSignal::default());
                    let status = Arc::new(Mutex::new(ProcessStatus {
                        state: "stopped",
                        ..ProcessStatus::default()
                    }));
                    supervisors.spawn(
                        Supervisor {
                            route: route.spec.id.clone(),
                            target: command,
                            scaledown_period: route.scaledown_period,
                            load: loads.get(&route.spec.id),
                            wake: wake.clone(),
                            ready,
                            status: status.clone(),
                            stop: stop.clone(),
                        }
                        .run(),
                    );
                    Target {
                        endpoints,
                        kind: TargetKind::Command { wake, status },
                    }
                }
            };
            targets.insert(id, target);
        }
        let (routes, _) = watch::channel(Some(specs));
        (Arc::new(Self { routes, targets }), Supervisors(supervisors))
    }
}

impl Provider for LocalProvider {
    fn routes(&self) -> watch::Receiver<Option<Arc<[RouteSpec]>>> {
        self.routes.subscribe()
    }

    fn endpoints(&self, target: &TargetId) -> watch::Receiver<ReadyEndpoints> {
        self.targets
            .get(target)
            .map_or_else(never_ready, |t| t.endpoints.clone())
    }

    fn wake(&self, target: &TargetId) {
        if let Some(Target {
            kind: TargetKind::Command { wake, .. },
            ..
        }) = self.targets.get(target)
        {
            wake.wake();
        }
    }

    fn status(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (id, target) in &self.targets {
            let ready = target.endpoints.borrow().as_slice().len();
            let value = match &target.kind {
                TargetKind::Upstream(addr) => serde_json::json!({
                    "kind": "upstream",
                    "upstream": addr,
                    "readyEndpoints": ready,
                }),
                TargetKind::Command { status, .. } => {
                    let status = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let mut value = serde_json::to_value(status).unwrap_or_default();
                    if let Some(obj) = value.as_object_mut() {
                        obj.insert("kind".into(), "command".into());
                        obj.insert("readyEndpoints".into(), ready.into());
                    }
                    value
                }
            };
            out.insert(id.to_string(), value);
        }
        serde_json::Value::Object(out)
    }
}
