//! The report as a PNG: one panel per section and unit, a bar per figure
//! (its median) with a whisker from min to max. Text is drawn by
//! `ab_glyph` from a TrueType file read at run time, so no system font
//! library is needed.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::report::{num, Report, Row};

const WIDTH: u32 = 1400;
const ROW_PX: u32 = 26;
const PANEL_EXTRA_PX: u32 = 70;

/// The panels: (title, rows), rows with figures only.
fn panels(report: &Report) -> Vec<(String, Vec<&Row>)> {
    let mut out: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in report.rows.iter().filter(|r| r.stats.is_some()) {
        // A start's phases get their own panel: they are parts, not wholes.
        let part = if r.measure.starts_with("phase:") {
            " phases"
        } else {
            ""
        };
        let title = format!("{}{part} ({})", r.section, r.unit);
        match out.iter_mut().find(|(t, _)| *t == title) {
            Some((_, rows)) => rows.push(r),
            None => out.push((title, vec![r])),
        }
    }
    out
}

pub fn draw(report: &Report, path: &Path, font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("font {}", font.display()))?;
    // The font registry keeps a reference for the process's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a usable TrueType font", font.display()))?;

    let panels = panels(report);
    let heights: Vec<u32> = panels
        .iter()
        .map(|(_, rows)| rows.len() as u32 * ROW_PX + PANEL_EXTRA_PX)
        .collect();
    let title_px = 60;
    let height = title_px + heights.iter().sum::<u32>().max(100);
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let h = &report.header;
    let (top, mut rest) = root.split_vertically(title_px);
    top.draw_text(
        &format!(
            "Cocoon benchmarks, {}: median, min–max of {} runs",
            h.date, h.runs
        ),
        &("sans-serif", 22).into_font().color(&BLACK),
        (10, 8),
    )?;
    top.draw_text(
        &format!("{}, {} cores, {}, {}", h.cpu, h.cores, h.accel, h.qemu),
        &("sans-serif", 15).into_font().color(&BLACK.mix(0.7)),
        (10, 36),
    )?;
    for ((title, rows), ph) in panels.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*ph);
        rest = below;
        let max = rows
            .iter()
            .filter_map(|r| r.stats.map(|s| s.max))
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let n = rows.len();
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .margin_left(20)
            .x_label_area_size(24)
            .build_cartesian_2d(0.0..max * 1.9, -0.6..(n as f64 - 0.4))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_labels(8)
            .x_label_formatter(&|v| num(*v))
            .label_style(("sans-serif", 13))
            .draw()?;
        for (i, r) in rows.iter().enumerate() {
            let Some(s) = r.stats else { continue };
            // Top to bottom in report order.
            let y = (n - 1 - i) as f64;
            let colour = if r.system.starts_with("cocoon") {
                RGBColor(52, 101, 164)
            } else if r.system == "runc" {
                RGBColor(115, 210, 22)
            } else {
                RGBColor(204, 120, 0)
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.35), (s.median, y + 0.35)],
                colour.filled(),
            )))?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(s.min, y), (s.max, y)],
                BLACK.stroke_width(2),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!(
                    "{}: {} — {} ({}–{})",
                    r.system,
                    r.measure.replace('`', ""),
                    num(s.median),
                    num(s.min),
                    num(s.max)
                ),
                (s.max + max * 0.02, y + 0.3),
                ("sans-serif", 13).into_font(),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Header;

    #[test]
    fn draws_a_png() {
        let font = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
        if !font.exists() {
            eprintln!(
                "SKIPPED draws_a_png: no {} (Debian fonts-dejavu-core)",
                font.display()
            );
            return;
        }
        let mut r = Report::new(Header {
            runs: 3,
            ..Default::default()
        });
        r.add(
            "start",
            "`cocoon run -- true`",
            "cocoon q35",
            "ms",
            vec![3000.0, 2900.0, 3300.0],
        );
        r.add(
            "start",
            "raw VM floor",
            "QEMU q35",
            "ms",
            vec![2000.0, 1900.0, 2100.0],
        );
        r.add("start", "ratio", "cocoon q35", "×", vec![1.5]);
        r.add("idle", "CPU", "runc", "s/min", vec![]);
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("c.png");
        draw(&r, &png, font).unwrap();
        let head = std::fs::read(&png).unwrap();
        assert_eq!(&head[1..4], b"PNG");
        assert_eq!(
            panels(&r).len(),
            2,
            "one per section and unit, empty rows left out"
        );
    }
}
