//! One `GET /events` stream held open per replica: wakes re-broadcast to the scalers the moment
//! they arrive, `hello` on (re)connect, and a stream dropped and reopened when it goes silent or
//! a line grows past its bound.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Interceptors, Wake};

/// An event stream that says nothing for this long is dead: the interceptor sends a `ping`
/// every 15 s, so three missed pings.
const EVENTS_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Longest event line accepted. The largest is `hello`, which lists every route's counts
/// (about 100 bytes each: 4 MiB is some 40,000 routes).
const MAX_EVENT_LINE: usize = 4 << 20;

impl Interceptors {
    /// Keeps one `/events` stream open per replica.
    pub(super) async fn manage_streams(
        self: Arc<Self>,
        mut addrs: watch::Receiver<Vec<String>>,
        stop: CancellationToken,
    ) {
        let mut streams: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let current: HashSet<String> = addrs.borrow_and_update().iter().cloned().collect();
            streams.retain(|addr, token| {
                let keep = current.contains(addr);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for addr in current {
                if let std::collections::hash_map::Entry::Vacant(slot) = streams.entry(addr.clone())
                {
                    let token = stop.child_token();
                    tokio::spawn(self.clone().follow_events(addr, token.clone()));
                    slot.insert(token);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = addrs.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn follow_events(self: Arc<Self>, addr: String, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.read_events(&addr) => ended,
            };
            if ended {
                backoff = Duration::from_millis(100);
            }
            tracing::debug!(%addr, "interceptor event stream ended; reconnecting");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Reads one `/events` stream until it ends. True if it was connected at all.
    async fn read_events(&self, addr: &str) -> bool {
        let Ok(uri) = format!("http://{addr}/events").parse() else {
            return false;
        };
        let Ok(rsp) = self.client.get(uri).await else {
            return false;
        };
        if !rsp.status().is_success() {
            return false;
        }
        tracing::debug!(%addr, "following interceptor events");
        let body = rsp.into_body().into_data_stream();
        match read_lines(body, EVENTS_IDLE_TIMEOUT, MAX_EVENT_LINE, |line| {
            self.on_event(addr, line)
        })
        .await
        {
            StreamEnd::Closed => {}
            StreamEnd::Silent => {
                tracing::warn!(%addr, timeout = ?EVENTS_IDLE_TIMEOUT, "interceptor event stream silent; reconnecting");
            }
            StreamEnd::LineTooLong => {
                tracing::warn!(%addr, limit = MAX_EVENT_LINE, "interceptor event line too long; reconnecting");
            }
        }
        true
    }

    /// A held request is activity, before any sample shows it.
    fn woke(&self, route: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .routes
            .entry(route.to_owned())
            .or_default()
            .last_active = Some(Instant::now());
    }

    fn on_event(&self, addr: &str, line: &[u8]) {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        match event["type"].as_str() {
            Some("wake") => {
                if let Some(route) = event["route"].as_str() {
                    tracing::debug!(%addr, route, "wake");
                    self.woke(route);
                    let _ = self.wakes.send(Wake {
                        route: route.to_owned(),
                        held_at_us: event["atUs"].as_u64(),
                        traceparent: event["traceparent"].as_str().map(str::to_owned),
                    });
                }
            }
            // On (re)connect: requests already in flight there may be held ones.
            Some("hello") => {
                if let Some(queue) = event["queue"].as_object() {
                    for (route, counts) in queue {
                        if counts["Concurrency"].as_u64().unwrap_or(0) > 0 {
                            self.woke(route);
                            let _ = self.wakes.send(Wake {
                                route: route.clone(),
                                held_at_us: None,
                                traceparent: None,
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Why an event stream stopped being read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StreamEnd {
    /// It ended or failed.
    Closed,
    /// Nothing arrived, not even a ping, for the idle timeout: a vanished peer leaves no FIN.
    Silent,
    /// A line grew past the limit.
    LineTooLong,
}

/// Feeds each newline-terminated line of `body` to `on_line`, until the stream ends, stays
/// silent for `idle`, or a line passes `max` bytes.
pub(super) async fn read_lines<S, E>(
    body: S,
    idle: Duration,
    max: usize,
    mut on_line: impl FnMut(&[u8]),
) -> StreamEnd
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    futures_util::pin_mut!(body);
    let mut buf = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(_)) | None) => return StreamEnd::Closed,
            Err(_) => return StreamEnd::Silent,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            on_line(&line);
        }
        if buf.len() > max {
            return StreamEnd::LineTooLong;
        }
    }
}
