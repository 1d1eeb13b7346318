//! The three load shapes: `cold-start`, `rate` and `burst`. Every loop is bounded by a count and
//! a time, and stops at Ctrl-C with what it has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::admin::AdminError;
use crate::cli::{BurstArgs, ColdStartArgs, Rate, RateArgs};
use crate::record::{Event, Percentiles, RequestRecord};
use crate::report::{BurstSummary, ColdStartIteration, ColdStartSummary, RateSummary, Report};
use crate::session::Session;
use crate::target::Target;

/// How long in-flight requests may finish after Ctrl-C before they are abandoned.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// An open-loop send this far behind schedule counts as late (the generator or the in-flight
/// cap held it back); its latency counts from when it was due either way.
const LATE: Duration = Duration::from_millis(5);

/// Fires `n` requests at once, all measured from the same instant; waits for every answer, or
/// until Ctrl-C (plus a short grace). Returns whether all finished.
async fn fire(session: &Session, n: u32, iteration: u32) -> bool {
    let sent = Instant::now();
    let sent_us = session.clock.us(sent);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let target: Target = session.target.clone();
        let recorder = session.recorder.clone();
        recorder
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(async move {
            let outcome = target.send(sent).await;
            recorder.add(
                outcome.record(sent_us, iteration),
                outcome.error.map(str::to_owned),
            );
        });
    }
    drain(&mut tasks, session).await
}

/// Waits for `tasks`; after Ctrl-C, gives them [`STOP_GRACE`] and abandons the rest.
async fn drain(tasks: &mut JoinSet<()>, session: &Session) -> bool {
    let finished = {
        let all = async { while tasks.join_next().await.is_some() {} };
        tokio::pin!(all);
        tokio::select! {
            () = &mut all => true,
            () = session.stop.cancelled() => {
                tokio::time::timeout(STOP_GRACE, &mut all).await.is_ok()
            }
        }
    };
    if !finished {
        tasks.abort_all();
    }
    finished
}

/// `cold-start`.
pub async fn cold_start(args: ColdStartArgs, session: Session) -> anyhow::Result<Report> {
    let (Some(admin), Some(route)) = (session.admin.clone(), session.route.clone()) else {
        anyhow::bail!("cold-start needs the admin API");
    };
    let mut iterations = Vec::new();
    for i in 1..=args.iterations {
        session.progress.phase(format!(
            "iteration {i}/{}: waiting for {route} to be at zero",
            args.iterations
        ));
        match admin
            .wait_zero(&route, args.zero_timeout, &session.clock, &session.stop)
            .await
        {
            Ok(()) => {}
            Err(AdminError::Interrupted) => break,
            Err(err) => {
                if iterations.is_empty() {
                    return Err(err.into());
                }
                eprintln!("stopping early: {err}");
                session.stop.cancel();
                break;
            }
        }
        session.progress.phase(format!(
            "iteration {i}/{}: {} requests at zero",
            args.iterations, args.concurrency
        ));
        let sent_us = session.clock.now_us();
        iterations.push((i, sent_us));
        if !fire(&session, args.concurrency, i).await {
            break;
        }
    }
    // Let the last ready event arrive before reading the log.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let events = session.events();
    let mut report = session.finish("cold-start").await;
    report.cold_starts = iterations
        .iter()
        .map(|&(i, sent_us)| iteration(i, sent_us, &report.records, &events, &route))
        .collect();
    let its = &report.cold_starts;
    report.cold_start_summary = Some(ColdStartSummary {
        first_byte: Percentiles::of(its.iter().filter(|i| i.ok > 0).map(|i| i.first_byte_us)),
        wake: Percentiles::of(its.iter().filter_map(|i| positive(i.wake_us))),
        boot: Percentiles::of(its.iter().filter_map(|i| positive(i.boot_us))),
        overhead: Percentiles::of(its.iter().filter_map(|i| positive(i.overhead_us))),
    });
    Ok(report)
}

fn positive(us: Option<i64>) -> Option<u64> {
    us.and_then(|v| u64::try_from(v).ok())
}

