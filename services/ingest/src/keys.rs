//! `sluice-ingest keys ...`: create, list and revoke API keys in Postgres.

use secrecy::{ExposeSecret, SecretString};
use sluice_common::auth;

#[derive(Debug, clap::Args)]
pub struct KeysCommand {
    /// Postgres holding the keys.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
    )]
    database_url: SecretString,

    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Create a key; it is printed once and cannot be shown again.
    Create {
        #[arg(long)]
        user_id: String,
        #[arg(long, default_value = "default")]
        tier: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by its id; services stop accepting it within `SLUICE_KEY_CACHE_SECS`.
    Revoke { key_id: String },
}

impl KeysCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(self.database_url.expose_secret()).await?;
        auth::wait_for_schema(&pool, std::time::Duration::ZERO).await?;
        match self.action {
            Action::Create {
                user_id,
                tier,
                name,
            } => {
                sluice_schemas::UserId::parse(user_id.as_str())?;
                let (key_id, key) =
                    auth::create_key(&pool, &user_id, &tier, name.as_deref()).await?;
                println!(
                    "{}",
                    serde_json::json!({"key_id": key_id, "user_id": user_id, "tier": tier, "api_key": key})
                );
            }
            Action::List => {
                for key in auth::list_keys(&pool).await? {
                    println!("{}", serde_json::to_string(&key)?);
                }
            }
            Action::Revoke { key_id } => {
                anyhow::ensure!(
                    auth::revoke_key(&pool, &key_id).await?,
                    "no live key {key_id}"
                );
                println!("{}", serde_json::json!({"key_id": key_id, "revoked": true}));
            }
        }
        Ok(())
    }
}
