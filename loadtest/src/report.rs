//! The report: every figure of a run, printed as a summary table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::admin::ProcessStats;
use crate::record::{Event, Percentiles, RequestRecord, StateSample};

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `cold-start`, `rate` or `burst`.
    pub mode: &'static str,
    /// The URL requests went to.
    pub url: String,
    /// The Host header sent.
    pub host: String,
    /// The route watched in the admin API.
    pub route: Option<String>,
    /// When the run started (Unix ms).
    pub started_at_unix_ms: u64,
    /// How long it ran.
    pub duration_us: u64,
    /// Whether Ctrl-C (or an error) cut it short; the figures cover what ran.
    pub interrupted: bool,
    /// Request counts.
    pub requests: Counts,
    /// Time to first byte of every answered request.
    pub latency: Percentiles,
    /// Answered requests per second over the run.
    pub throughput: f64,
    /// `cold-start`: each iteration.
    pub cold_starts: Vec<ColdStartIteration>,
    /// `cold-start`: the distributions over the iterations.
    pub cold_start_summary: Option<ColdStartSummary>,
    /// `burst`: what the burst did.
    pub burst: Option<BurstSummary>,
    /// `rate`: the schedule and how well it was kept.
    pub rate: Option<RateSummary>,
    /// CPU and memory of the processes given with `--pid`.
    pub processes: Vec<ProcessReport>,
    /// Wake and ready events from the interceptor.
    pub events: Vec<Event>,
    /// Admin samples: in flight, held, ready.
    pub samples: Vec<StateSample>,
    /// Every request.
    pub records: Vec<RequestRecord>,
}

/// Request counts.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Sent, answered or not.
    pub sent: u64,
    /// Sent but neither answered nor failed when the run ended (an interrupted run's requests
    /// still in flight).
    pub unfinished: u64,
    /// Got 2xx or 3xx.
    pub ok: u64,
    /// Got another status, or no response.
    pub failed: u64,
    /// Responses by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests without a response, by why.
    pub errors: BTreeMap<String, u64>,
}

/// One cold start.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStartIteration {
    /// 1-based.
    pub iteration: u32,
    /// When its requests were sent, on the run's clock.
    pub sent_us: u64,
    /// Requests fired.
    pub requests: u32,
    /// How many got 2xx/3xx.
    pub ok: u32,
    /// Send to the first response's first byte: the cold-start latency.
    pub first_byte_us: u64,
    /// Send to the last response's first byte.
    pub last_byte_us: u64,
    /// Send to the interceptor holding the first request and raising the wake.
    pub wake_us: Option<i64>,
    /// Wake to the target's first backend ready (boot time, as the proxy saw it).
    pub boot_us: Option<i64>,
    /// Backend ready to the first byte at the client: what the interceptor adds.
    pub overhead_us: Option<i64>,
}

/// Distributions over the cold-start iterations.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStartSummary {
    /// Cold-start latency (send to first byte).
    pub first_byte: Percentiles,
    /// Send to wake.
    pub wake: Percentiles,
    /// Wake to ready.
    pub boot: Percentiles,
    /// Ready to first byte.
    pub overhead: Percentiles,
}

/// What a burst did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BurstSummary {
    /// Requests fired at once.
    pub requested: u64,
    /// Answered with 2xx/3xx.
    pub succeeded: u64,
    /// Not.
    pub failed: u64,
    /// Most requests held at once (admin samples).
    pub peak_held: u64,
    /// Most requests in flight at once (admin samples).
    pub peak_in_flight: u64,
    /// Send to the last answer.
    pub all_answered_us: u64,
}

/// How a rate run went.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateSummary {
    /// Target requests per second (the end rate of a ramp); `None` for `max`.
    pub target_rate: Option<f64>,
    /// Ramp start rate, if ramping.
    pub ramp_from: Option<f64>,
    /// Closed loop (`--rate max`) over this many connections.
    pub connections: Option<u64>,
    /// Requests sent per second, achieved.
    pub send_rate: f64,
    /// Open loop: sends more than 5 ms behind schedule (the in-flight cap, or a slow client).
    pub late_sends: u64,
}

/// One `--pid` process over the run.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessReport {
    /// The pid.
    pub pid: u32,
    /// CPU time used during the run.
    pub cpu_us: u64,
    /// That, per answered request.
    pub cpu_us_per_request: f64,
    /// Resident memory at the end, KiB.
    pub rss_kib: u64,
    /// Peak resident memory (the process's high-water mark), KiB.
    pub peak_rss_kib: u64,
    /// Largest resident memory seen while sampling, KiB.
    pub max_sampled_rss_kib: u64,
}

