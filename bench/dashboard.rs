//! `make dashboard-png`: the Grafana dashboard contrib/grafana/pgcache.json
//! drawn from a real run into contrib/grafana/pgcache.png (no Grafana here).
//!
//! Starts PostgreSQL and Redis through the integration-test harness (the
//! module reaches PostgreSQL through the harness's delaying proxy), runs a
//! scripted workload for `SECONDS` seconds (see `timeline`) and, once a
//! second, evaluates contrib/prometheus/pgcache.lua the way redis_exporter
//! does: the samples are the very `redis_script_values` keys Prometheus
//! would store. The panels, their titles, grid positions, units and legends
//! come from the dashboard's JSON; each query is evaluated over the samples
//! (its shape is one of the dashboard's four: a rate, a ratio of rates, a
//! gauge, or a state encoded from one-hot gauges), so a panel the renderer
//! cannot draw stops the run instead of being left out.

#[path = "../tests/common/mod.rs"]
mod common;
mod font;

use common::*;
use font::{load_font, FONT};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DASHBOARD: &str = "contrib/grafana/pgcache.json";
const SCRIPT: &str = "contrib/prometheus/pgcache.lua";
const OUTPUT: &str = "contrib/grafana/pgcache.png";

/// Length of the run, seconds.
const SECONDS: u64 = 50;
/// Rate window, in samples (Grafana's $__rate_interval is four scrape
/// intervals at least).
const RATE_WINDOW: usize = 4;
/// Hot ids (read most) and all ids of the `users` table.
const HOT: u64 = 300;
const ROWS: u64 = 1000;
/// `max_inflight` of the run: a MULTIREAD of more new keys is refused.
const MAX_INFLIGHT: usize = 64;

// Grafana's dark theme, roughly.
const BACKGROUND: RGBColor = RGBColor(17, 18, 23);
const PANEL: RGBColor = RGBColor(24, 27, 31);
const BORDER: RGBColor = RGBColor(44, 50, 53);
const GRID: RGBColor = RGBColor(40, 44, 49);
const TEXT: RGBColor = RGBColor(204, 204, 220);
const DIM: RGBColor = RGBColor(142, 142, 160);
const EVENT: RGBColor = RGBColor(110, 110, 130);
const PALETTE: [RGBColor; 6] = [
    RGBColor(115, 191, 105),
    RGBColor(242, 204, 12),
    RGBColor(87, 148, 242),
    RGBColor(255, 120, 10),
    RGBColor(242, 73, 92),
    RGBColor(184, 119, 217),
];

const WIDTH: u32 = 1600;
const HEADER: u32 = 96;
/// Pixels per unit of the dashboard's gridPos height.
const GRID_ROW: u32 = 48;

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

/// One evaluation of the script: its keys and values, at `t` seconds.
struct Sample {
    t: f64,
    values: BTreeMap<String, f64>,
}

/// What the workload is doing (read by its threads).
#[derive(Clone, Copy, PartialEq)]
#[repr(u8)]
enum Phase {
    Normal = 0,
    /// Also one PGCACHE.INVALIDATE of a hot key each 100 ms.
    Invalidating = 1,
    /// Also MULTIREADs of more new keys than max_inflight.
    Busy = 2,
    /// Also MULTIREADs of 40 absent rows (fills held by the slow proxy).
    Slow = 3,
}

/// When the run's events start (seconds) and how long they last.
const SLOW_AT: u64 = 12;
const SLOW_FOR: u64 = 6;
const UPDATE_AT: u64 = 22;
const INVALIDATE_FOR: u64 = 6;
const BUSY_AT: u64 = 31;
const BUSY_FOR: u64 = 3;
const DOWN_AT: u64 = 37;
const DOWN_FOR: u64 = 4;
/// Extra delay of each PostgreSQL answer while slow, ms.
const SLOW_MS: u64 = 20;

