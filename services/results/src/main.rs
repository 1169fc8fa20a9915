//! `sluice-results`: telemetry, config, build (migrate, subscribe), serve until SIGTERM or SIGINT.
//! `sluice-results migrate` applies the migrations and exits (a Helm pre-upgrade Job runs it).

use anyhow::Context;
use clap::Parser;
use sluice_results::{Application, Config, MIGRATOR};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = sluice_common::telemetry::init("results");
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        let result = migrate().await;
        telemetry.shutdown();
        return result;
    }
    let config = Config::parse();
    let application = Application::build(config).await?;
    tracing::info!(addr = %application.local_addr(), "results listening: GET /v1/jobs/{{id}}, /v1/jobs/{{id}}/events");
    let result = application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await;
    // Spans still buffered (the last jobs' traces) are exported before the process ends.
    telemetry.shutdown();
    result
}

async fn migrate() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is needed to migrate")?;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}
