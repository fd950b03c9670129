//! A suite's plots, PNG files drawn with `plotters`' bitmap backend. Text
//! goes through `ab_glyph` with a font file read at run time (DejaVu Sans
//! from Debian's `fonts-dejavu-core`, or the file [`FONT_ENV`] names), so
//! no fontconfig or freetype is needed.
//!
//! - `<suite>-<profile>-modes.png`: per profile, at the suite's most common
//!   RAM size, link and idle time: median link MiB and median total time
//!   per mode, as horizontal bars.
//! - `<suite>-<profile>-sizes.png`: per profile with more than one RAM
//!   size: median total time and median downtime against RAM, one line per
//!   mode.
//! - `<suite>-bytes-vs-held.png`: link MiB against held MiB of every
//!   measured run, one colour per mode, with the line y = x.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::load::{self, mib, GroupKey, Suite};
use super::{plot_link, DEFAULT_FONT, FONT_ENV};
use crate::record::{Link, Mode, Profile};

type DrawResult = Result<(), Box<dyn Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// The font family every text of the plots uses.
const FAMILY: &str = "sans-serif";

/// Reads and registers the plots' font, once.
fn ensure_font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FONT));
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "the plots' font {}: {e} (install Debian's package fonts-dejavu-core, \
                 or name a TrueType font file in {FONT_ENV})",
                path.display()
            )
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("the plots' font {}: not a TrueType font", path.display()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A mode's colour, the same in every plot (Okabe–Ito's palette).
fn mode_color(mode: Mode) -> RGBColor {
    match mode {
        Mode::FreehintHints => RGBColor(0, 158, 115),
        Mode::FreehintHintsWait => RGBColor(0, 90, 60),
        Mode::FreehintHintsInsecure => RGBColor(120, 200, 170),
        Mode::FreehintNohints => RGBColor(86, 180, 233),
        Mode::FreehintPostcopy => RGBColor(240, 228, 66),
        Mode::FreehintPostcopyInsecure => RGBColor(250, 240, 150),
        Mode::FreehintHybrid => RGBColor(0, 0, 0),
        Mode::FreehintAgent => RGBColor(150, 60, 150),
        Mode::FreehintAgentDropCaches => RGBColor(90, 30, 90),
        Mode::QemuNative => RGBColor(213, 94, 0),
        Mode::QemuNativeFph => RGBColor(230, 159, 0),
        Mode::QemuNativeFpr => RGBColor(204, 121, 167),
        Mode::QemuMultifdFph => RGBColor(0, 114, 178),
        Mode::QemuPostcopy => RGBColor(90, 90, 90),
    }
}

