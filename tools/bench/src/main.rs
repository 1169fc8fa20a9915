//! `sluice-bench`: drives a running Sluice and prints what it saw (and JSON with `--json`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sluice_bench::Config::parse();
    let json_path = config.json.clone();
    let report = sluice_bench::run(config).await?;
    println!("{}", report.render());
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        println!("JSON report written to {}", path.display());
    }
    if report.lost > 0 {
        anyhow::bail!("{} accepted jobs reached no terminal status", report.lost);
    }
    Ok(())
}