/// One iteration's timeline from its records and the interceptor's events.
fn iteration(
    i: u32,
    sent_us: u64,
    records: &[RequestRecord],
    events: &[Event],
    route: &str,
) -> ColdStartIteration {
    let mine: Vec<&RequestRecord> = records.iter().filter(|r| r.iteration == i).collect();
    let answered = mine.iter().filter(|r| r.status != 0);
    let first_byte_us = answered.clone().map(|r| r.latency_us).min().unwrap_or(0);
    let last_byte_us = answered.map(|r| r.latency_us).max().unwrap_or(0);
    let end = sent_us as i64 + mine.iter().map(|r| r.total_us as i64).max().unwrap_or(0);
    // The wake this iteration caused: the first after its send (1 ms of slack for two clocks
    // read on different threads), and the ready that followed it.
    let wake = events.iter().find(|e| {
        e.kind == "wake" && e.route == route && e.at_us + 1000 >= sent_us as i64 && e.at_us <= end
    });
    let ready = wake.and_then(|w| {
        events
            .iter()
            .find(|e| e.kind == "ready" && e.route == route && e.at_us >= w.at_us && e.at_us <= end)
    });
    let first_byte_at = sent_us as i64 + first_byte_us as i64;
    ColdStartIteration {
        iteration: i,
        sent_us,
        requests: mine.len() as u32,
        ok: mine
            .iter()
            .filter(|r| (200..400).contains(&r.status))
            .count() as u32,
        first_byte_us,
        last_byte_us,
        wake_us: wake.map(|w| w.at_us - sent_us as i64),
        boot_us: wake.zip(ready).map(|(w, r)| r.at_us - w.at_us),
        overhead_us: ready.map(|r| first_byte_at - r.at_us),
    }
}

/// `rate`.
pub async fn rate(args: RateArgs, session: Session) -> anyhow::Result<Report> {
    let deadline = Instant::now() + args.duration;
    let max_requests = args.requests.unwrap_or(u64::MAX);
    let mut late = 0u64;
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    match args.rate {
        Rate::Max => {
            session.progress.phase(format!(
                "closed loop over {} connections for {:?}",
                args.connections, args.duration
            ));
            let budget = Arc::new(std::sync::atomic::AtomicU64::new(max_requests));
            for _ in 0..args.connections {
                let target = session.target.clone();
                let recorder = session.recorder.clone();
                let stop = session.stop.clone();
                let clock = session.clock;
                let budget = budget.clone();
                tasks.spawn(async move {
                    use std::sync::atomic::Ordering;
                    while Instant::now() < deadline && !stop.is_cancelled() {
                        if budget
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                b.checked_sub(1)
                            })
                            .is_err()
                        {
                            return;
                        }
                        recorder.sent.fetch_add(1, Ordering::Relaxed);
                        let sent = Instant::now();
                        let outcome = target.send(sent).await;
                        recorder.add(
                            outcome.record(clock.us(sent), 0),
                            outcome.error.map(str::to_owned),
                        );
                    }
                });
            }
        }
        Rate::PerSecond(target_rate) => {
            session.progress.phase(format!(
                "{target_rate}/s for {:?}{}",
                args.duration,
                args.ramp_from
                    .map(|f| format!(", ramping from {f}/s"))
                    .unwrap_or_default()
            ));
            let slots = Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(args.max_in_flight).unwrap_or(usize::MAX),
            ));
            let schedule = Schedule {
                from: args.ramp_from.unwrap_or(target_rate),
                to: target_rate,
                ramp: args.ramp.unwrap_or(Duration::ZERO),
            };
            let mut at = Duration::ZERO;
            let mut sent = 0u64;
            while at < args.duration && sent < max_requests && !session.stop.is_cancelled() {
                let due = started + at;
                tokio::select! {
                    () = session.stop.cancelled() => break,
                    () = tokio::time::sleep_until(due.into()) => {}
                }
                let permit = tokio::select! {
                    () = session.stop.cancelled() => break,
                    permit = slots.clone().acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                // tokio's timer ticks in milliseconds, so a send 1-2 ms late is the clock, not load.
                if due.elapsed() > LATE {
                    late += 1;
                }
                let target = session.target.clone();
                let recorder = session.recorder.clone();
                let clock = session.clock;
                recorder
                    .sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tasks.spawn(async move {
                    // Measured from when it was due, not when it went out: a send held back
                    // by a slow system counts against the latency (no coordinated omission).
                    let outcome = target.send(due).await;
                    recorder.add(
                        outcome.record(clock.us(due), 0),
                        outcome.error.map(str::to_owned),
                    );
                    drop(permit);
                });
                // Reap finished tasks as we go, so a long run keeps no dead handles.
                while tasks.try_join_next().is_some() {}
                sent += 1;
                at += schedule.gap(at);
            }
        }
    }
    drain(&mut tasks, &session).await;
    let sent = session
        .recorder
        .sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let mut report = session.finish("rate").await;
    report.rate = Some(RateSummary {
        target_rate: match args.rate {
            Rate::PerSecond(r) => Some(r),
            Rate::Max => None,
        },
        ramp_from: args.ramp_from,
        connections: matches!(args.rate, Rate::Max).then_some(args.connections),
        send_rate: sent as f64 / elapsed,
        late_sends: late,
    });
    Ok(report)
}

