//! Writing one object's rows into `measurements`, with its quarantine, the page index and hourly
//! rollup upkeep, and its detection work — all in the object's transaction.
//!
//! Where: `staging` (the staging table and its `COPY`), `merge` (insert or upsert from it, one
//! object or a group), `replace` (held readings written without staging), `straight` (a large
//! object streamed straight into the table), `quarantine`, `mapping`, `work` (the detection
//! queue an object's transaction writes).
//!
//! # Three paths
//!
//! - **Held.** An object of up to a million valid readings ([`crate::ingest::FRESH_MAX`]), the
//!   usual upload, is held in memory by the reader, sorted and collapsed to the last line of
//!   each key; only its rejected rows are staged. [`merge_held`] copies the readings straight
//!   into `measurements` in key order when none of their keys is stored — the work of a bare
//!   `COPY` — and, when the stored readings they beat within their spans are exactly their keys
//!   (a re-upload or a correction), [`replace_held`] deletes those rows and copies the readings
//!   in. Otherwise they are staged after all and take the staged path. A group of small objects
//!   holds each member's readings so too, and [`merge_group_held`] copies them all straight in,
//!   each row with its member's version, when none is stored within the members' spans.
//! - **Streamed in.** An object too large to hold whose held readings are new and distinct
//!   ([`may_stream_in`]) streams the rest of its valid rows straight into `measurements` as it is
//!   read ([`Staging::stream_in`]), a chunk at a time in key order, each chunk followed by the
//!   rollup and page index widened by its hours ([`Staging::stream_sorted`]). A stored or
//!   repeated key met on the way fails the stream: the object is read again and staged.
//! - **Staged.** Every line, valid or rejected, goes through one binary `COPY` into the staging
//!   table, then one set-based merge moves rejected rows into quarantine and writes the valid
//!   ones: all new, inserted as they are ([`INSERT_MEASUREMENTS`]); else upserted
//!   ([`MERGE_MEASUREMENTS`]), repeated keys collapsed to the last line and a stored row
//!   overwritten only by a version that beats the one it came from ([`super::versions`]); the
//!   same version again writes nothing. Objects too large to hold that cannot stream in stage as
//!   they stream (past [`HOURS_MAX`] sensor-hours, the insert counts the rollup's hours itself:
//!   [`INSERT_COUNTED`]); a group of small objects whose readings cannot be copied straight in
//!   stages them tagged with their versions ([`crate::ingest::Grouper`]).
//!
//! Every path keeps the page index (`measurement_days`) and the hourly rollup
//! (`measurement_hours`, what `query-cli plot` draws wide columns from) in step with the rows.
//!
//! # Decisions
//!
//! - The staging table is one temporary table per connection ([`CREATE_STAGING`], run when the
//!   pool opens a connection), `ON COMMIT DELETE ROWS`, shared by both datasets: creating one
//!   per object cost 1 ms of catalog writes, and a second table's truncation at each commit was
//!   23 % of the server's CPU with small objects.
//! - Copying held readings straight in saves the staging `COPY` and the insert from it
//!   (112 ms + 345–364 ms of server time per object of 100,000 readings); replacing instead of
//!   upserting, about a third of a correction's time (see the README's benchmark section).
//! - With detection on, a replacement leaves the rollup hours whose new bounds it cannot tell
//!   marked inexact, their bounds around the readings' (a plot reads such an hour's readings),
//!   for the detection it queues to settle from the held readings where it can prove ([`Link`])
//!   they are all the hour holds (`crate::alerts`): settling them here scanned the hours' other
//!   readings, 0.66–0.72 s of server time for 12 corrections of 100,000 readings.

mod mapping;
mod merge;
mod quarantine;
mod replace;
mod staging;
mod straight;
mod work;

use std::pin::Pin;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CopyInSink, Transaction};

use super::copy::{copy_rows, CopyEncoder};
use super::rollup::{
    copy_new_hours, recompute_hours, rollup_columns, settle_inexact, unnest_hours, widen_hours,
    widen_set, Hour, HourColumns, HOURS_BEFORE, OUTSIDE_HOURS, REPLACE_HOURS, WIDEN_HOURS,
};
use super::versions::{incoming_beats_stored, version_beats};
use crate::contract::{Dataset, Reading, SensorName};
use crate::readings::BySensor;
use crate::time::{day_of, hour_of, instant};

pub use merge::{merge, merge_group, merge_group_held, met_a_stored_key, Member, Merged};
pub use replace::{merge_held, Link};
pub use staging::{Staging, CREATE_STAGING, DAYS_MAX};
pub use straight::{may_stream_in, merge_streamed};
pub use work::{Spans, HOURS_MAX};

use mapping::*;
use merge::*;
use quarantine::*;
use replace::{COPY_NEW, STORED_IN_SPANS};
use staging::*;
use work::*;

#[cfg(test)]
mod tests;
