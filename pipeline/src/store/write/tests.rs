use super::replace::*;
use super::*;
use crate::time::HOUR_MICROS;

/// Sensor, hour, and what it holds.
type RemovedHour = (u128, i64, Hour);

fn hour(
    readings: i64,
    (low, high, total): (f64, f64, f64),
    first: (i64, f64),
    last: (i64, f64),
) -> Hour {
    Hour {
        readings,
        low,
        high,
        total,
        first,
        last,
    }
}

/// The removed readings of `deleted` (sensor, instant, value) in the order given, by hour;
/// `None` when one is not held.
fn removed(held: &BySensor, deleted: &[(u128, i64, f64)]) -> Option<Vec<RemovedHour>> {
    let mut r = Removed::default();
    for &(u, at, value) in deleted {
        if !r.add(held, uuid::Uuid::from_u128(u), at, value) {
            return None;
        }
    }
    let mut hours: Vec<_> = r
        .finish()
        .into_iter()
        .map(|((u, h), s)| (u.as_u128(), h, s))
        .collect();
    hours.sort_by_key(|h| (h.0, h.1));
    Some(hours)
}

#[test]
fn removed_readings_are_checked_against_the_held_ones_and_gathered_by_hour() {
    const H: i64 = HOUR_MICROS;
    let held: BySensor = [
        (
            uuid::Uuid::from_u128(1),
            vec![(5, 1.0), (H - 1, 3.0), (H, 2.0), (H + 9, 0.5)],
        ),
        (uuid::Uuid::from_u128(2), vec![(-1, 7.0), (7, 8.0)]),
    ]
    .into();
    let in_order = [
        (1, 5, 1.5),
        (1, H - 1, -3.0),
        (1, H, 2.0),
        (1, H + 9, 4.0),
        (2, -1, 6.0),
        (2, 7, 9.0),
    ];
    let expected = Some(vec![
        (1, 0, hour(2, (-3.0, 1.5, -1.5), (5, 1.5), (H - 1, -3.0))),
        (1, H, hour(2, (2.0, 4.0, 6.0), (H, 2.0), (H + 9, 4.0))),
        (2, -H, hour(1, (6.0, 6.0, 6.0), (-1, 6.0), (-1, 6.0))),
        (2, 0, hour(1, (9.0, 9.0, 9.0), (7, 9.0), (7, 9.0))),
    ]);
    assert_eq!(removed(&held, &in_order), expected);
    // Out of order (another plan): each reading is looked up, and an hour met twice adds up.
    let mut shuffled = in_order;
    shuffled.reverse();
    shuffled.swap(0, 3);
    assert_eq!(removed(&held, &shuffled), expected);
    // Some held readings not removed: the ones removed still add up (the caller compares
    // the counts).
    assert_eq!(
        removed(&held, &[(1, H, 2.0)]),
        Some(vec![(1, H, hour(1, (2.0, 2.0, 2.0), (H, 2.0), (H, 2.0)))])
    );
    // A removed reading that is not held, between two held ones, after the last, of
    // another sensor.
    assert_eq!(removed(&held, &[(1, 5, 1.0), (1, 6, 1.0)]), None);
    assert_eq!(removed(&held, &[(1, H + 10, 1.0)]), None);
    assert_eq!(removed(&held, &[(3, 5, 1.0)]), None);
}

#[test]
fn the_replacing_delete_gets_its_spans_as_literals() {
    let at = |us| chrono::DateTime::from_timestamp_micros(us).unwrap();
    let statement = replaced_statement(
        (1_356_998_400 << 24) + 7,
        &[uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(0xab)],
        &[at(0), at(1_356_998_400_000_001)],
        &[at(-1), at(1_356_998_401_500_000)],
    );
    let statement = statement.unwrap();
    assert!(!statement.contains('$'), "{statement}");
    assert!(statement.contains(
        "unnest('{00000000-0000-0000-0000-000000000001,00000000-0000-0000-0000-0000000000ab}'::uuid[], \
         '{1970-01-01T00:00:00.000000Z,2013-01-01T00:00:00.000001Z}'::timestamptz[], \
         '{1969-12-31T23:59:59.999999Z,2013-01-01T00:00:01.500000Z}'::timestamptz[])"
    ), "{statement}");
    assert!(
        statement.contains("((22766655268454407::bigint >> 24)"),
        "{statement}"
    );
    let year = |y| {
        chrono::NaiveDate::from_ymd_opt(y, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
    };
    let u = [uuid::Uuid::from_u128(1)];
    assert!(replaced_statement(1, &u, &[year(1)], &[year(9999)]).is_some());
    assert_eq!(replaced_statement(1, &u, &[year(0)], &[year(2013)]), None);
    assert_eq!(
        replaced_statement(1, &u, &[year(2013)], &[year(10000)]),
        None
    );
}

#[test]
fn spans_gather_hours_until_too_many() {
    let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let mut s = Spans::default();
    s.add(a, 3_600_000_000 + 5, 2.0);
    s.add(a, 7_199_999_999, -1.0);
    s.add(a, 7_200_000_000, 4.0);
    s.add(b, -1, 9.0);
    let mut hours: Vec<_> = s
        .hours
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, h)| (*k, *h))
        .collect();
    hours.sort_by_key(|(k, _)| *k);
    const H: i64 = HOUR_MICROS;
    assert_eq!(
        hours,
        vec![
            (
                (a, H),
                hour(2, (-1.0, 2.0, 1.0), (H + 5, 2.0), (2 * H - 1, -1.0))
            ),
            (
                (a, 2 * H),
                hour(1, (4.0, 4.0, 4.0), (2 * H, 4.0), (2 * H, 4.0))
            ),
            ((b, -H), hour(1, (9.0, 9.0, 9.0), (-1, 9.0), (-1, 9.0))),
        ]
    );
    assert_eq!(s.sensors[&a], (3_600_000_005, 7_200_000_000));
    for i in 0..HOURS_MAX as i64 {
        s.add(a, i * HOUR_MICROS, 0.0);
    }
    assert!(s.hours.is_none());
    s.add(b, 0, 0.0);
    assert!(s.hours.is_none());
    assert_eq!(s.sensors[&b], (-1, 0));
}
