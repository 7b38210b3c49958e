//! The PNG chart of `make bench`: drawn with plotters from the numbers the
//! suite measured (see `Chart`), never from fixed values.
//!
//! Text goes through plotters' `ab_glyph` feature, which needs a TTF file
//! registered at run time (no fontconfig/freetype libraries); without one the
//! chart is skipped and the caller says so.

use crate::font::{load_font, FONT};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const WIDTH: u32 = 1600;
const HEIGHT: u32 = 1100;
const HEADER_HEIGHT: u32 = 90;
const RATES_HEIGHT: u32 = 540;
const BASELINE_COLOR: RGBColor = RGBColor(160, 160, 160);
const PGCACHE_COLOR: RGBColor = RGBColor(31, 119, 180);
const TARGET_COLOR: RGBColor = RGBColor(214, 39, 40);

/// A throughput figure: pgcache's rate against its baseline's.
pub struct RateFigure {
    /// Short name of the figure, left of its bars.
    pub label: String,
    /// What pgcache is compared with, e.g. "GET".
    pub baseline: String,
    /// Medians of the rounds, per second.
    pub baseline_rate: f64,
    pub pgcache_rate: f64,
    /// pgcache / baseline as the table reports it: the median of the
    /// per-round ratios, not the ratio of the two medians.
    pub ratio: f64,
    /// The target as the table writes it, e.g. ">= 0.95" or "> 1".
    pub target: String,
    /// Where the target's tick goes; NaN for a figure without a target
    /// (no tick, "no target" in its label).
    pub target_ratio: f64,
    /// Whether the table says the target is met.
    pub met: bool,
}

/// One bar of a `BarPanel`.
pub struct Bar {
    /// Under the bar.
    pub name: String,
    pub value: f64,
    /// Above the bar, e.g. "1.21 ms, 1 query".
    pub label: String,
    /// Drawn in pgcache's colour; otherwise a baseline or reference.
    pub pgcache: bool,
}

/// A small panel of bars on a linear axis (a latency or a count).
pub struct BarPanel {
    pub title: String,
    /// The value axis' description, e.g. "ms".
    pub axis: String,
    pub bars: Vec<Bar>,
    /// A target drawn as a dashed line: (description, value).
    pub limit: Option<(String, f64)>,
}

#[derive(Default)]
pub struct Chart {
    pub rates: Vec<RateFigure>,
    pub panels: Vec<BarPanel>,
}

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

/// Renders `chart` into a PNG at `path`; `subtitle` describes the run.
pub fn render(chart: &Chart, subtitle: &str, path: &Path) -> Result<(), String> {
    load_font()?;
    draw(chart, subtitle, path).map_err(|e| format!("drawing {}: {e}", path.display()))
}

/// `157k/s`, `1.28M/s`, `9.5k/s`, `950/s`.
fn rate_text(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M/s", per_s / 1e6)
    } else if per_s >= 1e4 {
        format!("{:.0}k/s", per_s / 1e3)
    } else if per_s >= 1e3 {
        format!("{:.1}k/s", per_s / 1e3)
    } else {
        format!("{per_s:.0}/s")
    }
}

/// Axis tick labels with as many decimals as the axis' range needs.
fn tick_text(v: f64, range: f64) -> String {
    let decimals = match range {
        r if r >= 10.0 => 0,
        r if r >= 1.0 => 1,
        r if r >= 0.1 => 2,
        _ => 3,
    };
    format!("{v:.decimals$}")
}

fn draw(chart: &Chart, subtitle: &str, path: &Path) -> Fallible<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(HEADER_HEIGHT);
    draw_header(&head, subtitle)?;
    if chart.panels.is_empty() {
        draw_rates(&body, &chart.rates)?;
    } else {
        let (top, bottom) = body.split_vertically(RATES_HEIGHT);
        draw_rates(&top, &chart.rates)?;
        let areas = bottom.split_evenly((1, chart.panels.len()));
        for (area, panel) in areas.iter().zip(&chart.panels) {
            draw_panel(area, panel)?;
        }
    }
    root.present()?;
    Ok(())
}

/// Title, the run's description and the legend shared by all panels.
fn draw_header<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, subtitle: &str) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    area.draw(&Text::new(
        "pgcache: make bench (issue 5 figures)",
        (20, 12),
        (FONT, 30).into_font(),
    ))?;
    area.draw(&Text::new(
        subtitle.to_string(),
        (20, 52),
        (FONT, 16).into_font().color(&BLACK.mix(0.7)),
    ))?;
    let text = (FONT, 16)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let (mut x, y) = (WIDTH as i32 - 560, 22);
    for (color, what) in [(BASELINE_COLOR, "baseline"), (PGCACHE_COLOR, "pgcache")] {
        area.draw(&Rectangle::new(
            [(x, y - 7), (x + 18, y + 7)],
            color.filled(),
        ))?;
        area.draw(&Text::new(what, (x + 24, y), text.clone()))?;
        x += 130;
    }
    area.draw(&PathElement::new(
        vec![(x + 9, y - 10), (x + 9, y + 10)],
        TARGET_COLOR.stroke_width(3),
    ))?;
    area.draw(&DashedPathElement::new(
        vec![(x + 16, y), (x + 40, y)],
        6,
        4,
        TARGET_COLOR.stroke_width(2),
    ))?;
    area.draw(&Text::new("target", (x + 48, y), text))?;
    Ok(())
}

