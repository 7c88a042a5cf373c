//! The sensor pipeline's shared library.
//!
//! Data flows one way: an object key → [`ingest`] streams the object from the [`object_store`],
//! reads it through the [`contract`] (CSV dialect and field rules), and writes rows, rejected rows
//! and the ledger entry through [`store`] in one transaction. [`config`] holds the typed settings
//! every binary reads. The query side (`query-cli`) shares [`config`] and the schema in
//! `migrations/`, not the ingestion internals.

pub mod config;
pub mod contract;
pub mod events;
pub mod ingest;
pub mod object_store;
pub mod queue;
pub mod store;
