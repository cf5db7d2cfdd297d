use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tsunagu::telemetry::init_logging();
    tsunagu::cli::run(tsunagu::cli::Cli::parse()).await
}
