//! Holding a request while its target has no ready endpoint: the caps, the wake, the wait,
//! and how the wait ends (an endpoint, the deadline, or the client leaving).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tokio::time::Instant;

use super::{error, refuse, routed_authority, Framing, Proxy, ProxyError, RouteState};
use crate::client_conn::ClientConn;
use crate::load::EndpointLease;
use crate::provider::Endpoint;
use opentelemetry::trace::SpanContext;

use super::observe::{Observed, RequestTrace};

impl Proxy {
    /// Gets an endpoint for a request: at once when one is ready, otherwise by holding the
    /// request until one is (or the deadline passes). Holding raises the wake signal.
    /// `parked_since` is when a request parked before hyper began to wait: it has waited
    /// since then already. `headers` are the request's (a browser's may get the waiting page).
    ///
    /// The hold is boxed: it is a few hundred bytes of state that only a request at a cold
    /// target needs, and every request in flight would otherwise carry room for it.
    #[allow(clippy::type_complexity)] // an `Either` of the two ways, named once here
    pub(super) fn acquire<'a>(
        &'a self,
        route: &'a Arc<RouteState>,
        deadline: Instant,
        client: Option<&'a ClientConn>,
        headers: &'a http::HeaderMap,
        parked_since: Option<Instant>,
        trace: Option<&'a SpanContext>,
    ) -> futures_util::future::Either<
        std::future::Ready<Result<Acquired, ProxyError>>,
        Pin<Box<dyn Future<Output = Result<Acquired, ProxyError>> + Send + 'a>>,
    > {
        use futures_util::future::Either;
        let cap = route.spec.max_in_flight_per_endpoint;
        if let Some((endpoint, lease)) = route.load.pick(&route.endpoints.borrow(), cap) {
            let Some(held_at) = parked_since else {
                route.metrics.warm();
                return Either::Left(std::future::ready(Ok(Acquired {
                    endpoint,
                    first: None,
                    lease,
                    waited: None,
                })));
            };
            // Released from parking: it was held, and its wait ends here.
            return Either::Left(std::future::ready(Ok(
                self.released(route, held_at, endpoint, lease)
            )));
        }
        Either::Right(Box::pin(self.hold(
            route,
            deadline,
            client,
            headers,
            parked_since,
            trace,
        )))
    }

    /// Holds a request that found no endpoint ready: the caps, the waiting page, the wake, and
    /// the wait until an endpoint is ready, the deadline passes or the client leaves.
    async fn hold(
        &self,
        route: &Arc<RouteState>,
        deadline: Instant,
        client: Option<&ClientConn>,
        headers: &http::HeaderMap,
        parked_since: Option<Instant>,
        trace: Option<&SpanContext>,
    ) -> Result<Acquired, ProxyError> {
        let cap = route.spec.max_in_flight_per_endpoint;
        let held_at = parked_since.unwrap_or_else(Instant::now);
        // Only a request that cannot be served at once asks whether it is a browser's.
        let cold_response = route.cold_response_for(wants_html(headers));
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
            self.wakes
                .publish(&route.spec.id, &route.spec.target, trace);
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
        self.wake_held(route, first, trace);
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
                let first = route.pass_release_gate().await;
                let mut acquired = self.released(route, held_at, endpoint, lease);
                acquired.first = first;
                Ok(acquired)
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

/// The first request released after a cold start goes up alone: the rest of the backlog
/// follows once its response head has arrived (or `--first-release-alone-for`, 5 ms by default,
/// has passed: long enough for a quick first answer, a fraction of a millisecond on loopback and
/// a few on a Raspberry Pi, short enough that a slow first request barely delays the rest). Released all
/// at once, the backlog's hand-over, connects and requests interleave with the first one's on
/// the interceptor and on the backend that has just booted, so the first answer comes only when
/// nearly all of them do. The nginx and Envoy idea of a slow start for a new endpoint, at its
/// smallest.
#[derive(Debug)]
pub(super) struct ReleaseGate {
    /// [`GATE_OPEN`], [`GATE_ARMED`] or [`GATE_FIRST_OUT`].
    state: std::sync::atomic::AtomicU8,
    first_answered: tokio::sync::Notify,
    /// The longest the rest wait for the first's answer; zero never arms the gate.
    first_alone_for: Duration,
}

/// No cold start is in progress: released requests pass at once.
const GATE_OPEN: u8 = 0;
/// A wake was raised: the next released request is the first.
const GATE_ARMED: u8 = 1;
/// The first is on its way up: the rest wait for it.
const GATE_FIRST_OUT: u8 = 2;

impl ReleaseGate {
    /// A gate whose first request holds the rest back for `first_alone_for` at most.
    pub(super) fn new(first_alone_for: Duration) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(GATE_OPEN),
            first_answered: tokio::sync::Notify::new(),
            first_alone_for,
        }
    }

    /// A cold start began: the next request released is the first.
    pub(super) fn arm(&self) {
        if self.first_alone_for.is_zero() {
            return;
        }
        let _ =
            self.state
                .compare_exchange(GATE_OPEN, GATE_ARMED, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Held by the first request released after a cold start until its response head arrives (or
/// it fails, or is dropped): then the rest go.
pub(super) struct FirstOut(Arc<RouteState>);

impl Drop for FirstOut {
    fn drop(&mut self) {
        let gate = &self.0.release_gate;
        gate.state.store(GATE_OPEN, Ordering::Release);
        gate.first_answered.notify_waiters();
    }
}

impl RouteState {
    /// Passes a held request on its release: the first of a cold start at once, with the guard
    /// that lets the rest go; the rest when the first has its answer, or after the gate's bound.
    pub(super) async fn pass_release_gate(self: &Arc<Self>) -> Option<FirstOut> {
        let gate = &self.release_gate;
        match gate.state.compare_exchange(
            GATE_ARMED,
            GATE_FIRST_OUT,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Some(FirstOut(self.clone())),
            Err(GATE_FIRST_OUT) => {
                let answered = gate.first_answered.notified();
                tokio::pin!(answered);
                // Registered before looking again, so the first's answer cannot slip between.
                answered.as_mut().enable();
                if gate.state.load(Ordering::Acquire) == GATE_FIRST_OUT {
                    let _ = tokio::time::timeout(gate.first_alone_for, answered).await;
                }
                None
            }
            Err(_) => None,
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
    /// The first request released after a cold start holds this until its answer.
    pub(super) first: Option<FirstOut>,
    pub(super) lease: Option<EndpointLease>,
    /// How long the request was held; `None` when an endpoint was ready at once.
    pub(super) waited: Option<Duration>,
}

impl Proxy {
    /// Raises the wake for a request now held; the route's first held request also publishes
    /// the wake event, and its release will publish the ready one.
    /// `trace` is the request's span, which the wake event carries so that the controller's
    /// wake joins its trace.
    fn wake_held(&self, route: &RouteState, first: bool, trace: Option<&SpanContext>) {
        self.provider.wake(&route.spec.target);
        if first {
            route.release_gate.arm();
            route.awaiting_ready.store(true, Ordering::Relaxed);
            self.wakes
                .publish(&route.spec.id, &route.spec.target, trace);
        }
    }

    /// A held request got `endpoint`: the ready event (for the first released), the
    /// cold-start outcome, and how long it waited.
    fn released(
        &self,
        route: &RouteState,
        held_at: Instant,
        endpoint: Endpoint,
        lease: Option<EndpointLease>,
    ) -> Acquired {
        if route.awaiting_ready.swap(false, Ordering::Relaxed) {
            self.wakes.publish_ready(&route.spec.id, &route.spec.target);
            route.awaiting_first_byte.store(true, Ordering::Relaxed);
        }
        let waited = held_at.elapsed();
        self.metrics
            .cold_start_outcome(&route.spec.id, "waited", waited);
        Acquired {
            endpoint,
            first: None,
            lease,
            waited: Some(waited),
        }
    }
}

/// What parking leaves a request for when hyper serves it: when it began to wait, and its
/// in-flight count, kept across the hand-over so that the route never looks idle meanwhile.
#[derive(Clone)]
pub(super) struct Parked {
    pub(super) route: crate::provider::RouteId,
    pub(super) since: Instant,
    pub(super) in_flight: Arc<std::sync::Mutex<Option<crate::load::InFlight>>>,
    /// Its place among the parked requests released at once, and (if it is the first released
    /// after its cold start) the guard that lets the rest go: taken together, in one lock.
    pub(super) released: Arc<std::sync::Mutex<Release>>,
    /// Its spans and access-log fields, begun when it was parked (traces or the access log on).
    observed: Option<Arc<std::sync::Mutex<Option<Box<Observed>>>>>,
}

/// What a parked request's release hands to hyper's side along with it.
#[derive(Default)]
pub(super) struct Release {
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub(super) first: Option<FirstOut>,
}

impl Parked {
    /// The request's spans and access-log fields, begun while it was parked.
    pub(super) fn take_observed(&self) -> Option<Box<Observed>> {
        self.observed
            .as_ref()?
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Proxy {
    /// Parks a new connection whose first request would be held: counted, capped and waking
    /// its target as a held request is, but kept as its bare socket until an endpoint is ready,
    /// the hold's deadline passes (hyper then serves it, and the request meets the same
    /// timeout, failover or 504 as one held in hyper) or the client leaves. Anything that
    /// would not be held (a ready or capped target, a static route, an answer at once, a cap
    /// reached, a malformed head) is not parked: hyper serves it as usual.
    pub(super) fn park_head(
        self: &Arc<Self>,
        head: Request<()>,
        client: &ClientConn,
    ) -> Option<Pin<Box<dyn Future<Output = Option<http::Extensions>> + Send>>> {
        let framing = Framing::of(head.headers());
        if refuse(&head, &framing).is_some() {
            return None;
        }
        let authority = routed_authority(&head, &framing).ok()?;
        let route = self
            .table
            .load()
            .lookup(authority.as_str(), head.uri().path(), head.headers())
            .cloned()?;
        let path = head.uri().path();
        if route
            .static_for(authority.as_str(), path, head.headers())
            .is_some()
            || !route.endpoints.borrow().is_empty()
            || route
                .cold_response_for(wants_html(head.headers()))
                .is_some()
        {
            return None;
        }
        let (total, held, first) = self.admit_hold(&route).ok()?;
        let since = Instant::now();
        let in_flight = route.load.start_request();
        let tracer = wakegate_telemetry::tracer();
        let mut observed = if tracer.is_some() || self.settings.access_log.is_some() {
            let trace = tracer.map(|tracer| {
                RequestTrace::start(
                    tracer,
                    &head,
                    authority.as_str(),
                    &route.spec.id,
                    client,
                    since,
                )
            });
            Observed::new(trace, self.settings.access_log.is_some(), path, client)
        } else {
            None
        };
        if let Some(observed) = observed.as_mut() {
            observed.holding = Some(since);
        }
        let trace = observed
            .as_ref()
            .and_then(|o| o.trace.as_ref())
            .map(|t| t.context().clone());
        self.wake_held(&route, first, trace.as_ref());
        let mut until = since + route.readiness_timeout;
        if let Some((_, after)) = &route.failover {
            until = until.min(since + *after);
        }
        if let Some(timeout) = route.request_timeout {
            until = until.min(since + timeout);
        }
        tracing::debug!(route = %route.spec.id, "request parked until its target is ready");
        let method = head.method().clone();
        let client = client.clone();
        let proxy = self.clone();
        Some(Box::pin(async move {
            let mut ready = route.endpoints.clone();
            let ready = async {
                loop {
                    if !ready.borrow_and_update().is_empty() || ready.changed().await.is_err() {
                        return;
                    }
                }
            };
            let gone = async {
                if client.hung_up().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let ready = tokio::select! {
                () = ready => true,
                () = tokio::time::sleep_until(until) => false,
                () = gone => {
                    proxy
                        .metrics
                        .cold_start_outcome(&route.spec.id, "cancelled", since.elapsed());
                    route
                        .metrics
                        .request(&method, error::CLIENT_CLOSED_REQUEST, since.elapsed(), false);
                    tracing::debug!(route = %route.spec.id, "client went away while parked");
                    if let Some(observed) = observed {
                        observed.finish(
                            proxy.settings.access_log.as_ref(),
                            &route.spec.id,
                            &method,
                            error::CLIENT_CLOSED_REQUEST,
                            since.elapsed(),
                            false,
                        );
                    }
                    return None;
                }
            };
            // The first of a cold start goes alone; past the deadline, hyper serves the request
            // at once to meet its timeout.
            let first = match ready {
                true => route.pass_release_gate().await,
                false => None,
            };
            // Released in turn: a burst goes up a bounded number at a time (until the deadline;
            // then it is served at once, to meet its timeout).
            let released = match &proxy.releasing {
                Some(permits) => tokio::time::timeout_at(until, permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            drop((total, held));
            let mut extensions = http::Extensions::new();
            extensions.insert(Parked {
                route: route.spec.id.clone(),
                since,
                in_flight: Arc::new(std::sync::Mutex::new(Some(in_flight))),
                released: Arc::new(std::sync::Mutex::new(Release {
                    permit: released,
                    first,
                })),
                observed: observed.map(|o| Arc::new(std::sync::Mutex::new(Some(o)))),
            });
            Some(extensions)
        }))
    }
}

/// Whether a request asks for HTML (a browser): it may get the waiting page.
pub(super) fn wants_html(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")))
}

impl crate::server::Park for Arc<Proxy> {
    fn park(
        &self,
        head: Request<()>,
        client: &ClientConn,
    ) -> Option<Pin<Box<dyn Future<Output = Option<http::Extensions>> + Send>>> {
        self.park_head(head, client)
    }
}
