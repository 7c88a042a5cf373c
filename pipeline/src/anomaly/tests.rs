//! The detector on synthetic series: exact detections where the truth is unambiguous, (almost)
//! nothing on pure noise of any scale, and the same result wherever the window begins.

use super::{detect, Anomaly, Detector, Kind, WARM_UP_MICROS, WARM_UP_READINGS};
use testbed::rng::Rng;

const T0: i64 = 1_356_998_400_000_000; // 2013-01-01T00:00:00Z
const MINUTE: i64 = 60_000_000;

/// `n` readings every `step`, from `f(i, rng)`.
fn series(n: usize, step: i64, seed: u64, f: impl Fn(usize, &mut Rng) -> f64) -> Vec<(i64, f64)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| (T0 + i as i64 * step, f(i, &mut rng)))
        .collect()
}

fn kinds(found: &[Anomaly]) -> Vec<(Kind, i64, i64)> {
    found.iter().map(|a| (a.kind, a.start, a.end)).collect()
}

fn at(i: usize, step: i64) -> i64 {
    T0 + i as i64 * step
}

#[test]
fn white_noise_of_any_scale_is_nearly_silent() {
    for (seed, scale, level) in [
        (1, 1e-6, 0.0),
        (2, 1.0, 20.0),
        (3, 1e6, -5e7),
        (4, 0.3, 1e9),
    ] {
        let s = series(200_000, MINUTE, seed, |_, r| level + scale * r.normal());
        let found = detect(s, 1.0);
        // 200,000 readings of white noise: one spike on one seed, none on the others.
        let expected = match seed {
            2 => vec![(Kind::Spike, 1_360_493_880_000_000, 1_360_493_880_000_000)],
            _ => vec![],
        };
        assert_eq!(kinds(&found), expected, "scale {scale}");
    }
}

#[test]
fn a_spike_on_a_clean_and_on_a_noisy_series() {
    for (seed, noise) in [(5, 0.0), (6, 0.01), (7, 2.0)] {
        let s = series(20_000, MINUTE, seed, |i, r| {
            20.0 + noise * r.normal()
                + if i == 15_000 {
                    30.0 + 40.0 * noise
                } else {
                    0.0
                }
        });
        let found = detect(s.clone(), 1.0);
        assert_eq!(
            kinds(&found),
            [(Kind::Spike, at(15_000, MINUTE), at(15_000, MINUTE))],
            "noise {noise}"
        );
        assert_eq!(found[0].value, Some(s[15_000].1));
        let expected = found[0].expected.unwrap();
        assert!((expected - 20.0).abs() < 0.5 + noise, "expected {expected}");
        assert!(found[0].score > 1.0);
    }
}

#[test]
fn a_level_shift_starts_at_the_first_reading_at_the_new_level() {
    let s = series(20_000, MINUTE, 8, |i, r| {
        10.0 + 0.5 * r.normal() + if i >= 12_345 { 8.0 } else { 0.0 }
    });
    let found = detect(s, 1.0);
    assert_eq!(kinds(&found).len(), 1, "{found:?}");
    assert_eq!(found[0].kind, Kind::LevelShift);
    assert_eq!(found[0].start, at(12_345, MINUTE));
    assert!((found[0].expected.unwrap() - 10.0).abs() < 0.5);
}

#[test]
fn a_stuck_stretch_and_a_gap_exactly() {
    // A daily cycle every 5 minutes; readings 10,000..10,099 repeat one value; 10,500..10,699 missing.
    let step = 5 * MINUTE;
    let mut s = series(20_000, step, 9, |i, r| {
        let day = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
        ((15.0 + 5.0 * day.sin() + 0.2 * r.normal()) * 1000.0).round() / 1000.0
    });
    let frozen = s[10_000].1;
    for r in &mut s[10_000..10_100] {
        r.1 = frozen;
    }
    s.retain(|&(t, _)| !(at(10_500, step)..at(10_700, step)).contains(&t));
    let found = detect(s, 1.0);
    assert_eq!(
        kinds(&found),
        [
            (Kind::Stuck, at(10_000, step), at(10_099, step)),
            (Kind::Gap, at(10_499, step), at(10_700, step)),
        ]
    );
    assert_eq!(found[0].value, Some(frozen));
    assert_eq!((found[1].value, found[1].expected), (None, None));
    assert!((found[1].score - 201.0).abs() < 1e-9, "{}", found[1].score);
}

