//! `query-cli anomalies` and `query-cli plot` as a user runs them, against real PostgreSQL with
//! readings stored by ingesting objects.

mod common;

use common::{ok, query};
use sensor_pipeline::anomaly::{detect, Anomaly, Kind};
use sensor_pipeline::config::ContractSettings;
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::store::{migrate::migrate, Databases};
use testbed::data::rfc3339_micros as time;
use testbed::TestEnv;

const PUMP: &str = "7d1c6a55-0000-4000-8000-000000000001";
const UNMAPPED: &str = "7d1c6a55-0000-4000-8000-0000000000ff";
/// 2013-01-01T00:00:00Z, and one reading a minute from there.
const T0: i64 = 1_356_998_400_000_000;
const MINUTE: i64 = 60_000_000;
const READINGS: i64 = 8_000;

/// The pump: a level with a little deterministic noise and one spike at reading 6,000.
fn pump() -> Vec<(i64, f64)> {
    (0..READINGS)
        .map(|i| {
            let noise = ((i * 7919) % 1000) as f64 / 5000.0;
            let spike = if i == 6_000 { 20.0 } else { 0.0 };
            (T0 + i * MINUTE, 10.0 + noise + spike)
        })
        .collect()
}

/// The unmapped sensor: the same shape without the spike, and six hours missing from 5,000.
fn unmapped() -> Vec<(i64, f64)> {
    (0..READINGS)
        .filter(|i| !(5_000..5_360).contains(i))
        .map(|i| {
            (
                T0 + i * MINUTE,
                3.0 + ((i * 104_729) % 1000) as f64 / 4000.0,
            )
        })
        .collect()
}

async fn seeded(env: &TestEnv) {
    migrate(&env.database_settings()).await.unwrap();
    let mut readings = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (sensor, series) in [(PUMP, pump()), (UNMAPPED, unmapped())] {
        for (t, v) in series {
            readings.push_str(&format!("{};{sensor};{v}\n", time(t)));
        }
    }
    env.s3
        .put(
            "mapping/sensors.csv",
            format!("sensor_uuid;sensor_name\n{PUMP};pump\n"),
        )
        .await
        .unwrap();
    env.s3.put("timeseries/all.csv", readings).await.unwrap();
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let ingestor = Ingestor::new(env.s3.store().clone(), dbs, ContractSettings::default());
    for key in ["mapping/sensors.csv", "timeseries/all.csv"] {
        assert_eq!(ingestor.ingest(key, None).await.unwrap().rows_rejected, 0);
    }
}

async fn fails(env: &[(String, String)], args: &[&str], code: i32) -> String {
    let out = query(env, args).await;
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{args:?}");
    String::from_utf8_lossy(&out.stderr).trim_end().to_string()
}

/// What SPEC §7 says one JSON line holds, for an anomaly the library finds.
fn spec_line(uuid: &str, name: Option<&str>, a: &Anomaly) -> serde_json::Value {
    serde_json::json!({
        "sensor_uuid": uuid,
        "sensor_name": name,
        "kind": a.kind.as_str(),
        "start": time(a.start),
        "end": time(a.end),
        "value": a.value,
        "expected": a.expected,
        "score": (a.score * 1000.0).round() / 1000.0,
    })
}

