//! Writing one object's rows: binary `COPY` into a temporary staging table, then one set-based merge.
//! Where: `staging` (the table and its `COPY`), `merge` (insert or upsert from it, one object or
//! a group), `replace` (held readings written without staging), `quarantine`, `mapping`, `work`
//! (the detection queue an object's transaction writes).
//!
//! Every line of the object, valid or rejected, goes through a single `COPY` stream into a staging
//! table whose rows live only as long as the transaction: valid rows with their fields, rejected
//! rows with their raw bytes and reason. The staging table is a temporary table created once per
//! connection ([`CREATE_STAGING`], run when the pool opens a connection) with `ON COMMIT DELETE
//! ROWS`: creating and dropping a table per object cost 1 ms of catalog writes, the most of any
//! statement for a small object. It is one table for both datasets (each uses its columns):
//! PostgreSQL truncates every such table at each commit, heap, TOAST table and TOAST index, and
//! that truncation was 23% of the server's CPU in the small-objects benchmark with two tables.
//! Memory stays bounded however large the object is. The merge then moves rejected rows into
//! quarantine and writes the valid ones: readings that are all new are inserted as they are
//! ([`INSERT_MEASUREMENTS`], the common case: data arrives once); the others are upserted
//! ([`MERGE_MEASUREMENTS`]), collapsing repeated keys within the object to the last line and
//! overwriting a stored row only with a version that beats the one it came from (see
//! [`super::versions`]); the same version ingested again writes nothing. Either statement keeps
//! the page index (`measurement_days`) and the hourly rollup (`measurement_hours`, what
//! `query-cli plot` draws wide columns from) in step with the rows.
//!
//! A measurement object of up to a million valid readings ([`crate::ingest::FRESH_MAX`]), the
//! usual upload, skips the staging of its valid rows: the reader holds them in memory (sorted
//! and collapsed to the last line of each key once read, which detection wants anyway), only
//! rejected rows are staged, and [`merge_held`] copies them straight into `measurements` in key
//! order when none is stored yet — the work of a bare `COPY`. Measured with `bench-ingest` (24
//! objects of 100,000 readings, detection on): the staging `COPY` (112 ms per object on the
//! server) and the insert from it (345–364 ms) became one `COPY` of the table: the whole run is
//! at 0.71–0.81× of `psql \copy`. Readings that meet stored ones
//! replace them the same way when the stored readings they beat within their spans are exactly
//! their keys (a re-upload or correction: [`replace_held`] deletes those rows and copies the
//! readings in — 12 corrections of 100,000 readings take 4.5–4.8 s, upserted 6.3–6.8 s); otherwise
//! they are staged after all and upserted as below. With detection on, a replacement leaves the
//! rollup hours whose new bounds it cannot tell marked inexact, their bounds around the
//! readings' (a plot reads such an hour's readings), for the detection it queues to settle: that
//! holds the object's readings and, where it can prove they are all the hour holds ([`Link`]),
//! settles the hour from them without a scan (`crate::alerts`). Settling them here scanned the
//! hours' other readings: 0.66–0.72 s of server time for the 12 corrections. Objects too large
//! to hold stage theirs as they stream, and a group of small objects stages its rows tagged with
//! their versions ([`crate::ingest::Grouper`]).

mod mapping;
mod merge;
mod quarantine;
mod replace;
mod staging;
mod work;

use std::pin::Pin;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CopyInSink, Transaction};

use super::copy::CopyEncoder;
use super::rollup::{
    recompute_hours, rollup_columns, settle_inexact, unnest_hours, widen_hours, widen_set, Hour,
    HourColumns, HOURS_BEFORE, OUTSIDE_HOURS, REPLACE_HOURS, WIDEN_HOURS,
};
use super::versions::{incoming_beats_stored, version_beats};
use crate::contract::{Dataset, Reading, SensorName};
use crate::readings::BySensor;
use crate::time::{hour_of, instant};

pub use merge::{merge, merge_group, Member, Merged};
pub use replace::{merge_held, Link};
pub use staging::{Staging, CREATE_STAGING};
pub use work::{Spans, HOURS_MAX};

use mapping::*;
use merge::*;
use quarantine::*;
use staging::*;
use work::*;

#[cfg(test)]
mod tests;