#[test]
fn a_daily_cycle_alone_is_not_anomalous_and_a_spike_on_it_is() {
    let step = 5 * MINUTE;
    let s = series(30 * 288, step, 10, |i, r| {
        let day = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
        20.0 + 8.0 * day.sin() + 0.3 * r.normal() + if i == 6_000 { -12.0 } else { 0.0 }
    });
    let found = detect(s, 1.0);
    assert_eq!(
        kinds(&found),
        [(Kind::Spike, at(6_000, step), at(6_000, step))]
    );
}

#[test]
fn irregular_sampling_with_a_spike() {
    let mut rng = Rng(11);
    let mut t = T0;
    let mut s = Vec::new();
    for i in 0..30_000 {
        t += 30_000_000 + (rng.unit() * 60_000_000.0) as i64; // 30 to 90 s apart
        s.push((
            t,
            5.0 + 0.1 * rng.normal() + if i == 20_000 { 3.0 } else { 0.0 },
        ));
    }
    let spike_at = s[20_000].0;
    let found = detect(s, 1.0);
    assert_eq!(kinds(&found), [(Kind::Spike, spike_at, spike_at)]);
}

#[test]
fn sensitivity_scales_the_thresholds() {
    let s = series(20_000, MINUTE, 12, |i, r| {
        1.0 + 0.1 * r.normal() + if i == 15_000 { 0.9 } else { 0.0 }
    });
    assert_eq!(detect(s.clone(), 1.0).len(), 1);
    assert_eq!(detect(s, 0.25).len(), 0);
}

