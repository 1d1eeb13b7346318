//! Leader election over a real Lease on the test API server: one leader at a time, a takeover
//! when the leader steps down, a leader whose renewal hangs stepping back before anyone else
//! can take over, and a holder whose clock is far off neither stealing nor keeping the lease.
//!
//! Leadership is checked from every change each candidate publishes, timestamped as it
//! happens, not by sampling.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wakegate_controller::leader::{campaign, LeaseConfig};
use wakegate_testapi::{ApiServer, ResourceDef};

const LEASE: Duration = Duration::from_secs(2);

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "wakegate".into(),
        name: "wakegate-controller".into(),
        identity: identity.into(),
        duration: LEASE,
        renew: Duration::from_millis(100),
        renew_deadline: Duration::from_secs(1),
    }
}

fn client(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

/// Every leadership change of one candidate, as it happens.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(Instant, bool)>>>);

impl Log {
    fn follow(rx: watch::Receiver<bool>) -> Self {
        let log = Self::default();
        let entries = log.0.clone();
        let mut rx = rx;
        tokio::spawn(async move {
            entries.lock().unwrap().push((Instant::now(), *rx.borrow()));
            while rx.changed().await.is_ok() {
                let leading = *rx.borrow_and_update();
                entries.lock().unwrap().push((Instant::now(), leading));
            }
        });
        log
    }

    /// The intervals this candidate led.
    fn terms(&self) -> Vec<(Instant, Option<Instant>)> {
        let mut terms = Vec::new();
        let mut since = None;
        for &(at, leading) in self.0.lock().unwrap().iter() {
            match (leading, since) {
                (true, None) => since = Some(at),
                (false, Some(from)) => {
                    terms.push((from, Some(at)));
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(from) = since {
            terms.push((from, None));
        }
        terms
    }

    fn leading(&self) -> bool {
        self.0.lock().unwrap().last().is_some_and(|(_, l)| *l)
    }
}

/// No instant at which both led.
fn never_together(a: &Log, b: &Log) {
    for (a_from, a_to) in a.terms() {
        for (b_from, b_to) in b.terms() {
            let a_to = a_to.unwrap_or_else(Instant::now);
            let b_to = b_to.unwrap_or_else(Instant::now);
            assert!(
                a_to <= b_from || b_to <= a_from,
                "two leaders at once: {a_from:?}..{a_to:?} and {b_from:?}..{b_to:?}"
            );
        }
    }
}

async fn until(what: &str, deadline: Duration, check: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !check() {
        assert!(Instant::now() < end, "timed out after {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_takeover_after_step_down() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = client(&server.url());
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let a = Log::follow(campaign(client.clone(), config("a"), stop_a.clone()));
    let b = Log::follow(campaign(client.clone(), config("b"), stop_b.clone()));
    until("someone leads", Duration::from_secs(5), || {
        a.leading() || b.leading()
    })
    .await;
    let (leader, follower, stop_leader) = if a.leading() {
        (&a, &b, stop_a)
    } else {
        (&b, &a, stop_b)
    };
    // Both keep campaigning for several renewals.
    until("ten renewal rounds", Duration::from_secs(5), || {
        leader.terms()[0].0.elapsed() >= Duration::from_secs(1)
    })
    .await;
    assert!(!follower.leading());
    // The leader steps down (clears the holder); the other takes over well before expiry.
    let stepped = Instant::now();
    stop_leader.cancel();
    until("takeover", Duration::from_secs(5), || follower.leading()).await;
    assert!(
        stepped.elapsed() < LEASE,
        "took over at once, not at expiry"
    );
    never_together(&a, &b);
    let lease: Lease = Api::namespaced(client, "wakegate")
        .get("wakegate-controller")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));
}

/// A TCP proxy to `upstream` that can be frozen: bytes stop moving both ways, as when the API
/// server or the network hangs without closing anything.
async fn freezable_proxy(upstream: std::net::SocketAddr) -> (String, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (frozen, _) = watch::channel(false);
    let gate = frozen.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr), Box::new(cw)),
            ] {
                let mut gate = gate.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if gate.wait_for(|f| !*f).await.is_err() {
                            return;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (format!("http://{addr}"), frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_hangs_steps_back_before_anyone_can_take_over() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let upstream: std::net::SocketAddr =
        server.url().trim_start_matches("http://").parse().unwrap();
    let (through_proxy, frozen) = freezable_proxy(upstream).await;
    let stop = CancellationToken::new();
    let a = Log::follow(campaign(client(&through_proxy), config("a"), stop.clone()));
    until("a leads", Duration::from_secs(5), || a.leading()).await;
    let b = Log::follow(campaign(client(&server.url()), config("b"), stop.clone()));
    until("b has watched a renew", Duration::from_secs(5), || {
        a.terms()[0].0.elapsed() >= Duration::from_millis(500)
    })
    .await;
    assert!(!b.leading());

    // A's connection hangs mid-renewal; nothing errors, nothing closes.
    let froze = Instant::now();
    frozen.send_replace(true);
    until("b takes over", Duration::from_secs(10), || b.leading()).await;
    let took_over = froze.elapsed();
    assert!(!a.leading(), "a stepped back");
    let a_stopped = a.terms()[0].1.expect("a's term ended");
    let b_started = b.terms()[0].0;
    assert!(
        a_stopped < b_started,
        "a stopped acting ({:?} after the hang) before b started ({:?})",
        a_stopped - froze,
        b_started - froze
    );
    assert!(
        a_stopped - froze <= Duration::from_millis(1200),
        "within the renew deadline: {:?}",
        a_stopped - froze
    );
    assert!(
        took_over >= LEASE - Duration::from_millis(200),
        "{took_over:?}"
    );
    never_together(&a, &b);
    stop.cancel();
}

/// Writes the lease as `holder` with a renewTime `skew` away from this machine's clock.
async fn renew_as(api: &Api<Lease>, holder: &str, skew: i64) {
    let renew = MicroTime(
        k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(skew))
            .unwrap(),
    );
    let spec = LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(2),
        renew_time: Some(renew),
        ..Default::default()
    };
    match api.get_opt("wakegate-controller").await.unwrap() {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace("wakegate-controller", &PostParams::default(), &lease)
                .await
                .unwrap();
        }
        None => {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some("wakegate-controller".into()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_neither_steals_nor_keeps_the_lease() {
    let server = ApiServer::start(ResourceDef::standard()).await.unwrap();
    let client = client(&server.url());
    let api: Api<Lease> = Api::namespaced(client.clone(), "wakegate");

    // The holder's clock is an hour behind: its renewTime always looks long expired here, but
    // it keeps renewing, so the lease is not ours to take.
    renew_as(&api, "behind", -3600).await;
    let stop = CancellationToken::new();
    let ours = Log::follow(campaign(client.clone(), config("ours"), stop.clone()));
    let renewing = Instant::now();
    while renewing.elapsed() < LEASE * 2 {
        renew_as(&api, "behind", -3600).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ours.terms().is_empty(),
        "took a lease its holder was renewing"
    );

    // Now the holder is an hour ahead and dies: its renewTime looks fresh for an hour, but
    // the lease has not changed for its duration, so it is taken over.
    renew_as(&api, "ahead", 3600).await;
    let died = Instant::now();
    until(
        "takeover of the dead holder's lease",
        Duration::from_secs(10),
        || ours.leading(),
    )
    .await;
    let after = died.elapsed();
    assert!(
        after >= LEASE - Duration::from_millis(200) && after < LEASE * 3,
        "taken over {after:?} after the last change"
    );
    stop.cancel();
}
