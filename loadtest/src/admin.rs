//! The interceptor's admin API, as the load tester uses it: which route to watch, when its target
//! is at zero, a sampler of in-flight / held / ready counts, and the wake-event stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::record::{Clock, Event, StateSample};

/// Why the admin API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request failed or did not answer 200.
    #[error("admin API {url}: {problem} (is --admin the interceptor's admin address?)")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What happened.
        problem: String,
    },
    /// The route to watch is not known, or ambiguous.
    #[error("{0}")]
    Route(String),
    /// The target did not reach zero in time.
    #[error("route {route}: still {in_flight} in flight and {ready} ready backends after {waited:?}; the target did not scale to zero (is its scale-down period shorter than --zero-timeout?)")]
    NotZero {
        /// The route.
        route: String,
        /// In flight at the end.
        in_flight: u64,
        /// Ready at the end.
        ready: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// Interrupted while waiting.
    #[error("interrupted")]
    Interrupted,
}

/// A client of one interceptor's admin API.
#[derive(Clone, Debug)]
pub struct Admin {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: Uri,
}

impl Admin {
    /// The admin API at `base`.
    pub fn new(base: Uri) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base,
        }
    }

    fn url(&self, path: &str) -> String {
        let base = self.base.to_string();
        format!("{}{path}", base.trim_end_matches('/'))
    }

    async fn get(&self, path: &str) -> Result<Bytes, AdminError> {
        let url = self.url(path);
        let unreachable = |problem: String| AdminError::Unreachable {
            url: url.clone(),
            problem,
        };
        let uri: Uri = url.parse().map_err(|e| unreachable(format!("{e}")))?;
        let rsp = tokio::time::timeout(Duration::from_secs(5), self.client.get(uri))
            .await
            .map_err(|_| unreachable("no answer within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        if !rsp.status().is_success() {
            return Err(unreachable(format!("status {}", rsp.status())));
        }
        rsp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| unreachable(e.to_string()))
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> Result<Value, AdminError> {
        let body = self.get("/status").await?;
        serde_json::from_slice(&body).map_err(|e| AdminError::Unreachable {
            url: self.url("/status"),
            problem: format!("not JSON: {e}"),
        })
    }

    /// The route to watch: `wanted`, which must exist, or the only route there is.
    pub async fn resolve_route(&self, wanted: Option<&str>) -> Result<String, AdminError> {
        let status = self.status().await?;
        let routes: Vec<String> = status["queue"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        match wanted {
            Some(route) if routes.iter().any(|r| r == route) => Ok(route.to_owned()),
            Some(route) => Err(AdminError::Route(format!(
                "--route {route:?} is not a route of this interceptor (routes: {})",
                routes.join(", ")
            ))),
            None if routes.len() == 1 => Ok(routes[0].clone()),
            None => Err(AdminError::Route(format!(
                "the interceptor has {} routes; pick one with --route (routes: {})",
                routes.len(),
                routes.join(", ")
            ))),
        }
    }

    /// The route's in-flight, held and ready counts now.
    pub async fn sample(&self, route: &str, clock: &Clock) -> Result<StateSample, AdminError> {
        let status = self.status().await?;
        Ok(StateSample {
            at_us: clock.now_us(),
            in_flight: status["queue"][route]["Concurrency"].as_u64().unwrap_or(0),
            held: status["held"][route].as_u64().unwrap_or(0),
            ready: status["targets"][route]["readyEndpoints"]
                .as_u64()
                .unwrap_or(0),
        })
    }

    /// Waits until the route has nothing in flight and its target no ready backend.
    pub async fn wait_zero(
        &self,
        route: &str,
        timeout: Duration,
        clock: &Clock,
        stop: &CancellationToken,
    ) -> Result<(), AdminError> {
        let started = std::time::Instant::now();
        loop {
            let s = self.sample(route, clock).await?;
            if s.in_flight == 0 && s.ready == 0 {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(AdminError::NotZero {
                    route: route.to_owned(),
                    in_flight: s.in_flight,
                    ready: s.ready,
                    waited: timeout,
                });
            }
            tokio::select! {
                () = stop.cancelled() => return Err(AdminError::Interrupted),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Samples the route every `interval` into a shared log, until `stop`.
    pub fn spawn_sampler(
        &self,
        route: String,
        interval: Duration,
        clock: Clock,
        stop: CancellationToken,
    ) -> Arc<Mutex<Vec<StateSample>>> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let admin = self.clone();
        let out = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Ok(sample) = admin.sample(&route, &clock).await {
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
                }
            }
        });
        samples
    }

    /// Follows `/events` into a shared log until `stop`; reconnects if the stream breaks.
    /// Returns once the stream is open, so no event of the run is missed.
    pub async fn follow_events(
        &self,
        clock: Clock,
        stop: CancellationToken,
    ) -> Result<Arc<Mutex<Vec<Event>>>, AdminError> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let url = self.url("/events");
        let uri: Uri = url.parse().map_err(|e| AdminError::Unreachable {
            url: url.clone(),
            problem: format!("{e}"),
        })?;
        let first = self
            .client
            .get(uri.clone())
            .await
            .map_err(|e| AdminError::Unreachable {
                url: url.clone(),
                problem: e.to_string(),
            })?;
        let client = self.client.clone();
        let out = events.clone();
        tokio::spawn(async move {
            let mut rsp = Some(first);
            loop {
                let body = match rsp.take() {
                    Some(r) => r.into_body(),
                    None => {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                        match client.get(uri.clone()).await {
                            Ok(r) => r.into_body(),
                            Err(_) => continue,
                        }
                    }
                };
                let mut body = body;
                let mut pending = Vec::new();
                loop {
                    let frame = tokio::select! {
                        () = stop.cancelled() => return,
                        frame = body.frame() => frame,
                    };
                    let Some(Ok(frame)) = frame else { break };
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    pending.extend_from_slice(data);
                    while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=nl).collect();
                        if let Some(event) = parse_event(&line, &clock) {
                            out.lock().unwrap_or_else(|e| e.into_inner()).push(event);
                        }
                    }
                }
            }
        });
        Ok(events)
    }
}

