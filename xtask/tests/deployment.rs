//! The deployment files agree with the configuration the code reads: `docker-compose.yml` passes
//! only settings the binaries know, and every required one; `config/.env.example` documents every
//! setting. (That the list is what the code reads, the compiler checks: settings are read only
//! through `Setting`.) And the compose file is fit to run: no secret has a default, nothing is
//! published beyond loopback, every image is pinned, every volume is where its image keeps its
//! data, each service uses its own least-privilege role.

use std::collections::BTreeSet;

use sensor_pipeline::config::Setting;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap()
}

fn known() -> BTreeSet<&'static str> {
    Setting::ALL.iter().map(|s| s.name()).collect()
}

#[test]
fn env_example_documents_every_setting() {
    let example = read("config/.env.example");
    for name in known() {
        assert!(
            example.contains(name),
            "config/.env.example does not mention {name}"
        );
    }
}

/// `what` passes only settings a binary reads (a secret may come as `NAME_FILE`), and every
/// required one.
fn assert_known_and_complete<'a>(what: &str, passed: impl IntoIterator<Item = &'a str>) {
    let known = known();
    let names: BTreeSet<&str> = passed
        .into_iter()
        .map(|k| k.strip_suffix("_FILE").unwrap_or(k))
        .collect();
    for name in &names {
        assert!(
            known.contains(name),
            "{what} passes {name}, which no binary reads"
        );
    }
    for required in Setting::ALL
        .iter()
        .filter(|s| s.required())
        .map(|s| s.name())
    {
        assert!(
            names.contains(required),
            "{what} lacks the required {required}"
        );
    }
}

/// A mapping with YAML merge keys (`<<: *anchor`) resolved.
fn merged(node: &Yaml) -> yaml_rust2::yaml::Hash {
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Yaml::Hash(h) = node {
        if let Some(Yaml::Hash(base)) = h.get(&Yaml::String("<<".into())) {
            out.extend(base.clone());
        }
        for (k, v) in h {
            if k.as_str() != Some("<<") {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

#[test]
fn compose_passes_known_settings_and_every_required_one() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).unwrap();
    let services = &docs[0]["services"];
    let Yaml::Hash(services) = services else {
        panic!("no services")
    };
    let mut pipeline_services = Vec::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let service = merged(service);
        let image = service
            .get(&Yaml::String("image".into()))
            .and_then(Yaml::as_str)
            .unwrap_or("");
        if !image.starts_with("sensor-pipeline") {
            continue;
        }
        pipeline_services.push(name.to_string());
        let env = service
            .get(&Yaml::String("environment".into()))
            .unwrap_or_else(|| panic!("{name} has no environment"));
        let env = merged(env);
        let passed: BTreeSet<&str> = env.keys().filter_map(Yaml::as_str).collect();
        assert_known_and_complete(name, passed);
    }
    assert_eq!(
        pipeline_services,
        vec!["provision", "migrate", "worker", "backfill", "query-cli"]
    );
    let worker = merged(&docs[0]["services"]["worker"]);
    let replicas = worker
        .get(&Yaml::String("deploy".into()))
        .map(|d| d["replicas"].as_i64().unwrap_or(0))
        .unwrap_or(0);
    assert!(replicas >= 2, "worker replicas: {replicas}");
    assert_eq!(
        docs[0]["services"]["query-cli"]["profiles"][0].as_str(),
        Some("tools")
    );
}

/// The compose file's services, with merge keys resolved (also in `environment`).
fn services() -> Vec<(String, yaml_rust2::yaml::Hash)> {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).unwrap();
    let Yaml::Hash(services) = &docs[0]["services"] else {
        panic!("no services")
    };
    services
        .iter()
        .map(|(name, service)| {
            let mut service = merged(service);
            let env = Yaml::String("environment".into());
            if let Some(e) = service.get(&env) {
                let e = Yaml::Hash(merged(e));
                service.insert(env, e);
            }
            (name.as_str().unwrap().to_string(), service)
        })
        .collect()
}

fn field<'a>(service: &'a yaml_rust2::yaml::Hash, key: &str) -> Option<&'a Yaml> {
    service.get(&Yaml::String(key.into()))
}