/// Each anomaly's kind, start and end.
fn spans(found: &[Anomaly]) -> Vec<(Kind, i64, i64)> {
    found.iter().map(|a| (a.kind, a.start, a.end)).collect()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const WHOLE: [&str; 4] = [
    "--start-timestamp",
    "2013-01-01",
    "--end-timestamp",
    "2013-01-07",
];

#[tokio::test]
async fn anomalies_are_what_the_detector_finds_with_the_spec_fields() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();

    // The library over the same readings: one spike in the pump, one gap in the other sensor.
    let pump_found = detect(pump(), 1.0);
    assert_eq!(
        spans(&pump_found),
        [(Kind::Spike, T0 + 6_000 * MINUTE, T0 + 6_000 * MINUTE)]
    );
    let gap_found = detect(unmapped(), 1.0);
    assert_eq!(
        spans(&gap_found),
        [(Kind::Gap, T0 + 4_999 * MINUTE, T0 + 5_360 * MINUTE)]
    );

    let mut args = vec!["anomalies", "--sensor-name", "pump", "--format", "json"];
    args.extend(WHOLE);
    let raw = ok(&vars, &args).await;
    let lines = json_lines(&raw);
    assert_eq!(lines, [spec_line(PUMP, Some("pump"), &pump_found[0])]);
    // The fields in SPEC §7's order: each key is the quoted text a `:` follows.
    let parts: Vec<&str> = raw.split('"').collect();
    let keys: Vec<&str> = parts
        .windows(2)
        .filter(|w| w[1].starts_with(':'))
        .map(|w| w[0])
        .collect();
    assert_eq!(
        keys.join(","),
        "sensor_uuid,sensor_name,kind,start,end,value,expected,score"
    );
    assert_eq!(
        lines[0]["value"],
        30.0 + ((6_000 * 7919) % 1000) as f64 / 5000.0
    );

    // By UUID, and every sensor: mapped by name first, then the unmapped (name null).
    let mut args = vec!["anomalies", "--sensor-uuid", UNMAPPED, "--format", "json"];
    args.extend(WHOLE);
    let gap_line = spec_line(UNMAPPED, None, &gap_found[0]);
    assert_eq!(
        json_lines(&ok(&vars, &args).await),
        std::slice::from_ref(&gap_line)
    );
    assert_eq!(gap_line["value"], serde_json::Value::Null);
    let mut args = vec!["anomalies", "--all", "--format", "json"];
    args.extend(WHOLE);
    assert_eq!(
        json_lines(&ok(&vars, &args).await),
        [lines[0].clone(), gap_line.clone()]
    );
    args.extend(["--kind", "gap"]);
    assert_eq!(json_lines(&ok(&vars, &args).await), [gap_line]);

    // CSV and the table.
    let mut args = vec!["anomalies", "--sensor-name", "pump", "--format", "csv"];
    args.extend(WHOLE);
    let csv = ok(&vars, &args).await;
    assert_eq!(
        csv.lines().next().unwrap(),
        "sensor_uuid,sensor_name,kind,start,end,value,expected,score"
    );
    assert_eq!(csv.lines().count(), 2);
    let mut args = vec!["anomalies", "--sensor-name", "pump"];
    args.extend(WHOLE);
    let table = ok(&vars, &args).await;
    assert!(table.starts_with("sensor  kind   start"), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("pump    spike  2013-01-05T04:00:00Z"),
        "{table}"
    );

    // A window that starts later finds the same thing: the detector warms up before it.
    // The pump's anomalies as JSON over `[start, end]`.
    let window = |start: &'static str, end: &'static str| {
        [
            "anomalies",
            "--sensor-name",
            "pump",
            "--format",
            "json",
            "--start-timestamp",
            start,
            "--end-timestamp",
            end,
        ]
    };
    let args = window("2013-01-05T03:59:00Z", "2013-01-05T04:00:00Z");
    assert_eq!(json_lines(&ok(&vars, &args).await), lines);
    // A window without it is empty, and a tiny sensitivity hides it.
    let args = window("2013-01-05T04:01:00Z", "2013-01-07");
    assert_eq!(ok(&vars, &args).await, "");
    let mut args = vec![
        "anomalies",
        "--sensor-name",
        "pump",
        "--sensitivity",
        "0.0001",
    ];
    args.extend(WHOLE);
    assert_eq!(
        ok(&vars, &args).await.lines().count(),
        1,
        "the table header only"
    );
}

