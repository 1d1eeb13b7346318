//! The example backend (`wakegate-interceptor backend`), built here so the pod simulator of the
//! end-to-end tests has a program to run.

use clap::Parser;
use wakegate_interceptor::backend::{self, BackendArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BackendArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    backend::run(Cli::parse().args).await
}
