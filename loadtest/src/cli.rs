//! Command-line arguments, parsed into their types here so the runs never re-validate them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use http::Uri;

/// Load-tests a service behind Wakegate's interceptor, cold starts included: it reads the
/// interceptor's admin API to know when the target is at zero, when it was woken and when it
/// became ready, so a cold start is measured, not just latency.
#[derive(Debug, Parser)]
#[command(name = "wakegate-loadtest", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The three load shapes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// K cold starts: wait until the target is at zero, fire N requests at once, record the
    /// wake timeline; report the distribution over the iterations.
    ColdStart(ColdStartArgs),
    /// A constant (or ramping) arrival rate for a fixed time, open loop, with latency free of
    /// coordinated omission; or `--rate max` for closed-loop throughput.
    Rate(RateArgs),
    /// M requests at once against a target at zero: how many succeed, the peak of held
    /// requests, and the time until all are answered.
    Burst(BurstArgs),
}

/// What every run needs: the target, the interceptor's admin API, and the outputs.
#[derive(Clone, Debug, Args)]
pub struct Common {
    /// URL requests are sent to (the interceptor's proxy port).
    #[arg(long, default_value = "http://127.0.0.1:8080/", value_parser = parse_url)]
    pub url: Uri,

    /// Host header to send (selects the route); default: the URL's host.
    #[arg(long)]
    pub host: Option<String>,

    /// The interceptor's admin API, for `/status`, `/queue`, `/metrics` and `/events`.
    #[arg(long, default_value = "http://127.0.0.1:9090/", value_parser = parse_url)]
    pub admin: Uri,

    /// The route to watch in the admin API; default: the only route, if there is one.
    #[arg(long)]
    pub route: Option<String>,

    /// Per-request timeout.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// How often the admin API is sampled for in-flight, held and ready counts.
    #[arg(long, default_value = "20ms", value_parser = parse_positive_duration)]
    pub sample_interval: Duration,

    /// A process (the interceptor, a proxy) whose CPU time and memory are reported; repeat for
    /// several. Same machine only.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,

    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write a plot of latency over time, with in-flight, held and ready backends on the same
    /// time axis, as SVG to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,

    /// Plain progress lines even on a terminal.
    #[arg(long)]
    pub no_progress_bar: bool,

    /// Do without the admin API (no timeline, no waiting for zero): for targets that are not
    /// behind Wakegate, such as a reference proxy. `cold-start` and `burst` need the admin API.
    #[arg(long)]
    pub no_admin: bool,
}

/// `cold-start` arguments.
#[derive(Clone, Debug, Args)]
pub struct ColdStartArgs {
    /// Shared arguments.
    #[command(flatten)]
    pub common: Common,
    /// Cold starts to measure.
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Requests fired at once per cold start.
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Longest wait for the target to reach zero before an iteration.
    #[arg(long, default_value = "10m", value_parser = parse_positive_duration)]
    pub zero_timeout: Duration,
}

/// `rate` arguments.
#[derive(Clone, Debug, Args)]
pub struct RateArgs {
    /// Shared arguments.
    #[command(flatten)]
    pub common: Common,
    /// Requests per second, or `max` for closed-loop throughput over `--connections`.
    #[arg(long, short = 'r', value_parser = parse_rate)]
    pub rate: Rate,
    /// How long to send.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Start at this rate and rise linearly to `--rate` over `--ramp`.
    #[arg(long, requires = "ramp")]
    pub ramp_from: Option<f64>,
    /// How long the ramp from `--ramp-from` lasts.
    #[arg(long, value_parser = parse_positive_duration, requires = "ramp_from")]
    pub ramp: Option<Duration>,
    /// Stop after this many requests, even before `--duration`.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Most requests in flight at once (open loop); when reached, sending waits, and the wait
    /// counts in the latency of the requests it delays.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_in_flight: u64,
    /// Connections for `--rate max`.
    #[arg(long, short = 'c', default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub connections: u64,
    /// Run on one thread (a current-thread runtime), to pin the load generator to one core.
    #[arg(long)]
    pub single_thread: bool,
}

/// `burst` arguments.
#[derive(Clone, Debug, Args)]
pub struct BurstArgs {
    /// Shared arguments.
    #[command(flatten)]
    pub common: Common,
    /// Requests fired at once.
    #[arg(long, short = 'm', default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub requests: u32,
    /// Longest wait for the target to reach zero first.
    #[arg(long, default_value = "10m", value_parser = parse_positive_duration)]
    pub zero_timeout: Duration,
}

/// A target arrival rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// Requests per second, open loop.
    PerSecond(f64),
    /// As fast as the connections allow, closed loop.
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 10_000_000.0 => Ok(Rate::PerSecond(r)),
        _ => Err(format!(
            "{s:?} is not a rate: give requests per second (above 0) or `max`"
        )),
    }
}

fn parse_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "{s:?}: give an http:// URL with a host, like http://127.0.0.1:8080/"
        ));
    }
    Ok(uri)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than 0".into()),
        Err(e) => Err(format!("{s:?} is not a duration like 10s or 500ms: {e}")),
    }
}

impl Common {
    /// The Host header value.
    pub fn host_header(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            self.url
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_get_clear_messages() {
        let err = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("wakegate-loadtest").chain(args.iter().copied()))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["rate", "--rate", "0"]).contains("is not a rate"));
        assert!(err(&["rate", "--rate", "fast"]).contains("is not a rate"));
        assert!(err(&["rate", "--rate", "10", "--duration", "0s"]).contains("longer than 0"));
        assert!(err(&["rate", "--rate", "10", "--url", "https://x/"]).contains("http:// URL"));
        assert!(err(&["rate", "--rate", "10", "--ramp", "5s"]).contains("--ramp-from"));
        assert!(err(&["cold-start", "-k", "0"]).contains("0 is not in 1..=100000"));
        assert!(err(&["burst", "--timeout", "soon"]).contains("not a duration"));
        let ok =
            Cli::try_parse_from(["wakegate-loadtest", "rate", "--rate", "max", "-c", "8"]).unwrap();
        match ok.command {
            Command::Rate(r) => assert_eq!(r.rate, Rate::Max),
            other => panic!("{other:?}"),
        }
    }
}
