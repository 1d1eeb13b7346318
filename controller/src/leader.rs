//! Leader election through a coordination.k8s.io Lease, so two controller replicas are safe:
//! only the holder reconciles and scales. The holder renews every `renew` interval; another
//! replica takes over once a lease has gone `duration` without renewal. Writes use the Lease's
//! resourceVersion, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
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
        loop {
            let leading = match try_acquire(&api, &config).await {
                Ok(leading) => leading,
                Err(err) => {
                    tracing::warn!(error = %err, lease = %config.name, "lease update failed");
                    // Unsure whether the renewal landed: stop acting until it does.
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

async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
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
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == config.identity;
    let expired = holder.is_empty()
        || spec.renew_time.as_ref().is_none_or(|t| {
            let age = Timestamp::now().duration_since(t.0);
            let limit = spec.lease_duration_seconds.unwrap_or(seconds);
            age.as_secs() >= i64::from(limit)
        });
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
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
