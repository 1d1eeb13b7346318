//! Leader election over a real Lease on the test API server: one leader at a time, and a
//! takeover when the leader steps down.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wakegate_controller::leader::{campaign, LeaseConfig};
use wakegate_testapi::{ApiServer, ResourceDef};

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "wakegate".into(),
        name: "wakegate-controller".into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(100),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_takeover_after_step_down() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let mut a = campaign(client.clone(), config("a"), stop_a.clone());
    let mut b = campaign(client.clone(), config("b"), stop_b.clone());
    let deadline = Duration::from_secs(5);
    tokio::time::timeout(deadline, async {
        loop {
            if *a.borrow() || *b.borrow() {
                return;
            }
            tokio::select! { _ = a.changed() => {}, _ = b.changed() => {} }
        }
    })
    .await
    .expect("someone leads");
    // Watch both for a while: never two leaders at once.
    for _ in 0..20 {
        assert!(!(*a.borrow() && *b.borrow()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, mut follower, stop_leader) = if *a.borrow() {
        (a, b, stop_a)
    } else {
        (b, a, stop_b)
    };
    assert!(!*follower.borrow());
    // The leader steps down (clears the holder); the other takes over well before expiry.
    stop_leader.cancel();
    drop(leader);
    tokio::time::timeout(Duration::from_secs(5), follower.wait_for(|l| *l))
        .await
        .expect("takeover in time")
        .unwrap();
    let lease: k8s_openapi::api::coordination::v1::Lease =
        kube::Api::namespaced(client, "wakegate")
            .get("wakegate-controller")
            .await
            .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));
}
