//! The streaming detector: one per sensor, fed readings in time order. See the module doc of
//! [`crate::anomaly`] for the method.

use super::window::{median_in_place, Ring, SortedRing};
use super::{Anomaly, Kind};
use crate::time::{Micros, DAY_MICROS, HOUR_MICROS};

/// Readings in each half of the local-level window.
const HALF: usize = 16;
/// Accepted residuals the noise scale is the median of.
const RESIDUALS: usize = 256;
/// Residuals needed before anything is reported.
const MIN_RESIDUALS: usize = 128;
/// Threshold in robust standard deviations of the residual.
const Z: f64 = 6.0;
/// The detector's memory of what the sensor does now and then is kept per epoch: the largest
/// residual, the longest run of one value and the longest interval in each of the last `EPOCHS`
/// epochs of `EPOCH_MICROS`, the highest and lowest value in each of the last `RANGE_EPOCHS`
/// (epochs are aligned to the Unix epoch, so two runs over the same readings agree on them
/// wherever they started).
const EPOCH_MICROS: Micros = HOUR_MICROS;
const EPOCHS: usize = 128;
/// What is exceeded in `NOVELTY_RANK` epochs of the memory is not news.
const NOVELTY_RANK: usize = 2;
/// Threshold as a multiple of the residual exceeded in `NOVELTY_RANK` epochs.
const NOVELTY: f64 = 2.0;
/// A reading back within this share of the threshold ends an excursion.
const HYSTERESIS: f64 = 0.5;
/// Readings away from the level that make an excursion a level shift rather than a spike.
const CONFIRM: usize = 6;
/// Epochs in a day: the daily profile compares an epoch with the same epoch of earlier days.
const EPOCHS_PER_DAY: usize = (DAY_MICROS / EPOCH_MICROS) as usize;
/// The cycles a sensor may follow, in epochs: a day and a week. The profile of a cycle is the
/// same epoch of the `DAYS` cycles before.
const CYCLES: [usize; 2] = [EPOCHS_PER_DAY, 7 * EPOCHS_PER_DAY];
/// Earlier cycles a profile is made of (their epochs must be in the season memory).
const DAYS: usize = 3;
/// Of those, how many must have readings in the epoch for the profile to say anything.
const DAYS_MIN: usize = 2;
/// Epochs whose highest and lowest value make the remembered range of values new ground is judged
/// against: two weeks, so that a weekly rhythm has shown its range twice (with five days, a
/// bursty sensor's ordinary busy days kept breaking a calm week's range).
const RANGE_EPOCHS: usize = 2 * 7 * EPOCHS_PER_DAY;
/// Epochs of levels and of value ranges kept: three weeks, for the weekly profile.
const SEASON_EPOCHS: usize = DAYS * 7 * EPOCHS_PER_DAY;
/// Epochs over which a cycle's profile must predict each epoch's level better than the epoch
/// before does …
const DAILY_EPOCHS: usize = 48;
/// … by this factor (root of the summed squared errors), for the sensor to count as following the
/// cycle.
const DAILY_RATIO: f64 = 0.5;
/// When a reading is new ground: beyond the remembered range of values (the `NOVELTY_RANK`-th
/// highest epoch maximum, lowest epoch minimum) by a share of that range.
struct NewGround {
    /// The share of the remembered range …
    share: f64,
    /// … and how many robust standard deviations off the local level the reading must be.
    z: f64,
    /// Epochs remembered before new ground is reported (a day: the range of a daily cycle).
    epochs: usize,
}
const NEW_GROUND: NewGround = NewGround {
    share: 0.1,
    z: 5.0,
    epochs: 24,
};

/// When a run of one value is stuck.
struct Stuck {
    /// The shortest run that can count as stuck.
    min: u32,
    /// A run is stuck when it is this many times longer than the run length exceeded in
    /// `NOVELTY_RANK` epochs.
    factor: f64,
}
const STUCK: Stuck = Stuck {
    min: 12,
    factor: 3.0,
};

/// When the sensor stays away: a run of readings on one side of the middle of the remembered
/// range of values, the side where the memory's readings spent at most `share` of their time (a
/// CPU's busy side, not its idle one; neither side of a cycle or a drift, which split their time),
/// that is `factor` times longer than the `NOVELTY_RANK`-th longest such run of the memory's
/// epochs (and at least `STUCK.min` readings), once a week of runs is remembered — a job that
/// never ends, at a ceiling its jobs reach every few hours. A side never visited in the memory is
/// new ground's business, not this.
struct Stay {
    share: f64,
    factor: f64,
}
const STAY: Stay = Stay {
    share: 1.0 / 3.0,
    factor: 5.0,
};

/// When readings burst: spikes that are each as large as usual, but come more often than ever.
struct Burst {
    /// A burst counts when this many readings passed since the last anomaly or excursion (a burst
    /// after a departure is part of it).
    rest: u32,
    /// A reading is *outstanding* when it is off the local level by this share of the novelty
    /// scale (the residual exceeded in `NOVELTY_RANK` epochs) or of the noise threshold, whichever
    /// is larger …
    share: f64,
    /// … and an epoch with this many times as many outstanding readings as the memory's
    /// `NOVELTY_RANK`-th busiest epoch (and at least `min`) is a burst.
    factor: f64,
    min: f64,
    /// Epochs remembered before a burst is reported: two days, so that what happens once a day
    /// (the edges of a daily cycle) has been seen in two epochs.
    epochs: usize,
}
const BURST: Burst = Burst {
    rest: 96,
    share: 0.5,
    factor: 2.0,
    min: 4.0,
    epochs: 2 * EPOCHS_PER_DAY,
};

/// When a silence is a gap.
struct Gap {
    /// Intervals the typical interval is the median of.
    intervals: usize,
    /// Intervals needed before a gap is reported.
    min_intervals: usize,
    /// A silence is a gap when it is this many times the typical interval …
    factor: f64,
    /// … and this many times the second-longest of the recent intervals, and `NOVELTY` times
    /// the longest interval of the `NOVELTY_RANK`-th epoch of the memory (a sensor that goes
    /// quiet for an hour every day, irregular sampling, does not report each time).
    max_factor: f64,
}
const GAP: Gap = Gap {
    intervals: 256,
    min_intervals: 32,
    factor: 8.0,
    max_factor: 2.0,
};

