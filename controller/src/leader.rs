//! Leader election through a coordination.k8s.io Lease, so two controller replicas are safe:
//! only the holder reconciles and scales. Writes use the Lease's resourceVersion, so two
//! candidates cannot both win.
//!
//! Two rules keep it safe when clocks and networks misbehave, as client-go's leaderelection:
//! - **Expiry is judged by this replica's own observation**: a lease is expired when this
//!   replica has seen it unchanged (same resourceVersion) for its duration, by its own
//!   monotonic clock. The holder's `renewTime` is written for people, never compared with
//!   this machine's clock, so skew between nodes cannot make two leaders.
//! - **A renewal has a deadline** (`renew_deadline`, shorter than the lease): a leader whose
//!   renewal hangs (the kube client has no read timeout of its own) or keeps failing stops
//!   acting once the deadline since its last successful renewal passes, before any other
//!   replica can see its lease expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews (and others retry).
    pub renew: Duration,
    /// How long after its last successful renewal a leader keeps acting while renewals hang
    /// or fail; shorter than `duration`.
    pub renew_deadline: Duration,
}

/// Campaigns for the lease until `stop`; the receiver says whether this replica leads.
pub fn campaign(
    client: Client,
    config: LeaseConfig,
    stop: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut observed: Option<Observed> = None;
        let mut renewed: Option<Instant> = None;
        loop {
            // A leader's attempt may take only what is left of its deadline; a candidate's,
            // the whole deadline.
            let budget = match (renewed, *tx.borrow()) {
                (Some(at), true) => config.renew_deadline.saturating_sub(at.elapsed()),
                _ => config.renew_deadline,
            };
            let attempt = tokio::time::timeout(budget, try_acquire(&api, &config, &mut observed));
            let leading = match attempt.await {
                Ok(Ok(leading)) => {
                    if leading {
                        renewed = Some(Instant::now());
                    }
                    leading
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, lease = %config.name, "lease update failed");
                    // Unsure whether the renewal landed: stop acting until it does.
                    false
                }
                Err(_) => {
                    tracing::warn!(lease = %config.name, deadline = ?config.renew_deadline, "lease renewal did not finish in time: stepping back");
                    false
                }
            };
            if leading != *tx.borrow() {
                tracing::info!(identity = %config.identity, leading, "leadership changed");
            }
            tx.send_replace(leading);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(config.renew) => {}
            }
        }
        // Step down so another replica can take over at once.
        if *tx.borrow() {
            if let Ok(mut lease) = api.get(&config.name).await {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                    let _ = api
                        .replace(&config.name, &PostParams::default(), &lease)
                        .await;
                }
            }
        }
        tx.send_replace(false);
    });
    rx
}

/// The Lease as this replica last saw it change: its resourceVersion, and when (by this
/// replica's monotonic clock) that version was first seen.
#[derive(Clone, Debug)]
struct Observed {
    version: String,
    since: Instant,
}

impl Observed {
    /// Records `lease` as seen now, keeping the old time if it has not changed.
    fn update(slot: &mut Option<Self>, lease: &Lease) {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if slot.as_ref().is_none_or(|o| o.version != version) {
            *slot = Some(Self {
                version,
                since: Instant::now(),
            });
        }
    }
}

async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                Observed::update(observed, &created);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    Observed::update(observed, &lease);
    let seen_unchanged = observed
        .as_ref()
        .map_or(Duration::ZERO, |o| o.since.elapsed());
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == config.identity;
    let limit = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(config.duration, Duration::from_secs);
    let expired = holder.is_empty() || seen_unchanged >= limit;
    if !ours && !expired {
        return Ok(false);
    }
    if !ours {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.acquire_time = Some(now.clone());
        spec.holder_identity = Some(config.identity.clone());
    }
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now);
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(written) => {
            Observed::update(observed, &written);
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