#[tokio::test]
async fn anomaly_errors_have_the_readings_exit_codes() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    let mut args = vec!["anomalies", "--sensor-name", "nobody"];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 1)
        .await
        .starts_with("error: unknown sensor name \"nobody\""));
    let args = [
        "anomalies",
        "--all",
        "--start-timestamp",
        "2013-02-01",
        "--end-timestamp",
        "2013-01-01",
    ];
    assert!(fails(&vars, &args, 2)
        .await
        .contains("is after --end-timestamp"));
    let mut args = vec!["anomalies", "--all", "--kind", "wobble"];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 2)
        .await
        .contains("unknown anomaly kind \"wobble\""));
    let mut args = vec!["anomalies", "--all", "--sensitivity", "0"];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 2)
        .await
        .contains("is not a number above 0"));
    let mut args = vec!["anomalies", "--all", "--sensor-name", "pump"];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 2).await.contains("cannot be used with"));
    let args = [
        "anomalies",
        "--sensor-name",
        "pump",
        "--start-timestamp",
        "2013-01-01",
    ];
    assert!(fails(&vars, &args, 2).await.contains("--end-timestamp"));
    let mut broken = vars.clone();
    for (k, v) in &mut broken {
        if k.ends_with("DATABASE_URL") {
            *v = "postgres://nobody@127.0.0.1:1/none".into();
        }
    }
    let mut args = vec!["anomalies", "--all"];
    args.extend(WHOLE);
    assert!(fails(&broken, &args, 3)
        .await
        .contains("cannot reach the mapping database"));
}

#[tokio::test]
async fn plots_hold_one_marker_per_anomaly_and_have_the_asked_size() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("two.svg");
    let svg_arg = svg.to_string_lossy().to_string();
    let mut args = vec![
        "plot",
        "--sensor-name",
        "pump",
        "--sensor-uuid",
        UNMAPPED,
        "--output",
        &svg_arg,
    ];
    args.extend(WHOLE);
    assert_eq!(ok(&vars, &args).await, "");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..100]);
    assert!(text.trim_end().ends_with("</svg>"));
    // A marker on the spike (red), a shaded band over the gap (grey); the legends show the same
    // symbols (a smaller marker, a swatch of the band).
    assert_eq!(fills(&text, "<circle", "r=\"5\""), ["#D52424"]);
    assert_eq!(fills(&text, "<rect", "opacity=\"0.2\""), ["#5A5A5A"]);
    assert_eq!(fills(&text, "<circle", "r=\"4\""), ["#D52424"]);
    assert_eq!(fills(&text, "<rect", "opacity=\"0.45\""), ["#5A5A5A"]);
    // Text elements hold their text on a line of its own.
    assert!(
        text.contains(">\npump — 8000 readings, 1 anomaly\n</text>"),
        "title"
    );
    assert!(text.contains(&format!(
        ">\n{UNMAPPED} — 7640 readings, 1 anomaly\n</text>"
    )));
    assert!(text.contains(">\ntime (UTC), 2013\n</text>"));

    let png = dir.path().join("pump.png");
    let png_arg = png.to_string_lossy().to_string();
    let mut args = vec![
        "plot",
        "--sensor-name",
        "pump",
        "--output",
        &png_arg,
        "--width",
        "900",
        "--height",
        "333",
    ];
    args.extend(WHOLE);
    ok(&vars, &args).await;
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!((be32(16), be32(20)), (900, 333));

    let bad = dir.path().join("pump.jpg");
    let mut args = vec![
        "plot",
        "--sensor-name",
        "pump",
        "--output",
        bad.to_str().unwrap(),
    ];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 2)
        .await
        .contains("must end in .svg or .png"));
    assert!(!bad.exists());
}

