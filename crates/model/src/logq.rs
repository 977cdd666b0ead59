//! Streaming estimators of item sampling probability for the logQ correction.
//!
//! - [`ExactCounts`]: exact frequencies (one hash map entry per item).
//! - [`CountMin`]: a count-min sketch, memory fixed regardless of the catalogue.
//! - [`StepGap`]: the estimator of Yi et al. (RecSys 2019): per hash bucket it keeps the step an
//!   item was last seen and an exponential moving average of the gap between sightings; the
//!   probability is 1 / gap. Several hash functions and the *largest* gap limit the damage of
//!   collisions (a collision makes gaps look shorter).

use crate::config::LogQ;

pub trait FrequencyEstimator: Send {
    /// Records one occurrence (one training example) of `item`.
    fn observe(&mut self, item: u32);
    /// Estimated probability that a random example is `item`.
    fn prob(&self, item: u32) -> f64;
}

/// Builds the estimator for `kind`; `None` for [`LogQ::Off`].
pub fn estimator(kind: LogQ, items: usize, seed: u64) -> Option<Box<dyn FrequencyEstimator>> {
    match kind {
        LogQ::Off => None,
        LogQ::Exact => Some(Box::new(ExactCounts::new(items))),
        LogQ::Cms => Some(Box::new(CountMin::new(
            4,
            (items * 2).clamp(1 << 10, 1 << 22),
            seed,
        ))),
        LogQ::Yi => Some(Box::new(StepGap::new(
            2,
            (items * 2).clamp(1 << 10, 1 << 22),
            0.01,
            seed,
        ))),
    }
}

pub struct ExactCounts {
    counts: Vec<u64>,
    total: u64,
}

impl ExactCounts {
    pub fn new(items: usize) -> Self {
        ExactCounts {
            counts: vec![0; items],
            total: 0,
        }
    }
}

impl FrequencyEstimator for ExactCounts {
    fn observe(&mut self, item: u32) {
        let i = item as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
    }

    fn prob(&self, item: u32) -> f64 {
        let c = self.counts.get(item as usize).copied().unwrap_or(0);
        c as f64 / self.total.max(1) as f64
    }
}

/// A multiplicative hash family: `h_k(x) = ((x+1) · a_k) >> shift`, `a_k` odd and seeded.
fn hashers(depth: usize, seed: u64) -> Vec<u64> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..depth)
        .map(|_| {
            // splitmix64
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        })
        .collect()
}

fn bucket(a: u64, item: u32, width: usize) -> usize {
    let h = (item as u64 + 1).wrapping_mul(a);
    ((h >> 32) as usize) % width
}

pub struct CountMin {
    width: usize,
    table: Vec<u32>,
    hash: Vec<u64>,
    total: u64,
}

impl CountMin {
    pub fn new(depth: usize, width: usize, seed: u64) -> Self {
        CountMin {
            width,
            table: vec![0; depth * width],
            hash: hashers(depth, seed),
            total: 0,
        }
    }
}

impl FrequencyEstimator for CountMin {
    fn observe(&mut self, item: u32) {
        for (k, &a) in self.hash.iter().enumerate() {
            let j = k * self.width + bucket(a, item, self.width);
            self.table[j] = self.table[j].saturating_add(1);
        }
        self.total += 1;
    }

    fn prob(&self, item: u32) -> f64 {
        let min = self
            .hash
            .iter()
            .enumerate()
            .map(|(k, &a)| self.table[k * self.width + bucket(a, item, self.width)])
            .min()
            .unwrap_or(0);
        min as f64 / self.total.max(1) as f64
    }
}

pub struct StepGap {
    width: usize,
    last: Vec<f64>,
    gap: Vec<f64>,
    hash: Vec<u64>,
    alpha: f64,
    step: f64,
}

