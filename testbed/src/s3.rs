//! An S3 server over a temporary folder (`s3s-fs`), served from the caller's runtime.

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use sensor_pipeline::config::{ObjectStoreSettings, Secret};
use sensor_pipeline::object_store::ObjectStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running S3 server with one bucket. Stops when dropped.
pub struct S3Server {
    /// `host:port`, no scheme.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    store: ObjectStore,
    _root: Option<tempfile::TempDir>,
    task: Option<JoinHandle<()>>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl S3Server {
    /// Starts a server with an empty bucket `bucket` (or, with `TEST_S3_ENDPOINT`, creates a
    /// uniquely named bucket on that server).
    pub async fn start(bucket: &str) -> Result<Self> {
        if let Ok(endpoint) = std::env::var("TEST_S3_ENDPOINT") {
            let access_key =
                std::env::var("TEST_S3_ACCESS_KEY").unwrap_or_else(|_| "minioadmin".into());
            let secret_key =
                std::env::var("TEST_S3_SECRET_KEY").unwrap_or_else(|_| "minioadmin".into());
            let bucket = crate::unique_name(bucket).replace('_', "-");
            let server = Self::connect(endpoint, access_key, secret_key, bucket, None, None);
            server
                .store
                .client()
                .create_bucket()
                .bucket(&server.bucket)
                .send()
                .await
                .context("creating the test bucket")?;
            return Ok(server);
        }
        let root = tempfile::Builder::new().prefix("testbed-s3-").tempdir()?;
        std::fs::create_dir(root.path().join(bucket))?;
        let (access_key, secret_key) = (
            "testbed-access".to_string(),
            "testbed-secret-key".to_string(),
        );
        let fs =
            s3s_fs::FileSystem::new(root.path()).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        let service = builder.build();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let endpoint = listener.local_addr()?.to_string();
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self::connect(
            endpoint,
            access_key,
            secret_key,
            bucket.to_string(),
            Some(root),
            Some(task),
        ))
    }

    fn connect(
        endpoint: String,
        access_key: String,
        secret_key: String,
        bucket: String,
        root: Option<tempfile::TempDir>,
        task: Option<JoinHandle<()>>,
    ) -> Self {
        let settings = ObjectStoreSettings {
            endpoint: endpoint.clone(),
            access_key: Secret::new(access_key.clone()),
            secret_key: Secret::new(secret_key.clone()),
            https: false,
            bucket: bucket.clone(),
        };
        Self {
            store: ObjectStore::new(&settings),
            endpoint,
            access_key,
            secret_key,
            bucket,
            _root: root,
            task,
        }
    }

    /// A client for the bucket.
    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Uploads `body` as `key`; returns the ETag (without quotes).
    pub async fn put(&self, key: &str, body: impl Into<Vec<u8>>) -> Result<String> {
        let resp = self
            .store
            .client()
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .with_context(|| format!("uploading {key}"))?;
        Ok(resp
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.store
            .client()
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("deleting {key}"))?;
        Ok(())
    }

    /// Uploads every file under `dir`, keyed by its path relative to `dir`; returns the keys.
    pub async fn put_tree(&self, dir: &std::path::Path) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in
                std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?
            {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let key = path
                        .strip_prefix(dir)?
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/");
                    self.put(&key, std::fs::read(&path)?).await?;
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}
