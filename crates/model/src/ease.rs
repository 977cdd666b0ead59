//! EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the closed-form
//! item-item linear model `B = I − P·diag(1/diag(P))` with `P = (XᵀX + λI)⁻¹`, scored as
//! `x_u·B`. A strong baseline on data of this kind, and a cheap one up to a few ten thousand
//! items (a dense n × n inverse: O(n³) time, 8n² bytes).
//!
//! λ is chosen on a validation slice carved from the train side (each user's last fifth, as the
//! per-user protocol does), never on the test side; then B is refit on the whole train side.

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::eval::{metrics, top_k, EvalSet, Recommender};
use crate::{ModelError, Result};

/// Catalogues above this many train items are skipped: the dense inverse and its temporaries
/// would need several GB and minutes per λ.
pub const MAX_ITEMS: usize = 20_000;

pub struct Ease {
    /// Candidate λ as multiples of the mean diagonal of XᵀX (the mean item popularity).
    pub lambda_grid: Vec<f64>,
    /// A fixed λ instead of the search.
    pub lambda: Option<f64>,
}

impl Default for Ease {
    fn default() -> Self {
        Ease {
            lambda_grid: vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
            lambda: None,
        }
    }
}

/// The Gram matrix XᵀX of the binary user × item matrix (row-major `n × n`, f64).
fn gram(user_items: &[Vec<u32>], n: usize) -> Vec<f64> {
    let mut users_of: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (u, items) in user_items.iter().enumerate() {
        for &i in items {
            users_of[i as usize].push(u as u32);
        }
    }
    let mut g = vec![0f64; n * n];
    g.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for &u in &users_of[i] {
            for &j in &user_items[u as usize] {
                row[j as usize] += 1.0;
            }
        }
    });
    g
}

/// Below this size the block recursion inverts directly.
const DIRECT: usize = 384;

/// The inverse of a symmetric positive definite `n × n` matrix (row-major f64), by block
/// recursion on the Schur complement so that nearly all the work is matrix products at BLAS
/// speed: with `A = [[A11, A12], [A21, A22]]`, `T = A11⁻¹A12`, `S = A22 − A21·T` (SPD again),
/// `U = T·S⁻¹`: `A⁻¹ = [[A11⁻¹ + U·Tᵀ, −U], [−Uᵀ, S⁻¹]]`. About ⅔·n³ multiply-adds.
fn inverse_spd(a: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    let t = Tensor::from_vec(a, (n, n), &Device::Cpu)?;
    Ok(block_inverse(&t)?.flatten_all()?.to_vec1::<f64>()?)
}

fn block_inverse(a: &Tensor) -> candle_core::Result<Tensor> {
    let n = a.dim(0)?;
    if n <= DIRECT {
        let mut m = a.flatten_all()?.to_vec1::<f64>()?;
        invert_spd(&mut m, n);
        return Tensor::from_vec(m, (n, n), a.device());
    }
    let h = n / 2;
    let top = a.narrow(0, 0, h)?;
    let a11 = top.narrow(1, 0, h)?.contiguous()?;
    let a12 = top.narrow(1, h, n - h)?.contiguous()?;
    let a22 = a.narrow(0, h, n - h)?.narrow(1, h, n - h)?.contiguous()?;
    let x11 = block_inverse(&a11)?;
    let t = x11.matmul(&a12)?;
    let s = (a22 - a12.t()?.matmul(&t)?)?;
    // Symmetrise against rounding drift, so the recursion keeps seeing an SPD matrix.
    let s = ((&s + s.t()?)? * 0.5)?;
    let y = block_inverse(&s)?;
    let u = t.matmul(&y)?;
    let tl = (x11 + u.matmul(&t.t()?)?)?;
    let tr = u.neg()?;
    let bl = tr.t()?.contiguous()?;
    Tensor::cat(&[Tensor::cat(&[tl, tr], 1)?, Tensor::cat(&[bl, y], 1)?], 0)
}

