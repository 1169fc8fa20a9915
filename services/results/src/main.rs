//! `sluice-results`: telemetry, config, build (migrate, subscribe), serve until SIGTERM or SIGINT.

use clap::Parser;
use sluice_results::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sluice_common::telemetry::init("results");
    let config = Config::parse();
    let application = Application::build(config).await?;
    tracing::info!(addr = %application.local_addr(), "results listening: GET /v1/jobs/{{id}}, /v1/jobs/{{id}}/events");
    application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await
}
