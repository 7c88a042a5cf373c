//! The operator's kit (`deploy/`) against the real services:
//!
//! - the alert rules and the dashboard against a real Prometheus (Debian's `prometheus`, which
//!   `.ci/run` installs) scraping a real worker: every expression of the rules and of the
//!   dashboard evaluates without error, and with the object store down the dependency alerts go
//!   pending, then firing, and clear when it is back. For that part the rules are the shipped
//!   file with its times in seconds, so the test takes seconds, not minutes: every `for:` is 2 s,
//!   the recording group runs every second (the scrape and evaluation interval), and range
//!   windows of minutes are 4 or 8 s;
//! - KEDA's trigger against JetStream: `provision`, given the Kubernetes ConfigMap's settings,
//!   creates the consumer the trigger names, whose backlog is what KEDA reads;
//! - the dashboard's SQL (readings panel, sensor variable, anomaly annotations) on the migrated
//!   measurements schema.

mod common;

use std::time::Duration;

use common::{http_get, wait_for, Pipeline, Worker};
use sensor_pipeline::config::{Env, NatsSettings};
use sensor_pipeline::queue::Queue;
use tokio::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Every PromQL expression of the rules and of the dashboard's Prometheus panels.
fn expressions(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let doc = YamlLoader::load_from_str(rules).unwrap().remove(0);
    let Yaml::Array(groups) = &doc["groups"] else {
        panic!("no groups")
    };
    for group in groups {
        let Yaml::Array(rules) = &group["rules"] else {
            panic!("no rules")
        };
        out.extend(
            rules
                .iter()
                .map(|r| r["expr"].as_str().unwrap().trim().to_string()),
        );
    }
    let path = format!("{ROOT}/deploy/grafana/dashboards/sensor-pipeline.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            if target["datasource"]["type"] == "prometheus" {
                out.push(target["expr"].as_str().unwrap().to_string());
            }
        }
    }
    out
}

/// `text` percent-encoded for a URL's query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus on a free port (it logs the one it bound), over `config`.
struct Prometheus {
    _child: tokio::process::Child,
    addr: String,
}

impl Prometheus {
    async fn start(dir: &std::path::Path, config: &std::path::Path) -> Self {
        let binary = testbed::which("prometheus")
            .expect("prometheus not on PATH: `apt-get install prometheus` (.ci/run installs it)");
        let log = dir.join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut addr = None;
        let none: &[&Worker] = &[];
        wait_for(
            "Prometheus to listen",
            Duration::from_secs(60),
            none,
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                addr = text
                    .lines()
                    .find(|l| l.contains("msg=\"Listening on\""))
                    .and_then(|l| l.split("address=").nth(1))
                    .map(|a| a.trim().to_string());
                std::future::ready(addr.is_some())
            },
        )
        .await;
        let addr = addr.unwrap();
        // It answers 503 until its storage is open.
        wait_for(
            "Prometheus to be ready",
            Duration::from_secs(60),
            none,
            || async { http_get(&addr, "/-/ready").await.0 == 200 },
        )
        .await;
        Self {
            _child: child,
            addr,
        }
    }

    /// The JSON of a GET on the HTTP API.
    async fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(&self.addr, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Evaluates `expr` now: its result, or the API's error.
    async fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let (_, body) =
            http_get(&self.addr, &format!("/api/v1/query?query={}", encode(expr))).await;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{expr}: {e}: {body}"))?;
        match v["status"].as_str() {
            Some("success") => Ok(v["data"]["result"].clone()),
            _ => Err(format!("{expr}: {body}")),
        }
    }

    /// The state of alert `name` for the worker (`pending`, `firing`), if it is active.
    async fn alert(&self, name: &str) -> Option<String> {
        let v = self.api("/api/v1/alerts").await;
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap().to_string())
    }

    async fn wait_alert(&self, name: &str, state: Option<&str>, worker: &Worker) {
        let what = format!("{name} to be {state:?}");
        wait_for(&what, Duration::from_secs(300), &[worker], || async {
            self.alert(name).await.as_deref() == state
        })
        .await;
    }
}

/// A YAML file of the repository (one document).
fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