/// An arrival schedule: `from` per second rising linearly to `to` over `ramp`, then `to`.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    from: f64,
    to: f64,
    ramp: Duration,
}

impl Schedule {
    /// The rate at `t`.
    fn rate(&self, t: Duration) -> f64 {
        if self.ramp.is_zero() || t >= self.ramp {
            return self.to;
        }
        let f = t.as_secs_f64() / self.ramp.as_secs_f64();
        self.from + (self.to - self.from) * f
    }

    /// The gap after a request sent at `t`.
    fn gap(&self, t: Duration) -> Duration {
        // A floor keeps a ramp from 0/s moving.
        Duration::from_secs_f64(1.0 / self.rate(t).max(0.1))
    }
}

/// `burst`.
pub async fn burst(args: BurstArgs, session: Session) -> anyhow::Result<Report> {
    let (Some(admin), Some(route)) = (session.admin.clone(), session.route.clone()) else {
        anyhow::bail!("burst needs the admin API");
    };
    session
        .progress
        .phase(format!("waiting for {route} to be at zero"));
    match admin
        .wait_zero(&route, args.zero_timeout, &session.clock, &session.stop)
        .await
    {
        Ok(()) | Err(AdminError::Interrupted) => {}
        Err(err) => return Err(err.into()),
    }
    let mut fired = false;
    if !session.stop.is_cancelled() {
        session
            .progress
            .phase(format!("{} requests at zero", args.requests));
        fired = true;
        fire(&session, args.requests, 0).await;
    }
    let mut report = session.finish("burst").await;
    if fired {
        report.burst = Some(BurstSummary {
            requested: u64::from(args.requests),
            succeeded: report.requests.ok,
            failed: report.requests.failed,
            peak_held: report.samples.iter().map(|s| s.held).max().unwrap_or(0),
            peak_in_flight: report
                .samples
                .iter()
                .map(|s| s.in_flight)
                .max()
                .unwrap_or(0),
            all_answered_us: report
                .records
                .iter()
                .map(|r| r.latency_us)
                .max()
                .unwrap_or(0),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_rises_linearly_then_holds() {
        let s = Schedule {
            from: 10.0,
            to: 110.0,
            ramp: Duration::from_secs(10),
        };
        assert_eq!(s.rate(Duration::ZERO), 10.0);
        assert_eq!(s.rate(Duration::from_secs(5)), 60.0);
        assert_eq!(s.rate(Duration::from_secs(20)), 110.0);
        // Over the ramp, about the area under the line: (10 + 110) / 2 * 10 = 600 sends.
        let mut at = Duration::ZERO;
        let mut n = 0;
        while at < Duration::from_secs(10) {
            at += s.gap(at);
            n += 1;
        }
        assert!((590..=610).contains(&n), "{n}");
    }

    #[test]
    fn an_iteration_is_split_by_its_events() {
        let rec = |latency_us, status| RequestRecord {
            sent_us: 1_000_000,
            latency_us,
            total_us: latency_us + 100,
            status,
            cold: true,
            iteration: 2,
        };
        let records = [rec(500_000, 200), rec(520_000, 200), rec(600_000, 0)];
        let ev = |kind: &str, at_us| Event {
            kind: kind.into(),
            route: "r".into(),
            at_us,
        };
        // A wake from an earlier iteration is ignored.
        let events = [
            ev("wake", 10),
            ev("ready", 20),
            ev("wake", 1_000_300),
            ev("ready", 1_499_000),
        ];
        let it = iteration(2, 1_000_000, &records, &events, "r");
        assert_eq!((it.requests, it.ok), (3, 2));
        assert_eq!(it.first_byte_us, 500_000);
        assert_eq!(it.last_byte_us, 520_000, "the failed request has no byte");
        assert_eq!(it.wake_us, Some(300));
        assert_eq!(it.boot_us, Some(498_700));
        assert_eq!(it.overhead_us, Some(1_000));
    }
}
