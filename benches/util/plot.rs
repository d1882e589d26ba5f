//! The benchmark's plot (plotters, SVG backend): panels of horizontal grouped bars, one bar
//! per mode, every bar labelled with its value, an x axis with ticks from 0, a dashed line
//! at the reference (1 = istio-iptables), and a caption naming the date, machine and kernel.

use std::path::Path;

use std::ops::Range;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One color per mode, in the modes' order.
pub const COLORS: [RGBColor; 4] = [
    RGBColor(0x9e, 0x9e, 0x9e),
    RGBColor(0xe0, 0x7b, 0x39),
    RGBColor(0x3b, 0x7d, 0xd8),
    RGBColor(0x2a, 0x9d, 0x5c),
];

/// One bar: its length, and what is written after it (its value, and the absolute figure
/// behind a ratio).
pub struct Bar {
    pub value: f64,
    pub note: String,
}

impl Bar {
    /// A ratio bar: `1.16×`, then the note in parentheses if there is one.
    pub fn ratio(value: f64, note: String) -> Bar {
        Bar { value, note }
    }

    fn label(&self) -> String {
        match (self.value.is_finite(), self.note.is_empty()) {
            (false, _) => "–".into(),
            (true, true) => format!("{:.2}×", self.value),
            (true, false) => format!("{:.2}× ({})", self.value, self.note),
        }
    }
}

/// One panel: groups of bars (a label and one bar per mode; a NaN value draws no bar).
pub struct Panel {
    pub title: String,
    pub axis: String,
    pub groups: Vec<(String, Vec<Bar>)>,
}

/// The y axis of a panel: `n` groups of bars stacked from the top, group g spanning
/// [n-g-1, n-g]; its ticks (and labels) are the groups' centers.
struct Groups(usize);

impl Ranged for Groups {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = (limit.1 - limit.0) as f64;
        limit.0 + (value / self.0 as f64 * span).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0).map(|g| g as f64 + 0.5).collect()
    }

    fn range(&self) -> Range<f64> {
        0.0..self.0 as f64
    }
}

impl ValueFormatter<f64> for Groups {
    fn format(value: &f64) -> String {
        format!("{value}")
    }
}

const WIDTH: u32 = 1280;
const BAR: u32 = 13;
const HEADER: u32 = 64;
const FOOTER: u32 = 34;
const FONT: &str = "sans-serif";

fn row_height(row: &[Panel], modes: usize) -> u32 {
    let groups = row.iter().map(|p| p.groups.len()).max().unwrap_or(0) as u32;
    90 + groups * (modes as u32 * BAR + 10)
}

/// Draws `rows` of panels (panels of one row side by side) into an SVG file at `path`.
pub fn draw(
    path: &Path,
    title: &str,
    caption: &str,
    modes: &[&str],
    rows: &[Vec<Panel>],
) -> Result<(), Box<dyn std::error::Error>> {
    let height = HEADER + FOOTER + rows.iter().map(|r| row_height(r, modes.len())).sum::<u32>();
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title,
        (14, 10),
        (FONT, 20).into_font().style(FontStyle::Bold),
    ))?;
    let mut x = 14;
    for (mode, color) in modes.iter().zip(COLORS) {
        root.draw(&Rectangle::new([(x, 42), (x + 14, 54)], color.filled()))?;
        root.draw(&Text::new(*mode, (x + 20, 41), (FONT, 14)))?;
        x += 40 + 9 * mode.len() as i32;
    }
    root.draw(&Text::new(
        caption,
        (14, height as i32 - FOOTER as i32 + 10),
        (FONT, 13).into_font().color(&RGBColor(0x44, 0x44, 0x44)),
    ))?;

    let body = root.margin(HEADER, FOOTER, 0, 0);
    let heights: Vec<u32> = rows.iter().map(|r| row_height(r, modes.len())).collect();
    let mut rest = body;
    for (row, h) in rows.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*h);
        rest = below;
        let widths: Vec<u32> = (1..row.len())
            .map(|i| WIDTH * i as u32 / row.len() as u32)
            .collect();
        for (panel, cell) in row
            .iter()
            .zip(area.split_by_breakpoints(widths, Vec::<u32>::new()))
        {
            draw_panel(&cell, panel, modes.len())?;
        }
    }
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    modes: usize,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let groups = panel.groups.len();
    let bars = || panel.groups.iter().flat_map(|(_, bars)| bars.iter());
    let max = bars()
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let n = groups as f64;
    let label_width = panel
        .groups
        .iter()
        .map(|(l, _)| l.chars().count() as u32 * 7 + 12)
        .max()
        .unwrap_or(40);
    // Room to the right of every bar for its label (about 6.5 px a character at 11 px):
    // the plot's width less the widest label must hold the longest bar.
    let plot_width = area.dim_in_pixel().0 as f64 - label_width as f64 - 40.0;
    let label_px = bars()
        .map(|b| b.label().chars().count() as f64 * 6.5 + 10.0)
        .fold(0.0, f64::max);
    let x_max = max / (1.0 - label_px / plot_width).max(0.3);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 15))
        .margin(10)
        .margin_right(18)
        .x_label_area_size(40)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0f64..x_max, Groups(groups))?;
    let labels: Vec<String> = panel.groups.iter().map(|(l, _)| l.clone()).collect();
    let y_label = move |y: &f64| {
        let g = (n - y - 0.5).round();
        if g >= 0.0 && (n - y - 0.5 - g).abs() < 1e-6 {
            labels.get(g as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(panel.axis.as_str())
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&y_label)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .max_light_lines(0)
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .draw()?;

    // The reference first: bars and their labels go over it.
    chart.draw_series(std::iter::once(DashedPathElement::new(
        vec![(1.0, 0.0), (1.0, n)],
        4,
        3,
        BLACK.stroke_width(1),
    )))?;
    let slot = 0.84 / modes as f64;
    for (g, (_, bars)) in panel.groups.iter().enumerate() {
        let top = n - g as f64 - 0.08;
        for (m, bar) in bars.iter().enumerate() {
            let (y1, y0) = (top - m as f64 * slot, top - (m + 1) as f64 * slot + 0.01);
            let (v, label) = (&bar.value, bar.label());
            if v.is_finite() {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0), (*v, y1)],
                    COLORS[m % COLORS.len()].filled(),
                )))?;
            }
            let at = if v.is_finite() { *v } else { 0.0 };
            chart.draw_series(std::iter::once(
                EmptyElement::at((at, (y0 + y1) / 2.0))
                    + Text::new(
                        label,
                        (4, 0),
                        TextStyle::from((FONT, 11).into_font())
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    ),
            ))?;
        }
    }
    Ok(())
}