/// How far before a window's start the detector must begin reading for its state at the start to
/// be that of a run from the beginning of time: its epoch memory (at least) …
pub const WARM_UP_MICROS: i64 =
    (max(SEASON_EPOCHS, RANGE_EPOCHS) as i64 + DAILY_EPOCHS as i64 + 1) * EPOCH_MICROS;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}
/// … and its windows counted in readings.
pub const WARM_UP_READINGS: usize = 2 * RESIDUALS;

/// The version of [`Detector::to_bytes`]' layout *and* of the method: bump it whenever either
/// changes, so that states saved by another version are not resumed.
const STATE_FORMAT: u32 = 14;

/// A streaming detector for one sensor's readings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Detector {
    sensitivity: f64,
    /// Older and newer halves of the local-level window, and the window's timestamps.
    older: SortedRing,
    newer: SortedRing,
    level_ts: Ring<i64>,
    /// |residual| of the last accepted readings.
    residuals: SortedRing,
    /// The residual scale (robust standard deviation) and the novelty scale.
    sigma: f64,
    novelty: f64,
    pending: Option<Excursion>,
    /// The largest |residual| of the current epoch, its readings, and the maxima of past epochs.
    epoch: i64,
    epoch_max: f64,
    epoch_maxima: SortedRing,
    /// The highest and lowest value of the current epoch, and of past epochs (lows negated).
    epoch_high: f64,
    epoch_low: f64,
    highs: SortedRing,
    lows: SortedRing,
    /// The `NOVELTY_RANK`-th lowest and highest level past epochs ended at, over the last
    /// `RANGE_EPOCHS` (from `levels`), and whether the level is beyond them now (one alarm per
    /// departure).
    level_range: (f64, f64),
    level_away: bool,
    /// The epoch of the last level shift reported: the levels and stays of the sensor's earlier
    /// regime are not what it does now (the range of levels and the runs count from there).
    regime_epoch: i64,
    /// The middle of the remembered range the runs and sides of the memory were measured
    /// against (NaN: not yet settled).
    stay_middle: f64,
    /// The run of readings on one side of the middle of the remembered range; per side (below,
    /// above) the longest run that ended in the current epoch, those of past epochs, and the
    /// `NOVELTY_RANK`-th longest of them (see [`STAY`]).
    dwell: Dwell,
    epoch_dwell: [u32; 2],
    dwells: [Ring<u32>; 2],
    usual_dwell: [u32; 2],
    /// Readings on each side in the current epoch, in past epochs, and their sums over the memory.
    epoch_sides: [u32; 2],
    sides: [Ring<u32>; 2],
    side_sums: [u64; 2],
    /// The lowest and highest value of each of the last `SEASON_EPOCHS` epochs (NaN: no
    /// readings), for the profiles of the cycles.
    ranges: Ring<(f32, f32)>,
    /// The last intervals between readings (gaps excluded).
    intervals: SortedRing,
    /// The longest interval of the current epoch (gaps included), and of past epochs.
    epoch_gap: f64,
    epoch_gaps: SortedRing,
    last: Option<(Micros, f64)>,
    /// The run of equal values ending at the last reading; the longest run that ended in this
    /// epoch, and those of past epochs.
    run: Run,
    epoch_run: f64,
    epoch_runs: SortedRing,
    /// Readings since the last anomaly was reported or an excursion was open.
    since_alarm: u32,
    /// The level at the end of each past epoch (NaN: no readings), and per epoch of the last
    /// `DAILY_EPOCHS` how far its level was from each cycle's profile and from the epoch before.
    levels: Ring<f64>,
    cycle_errors: [Ring<f64>; 2],
    hourly_errors: Ring<f64>,
    /// The cycle (in epochs) whose profile predicts this sensor, if any (see
    /// [`Detector::profile`]).
    cycle: Option<usize>,
    /// The current epoch's range and level in the earlier cycles (when there are enough of
    /// them).
    season: Option<Season>,
    /// A reading left that range and nothing was back in it since (one alarm per departure).
    season_away: bool,
    /// No departure from the profile counts before this time (after a level shift).
    season_quiet_until: i64,
    /// Outstanding readings in the current epoch, whether an anomaly was reported in it, and
    /// the count of each past epoch.
    epoch_outstanding: u32,
    epoch_alarmed: bool,
    outstanding: SortedRing,
}

/// What the same epoch of the earlier cycles held.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Season {
    low: f64,
    high: f64,
    level: f64,
}

/// A run of readings on one side of the middle of the remembered range of values.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Dwell {
    side: i8,
    start: Micros,
    len: u32,
    expected: f64,
    /// Whether there was a history of runs when it began (else it is how the sensor is: its
    /// length counts into the memory while it lasts, as a judged run's does when it ends) …
    judged: bool,
    /// … and whether it may still be reported (nothing was reported since it began).
    open: bool,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Run {
    start: Micros,
    end: Micros,
    value: f64,
    len: u32,
    expected: f64,
    /// Whether there was a history of runs when this one began (else nothing says what usual is).
    judged: bool,
}

/// Readings away from the local level, not yet known to be a spike or a level shift.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Excursion {
    start: Micros,
    end: Micros,
    expected: f64,
    side: f64,
    threshold: f64,
    unit: f64,
    extreme: f64,
    values: Vec<(Micros, f64)>,
    /// Started by leaving the profile (see [`Detector::off_season`]).
    seasonal: bool,
    /// Started by new ground too close to the level to stand out: the bound it must stay beyond
    /// to count (as a level shift; it is never a spike).
    ground: Option<f64>,
}

impl Default for Detector {
    fn default() -> Self {
        Self::new(1.0)
    }
}

