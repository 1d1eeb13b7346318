//! Serves the test API server until stopped, for trying Kubernetes mode (and measuring the
//! controller's footprint) without a cluster:
//!
//! ```sh
//! cargo run -p wakegate-testapi --example serve -- /tmp/kubeconfig
//! KUBECONFIG=/tmp/kubeconfig wakegate-controller --scaler standalone
//! ```
//!
//! It writes a kubeconfig for the server to the path given, and serves the standard resources
//! plus KEDA's ScaledObject. No pods run: nothing simulates the kubelet.

#![allow(clippy::unwrap_used)] // an example: a panic says what went wrong

use wakegate_testapi::{ApiServer, ResourceDef};

#[tokio::main]
async fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: serve KUBECONFIG_PATH");
        std::process::exit(64);
    };
    let mut defs = ResourceDef::standard();
    defs.push(ResourceDef::keda_scaled_object());
    let server = ApiServer::start(defs).await.unwrap();
    std::fs::write(&path, server.kubeconfig()).unwrap();
    eprintln!("test API server at {}; kubeconfig in {path}", server.url());
    tokio::signal::ctrl_c().await.unwrap();
}
