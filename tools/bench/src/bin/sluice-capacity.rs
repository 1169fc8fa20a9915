//! `sluice-capacity`: the phases of `scripts/bench` (sweep, overload) and the report they make.

use clap::Parser;
use sluice_bench::capacity;

#[derive(Debug, Parser)]
#[command(
    name = "sluice-capacity",
    about = "Capacity planning runs against a running Sluice"
)]
enum Command {
    /// Find the highest sustained rate, then measure half of it and the goodput.
    Sweep(capacity::SweepArgs),
    /// Offer far more than the sustainable rate.
    Overload(capacity::OverloadArgs),
    /// Write BENCHMARKS.md and the plot from the phases' JSON.
    Report(sluice_bench::ReportArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Sweep(args) => {
            let out = args.out.clone();
            let sweep = capacity::sweep(args).await?;
            capacity::write_json(&out, &sweep)?;
            eprintln!("sustainable: {:.0} jobs/s", sweep.sustainable_rate);
            println!("{:.0}", sweep.sustainable_rate);
        }
        Command::Overload(args) => {
            let out = args.out.clone();
            let overload = capacity::overload(args).await?;
            capacity::write_json(&out, &overload)?;
            anyhow::ensure!(
                overload.step.report.lost == 0,
                "{} accepted jobs were lost under overload",
                overload.step.report.lost
            );
        }
        Command::Report(args) => sluice_bench::markdown::write(&args)?,
    }
    Ok(())
}