impl Detector {
    /// A detector; `sensitivity` divides every threshold (1 is the default, 2 reports deviations
    /// half as large, 0.5 only those twice as large).
    pub fn new(sensitivity: f64) -> Self {
        Self {
            sensitivity: if sensitivity > 0.0 { sensitivity } else { 1.0 },
            older: SortedRing::new(HALF),
            newer: SortedRing::new(HALF),
            level_ts: Ring::new(2 * HALF),
            residuals: SortedRing::new(RESIDUALS),
            sigma: 0.0,
            novelty: 0.0,
            pending: None,
            epoch: i64::MIN,
            epoch_max: 0.0,
            epoch_maxima: SortedRing::new(EPOCHS),
            epoch_high: f64::NEG_INFINITY,
            epoch_low: f64::INFINITY,
            highs: SortedRing::new(RANGE_EPOCHS),
            lows: SortedRing::new(RANGE_EPOCHS),
            level_range: (f64::NAN, f64::NAN),
            level_away: false,
            regime_epoch: i64::MIN,
            stay_middle: f64::NAN,
            dwell: Dwell::default(),
            epoch_dwell: [0; 2],
            dwells: [Ring::new(RANGE_EPOCHS), Ring::new(RANGE_EPOCHS)],
            usual_dwell: [0; 2],
            epoch_sides: [0; 2],
            sides: [Ring::new(RANGE_EPOCHS), Ring::new(RANGE_EPOCHS)],
            side_sums: [0; 2],
            ranges: Ring::new(SEASON_EPOCHS),
            intervals: SortedRing::new(GAP.intervals),
            epoch_gap: 0.0,
            epoch_gaps: SortedRing::new(EPOCHS),
            last: None,
            run: Run {
                start: 0,
                end: 0,
                value: f64::NAN,
                len: 0,
                expected: f64::NAN,
                judged: false,
            },
            epoch_run: 0.0,
            epoch_runs: SortedRing::new(EPOCHS),
            levels: Ring::new(SEASON_EPOCHS),
            since_alarm: 0,
            cycle_errors: [Ring::new(DAILY_EPOCHS), Ring::new(DAILY_EPOCHS)],
            hourly_errors: Ring::new(DAILY_EPOCHS),
            cycle: None,
            season: None,
            season_away: false,
            season_quiet_until: i64::MIN,
            epoch_outstanding: 0,
            epoch_alarmed: false,
            outstanding: SortedRing::new(EPOCHS),
        }
    }

    /// Feeds the next reading (`at` in microseconds since the epoch, strictly after the previous
    /// one); appends what it completes to `found`.
    pub fn push(&mut self, at: Micros, value: f64, found: &mut Vec<Anomaly>) {
        let reported = found.len();
        if let Some((previous, last_value)) = self.last {
            self.interval(previous, at, found);
            if value == last_value {
                self.run.len += 1;
                self.run.end = at;
            } else {
                self.end_run(found);
            }
        }
        if self.run.len == 0 {
            self.run = Run {
                start: at,
                end: at,
                value,
                len: 1,
                expected: self.expected(at),
                judged: self.epoch_runs.len() >= NOVELTY_RANK,
            };
        }
        let expected = self
            .pending
            .as_ref()
            .map_or_else(|| self.expected(at), |e| e.expected);
        self.advance_epoch(at);
        self.level(at, value, found);
        if found.len() > reported {
            self.level_away = true;
        } else if self.pending.is_none() {
            self.level_ground(found);
        }
        self.dwell(
            at,
            value,
            expected,
            found.len() > reported || self.pending.is_some(),
            found,
        );
        if found[reported..].iter().any(|a| a.kind == Kind::LevelShift) {
            self.new_regime();
        }
        self.burst(at, value, expected, found.len() > reported, found);
        self.since_alarm = if found.len() > reported || self.pending.is_some() {
            0
        } else {
            self.since_alarm.saturating_add(1)
        };
        self.epoch(value, value - expected);
        self.last = Some((at, value));
    }

    /// The earliest first reading of an anomaly that is still undecided (an excursion not yet
    /// known to be a spike or a level shift, the run of equal values that may yet be stuck):
    /// readings pushed after now can change anomalies starting there or later, and none before.
    pub fn unsettled_since(&self) -> Option<i64> {
        let run = (self.run.len > 0).then_some(self.run.start);
        let excursion = self.pending.as_ref().map(|e| e.start);
        // A run that may yet stay away too long, and a level that may yet leave its range (from
        // the first reading of its window on).
        let dwell = (self.dwell.len > 0 && self.dwell.judged && self.dwell.open)
            .then_some(self.dwell.start);
        let level = (self.level_ts.len() == 2 * HALF).then(|| self.level_ts.get(HALF));
        [run, excursion, dwell, level].into_iter().flatten().min()
    }

    /// What [`Detector::finish`] would report now that more readings could still change (kind and
    /// first reading): the undecided excursion as a spike, the current run as stuck.
    pub fn provisional(&self) -> Vec<(Kind, i64)> {
        let mut out = Vec::new();
        if let Some(e) = self
            .pending
            .as_ref()
            .filter(|e| !e.seasonal && e.ground.is_none())
        {
            out.push((Kind::Spike, e.start));
        }
        if self.run.len > 0 {
            out.push((Kind::Stuck, self.run.start));
        }
        out
    }

    /// The time of the last reading pushed.
    pub fn last_reading(&self) -> Option<i64> {
        self.last.map(|(at, _)| at)
    }

