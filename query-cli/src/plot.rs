//! `query-cli plot`: a line chart of one or more sensors' readings with their anomalies marked,
//! as SVG or PNG (by the output's extension).
//!
//! Readings stream through the detector and, inside the window, into [`Columns`]: per pixel
//! column the first, lowest, highest and last reading. The line visits those in time order, so
//! the picture is the one every reading would draw — a one-reading spike is always there — while
//! memory and drawing time depend on the width, not on how many readings there are. The line
//! breaks across gaps the detector found.
//!
//! When the workers' stored verdicts are current for the sensor
//! ([`anomalies::stored_if_current`]) and the sensitivity is theirs, those are the markers and the
//! detector does not run; then columns of an hour or more come from the hourly rollup
//! `measurement_hours` ([`draw_readings`]) — the plot of 10 M readings reads 2,800 rows.
//!
//! The time axis is the readings' extent within the range (`--exact-range`: the range), with
//! ticks at round instants ([`ticks`]); spikes are markers, anomalies with a span shaded bands.
//!
//! Text is drawn with DejaVu Sans from the `dejavu` crate through `plotters`' ab_glyph back end:
//! no system font is needed (CI and containers have none).

use std::path::{Path, PathBuf};
use std::sync::Once;

use chrono::{DateTime, Datelike, Utc};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use sensor_pipeline::anomaly::{Anomaly, Kind};
use sensor_pipeline::config::DatabaseSettings;
use sensor_pipeline::time::Micros;
use uuid::Uuid;

use crate::buckets::{self, Every};
use crate::db::{failed, Databases};
use crate::output::timestamp;
use crate::readings::{parse_uuid, resolve, Sensor};
use crate::{anomalies, range, series, Failure};

/// The picture's layout in pixels. A panel's plot area spans x from `margin + y_labels` to
/// `width - right`.
struct Layout {
    /// The default width of the picture, and its height per sensor panel.
    width: u32,
    panel_height: u32,
    /// The outer margin.
    margin: u32,
    /// The right margin: room for the last time label.
    right: u32,
    /// The bands for the y labels and for the x labels.
    y_labels: u32,
    x_labels: u32,
}
const LAYOUT: Layout = Layout {
    width: 1400,
    panel_height: 380,
    margin: 14,
    right: 60,
    y_labels: 64,
    x_labels: 44,
};

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("sensor").required(true).multiple(true)))]
pub struct PlotArgs {
    /// A sensor's name, as in the mapping (repeatable: one panel each).
    #[arg(long = "sensor-name", value_name = "NAME", group = "sensor")]
    sensor_names: Vec<String>,
    /// A sensor's UUID (repeatable: one panel each, after the named ones).
    #[arg(long = "sensor-uuid", value_name = "UUID", value_parser = parse_uuid, group = "sensor")]
    sensor_uuids: Vec<Uuid>,
    /// First instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    start_timestamp: DateTime<Utc>,
    /// Last instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    end_timestamp: DateTime<Utc>,
    /// The picture to write: FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Width in pixels (default 1400).
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(200..=20_000))]
    width: Option<u32>,
    /// Height in pixels (default 380 per sensor).
    #[arg(long, value_name = "H", value_parser = clap::value_parser!(u32).range(120..=20_000))]
    height: Option<u32>,
    /// As for `anomalies`: divides every detection threshold (default 1).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    sensitivity: f64,
    /// Draw the whole requested range; by default the time axis is the readings' extent within
    /// it (so `--start-timestamp 2000-01-01 --end-timestamp 2100-01-01` shows the data).
    #[arg(long)]
    exact_range: bool,
    /// Draw buckets of this length instead of the readings: a band from each bucket's lowest to
    /// its highest value and a line through the means (`1h`, `1d`, `1w`; as `readings --every`).
    #[arg(long, value_name = "DURATION", value_parser = buckets::every)]
    every: Option<Every>,
    /// With --every: align days and weeks on this zone's midnight (as `readings --timezone`).
    #[arg(long, value_name = "ZONE", requires = "every")]
    timezone: Option<String>,
}

/// The picture format, from the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Picture {
    Svg,
    Png,
}

fn picture(path: &Path) -> Result<Picture, Failure> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Picture::Svg),
        Some("png") => Ok(Picture::Png),
        _ => Err(Failure::Usage(format!(
            "--output {}: the file name must end in .svg or .png",
            path.display()
        ))),
    }
}

