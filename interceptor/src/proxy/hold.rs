//! Holding a request while its target has no ready endpoint: the caps, the wake, the wait,
//! and how the wait ends (an endpoint, the deadline, or the client leaving).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Proxy, ProxyError, RouteState};
use crate::client_conn::ClientConn;
use crate::load::EndpointLease;
use crate::provider::Endpoint;

impl Proxy {
    /// Gets an endpoint for a request: at once when one is ready, otherwise by holding the
    /// request until one is (or the deadline passes). Holding raises the wake signal.
    pub(super) async fn acquire(
        &self,
        route: &Arc<RouteState>,
        deadline: Instant,
        client: Option<&ClientConn>,
        wants_html: bool,
    ) -> Result<Acquired, ProxyError> {
        let cap = route.spec.max_in_flight_per_endpoint;
        if let Some((endpoint, lease)) = route.load.pick(&route.endpoints.borrow(), cap) {
            route.metrics.warm();
            return Ok(Acquired {
                endpoint,
                lease,
                waited: None,
            });
        }

        let held_at = Instant::now();
        let cold_response = route.cold_response_for(wants_html);
        // `overflow: Placeholder` holds up to a cap and answers only the overflow; without any
        // cap there is no overflow, and the placeholder answers at once.
        let on_overflow = route.spec.cold_response_on_overflow
            && route
                .spec
                .max_held
                .or(self.settings.default_max_held)
                .is_some();
        if let (Some(response), false) = (cold_response, on_overflow) {
            // Answer at once, but the wake goes on.
            self.provider.wake(&route.spec.target);
            self.wakes.publish(&route.spec.id, &route.spec.target);
            return Err(ProxyError::Waking {
                route: route.spec.id.clone(),
                target: route.spec.target.clone(),
                response: Box::new(response.clone()),
            });
        }
        let (_total, _held, first) = match (self.admit_hold(route), cold_response) {
            // Held up to the cap; only the overflow gets the placeholder.
            (Err(ProxyError::Overloaded { .. }), Some(response)) => {
                self.provider.wake(&route.spec.target);
                return Err(ProxyError::Waking {
                    route: route.spec.id.clone(),
                    target: route.spec.target.clone(),
                    response: Box::new(response.clone()),
                });
            }
            (Err(err @ ProxyError::Overloaded { .. }), None) => {
                self.metrics.cold_start_rejection(&route.spec.id);
                return Err(err);
            }
            (other, _) => other?,
        };
        self.provider.wake(&route.spec.target);
        if first {
            route.awaiting_ready.store(true, Ordering::Relaxed);
            self.wakes.publish(&route.spec.id, &route.spec.target);
        }
        let mut ready = route.endpoints.clone();
        let wait = async {
            // A target whose set can no longer change (fixed upstreams, or one the provider
            // dropped) can still free a per-endpoint slot.
            let mut fixed = false;
            loop {
                // Register for a lease release before looking, so none is missed in between.
                let released = route.load.released();
                tokio::pin!(released);
                released.as_mut().enable();
                if let Some(picked) = route.load.pick(&ready.borrow_and_update(), cap) {
                    return picked;
                }
                tokio::select! {
                    changed = ready.changed(), if !fixed => fixed = changed.is_err(),
                    () = &mut released => {}
                }
            }
        };
        // Hyper does not read the body of a held request, so it cannot see the client leave:
        // watch the socket for that, to drop the request (and its counts) at once.
        let client_gone = async {
            let Some(client) = client else {
                return std::future::pending::<()>().await;
            };
            if let Err(err) = client.closed().await {
                tracing::debug!(error = %err, "cannot watch the client connection");
                std::future::pending::<()>().await;
            }
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(deadline, wait) => outcome,
            () = client_gone => {
                self.metrics
                    .cold_start_outcome(&route.spec.id, "cancelled", held_at.elapsed());
                return Err(ProxyError::ClientGone {
                    route: route.spec.id.clone(),
                    waited: round_to_ms(held_at.elapsed()),
                })
            }
        };
        match outcome {
            Ok((endpoint, lease)) => {
                if route.awaiting_ready.swap(false, Ordering::Relaxed) {
                    self.wakes.publish_ready(&route.spec.id, &route.spec.target);
                }
                self.metrics
                    .cold_start_outcome(&route.spec.id, "waited", held_at.elapsed());
                Ok(Acquired {
                    endpoint,
                    lease,
                    waited: Some(held_at.elapsed()),
                })
            }
            Err(_elapsed) => {
                let ready = route.endpoints.borrow().as_slice().len();
                let waited = round_to_ms(held_at.elapsed());
                self.metrics
                    .cold_start_outcome(&route.spec.id, "timeout", held_at.elapsed());
                Err(match cap {
                    Some(cap) if ready > 0 => ProxyError::CapacityTimeout {
                        route: route.spec.id.clone(),
                        target: route.spec.target.clone(),
                        ready,
                        cap,
                        waited,
                    },
                    _ => ProxyError::ReadinessTimeout {
                        route: route.spec.id.clone(),
                        target: route.spec.target.clone(),
                        waited,
                    },
                })
            }
        }
    }
}

pub(super) fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// One held request counted against the total cap.
pub(super) struct TotalHeld(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for TotalHeld {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Proxy {
    /// Admits one more held request under the route's cap and the total cap, or says which
    /// cap is full. Memory for held requests stays bounded by the caps.
    /// Returns both guards and whether this is the route's first held request.
    pub(super) fn admit_hold(
        &self,
        route: &RouteState,
    ) -> Result<(TotalHeld, crate::load::Held, bool), ProxyError> {
        let overloaded = |limit: String| ProxyError::Overloaded {
            route: route.spec.id.clone(),
            target: route.spec.target.clone(),
            limit,
        };
        // Counted first, then checked: concurrent requests cannot both slip under a cap.
        let (held, before) = route.load.hold();
        if let Some(cap) = route.spec.max_held.or(self.settings.default_max_held) {
            if before >= cap.get() as u64 {
                return Err(overloaded(format!("route cap {cap}")));
            }
        }
        let total_before = self.held_total.fetch_add(1, Ordering::AcqRel);
        let total = TotalHeld(self.held_total.clone());
        if total_before >= self.settings.max_held_total {
            return Err(overloaded(format!(
                "total cap {}",
                self.settings.max_held_total
            )));
        }
        Ok((total, held, before == 0))
    }
}

pub(super) struct Acquired {
    pub(super) endpoint: Endpoint,
    pub(super) lease: Option<EndpointLease>,
    /// How long the request was held; `None` when an endpoint was ready at once.
    pub(super) waited: Option<Duration>,
}