/// In-place inverse of a symmetric positive definite matrix (Gauss–Jordan without pivoting,
/// which is stable for SPD input; rows updated in parallel).
fn invert_spd(a: &mut [f64], n: usize) {
    let mut pivot_row = vec![0f64; n];
    for k in 0..n {
        let p = a[k * n + k];
        {
            let row = &mut a[k * n..(k + 1) * n];
            row[k] = 1.0;
            for x in row.iter_mut() {
                *x /= p;
            }
            pivot_row.copy_from_slice(row);
        }
        a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            if i == k {
                return;
            }
            let f = row[k];
            if f == 0.0 {
                return;
            }
            row[k] = 0.0;
            for (x, &pk) in row.iter_mut().zip(&pivot_row) {
                *x -= f * pk;
            }
        });
    }
}

/// B for one λ, as f32 (row i: the weights item i gives every item).
fn weights(g: &[f64], n: usize, lambda: f64) -> Result<Vec<f32>> {
    let mut p = g.to_vec();
    for i in 0..n {
        p[i * n + i] += lambda;
    }
    let p = inverse_spd(p, n)?;
    let diag: Vec<f64> = (0..n).map(|j| p[j * n + j]).collect();
    let mut b = vec![0f32; n * n];
    b.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for j in 0..n {
            row[j] = if i == j {
                0.0
            } else {
                (-p[i * n + j] / diag[j]) as f32
            };
        }
    });
    Ok(b)
}

/// Top-k of `x_u·B` per user of `histories`, seen items and items without train users excluded.
fn rank(b: &[f32], n: usize, histories: &[Vec<u32>], popular: &[bool], k: usize) -> Vec<Vec<u32>> {
    histories
        .par_iter()
        .map(|h| {
            let seen: HashSet<u32> = h.iter().copied().collect();
            let mut scores = vec![0f32; n];
            for &i in &seen {
                for (s, &w) in scores
                    .iter_mut()
                    .zip(&b[i as usize * n..(i as usize + 1) * n])
                {
                    *s += w;
                }
            }
            top_k(&scores, k, |j| !popular[j] || seen.contains(&(j as u32)))
                .into_iter()
                .map(|j| j as u32)
                .collect()
        })
        .collect()
}

fn distinct(items: &[u32]) -> Vec<u32> {
    let mut seen = HashSet::new();
    items.iter().copied().filter(|i| seen.insert(*i)).collect()
}

impl Ease {
    /// The λ this set would use: the fixed one, or the best of the grid on a validation slice
    /// carved from the train side.
    pub fn choose_lambda(&self, set: &EvalSet) -> Result<(f64, Vec<(f64, f64)>)> {
        let n = set.n_items;
        let mean_pop =
            set.popularity.iter().map(|&p| p as f64).sum::<f64>() / set.train_items().max(1) as f64;
        if let Some(l) = self.lambda {
            return Ok((l, Vec::new()));
        }
        // Each user's last fifth of train events (≥ 5 events) is the validation truth.
        let mut fit: Vec<Vec<u32>> = Vec::with_capacity(set.train_by_user.len());
        let mut val_users = Vec::new();
        let mut val_truth = Vec::new();
        let mut val_hist = Vec::new();
        for (u, items) in set.train_by_user.iter().enumerate() {
            let m = items.len();
            if m < 5 {
                fit.push(distinct(items));
                continue;
            }
            let cut = m - ((0.2 * m as f64).round() as usize).max(1);
            let head = distinct(&items[..cut]);
            let known: HashSet<u32> = head.iter().copied().collect();
            let truth: Vec<u32> = distinct(&items[cut..])
                .into_iter()
                .filter(|i| !known.contains(i))
                .collect();
            if !truth.is_empty() {
                val_users.push(u as u32);
                val_truth.push(truth);
                val_hist.push(head.clone());
            }
            fit.push(head);
        }
        if val_users.is_empty() {
            return Ok((mean_pop, Vec::new()));
        }
        let g = gram(&fit, n);
        let mut popularity = vec![0u32; n];
        for items in &fit {
            for &i in items {
                popularity[i as usize] += 1;
            }
        }
        let popular: Vec<bool> = popularity.iter().map(|&p| p > 0).collect();
        let val = EvalSet {
            users: val_users,
            truth: val_truth,
            history: val_hist,
            history_ts: Vec::new(),
            last_ts: Vec::new(),
            train_by_user: fit,
            popularity,
            n_items: n,
        };
        let mut scored = Vec::new();
        // Large catalogues search a coarser grid: every point is a dense inverse.
        let grid: Vec<f64> = if n > 4_000 {
            self.lambda_grid
                .iter()
                .copied()
                .filter(|m| [0.5, 1.0, 2.0].contains(m))
                .collect()
        } else {
            self.lambda_grid.clone()
        };
        for &m in &grid {
            let lambda = m * mean_pop;
            let b = weights(&g, n, lambda)?;
            let lists = rank(&b, n, &val.history, &popular, 100);
            let r = metrics(&val, &lists).values["recall@50"];
            tracing::info!(lambda, recall_at_50 = r, "EASE validation");
            scored.push((lambda, r));
        }
        let best = scored
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(mean_pop, |(l, _)| l);
        Ok((best, scored))
    }
}