/// Horizontal paired bars normalised to the baseline = 1.0, one group per
/// figure (baseline above pgcache), the target ratio as a red tick.
fn draw_rates<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rates: &[RateFigure],
) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    let n = rates.len().max(1);
    // Room right of the longest bar for its label.
    let x_max = rates
        .iter()
        .flat_map(|r| [r.ratio, r.target_ratio, 1.0])
        .fold(0.0, f64::max)
        * 1.5;
    let mut ctx = ChartBuilder::on(area)
        .caption(
            "Throughput relative to the baseline (baseline = 1.0; higher is better)",
            (FONT, 22),
        )
        .margin(15)
        .margin_right(30)
        .x_label_area_size(50)
        .y_label_area_size(420)
        // Group g spans y in [g, g + 1); rates[0] is the top group.
        .build_cartesian_2d(0.0..x_max, 0.0..n as f64)?;
    let ticks = |v: &f64| tick_text(*v, x_max);
    ctx.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_max_light_lines(2)
        .x_label_formatter(&ticks)
        .label_style((FONT, 15))
        .x_desc("pgcache / baseline (median of the per-round ratios)")
        .axis_desc_style((FONT, 16))
        .draw()?;

    let group = |i: usize| (n - 1 - i) as f64;
    ctx.draw_series(rates.iter().enumerate().flat_map(|(i, r)| {
        let g = group(i);
        [
            Rectangle::new([(0.0, g + 0.52), (1.0, g + 0.88)], BASELINE_COLOR.filled()),
            Rectangle::new(
                [(0.0, g + 0.12), (r.ratio, g + 0.48)],
                PGCACHE_COLOR.filled(),
            ),
        ]
    }))?;
    ctx.draw_series(
        rates
            .iter()
            .enumerate()
            .filter(|(_, r)| r.target_ratio.is_finite())
            .map(|(i, r)| {
                let g = group(i);
                PathElement::new(
                    vec![(r.target_ratio, g + 0.04), (r.target_ratio, g + 0.96)],
                    TARGET_COLOR.stroke_width(3),
                )
            }),
    )?;

    // The figures' names right-aligned left of the axis: plotters' own tick
    // labels would sit at round numbers, not at the groups' centres.
    let name_style = (FONT, 16)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Right, VPos::Center));
    let value_style = (FONT, 15)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, r) in rates.iter().enumerate() {
        let g = group(i);
        let verdict = if r.met { "met" } else { "NOT met" };
        let target = if r.target_ratio.is_finite() {
            format!("target {}: {verdict}", r.target)
        } else {
            "no target".to_string()
        };
        ctx.draw_series([
            EmptyElement::at((0.0, g + 0.5))
                + Text::new(
                    format!("{}  (vs {})", r.label, r.baseline),
                    (-10, 0),
                    name_style.clone(),
                ),
            // labels start right of the bar and of the target tick
            EmptyElement::at((1.0_f64.max(r.target_ratio), g + 0.70))
                + Text::new(
                    format!("{} {}", r.baseline, rate_text(r.baseline_rate)),
                    (8, 0),
                    value_style.clone(),
                ),
            EmptyElement::at((r.ratio.max(r.target_ratio), g + 0.30))
                + Text::new(
                    format!(
                        "{:.2}x: pgcache {}  ({target})",
                        r.ratio,
                        rate_text(r.pgcache_rate),
                    ),
                    (8, 0),
                    value_style
                        .clone()
                        .color(if r.met { &BLACK } else { &TARGET_COLOR }),
                ),
        ])?;
    }
    Ok(())
}

/// Vertical bars on a linear axis, labels above, the target dashed.
fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &BarPanel) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    // Title and target description above the plot, where no bar can
    // collide with them.
    let (head, plot) = area.split_vertically(56);
    let centered = (FONT, 18)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let mid = head.dim_in_pixel().0 as i32 / 2;
    head.draw(&Text::new(panel.title.clone(), (mid, 8), centered))?;
    if let Some((what, _)) = &panel.limit {
        head.draw(&Text::new(
            format!("dashed: {what}"),
            (mid, 32),
            (FONT, 15)
                .into_font()
                .color(&TARGET_COLOR)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }

    let n = panel.bars.len();
    let top = panel
        .bars
        .iter()
        .map(|b| b.value)
        .chain(panel.limit.as_ref().map(|l| l.1))
        .fold(0.0, f64::max);
    // headroom for the tallest bar's label
    let y_max = if top > 0.0 { top * 1.2 } else { 1.0 };
    let mut ctx = ChartBuilder::on(&plot)
        .margin(15)
        .margin_top(5)
        .x_label_area_size(35)
        .y_label_area_size(65)
        // bar i spans x in [i, i + 1)
        .build_cartesian_2d(0.0..n as f64, 0.0..y_max)?;
    let ticks = |v: &f64| tick_text(*v, y_max);
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_max_light_lines(2)
        .y_label_formatter(&ticks)
        .y_desc(panel.axis.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    ctx.draw_series(panel.bars.iter().enumerate().map(|(i, b)| {
        let color = if b.pgcache {
            PGCACHE_COLOR
        } else {
            BASELINE_COLOR
        };
        let x = i as f64;
        Rectangle::new([(x + 0.2, 0.0), (x + 0.8, b.value)], color.filled())
    }))?;
    if let Some((_, v)) = &panel.limit {
        ctx.draw_series([DashedPathElement::new(
            vec![(0.0, *v), (n as f64, *v)],
            8,
            5,
            TARGET_COLOR.stroke_width(2),
        )])?;
    }
    let under = (FONT, 14)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let over = under.pos(Pos::new(HPos::Center, VPos::Bottom));
    ctx.draw_series(panel.bars.iter().enumerate().flat_map(|(i, b)| {
        let x = i as f64 + 0.5;
        [
            EmptyElement::at((x, 0.0)) + Text::new(b.name.clone(), (0, 8), under.clone()),
            EmptyElement::at((x, b.value)) + Text::new(b.label.clone(), (0, -5), over.clone()),
        ]
    }))?;
    Ok(())
}