/// One sensor's panel: its title, its readings reduced to columns, its anomalies in the window,
/// and the range that was asked for (what an empty panel says it has no readings in).
pub struct Panel {
    pub title: String,
    pub columns: Columns,
    pub anomalies: Vec<Anomaly>,
    pub asked: (Micros, Micros),
    /// With `--every`: what is drawn instead of the columns.
    pub buckets: Option<Buckets>,
}

/// A panel's readings in buckets (`plot --every`).
pub struct Buckets {
    pub every: Every,
    pub all: Vec<buckets::Bucket>,
}

impl Buckets {
    fn readings(&self) -> u64 {
        self.all.iter().map(|b| b.readings.max(0) as u64).sum()
    }

    fn value_range(&self) -> Option<(f64, f64)> {
        self.all
            .iter()
            .map(|b| (b.min, b.max))
            .reduce(|(l, h), (a, b)| (l.min(a), h.max(b)))
    }

    /// Each bucket's start and end (µs): up to the next bucket when that starts within 10 % of
    /// the length (a local day across a DST change is an hour shorter or longer), else the length.
    fn spans(&self) -> Vec<(i64, i64, &buckets::Bucket)> {
        let length = self.every.micros();
        let mut spans = Vec::with_capacity(self.all.len());
        for (i, b) in self.all.iter().enumerate() {
            let start = b.start.timestamp_micros();
            let end = match self.all.get(i + 1) {
                Some(next) if next.start.timestamp_micros() - start <= length + length / 10 => {
                    next.start.timestamp_micros()
                }
                _ => start + length,
            };
            spans.push((start, end, b));
        }
        spans
    }
}

pub async fn run(settings: &DatabaseSettings, args: PlotArgs) -> Result<(), Failure> {
    let format = picture(&args.output)?;
    if args.start_timestamp >= args.end_timestamp {
        return Err(Failure::Usage(format!(
            "--start-timestamp ({}) must be before --end-timestamp ({}) for a plot",
            timestamp(args.start_timestamp),
            timestamp(args.end_timestamp)
        )));
    }
    if !(args.sensitivity.is_finite() && args.sensitivity > 0.0) {
        return Err(Failure::Usage(
            "--sensitivity must be a number above 0".into(),
        ));
    }
    let width = args.width.unwrap_or(LAYOUT.width);
    let sensors: Vec<Sensor> = args
        .sensor_names
        .iter()
        .cloned()
        .map(Sensor::Name)
        .chain(args.sensor_uuids.iter().copied().map(Sensor::Uuid))
        .collect();
    let height = args
        .height
        .unwrap_or(LAYOUT.panel_height * sensors.len().max(1) as u32);
    let dbs = Databases::connect(settings).await?;
    let (start, end) = (args.start_timestamp, args.end_timestamp);
    let asked = (start.timestamp_micros(), end.timestamp_micros());
    let mut uuids = Vec::new();
    for sensor in &sensors {
        uuids.push(resolve(&dbs, sensor).await?);
    }
    // One time axis for every panel: the readings' extent within the range (all sensors'), or
    // the range itself when asked, or when there is nothing in it.
    let mut extent: Option<(Micros, Micros)> = None;
    if !args.exact_range {
        for &uuid in &uuids {
            if let Some((a, b)) = series::extent(&dbs.measurements, uuid, start, end).await? {
                extent = Some(extent.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
            }
        }
    }
    let (s, e) = extent.map_or(asked, |(a, b)| padded(a, b, asked));
    let mut panels = Vec::new();
    for &uuid in &uuids {
        let name = series::name_of(&dbs.mapping, uuid).await?;
        let mut columns = Columns::new(s, e, plot_width(width) as usize);
        // The workers' verdicts when they are current (at the sensitivity they use): then the
        // readings are only drawn, from the hourly rollup where a column spans an hour or more.
        let stored = if args.sensitivity == 1.0 {
            anomalies::stored_if_current(&dbs, uuid, start, end).await?
        } else {
            None
        };
        let anomalies = match stored {
            // With --every, the buckets are drawn instead of the readings.
            Some(found) if args.every.is_some() => found,
            Some(found) => {
                draw_readings(&dbs, uuid, &mut columns).await?;
                found
            }
            None => {
                anomalies::detect(&dbs, uuid, start, end, args.sensitivity, |at, v| {
                    columns.push(at, v)
                })
                .await?
            }
        };
        let buckets = match args.every {
            Some(every) => {
                let query = buckets::Query {
                    sensor: uuid,
                    start: time(s),
                    end: time(e),
                    every,
                    zone: args.timezone.as_deref().unwrap_or("UTC"),
                    page: None,
                };
                let all = buckets::buckets(&dbs.measurements, &query).await?;
                Some(Buckets {
                    every,
                    all: all.all().await?,
                })
            }
            None => None,
        };
        panels.push(Panel {
            title: name.unwrap_or_else(|| uuid.to_string()),
            columns,
            anomalies,
            asked,
            buckets,
        });
    }
    render(&panels, &args.output, format, (width, height)).map_err(|e| {
        Failure::Infrastructure(format!("cannot write {}: {e}", args.output.display()))
    })
}

use sensor_pipeline::time::instant as time;

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = sensor_pipeline::time::HOUR_MICROS;
const DAY: i64 = sensor_pipeline::time::DAY_MICROS;

/// The axis around readings from `first` to `last`: 2 % of their span (at least a minute) on
/// each side, within the range asked for.
fn padded(first: Micros, last: Micros, asked: (Micros, Micros)) -> (Micros, Micros) {
    let pad = ((last - first) / 50).max(MINUTE);
    ((first - pad).max(asked.0), (last + pad).min(asked.1))
}

/// A distance between ticks: a fixed length, or calendar months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Fixed(i64),
    Months(i32),
}

