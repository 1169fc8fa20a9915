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
        /// The key's own spend budget per UTC day (in the currency of `SLUICE_MODEL_PRICES`),
        /// besides its tier's.
        #[arg(long, value_parser = budget)]
        budget_per_day: Option<f64>,
        /// The key's own spend budget per UTC month.
        #[arg(long, value_parser = budget)]
        budget_per_month: Option<f64>,
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
                budget_per_day,
                budget_per_month,
            } => {
                sluice_schemas::UserId::parse(user_id.as_str())?;
                let budget = auth::KeyBudget {
                    per_day: budget_per_day,
                    per_month: budget_per_month,
                };
                let (key_id, key) =
                    auth::create_key_with_budget(&pool, &user_id, &tier, name.as_deref(), budget)
                        .await?;
                println!(
                    "{}",
                    serde_json::json!({
                        "key_id": key_id, "user_id": user_id, "tier": tier, "api_key": key,
                        "budget_per_day": budget_per_day, "budget_per_month": budget_per_month,
                    })
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

/// A budget: a finite amount, 0 or more.
fn budget(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(amount) if amount.is_finite() && amount >= 0.0 => Ok(amount),
        _ => Err(format!("`{text}` is not an amount of 0 or more")),
    }
}
