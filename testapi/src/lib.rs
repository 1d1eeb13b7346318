//! A test-only Kubernetes API server and a pod simulator, so the real `kube` client, the real
//! interceptor and the real controller run end to end where no cluster exists.
//!
//! The server speaks the real REST protocol over HTTP on 127.0.0.1: discovery, list and watch
//! (with resourceVersion, resuming, 410 Gone, label and field selectors), get, create, replace,
//! delete (finalizers, deletionTimestamp, owner-reference garbage collection), JSON merge and
//! JSON patch, server-side apply (as a merge that creates), the `status` and `scale`
//! subresources, and 404 / 409 answers as `Status` objects. It is generic over resources: a
//! [`ResourceDef`] is all a new kind needs. Requests that impersonate a service account are
//! held to RBAC as written ([`rbac`]), so a component can run under exactly what `deploy/`
//! grants it.

pub mod rbac;
mod resources;
mod selector;
mod server;
mod simulator;
mod store;

pub use self::resources::{ResourceDef, ScalePaths};
pub use self::server::ApiServer;
pub use self::simulator::{PodSimulator, SimulatorConfig};
pub use self::store::{ApiError, Part, Store};