/// The steps ticks may take, finest first.
const STEPS: [Step; 20] = [
    Step::Fixed(MINUTE),
    Step::Fixed(5 * MINUTE),
    Step::Fixed(15 * MINUTE),
    Step::Fixed(30 * MINUTE),
    Step::Fixed(HOUR),
    Step::Fixed(2 * HOUR),
    Step::Fixed(3 * HOUR),
    Step::Fixed(6 * HOUR),
    Step::Fixed(12 * HOUR),
    Step::Fixed(DAY),
    Step::Fixed(2 * DAY),
    Step::Fixed(7 * DAY),
    Step::Fixed(14 * DAY),
    Step::Months(1),
    Step::Months(3),
    Step::Months(6),
    Step::Months(12),
    Step::Months(24),
    Step::Months(60),
    Step::Months(120),
];

/// 1970-01-05T00:00:00Z, a Monday: weeks start there.
const MONDAY: i64 = 4 * DAY;

/// Round instants (UTC) inside `[start, end]` — whole minutes, hours, days, Mondays, firsts of
/// months, years — at the finest step that gives at most `most` of them, leaving out any within
/// 3 % of the span of either edge (its label would be cut there); and the step.
fn ticks(start: Micros, end: Micros, most: usize) -> (Vec<i64>, Step) {
    let margin = (end - start) * 3 / 100;
    let (low, high) = (start + margin, end - margin);
    let mut last = (Vec::new(), STEPS[STEPS.len() - 1]);
    for step in STEPS {
        let points: Vec<i64> = match step {
            Step::Fixed(length) => {
                let origin = if length == 7 * DAY || length == 14 * DAY {
                    MONDAY
                } else {
                    0
                };
                let first = origin + (low - origin).div_euclid(length) * length;
                let first = if first < low { first + length } else { first };
                if (high - first) / length >= most as i64 {
                    continue;
                }
                (0..)
                    .map(|i| first + i * length)
                    .take_while(|&t| t <= high)
                    .collect()
            }
            Step::Months(months) => {
                let Some(from) = DateTime::from_timestamp_micros(low) else {
                    continue;
                };
                let mut index = from.year() * 12 + from.month0() as i32;
                index = index.div_euclid(months) * months;
                let mut out = Vec::new();
                loop {
                    let at = month_start(index);
                    if at > high || out.len() > most {
                        break;
                    }
                    if at >= low {
                        out.push(at);
                    }
                    index += months;
                }
                if out.len() > most {
                    continue;
                }
                out
            }
        };
        last = (points, step);
        break;
    }
    last
}

