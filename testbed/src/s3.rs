//! An S3 server over a temporary folder (`s3s-fs`), served from the caller's runtime.
//!
//! It can stand in for MinIO with its NATS target too ([`S3Server::start_notifying`]): after each
//! successful PUT, multipart completion or copy it publishes, to the events subject, the same
//! notification MinIO would (see `sensor_pipeline::events::object_created`), through JetStream,
//! before the S3 response is sent — so when an upload returns, its event is stored.

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use sensor_pipeline::config::ObjectStoreSettings;
use sensor_pipeline::object_store::ObjectStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Where the stand-in publishes notifications.
#[derive(Clone, Debug)]
pub struct NotifyTarget {
    pub nats_url: String,
    pub subject: String,
    /// Credentials and TLS for NATS (none by default).
    pub auth: sensor_pipeline::config::NatsAuth,
}

/// A running S3 server with one bucket. Stops when dropped.
pub struct S3Server {
    /// `host:port`, no scheme.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    store: ObjectStore,
    notifier: Option<std::sync::Arc<notify::Notifier>>,
    down: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The served folder (built-in server only).
    root_path: Option<std::path::PathBuf>,
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
        Self::start_with(bucket, None).await
    }

    /// Starts a server that publishes MinIO-format notifications to `target` (the stream must
    /// exist, as with MinIO's JetStream mode).
    pub async fn start_notifying(bucket: &str, target: NotifyTarget) -> Result<Self> {
        Self::start_with(bucket, Some(target)).await
    }

    async fn start_with(bucket: &str, target: Option<NotifyTarget>) -> Result<Self> {
        if let Ok(endpoint) = std::env::var("TEST_S3_ENDPOINT") {
            if target.is_some() {
                anyhow::bail!(
                    "this test needs the built-in S3 server, which announces uploads like MinIO \
                     (unset TEST_S3_ENDPOINT for it)"
                );
            }
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
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let path = root.path().to_path_buf();
        Self::serve(&path, listener, bucket, target, Some(root)).await
    }

    /// Serves the folder `root` (kept: for the demo) on `listener`, with the fixed credentials
    /// [`S3Server::ACCESS_KEY`]/[`S3Server::SECRET_KEY`].
    pub async fn serve_folder(
        root: &std::path::Path,
        listener: TcpListener,
        bucket: &str,
        target: Option<NotifyTarget>,
    ) -> Result<Self> {
        Self::serve(root, listener, bucket, target, None).await
    }

    pub const ACCESS_KEY: &str = "testbed-access";
    pub const SECRET_KEY: &str = "testbed-secret-key";

    async fn serve(
        root_path: &std::path::Path,
        listener: TcpListener,
        bucket: &str,
        target: Option<NotifyTarget>,
        root: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        std::fs::create_dir_all(root_path.join(bucket))?;
        let (access_key, secret_key) = (Self::ACCESS_KEY.to_string(), Self::SECRET_KEY.to_string());
        let fs =
            s3s_fs::FileSystem::new(root_path).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        let endpoint = listener.local_addr()?.to_string();
        let notifier = match target {
            None => None,
            Some(t) => Some(std::sync::Arc::new(
                notify::Notifier::connect(
                    t,
                    bucket.to_string(),
                    Self::store_for(&endpoint, &access_key, &secret_key, bucket),
                )
                .await?,
            )),
        };
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = notify::Notifying {
            inner: builder.build(),
            notifier: notifier.clone(),
            bucket: bucket.to_string(),
            down: down.clone(),
        };
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // As MinIO (Go's net package) does: without it, a small body written after the
                // headers waits for the client's delayed ACK (Nagle), 40 ms per GET.
                let _ = socket.set_nodelay(true);
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        let mut server = Self::connect(
            endpoint,
            access_key,
            secret_key,
            bucket.to_string(),
            root,
            Some(task),
        );
        server.notifier = notifier;
        server.down = Some(down);
        server.root_path = Some(root_path.to_path_buf());
        Ok(server)
    }

    /// Simulates an outage: while `down`, every request is answered `503 Service Unavailable`.
    /// Needs the built-in server (an error with `TEST_S3_ENDPOINT`, never a silent no-op).
    pub fn set_down(&self, down: bool) -> Result<()> {
        let d = self.down.as_ref().context(
            "set_down needs the built-in S3 server (unset TEST_S3_ENDPOINT for this test)",
        )?;
        d.store(down, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Stops (true) or resumes (false) publishing notifications, e.g. to put objects that only
    /// a backfill should announce. Needs a notifying server ([`S3Server::start_notifying`]).
    pub fn mute(&self, muted: bool) -> Result<()> {
        let n = self.notifier.as_ref().context(
            "mute needs a notifying built-in S3 server (S3Server::start_notifying; unset TEST_S3_ENDPOINT)",
        )?;
        n.muted.store(muted, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn store_for(endpoint: &str, access_key: &str, secret_key: &str, bucket: &str) -> ObjectStore {
        ObjectStore::new(&ObjectStoreSettings::plain(
            endpoint, access_key, secret_key, bucket,
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
        Self {
            store: Self::store_for(&endpoint, &access_key, &secret_key, &bucket),
            notifier: None,
            down: None,
            root_path: None,
            endpoint,
            access_key,
            secret_key,
            bucket,
            _root: root,
            task,
        }
    }

    /// Sets the write time (Last-Modified) the server reports for `key`'s current version, so a
    /// test decides which version is the newest instead of depending on the clock. Needs the
    /// built-in server (it sets the stored file's modification time).
    pub fn set_written_at(&self, key: &str, at: std::time::SystemTime) -> Result<()> {
        let root = self.root_path.as_ref().context(
            "set_written_at needs the built-in S3 server (unset TEST_S3_ENDPOINT for this test)",
        )?;
        let path = root.join(&self.bucket).join(key);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(at))
            .with_context(|| format!("setting the modification time of {}", path.display()))
    }

    /// Publishes the notification MinIO would for `key`'s current version (also while muted):
    /// with [`S3Server::mute`], a test can change a version (its write time) before announcing it.
    pub async fn announce(&self, key: &str) -> Result<()> {
        let notifier = self
            .notifier
            .as_ref()
            .context("announce needs a notifying S3 server (S3Server::start_notifying)")?;
        notifier.publish_now("s3:ObjectCreated:Put", key).await
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

mod notify {
    //! The MinIO-notification hop: a wrapper around the S3 service.

    use std::sync::Arc;

    use anyhow::{Context, Result};
    use hyper::body::Incoming;
    use hyper::service::Service;
    use hyper::{Method, Request};
    use s3s::service::S3Service;
    use sensor_pipeline::object_store::ObjectStore;

    use super::NotifyTarget;

    pub struct Notifier {
        pub muted: std::sync::atomic::AtomicBool,
        js: async_nats::jetstream::Context,
        subject: String,
        bucket: String,
        store: ObjectStore,
    }

    impl Notifier {
        pub async fn connect(
            target: NotifyTarget,
            bucket: String,
            store: ObjectStore,
        ) -> Result<Self> {
            let servers = sensor_pipeline::queue::server_addrs(&target.nats_url)?;
            let client = sensor_pipeline::queue::connect_options(&target.auth)?
                .connect(servers)
                .await
                .context("connecting the S3 stand-in to NATS")?;
            Ok(Self {
                muted: std::sync::atomic::AtomicBool::new(false),
                js: async_nats::jetstream::new(client),
                subject: target.subject,
                bucket,
                store,
            })
        }

        /// Publishes the notification MinIO would for the object's current version.
        async fn publish(&self, event_name: &str, key: &str) -> Result<()> {
            if self.muted.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            self.publish_now(event_name, key).await
        }

        /// [`Notifier::publish`], muted or not.
        pub async fn publish_now(&self, event_name: &str, key: &str) -> Result<()> {
            let sensor_pipeline::object_store::ObjectHead { etag, size, .. } =
                self.store.head(key).await?;
            let payload =
                sensor_pipeline::events::object_created(event_name, &self.bucket, key, &etag, size);
            self.js
                .publish(self.subject.clone(), payload.into())
                .await?
                .await
                .context("publishing the notification")?;
            Ok(())
        }
    }

    #[derive(Clone)]
    pub struct Notifying {
        pub inner: S3Service,
        pub notifier: Option<Arc<Notifier>>,
        pub bucket: String,
        /// While set, every request gets `503 Service Unavailable` (an outage).
        pub down: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Service<Request<Incoming>> for Notifying {
        type Response = <S3Service as Service<Request<Incoming>>>::Response;
        type Error = <S3Service as Service<Request<Incoming>>>::Error;
        type Future = <S3Service as Service<Request<Incoming>>>::Future;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                let mut response = s3s::HttpResponse::new(s3s::Body::from(
                    "<Error><Code>ServiceUnavailable</Code><Message>testbed outage</Message></Error>"
                        .to_string(),
                ));
                *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                return Box::pin(async move { Ok(response) });
            }
            let event = self
                .notifier
                .as_ref()
                .and_then(|n| classify(&req, &self.bucket).map(|e| (n.clone(), e)));
            let response = Service::call(&self.inner, req);
            Box::pin(async move {
                let response = response.await?;
                if let Some((notifier, (name, key))) = event {
                    if response.status().is_success() {
                        if let Err(e) = notifier.publish(name, &key).await {
                            eprintln!(
                                "testbed S3: cannot publish the notification for {key}: {e:#}"
                            );
                        }
                    }
                }
                Ok(response)
            })
        }
    }

    /// Which MinIO event a request makes, if it succeeds: (event name, object key).
    fn classify<B>(req: &Request<B>, bucket: &str) -> Option<(&'static str, String)> {
        let path = req.uri().path();
        let key = path
            .strip_prefix('/')?
            .strip_prefix(bucket)?
            .strip_prefix('/')?;
        if key.is_empty() {
            return None;
        }
        let key = percent_encoding::percent_decode_str(key)
            .decode_utf8()
            .ok()?
            .into_owned();
        let query = req.uri().query().unwrap_or("");
        let has = |name: &str| {
            query
                .split('&')
                .any(|p| p == name || p.starts_with(&format!("{name}=")))
        };
        match *req.method() {
            Method::PUT if has("partNumber") || has("uploadId") => None,
            Method::PUT if req.headers().contains_key("x-amz-copy-source") => {
                Some(("s3:ObjectCreated:Copy", key))
            }
            Method::PUT => Some(("s3:ObjectCreated:Put", key)),
            Method::POST if has("uploadId") => {
                Some(("s3:ObjectCreated:CompleteMultipartUpload", key))
            }
            _ => None,
        }
    }
}