#[tokio::test]
async fn provision_with_the_configmap_creates_the_consumer_the_keda_trigger_reads() {
    let config = yaml("deploy/kubernetes/base/configmap.yaml");
    let scaled = yaml("deploy/kubernetes/overlays/keda/scaledobject.yaml");
    let trigger = &scaled["spec"]["triggers"][0]["metadata"];
    let nats = testbed::nats().await.unwrap();
    // The ConfigMap's JetStream names (the only test in this process on this NATS server that
    // uses them), on the test's server.
    let mut vars = vec![("NATS_URL".to_string(), nats.url.clone())];
    for name in [
        "NATS_SUBJECT",
        "NATS_STREAM",
        "NATS_CONSUMER",
        "NATS_DLQ_SUBJECT",
    ] {
        vars.push((name.into(), config["data"][name].as_str().unwrap().into()));
    }
    let settings = NatsSettings::from_env(&Env::from_map(vars)).unwrap();
    let queue = Queue::connect(&settings, "provision").await.unwrap();
    queue.provision().await.unwrap();

    // What KEDA reads: num_pending + num_ack_pending of the trigger's stream and consumer.
    let mut keda = settings.clone();
    keda.stream = trigger["stream"].as_str().unwrap().into();
    keda.consumer = trigger["consumer"].as_str().unwrap().into();
    let reader = Queue::connect(&keda, "keda").await.unwrap();
    assert_eq!(reader.pending().await.unwrap(), 0);
    let event = sensor_pipeline::events::object_created(
        "s3:ObjectCreated:Put",
        "code-challenge-data",
        "timeseries/waiting.csv",
        "0123456789abcdef0123456789abcdef",
        10,
    );
    queue.publish_event(event, None).await.unwrap();
    assert_eq!(reader.pending().await.unwrap(), 1);
}

#[tokio::test]
async fn prometheus_evaluates_every_rule_and_dashboard_query_and_the_dependency_alerts_fire() {
    let p = Pipeline::new().await;
    let worker = p.worker("w1", &[]);
    let target = worker.metrics_addr().await;

    let shipped = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/rules.yml")).unwrap();
    let fast: String = shipped
        .lines()
        .map(|l| match l.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 2s"),
            _ => l
                .replace("interval: 30s", "interval: 1s")
                .replace("[2m]", "[4s]")
                .replace("[5m]", "[4s]")
                .replace("[15m]", "[8s]"),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(fast, shipped);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), &fast).unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: sensors-worker\n    static_configs:\n      - targets: ['{target}']\n",
            rules = dir.path().join("rules.yml").display()
        ),
    )
    .unwrap();
    let prometheus = Prometheus::start(dir.path(), &config).await;

    // The worker is scraped and ready.
    wait_for(
        "the worker to be scraped, ready",
        Duration::from_secs(60),
        &[&worker],
        || async {
            let ready = prometheus
                .query("sensors_ready{job=\"sensors-worker\"}")
                .await
                .unwrap();
            ready[0]["value"][1] == "1"
        },
    )
    .await;

    // Every expression is valid PromQL over what the worker exports.
    let exprs = expressions(&shipped);
    assert_eq!(
        exprs.len(),
        17 + 9,
        "the rules' 17 expressions and the dashboard's 9"
    );
    for expr in &exprs {
        assert_eq!(prometheus.query(expr).await.map(|_| ()), Ok(()));
    }
    // With the worker up and ready, every rule falls silent (before the first scrape, "no
    // worker ready" was rightly pending).
    wait_for(
        "no alert active",
        Duration::from_secs(60),
        &[&worker],
        || async {
            let alerts = prometheus.api("/api/v1/alerts").await;
            alerts["data"]["alerts"].as_array().unwrap().is_empty()
        },
    )
    .await;

    // The object store goes down: the worker stops fetching and says so.
    p.env.s3.set_down(true).unwrap();
    // Both go pending at once, then firing: the states each alert passes through, in order.
    let names = ["SensorsWorkerWaitingOnDependency", "SensorsNoWorkerReady"];
    let seen = std::cell::RefCell::new(vec![Vec::<String>::new(); names.len()]);
    wait_for(
        "both alerts pending, then firing",
        Duration::from_secs(300),
        &[&worker],
        || async {
            for (i, name) in names.iter().enumerate() {
                if let Some(state) = prometheus.alert(name).await {
                    let mut seen = seen.borrow_mut();
                    if seen[i].last() != Some(&state) {
                        seen[i].push(state);
                    }
                }
            }
            let seen = seen.borrow();
            seen.iter()
                .all(|s| s.last().map(String::as_str) == Some("firing"))
        },
    )
    .await;
    assert_eq!(
        seen.into_inner(),
        vec![vec!["pending".to_string(), "firing".to_string()]; 2]
    );
    let alerts = prometheus.api("/api/v1/alerts").await;
    let waiting = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "SensorsWorkerWaitingOnDependency")
        .unwrap()
        .clone();
    assert_eq!(waiting["labels"]["instance"], target.as_str());
    assert_eq!(waiting["labels"]["severity"], "critical");
    println!("{}", serde_json::to_string_pretty(&waiting).unwrap());

    // Back: both clear.
    p.env.s3.set_down(false).unwrap();
    prometheus
        .wait_alert("SensorsNoWorkerReady", None, &worker)
        .await;
    prometheus
        .wait_alert("SensorsWorkerWaitingOnDependency", None, &worker)
        .await;
}

