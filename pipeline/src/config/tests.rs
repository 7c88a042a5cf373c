use super::*;

#[test]
fn missing_required_setting_names_the_variable() {
    let err = DatabaseSettings::from_env(&Env::from_map([("X", "y")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "missing required setting DATABASE_URL: set it in the environment, in config/.env, or as DATABASE_URL_FILE"
    );
}

#[test]
fn timescale_url_defaults_to_database_url() {
    let env = Env::from_map([("DATABASE_URL", "postgres://u:pw@localhost/db")]);
    let db = DatabaseSettings::from_env(&env).unwrap();
    assert_eq!(db.measurements_url.expose(), "postgres://u:pw@localhost/db");
    assert!(db.same_database());
}

#[test]
fn secrets_come_from_files_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "s3cr3t\n").unwrap();
    let env = Env::from_map([
        ("MINIO_ENDPOINT", "127.0.0.1:9000"),
        ("MINIO_ACCESS_KEY", "minio"),
        ("MINIO_SECRET_KEY_FILE", path.to_str().unwrap()),
    ]);
    let s = ObjectStoreSettings::from_env(&env).unwrap();
    assert_eq!(s.secret_key.expose(), "s3cr3t");
    // Both keys are secrets: neither the secret key nor the access key is printed.
    assert_eq!(
        format!("{s:?}"),
        "ObjectStoreSettings { endpoint: \"127.0.0.1:9000\", access_key: Secret(***), \
         secret_key: Secret(***), https: false, bucket: \"code-challenge-data\", \
         connect_timeout: 10s, read_timeout: 60s, operation_timeout: 300s }"
    );
    assert_eq!(s.bucket, "code-challenge-data");
    assert_eq!(s.url(), "http://127.0.0.1:9000");
}

#[test]
fn secret_given_twice_is_an_error() {
    let env = Env::from_map([
        ("DATABASE_URL", "postgres://a/b"),
        ("DATABASE_URL_FILE", "/x"),
    ]);
    let err = DatabaseSettings::from_env(&env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "both DATABASE_URL and DATABASE_URL_FILE are set: set only one"
    );
}

#[test]
fn invalid_values_are_named() {
    let env = Env::from_map([("NAIVE_TIMEZONE", "Mars/Olympus")]);
    let err = ContractSettings::from_env(&env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid value for NAIVE_TIMEZONE: \"Mars/Olympus\" is not an IANA time zone name such \
         as Europe/Berlin or UTC"
    );
    let env = Env::from_map([("WORKER_CONCURRENCY", "many")]);
    let err = WorkerSettings::from_env(&env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid value for WORKER_CONCURRENCY: \"many\": invalid digit found in string"
    );
    let env = Env::from_map([
        ("MINIO_ENDPOINT", "http://minio:9000"),
        ("MINIO_ACCESS_KEY", "a"),
        ("MINIO_SECRET_KEY", "b"),
    ]);
    let err = ObjectStoreSettings::from_env(&env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid value for MINIO_ENDPOINT: \"http://minio:9000\": give host:port without a \
         scheme (use MINIO_HTTPS_PROTOCOL for https)"
    );
}

#[test]
fn nats_credentials_of_one_kind_only_and_checked_for_their_shape() {
    let err = |vars: &[(&str, &str)]| {
        NatsAuth::from_env(&Env::from_map(vars.to_vec()))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&[("NATS_TOKEN", "t"), ("NATS_NKEY_SEED", "SUABC")]),
        "invalid value for NATS_NKEY_SEED: give one kind of NATS credentials, not NATS_TOKEN and NATS_NKEY_SEED"
    );
    assert_eq!(
        err(&[("NATS_USER", "u"), ("NATS_PASSWORD", "p"), ("NATS_CREDS", "x")]),
        "invalid value for NATS_CREDS: give one kind of NATS credentials, not NATS_USER/NATS_PASSWORD and NATS_CREDS"
    );
    assert_eq!(
        err(&[("NATS_NKEY_SEED", "UABC")]),
        "invalid value for NATS_NKEY_SEED: is not a user nkey seed (it starts with \"SU\")"
    );
    assert_eq!(
        err(&[("NATS_CREDS", "eyJ0eXAiOiJKV1Qi")]),
        "invalid value for NATS_CREDS: is not a NATS creds file (no \"BEGIN NATS USER JWT\" block)"
    );
    let auth = NatsAuth::from_env(&Env::from_map([("NATS_NKEY_SEED", "SUAB")])).unwrap();
    assert_eq!(
        auth.nkey_seed.map(|s| s.expose().to_string()),
        Some("SUAB".into())
    );
    assert_eq!(
        format!(
            "{:?}",
            NatsAuth::from_env(&Env::from_map([("NATS_NKEY_SEED", "SUAB")])).unwrap()
        ),
        "NatsAuth { user: None, password: None, token: None, nkey_seed: Some(Secret(***)), \
         creds: None, tls_ca: None, tls_cert: None, tls_key: None }"
    );
}