fn strings(node: Option<&Yaml>) -> Vec<String> {
    match node {
        Some(Yaml::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every `${NAME…}` in the compose file: (NAME, what follows the name up to the closing brace).
/// `$${NAME}` is no interpolation (compose passes `${NAME}` on, to a shell in the container).
fn interpolations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let escaped = rest[..start].ends_with('$');
        let after = &rest[start + 2..];
        let end = after.find('}').expect("an unclosed ${");
        let inner = &after[..end];
        if escaped {
            rest = &after[end..];
            continue;
        }
        let name_end = inner
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(inner.len());
        out.push((inner[..name_end].to_string(), inner[name_end..].to_string()));
        rest = &after[end..];
    }
    out
}

fn is_secret(name: &str) -> bool {
    [
        "PASSWORD",
        "SECRET",
        "TOKEN",
        "ROOT_USER",
        "ACCESS_KEY",
        "CREDS",
        "NKEY",
    ]
    .iter()
    .any(|word| name.contains(word))
}

#[test]
fn compose_secrets_have_no_default_and_stop_compose_with_a_message() {
    let text = read("docker-compose.yml");
    let secrets: Vec<(String, String)> = interpolations(&text)
        .into_iter()
        .filter(|(name, _)| is_secret(name))
        .collect();
    assert!(secrets.len() >= 8, "{secrets:?}");
    for (name, rest) in &secrets {
        assert!(
            rest.starts_with(":?") && rest.len() > 2,
            "${{{name}{rest}}}: a secret must be ${{{name}:?message}}, never a default"
        );
    }
    // And no service is handed a literal secret (a value without `${`), in a variable or a URL.
    for (name, service) in services() {
        let Some(Yaml::Hash(env)) = field(&service, "environment") else {
            continue;
        };
        for (key, value) in env {
            let (key, value) = (key.as_str().unwrap(), value.as_str().unwrap_or(""));
            let literal_secret = is_secret(key) && !value.contains("${");
            let url_with_password = value.contains("://")
                && value.contains('@')
                && !value.split('@').next().unwrap().contains("${");
            assert!(
                !literal_secret && !url_with_password,
                "{name}: {key} holds a literal secret"
            );
        }
    }
}

#[test]
fn compose_publishes_nothing_beyond_loopback_and_nats_not_at_all() {
    for (name, service) in services() {
        for port in strings(field(&service, "ports")) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} on every interface: bind it to 127.0.0.1"
            );
            assert!(
                !name.starts_with("nats"),
                "{name} publishes {port}: NATS clients are on the compose network"
            );
        }
    }
}

