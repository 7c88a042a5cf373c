//! The deployment files agree with the configuration the code reads: `docker-compose.yml` passes
//! only settings the binaries know, and every required one; `config/.env.example` documents every
//! setting. (That the list is what the code reads, the compiler checks: settings are read only
//! through `Setting`.)

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
    let known = known();
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
        let Yaml::Hash(env) = env else {
            panic!("{name}: environment must be a mapping")
        };
        let passed: BTreeSet<&str> = env.keys().filter_map(Yaml::as_str).collect();
        for key in &passed {
            let base = key.strip_suffix("_FILE").unwrap_or(key);
            assert!(
                known.contains(base),
                "{name} passes {key}, which no binary reads"
            );
        }
        for required in Setting::ALL
            .iter()
            .filter(|s| s.required())
            .map(|s| s.name())
        {
            assert!(
                passed.contains(required) || passed.contains(format!("{required}_FILE").as_str()),
                "{name} lacks the required {required}"
            );
        }
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
