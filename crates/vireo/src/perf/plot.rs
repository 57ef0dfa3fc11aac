//! `vireo perf --plot FILE.svg`: latency CDF per job and IOPS over time, drawn with
//! plotters' SVG backend.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

use super::PerfReport;

/// The legend box of a chart, lower right.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, DB, CT>,
) -> std::result::Result<(), Box<dyn std::error::Error + 'a>>
where
    DB::ErrorType: 'static,
{
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Draw `rep` to `path` (SVG).
pub fn write_svg(path: &Path, rep: &PerfReport) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => {}
        _ => bail!(
            "--plot writes SVG: give a file name ending in .svg (got {})",
            path.display()
        ),
    }
    let jobs: Vec<_> = rep
        .jobs
        .iter()
        .filter(|j| !j.latency_cdf.is_empty())
        .collect();
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(450);
        let title = format!(
            "vireo perf: {} {} B, QD {}",
            rep.workload, rep.io_size, rep.queue_depth
        );

        // Latency CDF, log x.
        let max_us = jobs
            .iter()
            .flat_map(|j| j.latency_cdf.iter().map(|p| p.0))
            .fold(1.0f64, f64::max)
            * 1.2;
        let min_us = jobs
            .iter()
            .flat_map(|j| j.latency_cdf.first().map(|p| p.0))
            .fold(f64::MAX, f64::min)
            .clamp(0.01, max_us / 10.0)
            * 0.8;
        let mut c = ChartBuilder::on(&top)
            .caption(format!("{title}: latency CDF"), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((min_us..max_us).log_scale(), 0.0f64..1.0)?;
        c.configure_mesh()
            .x_desc("latency (µs, log scale)")
            .y_desc("fraction of I/Os")
            .x_label_formatter(&|v| format!("{v}"))
            .draw()?;
        for (k, j) in jobs.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            c.draw_series(LineSeries::new(
                j.latency_cdf.iter().map(|&(x, y)| (x.max(min_us), y)),
                color.stroke_width(2),
            ))?
            .label(j.bdev.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        legend(&mut c)?;

        // IOPS per second.
        let secs = rep
            .jobs
            .iter()
            .map(|j| j.iops_per_second.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let max_iops = rep
            .jobs
            .iter()
            .flat_map(|j| j.iops_per_second.iter().copied())
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut c = ChartBuilder::on(&bottom)
            .caption("IOPS over time", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..secs as f64, 0f64..max_iops)?;
        c.configure_mesh()
            .x_desc("seconds")
            .y_desc("IOPS")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (k, j) in rep.jobs.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            c.draw_series(LineSeries::new(
                j.iops_per_second
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as f64 + 1.0, v)),
                color.stroke_width(2),
            ))?
            .label(j.bdev.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        legend(&mut c)?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot draw {}", path.display()))
}