#[tokio::test]
async fn stored_anomalies_are_what_the_workers_found_page_by_page() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    // What a worker does after the commit: detect the work the ingestion queued.
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let settings = sensor_pipeline::config::AnomalySettings::from_env(
        &sensor_pipeline::config::Env::from_map(Vec::<(String, String)>::new()),
    )
    .unwrap();
    let detected = sensor_pipeline::alerts::Alerts::new(dbs, settings)
        .detect_due(None)
        .await
        .unwrap();
    assert_eq!((detected.sensors, detected.spans), (2, 2));

    // Per sensor, the stored anomalies are exactly what the detector finds over the readings.
    for sensor in [["--sensor-name", "pump"], ["--sensor-uuid", UNMAPPED]] {
        let mut computed = vec!["anomalies", "--format", "json"];
        computed.extend(sensor);
        computed.extend(WHOLE);
        let mut stored = computed.clone();
        stored.push("--stored");
        let want = ok(&vars, &computed).await;
        assert!(!want.is_empty());
        assert_eq!(ok(&vars, &stored).await, want, "{sensor:?}");
    }

    // Every sensor in time order, and the same page by page.
    let mut all = vec!["anomalies", "--all", "--stored", "--format", "json"];
    all.extend(WHOLE);
    let every = json_lines(&ok(&vars, &all).await);
    let starts: Vec<&str> = every.iter().map(|l| l["start"].as_str().unwrap()).collect();
    let mut sorted = starts.clone();
    sorted.sort();
    assert_eq!(starts, sorted);
    assert_eq!(
        every.len() as u64,
        detected.opened.len() as u64,
        "every opened anomaly is listed once"
    );
    let mut paged = Vec::new();
    for page in 1..=every.len() + 1 {
        let page = page.to_string();
        let mut args = all.clone();
        args.extend(["--page-size", "1", "--page-number", &page]);
        paged.extend(json_lines(&ok(&vars, &args).await));
    }
    assert_eq!(paged, every);

    let mut spikes = all.clone();
    spikes.extend(["--kind", "spike"]);
    let want: Vec<_> = every
        .iter()
        .filter(|l| l["kind"] == "spike")
        .cloned()
        .collect();
    assert_eq!(json_lines(&ok(&vars, &spikes).await), want);

    let mut args = all.clone();
    args.extend(["--sensitivity", "2"]);
    assert!(fails(&vars, &args, 2).await.contains("cannot be used with"));
    let mut args = vec![
        "anomalies",
        "--all",
        "--page-size",
        "5",
        "--page-number",
        "1",
    ];
    args.extend(WHOLE);
    assert!(fails(&vars, &args, 2).await.contains("--stored"));
}

/// A seeded store and a scratch SVG file for `plot`.
struct Plots {
    env: TestEnv,
    vars: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    svg: String,
}

impl Plots {
    async fn new() -> Self {
        let env = TestEnv::new().await.unwrap();
        seeded(&env).await;
        let vars = env.vars();
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("pump.svg").to_string_lossy().to_string();
        Self {
            env,
            vars,
            _dir: dir,
            svg,
        }
    }

    /// `query-cli plot --sensor-name pump --output FILE.svg ARGS…`: the SVG it wrote.
    async fn pump(&self, args: &[&str]) -> String {
        let mut all = vec!["plot", "--sensor-name", "pump", "--output", &self.svg];
        all.extend(args);
        assert_eq!(ok(&self.vars, &all).await, "");
        std::fs::read_to_string(&self.svg).unwrap()
    }
}

/// The fill colours of the SVG elements `tag` (`<circle`, `<rect`) that have `attribute`.
fn fills(svg: &str, tag: &str, attribute: &str) -> Vec<String> {
    svg.split(tag)
        .skip(1)
        .map(|e| &e[..e.find("/>").unwrap()])
        .filter(|e| e.contains(attribute))
        .map(|e| {
            let fill = &e[e.find("fill=\"").unwrap() + 6..];
            fill[..fill.find('"').unwrap()].to_string()
        })
        .collect()
}

