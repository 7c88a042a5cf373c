//! The S3-compatible object store (MinIO): listing a bucket and streaming one object.
//!
//! Path-style requests, static credentials, no region lookup: exactly what MinIO wants. An object
//! is streamed, never held whole in memory. Errors of the transport are marked as such
//! ([`TransportError`]) so that the reader further down can tell "the network broke" (retry) from
//! "the gzip data is corrupt" (fail the object).

use futures_util::StreamExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls;
use chrono::{DateTime, Utc};
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use crate::config::ObjectStoreSettings;

/// The object store failed or refused a request.
#[derive(Debug, Error)]
pub enum ObjectStoreError {
    #[error("object {key:?} does not exist in bucket {bucket:?}")]
    NotFound { bucket: String, key: String },
    #[error("bucket {bucket:?} does not exist")]
    NoSuchBucket { bucket: String },
    #[error("object store request {operation} failed: {message}")]
    Request {
        operation: &'static str,
        message: String,
    },
}

/// Marks an I/O error as coming from the connection to the object store (not from the data).
#[derive(Debug, Error)]
#[error("reading from the object store failed: {0}")]
pub struct TransportError(#[source] pub std::io::Error);

/// True when `err` (possibly wrapped by a decoder) is a [`TransportError`].
pub fn is_transport_error(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<TransportError>())
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: i64,
}

/// What a HEAD request tells about an object's current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    /// Without quotes.
    pub etag: String,
    pub size: i64,
    /// Last-Modified, when the store reports it.
    pub written_at: Option<DateTime<Utc>>,
}

/// An object being read.
pub struct OpenedObject {
    /// The ETag of the bytes being read, without quotes.
    pub etag: String,
    /// Their write time: Last-Modified as the store reports it (whole seconds over HTTP). A store
    /// that reports none gets the time of the read, so the version read counts as the newest.
    pub written_at: DateTime<Utc>,
    pub size: Option<i64>,
    /// The raw (possibly compressed) bytes.
    pub body: Box<dyn AsyncBufRead + Send + Unpin>,
}

/// A client bound to one bucket.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl ObjectStore {
    pub fn new(settings: &ObjectStoreSettings) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(settings.url())
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                settings.access_key.expose(),
                settings.secret_key.expose(),
                None,
                None,
                "sensor-pipeline-settings",
            ))
            .http_client(http)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .read_timeout(settings.read_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            )
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: settings.bucket.clone(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Every object under `prefix` (all pages), in the store's (lexicographic) order.
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<ListedObject>, ObjectStoreError> {
        let mut out = Vec::new();
        let mut pages = std::pin::pin!(self.list_pages(prefix));
        while let Some(page) = pages.next().await {
            out.extend(page?);
        }
        Ok(out)
    }

    /// The objects under `prefix` a page (up to 1,000) at a time, in the store's order, as the
    /// store answers: a caller can work on the first page while the next is listed.
    pub fn list_pages(
        &self,
        prefix: Option<&str>,
    ) -> impl futures_util::Stream<Item = Result<Vec<ListedObject>, ObjectStoreError>> + 'static
    {
        let pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .set_prefix(prefix.map(str::to_string))
            .into_paginator()
            .send();
        let store = self.clone();
        futures_util::stream::unfold((pages, store), |(mut pages, store)| async move {
            let page = pages
                .next()
                .await?
                .map_err(|e| store.error("ListObjectsV2", None, e));
            let listed = page.map(|page| {
                page.contents()
                    .iter()
                    .filter_map(|obj| {
                        Some(ListedObject {
                            key: obj.key()?.to_string(),
                            size: obj.size().unwrap_or(0),
                        })
                    })
                    .collect()
            });
            Some((listed, (pages, store)))
        })
    }

    /// Whether the store answers (for health checks): any answer but a server error counts — a
    /// missing bucket or a refused request is a misconfiguration, not an outage.
    pub async fn ping(&self) -> Result<(), ObjectStoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() < 500) => Ok(()),
            Err(e) => Err(self.error("HeadBucket", None, e)),
        }
    }

    /// The current version of an object.
    pub async fn head(&self, key: &str) -> Result<ObjectHead, ObjectStoreError> {
        let resp = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("HeadObject", Some(key), e))?;
        let etag = resp
            .e_tag()
            .map(|t| t.trim_matches('"').to_string())
            .unwrap_or_default();
        Ok(ObjectHead {
            etag,
            size: resp.content_length().unwrap_or(0),
            written_at: resp.last_modified().and_then(to_chrono),
        })
    }

    /// Starts reading an object.
    pub async fn open(&self, key: &str) -> Result<OpenedObject, ObjectStoreError> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("GetObject", Some(key), e))?;
        let etag = resp
            .e_tag()
            .map(|t| t.trim_matches('"').to_string())
            .unwrap_or_default();
        let size = resp.content_length();
        let written_at = resp
            .last_modified()
            .and_then(to_chrono)
            .unwrap_or_else(Utc::now);
        let body = TransportRead(resp.body.into_async_read());
        Ok(OpenedObject {
            etag,
            written_at,
            size,
            body: Box::new(body),
        })
    }

    fn error<E, R>(
        &self,
        operation: &'static str,
        key: Option<&str>,
        err: SdkError<E, R>,
    ) -> ObjectStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let code = err
            .as_service_error()
            .and_then(|e| e.code())
            .map(str::to_string);
        match (code.as_deref(), key) {
            (Some("NoSuchKey" | "NotFound"), Some(key)) => {
                return ObjectStoreError::NotFound {
                    bucket: self.bucket.clone(),
                    key: key.to_string(),
                }
            }
            (Some("NoSuchBucket"), _) => {
                return ObjectStoreError::NoSuchBucket {
                    bucket: self.bucket.clone(),
                }
            }
            _ => {}
        }
        ObjectStoreError::Request {
            operation,
            message: error_chain(&err),
        }
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// `err` and its sources, joined by ": ", each said once. (The SDK's `DisplayErrorContext` also
/// appends the whole error's `Debug` form: too long for the one-line reasons that end up in the
/// ledger, logs and dead letters.)
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cur = e.source();
    }
    msg
}

/// Wraps every I/O error of the inner reader in a [`TransportError`].
struct TransportRead<R>(R);

impl<R: AsyncBufRead + Unpin> AsyncRead for TransportRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0)
            .poll_read(cx, buf)
            .map_err(|e| std::io::Error::other(TransportError(e)))
    }
}

impl<R: AsyncBufRead + Unpin> AsyncBufRead for TransportRead<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().0)
            .poll_fill_buf(cx)
            .map_err(|e| std::io::Error::other(TransportError(e)))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.0).consume(amt)
    }
}
