//! `sluice-ingest`: telemetry, config, build, serve until SIGTERM or SIGINT.
//! `sluice-ingest keys create|list|revoke` manages API keys instead.

use clap::Parser;
use sluice_ingest::{Application, Config, KeysCommand};

#[derive(Debug, clap::Parser)]
#[command(
    name = "sluice-ingest",
    about = "Accepts jobs over HTTP and publishes them to Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Manage API keys in Postgres instead of serving.
    Keys(KeysCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Keys(keys)) = cli.command {
        return keys.run().await;
    }
    let telemetry = sluice_common::telemetry::init("ingest");
    let application = Application::build(cli.config).await?;
    tracing::info!(addr = %application.local_addr(), "ingest listening: POST /v1/jobs");
    let result = application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await;
    // Spans still buffered (the last jobs' traces) are exported before the process ends.
    telemetry.shutdown();
    result
}
