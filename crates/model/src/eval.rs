//! Offline evaluation: exact top-K over the whole catalogue, excluding each user's train items,
//! and the metrics of the issue (recall@10/50/100, NDCG@10, HR@10, coverage@10, pop-pct@10),
//! for the two-tower model and the honest baselines (most popular, item-item cosine).

use std::collections::{BTreeMap, HashSet};

use candle_core::Tensor;
use serde::Serialize;
use tandem_data::{EventLog, Split};

use crate::model::{TwoTower, UserRequest};
use crate::Result;

/// Test users with their train history and ground truth, in the event log's id space.
pub struct EvalSet {
    /// Log user index of each evaluated user (those with non-empty ground truth), ascending.
    pub users: Vec<u32>,
    pub truth: Vec<Vec<u32>>,
    /// Train items of each evaluated user in time order.
    pub history: Vec<Vec<u32>>,
    /// When each of them happened (aligned with `history`; may be empty when unknown).
    pub history_ts: Vec<Vec<i64>>,
    /// Timestamp of each evaluated user's last train event (the request time).
    pub last_ts: Vec<i64>,
    /// Train items of every user (by log user index), time order, for the baselines.
    pub train_by_user: Vec<Vec<u32>>,
    /// Distinct train users per log item.
    pub popularity: Vec<u32>,
    pub n_items: usize,
}

impl EvalSet {
    pub fn new(log: &EventLog, split: &Split) -> EvalSet {
        let truth_map = split.ground_truth(log);
        let mut train_by_user: Vec<Vec<u32>> = vec![Vec::new(); log.users.len()];
        let mut train_ts: Vec<Vec<i64>> = vec![Vec::new(); log.users.len()];
        let mut last_ts = vec![i64::MIN; log.users.len()];
        for &e in &split.train {
            let e = e as usize;
            train_by_user[log.user[e] as usize].push(log.item[e]);
            train_ts[log.user[e] as usize].push(log.ts[e]);
            last_ts[log.user[e] as usize] = log.ts[e];
        }
        let mut popularity = vec![0u32; log.items.len()];
        for items in &train_by_user {
            let distinct: HashSet<u32> = items.iter().copied().collect();
            for i in distinct {
                popularity[i as usize] += 1;
            }
        }
        let mut users: Vec<u32> = truth_map.keys().copied().collect();
        users.sort_unstable();
        EvalSet {
            truth: users.iter().map(|u| truth_map[u].clone()).collect(),
            history: users
                .iter()
                .map(|&u| train_by_user[u as usize].clone())
                .collect(),
            history_ts: users
                .iter()
                .map(|&u| std::mem::take(&mut train_ts[u as usize]))
                .collect(),
            last_ts: users
                .iter()
                .map(|&u| last_ts[u as usize].max(log.ts.iter().copied().min().unwrap_or(0)))
                .collect(),
            users,
            train_by_user,
            popularity,
            n_items: log.items.len(),
        }
    }

    /// A seeded subsample of at most `max` users (for per-epoch validation).
    pub fn sample(mut self, max: usize, seed: u64) -> EvalSet {
        if self.users.len() <= max {
            return self;
        }
        let mut keep: Vec<usize> = (0..self.users.len()).collect();
        let mut s = seed | 1;
        for i in (1..keep.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            keep.swap(i, (s % (i as u64 + 1)) as usize);
        }
        keep.truncate(max);
        keep.sort_unstable();
        self.users = keep.iter().map(|&k| self.users[k]).collect();
        self.truth = keep
            .iter()
            .map(|&k| std::mem::take(&mut self.truth[k]))
            .collect();
        self.history = keep
            .iter()
            .map(|&k| std::mem::take(&mut self.history[k]))
            .collect();
        if !self.history_ts.is_empty() {
            self.history_ts = keep
                .iter()
                .map(|&k| std::mem::take(&mut self.history_ts[k]))
                .collect();
        }
        self.last_ts = keep.iter().map(|&k| self.last_ts[k]).collect();
        self
    }

    pub fn train_items(&self) -> usize {
        self.popularity.iter().filter(|&&p| p > 0).count()
    }
}

/// Produces a ranked list per evaluated user. Items are log item indices; ids ≥ `n_items` stand
/// for catalogue items absent from the log (never a hit, counted for coverage).
pub trait Recommender {
    fn name(&self) -> String;
    fn recommend(&self, set: &EvalSet, k: usize) -> Result<Vec<Vec<u32>>>;
}