/// A `wake` or `ready` line as an event; other lines (`hello`, `ping`) are not events.
fn parse_event(line: &[u8], clock: &Clock) -> Option<Event> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let kind = value["type"].as_str()?;
    if kind != "wake" && kind != "ready" {
        return None;
    }
    Some(Event {
        kind: kind.to_owned(),
        route: value["route"].as_str()?.to_owned(),
        at_us: clock.from_unix_us(value["atUs"].as_u64()?),
    })
}

/// CPU time and memory of a process, from `/proc` (Linux).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcessStats {
    /// User plus system CPU time, in microseconds.
    #[serde(rename = "cpuUs")]
    pub cpu_us: u64,
    /// Resident memory now, in KiB.
    #[serde(rename = "rssKib")]
    pub rss_kib: u64,
    /// Peak resident memory, in KiB.
    #[serde(rename = "peakRssKib")]
    pub peak_rss_kib: u64,
}

impl ProcessStats {
    /// Reads a process's stats; `None` if it does not exist.
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // utime and stime are fields 14 and 15 of stat; 12 and 13 after the ')'.
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(100);
        let cpu_us = (ticks(11)? + ticks(12)?) * 1_000_000 / hz;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Some(Self {
            cpu_us,
            rss_kib: kib("VmRSS:"),
            peak_rss_kib: kib("VmHWM:"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_wake_and_ready_lines_only() {
        let clock = Clock::new();
        assert!(parse_event(br#"{"type":"hello","queue":{}}"#, &clock).is_none());
        assert!(parse_event(br#"{"type":"ping"}"#, &clock).is_none());
        assert!(parse_event(b"garbage", &clock).is_none());
        let e = parse_event(
            br#"{"type":"ready","route":"r","target":"r","at":1,"atUs":1500}"#,
            &clock,
        )
        .unwrap();
        assert_eq!((e.kind.as_str(), e.route.as_str()), ("ready", "r"));
        assert!(e.at_us < 0, "long before the run started");
    }

    #[test]
    fn own_process_stats_are_readable() {
        let s = ProcessStats::read(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib, "{s:?}");
        assert!(ProcessStats::read(u32::MAX).is_none());
    }
}
