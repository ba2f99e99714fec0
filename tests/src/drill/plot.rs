//! The timeline plot of one scenario (SVG, plotters): packets per second the LB forwarded to each
//! gateway (from the pinned per-backend counters) over time, with the scenario's events as
//! numbered vertical lines; the numbers are explained in the legend box below the chart.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::monitor::{Sample, rates};
use super::report::Event;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];
const BIN: Duration = Duration::from_millis(500);
const CHART_H: u32 = 420;
const LINE_H: u32 = 16;

/// Writes the plot of `samples` (time axis in seconds from `t0`, epoch) with `events` to `path`.
pub fn timeline(
    path: &Path,
    title: &str,
    gateways: &[String],
    samples: &[Sample],
    t0: f64,
    events: &[Event],
) -> Result<()> {
    let e = |e: &dyn std::fmt::Debug| anyhow!("plotting {}: {e:?}", path.display());
    let pts = rates(samples, BIN);
    let x0 = samples.first().map_or(-1.0, |s| s.t - t0);
    let x1 = samples.last().map_or(1.0, |s| s.t - t0).max(x0 + 1.0);
    let ymax = pts
        .iter()
        .flat_map(|(_, r)| r.iter().copied())
        .fold(10.0f64, f64::max)
        * 1.25;
    let height = CHART_H + 30 + LINE_H * events.len() as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(CHART_H);
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds from the fault")
        .y_desc("packets/s forwarded to the gateway")
        .draw()
        .map_err(|x| e(&x))?;
    for (g, name) in gateways.iter().enumerate() {
        let color = COLORS[g % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(t, r)| (t - t0, r[g])),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    for (i, ev) in events.iter().enumerate() {
        let x = ev.t_ms / 1e3;
        if x < x0 || x > x1 {
            continue;
        }
        // The fault itself (t = 0) in red.
        let style = if ev.t_ms.abs() < 0.5 {
            RED.stroke_width(2)
        } else {
            BLACK.mix(0.5).stroke_width(1)
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, ymax)],
                style,
            )))
            .map_err(|x| e(&x))?;
        // Numbers staggered over four heights so neighbouring events stay readable.
        let y = ymax * (0.97 - 0.05 * (i % 4) as f64);
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{}", i + 1),
                (x, y),
                ("sans-serif", 13).into_font(),
            )))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    for (i, ev) in events.iter().enumerate() {
        bottom
            .draw(&Text::new(
                format!("{:>2}. {:>8.0} ms  {}", i + 1, ev.t_ms, ev.what),
                (20, 10 + LINE_H as i32 * i as i32),
                ("monospace", 13).into_font(),
            ))
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
