//! What the worker tells JetStream about an event once it is done with it: a pure function from
//! the event's [`Verdict`] and its delivery count to an [`Action`], so the redelivery delays and
//! the last-delivery rules are unit-tested here rather than only end to end.

use std::time::Duration;

/// How handling an event ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ack,
    /// Transient: try again later (or dead-letter once deliveries are used up).
    Retry(String),
    /// Permanent: file it with the reason and ack.
    DeadLetter {
        reason: String,
        keys: Vec<String>,
    },
    /// Shutdown deadline: give it back for another worker, now.
    HandBack,
}

/// What to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Ack,
    /// Hand it back, to be redelivered at once (to another worker).
    HandBack,
    /// Hand it back, to be redelivered after `delay`.
    Retry {
        reason: String,
        delay: Duration,
    },
    /// File it as a dead letter, then ack. `stranded`: it was handed back or failed on its last
    /// delivery, where a nak would strand it; `keys` is `None` for the keys the event names.
    DeadLetter {
        reason: String,
        keys: Option<Vec<String>>,
        stranded: bool,
    },
}

/// The redelivery delay after the `delivered`-th delivery failed transiently: 1 s, doubling per
/// delivery up to 64 s.
pub fn retry_delay(delivered: i64) -> Duration {
    Duration::from_secs(1 << (delivered.clamp(1, 7) - 1))
}

/// The action for an event on its `delivered`-th delivery of `max_deliver`.
pub fn settle(verdict: Verdict, delivered: i64, max_deliver: i64) -> Action {
    let last = delivered >= max_deliver;
    match verdict {
        Verdict::Ack => Action::Ack,
        Verdict::HandBack if !last => Action::HandBack,
        Verdict::HandBack => Action::DeadLetter {
            reason: format!(
                "handed back at shutdown on its last delivery ({delivered} of NATS_MAX_DELIVER \
                 {max_deliver})"
            ),
            keys: None,
            stranded: true,
        },
        Verdict::Retry(reason) if !last => Action::Retry {
            reason,
            delay: retry_delay(delivered),
        },
        Verdict::Retry(reason) => Action::DeadLetter {
            reason: format!("gave up after {delivered} deliveries: {reason}"),
            keys: None,
            stranded: true,
        },
        Verdict::DeadLetter { reason, keys } => Action::DeadLetter {
            reason,
            keys: Some(keys),
            stranded: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_failure_is_redelivered_later_each_time_until_the_last_delivery() {
        let delays: Vec<Action> = (1..=9)
            .map(|d| settle(Verdict::Retry("db down".into()), d, 10))
            .collect();
        let secs = |s| Action::Retry {
            reason: "db down".into(),
            delay: Duration::from_secs(s),
        };
        assert_eq!(
            delays,
            [
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(32),
                secs(64),
                secs(64),
                secs(64)
            ]
        );
        assert_eq!(
            settle(Verdict::Retry("db down".into()), 10, 10),
            Action::DeadLetter {
                reason: "gave up after 10 deliveries: db down".into(),
                keys: None,
                stranded: true,
            }
        );
        // A delivery count past the limit (the limit lowered since) is the last one too.
        assert_eq!(
            settle(Verdict::Retry("x".into()), 12, 10),
            Action::DeadLetter {
                reason: "gave up after 12 deliveries: x".into(),
                keys: None,
                stranded: true,
            }
        );
        // A count JetStream did not give (0) waits as the first delivery does.
        assert_eq!(retry_delay(0), Duration::from_secs(1));
    }

    #[test]
    fn a_handed_back_event_is_naked_at_once_except_on_its_last_delivery() {
        assert_eq!(settle(Verdict::HandBack, 1, 5), Action::HandBack);
        assert_eq!(settle(Verdict::HandBack, 4, 5), Action::HandBack);
        assert_eq!(
            settle(Verdict::HandBack, 5, 5),
            Action::DeadLetter {
                reason: "handed back at shutdown on its last delivery (5 of NATS_MAX_DELIVER 5)"
                    .into(),
                keys: None,
                stranded: true,
            }
        );
    }

    #[test]
    fn acks_and_permanent_failures_do_not_depend_on_the_delivery() {
        for delivered in [1, 5] {
            assert_eq!(settle(Verdict::Ack, delivered, 5), Action::Ack);
            assert_eq!(
                settle(
                    Verdict::DeadLetter {
                        reason: "a.csv: not UTF-8".into(),
                        keys: vec!["a.csv".into()],
                    },
                    delivered,
                    5
                ),
                Action::DeadLetter {
                    reason: "a.csv: not UTF-8".into(),
                    keys: Some(vec!["a.csv".into()]),
                    stranded: false,
                }
            );
        }
    }
}