impl ProcessReport {
    /// The difference between two readings, over `answered` requests.
    pub fn between(
        pid: u32,
        before: ProcessStats,
        after: ProcessStats,
        max_sampled_rss_kib: u64,
        answered: u64,
    ) -> Self {
        let cpu_us = after.cpu_us.saturating_sub(before.cpu_us);
        Self {
            pid,
            cpu_us,
            cpu_us_per_request: if answered == 0 {
                0.0
            } else {
                cpu_us as f64 / answered as f64
            },
            rss_kib: after.rss_kib,
            peak_rss_kib: after.peak_rss_kib,
            max_sampled_rss_kib: max_sampled_rss_kib.max(after.rss_kib),
        }
    }
}

impl Counts {
    /// Counts from the records and error tallies, of `sent` requests (some may have no record
    /// yet when the run was interrupted).
    pub fn from(records: &[RequestRecord], errors: BTreeMap<String, u64>, sent: u64) -> Self {
        let done = records.len() as u64;
        let mut counts = Self {
            sent: sent.max(done),
            unfinished: sent.saturating_sub(done),
            errors,
            ..Self::default()
        };
        for r in records {
            if r.status != 0 {
                *counts.by_status.entry(r.status).or_default() += 1;
            }
            if (200..400).contains(&r.status) {
                counts.ok += 1;
            } else {
                counts.failed += 1;
            }
        }
        counts
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn ms_signed(us: Option<i64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0))
}

fn pct_row(out: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {name:<22} {:>10} {:>10} {:>10} {:>10} {:>10}  (n={})",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.max),
        ms(p.min),
        p.count
    );
}

impl Report {
    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "wakegate-loadtest {}: {} (Host: {}){}",
            self.mode,
            self.url,
            self.host,
            self.route
                .as_ref()
                .map(|r| format!(", route {r}"))
                .unwrap_or_default()
        );
        if self.interrupted {
            let _ = writeln!(out, "INTERRUPTED: partial results for what ran");
        }
        let secs = self.duration_us as f64 / 1e6;
        let _ = writeln!(
            out,
            "  ran {secs:.2} s; sent {}, ok {}, failed {}{}; {:.1} answered/s",
            self.requests.sent,
            self.requests.ok,
            self.requests.failed,
            if self.requests.unfinished > 0 {
                format!(", unfinished {}", self.requests.unfinished)
            } else {
                String::new()
            },
            self.throughput
        );
        if !self.requests.by_status.is_empty() {
            let statuses: Vec<String> = self
                .requests
                .by_status
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect();
            let _ = writeln!(out, "  statuses: {}", statuses.join(", "));
        }
        if !self.requests.errors.is_empty() {
            let errors: Vec<String> = self
                .requests
                .errors
                .iter()
                .map(|(e, n)| format!("{e}: {n}"))
                .collect();
            let _ = writeln!(out, "  no response: {}", errors.join(", "));
        }
        let _ = writeln!(
            out,
            "  {:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "p50", "p90", "p99", "max", "min"
        );
        pct_row(&mut out, "time to first byte", &self.latency);
        if let Some(c) = &self.cold_start_summary {
            pct_row(&mut out, "cold start (1st byte)", &c.first_byte);
            pct_row(&mut out, "  send -> wake", &c.wake);
            pct_row(&mut out, "  wake -> ready (boot)", &c.boot);
            pct_row(&mut out, "  ready -> 1st byte", &c.overhead);
            let _ = writeln!(out, "  iterations:");
            for it in &self.cold_starts {
                let _ = writeln!(
                    out,
                    "    #{:<3} {} ok of {}: first byte {}, wake {}, boot {}, overhead {}",
                    it.iteration,
                    it.ok,
                    it.requests,
                    ms(it.first_byte_us),
                    ms_signed(it.wake_us),
                    ms_signed(it.boot_us),
                    ms_signed(it.overhead_us)
                );
            }
        }
        if let Some(b) = &self.burst {
            let _ = writeln!(
                out,
                "  burst: {} of {} succeeded, {} failed; peak held {}, peak in flight {}; all answered after {}",
                b.succeeded, b.requested, b.failed, b.peak_held, b.peak_in_flight, ms(b.all_answered_us)
            );
        }
        if let Some(r) = &self.rate {
            match (r.target_rate, r.connections) {
                (Some(rate), _) => {
                    let _ = writeln!(
                        out,
                        "  rate: target {rate:.1}/s{}, sent {:.1}/s, {} sends late by over 5 ms",
                        r.ramp_from
                            .map(|f| format!(" (ramped from {f:.1}/s)"))
                            .unwrap_or_default(),
                        r.send_rate,
                        r.late_sends
                    );
                }
                (None, connections) => {
                    let _ = writeln!(
                        out,
                        "  closed loop over {} connections: {:.1} requests/s",
                        connections.unwrap_or(0),
                        r.send_rate
                    );
                }
            }
        }
        for p in &self.processes {
            let _ = writeln!(
                out,
                "  pid {}: cpu {:.1} ms ({:.1} us/request), rss {} KiB, peak rss {} KiB",
                p.pid,
                p.cpu_us as f64 / 1000.0,
                p.cpu_us_per_request,
                p.rss_kib,
                p.peak_rss_kib.max(p.max_sampled_rss_kib)
            );
        }
        out
    }
}