/// Indices of the `k` highest scores not excluded, best first (ties by lower index).
pub fn top_k(scores: &[f32], k: usize, excluded: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut cand: Vec<usize> = (0..scores.len())
        .filter(|&i| !excluded(i) && scores[i].is_finite())
        .collect();
    let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if cand.len() > k {
        cand.select_nth_unstable_by(k, cmp);
        cand.truncate(k);
    }
    cand.sort_unstable_by(cmp);
    cand
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub users: usize,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

/// Metrics of ranked lists against the set's ground truth.
pub fn metrics(set: &EvalSet, lists: &[Vec<u32>]) -> Metrics {
    let n = set.users.len().max(1) as f64;
    let (mut r10, mut r50, mut r100, mut ndcg, mut hr, mut pop) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut pop_n = 0usize;
    let mut covered: HashSet<u32> = HashSet::new();
    let pct = popularity_percentiles(&set.popularity);
    for (truth, list) in set.truth.iter().zip(lists) {
        let t: HashSet<u32> = truth.iter().copied().collect();
        let hits_at = |k: usize| list.iter().take(k).filter(|i| t.contains(i)).count() as f64;
        let g = t.len() as f64;
        r10 += hits_at(10) / g;
        r50 += hits_at(50) / g;
        r100 += hits_at(100) / g;
        hr += (hits_at(10) > 0.0) as u8 as f64;
        let dcg: f64 = list
            .iter()
            .take(10)
            .enumerate()
            .filter(|(_, i)| t.contains(i))
            .map(|(r, _)| 1.0 / ((r + 2) as f64).log2())
            .sum();
        let idcg: f64 = (0..t.len().min(10))
            .map(|r| 1.0 / ((r + 2) as f64).log2())
            .sum();
        ndcg += dcg / idcg;
        for &i in list.iter().take(10) {
            covered.insert(i);
            pop += pct.get(i as usize).copied().unwrap_or(0.0);
            pop_n += 1;
        }
    }
    let mut values = BTreeMap::new();
    values.insert("recall@10".into(), r10 / n);
    values.insert("recall@50".into(), r50 / n);
    values.insert("recall@100".into(), r100 / n);
    values.insert("ndcg@10".into(), ndcg / n);
    values.insert("hr@10".into(), hr / n);
    values.insert(
        "coverage@10".into(),
        covered.len() as f64 / set.train_items().max(1) as f64,
    );
    values.insert("pop-pct@10".into(), pop / pop_n.max(1) as f64);
    Metrics {
        users: set.users.len(),
        values,
    }
}

/// Percentile (0–100, 100 = most popular) of each item's train popularity among train items;
/// items without train users get 0.
fn popularity_percentiles(pop: &[u32]) -> Vec<f64> {
    let mut sorted: Vec<u32> = pop.iter().copied().filter(|&p| p > 0).collect();
    sorted.sort_unstable();
    let n = sorted.len().max(1) as f64;
    pop.iter()
        .map(|&p| {
            if p == 0 {
                0.0
            } else {
                100.0 * sorted.partition_point(|&x| x <= p) as f64 / n
            }
        })
        .collect()
}

/// Most popular train items (by distinct users), minus what the user already has.
pub struct MostPopular;

impl Recommender for MostPopular {
    fn name(&self) -> String {
        "most-popular".into()
    }

    fn recommend(&self, set: &EvalSet, k: usize) -> Result<Vec<Vec<u32>>> {
        let scores: Vec<f32> = set
            .popularity
            .iter()
            .map(|&p| if p == 0 { f32::NEG_INFINITY } else { p as f32 })
            .collect();
        let order = top_k(
            &scores,
            k + set.history.iter().map(Vec::len).max().unwrap_or(0),
            |_| false,
        );
        Ok(set
            .history
            .iter()
            .map(|h| {
                let seen: HashSet<u32> = h.iter().copied().collect();
                order
                    .iter()
                    .map(|&i| i as u32)
                    .filter(|i| !seen.contains(i))
                    .take(k)
                    .collect()
            })
            .collect())
    }
}

/// Item-item cosine on the binary user × item train matrix:
/// `sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i|·|U_j|)`, `score(u, j) = Σ_{i ∈ train(u)} sim(i, j)`.
/// Each item keeps its `neighbours` most similar items; users contribute at most their
/// `max_user_items` most recent items to co-occurrence counts (bounds the quadratic cost).
pub struct ItemCosine {
    pub neighbours: usize,
    pub max_user_items: usize,
}

impl Default for ItemCosine {
    fn default() -> Self {
        ItemCosine {
            neighbours: 200,
            max_user_items: 500,
        }
    }
}

impl ItemCosine {
    fn neighbour_lists(&self, set: &EvalSet) -> Vec<Vec<(u32, f32)>> {
        let n = set.n_items;
        let mut users_of: Vec<Vec<u32>> = vec![Vec::new(); n];
        let user_items: Vec<Vec<u32>> = set
            .train_by_user
            .iter()
            .map(|items| {
                let mut seen = HashSet::new();
                let mut distinct: Vec<u32> = items
                    .iter()
                    .rev()
                    .copied()
                    .filter(|i| seen.insert(*i))
                    .collect();
                distinct.truncate(self.max_user_items);
                distinct
            })
            .collect();
        for (u, items) in user_items.iter().enumerate() {
            for &i in items {
                users_of[i as usize].push(u as u32);
            }
        }
        let mut scratch = vec![0f32; n];
        let mut touched = Vec::new();
        (0..n)
            .map(|i| {
                for &u in &users_of[i] {
                    for &j in &user_items[u as usize] {
                        if j as usize != i {
                            if scratch[j as usize] == 0.0 {
                                touched.push(j);
                            }
                            scratch[j as usize] += 1.0;
                        }
                    }
                }
                let ni = users_of[i].len() as f32;
                let mut sims: Vec<(u32, f32)> = touched
                    .drain(..)
                    .map(|j| {
                        let c = std::mem::take(&mut scratch[j as usize]);
                        (j, c / (ni * users_of[j as usize].len() as f32).sqrt())
                    })
                    .collect();
                sims.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                sims.truncate(self.neighbours);
                sims
            })
            .collect()
    }
}

impl Recommender for ItemCosine {
    fn name(&self) -> String {
        "item-cosine".into()
    }

    fn recommend(&self, set: &EvalSet, k: usize) -> Result<Vec<Vec<u32>>> {
        let nbrs = self.neighbour_lists(set);
        let mut scores = vec![0f32; set.n_items];
        Ok(set
            .history
            .iter()
            .map(|h| {
                scores.iter_mut().for_each(|s| *s = 0.0);
                let seen: HashSet<u32> = h.iter().copied().collect();
                for &i in &seen {
                    for &(j, s) in &nbrs[i as usize] {
                        scores[j as usize] += s;
                    }
                }
                // Items no neighbour reaches fall back to popularity order (tiny scores).
                for (j, s) in scores.iter_mut().enumerate() {
                    *s += 1e-6 * set.popularity[j] as f32 / (1.0 + set.popularity[j] as f32);
                    if set.popularity[j] == 0 {
                        *s = f32::NEG_INFINITY;
                    }
                }
                top_k(&scores, k, |j| seen.contains(&(j as u32)))
                    .into_iter()
                    .map(|j| j as u32)
                    .collect()
            })
            .collect())
    }
}

/// The two-tower model as a ranker over its whole catalogue.
pub struct ModelRanker<'a> {
    pub model: &'a TwoTower,
    pub log: &'a EventLog,
    /// Precomputed item embeddings (all items of the version); computed when `None`.
    pub items: Option<Tensor>,
}

