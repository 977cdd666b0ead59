//! Latency percentiles. Every report (demo, sim, canary, benchmarks) uses this one formula, so
//! their p99s are comparable.

/// The `q`-quantile (0 ≤ q ≤ 1) of `sorted` (ascending) by the nearest-rank method: the smallest
/// value with at least `q · n` values at or below it. 0 for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `values` and returns the percentiles at `qs`.
pub fn percentiles<const N: usize>(values: &mut [f64], qs: [f64; N]) -> [f64; N] {
    values.sort_by(f64::total_cmp);
    qs.map(|q| percentile(values, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_match_hand_computed_values() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let mut u = vec![3.0, 1.0, 2.0, 4.0];
        assert_eq!(percentiles(&mut u, [0.5, 0.75]), [2.0, 3.0]);
    }
}
