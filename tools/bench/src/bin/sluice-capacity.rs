//! `sluice-capacity`: the phases of `scripts/bench` (sweep, overload, streaming) and the report
//! they make.

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
    /// Streamed answers through Sluice against the model's own stream.
    Streaming(sluice_bench::streaming::StreamingArgs),
    /// Half the sustainable rate with a webhook on every job, to a receiver here.
    Webhooks(sluice_bench::webhooks::WebhooksArgs),
    /// Interactive jobs idle and behind a batch backlog.
    Lanes(sluice_bench::lanes::LanesArgs),
    /// The chaos soak's load: mixed jobs, retried until accepted (scripts/soak).
    Soak(sluice_bench::soak::SoakArgs),
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
        Command::Streaming(args) => {
            let streaming = sluice_bench::streaming::run(&args).await?;
            capacity::write_json(&args.out, &streaming)?;
            // Why not the unstreamed half rate: it can be past what streamed jobs sustain (the
            // sweep says), and what fails there is in the report, as a sweep's failed steps are.
            let failed = [Some(&streaming.low), streaming.half_streamed.as_ref()]
                .into_iter()
                .flatten()
                .map(|load| load.through_sluice.failed)
                .sum::<u64>();
            anyhow::ensure!(
                failed == 0,
                "{failed} streamed calls through Sluice failed at the low rate or at half the streamed sustainable rate"
            );
            // The last line: the streamed sustainable rate, for the next runs (`--streamed-sustainable`).
            if let Some(rate) = streaming.streamed_sustainable {
                println!("{rate:.0}");
            }
        }
        Command::Webhooks(args) => {
            let run = sluice_bench::webhooks::run(&args).await?;
            capacity::write_json(&args.out, &run)?;
            anyhow::ensure!(
                run.step.report.lost == 0,
                "{} accepted jobs were lost",
                run.step.report.lost
            );
        }
        Command::Lanes(args) => {
            let out = args.out.clone();
            let lanes = sluice_bench::lanes::run(args).await?;
            capacity::write_json(&out, &lanes)?;
            let lost = lanes.idle.lost + lanes.behind_backlog.lost + lanes.batch.lost;
            anyhow::ensure!(lost == 0, "{lost} accepted jobs were lost");
        }
        Command::Soak(args) => {
            let load = sluice_bench::soak::run(&args).await?;
            capacity::write_json(&args.out, &load)?;
            eprintln!(
                "soak load: {} submitted, {} accepted, {} abandoned",
                load.submitted, load.accepted, load.abandoned
            );
        }
        Command::Report(args) => sluice_bench::markdown::write(&args)?,
    }
    Ok(())
}
