//! `sluice-worker`: telemetry, config, build, consume until SIGTERM or SIGINT, drain.

use clap::Parser;
use sluice_worker::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = sluice_common::telemetry::init("worker");
    let config = Config::parse();
    let application = Application::build(config).await?;
    tracing::info!(health = %application.local_addr(), "worker consuming");
    let result = application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await;
    // Spans still buffered (the last jobs' traces) are exported before the process ends.
    telemetry.shutdown();
    result
}