impl Recommender for Ease {
    fn name(&self) -> String {
        "ease".into()
    }

    fn recommend(&self, set: &EvalSet, k: usize) -> Result<Vec<Vec<u32>>> {
        let n = set.n_items;
        if set.train_items() > MAX_ITEMS {
            return Err(ModelError::Invalid(format!(
                "EASE needs a dense {n} × {n} inverse; skipped above {MAX_ITEMS} items"
            )));
        }
        let (lambda, _) = self.choose_lambda(set)?;
        let train: Vec<Vec<u32>> = set.train_by_user.iter().map(|i| distinct(i)).collect();
        let b = weights(&gram(&train, n), n, lambda)?;
        let popular: Vec<bool> = set.popularity.iter().map(|&p| p > 0).collect();
        Ok(rank(&b, n, &set.history, &popular, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spd_inverse_times_the_matrix_is_the_identity() {
        let n = 4;
        let a = vec![
            4.0, 1.0, 0.5, 0.0, //
            1.0, 3.0, 0.2, 0.1, //
            0.5, 0.2, 2.0, 0.3, //
            0.0, 0.1, 0.3, 1.5,
        ];
        let mut inv = a.clone();
        invert_spd(&mut inv, n);
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!((v - (i == j) as u8 as f64).abs() < 1e-12, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn the_block_recursive_inverse_matches_the_direct_one() {
        // A random SPD matrix larger than the direct threshold: XᵀX + n·I.
        let n = DIRECT * 2 + 37;
        let mut s = 7u64;
        let x: Vec<f64> = (0..n * n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 1000) as f64 / 1000.0 - 0.5
            })
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| x[k * n + i] * x[k * n + j]).sum::<f64>()
                    + if i == j { n as f64 } else { 0.0 };
            }
        }
        let mut direct = a.clone();
        invert_spd(&mut direct, n);
        let blocked = inverse_spd(a, n).unwrap();
        let worst = direct
            .iter()
            .zip(&blocked)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-10, "max difference {worst}");
    }

    #[test]
    fn ease_recommends_the_item_that_co_occurs_with_the_history() {
        // Items 0 and 1 always appear together; 2 and 3 together. A user holding 0 gets 1 first.
        let train_by_user = vec![
            vec![0, 1],
            vec![0, 1],
            vec![0, 1],
            vec![2, 3],
            vec![2, 3],
            vec![0],
        ];
        let set = EvalSet {
            users: vec![5],
            truth: vec![vec![1]],
            history: vec![vec![0]],
            history_ts: Vec::new(),
            last_ts: vec![0],
            popularity: vec![4, 3, 2, 2],
            train_by_user,
            n_items: 4,
        };
        let ease = Ease {
            lambda: Some(1.0),
            ..Default::default()
        };
        let lists = ease.recommend(&set, 2).unwrap();
        assert_eq!(lists[0][0], 1, "{:?}", lists[0]);
        assert!(!lists[0].contains(&0), "seen items are excluded");
    }
}
