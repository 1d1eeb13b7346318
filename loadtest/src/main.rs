//! `wakegate-loadtest`: parse, pick a runtime, run until done or Ctrl-C, print the summary.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use wakegate_loadtest::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            // 64 (EX_USAGE) for bad arguments, as the other Wakegate binaries do.
            return ExitCode::from(if usage { 64 } else { 0 });
        }
    };
    wakegate_loadtest::raise_fd_limit();
    // `--single-thread` keeps the load generator on one core (pinned with taskset, say).
    let single = matches!(&cli.command, Command::Rate(r) if r.single_thread);
    let runtime = if single {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("wakegate-loadtest: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupted: finishing with what ran (Ctrl-C again to quit now)");
                    stop.cancel();
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            }
        });
        match wakegate_loadtest::run(cli, stop).await {
            Ok(report) => {
                print!("{}", report.summary());
                if report.interrupted {
                    ExitCode::from(130)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(err) => {
                eprintln!("wakegate-loadtest: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}