/// Draws into a PNG, naming the file in the error.
fn draw_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> DrawResult,
) -> anyhow::Result<()> {
    let result = (|| -> DrawResult {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    result.map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// The Markdown of a suite's plots, drawing them into `plots_dir`
/// (`plots_link` is that folder as linked from the report).
pub(crate) fn suite_plots(
    suite: &Suite,
    plots_dir: &Path,
    plots_link: &str,
) -> anyhow::Result<String> {
    let mut md = String::from("### Plots\n\n");
    let measured: Vec<load::Run> = suite.runs().filter(|r| r.measured()).collect();
    if measured.is_empty() {
        md.push_str("No measured run, so no plot.\n\n");
        return Ok(md);
    }
    ensure_font()?;
    let groups = load::group(measured.iter().copied());
    let suite_common = load::most_common(measured.iter().map(|r| setting(&GroupKey::of(r.record))));
    let profiles: Vec<Profile> = Profile::ALL
        .into_iter()
        .filter(|p| suite.report.runs.iter().any(|r| r.profile == *p))
        .collect();
    let embed = |md: &mut String, name: &str, alt: &str| {
        let _ = writeln!(md, "![{alt}]({})\n", plot_link(plots_link, name));
    };

    for &profile in &profiles {
        // (a) per mode, at the suite's most common setting if this profile has it.
        let keys: Vec<&GroupKey> = groups.keys().filter(|k| k.profile == profile).collect();
        let Some(key) = keys
            .iter()
            .find(|k| Some(setting(k)) == suite_common)
            .or_else(|| {
                let common = load::most_common(
                    measured
                        .iter()
                        .filter(|r| r.record.profile == profile)
                        .map(|r| setting(&GroupKey::of(r.record))),
                );
                keys.iter().find(|k| Some(setting(k)) == common)
            })
            .copied()
        else {
            let _ = writeln!(md, "{}: no measured run, so no plot.\n", profile.name());
            continue;
        };
        let mut bytes = Vec::new();
        let mut time = Vec::new();
        for (mode, runs) in groups.get(key).into_iter().flatten() {
            let s = load::summarize(runs);
            if let Some(x) = s.link_mib {
                bytes.push((*mode, x));
            }
            if let Some(x) = s.total_time_ms {
                time.push((*mode, x));
            }
        }
        if bytes.is_empty() && time.is_empty() {
            let _ = writeln!(
                md,
                "{key}: no link bytes or total time measured, so no plot per mode.\n"
            );
        } else {
            let name = format!("{}-{}-modes.png", suite.stem(), profile.name());
            let title = format!("{} — {key}", suite.stem());
            draw_png(&plots_dir.join(&name), (1400, 130 + 48 * 7), |root| {
                let root = root.titled(&title, (FAMILY, 24))?;
                let panels = root.split_evenly((1, 2));
                bar_panel(
                    &panels[0],
                    "bytes over the link (median)",
                    "MiB sent, source → destination",
                    &bytes,
                )?;
                bar_panel(&panels[1], "total time (median)", "total time (ms)", &time)
            })?;
            embed(
                &mut md,
                &name,
                &format!("{key}: median link MiB and total time per mode"),
            );
        }

        // (b) against RAM size, at the setting with the most sizes.
        let mut sizes_at: BTreeMap<(Link, u64), BTreeSet<u64>> = BTreeMap::new();
        for k in &keys {
            sizes_at
                .entry((k.link, k.idle_s))
                .or_default()
                .insert(k.mem_mib);
        }
        let best = sizes_at
            .iter()
            .max_by_key(|((link, idle), sizes)| {
                let common = suite_common.is_some_and(|(_, l, i)| l == *link && i == *idle);
                (sizes.len(), common)
            })
            .map(|(s, sizes)| (*s, sizes.clone()));
        match best {
            Some(((link, idle_s), sizes)) if sizes.len() > 1 => {
                let mut total: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
                let mut down: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
                for &mem_mib in &sizes {
                    let key = GroupKey {
                        profile,
                        mem_mib,
                        link,
                        idle_s,
                    };
                    for (mode, runs) in groups.get(&key).into_iter().flatten() {
                        let s = load::summarize(runs);
                        if let Some(t) = s.total_time_ms {
                            total.entry(*mode).or_default().push((mem_mib as f64, t));
                        }
                        if let Some(d) = s.downtime_ms {
                            down.entry(*mode).or_default().push((mem_mib as f64, d));
                        }
                    }
                }
                let name = format!("{}-{}-sizes.png", suite.stem(), profile.name());
                let what = format!("{}, {}, idle {idle_s} s", profile.name(), link.name());
                let title = format!("{} — {what}", suite.stem());
                let sizes: Vec<f64> = sizes.iter().map(|&s| s as f64).collect();
                let legend: Vec<_> = total
                    .keys()
                    .chain(down.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|&m| (m.name().to_string(), mode_color(m), Marker::Line))
                    .collect();
                draw_png(&plots_dir.join(&name), (1400, 560 + LEGEND_PX), |root| {
                    let root = root.titled(&title, (FAMILY, 24))?;
                    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 - LEGEND_PX);
                    legend_strip(&bottom, &legend)?;
                    let panels = top.split_evenly((1, 2));
                    line_panel(
                        &panels[0],
                        "total time vs RAM (medians)",
                        "total time (ms)",
                        &sizes,
                        &total,
                    )?;
                    line_panel(
                        &panels[1],
                        "downtime vs RAM (medians)",
                        "downtime (ms)",
                        &sizes,
                        &down,
                    )
                })?;
                embed(
                    &mut md,
                    &name,
                    &format!("{what}: median total time and downtime against guest RAM"),
                );
            }
            _ => {
                let _ = writeln!(
                    md,
                    "{}: one RAM size only, so no plot against RAM.\n",
                    profile.name()
                );
            }
        }
    }

    // (c) link bytes vs held memory, every measured run.
    let mut points: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &measured {
        if let (Some(held), Some(bytes)) = (r.record.held_mib, r.record.bytes_link) {
            points
                .entry(r.record.mode)
                .or_default()
                .push((held as f64, mib(bytes)));
        }
    }
    if points.is_empty() {
        md.push_str("No run measured both held memory and link bytes, so no plot of one against the other.\n\n");
    } else {
        let name = format!("{}-bytes-vs-held.png", suite.stem());
        let title = format!(
            "{} — link MiB vs held MiB, every measured run",
            suite.stem()
        );
        let mut legend = vec![("y = x".to_string(), DIAGONAL, Marker::Line)];
        legend.extend(
            points
                .keys()
                .map(|&m| (m.name().to_string(), mode_color(m), Marker::Dot)),
        );
        draw_png(&plots_dir.join(&name), (1000, 760 + LEGEND_PX), |root| {
            let (top, bottom) = root.split_vertically(760);
            legend_strip(&bottom, &legend)?;
            scatter_panel(&top, &title, &points)
        })?;
        embed(
            &mut md,
            &name,
            "link MiB against held MiB of every measured run, with y = x",
        );
    }
    Ok(md)
}

/// What a plot per mode holds fixed besides the profile: (RAM, link, idle).
fn setting(k: &GroupKey) -> (u64, Link, u64) {
    (k.mem_mib, k.link, k.idle_s)
}

/// Horizontal bars, one per mode, first mode on top, each with its value.
fn bar_panel(area: &Area, caption: &str, x_desc: &str, bars: &[(Mode, f64)]) -> DrawResult {
    if bars.is_empty() {
        area.draw_text(
            &format!("{caption}: not measured"),
            &(FAMILY, 18).into_text_style(area),
            (40, 60),
        )?;
        return Ok(());
    }
    let n = bars.len();
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let x_max = if max > 0.0 { max * 1.2 } else { 1.0 };
    // Row i is drawn at y = n - 1 - i: the first mode on top.
    let y = |i: usize| (n - 1 - i) as f64;
    let rows = TicksAxis {
        lo: -0.5,
        hi: n as f64 - 0.5,
        ticks: (0..n).map(|i| i as f64).collect(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(150)
        .build_cartesian_2d(0f64..x_max, rows)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&|v| {
            let row = v.round();
            if row >= 0.0 && (row as usize) < n {
                bars[n - 1 - row as usize].0.name().to_string()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc(x_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (mode, v))| {
        Rectangle::new(
            [(0.0, y(i) - 0.35), (*v, y(i) + 0.35)],
            mode_color(*mode).filled(),
        )
    }))?;
    let value_style =
        TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    chart.draw_series(
        bars.iter()
            .enumerate()
            .map(|(i, (_, v))| Text::new(format!(" {v:.0}"), (*v, y(i)), value_style.clone())),
    )?;
    Ok(())
}

/// A legend in a strip of its own, centred: a line or a dot per entry.
fn legend_strip(area: &Area, entries: &[(String, RGBColor, Marker)]) -> DrawResult {
    let style = TextStyle::from((FAMILY, 16).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let (width, height) = area.dim_in_pixel();
    let mut widths = Vec::new();
    for (text, _, _) in entries {
        widths.push(area.estimate_text_size(text, &style)?.0 as i32 + 34 + 28);
    }
    let mut x = (width as i32 - widths.iter().sum::<i32>()).max(0) / 2;
    let y = height as i32 / 2;
    for ((text, color, marker), w) in entries.iter().zip(widths) {
        match marker {
            Marker::Line => area.draw(&PathElement::new(
                vec![(x, y), (x + 26, y)],
                color.stroke_width(3),
            ))?,
            Marker::Dot => area.draw(&Circle::new((x + 13, y), 5, color.filled()))?,
        }
        area.draw(&Text::new(text.clone(), (x + 34, y), style.clone()))?;
        x += w;
    }
    Ok(())
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Marker {
    Line,
    Dot,
}

/// The colour of the line y = x.
const DIAGONAL: RGBColor = RGBColor(120, 120, 120);

/// The legend's strip under the panels, in pixels.
const LEGEND_PX: u32 = 44;

/// One line per mode against RAM size, with a point at each size measured.
fn line_panel(
    area: &Area,
    caption: &str,
    y_desc: &str,
    sizes: &[f64],
    lines: &BTreeMap<Mode, Vec<(f64, f64)>>,
) -> DrawResult {
    let (lo, hi) = (sizes[0], sizes[sizes.len() - 1]);
    let pad = (hi - lo) * 0.06;
    let y_max = lines
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            TicksAxis {
                lo: lo - pad,
                hi: hi + pad,
                ticks: sizes.to_vec(),
            },
            0f64..y_max,
        )?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("guest RAM (MiB)")
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    if lines.is_empty() {
        return Ok(());
    }
    for (&mode, points) in lines {
        let color = mode_color(mode);
        chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    }
    Ok(())
}

/// A linear axis whose ticks are given: the RAM sizes measured, the rows
/// of a bar chart.
struct TicksAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TicksAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Every run's (held MiB, link MiB), one colour per mode, and y = x.
fn scatter_panel(
    area: &Area,
    caption: &str,
    points: &BTreeMap<Mode, Vec<(f64, f64)>>,
) -> DrawResult {
    let all = points.values().flatten();
    let (x_max, y_max) = all.fold((1.0f64, 1.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let (x_max, y_max) = (x_max * 1.1, y_max * 1.1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("memory the guest held (MiB)")
        .y_desc("sent over the link (MiB)")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    let diagonal = x_max.min(y_max);
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (diagonal, diagonal)],
        DIAGONAL.stroke_width(2),
    ))?;
    for (&mode, pts) in points {
        let color = mode_color(mode);
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    }
    Ok(())
}
