//! `tandem synth`: a deterministic synthetic engagement dataset with the structure a two-tower
//! model should find — latent topic interests, Zipf item popularity, item features that carry
//! (noisy) topic information, session continuity, items launching over time and user interests
//! drifting across the time span.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::EventLog;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    pub users: usize,
    pub items: usize,
    pub events: usize,
    pub topics: usize,
    pub seed: u64,
    /// First timestamp (unix seconds).
    pub start: i64,
    /// Length of the log in days.
    pub days: u32,
    /// Zipf exponent of item popularity.
    pub zipf: f64,
    /// Fraction of each user's interest that has moved to new topics by the end of the log.
    pub drift: f64,
    /// Probability that an event ignores the user's interests (exploration noise).
    pub noise: f64,
    /// Probability that an event re-engages an item from the user's own past, picked in
    /// proportion to how often they engaged with it (repeat purchases, as in grocery logs).
    #[serde(default)]
    pub repeat: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            users: 5_000,
            items: 3_000,
            events: 150_000,
            topics: 24,
            seed: 42,
            start: 1_704_067_200, // 2024-01-01T00:00:00Z
            days: 60,
            zipf: 1.0,
            drift: 0.5,
            noise: 0.1,
            repeat: 0.0,
        }
    }
}

/// The generated dataset: events plus item and user feature tables (as string rows ready to be
/// written by [`crate::table::write_strings`]).
pub struct SynthData {
    pub events: EventLog,
    pub item_headers: Vec<&'static str>,
    pub items: Vec<Vec<String>>,
    pub user_headers: Vec<&'static str>,
    pub users: Vec<Vec<String>>,
}

/// Cumulative weights for sampling by binary search.
struct Cdf {
    cum: Vec<f64>,
}

impl Cdf {
    fn new(weights: impl IntoIterator<Item = f64>) -> Cdf {
        let mut total = 0.0;
        let cum = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Cdf { cum }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = *self.cum.last().unwrap_or(&0.0);
        let x = rng.random::<f64>() * total;
        self.cum
            .partition_point(|&c| c <= x)
            .min(self.cum.len() - 1)
    }
}

