//! `sluice-ingest`: telemetry, config, build, serve until SIGTERM or SIGINT.
//! `sluice-ingest keys create|list|revoke` manages API keys instead.

use clap::Parser;
use sluice_ingest::{Application, Config, KeysCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("keys") {
        return KeysCommand::parse_from(std::env::args().skip(1))
            .run()
            .await;
    }
    let telemetry = sluice_common::telemetry::init("ingest");
    let config = Config::parse();
    let application = Application::build(config).await?;
    tracing::info!(addr = %application.local_addr(), "ingest listening: POST /v1/jobs");
    let result = application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await;
    // Spans still buffered (the last jobs' traces) are exported before the process ends.
    telemetry.shutdown();
    result
}
