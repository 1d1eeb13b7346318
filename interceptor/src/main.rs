//! `wakegate-interceptor`: parse flags, start logging, run (or run the example backend), and
//! turn the outcome into an exit status.

use std::process::ExitCode;

use clap::Parser;
use wakegate_interceptor::cli::LogFormat;
use wakegate_interceptor::cli::{Cli, Command};
use wakegate_interceptor::{backend, jobs};
use wakegate_telemetry::Telemetry;

/// jemalloc, not the C library's allocator. A proxied request holds several buffers of 8 KiB
/// (hyper's, per connection) of which it writes a few hundred bytes: glibc's allocator writes a
/// header before each block and the next block's header after it, so every buffer costs
/// resident pages, where jemalloc keeps its records apart and untouched pages stay unmapped.
/// It is also cheaper per allocation. Figures: docs/benchmarks.md, section 00000000000000000.
/// (Built without the `jemalloc` feature, the binary uses the C library's allocator.)
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A worker thread out of work gives the upstream connections it kept back to their
        // pools, for the other threads.
        .on_thread_park(wakegate_interceptor::proxy::give_back_thread_cache)
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("wakegate-interceptor: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter, when traces are on, runs on it.
    let telemetry = {
        let _entered = runtime.enter();
        let format = match cli.log_format {
            LogFormat::Text => wakegate_telemetry::LogFormat::Text,
            LogFormat::Json => wakegate_telemetry::LogFormat::Json,
        };
        match Telemetry::init("wakegate-interceptor", format) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("wakegate-interceptor: {err}");
                return ExitCode::from(64);
            }
        }
    };
    let code = match cli.command {
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
    };
    {
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    code
}
