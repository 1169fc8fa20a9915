//! `sluice-webhooks`: telemetry, config, build (subscribe, connect), run until SIGTERM or SIGINT.

use clap::Parser;
use sluice_webhooks::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = sluice_common::telemetry::init("webhooks");
    let result = async {
        let application = Application::build(config).await?;
        tracing::info!(addr = %application.local_addr(), "webhooks running: /healthz, /readyz, /metrics");
        application
            .run_until_stopped(sluice_common::shutdown::on_signal())
            .await
    }
    .await;
    telemetry.shutdown();
    result
}
