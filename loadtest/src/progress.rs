//! Live progress on stderr: a bar on a terminal, one plain line a second otherwise (CI logs,
//! pipes), so the summary on stdout stays clean either way.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::record::{Clock, Recorder, StateSample};

/// Progress reporting for one run.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    phase: Arc<Mutex<String>>,
}

impl Progress {
    /// A bar over `total` steps when stderr is a terminal (and the bar is wanted), else
    /// plain lines.
    pub fn new(total: Option<u64>, want_bar: bool) -> Self {
        let bar = (want_bar && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(total) => ProgressBar::new(total),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self {
            bar,
            phase: Arc::new(Mutex::new(String::new())),
        }
    }

    /// Says what the run is doing (e.g. "waiting for zero").
    pub fn phase(&self, phase: impl Into<String>) {
        let phase = phase.into();
        if self.bar.is_none() {
            eprintln!("{phase}");
        }
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// Updates the display every tick from the recorder and the latest sample, until `stop`.
    pub fn spawn(
        &self,
        recorder: Arc<Recorder>,
        samples: Option<Arc<Mutex<Vec<StateSample>>>>,
        clock: Clock,
        stop: CancellationToken,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let every = if this.bar.is_some() {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                this.tick(&recorder, samples.as_ref(), &clock);
            }
        });
    }

    fn tick(
        &self,
        recorder: &Recorder,
        samples: Option<&Arc<Mutex<Vec<StateSample>>>>,
        clock: &Clock,
    ) {
        use std::sync::atomic::Ordering;
        let sent = recorder.sent.load(Ordering::Relaxed);
        let done = recorder.done.load(Ordering::Relaxed);
        let state =
            samples.and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).last().copied());
        let state = state
            .map(|s| {
                format!(
                    " in-flight={} held={} ready={}",
                    s.in_flight, s.held, s.ready
                )
            })
            .unwrap_or_default();
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(format!("sent={sent}{state} {phase}"));
            }
            None => eprintln!(
                "t={:.1}s sent={sent} done={done}{state}",
                clock.now_us() as f64 / 1e6
            ),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