/// The first instant of month `index` (year × 12 + month from 0), in microseconds.
fn month_start(index: i32) -> i64 {
    chrono::NaiveDate::from_ymd_opt(index.div_euclid(12), index.rem_euclid(12) as u32 + 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(i64::MAX, |t| t.and_utc().timestamp_micros())
}

/// A tick's label, as fine as its step: `Dec 14 06:00`, `Dec 14`, `2014-03`, `2014`.
fn tick_label(us: i64, step: Step) -> String {
    let t = DateTime::from_timestamp_micros(us).unwrap_or_default();
    let format = match step {
        Step::Fixed(length) if length < DAY => "%b %d %H:%M",
        Step::Fixed(_) => "%b %d",
        Step::Months(months) if months < 12 => "%Y-%m",
        Step::Months(_) => "%Y",
    };
    t.format(format).to_string()
}

/// The time axis' description: UTC, and the years when the labels do not say them.
fn time_description(start: Micros, end: Micros, step: Step) -> String {
    if matches!(step, Step::Months(_)) {
        return "time (UTC)".into();
    }
    let year = |us: i64| {
        DateTime::from_timestamp_micros(us)
            .unwrap_or_default()
            .year()
    };
    match (year(start), year(end)) {
        (a, b) if a == b => format!("time (UTC), {a}"),
        (a, b) => format!("time (UTC), {a}–{b}"),
    }
}

/// Fills `columns` with `uuid`'s readings: where a column spans an hour or more, whole hours come
/// from the rollup `measurement_hours` (their low and high, at the hour's middle: at most half an
/// hour off, less than a column) and only the partial hours at the edges, and any hour not yet
/// exact, from the readings.
async fn draw_readings(dbs: &Databases, uuid: Uuid, columns: &mut Columns) -> Result<(), Failure> {
    let client = &dbs.measurements;
    let (start, end) = (columns.start, columns.end);
    let time = |us: i64| DateTime::<Utc>::from_timestamp_micros(us).expect("a plotted instant");
    let first_hour = start.div_euclid(HOUR) * HOUR + if start % HOUR == 0 { 0 } else { HOUR };
    let after_hours = (end + 1).div_euclid(HOUR) * HOUR;
    let column = (end - start) / columns.buckets.len().max(1) as i64;
    if column < HOUR || after_hours <= first_hour {
        series::each_reading(client, uuid, time(start), time(end), |at, v| {
            columns.push(at, v)
        })
        .await?;
        return Ok(());
    }
    series::each_reading(client, uuid, time(start), time(first_hour - 1), |at, v| {
        columns.push(at, v)
    })
    .await?;
    let rows = client
        .query(
            "SELECT hour, readings, low, high, exact FROM measurement_hours
             WHERE sensor_uuid = $1 AND hour >= $2 AND hour < $3 ORDER BY hour",
            &[&uuid, &time(first_hour), &time(after_hours)],
        )
        .await
        .map_err(failed("measurement"))?;
    for row in rows {
        let hour = row.get::<_, DateTime<Utc>>(0).timestamp_micros();
        if row.get::<_, bool>(4) {
            columns.push_summary(hour + HOUR / 2, row.get(2), row.get(3), row.get(1));
        } else {
            series::each_reading(client, uuid, time(hour), time(hour + HOUR - 1), |at, v| {
                columns.push(at, v)
            })
            .await?;
        }
    }
    series::each_reading(client, uuid, time(after_hours), time(end), |at, v| {
        columns.push(at, v)
    })
    .await?;
    Ok(())
}

fn plot_width(width: u32) -> u32 {
    width
        .saturating_sub(LAYOUT.margin + LAYOUT.right + LAYOUT.y_labels)
        .max(1)
}

/// The x pixel (in the whole picture) at which instant `at` is drawn in a `width`-wide picture
/// of `[start, end]`.
#[cfg(test)]
fn x_pixel(width: u32, start: Micros, end: Micros, at: Micros) -> f64 {
    let left = (LAYOUT.margin + LAYOUT.y_labels) as f64;
    left + (at - start) as f64 / (end - start) as f64 * plot_width(width) as f64
}

/// Readings reduced to pixel columns: per column the first, lowest, highest and last reading.
pub struct Columns {
    start: Micros,
    end: Micros,
    buckets: Vec<Bucket>,
    readings: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    n: u32,
    first: (Micros, f64),
    low: (Micros, f64),
    high: (Micros, f64),
    last: (Micros, f64),
}

impl Columns {
    pub fn new(start: Micros, end: Micros, columns: usize) -> Self {
        Self {
            start,
            end: end.max(start + 1),
            buckets: vec![Bucket::default(); columns.max(1)],
            readings: 0,
        }
    }

    /// Adds a reading (in time order) inside `[start, end]`; others are ignored.
    pub fn push(&mut self, at: Micros, value: f64) {
        if at < self.start || at > self.end || !value.is_finite() {
            return;
        }
        let n = self.buckets.len();
        let i =
            ((at - self.start) as i128 * n as i128 / (self.end - self.start + 1) as i128) as usize;
        let b = &mut self.buckets[i.min(n - 1)];
        if b.n == 0 {
            *b = Bucket {
                n: 1,
                first: (at, value),
                low: (at, value),
                high: (at, value),
                last: (at, value),
            };
        } else {
            b.n += 1;
            b.last = (at, value);
            if value < b.low.1 {
                b.low = (at, value);
            }
            if value > b.high.1 {
                b.high = (at, value);
            }
        }
        self.readings += 1;
    }

    /// Adds `readings` readings summarised by their `low` and `high`, drawn at `at` (in time
    /// order with the other pushes).
    pub fn push_summary(&mut self, at: Micros, low: f64, high: f64, readings: i64) {
        let before = self.readings;
        self.push(at, low);
        self.push(at, high);
        if self.readings > before {
            self.readings = before + readings.max(0) as u64;
        }
    }

    /// The points the line visits, in time order (at most four per column).
    pub fn points(&self) -> Vec<(Micros, f64)> {
        let mut points = Vec::new();
        for b in self.buckets.iter().filter(|b| b.n > 0) {
            let (a, c) = if b.low.0 <= b.high.0 {
                (b.low, b.high)
            } else {
                (b.high, b.low)
            };
            for p in [b.first, a, c, b.last] {
                if points.last() != Some(&p) {
                    points.push(p);
                }
            }
        }
        points
    }

    /// The lowest and highest value, if there are readings.
    pub fn value_range(&self) -> Option<(f64, f64)> {
        self.buckets
            .iter()
            .filter(|b| b.n > 0)
            .map(|b| (b.low.1, b.high.1))
            .reduce(|(l, h), (a, b)| (l.min(a), h.max(b)))
    }

    pub fn readings(&self) -> u64 {
        self.readings
    }
}

/// Colours per kind (a colour-blind-safe set), and the line's.
fn colour(kind: Kind) -> RGBColor {
    match kind {
        Kind::Spike => RGBColor(213, 36, 36),
        Kind::LevelShift => RGBColor(230, 130, 0),
        Kind::Stuck => RGBColor(136, 64, 170),
        Kind::Gap => RGBColor(90, 90, 90),
    }
}
const LINE: RGBColor = RGBColor(31, 100, 170);
/// The opacity of a span's band, of its legend swatch, and a spike marker's radius.
const BAND: f64 = 0.2;
const SWATCH: f64 = 0.45;
const MARKER: u32 = 5;
/// The opacity of the band of buckets' lowest to highest values (`--every`), in the chart and
/// its legend.
const RANGE: f64 = 0.3;

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate; failure is not possible.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws `panels` one above the other into `path`.
fn render(panels: &[Panel], path: &Path, format: Picture, size: (u32, u32)) -> Result<(), String> {
    register_font();
    match format {
        Picture::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, panels)?;
            root.present().map_err(|e| e.to_string())
        }
        Picture::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, panels)?;
            root.present().map_err(|e| e.to_string())
        }
    }
}

