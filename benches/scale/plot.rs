//! RSS against cluster size, drawn as SVG with plotters.

use std::path::Path;

use plotters::prelude::*;

/// One line of the picture: a name, its colour, and (cluster size, MiB) points.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` over cluster sizes `x`, with horizontal `targets` (name, MiB). The x axis is
/// linear, so the slope is the marginal cost of a pod.
pub fn rss_against_cluster_size(
    path: &Path,
    title: &str,
    x: (f64, f64),
    series: &[Series],
    targets: &[(&str, f64, RGBColor)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(targets.iter().map(|t| t.1))
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x.0..x.1, 0.0..top)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(7)
        .x_desc("pods in the cluster")
        .y_desc("MiB")
        .x_label_formatter(&|v| format!("{:.0}k", *v / 1000.0))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (name, mib, color) in targets {
        let color = *color;
        chart
            .draw_series(DashedLineSeries::new(
                [(x.0, *mib), (x.1, *mib)],
                6,
                4,
                color.stroke_width(1),
            ))?
            .label(format!("{name}: {mib:.1} MiB"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    for line in series {
        let color = line.color;
        let style = color.stroke_width(2);
        if line.dashed {
            chart.draw_series(DashedLineSeries::new(line.points.clone(), 4, 3, style))?
        } else {
            chart.draw_series(LineSeries::new(line.points.clone(), style))?
        }
        .label(line.name.clone())
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(
            line.points
                .iter()
                .map(|p| Circle::new(*p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