#[test]
fn compose_images_are_pinned() {
    let version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap()
        .to_string();
    for (name, service) in services() {
        let image = field(&service, "image").and_then(Yaml::as_str).unwrap();
        let (repository, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: {image} has no tag"));
        assert!(
            !tag.contains("latest") && tag.chars().any(|c| c.is_ascii_digit()),
            "{name}: {image} is not a pinned version"
        );
        if repository == "sensor-pipeline" {
            assert_eq!(
                tag, version,
                "{name}: our image carries the workspace version"
            );
        }
    }
}

/// Where each image keeps its data (the path its volume must be mounted at), with the source.
const DATA_PATHS: &[(&str, &str)] = &[
    // docker-library/postgres, 16/alpine3.22/Dockerfile: `ENV PGDATA /var/lib/postgresql/data`
    // (the same in every version up to 17; 18 moved it to /var/lib/postgresql/18/docker).
    ("postgres", "/var/lib/postgresql/data"),
    // timescale/timescaledb-docker, Dockerfile: `FROM postgres:${PG_VERSION}-alpine`, PGDATA
    // unchanged.
    ("timescale/timescaledb", "/var/lib/postgresql/data"),
    // timescale/timescaledb-docker-ha, Dockerfile: `PGDATA=/home/postgres/pgdata/data`.
    ("timescale/timescaledb-ha", "/home/postgres/pgdata/data"),
    // nats/nats-server.conf and nats-cluster.conf here: `store_dir: /data/jetstream`.
    ("nats", "/data"),
    // The `minio server /data` command of the service (the image keeps nothing elsewhere).
    ("minio/minio", "/data"),
    // prometheus/prometheus, Dockerfile: `VOLUME [ "/prometheus" ]` and
    // `--storage.tsdb.path=/prometheus` (the service passes the same).
    ("prom/prometheus", "/prometheus"),
    // grafana/grafana, Dockerfile: `GF_PATHS_DATA="/var/lib/grafana"`.
    ("grafana/grafana", "/var/lib/grafana"),
];

#[test]
fn compose_volumes_are_where_each_image_keeps_its_data() {
    assert!(read("nats/nats-server.conf").contains("store_dir: /data/jetstream"));
    assert!(read("nats/nats-cluster.conf").contains("store_dir: /data/jetstream"));
    let mut checked = Vec::new();
    for (name, service) in services() {
        let image = field(&service, "image").and_then(Yaml::as_str).unwrap();
        let repository = image.rsplit_once(':').map_or(image, |(r, _)| r);
        let mounts: Vec<String> = strings(field(&service, "volumes"))
            .iter()
            .filter(|v| !v.starts_with('.') && !v.starts_with('/'))
            .filter_map(|v| v.split(':').nth(1).map(String::from))
            .collect();
        if mounts.is_empty() {
            continue;
        }
        let (_, path) = DATA_PATHS
            .iter()
            .find(|(r, _)| *r == repository)
            .unwrap_or_else(|| panic!("{name}: add {repository}'s data path to DATA_PATHS"));
        assert!(
            mounts.iter().any(|m| m == path),
            "{name} ({image}) keeps its data in {path}, but its volumes are at {mounts:?}"
        );
        checked.push(name);
    }
    assert_eq!(
        checked,
        [
            "nats",
            "nats-1",
            "nats-2",
            "nats-3",
            "postgres",
            "timescaledb",
            "minio",
            "prometheus",
            "grafana"
        ]
    );
}

#[test]
fn compose_services_use_their_own_roles() {
    let user_of = |url: &str| {
        url.split("://")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap()
            .to_string()
    };
    for (name, service) in services() {
        let Some(Yaml::Hash(env)) = field(&service, "environment") else {
            continue;
        };
        let url = |key: &str| env.get(&Yaml::String(key.into())).and_then(Yaml::as_str);
        if let (Some(mapping), Some(measurements)) =
            (url("DATABASE_URL"), url("TIMESCALE_DATABASE_URL"))
        {
            let want = match name.as_str() {
                "migrate" => "sensors_migrate",
                "query-cli" => "sensors_reader",
                _ => "sensors_worker",
            };
            assert_eq!(
                (user_of(mapping), user_of(measurements)),
                (want.to_string(), want.to_string()),
                "{name}"
            );
        }
        if name == "postgres" || name == "timescaledb" {
            assert!(
                strings(field(&service, "volumes")).contains(
                    &"./postgres/10-roles.sh:/docker-entrypoint-initdb.d/10-roles.sh:ro"
                        .to_string()
                ),
                "{name} does not create the roles"
            );
        }
    }
    // MinIO publishes as the NATS user that may only publish the events subject.
    let accounts = read("nats/accounts.conf");
    assert!(accounts.contains("publish: { allow: [\"minio.events\"] }"));
    let minio = services()
        .into_iter()
        .find(|(n, _)| n == "minio")
        .unwrap()
        .1;
    let Some(Yaml::Hash(env)) = field(&minio, "environment") else {
        panic!("minio has no environment")
    };
    let get = |k: &str| env.get(&Yaml::String(k.into())).and_then(Yaml::as_str);
    assert_eq!(get("MINIO_NOTIFY_NATS_USERNAME_PRIMARY"), Some("minio"));
    assert_eq!(
        get("MINIO_NOTIFY_NATS_SUBJECT_PRIMARY"),
        Some("minio.events")
    );
}

/// A YAML file of the repository (one document).
fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path)).unwrap().remove(0)
}

