//! What a run records: one compact record per request, the admin samples, and the events, all
//! on one clock (microseconds since the run started), so the plot can line them up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The run's clock: an `Instant` for intervals, plus its Unix time, to place the interceptor's
/// event timestamps (Unix microseconds) on the same axis. Same-machine clocks agree; across
/// machines the offset between their clocks shifts the events.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_unix_us: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        let start_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        Self {
            start: Instant::now(),
            start_unix_us,
        }
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.us(Instant::now())
    }

    /// `at` in microseconds since the start.
    pub fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    /// The `Instant` `us` microseconds after the start.
    pub fn instant(&self, us: u64) -> Instant {
        self.start + Duration::from_micros(us)
    }

    /// A Unix-microsecond timestamp on this clock (negative: before the start).
    pub fn from_unix_us(&self, unix_us: u64) -> i64 {
        unix_us as i64 - self.start_unix_us as i64
    }

    /// When the run started, in Unix milliseconds.
    pub fn start_unix_ms(&self) -> u64 {
        self.start_unix_us / 1000
    }
}

/// One request.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RequestRecord {
    /// When it was due to be sent (open loop) or sent (closed loop), on the run's clock.
    #[serde(rename = "sentUs")]
    pub sent_us: u64,
    /// From `sent_us` to the response headers; for a failed request, to the failure.
    #[serde(rename = "latencyUs")]
    pub latency_us: u64,
    /// From `sent_us` to the end of the body.
    #[serde(rename = "totalUs")]
    pub total_us: u64,
    /// The status, or 0 when no response came.
    pub status: u16,
    /// Whether the response said it waited for a cold start.
    pub cold: bool,
    /// The cold-start iteration it belongs to (0 outside `cold-start`).
    pub iteration: u32,
}

/// Collects records from many tasks.
#[derive(Debug, Default)]
pub struct Recorder {
    records: Mutex<Vec<RequestRecord>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Requests sent so far.
    pub sent: AtomicU64,
    /// Requests answered (or failed) so far.
    pub done: AtomicU64,
}

impl Recorder {
    /// Adds one finished request; `error` names why it failed, if it did.
    pub fn add(&self, record: RequestRecord, error: Option<String>) {
        if let Some(error) = error {
            *self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(error)
                .or_default() += 1;
        }
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything recorded, in send order.
    pub fn take(&self) -> (Vec<RequestRecord>, BTreeMap<String, u64>) {
        let mut records =
            std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()));
        records.sort_by_key(|r| r.sent_us);
        let errors = std::mem::take(&mut *self.errors.lock().unwrap_or_else(|e| e.into_inner()));
        (records, errors)
    }
}

/// One sample of the interceptor's state for the watched route.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StateSample {
    /// When, on the run's clock.
    #[serde(rename = "atUs")]
    pub at_us: u64,
    /// Requests in flight, held ones included.
    #[serde(rename = "inFlight")]
    pub in_flight: u64,
    /// Requests held for a cold target.
    pub held: u64,
    /// Ready backends (endpoints) of the route's target.
    pub ready: u64,
}

/// A wake-path event from the interceptor.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// `wake` or `ready`.
    pub kind: String,
    /// The route.
    pub route: String,
    /// When, on the run's clock (negative: before the run started).
    #[serde(rename = "atUs")]
    pub at_us: i64,
}

/// Latency percentiles in microseconds, from an HDR histogram (3 significant digits).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// How many values.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// The percentiles of `values` (microseconds).
    pub fn of(values: impl IntoIterator<Item = u64>) -> Self {
        // 1 us to 1 hour at 3 significant digits: a few hundred KiB, whatever the count.
        let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) else {
            return Self::default();
        };
        for v in values {
            h.saturating_record(v.max(1));
        }
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_spread() {
        let p = Percentiles::of(1..=1000);
        assert_eq!(p.count, 1000);
        assert_eq!(p.min, 1);
        assert_eq!(p.max, 1000);
        assert!((499..=501).contains(&p.p50), "{p:?}");
        assert!((989..=991).contains(&p.p99), "{p:?}");
        assert_eq!(Percentiles::of([]).count, 0);
    }
}