    /// The whole state, to resume later exactly where this detector is ([`Detector::from_bytes`]):
    /// the format version, then the fields (serde, `postcard`'s compact encoding); a few
    /// kilobytes, its windows being bounded.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&(STATE_FORMAT, self)).expect("a detector always serializes")
    }

    /// A detector resumed from [`Detector::to_bytes`]; `None` if the bytes are not a state of
    /// this version of the detector (then start over from the readings).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (version, rest) = postcard::take_from_bytes::<u32>(bytes).ok()?;
        if version != STATE_FORMAT {
            return None;
        }
        let (d, rest) = postcard::take_from_bytes::<Self>(rest).ok()?;
        (rest.is_empty() && d.has_its_shape()).then_some(d)
    }

    /// Whether every window has the capacity this version gives it (and an open excursion no
    /// more readings than decide it): a state that passed for this version's but was not.
    fn has_its_shape(&self) -> bool {
        let sorted = [
            (&self.older, HALF),
            (&self.newer, HALF),
            (&self.residuals, RESIDUALS),
            (&self.epoch_maxima, EPOCHS),
            (&self.highs, RANGE_EPOCHS),
            (&self.lows, RANGE_EPOCHS),
            (&self.intervals, GAP.intervals),
            (&self.epoch_gaps, EPOCHS),
            (&self.epoch_runs, EPOCHS),
            (&self.outstanding, EPOCHS),
        ];
        let rings = [
            (&self.levels, SEASON_EPOCHS),
            (&self.cycle_errors[0], DAILY_EPOCHS),
            (&self.cycle_errors[1], DAILY_EPOCHS),
            (&self.hourly_errors, DAILY_EPOCHS),
        ];
        let counts = [
            &self.dwells[0],
            &self.dwells[1],
            &self.sides[0],
            &self.sides[1],
        ];
        sorted.iter().all(|(r, c)| r.capacity() == *c)
            && counts.iter().all(|r| r.capacity() == RANGE_EPOCHS)
            && rings.iter().all(|(r, c)| r.capacity() == *c)
            && self.level_ts.capacity() == 2 * HALF
            && self.ranges.capacity() == SEASON_EPOCHS
            && self.cycle.is_none_or(|c| CYCLES.contains(&c))
            && self
                .pending
                .as_ref()
                .is_none_or(|e| e.values.len() <= CONFIRM)
    }

    /// Ends the series: reports what is still open (an excursion as a spike, a stuck run).
    pub fn finish(&mut self, found: &mut Vec<Anomaly>) {
        if let Some(e) = self.pending.take() {
            found.extend(e.spike());
        }
        self.end_run(found);
    }

    fn interval(&mut self, previous: Micros, at: Micros, found: &mut Vec<Anomaly>) {
        let dt = (at - previous) as f64;
        let usual = self.epoch_gaps.largest(NOVELTY_RANK);
        self.epoch_gap = self.epoch_gap.max(dt);
        if self.intervals.len() >= GAP.min_intervals {
            let typical = self.intervals.median();
            let threshold = (GAP.factor * typical)
                .max(GAP.max_factor * self.intervals.largest(2))
                .max(NOVELTY * usual);
            if dt > threshold / self.sensitivity {
                found.push(Anomaly {
                    kind: Kind::Gap,
                    start: previous,
                    end: at,
                    value: None,
                    expected: None,
                    score: dt / typical.max(1.0),
                });
                self.relearn(found);
                return;
            }
        }
        self.intervals.push(dt);
    }

    fn end_run(&mut self, found: &mut Vec<Anomaly>) {
        let run = self.run;
        if run.len == 0 {
            return;
        }
        self.run.len = 0;
        let stuck = run.judged && self.is_stuck(run.len);
        self.epoch_run = self.epoch_run.max(run.len as f64);
        if stuck {
            let typical = self.epoch_runs.largest(2).max(1.0);
            found.push(Anomaly {
                kind: Kind::Stuck,
                start: run.start,
                end: run.end,
                value: Some(run.value),
                expected: Some(run.expected).filter(|e| e.is_finite()),
                score: run.len as f64 / typical,
            });
            self.relearn(found);
        }
    }

    /// Forgets the local level (after a gap or a stuck stretch the sensor's level is elsewhere,
    /// and a jump back to it is part of that anomaly, not a level shift of its own).
    fn relearn(&mut self, found: &mut Vec<Anomaly>) {
        if let Some(e) = self.pending.take() {
            found.extend(e.spike());
        }
        self.restart_level(&[]);
    }

    fn is_stuck(&self, len: u32) -> bool {
        self.epoch_runs.len() >= NOVELTY_RANK && {
            let threshold =
                (STUCK.factor * self.epoch_runs.largest(NOVELTY_RANK)).max(STUCK.min as f64);
            len as f64 > threshold / self.sensitivity
        }
    }

    /// The local level at `at`: the median of the newer half, moved along the slope between the
    /// two halves' medians.
    fn expected(&self, at: Micros) -> f64 {
        let newer = self.newer.median();
        if self.older.len() < HALF {
            return newer;
        }
        let older = self.older.median();
        let t_old = self.level_ts.get(HALF / 2) as f64;
        let t_new = self.level_ts.get(HALF + HALF / 2) as f64;
        if t_new <= t_old {
            return newer;
        }
        let moved = newer + (newer - older) / (t_new - t_old) * (at as f64 - t_new);
        moved.clamp(
            self.older.smallest().min(self.newer.smallest()),
            self.older.largest(1).max(self.newer.largest(1)),
        )
    }

    /// The residual size that counts as a deviation, before sensitivity.
    fn unit(&self, expected: f64) -> f64 {
        (Z * self.sigma)
            .max(NOVELTY * self.novelty)
            .max(1e-9 * expected.abs().max(1e-6))
    }

    fn ready(&self) -> bool {
        self.older.is_full() && self.residuals.len() >= MIN_RESIDUALS
    }

    fn level(&mut self, at: Micros, value: f64, found: &mut Vec<Anomaly>) {
        if let Some(mut e) = self.pending.take() {
            let away = (value - e.expected) * e.side;
            // A departure from the profile lasts while the readings stay off what their own
            // epoch held in the cycles before (the level it is measured from is smeared over
            // the cycle's edges when readings are sparse); any other while they stay away from
            // the level they left.
            let stays = if let Some(bound) = e.ground {
                (value - bound) * e.side > 0.0
            } else if e.seasonal {
                self.beyond_profile(value, HYSTERESIS) == e.side
            } else {
                away > e.threshold * HYSTERESIS
            };
            if stays {
                e.end = at;
                if away > (e.extreme - e.expected) * e.side {
                    e.extreme = value;
                }
                e.values.push((at, value));
                if e.values.len() >= CONFIRM {
                    if !e.seasonal {
                        // The profile of the earlier cycles is the old level's: it is not asked
                        // again for days (and by then only if it predicts the new level).
                        self.season_quiet_until = at.saturating_add(DAYS as i64 * DAY_MICROS);
                    }
                    found.push(e.level_shift());
                    self.restart_level(&e.values);
                } else {
                    self.pending = Some(e);
                }
                return;
            }
            found.extend(e.spike());
        }
        let expected = self.expected(at);
        let residual = value - expected;
        if self.ready() && !self.stuck_now() {
            let unit = self.unit(expected);
            let threshold = unit / self.sensitivity;
            // New ground counts when the reading also stands out from the local level (a noisy
            // sensor sets a new high now and then without anything happening).
            let ground = self.new_ground(value);
            let beyond = if residual.abs() > NEW_GROUND.z * self.sigma / self.sensitivity {
                ground
            } else {
                0.0
            };
            if residual.abs() > threshold || beyond != 0.0 {
                let side = if beyond != 0.0 {
                    beyond
                } else {
                    residual.signum()
                };
                self.pending = Some(Excursion {
                    start: at,
                    end: at,
                    expected,
                    side,
                    threshold: threshold.min(residual.abs()).max(unit * 1e-3),
                    unit,
                    extreme: value,
                    values: vec![(at, value)],
                    seasonal: false,
                    ground: None,
                });
                return;
            }
            // New ground the noise scale hides (a sensor whose jumps, a job at full load, widen
            // it): counted only if it lasts.
            if let Some(bound) = self.quiet_ground(ground, expected) {
                self.pending = Some(Excursion {
                    start: at,
                    end: at,
                    expected,
                    side: ground,
                    threshold: unit * 1e-3,
                    unit,
                    extreme: value,
                    values: vec![(at, value)],
                    seasonal: false,
                    ground: Some(bound),
                });
                return;
            }
            if let Some((side, usual)) = self.off_season(at, value) {
                let away = (value - usual).abs();
                self.pending = Some(Excursion {
                    start: at,
                    end: at,
                    expected: usual,
                    side,
                    threshold: away.max(unit * 1e-3),
                    unit,
                    extreme: value,
                    values: vec![(at, value)],
                    seasonal: true,
                    ground: None,
                });
                return;
            }
        }
        self.accept(at, value, residual);
    }

    /// The range of values the memory holds: the `NOVELTY_RANK`-th lowest epoch low and highest
    /// epoch high, widened by the current epoch's.
    fn remembered_range(&self) -> (f64, f64) {
        let high = self.highs.largest(NOVELTY_RANK).max(self.epoch_high);
        let low = (-self.lows.largest(NOVELTY_RANK)).min(self.epoch_low);
        (low, high)
    }

    /// Reports a level shift when the local level (its window full) settles beyond every value the
    /// memory holds (the remembered range of values) and beyond the levels its epochs ended at by
    /// the margin new ground needs: a sensor that settles where it never was, though no single
    /// reading is far enough off the level, or off the range, to count (a service dying a little
    /// below a busy CPU's quiet readings). Once per departure: not again until the level is back
    /// within those bounds, nor after another anomaly until then.
    fn level_ground(&mut self, found: &mut Vec<Anomaly>) {
        if !self.newer.is_full()
            || !self.older.is_full()
            || self.highs.len() < NEW_GROUND.epochs
            || self.epoch.saturating_sub(self.regime_epoch) <= NEW_GROUND.epochs as i64
        {
            return;
        }
        let level = self.newer.median();
        let (low, high) = self.level_range;
        // The values of past epochs only: the current one's are the departure's own.
        let (value_low, value_high) = (
            -self.lows.largest(NOVELTY_RANK),
            self.highs.largest(NOVELTY_RANK),
        );
        let margin = NEW_GROUND.share * (value_high - value_low) / self.sensitivity;
        if !(high - low).is_finite() || !margin.is_finite() {
            return;
        }
        let (side, edge, bound) = if level > (high + margin).max(value_high) {
            (1.0, high, (high + margin).max(value_high))
        } else if level < (low - margin).min(value_low) {
            (-1.0, low, (low - margin).min(value_low))
        } else {
            self.level_away = false;
            return;
        };
        if std::mem::replace(&mut self.level_away, true) {
            return;
        }
        // The departure began at the first reading of the level's window beyond the bound.
        let first = (0..HALF)
            .find(|&i| (self.newer.get(i) - bound) * side > 0.0)
            .unwrap_or(0);
        found.push(Anomaly {
            kind: Kind::LevelShift,
            start: self.level_ts.get(HALF + first),
            end: self.level_ts.get(2 * HALF - 1),
            value: Some(level),
            expected: Some(edge),
            score: (level - edge).abs() / margin.max(f64::MIN_POSITIVE),
        });
    }

    /// A level shift was reported: forget the stays of the regime before it (the range of levels
    /// counts from here too, see [`Detector::close_epoch`]).
    fn new_regime(&mut self) {
        self.regime_epoch = self.epoch;
        self.forget_stays();
    }

    /// Forgets the runs and the time on each side (they were measured against another middle).
    fn forget_stays(&mut self) {
        self.stay_middle = f64::NAN;
        for side in 0..2 {
            self.dwells[side].clear();
            self.sides[side].clear();
        }
        self.side_sums = [0; 2];
        self.epoch_dwell = [0; 2];
        self.epoch_sides = [0; 2];
        self.usual_dwell = [0; 2];
        self.dwell = Dwell::default();
    }

    /// Counts the reading into the run on its side of the middle of the remembered range; reports
    /// a level shift when the run stays away (see [`STAY`]) — once per run, and not when something
    /// else was reported since it began (that is the same event).
    fn dwell(
        &mut self,
        at: Micros,
        value: f64,
        expected: f64,
        alarmed: bool,
        found: &mut Vec<Anomaly>,
    ) {
        let (low, high) = self.remembered_range();
        if self.highs.len() < NEW_GROUND.epochs || !(high - low).is_finite() {
            return;
        }
        let side = i8::from(value > (low + high) / 2.0);
        if side != self.dwell.side || self.dwell.len == 0 {
            let ended = &mut self.epoch_dwell[self.dwell.side as usize];
            *ended = (*ended).max(self.dwell.len);
            self.dwell = Dwell {
                side,
                start: at,
                len: 0,
                expected,
                // A week of runs remembered (since the start or since they were forgotten): a
                // weekly rhythm's stays have been seen (a Monday's rush after a weekend without).
                judged: self.dwells[side as usize].len() >= CYCLES[1],
                open: true,
            };
        }
        self.dwell.len += 1;
        self.epoch_sides[side as usize] += 1;
        let total = (self.side_sums[0] + self.side_sums[1]) as f64;
        let away = self.side_sums[side as usize] as f64 <= STAY.share * total;
        if alarmed {
            self.dwell.open = false;
        }
        let usual = f64::from(self.usual_dwell[side as usize]);
        let threshold = (STAY.factor * usual).max(STUCK.min as f64) / self.sensitivity;
        if away
            && usual > 0.0
            && self.dwell.judged
            && self.dwell.open
            && f64::from(self.dwell.len) > threshold
        {
            self.dwell.open = false;
            found.push(Anomaly {
                kind: Kind::LevelShift,
                start: self.dwell.start,
                end: at,
                value: Some(value),
                expected: Some(self.dwell.expected),
                score: f64::from(self.dwell.len) / usual.max(1.0),
            });
        }
    }

    /// +1 when `value` is above the recent range of values by a clear margin, -1 below, else 0.
    fn new_ground(&self, value: f64) -> f64 {
        let (low, high) = self.remembered_range();
        if self.highs.len() < NEW_GROUND.epochs || !(high - low).is_finite() {
            return 0.0;
        }
        let margin = NEW_GROUND.share * (high - low) / self.sensitivity;
        if value > high + margin {
            1.0
        } else if value < low - margin {
            -1.0
        } else {
            0.0
        }
    }

    /// For new ground on `side` (±1, 0: none) without the margin from the level, `expected`,
    /// when that level is inside the remembered range (not one relearned beyond it after a level
    /// shift): the bound (half the margin inside the range's edge) the following readings must
    /// stay beyond.
    fn quiet_ground(&self, side: f64, expected: f64) -> Option<f64> {
        let (low, high) = self.remembered_range();
        if side == 0.0 || !(low..=high).contains(&expected) {
            return None;
        }
        let margin = HYSTERESIS * NEW_GROUND.share * (high - low) / self.sensitivity;
        Some(if side > 0.0 {
            high + margin
        } else {
            low - margin
        })
    }

    /// +1 (or -1) when `value` is above (or below) what the current epoch held in the earlier
    /// cycles by `share` of the margin a departure needs; else 0.
    fn beyond_profile(&self, value: f64, share: f64) -> f64 {
        let Some(season) = self.season else {
            return 0.0;
        };
        let (low, high) = self.remembered_range();
        let margin = share * NEW_GROUND.share * (high - low) / self.sensitivity;
        if !margin.is_finite() {
            0.0
        } else if value > season.high + margin {
            1.0
        } else if value < season.low - margin {
            -1.0
        } else {
            0.0
        }
    }

    /// For a sensor that follows a cycle: +1 (or -1) and the usual level when `value` is above
    /// (or below) what the same epoch held in each of the earlier cycles by a clear margin — the
    /// first reading of such a departure only.
    fn off_season(&mut self, at: Micros, value: f64) -> Option<(f64, f64)> {
        let season = self.season?;
        let side = self.beyond_profile(value, 1.0);
        if side == 0.0 {
            self.season_away = false;
            return None;
        }
        if self.cycle.is_none()
            || at < self.season_quiet_until
            || std::mem::replace(&mut self.season_away, true)
        {
            return None;
        }
        Some((side, season.level))
    }

    /// Counts an outstanding reading into the current epoch; reports the reading that makes the
    /// epoch a burst (unless an anomaly was reported in the epoch already, or the reading begins
    /// an excursion: that is reported in its own right).
    fn burst(
        &mut self,
        at: Micros,
        value: f64,
        expected: f64,
        alarmed: bool,
        found: &mut Vec<Anomaly>,
    ) {
        self.epoch_alarmed |= alarmed;
        let residual = value - expected;
        let scale = self.novelty.max(Z * self.sigma);
        let outstanding = self.ready() && scale > 0.0 && residual.abs() > BURST.share * scale;
        if !outstanding {
            return;
        }
        self.epoch_outstanding += 1;
        if self.epoch_alarmed
            || self.since_alarm <= BURST.rest
            || self.outstanding.len() < BURST.epochs
            || self.pending.as_ref().is_some_and(|e| e.start == at)
        {
            return;
        }
        let limit = (BURST.factor * self.outstanding.largest(NOVELTY_RANK)).max(BURST.min)
            / self.sensitivity;
        if f64::from(self.epoch_outstanding) >= limit {
            self.epoch_alarmed = true;
            found.push(Anomaly {
                kind: Kind::Spike,
                start: at,
                end: at,
                value: Some(value),
                expected: Some(expected),
                score: f64::from(self.epoch_outstanding) / limit,
            });
        }
    }

    /// Whether the current run is already long enough to be stuck (its readings then teach the
    /// detector nothing about the sensor's noise).
    fn stuck_now(&self) -> bool {
        self.run.judged && self.run.len > STUCK.min && self.is_stuck(self.run.len)
    }

    fn accept(&mut self, at: Micros, value: f64, residual: f64) {
        self.add_to_level(at, value);
        if self.stuck_now() || !residual.is_finite() {
            return;
        }
        self.residuals.push(residual.abs());
        self.sigma = 1.4826 * self.residuals.median();
    }

    /// Closes the current epoch if `at` is past it (before the reading at `at` is judged, so that
    /// it is judged with what the epochs before it held).
    fn advance_epoch(&mut self, at: Micros) {
        let epoch = at.div_euclid(EPOCH_MICROS);
        if epoch != self.epoch {
            if self.epoch != i64::MIN {
                self.close_epoch(epoch);
            }
            self.epoch = epoch;
        }
    }

    /// Adds a reading to the current epoch's memory. Its residual counts only when the local level
    /// was established (its window full: not while it is learned after the first reading or
    /// relearned after an anomaly, when the level is a guess) and, until the first
    /// `MIN_RESIDUALS` residuals are in, only if it is a departure by the noise scale of the time
    /// (an edge the warm-up saw is known later; the ordinary residuals of a start-up transient,
    /// measured with a noise scale still settling, are not what the sensor does).
    fn epoch(&mut self, value: f64, residual: f64) {
        let settled = self.residuals.len() >= MIN_RESIDUALS || residual.abs() > Z * self.sigma;
        if residual.is_finite() && self.older.is_full() && settled {
            self.epoch_max = self.epoch_max.max(residual.abs());
        }
        self.epoch_high = self.epoch_high.max(value);
        self.epoch_low = self.epoch_low.min(value);
    }

    /// Stores the current epoch; epochs without readings between it and `next` count as quiet
    /// ones (nothing exceeded, no range).
    fn close_epoch(&mut self, next: i64) {
        if !self.run.judged {
            // A run that began before there was any history is how this sensor is (a constant
            // one is not stuck); a judged run counts when it ends.
            self.epoch_run = self.epoch_run.max(self.run.len as f64);
        }
        self.epoch_maxima.push(self.epoch_max);
        self.epoch_runs.push(self.epoch_run);
        self.epoch_gaps.push(self.epoch_gap);
        self.outstanding.push(f64::from(self.epoch_outstanding));
        for side in 0..2 {
            // A judged run counts when it ends; one that began before there was any history is
            // how this sensor is, and counts while it lasts.
            let current = if self.dwell.side as usize == side && !self.dwell.judged {
                self.dwell.len
            } else {
                0
            };
            let longest = std::mem::take(&mut self.epoch_dwell[side]).max(current);
            self.dwells[side].push(longest);
            let count = std::mem::take(&mut self.epoch_sides[side]);
            let gone = self.sides[side].push(count).unwrap_or(0);
            self.side_sums[side] = self.side_sums[side] + u64::from(count) - u64::from(gone);
        }
        self.highs.push(self.epoch_high);
        self.lows.push(-self.epoch_low);
        let range = if self.epoch_high >= self.epoch_low {
            (self.epoch_low as f32, self.epoch_high as f32)
        } else {
            (f32::NAN, f32::NAN)
        };
        self.ranges.push(range);
        // Epochs without readings (at most as many as any memory holds).
        let quiet =
            (next - self.epoch - 1).clamp(0, max(SEASON_EPOCHS, RANGE_EPOCHS) as i64) as usize;
        for _ in 0..quiet.min(RANGE_EPOCHS) {
            self.highs.push(f64::NEG_INFINITY);
            self.lows.push(f64::NEG_INFINITY);
            for side in 0..2 {
                self.dwells[side].push(0);
                let gone = self.sides[side].push(0).unwrap_or(0);
                self.side_sums[side] -= u64::from(gone);
            }
        }
        for _ in 0..quiet.min(EPOCHS) {
            self.epoch_maxima.push(0.0);
            self.epoch_runs.push(0.0);
            self.epoch_gaps.push(0.0);
            self.outstanding.push(0.0);
        }
        for _ in 0..quiet {
            self.ranges.push((f32::NAN, f32::NAN));
        }
        self.novelty = self.epoch_maxima.largest(NOVELTY_RANK);
        self.profile(quiet);
        // When the middle of the remembered range has moved by the new-ground margin (a regime
        // or an anomaly left the two weeks, a drift), the runs were measured against another
        // middle: they count from here.
        let (low, high) = (
            -self.lows.largest(NOVELTY_RANK),
            self.highs.largest(NOVELTY_RANK),
        );
        let middle = (low + high) / 2.0;
        if (middle - self.stay_middle).abs() > NEW_GROUND.share * (high - low) {
            self.forget_stays();
        }
        if self.stay_middle.is_nan() && middle.is_finite() {
            self.stay_middle = middle;
        }
        let regime = (next - 1).saturating_sub(self.regime_epoch);
        self.level_range = level_range(&self.levels, regime.clamp(0, RANGE_EPOCHS as i64) as usize);
        self.usual_dwell = [0, 1].map(|side| kth_largest(&self.dwells[side], NOVELTY_RANK));

        self.epoch_max = 0.0;
        self.epoch_run = 0.0;
        self.epoch_gap = 0.0;
        self.epoch_outstanding = 0;
        self.epoch_alarmed = false;
        self.epoch_high = f64::NEG_INFINITY;
        self.epoch_low = f64::INFINITY;
    }

    /// Records the closing epoch's level (and `quiet` epochs without readings after it), judges
    /// which cycle's profile predicts the sensor, and sets the next epoch's [`Season`].
    ///
    /// A cycle's profile predicts the sensor when, in squared errors summed over the last
    /// `DAILY_EPOCHS` epochs, the median level of the same epoch in the `DAYS` earlier cycles
    /// misses an epoch's level by at most `DAILY_RATIO`² of what the level of the epoch before
    /// misses it by: true of a cycle with steep edges, not of noise (both miss by about as much:
    /// some 0.7 in squares) nor of a drift (the hour before is nearer). Squares, because what a cycle
    /// predicts is its edges: a road's rush hours on an otherwise flat, noisy day were outweighed
    /// by the flat hours' noise in absolute errors (weekly profile 61 against the hour before's
    /// 100). The sensor follows the longest cycle that predicts it: what repeats every day
    /// repeats every week too, and only the weekly profile knows the weekend.
    fn profile(&mut self, quiet: usize) {
        let level = self.newer.median();
        let previous = self.levels.recent(1).unwrap_or(f64::NAN);
        for (errors, cycle) in self.cycle_errors.iter_mut().zip(CYCLES) {
            errors.push((level - usual_level(&self.levels, cycle)).abs());
        }
        self.hourly_errors.push((level - previous).abs());
        self.levels.push(level);
        for _ in 0..quiet {
            for errors in &mut self.cycle_errors {
                errors.push(f64::NAN);
            }
            self.hourly_errors.push(f64::NAN);
            self.levels.push(f64::NAN);
        }
        let hourly_errors = &self.hourly_errors;
        self.cycle = CYCLES
            .into_iter()
            .zip(&self.cycle_errors)
            .rev()
            .find(|(_, errors)| predicts(errors, hourly_errors))
            .map(|(cycle, _)| cycle);
        let cycle = self.cycle.unwrap_or(EPOCHS_PER_DAY);
        let (mut low, mut high, mut days) = (f64::INFINITY, f64::NEG_INFINITY, 0);
        for k in 1..=DAYS {
            let (l, h) = self
                .ranges
                .recent(k * cycle)
                .unwrap_or((f32::NAN, f32::NAN));
            let (l, h) = (f64::from(l), f64::from(h));
            if h.is_finite() && l.is_finite() {
                high = high.max(h);
                low = low.min(l);
                days += 1;
            }
        }
        // What the same epoch held a week before is not news to a daily profile either: a
        // sensor that rests at weekends is judged by its daily profile until its weekly one is
        // known, and its second Saturday is then like its first.
        if cycle == EPOCHS_PER_DAY {
            if let Some((l, h)) = self.ranges.recent(7 * EPOCHS_PER_DAY) {
                let (l, h) = (f64::from(l), f64::from(h));
                if h.is_finite() && l.is_finite() {
                    high = high.max(h);
                    low = low.min(l);
                }
            }
        }
        // The levels ring's newest is now the epoch before the next one.
        let usual = usual_level(&self.levels, cycle);
        self.season = (days >= DAYS_MIN && usual.is_finite()).then_some(Season {
            low,
            high,
            level: usual,
        });
    }

    fn add_to_level(&mut self, at: Micros, value: f64) {
        if let Some(out) = self.newer.push(value) {
            self.older.push(out);
        }
        self.level_ts.push(at);
    }

    fn restart_level(&mut self, values: &[(Micros, f64)]) {
        self.older.clear();
        self.newer.clear();
        self.level_ts.clear();
        for &(at, value) in values {
            self.add_to_level(at, value);
        }
    }
}

