//! `wakegate-interceptor`: parse flags, start logging, run (or run the example backend), and
//! turn the outcome into an exit status.

use std::process::ExitCode;

use clap::Parser;
use wakegate_interceptor::cli::{Cli, Command};
use wakegate_interceptor::{backend, jobs, telemetry};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // --help and --version are not errors; bad flags are usage errors (EX_USAGE).
            return if err.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("wakegate-interceptor: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Backend(args)) => match runtime.block_on(backend::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("wakegate-interceptor backend: {err:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Jobs(args)) => match runtime.block_on(jobs::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("wakegate-interceptor jobs: {err:#}");
                ExitCode::FAILURE
            }
        },
        None => match runtime.block_on(wakegate_interceptor::run(cli.serve)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("wakegate-interceptor: {err}");
                ExitCode::from(err.exit_code())
            }
        },
    }
}