#[test]
fn a_window_does_not_depend_on_where_it_begins() {
    // Three weeks of 1-minute readings with a cycle, noise, spikes, a shift, a stuck stretch.
    let s = series(30_000, MINUTE, 13, |i, r| {
        let day = (i % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
        let mut v = 50.0 + 10.0 * day.sin() + 0.5 * r.normal();
        if i % 7_000 == 6_500 {
            v += 25.0;
        }
        if i >= 22_000 {
            v += 6.0;
        }
        if (26_000..26_200).contains(&i) {
            v = 0.0;
        }
        v
    });
    // What the CLI does: read from the warm-up before `start`, keep anomalies starting in it.
    let window = |start: usize| -> Vec<Anomaly> {
        let start_at = s[start].0;
        let from = (start_at - WARM_UP_MICROS).min(s[start.saturating_sub(WARM_UP_READINGS)].0);
        let mut d = Detector::new(1.0);
        let mut found = Vec::new();
        for &(t, v) in s.iter().filter(|(t, _)| *t >= from) {
            d.push(t, v, &mut found);
        }
        d.finish(&mut found);
        found.retain(|a| a.start >= start_at);
        found.sort_by_key(|a| (a.start, a.kind));
        found
    };
    let reference = window(20_000);
    assert!(reference.len() >= 3, "{reference:?}");
    for earlier in [19_000, 15_000, 9_000, 0] {
        assert_eq!(
            window(earlier)
                .into_iter()
                .filter(|a| a.start >= s[20_000].0)
                .collect::<Vec<_>>(),
            reference,
            "from {earlier}"
        );
    }
}

#[test]
fn a_resumed_state_continues_exactly_where_it_was_saved() {
    // The same kind of series, cut at many points (inside an excursion, a stuck run, a gap).
    let s = series(12_000, MINUTE, 17, |i, r| {
        let day = (i % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
        let mut v = 50.0 + 10.0 * day.sin() + 0.5 * r.normal();
        if i % 2_500 == 2_000 {
            v += 25.0;
        }
        if i >= 9_000 {
            v += 6.0;
        }
        if (10_000..10_200).contains(&i) {
            v = 0.0;
        }
        v
    })
    .into_iter()
    .enumerate()
    .filter(|(i, _)| !(11_000..11_300).contains(i))
    .map(|(_, r)| r)
    .collect::<Vec<_>>();
    let whole = detect(s.clone(), 1.0);
    assert!(whole.len() >= 5, "{whole:?}");
    for cut in [
        1, 100, 2_000, 2_001, 4_500, 9_000, 9_002, 10_100, 10_990, 11_500,
    ] {
        let mut d = Detector::new(1.0);
        let mut found = Vec::new();
        for &(t, v) in &s[..cut] {
            d.push(t, v, &mut found);
        }
        let bytes = d.to_bytes();
        assert!(bytes.len() < 20 * 1024, "{} bytes", bytes.len());
        let unsettled = d.unsettled_since();
        let mut resumed = Detector::from_bytes(&bytes).expect("a state of this version");
        assert_eq!(resumed.last_reading(), Some(s[cut - 1].0));
        let mut later = Vec::new();
        for &(t, v) in &s[cut..] {
            resumed.push(t, v, &mut later);
        }
        resumed.finish(&mut later);
        // Nothing found after the cut starts before what was unsettled at the cut.
        let settled_before = unsettled.unwrap_or(s[cut - 1].0 + 1);
        assert!(later.iter().all(|a| a.start >= settled_before), "cut {cut}");
        found.extend(later);
        found.sort_by_key(|a| (a.start, a.kind));
        let mut want = whole.clone();
        want.sort_by_key(|a| (a.start, a.kind));
        assert_eq!(found, want, "cut {cut}");
    }
    assert!(Detector::from_bytes(&[]).is_none());
    let mut bytes = Detector::new(1.0).to_bytes();
    bytes[0] ^= 0xff;
    assert!(
        Detector::from_bytes(&bytes).is_none(),
        "another format version"
    );
}

/// A day shape with steep edges every 5 minutes: 20 at night, 80 from 09:00 to 18:00.
fn office_hours(i: usize, r: &mut Rng) -> f64 {
    let hour = (i % 288) / 12;
    let level = if (9..18).contains(&hour) { 80.0 } else { 20.0 };
    level + 1.5 * r.normal()
}

/// What was found from the second day on: on its first day no detector can know that the sensor
/// jumps every morning and evening.
fn after_day_one(found: &[Anomaly], step: i64) -> Vec<(Kind, i64, i64)> {
    kinds(found)
        .into_iter()
        .filter(|a| a.1 >= at(288, step))
        .collect()
}

#[test]
fn a_day_that_misses_its_usual_shape_is_one_level_shift() {
    let step = 5 * MINUTE;
    let days = 14;
    let clean = series(days * 288, step, 21, office_hours);
    assert_eq!(
        after_day_one(&detect(clean.clone(), 1.0), step),
        [],
        "the cycle alone"
    );

    // Day 10 stays at night level through office hours: nothing departs from the local level,
    // only from what the same hours held on the days before.
    let missing = 10 * 288 + 9 * 12;
    let mut s = clean.clone();
    for r in &mut s[missing..missing + 9 * 12] {
        r.1 -= 60.0;
    }
    let found = detect(s.clone(), 1.0);
    assert_eq!(
        after_day_one(&found, step),
        [(Kind::LevelShift, at(missing, step), at(missing + 5, step))]
    );
    let shift = found.iter().find(|a| a.start == at(missing, step)).unwrap();
    assert!((shift.expected.unwrap() - 80.0).abs() < 2.0, "{shift:?}");

    // Day 10's office hours at half height (a jump that does not reach the usual level).
    let mut s = clean;
    for r in &mut s[missing + 36..missing + 9 * 12] {
        r.1 -= 40.0;
    }
    assert_eq!(
        after_day_one(&detect(s, 1.0), step),
        [(
            Kind::LevelShift,
            at(missing + 36, step),
            at(missing + 41, step)
        )]
    );
}

#[test]
fn a_level_shift_on_a_daily_cycle_is_reported_once() {
    // After the shift every hour is off what the days before held at that hour: that is the same
    // shift, not a new departure each hour.
    let step = 5 * MINUTE;
    let shift = 9 * 288 + 100;
    let s = series(14 * 288, step, 22, |i, r| {
        office_hours(i, r) + if i >= shift { 30.0 } else { 0.0 }
    });
    assert_eq!(
        after_day_one(&detect(s, 1.0), step),
        [(Kind::LevelShift, at(shift, step), at(shift + 5, step))]
    );
}

/// Spikes of the usual size that come more often than ever: a sensor at 10 (with a little noise)
/// that spikes to 30 twice in every sixth hour, then four times in one hour on day 8. The
/// regular spikes are how it is; the reading that makes that hour twice as busy as any is one
/// spike anomaly.
#[test]
fn a_burst_of_ordinary_spikes_is_reported_once() {
    let step = 5 * MINUTE;
    let per_hour = 12;
    let burst_hour = 8 * 24 * per_hour + 13 * per_hour;
    let spiky = |i: usize, burst: bool| {
        let (hour, minute) = (i / per_hour, (i % per_hour) * 5);
        let regular = hour % 6 == 0 && (minute == 0 || minute == 30);
        let extra = burst && i >= burst_hour && i < burst_hour + per_hour;
        regular || (extra && [5, 15, 30, 45].contains(&minute))
    };
    for burst in [false, true] {
        let s = series(10 * 24 * per_hour, step, 11, |i, r| {
            10.0 + 0.1 * r.normal() + if spiky(i, burst) { 20.0 } else { 0.0 }
        });
        let found = detect(s, 1.0);
        let after_day_two: Vec<_> = kinds(&found)
            .into_iter()
            .filter(|a| a.1 >= at(2 * 24 * per_hour, step))
            .collect();
        let want = match burst {
            false => vec![],
            true => vec![(
                Kind::Spike,
                at(burst_hour + 9, step),
                at(burst_hour + 9, step),
            )],
        };
        assert_eq!(after_day_two, want, "burst {burst}");
    }
}

#[test]
fn a_start_up_transient_and_a_relearned_level_do_not_mute_the_memory() {
    // A machine that boots: its first hours decay from far above its level (readings every 5
    // minutes, noise 1). Then a surge at reading 300 that settles at a new level, and a spike of
    // 25 at 900: the transient and the surge are far larger, but a spike is news on a sensor
    // that is otherwise quiet.
    let step = 5 * MINUTE;
    let (jump, spike) = (300, 900);
    let s = series(1500, step, 31, |i, r| {
        let boot = 400.0 * (-(i as f64) / 12.0).exp();
        let level = match i.checked_sub(jump) {
            Some(k) => 160.0 + 150.0 * (-(k as f64) / 10.0).exp(),
            None => 100.0,
        };
        level + boot + if i == spike { 25.0 } else { 0.0 } + r.normal()
    });
    let found = kinds(&detect(s, 1.0));
    assert_eq!(
        found,
        [
            (Kind::LevelShift, at(jump, step), at(jump + 5, step)),
            (Kind::Spike, at(spike, step), at(spike, step)),
        ]
    );
}

/// Demand every 30 minutes with a daily and a weekly rhythm (two rush hours on weekdays, one
/// broad afternoon at the weekend; 2013-01-01 is a Tuesday), ±5 % noise. On day 48, a Monday,
/// a holiday has the weekend's shape; on day 54, a Sunday, a storm takes demand to 15 % from
/// noon on.
fn demand(holiday: bool, storm: bool) -> Vec<(i64, f64)> {
    let step = 30 * MINUTE;
    series(70 * 48, step, 41, |i, r| {
        let (day, hour) = (i / 48, (i % 48) as f64 / 2.0);
        let bump = |at: f64, width: f64| (-((hour - at) / width).powi(2)).exp();
        let weekend = matches!((day + 2) % 7, 0 | 6) || (holiday && day == 48);
        let shape = if weekend {
            8_000.0 + 9_000.0 * bump(14.0, 5.0)
        } else {
            6_000.0 + 12_000.0 * bump(9.0, 2.5) + 14_000.0 * bump(19.0, 3.0)
        };
        let stormy = storm && day == 54 && hour >= 12.0;
        (shape * (1.0 + 0.1 * (r.unit() - 0.5)) * if stormy { 0.15 } else { 1.0 }).round()
    })
}

#[test]
fn a_weekly_rhythm_is_learned_and_a_holiday_and_a_storm_leave_it() {
    let step = 30 * MINUTE;
    let day = |d: usize, hour: usize| at(d * 48 + hour * 2, step);
    let found = |s| {
        kinds(&detect(s, 1.0))
            .into_iter()
            .map(|(kind, start, _)| (kind, start))
            .collect::<Vec<_>>()
    };
    // The first Saturday leaves the daily profile: nothing says yet that weekends are different.
    // It is found at its second hour (its first is the hour the profile was last judged on, by
    // Friday's evening). The second is like the first (what the same hour held a week before is
    // not news), and from then on the weekly profile holds.
    let first_weekends = [(Kind::LevelShift, day(4, 1))];
    assert_eq!(found(demand(false, false)), first_weekends);
    // The holiday is found at its first hour (its night is the weekend's, busier than a working
    // Monday's), the storm at its first reading.
    let mut events = first_weekends.to_vec();
    events.extend([
        (Kind::LevelShift, day(48, 0)),
        (Kind::LevelShift, day(54, 12)),
    ]);
    assert_eq!(found(demand(true, true)), events);
}

/// The saved state's encoding is pinned: a detector two and a half days into an office-hours
/// series (no transcendental functions: the same bits on every machine) serializes to exactly
/// the committed bytes, and those bytes resume it. A change to the layout or to the method fails
/// here: bump `STATE_FORMAT` (saved states of the old version are then refused and rebuilt from
/// the readings) and rewrite the file with `UPDATE_GOLDEN=1 cargo test -p sensor-pipeline --lib
/// pinned`.
#[test]
fn the_saved_state_is_pinned_to_its_bytes() {
    let step = 5 * MINUTE;
    let s = series(4 * 288, step, 29, office_hours);
    let cut = 2 * 288 + 144;
    let mut d = Detector::new(1.0);
    let mut found = Vec::new();
    for &(t, v) in &s[..cut] {
        d.push(t, v, &mut found);
    }
    let bytes = d.to_bytes();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/anomaly/testdata/detector-state.bin"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &bytes).unwrap();
    }
    let golden = std::fs::read(path).unwrap();
    assert_eq!(
        bytes, golden,
        "the state's encoding changed: bump STATE_FORMAT and rewrite the file"
    );
    let mut resumed = Detector::from_bytes(&golden).expect("the pinned state resumes");
    let (mut went_on, mut after) = (Vec::new(), Vec::new());
    for &(t, v) in &s[cut..] {
        d.push(t, v, &mut went_on);
        resumed.push(t, v, &mut after);
    }
    assert_eq!(after, went_on);
    assert_eq!(resumed.to_bytes(), d.to_bytes());
    // One byte more, or a field cut short, is not a state.
    let mut longer = golden.clone();
    longer.push(0);
    assert!(Detector::from_bytes(&longer).is_none());
    assert!(Detector::from_bytes(&golden[..golden.len() - 1]).is_none());
}

#[test]
fn silences_the_sensor_keeps_are_not_gaps_and_a_longer_one_is() {
    // A reading every minute, with a silence of 40 minutes every 6 hours (a sensor that uploads in
    // batches, a link that sleeps) and one of 4 hours on day 8.
    let step = MINUTE;
    let mut s = series(12 * 1440, step, 11, |_, r| 50.0 + r.normal());
    let routine = |i: usize| i % 360 >= 320;
    let long = 8 * 1440..8 * 1440 + 240;
    s.retain(|&(t, _)| {
        let i = ((t - T0) / step) as usize;
        !routine(i) && !long.contains(&i)
    });
    let found = detect(s, 1.0);
    // The first two silences are news; from then on the memory holds two hours with one, and a
    // silence counts when it is twice as long as those; the four hours are.
    assert_eq!(
        kinds(&found),
        [
            (Kind::Gap, at(319, step), at(360, step)),
            (Kind::Gap, at(679, step), at(720, step)),
            (Kind::Gap, at(8 * 1440 - 41, step), at(8 * 1440 + 240, step)),
        ]
    );
}

#[test]
fn a_busy_sensor_falling_below_everything_it_did_is_a_level_shift() {
    // A CPU at 35 % (noise 3) that jobs drive to 90–100 % for 15 to 90 minutes every two to six
    // hours: the jobs' edges widen the noise scale until a drop to 3 % is not far from the level
    // in its units (the drop was missed before new ground the noise hides counted when it
    // lasts). The service dies at reading 8,000 (six hours near 3 %), then comes back.
    let step = 5 * MINUTE;
    let mut rng = Rng(12);
    let mut s = series(10_000, step, 13, |_, r| 35.0 + 3.0 * r.normal());
    let mut i = 0;
    while i < s.len() {
        i += 24 + (rng.unit() * 48.0) as usize;
        let len = 3 + (rng.unit() * 15.0) as usize;
        let high = 90.0 + 10.0 * rng.unit();
        for r in s.iter_mut().skip(i).take(len) {
            r.1 = (high + 3.0 * rng.normal()).min(100.0);
        }
        i += len;
    }
    for r in &mut s[8_000..8_072] {
        r.1 = 3.0 + 0.3 * rng.normal();
    }
    let found = detect(s, 1.0);
    // What happens from an hour before the drop to its end: the drop, one level shift. (Three of
    // the jobs elsewhere are level shifts too, as the detector judged them before.)
    let around: Vec<_> = kinds(&found)
        .into_iter()
        .filter(|&(_, start, _)| (at(7_988, step)..at(8_072, step)).contains(&start))
        .collect();
    assert_eq!(
        around,
        [(Kind::LevelShift, at(8_000, step), at(8_005, step))]
    );
}

/// A CPU at `base` % (noise `noise`) that jobs drive to 75–100 % for 15 to 90 minutes every two
/// to six hours, a reading every 5 minutes; `at_8000` rewrites what happens from reading 8,000.
fn busy_cpu(
    seed: u64,
    base: f64,
    noise: f64,
    at_8000: impl Fn(&mut Rng) -> Vec<f64>,
) -> Vec<(i64, f64)> {
    let step = 5 * MINUTE;
    let mut rng = Rng(seed);
    let mut s = series(10_000, step, seed + 1, |_, r| base + noise * r.normal());
    let mut i = 0;
    while i < s.len() {
        i += 24 + (rng.unit() * 48.0) as usize;
        let len = 3 + (rng.unit() * 15.0) as usize;
        let high = 75.0 + 25.0 * rng.unit();
        for r in s.iter_mut().skip(i).take(len) {
            r.1 = (high + 3.0 * rng.normal()).min(100.0);
        }
        i += len;
    }
    for (r, v) in s[8_000..].iter_mut().zip(at_8000(&mut rng)) {
        r.1 = v.clamp(0.0, 100.0);
    }
    s
}

/// What was found from an hour before reading 8,000 to `until` readings after it.
fn around_8000(found: &[Anomaly], until: usize) -> Vec<(Kind, i64, i64)> {
    let step = 5 * MINUTE;
    kinds(found)
        .into_iter()
        .filter(|&(_, start, _)| (at(7_988, step)..at(8_000 + until, step)).contains(&start))
        .collect()
}

#[test]
fn a_job_that_never_ends_is_one_level_shift() {
    // Ten hours at the ceiling where jobs last at most an hour and a half: each reading is what
    // a job reads, only the stay is new.
    let s = busy_cpu(21, 30.0, 3.0, |r| {
        (0..120).map(|_| 100.0 + 3.0 * r.normal()).collect()
    });
    let found = detect(s, 1.0);
    let step = 5 * MINUTE;
    // Reported from its first reading, known after 86 (five times the second-longest job the
    // memory holds).
    assert_eq!(
        around_8000(&found, 120),
        [(Kind::LevelShift, at(8_000, step), at(8_085, step))]
    );
}

#[test]
fn a_service_dying_just_below_its_quiet_readings_is_one_level_shift() {
    // A CPU at 20 % (noise 4) dies to 2 %: below every reading it had, but by less than a tenth
    // of the range its jobs span, and not far off the level in its noise — only the level settling
    // there is news.
    let s = busy_cpu(23, 20.0, 4.0, |r| {
        (0..72).map(|_| 2.0 + 0.3 * r.normal()).collect()
    });
    let found = detect(s, 1.0);
    let step = 5 * MINUTE;
    // Reported from its first reading, known when the level (the median of 16) is there.
    assert_eq!(
        around_8000(&found, 72),
        [(Kind::LevelShift, at(8_000, step), at(8_008, step))]
    );
}