impl StepGap {
    pub fn new(depth: usize, width: usize, alpha: f64, seed: u64) -> Self {
        StepGap {
            width,
            last: vec![f64::NAN; depth * width],
            gap: vec![0.0; depth * width],
            hash: hashers(depth, seed),
            alpha,
            step: 0.0,
        }
    }
}

impl FrequencyEstimator for StepGap {
    fn observe(&mut self, item: u32) {
        self.step += 1.0;
        for (k, &a) in self.hash.iter().enumerate() {
            let j = k * self.width + bucket(a, item, self.width);
            if self.last[j].is_nan() {
                // First sighting: the gap since the stream began is the only evidence.
                self.gap[j] = self.step;
            } else {
                self.gap[j] =
                    (1.0 - self.alpha) * self.gap[j] + self.alpha * (self.step - self.last[j]);
            }
            self.last[j] = self.step;
        }
    }

    fn prob(&self, item: u32) -> f64 {
        let gap = self
            .hash
            .iter()
            .enumerate()
            .map(|(k, &a)| self.gap[k * self.width + bucket(a, item, self.width)])
            .fold(0.0, f64::max);
        if gap <= 0.0 {
            0.0
        } else {
            (1.0 / gap).min(1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A Zipf(1.1) stream over 2,000 items.
    fn zipf_stream(n: usize, seed: u64) -> (Vec<u32>, Vec<f64>) {
        let items = 2_000;
        let w: Vec<f64> = (0..items)
            .map(|i| 1.0 / ((i + 1) as f64).powf(1.1))
            .collect();
        let total: f64 = w.iter().sum();
        let p: Vec<f64> = w.iter().map(|x| x / total).collect();
        let mut cum = Vec::with_capacity(items);
        let mut acc = 0.0;
        for x in &p {
            acc += x;
            cum.push(acc);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let stream = (0..n)
            .map(|_| {
                let x: f64 = rng.random();
                cum.partition_point(|&c| c < x).min(items - 1) as u32
            })
            .collect();
        (stream, p)
    }

    fn check(est: &mut dyn FrequencyEstimator, name: &str, tolerance: f64) {
        let seed = 11;
        println!("seed {seed}");
        let (stream, _) = zipf_stream(400_000, seed);
        let mut exact = ExactCounts::new(2_000);
        for &i in &stream {
            est.observe(i);
            exact.observe(i);
        }
        // The head of the distribution (items seen ≥ 400 times) is what the correction acts on.
        for item in 0..20u32 {
            let want = exact.prob(item);
            let got = est.prob(item);
            let rel = (got - want).abs() / want;
            assert!(
                rel < tolerance,
                "{name}: item {item}: estimated {got:.5} vs exact {want:.5} (rel err {rel:.3})"
            );
        }
    }

    #[test]
    fn exact_counts_match_the_true_frequency_of_a_zipf_stream() {
        let (stream, p) = zipf_stream(400_000, 5);
        let mut e = ExactCounts::new(2_000);
        stream.iter().for_each(|&i| e.observe(i));
        assert!((e.prob(0) - p[0]).abs() / p[0] < 0.02);
        assert_eq!(e.prob(1_999_999), 0.0);
    }

    #[test]
    fn the_count_min_sketch_tracks_exact_counts_on_a_zipf_stream() {
        check(&mut CountMin::new(4, 1 << 12, 3), "cms", 0.02);
    }

    #[test]
    fn the_step_gap_estimator_tracks_exact_counts_on_a_zipf_stream() {
        check(&mut StepGap::new(2, 1 << 12, 0.01, 3), "yi", 0.25);
    }

    #[test]
    fn count_min_never_underestimates() {
        let (stream, _) = zipf_stream(50_000, 9);
        let mut cms = CountMin::new(2, 64, 1);
        let mut exact = ExactCounts::new(2_000);
        for &i in &stream {
            cms.observe(i);
            exact.observe(i);
        }
        for item in 0..2_000u32 {
            assert!(cms.prob(item) >= exact.prob(item));
        }
    }
}
