//! The end-to-end sale as a picture (SVG): answers per second by outcome, latency p50/p99 per
//! second, and the stock left, over time.

use std::path::Path;

use plotters::prelude::*;

use crate::Slice;

const OUTCOME_COLORS: [(&str, RGBColor); 6] = [
    ("won", RGBColor(0x2c, 0xa0, 0x2c)),
    ("sold_out", RGBColor(0x1f, 0x77, 0xb4)),
    ("rate_limited", RGBColor(0xff, 0x7f, 0x0e)),
    ("duplicate", RGBColor(0x94, 0x67, 0xbd)),
    ("bad_request", RGBColor(0x8c, 0x56, 0x4b)),
    ("unavailable", RGBColor(0xd6, 0x27, 0x28)),
];

pub fn render(path: &Path, title: &str, timeline: &[Slice]) -> anyhow::Result<()> {
    let seconds = timeline.last().map_or(1.0, |s| s.start_s + s.width_s);
    let rate = |s: &Slice, count: u64| count as f64 / s.width_s;
    let root = SVGBackend::new(path, (960, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let panels = root.split_evenly((3, 1));

    // 1. Answers per second by outcome.
    let peak = timeline
        .iter()
        .flat_map(|s| s.outcomes.values().map(move |c| rate(s, *c)))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(
            "answers per second, by outcome (by scheduled send time)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, 0f64..peak * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    let mut outcomes: Vec<&String> = timeline.iter().flat_map(|s| s.outcomes.keys()).collect();
    outcomes.sort();
    outcomes.dedup();
    for (i, outcome) in outcomes.iter().enumerate() {
        let color = OUTCOME_COLORS
            .iter()
            .find(|(name, _)| name == outcome)
            .map(|(_, c)| *c)
            .unwrap_or_else(|| {
                let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
                RGBColor(r, g, b)
            });
        let points = timeline
            .iter()
            .map(|s| (s.start_s, rate(s, *s.outcomes.get(*outcome).unwrap_or(&0))));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(outcome.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    // 2. Latency percentiles per second.
    let slowest = timeline.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[1])
        .caption(
            "latency p50 and p99 (ms, from the scheduled send time)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, 0f64..slowest * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    for (name, color, pick) in [
        ("p50", BLUE, (|s: &Slice| s.p50_ms) as fn(&Slice) -> f64),
        ("p99", RED, |s: &Slice| s.p99_ms),
    ] {
        chart
            .draw_series(LineSeries::new(
                timeline.iter().map(|s| (s.start_s, pick(s))),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    // 3. Stock left.
    let stock_max = timeline
        .iter()
        .filter_map(|s| s.remaining)
        .max()
        .unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("units left in Redis", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, 0f64..stock_max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            timeline
                .iter()
                .filter_map(|s| Some((s.start_s, s.remaining? as f64))),
            BLACK.stroke_width(2),
        ))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("chart: {e}")
}
