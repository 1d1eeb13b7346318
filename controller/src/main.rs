//! `wakegate-controller`: parse flags, start logging, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use wakegate_controller::cli::{Args, Command, LogFormat};
use wakegate_telemetry::Telemetry;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(Command::Migrate(m)) = &args.command {
        return migrate(m);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("wakegate-controller: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter, when traces are on, runs on it.
    let telemetry = {
        let _entered = runtime.enter();
        let format = match args.log_format {
            LogFormat::Json => wakegate_telemetry::LogFormat::Json,
            LogFormat::Text => wakegate_telemetry::LogFormat::Text,
        };
        match Telemetry::init("wakegate-controller", format) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("wakegate-controller: {err}");
                return ExitCode::from(64);
            }
        }
    };
    let code = match runtime.block_on(wakegate_controller::run_until(args, terminated())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wakegate-controller: {err}");
            ExitCode::FAILURE
        }
    };
    {
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    code
}

/// `migrate`: reads the manifest, prints the migration, exits 1 with a message on a problem.
fn migrate(m: &wakegate_controller::migrate::MigrateArgs) -> ExitCode {
    let text = if m.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
    } else {
        std::fs::read_to_string(&m.file)
    };
    let text = match text {
        Ok(text) => text,
        Err(err) => {
            eprintln!(
                "wakegate-controller migrate: cannot read {}: {err}",
                m.file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match wakegate_controller::migrate::migrate(&text, &m.scaler_address, m.standalone) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("wakegate-controller migrate: {}: {err}", m.file.display());
            ExitCode::FAILURE
        }
    }
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
