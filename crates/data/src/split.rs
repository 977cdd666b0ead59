//! The two temporal evaluation protocols. Both order events by time with ties broken by input
//! order, so a split is a pure function of the file.

use std::collections::{HashMap, HashSet};

use crate::EventLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Each user with ≥ 5 events: their last max(1, round(0.2·n)) events are test; users with
    /// fewer events go wholly to train.
    User,
    /// The last 10 % of all events are test.
    Global,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Protocol::User),
            "global" => Ok(Protocol::Global),
            other => Err(format!(
                "unknown protocol {other:?} (expected user or global)"
            )),
        }
    }
}

/// Event indices of each side, each in (time, input) order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<u32>,
    pub test: Vec<u32>,
}

pub const MIN_USER_EVENTS: usize = 5;
pub const USER_TEST_FRACTION: f64 = 0.2;
pub const GLOBAL_TEST_FRACTION: f64 = 0.1;

impl Split {
    pub fn new(log: &EventLog, protocol: Protocol) -> Split {
        let order = log.time_order();
        let mut is_test = vec![false; log.len()];
        match protocol {
            Protocol::Global => {
                let n_test = (order.len() as f64 * GLOBAL_TEST_FRACTION).round() as usize;
                for &e in &order[order.len() - n_test..] {
                    is_test[e as usize] = true;
                }
            }
            Protocol::User => {
                let mut per_user: HashMap<u32, Vec<u32>> = HashMap::new();
                for &e in &order {
                    per_user.entry(log.user[e as usize]).or_default().push(e);
                }
                for events in per_user.values() {
                    let n = events.len();
                    if n < MIN_USER_EVENTS {
                        continue;
                    }
                    let n_test = ((USER_TEST_FRACTION * n as f64).round() as usize).max(1);
                    for &e in &events[n - n_test..] {
                        is_test[e as usize] = true;
                    }
                }
            }
        }
        let (test, train): (Vec<u32>, Vec<u32>) =
            order.into_iter().partition(|&e| is_test[e as usize]);
        Split { train, test }
    }

    /// Ground truth per user (interned user index): the distinct test items that are not among
    /// the user's train items, in first-seen order. Users left with none are absent.
    pub fn ground_truth(&self, log: &EventLog) -> HashMap<u32, Vec<u32>> {
        let mut seen: HashMap<u32, HashSet<u32>> = HashMap::new();
        for &e in &self.train {
            seen.entry(log.user[e as usize])
                .or_default()
                .insert(log.item[e as usize]);
        }
        let mut truth: HashMap<u32, Vec<u32>> = HashMap::new();
        for &e in &self.test {
            let (u, i) = (log.user[e as usize], log.item[e as usize]);
            if seen.get(&u).is_some_and(|s| s.contains(&i)) {
                continue;
            }
            let items = truth.entry(u).or_default();
            if !items.contains(&i) {
                items.push(i);
            }
        }
        truth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(events: &[(&str, &str, i64)]) -> EventLog {
        let mut log = EventLog::default();
        for (u, i, t) in events {
            log.push(u, i, *t, 1.0);
        }
        log
    }

    #[test]
    fn the_user_protocol_holds_out_each_users_last_fifth_and_keeps_small_users_whole() {
        // u1 has 7 events → round(1.4) = 1 test event; u2 has 4 → all train.
        let mut events = Vec::new();
        for t in 0..7 {
            events.push(("u1", ["a", "b", "c", "d", "e", "f", "g"][t], t as i64));
        }
        for t in 0..4 {
            events.push(("u2", "x", 100 + t as i64));
        }
        let log = log_of(&events);
        let split = Split::new(&log, Protocol::User);
        assert_eq!(split.test, vec![6]);
        assert_eq!(split.train.len(), 10);
        // 13 events → round(2.6) = 3 test events, ties broken by input order.
        let log = log_of(
            &(0..13)
                .map(|t| ("u", "i", (t / 2) as i64))
                .collect::<Vec<_>>(),
        );
        assert_eq!(Split::new(&log, Protocol::User).test, vec![10, 11, 12]);
    }

    #[test]
    fn the_global_protocol_holds_out_the_last_tenth_by_time() {
        let events: Vec<(&str, &str, i64)> = (0..20).map(|t| ("u", "i", 100 - t as i64)).collect();
        let split = Split::new(&log_of(&events), Protocol::Global);
        // Timestamps decrease with input order, so the latest are the first two rows.
        assert_eq!(split.test, vec![1, 0]);
    }

    #[test]
    fn ground_truth_drops_items_already_seen_in_train() {
        let log = log_of(&[
            ("u", "a", 1),
            ("u", "b", 2),
            ("u", "c", 3),
            ("u", "d", 4),
            ("u", "a", 5),
            ("u", "e", 6),
            ("u", "e", 7),
            ("u", "e", 8),
            ("u", "f", 9),
            ("u", "g", 10),
        ]);
        let split = Split::new(&log, Protocol::User);
        assert_eq!(split.test.len(), 2);
        let truth = split.ground_truth(&log);
        let names: Vec<&str> = truth[&0].iter().map(|&i| log.items.name(i)).collect();
        assert_eq!(names, vec!["f", "g"]);
        let log2 = log_of(&[
            ("u", "a", 1),
            ("u", "b", 2),
            ("u", "c", 3),
            ("u", "d", 4),
            ("u", "a", 5),
        ]);
        assert!(Split::new(&log2, Protocol::User)
            .ground_truth(&log2)
            .is_empty());
    }
}