/// Every SQL of the dashboard (the readings panel, the `sensor` variable, the anomaly
/// annotations) runs on the migrated measurements schema, with Grafana's macros expanded as its
/// PostgreSQL data source expands them, and reads back what was stored.
#[tokio::test]
async fn the_dashboard_sql_runs_on_the_measurements_schema() {
    let p = Pipeline::new().await;
    let db = testbed::connect(&p.env.measurements_db).await.unwrap();
    let sensor = "7a3e6c5d-1b2f-4c8e-9d0a-5f6b7c8d9e0f";
    db.batch_execute(&format!(
        "INSERT INTO measurements (sensor_uuid, ts, value) VALUES
             ('{sensor}', '2013-01-01T00:00:30Z', 1), ('{sensor}', '2013-01-01T00:00:50Z', 3);
         INSERT INTO measurement_days (sensor_uuid, day, readings)
             VALUES ('{sensor}', '2013-01-01T00:00:00Z', 2);
         INSERT INTO anomalies (sensor_uuid, kind, start_ts, end_ts, value, expected, score, state,
                                object_key)
             VALUES ('{sensor}', 'spike', '2013-01-01T00:00:50Z', '2013-01-01T00:00:50Z', 3, 1,
                     4.25, 'open', 'timeseries/a.csv')"
    ))
    .await
    .unwrap();
    let expand = |sql: &str| {
        sql.replace(
            "$__timeGroupAlias(ts, $__interval)",
            "to_timestamp(floor(extract(epoch from ts) / 60) * 60) AS \"time\"",
        )
        .replace(
            "$__timeFilter(ts)",
            "ts BETWEEN '2013-01-01T00:00:00Z' AND '2013-01-02T00:00:00Z'",
        )
        .replace(
            "$__timeFilter(start_ts)",
            "start_ts BETWEEN '2013-01-01T00:00:00Z' AND '2013-01-02T00:00:00Z'",
        )
        .replace("$sensor", sensor)
    };
    let path = format!("{ROOT}/deploy/grafana/dashboards/sensor-pipeline.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let sql = |v: &serde_json::Value| expand(v.as_str().unwrap());
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["datasource"]["uid"] == "timescaledb")
        .unwrap();
    let rows = db
        .query(&sql(&panel["targets"][0]["rawSql"]), &[])
        .await
        .unwrap();
    let averaged: Vec<f64> = rows.iter().map(|r| r.get("value")).collect();
    assert_eq!(averaged, [2.0]);
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(variable["name"], "sensor");
    let rows = db.query(&sql(&variable["query"]), &[]).await.unwrap();
    let sensors: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(sensors, [sensor]);
    let annotation = &dashboard["annotations"]["list"][0]["target"]["rawSql"];
    let rows = db.query(&sql(annotation), &[]).await.unwrap();
    let texts: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get("text"), r.get("tags")))
        .collect();
    assert_eq!(
        texts,
        [("spike (score 4.3, open)".to_string(), "spike".to_string())]
    );
}