/// Every text of an SVG plot, in order.
fn texts(svg: &str) -> Vec<String> {
    svg.split("</text>")
        .map(|t| t.rsplit('>').next().unwrap().trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The title and the colours of the anomalies' marks (spike markers and the bands of the others),
/// sorted, of an SVG plot.
fn svg_summary(svg: &str) -> (String, Vec<String>) {
    let title = texts(svg)
        .into_iter()
        .find(|t| t.starts_with("pump"))
        .unwrap();
    let mut marks = fills(svg, "<circle", "r=\"5\"");
    marks.extend(fills(svg, "<rect", "opacity=\"0.2\""));
    marks.sort();
    (title, marks)
}

#[tokio::test]
async fn a_plot_spans_the_readings_or_the_exact_range_and_says_when_a_panel_is_empty() {
    let plots = Plots::new().await;
    let plot = |range: [&'static str; 2], extra: &'static [&'static str]| {
        let plots = &plots;
        async move {
            let mut args = vec!["--start-timestamp", range[0], "--end-timestamp", range[1]];
            args.extend(extra);
            texts(&plots.pump(&args).await)
        }
    };
    // Two years asked, five and a half days of readings: the axis is the readings' (padded by
    // 2 %), with a tick at every midnight inside it, none at an edge.
    let two_years = ["2012-01-01", "2014-01-01"];
    let t = plot(two_years, &[]).await;
    let days: Vec<&String> = t.iter().filter(|t| t.starts_with("Jan 0")).collect();
    assert_eq!(days, ["Jan 02", "Jan 03", "Jan 04", "Jan 05", "Jan 06"]);
    assert!(t.contains(&"time (UTC), 2012–2013".to_string()), "{t:?}");
    // --exact-range keeps the two years: a tick at each quarter.
    let t = plot(two_years, &["--exact-range"]).await;
    let quarters: Vec<&String> = t.iter().filter(|t| t.starts_with("201")).collect();
    assert_eq!(
        quarters,
        ["2012-04", "2012-07", "2012-10", "2013-01", "2013-04", "2013-07", "2013-10"]
    );
    assert!(t.contains(&"time (UTC)".to_string()), "{t:?}");
    // No readings in the range: the panel says so.
    let t = plot(["2014-01-01", "2014-02-01"], &[]).await;
    assert!(
        t.contains(&"pump — 0 readings, 0 anomalies".to_string()),
        "{t:?}"
    );
    assert!(
        t.contains(
            &"no readings between 2014-01-01T00:00:00Z and 2014-02-01T00:00:00Z".to_string()
        ),
        "{t:?}"
    );
}

/// `plot --every`: a band per bucket from its lowest to its highest value (as many as
/// `readings --every` prints), the mean line through them, the readings counted from the buckets
/// and the anomalies as without it, and a legend naming both.
#[tokio::test]
async fn plots_draw_buckets_as_bands_with_the_mean_line() {
    let plots = Plots::new().await;
    let mut args = vec!["--every", "1h"];
    args.extend(WHOLE);
    let every = plots.pump(&args).await;
    let plain = plots.pump(&WHOLE).await;
    let mut read = vec![
        "readings",
        "--sensor-name",
        "pump",
        "--every",
        "1h",
        "--format",
        "csv",
    ];
    read.extend(WHOLE);
    let buckets = ok(&plots.vars, &read).await;
    let buckets: Vec<&str> = buckets.lines().skip(1).collect();
    assert_eq!(buckets.len(), 134, "8,000 minutes");
    // The bands (and the legend's swatch), in the line's colour.
    assert_eq!(
        fills(&every, "<rect", "opacity=\"0.3\""),
        vec!["#1F64AA"; buckets.len() + 1]
    );
    assert_eq!(svg_summary(&every), svg_summary(&plain));
    let texts = texts(&every);
    for legend in ["lowest–highest per 1h", "mean per 1h"] {
        assert_eq!(texts.iter().filter(|t| *t == legend).count(), 1, "{legend}");
    }
    assert!(!texts.contains(&"readings".to_string()), "no readings line");
    // The mean line: one polyline through every bucket (they are all there).
    let mean = every
        .split("<polyline")
        .skip(1)
        .find(|p| p.contains("stroke-width=\"2\""))
        .unwrap();
    let points = &mean[mean.find("points=\"").unwrap() + 8..];
    let points = &points[..points.find('"').unwrap()];
    assert_eq!(points.split_whitespace().count(), buckets.len());
}

#[tokio::test]
async fn plots_draw_the_workers_verdicts_and_the_hourly_rollup_when_they_are_current() {
    let plots = Plots::new().await;
    let env = &plots.env;
    let db = testbed::connect(&env.measurements_db).await.unwrap();
    // 200 pixels wide: each column spans about three hours, so whole hours come from the rollup.
    let plot = |extra: &'static [&'static str]| {
        let plots = &plots;
        async move {
            let mut args = vec!["--width", "200"];
            args.extend(WHOLE);
            args.extend(extra);
            svg_summary(&plots.pump(&args).await)
        }
    };
    let spike_only = (
        "pump — 8000 readings, 1 anomaly".to_string(),
        vec!["#D52424".to_string()],
    );
    // What the workers record is stood in for by rows a detector could not have found, so the
    // picture says where it came from: an hour that claims 1,000 readings more than there are
    // and (below) a stuck stretch.
    db.batch_execute(&format!(
        "UPDATE measurement_hours SET readings = readings + 1000
         WHERE sensor_uuid = '{PUMP}' AND hour = '2013-01-03T10:00:00Z'"
    ))
    .await
    .unwrap();
    // Detection is queued (the ingestion's work is not done): the detector runs, readings are read.
    assert_eq!(plot(&[]).await, spike_only);

    // The workers detect: their verdicts are current, so they are drawn, with the rollup.
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let settings = sensor_pipeline::config::AnomalySettings::from_env(
        &sensor_pipeline::config::Env::from_map(Vec::<(String, String)>::new()),
    )
    .unwrap();
    let alerts = sensor_pipeline::alerts::Alerts::new(dbs, settings);
    assert_eq!(alerts.detect_due(None).await.unwrap().spans, 2);
    assert_eq!(plot(&[]).await.0, "pump — 9000 readings, 1 anomaly");
    db.batch_execute(&format!(
        "INSERT INTO anomalies (sensor_uuid, kind, start_ts, end_ts, value, expected, score, state,
                                object_key)
         VALUES ('{PUMP}', 'stuck', '2013-01-02T00:00:00Z', '2013-01-02T01:00:00Z', 10, 10, 9,
                 'open', 'test')"
    ))
    .await
    .unwrap();
    assert_eq!(
        plot(&[]).await,
        (
            "pump — 9000 readings, 2 anomalies".to_string(),
            vec!["#8840AA".to_string(), "#D52424".to_string()]
        )
    );
    // An hour that is not exact is read from the readings.
    db.batch_execute(&format!(
        "UPDATE measurement_hours SET exact = false
         WHERE sensor_uuid = '{PUMP}' AND hour = '2013-01-03T10:00:00Z'"
    ))
    .await
    .unwrap();
    assert_eq!(plot(&[]).await.0, "pump — 8000 readings, 2 anomalies");
    // Another sensitivity than the workers': the detector runs.
    let (title, circles) = plot(&["--sensitivity", "0.5"]).await;
    assert_eq!(title, "pump — 8000 readings, 1 anomaly");
    assert_eq!(circles, ["#D52424"]);
    // New work queued for the sensor (an object just ingested): the verdicts are behind.
    db.batch_execute(&format!(
        "INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
         VALUES ('{PUMP}', '2013-01-03T00:00:00Z', '2013-01-03T01:00:00Z', 'test')"
    ))
    .await
    .unwrap();
    assert_eq!(plot(&[]).await, spike_only);
}
