//! `sluice-results`: telemetry, config, build (migrate, subscribe), serve until SIGTERM or SIGINT.
//! `sluice-results migrate` applies the migrations and exits (the Helm chart's init container).

use anyhow::Context;
use clap::Parser;
use secrecy::{ExposeSecret, SecretString};
use sluice_results::{Application, Config, MIGRATOR};

#[derive(Debug, clap::Parser)]
#[command(
    name = "sluice-results",
    about = "Stores job state in Postgres and serves it over HTTP and SSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate {
        /// Postgres to migrate.
        #[arg(long, env = "DATABASE_URL")]
        database_url: SecretString,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = sluice_common::telemetry::init("results");
    let result = match cli.command {
        Some(Command::Migrate { database_url }) => migrate(&database_url).await,
        None => serve(cli.config).await,
    };
    // Spans still buffered (the last jobs' traces) are exported before the process ends.
    telemetry.shutdown();
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let application = Application::build(config).await?;
    tracing::info!(addr = %application.local_addr(), "results listening: GET /v1/jobs/{{id}}, /v1/jobs/{{id}}/events");
    application
        .run_until_stopped(sluice_common::shutdown::on_signal())
        .await
}

async fn migrate(database_url: &SecretString) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(database_url.expose_secret())
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}