/// The `NOVELTY_RANK`-th lowest and highest of the finite levels of the last `epochs` epochs
/// (NaN when there are fewer).
fn level_range(levels: &Ring<f64>, epochs: usize) -> (f64, f64) {
    let mut low = [f64::INFINITY; NOVELTY_RANK];
    let mut high = [f64::NEG_INFINITY; NOVELTY_RANK];
    for i in levels.len().saturating_sub(epochs)..levels.len() {
        let v = levels.get(i);
        if v.is_finite() {
            if v < low[NOVELTY_RANK - 1] {
                low[NOVELTY_RANK - 1] = v;
                low.sort_by(f64::total_cmp);
            }
            if v > high[NOVELTY_RANK - 1] {
                high[NOVELTY_RANK - 1] = v;
                high.sort_by(|a, b| b.total_cmp(a));
            }
        }
    }
    let (low, high) = (low[NOVELTY_RANK - 1], high[NOVELTY_RANK - 1]);
    if low.is_finite() && high.is_finite() {
        (low, high)
    } else {
        (f64::NAN, f64::NAN)
    }
}

/// The `k`-th largest count in `ring` (0 when it holds fewer).
fn kth_largest(ring: &Ring<u32>, k: usize) -> u32 {
    let mut top = vec![0; k];
    for i in 0..ring.len() {
        let v = ring.get(i);
        if v > top[k - 1] {
            top[k - 1] = v;
            top.sort_unstable_by(|a, b| b.cmp(a));
        }
    }
    top[k - 1]
}