impl ModelRanker<'_> {
    /// Log item index → model item id (0 if unknown) and back (unknown → `n_items + id`).
    fn maps(&self) -> (Vec<u32>, Vec<u32>) {
        let vocab = &self.model.item.items;
        let to_model: Vec<u32> = self
            .log
            .items
            .names()
            .iter()
            .map(|s| vocab.get(s))
            .collect();
        let n = self.log.items.len() as u32;
        let to_log: Vec<u32> = vocab
            .ids
            .iter()
            .enumerate()
            .map(|(m, s)| self.log.items.get(s).unwrap_or(n + m as u32))
            .collect();
        (to_model, to_log)
    }
}

impl Recommender for ModelRanker<'_> {
    fn name(&self) -> String {
        "two-tower".into()
    }

    fn recommend(&self, set: &EvalSet, k: usize) -> Result<Vec<Vec<u32>>> {
        let items = match &self.items {
            Some(t) => t.clone(),
            None => self.model.item.embed_all()?,
        };
        let (to_model, to_log) = self.maps();
        let user_names = self.log.users.names();
        let mut out = Vec::with_capacity(set.users.len());
        let chunk = 256;
        for start in (0..set.users.len()).step_by(chunk) {
            let end = (start + chunk).min(set.users.len());
            let reqs: Vec<UserRequest> = (start..end)
                .map(|u| UserRequest {
                    user: &user_names[set.users[u] as usize],
                    history: set.history[u]
                        .iter()
                        .rev()
                        .map(|&i| to_model[i as usize])
                        .collect(),
                    history_ts: set
                        .history_ts
                        .get(u)
                        .map(|t| t.iter().rev().copied().collect())
                        .unwrap_or_default(),
                    ts: set.last_ts[u],
                    features: None,
                })
                .collect();
            let u = self.model.user.embed_requests(&reqs)?;
            let scores = u.matmul(&items.t()?)?.to_vec2::<f32>()?;
            for (u, row) in (start..end).zip(scores) {
                let seen: HashSet<u32> = set.history[u]
                    .iter()
                    .map(|&i| to_model[i as usize])
                    .collect();
                // Row 0 is the out-of-vocabulary item, never a recommendation.
                let top = top_k(&row, k, |m| m == 0 || seen.contains(&(m as u32)));
                out.push(top.into_iter().map(|m| to_log[m]).collect());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two users over 6 items; popularity gives items 0..=5 distinct-user counts 3,2,2,1,1,0.
    fn toy() -> EvalSet {
        EvalSet {
            users: vec![0, 1],
            truth: vec![vec![2, 4], vec![5]],
            history: vec![vec![0], vec![1]],
            history_ts: Vec::new(),
            last_ts: vec![0, 0],
            train_by_user: vec![vec![0, 1, 2], vec![0, 1, 3], vec![0, 2, 4]],
            popularity: vec![3, 2, 2, 1, 1, 0],
            n_items: 6,
        }
    }

    #[test]
    fn recall_ndcg_and_hit_rate_follow_their_definitions() {
        let set = toy();
        // User 0 hits item 4 at rank 2 (1 of 2 relevant); user 1 hits nothing.
        let lists = vec![vec![1, 4, 3], vec![2, 3]];
        let m = metrics(&set, &lists).values;
        assert!((m["recall@10"] - (0.5 + 0.0) / 2.0).abs() < 1e-12);
        assert!((m["hr@10"] - 0.5).abs() < 1e-12);
        // DCG = 1/log2(3); IDCG (2 relevant) = 1 + 1/log2(3).
        let want = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2()) / 2.0;
        assert!((m["ndcg@10"] - want).abs() < 1e-12);
    }

    #[test]
    fn a_perfect_ranking_scores_one() {
        let set = toy();
        let m = metrics(&set, &[vec![2, 4], vec![5]]).values;
        for k in ["recall@10", "recall@50", "recall@100", "ndcg@10", "hr@10"] {
            assert!((m[k] - 1.0).abs() < 1e-12, "{k}");
        }
    }

    #[test]
    fn coverage_and_popularity_percentile_are_over_train_items() {
        let set = toy();
        // 5 train items; the lists use items 0 and 3 → coverage 2/5.
        let m = metrics(&set, &[vec![0], vec![3]]).values;
        assert!((m["coverage@10"] - 0.4).abs() < 1e-12);
        // Item 0 is the most popular (percentile 100), item 3 shares the lowest count (2/5 = 40).
        assert!((m["pop-pct@10"] - 70.0).abs() < 1e-9, "{}", m["pop-pct@10"]);
    }

    #[test]
    fn top_k_skips_excluded_and_non_finite_scores_and_breaks_ties_by_index() {
        let scores = [0.5, 0.9, f32::NEG_INFINITY, 0.9, 0.1];
        assert_eq!(top_k(&scores, 3, |i| i == 0), vec![1, 3, 4]);
        assert_eq!(top_k(&scores, 10, |_| false), vec![1, 3, 0, 4]);
    }

    #[test]
    fn most_popular_excludes_what_the_user_has_seen() {
        let set = toy();
        let lists = MostPopular.recommend(&set, 2).unwrap();
        assert_eq!(lists[0], vec![1, 2]);
        assert_eq!(lists[1], vec![0, 2]);
    }

    #[test]
    fn item_cosine_scores_co_occurring_items_first() {
        let set = toy();
        // Item 0's users {0,1,2}; item 2's users {0,2}: cos = 2/sqrt(6) ≈ .816 beats item 3's
        // (1/sqrt(3) ≈ .577) and item 4's (.577), so user 0 (history [0]) gets 1 or 2 first.
        let lists = ItemCosine::default().recommend(&set, 4).unwrap();
        assert!(lists[0][0] == 1 || lists[0][0] == 2, "{:?}", lists[0]);
        assert!(!lists[0].contains(&0));
        assert!(
            !lists[0].contains(&5),
            "items without train users are never recommended"
        );
    }
}