/// The events of the run, at their second: drawn as dotted lines.
fn timeline() -> Vec<(u64, String)> {
    vec![
        (
            SLOW_AT,
            format!("PostgreSQL +{SLOW_MS} ms per answer ({SLOW_FOR} s)"),
        ),
        (
            UPDATE_AT,
            format!("UPDATE of {HOT} hot rows, then INVALIDATEs ({INVALIDATE_FOR} s)"),
        ),
        (
            BUSY_AT,
            format!("MULTIREADs past max_inflight ({BUSY_FOR} s)"),
        ),
        (DOWN_AT, format!("PostgreSQL down ({DOWN_FOR} s)")),
    ]
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 90% of the reads on the hot ids, the rest on the others; ~100 a second.
fn reader(r: &RedisServer, seed: u64, stop: &AtomicBool, phase: &AtomicU8) {
    let mut c = r.con();
    let mut rng = Rng(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = if rng.below(10) < 9 {
            1 + rng.below(HOT)
        } else {
            HOT + 1 + rng.below(ROWS - HOT)
        };
        // errors (PostgreSQL down) are part of the picture
        let _ = read(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        n += 1;
        if phase.load(Ordering::Relaxed) == Phase::Invalidating as u8 && n.is_multiple_of(10) {
            let id = 1 + rng.below(HOT);
            let _ = invalidate(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// MULTIREADs of absent rows: never cached, so each is a new fill.
fn multireader(r: &RedisServer, stop: &AtomicBool, phase: &AtomicU8) {
    let mut c = r.con();
    let mut next = ROWS + 1;
    let mut batch = |n: u64| {
        let pks: Vec<String> = (next..next + n)
            .map(|id| format!(r#"{{"id":{id}}}"#))
            .collect();
        next += n;
        format!("[{}]", pks.join(","))
    };
    while !stop.load(Ordering::Relaxed) {
        let p = phase.load(Ordering::Relaxed);
        if p == Phase::Busy as u8 {
            let _ = multiread(&mut c, "users", &batch(MAX_INFLIGHT as u64 + 36));
            std::thread::sleep(Duration::from_millis(50));
        } else if p == Phase::Slow as u8 {
            let _ = multiread(&mut c, "users", &batch(40));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Evaluates the script as redis_exporter does: `EVAL <script> 0 0`, a flat
/// list of name/value strings.
fn sample(c: &mut redis::Connection, script: &str, t: f64) -> Option<Sample> {
    let flat: Vec<String> = redis::cmd("EVAL").arg(script).arg(0).arg(0).query(c).ok()?;
    let values = flat
        .chunks(2)
        .filter_map(|p| Some((p[0].clone(), p.get(1)?.parse().ok()?)))
        .collect();
    Some(Sample { t, values })
}

fn run() -> Vec<Sample> {
    let script = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT))
        .expect("read the Lua script");
    let mut pg = watched_pg();
    let proxy = DelayProxy::start(pg.port());
    let mut args = proxy.module_args();
    args.extend(["events", "none", "max_inflight", &MAX_INFLIGHT.to_string()].map(String::from));
    let r = RedisServer::start(&args);
    r.wait_until_ready();
    println!("   servers up; {SECONDS} s of workload, one sample a second");

    let stop = AtomicBool::new(false);
    let phase = AtomicU8::new(Phase::Normal as u8);
    let samples = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for seed in 1..=4u64 {
            let (r, stop, phase) = (&r, &stop, &phase);
            s.spawn(move || reader(r, seed * 0x9e37_79b9_7f4a_7c15, stop, phase));
        }
        s.spawn(|| multireader(&r, &stop, &phase));
        {
            let (samples, r, stop, script) = (&samples, &r, &stop, &script);
            s.spawn(move || {
                let mut c = r.con();
                for i in 0..=SECONDS {
                    let at = start + Duration::from_secs(i);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    let t = start.elapsed().as_secs_f64();
                    if let Some(x) = sample(&mut c, script, t) {
                        samples.lock().unwrap().push(x);
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
        let at = |secs: u64| {
            let when = start + Duration::from_secs(secs);
            std::thread::sleep(when.saturating_duration_since(Instant::now()));
        };
        let set = |p: Phase| phase.store(p as u8, Ordering::Relaxed);
        at(SLOW_AT);
        proxy.set_delay_ms(SLOW_MS);
        set(Phase::Slow);
        at(SLOW_AT + SLOW_FOR);
        proxy.set_delay_ms(0);
        set(Phase::Normal);
        at(UPDATE_AT);
        pg.execute(&format!(
            "UPDATE users SET name = name || '' WHERE id <= {HOT}"
        ));
        set(Phase::Invalidating);
        at(UPDATE_AT + INVALIDATE_FOR);
        set(Phase::Normal);
        at(BUSY_AT);
        set(Phase::Busy);
        at(BUSY_AT + BUSY_FOR);
        set(Phase::Normal);
        at(DOWN_AT);
        pg.stop();
        at(DOWN_AT + DOWN_FOR);
        pg.start();
    });
    let samples = samples.into_inner().unwrap();
    println!("   {} samples", samples.len());
    samples
}

// ---------------------------------------------------------------------------
// the dashboard's queries over the samples

/// The `key="..."` values of a PromQL expression, in order.
fn keys_named(expr: &str) -> Vec<String> {
    expr.split("key=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap_or("").to_string())
        .collect()
}

/// A query of the dashboard, by its shape.
enum Query {
    Rate(String),
    /// rate(a) / (rate(a) + rate(b))
    Ratio(String, String),
    Gauge(String),
    /// sum of (i + 1) * one-hot gauge i
    State(Vec<String>),
}

fn query_of(expr: &str) -> Result<Query, String> {
    let keys = keys_named(expr);
    let rates = expr.matches("rate(").count();
    match (keys.as_slice(), rates) {
        ([a, b, c], 3) if a == b && expr.contains('/') => Ok(Query::Ratio(a.clone(), c.clone())),
        ([k], 1) => Ok(Query::Rate(k.clone())),
        ([k], 0) => Ok(Query::Gauge(k.clone())),
        (ks, 0) if ks.len() > 1 && expr.contains(" * ") => Ok(Query::State(ks.to_vec())),
        _ => Err(format!(
            "the renderer does not know this query's shape: {expr}"
        )),
    }
}

fn value(s: &Sample, key: &str) -> Option<f64> {
    s.values.get(key).copied()
}

/// Per-second rate of `key` over the trailing window ending at sample `i`.
fn rate_at(samples: &[Sample], key: &str, i: usize) -> Option<f64> {
    let j = i.checked_sub(RATE_WINDOW.min(i))?;
    if j == i {
        return None;
    }
    let (a, b) = (&samples[j], &samples[i]);
    let dv = value(b, key)? - value(a, key)?;
    (dv >= 0.0).then(|| dv / (b.t - a.t))
}

/// (t, value) per sample; None where the query has no value.
type Points = Vec<(f64, Option<f64>)>;

fn series(samples: &[Sample], q: &Query) -> Points {
    (0..samples.len())
        .map(|i| {
            let v = match q {
                Query::Rate(k) => rate_at(samples, k, i),
                Query::Ratio(a, b) => {
                    let (ra, rb) = (rate_at(samples, a, i), rate_at(samples, b, i));
                    ra.zip(rb)
                        .and_then(|(x, y)| (x + y > 0.0).then(|| x / (x + y)))
                }
                Query::Gauge(k) => value(&samples[i], k),
                Query::State(ks) => ks
                    .iter()
                    .position(|k| value(&samples[i], k) == Some(1.0))
                    .map(|p| (p + 1) as f64),
            };
            (samples[i].t, v)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// drawing

fn color_named(name: &str, i: usize) -> RGBColor {
    match name {
        "green" => PALETTE[0],
        "yellow" => PALETTE[1],
        "blue" => PALETTE[2],
        "orange" => PALETTE[3],
        "red" => PALETTE[4],
        "purple" => PALETTE[5],
        "text" => DIM,
        _ => PALETTE[i % PALETTE.len()],
    }
}

/// Axis text for a value in the panel's Grafana unit.
fn unit_text(v: f64, unit: &str, top: f64) -> String {
    let d = if top >= 10.0 {
        0
    } else if top >= 1.0 {
        1
    } else {
        2
    };
    match unit {
        "percentunit" => format!("{:.0}%", v * 100.0),
        "ops" => format!("{v:.d$}/s"),
        "µs" if top >= 2000.0 => format!("{:.1} ms", v / 1000.0),
        "µs" => format!("{v:.0} µs"),
        _ => format!("{v:.d$}"),
    }
}

fn gpos(p: &Value, k: &str) -> i32 {
    p["gridPos"][k].as_i64().unwrap_or(0) as i32
}

fn draw(dashboard: &Value, samples: &[Sample], subtitle: &str, path: &Path) -> Fallible<()> {
    let panels = dashboard["panels"].as_array().ok_or("no panels")?;
    let rows = panels
        .iter()
        .map(|p| gpos(p, "y") + gpos(p, "h"))
        .max()
        .unwrap_or(8) as u32;
    let height = HEADER + rows * GRID_ROW + 8;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&BACKGROUND)?;
    let title = dashboard["title"].as_str().unwrap_or("pgcache");
    root.draw(&Text::new(
        format!("{title}  (Grafana dashboard {DASHBOARD}, drawn from a real run)"),
        (16, 12),
        (FONT, 26).into_font().color(&TEXT),
    ))?;
    root.draw(&Text::new(
        subtitle.to_string(),
        (16, 48),
        (FONT, 15).into_font().color(&DIM),
    ))?;
    let events: Vec<String> = timeline()
        .iter()
        .map(|(t, what)| format!("{t} s {what}"))
        .collect();
    root.draw(&Text::new(
        format!("dotted lines: {}", events.join(";  ")),
        (16, 70),
        (FONT, 15).into_font().color(&DIM),
    ))?;
    let col = WIDTH as f64 / 24.0;
    let t_max = samples.last().map_or(1.0, |s| s.t.ceil());
    for p in panels {
        let (x, y, w, h) = (gpos(p, "x"), gpos(p, "y"), gpos(p, "w"), gpos(p, "h"));
        let x0 = (x as f64 * col) as i32 + 4;
        let x1 = ((x + w) as f64 * col) as i32 - 4;
        let y0 = HEADER as i32 + y * GRID_ROW as i32 + 4;
        let y1 = HEADER as i32 + (y + h) * GRID_ROW as i32 - 4;
        let area = root
            .clone()
            .shrink((x0, y0), ((x1 - x0) as u32, (y1 - y0) as u32));
        draw_panel(&area, p, samples, t_max)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Value,
    samples: &[Sample],
    t_max: f64,
) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&PANEL)?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(0, 0), (w as i32 - 1, h as i32 - 1)],
        BORDER.stroke_width(1),
    ))?;
    let title = p["title"].as_str().unwrap_or("");
    area.draw(&Text::new(
        title.to_string(),
        (10, 8),
        (FONT, 17).into_font().color(&TEXT),
    ))?;
    let (_, body) = area.split_vertically(32);
    let targets = p["targets"].as_array().ok_or("a panel without targets")?;
    let queries: Vec<(Query, String)> = targets
        .iter()
        .map(|t| {
            let expr = t["expr"].as_str().unwrap_or("");
            let legend = t["legendFormat"]
                .as_str()
                .unwrap_or("")
                .replace("{{instance}}", "")
                .trim()
                .to_string();
            query_of(expr).map(|q| (q, legend))
        })
        .collect::<Result<_, _>>()?;
    match p["type"].as_str() {
        Some("timeseries") => draw_timeseries(&body, p, samples, &queries, t_max),
        Some("state-timeline") => draw_states(&body, p, samples, &queries, t_max),
        other => Err(format!("{title}: panel type {other:?} is not drawn").into()),
    }
}

fn draw_events<DB: DrawingBackend>(
    ctx: &mut ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    y_top: f64,
) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    for (t, _) in timeline() {
        let t = t as f64;
        ctx.draw_series(std::iter::once(DashedPathElement::new(
            vec![(t, 0.0), (t, y_top)],
            2,
            3,
            EVENT.stroke_width(1),
        )))?;
    }
    Ok(())
}

fn draw_timeseries<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Value,
    samples: &[Sample],
    queries: &[(Query, String)],
    t_max: f64,
) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    let defaults = &p["fieldConfig"]["defaults"];
    let unit = defaults["unit"].as_str().unwrap_or("short");
    // refIds whose lines an override dashes (custom.lineStyle fill "dash")
    let dashed: Vec<&str> = p["fieldConfig"]["overrides"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["matcher"]["id"] == "byFrameRefID")
        .filter(|o| {
            o["properties"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|x| x["id"] == "custom.lineStyle" && x["value"]["fill"] == "dash")
            })
        })
        .filter_map(|o| o["matcher"]["options"].as_str())
        .collect();
    let targets = p["targets"].as_array().ok_or("targets")?;
    let lines: Vec<(Points, &String, bool)> = queries
        .iter()
        .zip(targets)
        .map(|((q, legend), t)| {
            let dash = t["refId"].as_str().is_some_and(|r| dashed.contains(&r));
            (series(samples, q), legend, dash)
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|(s, _, _)| s.iter().filter_map(|(_, v)| *v))
        .fold(0.0, f64::max);
    let y_max = defaults["max"]
        .as_f64()
        .unwrap_or(if top > 0.0 { top * 1.15 } else { 1.0 });
    let mut ctx = ChartBuilder::on(area)
        .margin_left(8)
        .margin_right(16)
        .margin_bottom(4)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    let y_fmt = |v: &f64| unit_text(*v, unit, y_max);
    let x_fmt = |v: &f64| format!("{v:.0} s");
    ctx.configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(BORDER)
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 13).into_font().color(&DIM))
        .draw()?;
    draw_events(&mut ctx, y_max)?;
    for (i, (points, legend, dash)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // a gap where the query has no value
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (t, v) in points {
            match v {
                Some(v) => runs.last_mut().unwrap().push((*t, v.min(y_max))),
                None if !runs.last().unwrap().is_empty() => runs.push(Vec::new()),
                None => {}
            }
        }
        let style = color.stroke_width(2);
        for (j, run) in runs.into_iter().filter(|r| !r.is_empty()).enumerate() {
            let s = if *dash {
                ctx.draw_series(std::iter::once(DashedPathElement::new(run, 8, 6, style)))?
            } else {
                ctx.draw_series(std::iter::once(PathElement::new(run, style)))?
            };
            if j == 0 {
                let dash = *dash;
                s.label(legend.as_str()).legend(move |(x, y)| {
                    let points = vec![(x, y), (x + 18, y)];
                    if dash {
                        DashedPathElement::new(points, 5, 3, color.stroke_width(3)).into_dyn()
                    } else {
                        PathElement::new(points, color.stroke_width(3)).into_dyn()
                    }
                });
            }
        }
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(PANEL.mix(0.85))
        .border_style(BORDER)
        .label_font((FONT, 13).into_font().color(&TEXT))
        .draw()?;
    Ok(())
}

fn draw_states<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Value,
    samples: &[Sample],
    queries: &[(Query, String)],
    t_max: f64,
) -> Fallible<()>
where
    DB::ErrorType: 'static,
{
    // value -> (text, colour), from the panel's value mappings
    let mut names: BTreeMap<i64, (String, RGBColor)> = BTreeMap::new();
    for (i, m) in p["fieldConfig"]["defaults"]["mappings"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for (v, o) in m["options"].as_object().into_iter().flatten() {
            let text = o["text"].as_str().unwrap_or(v).to_string();
            let color = color_named(o["color"].as_str().unwrap_or(""), i);
            names.insert(v.parse().unwrap_or(0), (text, color));
        }
    }
    let (q, _) = queries.first().ok_or("a state panel without a query")?;
    let states = series(samples, q);
    let (plot, legend) = area.split_vertically(area.dim_in_pixel().1 - 50);
    let mut ctx = ChartBuilder::on(&plot)
        .margin_left(8)
        .margin_right(16)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..1.0)?;
    let x_fmt = |v: &f64| format!("{v:.0} s");
    ctx.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(BORDER)
        .x_labels(6)
        .x_label_formatter(&x_fmt)
        .label_style((FONT, 13).into_font().color(&DIM))
        .draw()?;
    // merged runs of one state, as Grafana's mergeValues draws them
    let mut runs: Vec<(f64, f64, Option<i64>)> = Vec::new();
    for (i, (t, v)) in states.iter().enumerate() {
        let end = states.get(i + 1).map_or(t_max, |n| n.0);
        let v = v.map(|v| v as i64);
        match runs.last_mut() {
            Some(last) if last.2 == v => last.1 = end,
            _ => runs.push((*t, end, v)),
        }
    }
    for (a, b, v) in &runs {
        let Some((_, color)) = v.and_then(|v| names.get(&v)) else {
            continue;
        };
        ctx.draw_series(std::iter::once(Rectangle::new(
            [(*a, 0.1), (*b, 0.9)],
            color.mix(0.8).filled(),
        )))?;
    }
    let label = (FONT, 14)
        .into_font()
        .color(&BACKGROUND)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (a, b, v) in &runs {
        let Some((text, _)) = v.and_then(|v| names.get(&v)) else {
            continue;
        };
        // a run's name where it fits (~8 px a character)
        let px = ctx.backend_coord(&(*b, 0.5)).0 - ctx.backend_coord(&(*a, 0.5)).0;
        if px as usize > text.len() * 8 + 8 {
            ctx.draw_series(std::iter::once(
                EmptyElement::at((*a, 0.5)) + Text::new(text.clone(), (5, 0), label.clone()),
            ))?;
        }
    }
    draw_events(&mut ctx, 1.0)?;
    // the legend: every state the panel maps, in as many lines as it takes
    let style = (FONT, 13)
        .into_font()
        .color(&TEXT)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let right = legend.dim_in_pixel().0 as i32 - 10;
    let (mut x, mut y) = (16, 10);
    for (text, color) in names.values() {
        let width = 16 + legend.estimate_text_size(text, &style)?.0 as i32;
        if x + width > right {
            (x, y) = (16, y + 20);
        }
        legend.draw(&Rectangle::new(
            [(x, y - 6), (x + 12, y + 6)],
            color.filled(),
        ))?;
        legend.draw(&Text::new(text.clone(), (x + 16, y), style.clone()))?;
        x += width + 14;
    }
    Ok(())
}

fn main() {
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(DASHBOARD)).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    // Every query must be drawable before the run spends its minute.
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            if let Err(e) = query_of(t["expr"].as_str().unwrap_or("")) {
                panic!("{}: {e}", p["title"]);
            }
        }
    }
    if let Err(e) = load_font() {
        panic!("{e}");
    }
    println!("== dashboard: {DASHBOARD} over a real run into {OUTPUT}");
    let samples = run();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let subtitle = format!(
        "{SECONDS} s, one sample a second of {SCRIPT} (as redis_exporter evaluates it); \
         4 clients reading users (90% of reads on {HOT} hot ids of {ROWS}), max_inflight {MAX_INFLIGHT}; \
         rates over {RATE_WINDOW} s; {nproc} CPUs"
    );
    let out = root.join(OUTPUT);
    if let Err(e) = draw(&dashboard, &samples, &subtitle, &out) {
        panic!("drawing {}: {e}", out.display());
    }
    let size = std::fs::metadata(&out).map_or(0, |m| m.len());
    println!(
        "(written {OUTPUT}, {} KB, in {:.0} s)",
        size / 1024,
        started.elapsed().as_secs_f64()
    );
}
