//! The sensor pipeline's shared library.
//!
//! Data flows one way: an object key → [`ingest`] streams the object from the [`object_store`],
//! reads it through the [`contract`] (CSV dialect and field rules), and writes rows, rejected rows
//! and the ledger entry through [`store`] in one transaction. [`config`] holds the typed settings
//! every binary reads. The query side (`query-cli`) shares [`config`] and the schema in
//! `migrations/`, not the ingestion internals — and its build says so: without the `ingest`
//! feature (on by default) the library has no object store, NATS, pool or migration code.

#[cfg(feature = "ingest")]
pub mod alerts;
pub mod anomaly;
pub mod config;
pub mod contract;
pub mod events;
#[cfg(feature = "ingest")]
pub mod ingest;
#[cfg(feature = "ingest")]
pub mod object_store;
#[cfg(feature = "ingest")]
pub mod queue;
#[cfg(feature = "ingest")]
pub mod readings;
pub mod store;
pub mod time;
