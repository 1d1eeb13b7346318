//! The pod simulator against the real kube client.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use serde_json::json;
use wakegate_testapi::{ApiServer, PodSimulator, ResourceDef, SimulatorConfig};

/// A pod whose process exits is replaced, as a ReplicaSet would replace it, and its Deployment
/// gets a ready endpoint that answers. The first process here exits at once, as one does whose
/// port a parallel test took between the simulator picking it and the pod binding it.
#[tokio::test]
async fn a_pod_whose_process_exits_is_replaced() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let marker =
        std::env::temp_dir().join(format!("wakegate-sim-first-run-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // `sh -c SCRIPT pod --port PORT --name NAME --boot-delay 0ms`: the port is `$2`.
    let script = format!(
        r#"if [ -e '{m}' ]; then exec python3 -m http.server "$2" --bind 127.0.0.1; else touch '{m}'; exit 1; fi"#,
        m = marker.display()
    );
    let _pods = PodSimulator::start(
        &server,
        SimulatorConfig {
            program: "sh".into(),
            args: vec!["-c".into(), script, "pod".into()],
            boot_delay: Duration::ZERO,
        },
    )
    .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "app", "image": "app"}]}}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answered = loop {
        let ports: Vec<i32> = slices
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| p.port)
            .collect();
        let mut answer = None;
        for port in ports {
            if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got).await;
                answer = Some(String::from_utf8_lossy(&got).into_owned());
            }
        }
        if let Some(answer) = answer {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ready endpoint that answers within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = std::fs::remove_file(&marker);
    assert!(answered.starts_with("HTTP/1.0 200"), "{answered}");
}