pub fn generate(cfg: &SynthConfig) -> SynthData {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let topics = cfg.topics.max(2);
    let span = cfg.days.max(1) as i64 * 86_400;

    // Items: a topic, a popularity rank (a random permutation, so popularity is independent of
    // id order), a launch time (80 % exist from the start, the rest launch during the log).
    let mut rank: Vec<usize> = (0..cfg.items).collect();
    for i in (1..rank.len()).rev() {
        rank.swap(i, rng.random_range(0..=i));
    }
    let item_topic: Vec<usize> = (0..cfg.items)
        .map(|_| rng.random_range(0..topics))
        .collect();
    let launch: Vec<i64> = (0..cfg.items)
        .map(|_| {
            if rng.random::<f64>() < 0.8 {
                cfg.start
            } else {
                cfg.start + rng.random_range(0..span)
            }
        })
        .collect();
    let popularity: Vec<f64> = rank
        .iter()
        .map(|&r| 1.0 / ((r + 1) as f64).powf(cfg.zipf))
        .collect();
    let mut by_topic: Vec<Vec<usize>> = vec![Vec::new(); topics];
    for (i, &t) in item_topic.iter().enumerate() {
        by_topic[t].push(i);
    }
    let topic_cdf: Vec<Cdf> = by_topic
        .iter()
        .map(|items| Cdf::new(items.iter().map(|&i| popularity[i])))
        .collect();
    let global_cdf = Cdf::new(popularity.iter().copied());

    let items: Vec<Vec<String>> = (0..cfg.items)
        .map(|i| {
            let t = item_topic[i];
            // Category is the topic 85 % of the time, so features help but do not give it away.
            let category = if rng.random::<f64>() < 0.85 {
                t
            } else {
                rng.random_range(0..topics)
            };
            let n_tags = rng.random_range(1..=3);
            let mut tags: Vec<String> = (0..n_tags)
                .map(|_| {
                    if rng.random::<f64>() < 0.7 {
                        format!("t{}", t * 4 + rng.random_range(0..4))
                    } else {
                        format!("t{}", rng.random_range(0..topics * 4))
                    }
                })
                .collect();
            tags.sort();
            tags.dedup();
            let quality =
                1.0 - rank[i] as f64 / cfg.items.max(1) as f64 + rng.random::<f64>() * 0.2;
            vec![
                format!("i{i}"),
                format!("c{category}"),
                tags.join("|"),
                format!("{quality:.3}"),
            ]
        })
        .collect();

    // Users: one to three interest topics, and a second set they drift towards over time.
    struct UserState {
        interests: Vec<(usize, f64)>,
        drift_to: Vec<(usize, f64)>,
        last_topic: Option<usize>,
        /// Every item engaged with so far, once per engagement (a uniform pick is a pick in
        /// proportion to frequency).
        past: Vec<usize>,
    }
    let pick_interests = |rng: &mut ChaCha8Rng| -> Vec<(usize, f64)> {
        let n = rng.random_range(1..=3);
        (0..n)
            .map(|_| (rng.random_range(0..topics), 0.2 + rng.random::<f64>()))
            .collect()
    };
    let mut states: Vec<UserState> = (0..cfg.users)
        .map(|_| UserState {
            interests: pick_interests(&mut rng),
            drift_to: pick_interests(&mut rng),
            last_topic: None,
            past: Vec::new(),
        })
        .collect();
    let users: Vec<Vec<String>> = states
        .iter()
        .enumerate()
        .map(|(u, s)| {
            let main = s.interests[0].0;
            let segment = if rng.random::<f64>() < 0.7 {
                main / 3
            } else {
                rng.random_range(0..topics.div_ceil(3))
            };
            let age = 18 + (main * 2 + rng.random_range(0..25)) % 50;
            vec![
                format!("u{u}"),
                format!("s{segment}"),
                age.to_string(),
                format!("r{}", rng.random_range(0..8)),
            ]
        })
        .collect();

    // Events: users by Zipf-like activity, times uniform over the span, then items in time order
    // so session continuity and drift follow the clock.
    let activity = Cdf::new((0..cfg.users).map(|u| 1.0 / ((u % 997 + 1) as f64).powf(0.6)));
    let mut pairs: Vec<(i64, u32)> = (0..cfg.events)
        .map(|_| {
            (
                cfg.start + rng.random_range(0..span),
                activity.sample(&mut rng) as u32,
            )
        })
        .collect();
    pairs.sort_unstable();

    let mut events = EventLog::default();
    events.user.reserve(cfg.events);
    events.item.reserve(cfg.events);
    events.ts.reserve(cfg.events);
    events.weight.reserve(cfg.events);
    for u in 0..cfg.users {
        events.users.intern(&format!("u{u}"));
    }
    for i in 0..cfg.items {
        events.items.intern(&format!("i{i}"));
    }
    for (ts, u) in pairs {
        let state = &mut states[u as usize];
        let progress = (ts - cfg.start) as f64 / span as f64;
        let item = if !state.past.is_empty() && rng.random::<f64>() < cfg.repeat {
            state.past[rng.random_range(0..state.past.len())]
        } else if rng.random::<f64>() < cfg.noise {
            global_cdf.sample(&mut rng)
        } else {
            let topic = match state.last_topic {
                Some(t) if rng.random::<f64>() < 0.4 => t,
                _ => {
                    let drifted = rng.random::<f64>() < cfg.drift * progress;
                    let set = if drifted {
                        &state.drift_to
                    } else {
                        &state.interests
                    };
                    set[Cdf::new(set.iter().map(|&(_, w)| w)).sample(&mut rng)].0
                }
            };
            state.last_topic = Some(topic);
            // Rejection-sample an item of the topic that has launched; fall back to any launched
            // popular item if the topic has none yet.
            let mut chosen = None;
            if !by_topic[topic].is_empty() {
                for _ in 0..8 {
                    let i = by_topic[topic][topic_cdf[topic].sample(&mut rng)];
                    if launch[i] <= ts {
                        chosen = Some(i);
                        break;
                    }
                }
            }
            chosen.unwrap_or_else(|| loop {
                let i = global_cdf.sample(&mut rng);
                if launch[i] <= ts {
                    break i;
                }
            })
        };
        if cfg.repeat > 0.0 {
            state.past.push(item);
        }
        events.user.push(u);
        events.item.push(item as u32);
        events.ts.push(ts);
        events.weight.push(1.0);
    }
    SynthData {
        events,
        item_headers: vec!["item_id", "category", "tags", "quality"],
        items,
        user_headers: vec!["user_id", "segment", "age", "region"],
        users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_data_and_another_seed_does_not() {
        let cfg = SynthConfig {
            users: 50,
            items: 40,
            events: 2_000,
            ..Default::default()
        };
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert_eq!(a.events.fingerprint(), b.events.fingerprint());
        assert_eq!(a.items, b.items);
        let c = generate(&SynthConfig { seed: 7, ..cfg });
        assert_ne!(a.events.fingerprint(), c.events.fingerprint());
    }

    #[test]
    fn popularity_is_skewed_and_time_is_ordered() {
        let cfg = SynthConfig {
            users: 200,
            items: 500,
            events: 20_000,
            ..Default::default()
        };
        let d = generate(&cfg);
        assert!(d.events.ts.windows(2).all(|w| w[0] <= w[1]));
        let mut counts = vec![0usize; cfg.items];
        for &i in &d.events.item {
            counts[i as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top_decile: usize = counts[..50].iter().sum();
        assert!(
            top_decile * 4 > cfg.events,
            "top 10% items got {top_decile} of {}",
            cfg.events
        );
    }
}