/// Whether a profile whose misses per epoch are `errors` predicts better than the epoch before,
/// whose misses are `hourly` (see [`Detector::profile`]).
fn predicts(errors: &Ring<f64>, hourly: &Ring<f64>) -> bool {
    let (mut missed, mut moved, mut n) = (0.0, 0.0, 0);
    for i in 0..errors.len() {
        let (d, h) = (errors.get(i), hourly.get(i));
        if d.is_finite() && h.is_finite() {
            missed += d * d;
            moved += h * h;
            n += 1;
        }
    }
    n == DAILY_EPOCHS && moved > 0.0 && missed <= DAILY_RATIO * DAILY_RATIO * moved
}

/// The median level, in the `DAYS` earlier cycles of `cycle` epochs, of the epoch after the newest
/// in `levels` (NaN
/// unless `DAYS_MIN` of them had readings).
fn usual_level(levels: &Ring<f64>, cycle: usize) -> f64 {
    let mut usual: Vec<f64> = (1..=DAYS)
        .filter_map(|k| levels.recent(k * cycle))
        .filter(|v| v.is_finite())
        .collect();
    if usual.len() >= DAYS_MIN {
        median_in_place(&mut usual)
    } else {
        f64::NAN
    }
}

impl Excursion {
    /// The excursion as a spike; none for a departure from the profile (which counts
    /// only once it lasts: as a level shift).
    fn spike(&self) -> Option<Anomaly> {
        (!self.seasonal && self.ground.is_none()).then(|| Anomaly {
            kind: Kind::Spike,
            start: self.start,
            end: self.end,
            value: Some(self.extreme),
            expected: Some(self.expected),
            score: (self.extreme - self.expected).abs() / self.unit,
        })
    }

    fn level_shift(&self) -> Anomaly {
        let mut values: Vec<f64> = self.values.iter().map(|&(_, v)| v).collect();
        let level = median_in_place(&mut values);
        Anomaly {
            kind: Kind::LevelShift,
            start: self.start,
            end: self.end,
            value: Some(self.extreme),
            expected: Some(self.expected),
            score: (level - self.expected).abs() / self.unit,
        }
    }
}