/// The KEDA trigger reads the consumer `provision` creates, in the account the workers use, with
/// only the fields KEDA documents for `nats-jetstream` (keda.sh/docs/scalers/nats-jetstream:
/// natsServerMonitoringEndpoint, account, stream, consumer, lagThreshold, activationLagThreshold,
/// useHttps); the names agree with the ConfigMap the workers and `provision` read, and with the
/// consumer file in `nats/`.
#[test]
fn the_keda_trigger_reads_the_consumer_provision_creates() {
    let scaled = yaml("deploy/kubernetes/overlays/keda/scaledobject.yaml");
    assert_eq!(scaled["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    assert_eq!(scaled["kind"].as_str(), Some("ScaledObject"));
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("sensors-worker")
    );
    let (min, max) = (
        scaled["spec"]["minReplicaCount"].as_i64().unwrap(),
        scaled["spec"]["maxReplicaCount"].as_i64().unwrap(),
    );
    assert_eq!((min, max), (1, 10));
    let Yaml::Array(triggers) = &scaled["spec"]["triggers"] else {
        panic!("no triggers")
    };
    assert_eq!(triggers.len(), 1);
    assert_eq!(triggers[0]["type"].as_str(), Some("nats-jetstream"));
    let Yaml::Hash(metadata) = &triggers[0]["metadata"] else {
        panic!("no metadata")
    };
    let documented = [
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    ];
    for key in metadata.keys() {
        let key = key.as_str().unwrap();
        assert!(documented.contains(&key), "KEDA does not know {key}");
        // KEDA's metadata values are strings.
        assert!(
            metadata[&Yaml::String(key.into())].as_str().is_some(),
            "{key}"
        );
    }
    let meta = |k: &str| {
        metadata[&Yaml::String(k.into())]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(meta("natsServerMonitoringEndpoint").ends_with(":8222"));
    assert!(read("nats/nats-server.conf").contains("http_port: 8222"));
    assert!(read("nats/nats-cluster.conf").contains("http_port: 8222"));
    assert!(meta("lagThreshold").parse::<u32>().unwrap() > 0);

    let config = yaml("deploy/kubernetes/base/configmap.yaml");
    let setting = |k: &str| config["data"][k].as_str().unwrap().to_string();
    assert_eq!(meta("stream"), setting("NATS_STREAM"));
    assert_eq!(meta("consumer"), setting("NATS_CONSUMER"));
    // What `provision` creates from the ConfigMap's settings, and by default (nats/ documents it).
    let nats = |vars: Vec<(&str, String)>| {
        sensor_pipeline::config::NatsSettings::from_env(&sensor_pipeline::config::Env::from_map(
            vars,
        ))
        .unwrap()
    };
    let provisioned = nats(vec![
        ("NATS_STREAM", setting("NATS_STREAM")),
        ("NATS_CONSUMER", setting("NATS_CONSUMER")),
    ]);
    assert_eq!(
        (provisioned.stream.as_str(), provisioned.consumer.as_str()),
        (meta("stream").as_str(), meta("consumer").as_str())
    );
    let default = nats(vec![]);
    assert_eq!(
        (default.stream, default.consumer),
        (meta("stream"), meta("consumer"))
    );
    let consumer = read("nats/consumer-sensor-ingest.json");
    assert!(consumer.contains(&format!("\"durable_name\": \"{}\"", meta("consumer"))));
    // The account the workers' NATS user is in.
    let accounts = read("nats/accounts.conf");
    let account = meta("account");
    let block = accounts
        .split(&format!("{account} {{"))
        .nth(1)
        .unwrap_or_else(|| panic!("no account {account} in nats/accounts.conf"));
    let block = block.split("\n  }").next().unwrap();
    assert!(
        block.contains(&format!("user: {}", setting("NATS_USER"))),
        "the workers' user is not in {account}"
    );
}

/// The Kubernetes manifests pass only settings the binaries read (secrets as `*_FILE`), every
/// required one, and each pod runs non-root on a read-only root filesystem; the worker's grace
/// period outlasts its own shutdown; every file a kustomization names exists.
#[test]
fn the_kubernetes_manifests_pass_known_settings_and_run_unprivileged() {
    let config = yaml("deploy/kubernetes/base/configmap.yaml");
    let Yaml::Hash(data) = &config["data"] else {
        panic!("no data")
    };
    let from_config: BTreeSet<String> = data.keys().map(|k| k.as_str().unwrap().into()).collect();
    for (file, kind) in [
        ("deploy/kubernetes/base/worker.yaml", "Deployment"),
        ("deploy/kubernetes/base/migrate-job.yaml", "Job"),
        ("deploy/kubernetes/base/provision-job.yaml", "Job"),
        ("deploy/kubernetes/jobs/backfill.yaml", "Job"),
    ] {
        let doc = yaml(file);
        assert_eq!(doc["kind"].as_str(), Some(kind), "{file}");
        let pod = &doc["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{file}"
        );
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{file}"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{file}"
        );
        let mut passed = from_config.clone();
        if let Yaml::Array(env) = &container["env"] {
            for var in env {
                let name = var["name"].as_str().unwrap();
                let value = var["value"].as_str().unwrap_or("");
                if let Some(base) = name.strip_suffix("_FILE") {
                    assert!(
                        value.starts_with("/var/run/secrets/sensor-pipeline/"),
                        "{file}: {name} is not read from the mounted Secret"
                    );
                    passed.insert(base.to_string());
                } else {
                    passed.insert(name.to_string());
                }
            }
        }
        assert_known_and_complete(file, passed.iter().map(String::as_str));
    }
    let worker = yaml("deploy/kubernetes/base/worker.yaml");
    let grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    let shutdown: i64 = config["data"]["SHUTDOWN_GRACE_SECS"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        grace > shutdown + 5,
        "grace {grace} s against the worker's {shutdown} s"
    );
    for kustomization in [
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/keda",
        "deploy/kubernetes/overlays/hpa",
        "deploy/kubernetes/overlays/nats-r3",
    ] {
        let doc = yaml(&format!("{kustomization}/kustomization.yaml"));
        let Yaml::Array(resources) = &doc["resources"] else {
            panic!("{kustomization}: no resources")
        };
        for r in resources {
            let path = format!("{ROOT}/{kustomization}/{}", r.as_str().unwrap());
            assert!(std::path::Path::new(&path).exists(), "{path} is missing");
        }
    }
}
