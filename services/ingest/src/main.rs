//! `sluice-ingest`: telemetry, config, build, serve until SIGTERM or SIGINT.

use clap::Parser;
use sluice_ingest::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sluice_common::telemetry::init("ingest");
    let config = Config::parse();
    let application = Application::build(config).await?;
    tracing::info!(addr = %application.local_addr(), "ingest listening: POST /v1/jobs");
    application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await
}