/// Draws into an RGB buffer (what the PNG holds), for tests.
#[cfg(test)]
fn render_rgb(panels: &[Panel], size: (u32, u32)) -> Vec<u8> {
    register_font();
    let mut buffer = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, size).into_drawing_area();
        draw(&root, panels).unwrap();
        root.present().unwrap();
    }
    buffer
}

/// A value axis label: at most four significant digits, thousands and up with a suffix (k, M, G,
/// T), tiny ones in scientific notation — `60M`, not `60000000.0`.
fn value_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && a < 1e-3 {
        return format!("{v:.2e}");
    }
    let (scaled, suffix) = [
        (1e12, 1e12, "T"),
        (1e9, 1e9, "G"),
        (1e6, 1e6, "M"),
        (1e4, 1e3, "k"),
    ]
    .into_iter()
    .find(|(from, ..)| a >= *from)
    .map_or((v, ""), |(_, unit, suffix)| (v / unit, suffix));
    let digits = 3usize.saturating_sub(scaled.abs().max(1.0).log10().floor() as usize);
    let text = format!("{scaled:.digits$}");
    let text = match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.'),
        false => &text,
    };
    let text = if text == "-0" { "0" } else { text };
    format!("{text}{suffix}")
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, panels: &[Panel]) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        let (start, end) = (panel.columns.start, panel.columns.end);
        let (readings, range) = match &panel.buckets {
            Some(b) => (b.readings(), b.value_range()),
            None => (panel.columns.readings(), panel.columns.value_range()),
        };
        let (mut low, mut high) = range.unwrap_or((0.0, 1.0));
        for v in panel.anomalies.iter().filter_map(|a| a.value) {
            low = low.min(v);
            high = high.max(v);
        }
        let pad = if high > low { (high - low) * 0.06 } else { 1.0 };
        // Room at the top for the legend, so it does not hide readings.
        let (low, high) = (low - pad, high + 4.0 * pad);
        let count = panel.anomalies.len();
        let title = format!(
            "{} — {} readings, {} {}",
            panel.title,
            readings,
            count,
            if count == 1 { "anomaly" } else { "anomalies" }
        );
        let most = (area.dim_in_pixel().0 / 150).max(2) as usize;
        let (points, step) = ticks(start, end, most);
        let labels = points.len();
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(LAYOUT.margin)
            .margin_right(LAYOUT.right)
            .x_label_area_size(LAYOUT.x_labels)
            .y_label_area_size(LAYOUT.y_labels)
            .build_cartesian_2d((start..end).with_key_points(points), low..high)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(labels)
            .y_labels(6)
            .x_label_formatter(&|x| tick_label(*x, step))
            .y_label_formatter(&|v| value_label(*v))
            .x_desc(time_description(start, end, step))
            .y_desc("value")
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .light_line_style(RGBColor(242, 242, 242))
            .bold_line_style(RGBColor(222, 222, 222))
            .draw()
            .map_err(err)?;

        // Anomalies with a span first, under the line: a shaded band from their first to their
        // last reading (at least three pixels wide, so a short one shows), one legend entry per
        // kind, its swatch the band's colour.
        let narrowest = (end - start) * 3 / plot_width(area.dim_in_pixel().0).max(1) as i64;
        for kind in [Kind::LevelShift, Kind::Stuck, Kind::Gap] {
            let bands: Vec<Rectangle<(Micros, f64)>> = panel
                .anomalies
                .iter()
                .filter(|a| a.kind == kind)
                .map(|a| {
                    let right = a.end.max(a.start + narrowest);
                    let c = colour(kind).mix(BAND);
                    Rectangle::new([(a.start, low), (right, high)], c.filled())
                })
                .collect();
            if bands.is_empty() {
                continue;
            }
            let c = colour(kind);
            chart
                .draw_series(bands)
                .map_err(err)?
                .label(kind.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x + 2, y - 6), (x + 14, y + 6)], c.mix(SWATCH).filled())
                });
        }
        if readings == 0 {
            let note = format!(
                "no readings between {} and {}",
                timestamp(DateTime::from_timestamp_micros(panel.asked.0).unwrap_or_default()),
                timestamp(DateTime::from_timestamp_micros(panel.asked.1).unwrap_or_default())
            );
            let style = TextStyle::from(("sans-serif", 16).into_font())
                .color(&RGBColor(90, 90, 90))
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .draw_series(std::iter::once(Text::new(
                    note,
                    (start + (end - start) / 2, (low + high) / 2.0),
                    style,
                )))
                .map_err(err)?;
        }
        // With --every: a band from each bucket's lowest to its highest value, and a line
        // through the means at the buckets' middles, broken where a bucket is missing.
        if let Some(buckets) = &panel.buckets {
            let spans = buckets.spans();
            let every = buckets.every;
            chart
                .draw_series(spans.iter().map(|&(s, e, b)| {
                    Rectangle::new([(s, b.min), (e, b.max)], LINE.mix(RANGE).filled())
                }))
                .map_err(err)?
                .label(format!("lowest–highest per {every}"))
                .legend(|(x, y)| {
                    Rectangle::new([(x + 2, y - 6), (x + 14, y + 6)], LINE.mix(RANGE).filled())
                });
            let mut means: Vec<Vec<(Micros, f64)>> = vec![Vec::new()];
            for (i, &(s, e, b)) in spans.iter().enumerate() {
                if i > 0 && spans[i - 1].1 != s {
                    means.push(Vec::new());
                }
                let mean = (s + (e - s) / 2, b.mean);
                means.last_mut().expect("one segment").push(mean);
            }
            for (i, segment) in means.into_iter().enumerate() {
                let series = chart
                    .draw_series(LineSeries::new(segment, LINE.stroke_width(2)))
                    .map_err(err)?;
                if i == 0 {
                    series.label(format!("mean per {every}")).legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], LINE.stroke_width(2))
                    });
                }
            }
        }
        // The line, broken across gaps.
        let gaps: Vec<(Micros, Micros)> = panel
            .anomalies
            .iter()
            .filter(|a| a.kind == Kind::Gap)
            .map(|a| (a.start, a.end))
            .collect();
        let points = match panel.buckets {
            Some(_) => Vec::new(),
            None => panel.columns.points(),
        };
        let mut segments: Vec<Vec<(Micros, f64)>> = vec![Vec::new()];
        for (i, &p) in points.iter().enumerate() {
            if i > 0 {
                let previous = points[i - 1].0;
                if gaps.iter().any(|&(s, e)| previous <= s && p.0 >= e) {
                    segments.push(Vec::new());
                }
            }
            segments.last_mut().expect("one segment").push(p);
        }
        for (i, segment) in segments.into_iter().enumerate() {
            if segment.is_empty() {
                continue;
            }
            let series = chart
                .draw_series(LineSeries::new(segment, LINE.stroke_width(1)))
                .map_err(err)?;
            if i == 0 {
                series.label("readings").legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], LINE.stroke_width(2))
                });
            }
        }
        // Spikes: a marker on the most extreme reading; the legend shows the same marker.
        let spikes: Vec<(Micros, f64)> = panel
            .anomalies
            .iter()
            .filter(|a| a.kind == Kind::Spike)
            .map(|a| (a.start, a.value.unwrap_or(low + pad / 2.0)))
            .collect();
        if !spikes.is_empty() {
            let c = colour(Kind::Spike);
            chart
                .draw_series(
                    spikes
                        .into_iter()
                        .map(|p| Circle::new(p, MARKER, c.filled())),
                )
                .map_err(err)?
                .label(Kind::Spike.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), MARKER - 1, c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(190, 190, 190))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn value_labels_are_short() {
        let labels: Vec<String> = [
            0.0,
            20.0,
            -5.5,
            0.25,
            1234.5,
            9999.0,
            20_000.0,
            45_000_000.0,
            60_000_000.0,
            -2.5e9,
            1.25e13,
            0.000_012_5,
            1e-12,
        ]
        .into_iter()
        .map(value_label)
        .collect();
        assert_eq!(
            labels,
            [
                "0", "20", "-5.5", "0.25", "1234", "9999", "20k", "45M", "60M", "-2.5G", "12.5T",
                "1.25e-5", "1.00e-12"
            ]
        );
    }

    #[test]
    fn columns_keep_every_extreme_in_time_order() {
        let mut c = Columns::new(0, 99, 10);
        for t in 0..100 {
            c.push(t, if t == 37 { 50.0 } else { (t % 3) as f64 });
        }
        c.push(100, 1e9); // outside
        let points = c.points();
        assert!(points.contains(&(37, 50.0)));
        assert!(points.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(points.len() <= 40);
        assert_eq!(c.value_range(), Some((0.0, 50.0)));
        assert_eq!(c.readings(), 100);
    }

    #[test]
    fn a_spike_marker_is_drawn_at_its_time() {
        let (start, end) = (0, 100 * HOUR);
        let mut columns = Columns::new(start, end, plot_width(800) as usize);
        for h in 0..=100 {
            columns.push(h * HOUR, if h == 70 { 40.0 } else { (h % 5) as f64 });
        }
        let spike = Anomaly {
            kind: Kind::Spike,
            start: 70 * HOUR,
            end: 70 * HOUR,
            value: Some(40.0),
            expected: Some(2.0),
            score: 9.0,
        };
        let (w, h) = (800, 300);
        let rgb = render_rgb(
            &[Panel {
                title: "t".into(),
                columns,
                anomalies: vec![spike],
                asked: (start, end),
                buckets: None,
            }],
            (w, h),
        );
        let red = colour(Kind::Spike);
        let xs: Vec<u32> = (0..w * h)
            .filter(|i| rgb[(i * 3) as usize..(i * 3 + 3) as usize] == [red.0, red.1, red.2])
            .map(|i| i % w)
            .filter(|&x| x < w - 200) // not the legend
            .collect();
        assert!(!xs.is_empty(), "no marker pixels");
        let mid = (xs.iter().min().unwrap() + xs.iter().max().unwrap()) as f64 / 2.0;
        let expected = x_pixel(w, start, end, 70 * HOUR);
        assert!(
            (mid - expected).abs() <= 1.5,
            "marker at {mid}, expected {expected}"
        );
    }

    /// Microseconds of a UTC time written as `2013-12-14T05:46:00Z`.
    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    fn labels(start: &str, end: &str, most: usize) -> Vec<String> {
        let (points, step) = ticks(at(start), at(end), most);
        points.into_iter().map(|p| tick_label(p, step)).collect()
    }

    #[test]
    fn ticks_fall_on_round_instants_labelled_for_their_step_and_none_at_an_edge() {
        // Eleven days: every other day at midnight (days counted from 1970-01-01), the first
        // not at the left edge.
        assert_eq!(
            labels("2013-12-14T05:46:00Z", "2013-12-25T19:33:00Z", 8),
            ["Dec 15", "Dec 17", "Dec 19", "Dec 21", "Dec 23", "Dec 25"]
        );
        // Half a day: every two hours.
        assert_eq!(
            labels("2013-12-14T05:46:00Z", "2013-12-14T17:10:00Z", 8),
            [
                "Dec 14 08:00",
                "Dec 14 10:00",
                "Dec 14 12:00",
                "Dec 14 14:00",
                "Dec 14 16:00"
            ]
        );
        // Three months: Mondays, two weeks apart (2014-01-06 was a Monday).
        assert_eq!(
            labels("2014-01-01T00:00:00Z", "2014-04-01T00:00:00Z", 8),
            ["Jan 06", "Jan 20", "Feb 03", "Feb 17", "Mar 03", "Mar 17"]
        );
        // A year and a half: the first of every quarter.
        assert_eq!(
            labels("2013-11-20T00:00:00Z", "2015-05-10T00:00:00Z", 8),
            ["2014-01", "2014-04", "2014-07", "2014-10", "2015-01", "2015-04"]
        );
        // Ninety years: decades.
        assert_eq!(
            labels("2000-01-01T00:00:00Z", "2090-01-01T00:00:00Z", 8),
            ["2010", "2020", "2030", "2040", "2050", "2060", "2070", "2080"]
        );
        // An edge on a round instant gets no label (it would be cut).
        let (points, _) = ticks(at("2013-12-14T00:00:00Z"), at("2013-12-21T00:00:00Z"), 8);
        assert_eq!(points.first(), Some(&at("2013-12-15T00:00:00Z")));
        assert_eq!(points.last(), Some(&at("2013-12-20T00:00:00Z")));
    }

    #[test]
    fn the_axis_is_the_readings_extent_within_the_range() {
        let asked = (at("2000-01-01T00:00:00Z"), at("2100-01-01T00:00:00Z"));
        let (first, last) = (at("2013-01-01T00:00:00Z"), at("2013-01-11T00:00:00Z"));
        // 2 % of ten days on each side.
        let pad = (last - first) / 50;
        assert_eq!(padded(first, last, asked), (first - pad, last + pad));
        // Never beyond what was asked; at least a minute around a single reading.
        assert_eq!(padded(first, last, (first, last)), (first, last));
        assert_eq!(
            padded(first, first, asked),
            (first - MINUTE, first + MINUTE)
        );
        assert_eq!(
            time_description(first, last, Step::Fixed(DAY)),
            "time (UTC), 2013"
        );
        assert_eq!(
            time_description(
                at("2013-12-20T00:00:00Z"),
                at("2014-01-10T00:00:00Z"),
                Step::Fixed(DAY)
            ),
            "time (UTC), 2013–2014"
        );
    }

    #[test]
    fn the_extension_chooses_the_format() {
        assert_eq!(picture(Path::new("a.SVG")).unwrap(), Picture::Svg);
        assert_eq!(picture(Path::new("a/b.png")).unwrap(), Picture::Png);
        assert!(picture(Path::new("a.jpg")).is_err());
    }
}
