//! The latency-against-offered-load plot of a sweep, as a PNG.

use crate::capacity::{MAX_P99_END_TO_END_MS, Step};
use anyhow::Context;
use plotters::prelude::*;
use std::path::Path;

/// Registers the TrueType font the plot's text is drawn with (plotters draws no text without).
pub(crate) fn load_font(path: &Path) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the plot font {}", path.display()))?;
    // plotters keeps fonts for the life of the process; this runs once per report.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", path.display()))
}

pub(crate) fn latency_against_load(steps: &[Step], path: &Path) -> anyhow::Result<()> {
    let mut steps: Vec<&Step> = steps.iter().collect();
    steps.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let max_rate = steps.iter().map(|step| step.rate).fold(10.0, f64::max) * 1.1;
    let max_ms = steps
        .iter()
        .map(|step| step.report.latency.end_to_end.p99_ms)
        .fold(MAX_P99_END_TO_END_MS * 2.0, f64::max)
        * 1.5;

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Sluice: end-to-end latency against offered load (model of unlimited capacity)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..max_rate, (1.0..max_ms).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered load (jobs/s)")
        .y_desc("end to end (ms)")
        .label_style(("sans-serif", 15))
        .draw()?;

    let p50: fn(&Step) -> f64 = |step| step.report.latency.end_to_end.p50_ms;
    let p99: fn(&Step) -> f64 = |step| step.report.latency.end_to_end.p99_ms;
    for (name, color, value) in [("p50", BLUE, p50), ("p99", RED, p99)] {
        let points: Vec<(f64, f64)> = steps
            .iter()
            .map(|step| (step.rate, value(step).max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            points
                .iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    let target = vec![
        (0.0, MAX_P99_END_TO_END_MS),
        (max_rate, MAX_P99_END_TO_END_MS),
    ];
    chart
        .draw_series(LineSeries::new(target, BLACK.stroke_width(1)))?
        .label("1 s (p99 target)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
