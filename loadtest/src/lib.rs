//! `wakegate-loadtest`: load tests that see cold starts. It drives a service through the
//! interceptor and reads the interceptor's admin API (`/status`, `/events`) for the target's
//! state and the wake timeline, so a cold start is split into wake, boot and proxy overhead
//! instead of being one slow request.

pub mod admin;
pub mod cli;
pub mod progress;
pub mod record;
pub mod report;
pub mod runs;
pub mod session;
pub mod svg;
pub mod target;

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};
use crate::report::Report;
use crate::session::Session;

/// Runs one command until it ends or `stop` is cancelled (Ctrl-C), then writes the outputs.
pub async fn run(cli: Cli, stop: CancellationToken) -> anyhow::Result<Report> {
    let (report, common) = match cli.command {
        Command::ColdStart(args) => {
            let common = args.common.clone();
            let total = u64::from(args.iterations) * u64::from(args.concurrency);
            let session = Session::start(common.clone(), true, Some(total), stop).await?;
            (runs::cold_start(args, session).await?, common)
        }
        Command::Rate(args) => {
            let common = args.common.clone();
            let total = match args.rate {
                cli::Rate::PerSecond(r) => Some((r * args.duration.as_secs_f64()).ceil() as u64),
                cli::Rate::Max => None,
            }
            .map(|t| t.min(args.requests.unwrap_or(u64::MAX)));
            let session = Session::start(common.clone(), false, total, stop).await?;
            (runs::rate(args, session).await?, common)
        }
        Command::Burst(args) => {
            let common = args.common.clone();
            let session =
                Session::start(common.clone(), true, Some(u64::from(args.requests)), stop).await?;
            (runs::burst(args, session).await?, common)
        }
    };
    if let Some(path) = &common.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json)
            .map_err(|e| anyhow::anyhow!("cannot write --json {}: {e}", path.display()))?;
    }
    if let Some(path) = &common.svg {
        std::fs::write(path, svg::render(&report))
            .map_err(|e| anyhow::anyhow!("cannot write --svg {}: {e}", path.display()))?;
    }
    Ok(report)
}

/// Raises the open-file limit to its hard maximum: a burst opens a socket per request.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
