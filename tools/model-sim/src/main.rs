//! `sluice-model-sim`: serves the simulated model until SIGTERM or SIGINT.

use clap::Parser;
use sluice_model_sim::{Config, SimModel};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = sluice_runtime::telemetry::init("model-sim");
    let config = Config::parse();
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    tracing::info!(addr = %listener.local_addr()?, service_time_ms = config.service_time_ms, capacity = config.capacity, "simulated model listening");
    let shutdown = sluice_runtime::shutdown::on_signal();
    let result = SimModel::new(config).run(listener, shutdown).await;
    telemetry.shutdown();
    result
}
