//! The pod simulator: plays kubelet and the EndpointSlice controller for Deployments. When a
//! Deployment wants replicas, it starts that many example-backend processes on 127.0.0.1 (each
//! after its boot delay binds its own port), and once a process accepts connections it publishes
//! a ready EndpointSlice for every Service selecting the Deployment. At zero it withdraws the
//! slices and stops the processes.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::resources::ResourceDef;
use crate::server::ApiServer;
use crate::store::{EventType, Part, Store};

/// How simulated pods run.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// The program of every pod (the interceptor binary, whose `backend` subcommand is the
    /// example app).
    pub program: PathBuf,
    /// Arguments before `--port`, e.g. `["backend"]`.
    pub args: Vec<String>,
    /// How long each pod takes to boot before it binds its port.
    pub boot_delay: Duration,
}

/// A running simulator; stops its pods when dropped.
#[derive(Debug)]
pub struct PodSimulator {
    stop: CancellationToken,
    /// Every pod process alive, so dropping the simulator kills them even if its task never
    /// runs again (the runtime may be shutting down).
    pids: Pids,
}

type Pids = Arc<std::sync::Mutex<std::collections::HashSet<u32>>>;

impl Drop for PodSimulator {
    fn drop(&mut self) {
        self.stop.cancel();
        let pids = self.pids.lock().map(|p| p.clone()).unwrap_or_default();
        for pid in pids.into_iter().filter_map(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

struct Pod {
    name: String,
    port: u16,
    ready: bool,
    child: Child,
}

struct Sim {
    store: Arc<Store>,
    config: SimulatorConfig,
    deployments: ResourceDef,
    services: ResourceDef,
    slices: ResourceDef,
    /// Pod objects, one per simulated pod: deleting one stops its process, and the Deployment
    /// gets a new pod, as the ReplicaSet controller would.
    pod_objects: ResourceDef,
    pods: HashMap<(String, String), Vec<Pod>>,
    ready_tx: mpsc::UnboundedSender<(String, String, String)>,
    next: u64,
    pids: Pids,
}

impl PodSimulator {
    /// Starts simulating pods for the Deployments in `server`.
    pub fn start(server: &ApiServer, config: SimulatorConfig) -> anyhow::Result<Self> {
        let def = |plural: &str, group: &str| {
            server
                .def(plural, group)
                .ok_or_else(|| anyhow::anyhow!("the server does not serve {plural}.{group}"))
        };
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let pids = Pids::default();
        let sim = Sim {
            pids: pids.clone(),
            store: server.store(),
            config,
            deployments: def("deployments", "apps")?,
            services: def("services", "")?,
            slices: def("endpointslices", "discovery.k8s.io")?,
            pod_objects: def("pods", "")?,
            pods: HashMap::new(),
            ready_tx,
            next: 0,
        };
        let stop = CancellationToken::new();
        tokio::spawn(sim.run(ready_rx, stop.clone()));
        Ok(Self { stop, pids })
    }
}

impl Sim {
    async fn run(
        mut self,
        mut ready_rx: mpsc::UnboundedReceiver<(String, String, String)>,
        stop: CancellationToken,
    ) {
        let (mut events, _) = self.store.watch(Some(self.store.resource_version()));
        self.sync_all();
        // A pod's process can die on its own: a crash, or its port taken between the moment
        // the simulator picked it and the moment the pod, booted, binds it (parallel tests
        // open sockets all the time). As a ReplicaSet would, the simulator then replaces it.
        let mut reap = tokio::time::interval(Duration::from_millis(200));
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = reap.tick() => {
                    let died = self.pods.values_mut().any(|pods| {
                        pods.iter_mut().any(|p| !matches!(p.child.try_wait(), Ok(None)))
                    });
                    if died {
                        tracing::warn!("simulator: a pod's process exited; replacing it");
                        self.sync_all();
                    }
                }
                event = events.recv() => match event {
                    Ok(e) if e.resource == "deployments.apps" || e.resource == "services." => self.sync_all(),
                    Ok(e) if e.resource == "pods." && e.kind == EventType::Deleted => {
                        let name = e.object["metadata"]["name"].as_str().unwrap_or("");
                        self.pod_deleted(&e.namespace, name);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.sync_all(),
                    Err(_) => break,
                },
                Some((ns, deploy, pod)) = ready_rx.recv() => {
                    if let Some(p) = self.pods.get_mut(&(ns.clone(), deploy.clone())).and_then(|pods| pods.iter_mut().find(|p| p.name == pod)) {
                        p.ready = true;
                    }
                    self.publish(&ns, &deploy);
                }
            }
        }
        for pods in self.pods.values_mut() {
            for pod in pods.iter_mut() {
                stop_pod(&mut pod.child);
            }
        }
    }

    fn sync_all(&mut self) {
        let (deployments, _) = self.store.list(&self.deployments, None, |_| true);
        let mut seen = Vec::new();
        for d in &deployments {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
            let name = d["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let desired = d["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            seen.push((ns.clone(), name.clone()));
            self.scale(&ns, &name, desired);
        }
        let gone: Vec<_> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.scale(&ns, &name, 0);
            self.pods.remove(&(ns, name));
        }
    }

    /// A Pod object was deleted: its process stops, and its Deployment is brought back to its
    /// replica count with a new pod.
    fn pod_deleted(&mut self, ns: &str, name: &str) {
        let Some((key, index)) = self.pods.iter().find_map(|(key, pods)| {
            (key.0 == ns)
                .then(|| pods.iter().position(|p| p.name == name))
                .flatten()
                .map(|i| (key.clone(), i))
        }) else {
            return;
        };
        if let Some(pods) = self.pods.get_mut(&key) {
            let mut pod = pods.remove(index);
            if let (Some(pid), Ok(mut pids)) = (pod.child.id(), self.pids.lock()) {
                pids.remove(&pid);
            }
            stop_pod(&mut pod.child);
        }
        self.sync_all();
        self.publish(&key.0, &key.1);
    }

    fn scale(&mut self, ns: &str, deploy: &str, desired: usize) {
        let key = (ns.to_owned(), deploy.to_owned());
        let mut pods = self.pods.remove(&key).unwrap_or_default();
        // Pods whose process died are gone, as a crashed container would be until restarted.
        let store = self.store.clone();
        let pod_objects = self.pod_objects.clone();
        let before = pods.len();
        pods.retain_mut(|p| {
            let alive = matches!(p.child.try_wait(), Ok(None));
            if !alive {
                let _ = store.delete(&pod_objects, ns, &p.name);
            }
            alive
        });
        let deployment_labels = self
            .store
            .get(&self.deployments, ns, deploy)
            .map(|d| d["spec"]["template"]["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        // A dead pod's endpoint goes from the slices even if nothing replaces it.
        let mut changed = pods.len() != before;
        while pods.len() > desired {
            if let Some(mut pod) = pods.pop() {
                if let (Some(pid), Ok(mut pids)) = (pod.child.id(), self.pids.lock()) {
                    pids.remove(&pid);
                }
                stop_pod(&mut pod.child);
                let _ = self.store.delete(&self.pod_objects, ns, &pod.name);
                changed = true;
            }
        }
        while pods.len() < desired {
            self.next += 1;
            let pod_name = format!("{deploy}-{:05x}", self.next);
            let port = match StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(addr) => addr.port(),
                Err(e) => {
                    tracing::error!(error = %e, "simulator: no free port");
                    break;
                }
            };
            let child = Command::new(&self.config.program)
                .args(&self.config.args)
                .args(["--port", &port.to_string(), "--name", deploy])
                .arg("--boot-delay")
                .arg(format!("{}ms", self.config.boot_delay.as_millis()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, program = ?self.config.program, "simulator: cannot start pod");
                    break;
                }
            };
            let tx = self.ready_tx.clone();
            let (ns2, d2, p2) = (ns.to_owned(), deploy.to_owned(), pod_name.clone());
            tokio::spawn(async move {
                // Kubelet's readiness probe: a TCP connect, every 5 ms.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while tokio::time::Instant::now() < deadline {
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        let _ = tx.send((ns2, d2, p2));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            if let (Some(pid), Ok(mut pids)) = (child.id(), self.pids.lock()) {
                pids.insert(pid);
            }
            let _ = self.store.create(
                &self.pod_objects,
                ns,
                json!({
                    "metadata": {"name": pod_name, "labels": deployment_labels.clone()},
                    "status": {"podIP": "127.0.0.1"},
                }),
            );
            pods.push(Pod {
                name: pod_name,
                port,
                ready: false,
                child,
            });
            changed = true;
        }
        self.pods.insert(key, pods);
        if changed {
            self.publish(ns, deploy);
        }
    }

    /// Writes one EndpointSlice per ready pod for every Service that selects the Deployment,
    /// removes stale ones, and updates the Deployment's status.
    fn publish(&mut self, ns: &str, deploy: &str) {
        let Ok(deployment) = self.store.get(&self.deployments, ns, deploy) else {
            return;
        };
        let labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
        let (services, _) = self.store.list(&self.services, Some(ns), |svc| {
            svc["spec"]["selector"].as_object().is_some_and(|sel| {
                !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
        });
        let pods = self.pods.get(&(ns.to_owned(), deploy.to_owned()));
        let ready: Vec<(&str, u16)> = pods
            .map(|ps| {
                ps.iter()
                    .filter(|p| p.ready)
                    .map(|p| (p.name.as_str(), p.port))
                    .collect()
            })
            .unwrap_or_default();
        for svc in &services {
            let svc_name = svc["metadata"]["name"].as_str().unwrap_or("");
            let (existing, _) = self.store.list(&self.slices, Some(ns), |s| {
                s["metadata"]["labels"]["kubernetes.io/service-name"] == json!(svc_name)
                    && s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                        == json!(MANAGED_BY)
            });
            let wanted: Vec<String> = ready
                .iter()
                .map(|(pod, _)| format!("{svc_name}-{pod}"))
                .collect();
            for slice in &existing {
                let name = slice["metadata"]["name"].as_str().unwrap_or("");
                if !wanted.iter().any(|w| w == name) {
                    let _ = self.store.delete(&self.slices, ns, name);
                }
            }
            for (pod, port) in &ready {
                let name = format!("{svc_name}-{pod}");
                let ports: Vec<Value> = svc["spec"]["ports"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| json!({"name": p["name"].as_str().unwrap_or(""), "port": port, "protocol": "TCP"}))
                            .collect()
                    })
                    .unwrap_or_default();
                let slice = json!({
                    "metadata": {
                        "name": name,
                        "labels": {"kubernetes.io/service-name": svc_name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                    },
                    "addressType": "IPv4",
                    "endpoints": [{
                        "addresses": ["127.0.0.1"],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
                    }],
                    "ports": ports,
                });
                if self.store.get(&self.slices, ns, &name).is_err() {
                    let _ = self.store.create(&self.slices, ns, slice);
                }
            }
        }
        let total = pods.map_or(0, Vec::len);
        let _ = self.store.update(&self.deployments, ns, deploy, Part::Status, |d| {
            d["status"] = json!({"replicas": total, "readyReplicas": ready.len(), "availableReplicas": ready.len()});
            Ok(())
        });
    }
}

const MANAGED_BY: &str = "wakegate-testapi-simulator";

fn stop_pod(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
