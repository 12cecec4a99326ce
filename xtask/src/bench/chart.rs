//! The latency-percentile chart (SVG): one line per arm, percentiles on a "nines" axis.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 120, 0),
    RGBColor(0, 110, 200),
    RGBColor(0, 160, 90),
    RGBColor(200, 30, 60),
    RGBColor(130, 80, 180),
];

/// x = -log10(1 - q): 50% at 0.3, 90% at 1, 99% at 2, 99.9% at 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-6).log10()
}

pub fn latency(summary: &Value, arms: &[&str], path: &Path) -> Result<()> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = arms
        .iter()
        .map(|&arm| {
            let pts = summary[arm]["curve_1k"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|p| Some((nines(p[0].as_f64()?), p[1].as_f64()?.max(1.0))))
                        .collect()
                })
                .unwrap_or_default();
            (arm, pts)
        })
        .collect();
    let max_y = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(10.0, f64::max);
    let err = |e: &dyn std::fmt::Display| anyhow!("latency chart {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency by percentile, 1 KiB request/response at 1,000 req/s (median of rounds)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..4.0f64, (5.0..max_y * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (arm, pts)) in curves.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(arm)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
