use super::*;

/// What subscribers read (SPEC §7's fields, the state and the object), unchanged by the
/// kind and state being typed.
#[test]
fn messages_name_kinds_and_states_as_before() {
    let message = AnomalyMessage {
        sensor_uuid: "0a5a2b8e-7c0f-4a55-9a39-000000000001".into(),
        sensor_name: Some("boiler".into()),
        kind: Kind::LevelShift,
        start: "2013-01-01T00:05:00Z".into(),
        end: "2013-01-01T01:00:00Z".into(),
        value: Some(31.5),
        expected: None,
        score: 7.25,
        state: State::Resolved,
        object_key: "timeseries/a.csv".into(),
    };
    let text = serde_json::to_string(&message).unwrap();
    assert_eq!(
        text,
        "{\"sensor_uuid\":\"0a5a2b8e-7c0f-4a55-9a39-000000000001\",\"sensor_name\":\"boiler\",\
         \"kind\":\"level_shift\",\"start\":\"2013-01-01T00:05:00Z\",\
         \"end\":\"2013-01-01T01:00:00Z\",\"value\":31.5,\"expected\":null,\"score\":7.25,\
         \"state\":\"resolved\",\"object_key\":\"timeseries/a.csv\"}"
    );
    assert_eq!(
        serde_json::from_str::<AnomalyMessage>(&text).unwrap(),
        message
    );
    for kind in Kind::ALL {
        assert_eq!(
            serde_json::to_string(&kind).unwrap(),
            format!("\"{}\"", kind.as_str())
        );
    }
    assert_eq!(serde_json::to_string(&State::Open).unwrap(), "\"open\"");
}

fn fresh(sensor: Uuid, readings: &[i64]) -> Held {
    let mut f = Held::default();
    f.readings
        .insert(sensor, readings.iter().map(|&t| (t, t as f64)).collect());
    f
}

#[test]
fn an_hour_is_held_only_when_its_writers_follow_each_other_up_to_now() {
    // Written by 10, then 11 (after 7), then 12 (after 10): no chain, whichever is last.
    assert!(!chained(&[(Some(7), 10), (Some(10), 12)], 11));
    // 7 wrote it, then 10, then 12: a chain ending now.
    assert!(chained(&[(Some(10), 12), (Some(7), 10)], 12));
    assert!(chained(&[(None, 10)], 10));
    // Someone wrote it after 12, or between 10 and 12 (12 came after 11).
    assert!(!chained(&[(Some(10), 12), (Some(7), 10)], 13));
    assert!(!chained(&[(Some(11), 12), (Some(7), 10)], 12));
    assert!(!chained(&[], 12));
}

#[test]
fn held_readings_are_fed_only_when_they_are_exactly_what_the_work_stored() {
    let (u, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let (a, b, c) = (fresh(u, &[1, 2, 3]), fresh(u, &[5, 6]), fresh(other, &[4]));
    let fed = |held: &[&Held], spans: &[(i64, i64)]| {
        own_readings(held, u, spans).map(|p| p.concat().iter().map(|r| r.0).collect())
    };
    // Two pieces, held in any order, each spanning one work row: one run in time order.
    assert_eq!(
        fed(&[&b, &c, &a], &[(5, 6), (1, 3)]),
        Some(vec![1, 2, 3, 5, 6])
    );
    assert_eq!(fed(&[&a], &[(1, 3)]), Some(vec![1, 2, 3]));
    // A work row without its readings, or readings without their work row.
    assert_eq!(fed(&[&a], &[(1, 3), (5, 6)]), None);
    assert_eq!(fed(&[&a, &b], &[(1, 3)]), None);
    // A piece that does not span its row (another version of the object won).
    assert_eq!(fed(&[&a, &b], &[(1, 3), (5, 7)]), None);
    // Overlapping pieces: one may have overwritten the other's readings.
    let d = fresh(u, &[3, 4]);
    assert_eq!(fed(&[&a, &d], &[(1, 3), (3, 4)]), None);
}
