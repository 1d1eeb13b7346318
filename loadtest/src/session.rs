//! What every run shares: the clock, the target client, the admin API (route, sampler, event
//! stream), process readings, progress, and turning it all into a [`Report`] at the end.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, ProcessStats};
use crate::cli::Common;
use crate::progress::Progress;
use crate::record::{Clock, Event, Percentiles, Recorder, StateSample};
use crate::report::{Counts, ProcessReport, Report};
use crate::target::Target;

/// A run in progress.
pub struct Session {
    /// The arguments.
    pub common: Common,
    /// The run's clock.
    pub clock: Clock,
    /// Cancelled by Ctrl-C: loops stop and a partial report is written.
    pub stop: CancellationToken,
    /// The service under test.
    pub target: Target,
    /// The admin API, unless `--no-admin`.
    pub admin: Option<Admin>,
    /// The watched route.
    pub route: Option<String>,
    /// Finished requests.
    pub recorder: Arc<Recorder>,
    /// Live progress.
    pub progress: Progress,
    samples: Option<Arc<Mutex<Vec<StateSample>>>>,
    events: Option<Arc<Mutex<Vec<Event>>>>,
    processes: Vec<(u32, ProcessStats, Arc<Mutex<u64>>)>,
    background: CancellationToken,
}

impl Session {
    /// Connects to the admin API (when used), starts sampling and the event stream.
    pub async fn start(
        common: Common,
        needs_admin: bool,
        total: Option<u64>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        if needs_admin && common.no_admin {
            anyhow::bail!(
                "this mode needs the admin API to know when the target is at zero; drop --no-admin"
            );
        }
        let target = Target::new(common.url.clone(), &common.host_header(), common.timeout)?;
        let clock = Clock::new();
        let background = CancellationToken::new();
        let (admin, route, samples, events) = if common.no_admin {
            (None, None, None, None)
        } else {
            let admin = Admin::new(common.admin.clone());
            let route = admin.resolve_route(common.route.as_deref()).await?;
            let events = admin.follow_events(clock, background.clone()).await?;
            let samples = admin.spawn_sampler(
                route.clone(),
                common.sample_interval,
                clock,
                background.clone(),
            );
            (Some(admin), Some(route), Some(samples), Some(events))
        };
        let mut processes = Vec::new();
        for &pid in &common.pids {
            let Some(before) = ProcessStats::read(pid) else {
                anyhow::bail!("--pid {pid}: no such process (or /proc is not readable)");
            };
            let max_rss = Arc::new(Mutex::new(before.rss_kib));
            spawn_rss_sampler(
                pid,
                max_rss.clone(),
                common.sample_interval,
                background.clone(),
            );
            processes.push((pid, before, max_rss));
        }
        let recorder = Arc::new(Recorder::default());
        let progress = Progress::new(total, !common.no_progress_bar);
        progress.spawn(recorder.clone(), samples.clone(), clock, background.clone());
        Ok(Self {
            common,
            clock,
            stop,
            target,
            admin,
            route,
            recorder,
            progress,
            samples,
            events,
            processes,
            background,
        })
    }

    /// Samples taken so far.
    pub fn samples(&self) -> Vec<StateSample> {
        self.samples
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Events seen so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .as_ref()
            .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Stops the background tasks and builds the report's shared part.
    pub async fn finish(self, mode: &'static str) -> Report {
        // One last sample, so the plot shows the state after the last answer.
        if let (Some(admin), Some(route), Some(samples)) = (&self.admin, &self.route, &self.samples)
        {
            if let Ok(sample) = admin.sample(route, &self.clock).await {
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(sample);
            }
        }
        self.background.cancel();
        self.progress.finish();
        let duration_us = self.clock.now_us();
        let sent = self
            .recorder
            .sent
            .load(std::sync::atomic::Ordering::Relaxed);
        let (records, errors) = self.recorder.take();
        let requests = Counts::from(&records, errors, sent);
        let latency = Percentiles::of(
            records
                .iter()
                .filter(|r| r.status != 0)
                .map(|r| r.latency_us),
        );
        let answered = requests.by_status.values().sum::<u64>();
        let processes = self
            .processes
            .iter()
            .map(|(pid, before, max_rss)| {
                let after = ProcessStats::read(*pid).unwrap_or_default();
                let max = *max_rss.lock().unwrap_or_else(|e| e.into_inner());
                ProcessReport::between(*pid, *before, after, max, answered)
            })
            .collect();
        Report {
            mode,
            url: self.common.url.to_string(),
            host: self.common.host_header(),
            route: self.route.clone(),
            started_at_unix_ms: self.clock.start_unix_ms(),
            duration_us,
            interrupted: self.stop.is_cancelled(),
            throughput: answered as f64 / (duration_us.max(1) as f64 / 1e6),
            requests,
            latency,
            processes,
            events: self.events(),
            samples: self.samples(),
            records,
            ..Report::default()
        }
    }
}

fn spawn_rss_sampler(
    pid: u32,
    max: Arc<Mutex<u64>>,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Some(s) = ProcessStats::read(pid) {
                let mut max = max.lock().unwrap_or_else(|e| e.into_inner());
                *max = (*max).max(s.rss_kib);
            }
        }
    });
}
