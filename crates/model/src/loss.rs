//! The sampled-softmax retrieval loss with logQ correction.
//!
//! For a batch of users `u_r` and candidates `c_j` (first the batch's own positives, so row `r`'s
//! label is column `r`, then any shared uniform negatives):
//!
//! `logit(r, j) = <u_r, c_j> / τ − log Q_j`
//!
//! where `Q_j` is the expected number of times candidate `j` enters a batch (`B·p(j)` for in-batch
//! candidates, `N/|corpus|` for uniform ones). Without the correction popular items are
//! over-represented as negatives and the model learns popularity instead of relevance.
//! A candidate that is the same item as row `r`'s positive ("accidental hit") is masked out of
//! row `r`'s softmax, except in its own label column, and so (optionally) is every item the
//! row's user engaged with before the example: retrieval excludes seen items, so training should
//! not spend effort pushing them down.
//!
//! [`full_softmax_loss`] is the exact softmax over the whole catalogue (no sampling, so no
//! correction): the strongest training signal where scoring every item per step is affordable.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::rowmix::cpu_f32;

/// Value added to masked logits.
const MASKED: f32 = -1e9;

/// What is added to a `(B × C)` logit matrix: a bias per column (the logQ correction, or the
/// out-of-vocabulary column's mask) and, per row, the masked columns (accidental hits, items the
/// user saw), so no `B × C` matrix is built on the host or copied to a device.
pub(crate) struct Bias {
    /// `C` values, added to every row.
    pub(crate) column: Vec<f32>,
    /// Row `r`'s masked columns are `masked[start[r]..start[r + 1]]`, sorted and distinct.
    pub(crate) start: Vec<u32>,
    pub(crate) masked: Vec<u32>,
}

impl Bias {
    /// `column`, and per row the columns `masked(r)` yields (any order, repeats allowed). Rows
    /// are built in parallel: at thousands of rows with tens of masked items each this was a
    /// large share of a GPU step's host time.
    fn new<I: IntoIterator<Item = u32>>(
        b: usize,
        column: Vec<f32>,
        masked: impl Fn(usize) -> I + Sync,
    ) -> Self {
        let rows: Vec<Vec<u32>> = (0..b)
            .into_par_iter()
            .with_min_len(256)
            .map(|r| {
                let mut row: Vec<u32> = masked(r).into_iter().collect();
                row.sort_unstable();
                row.dedup();
                row
            })
            .collect();
        let mut start = Vec::with_capacity(b + 1);
        let mut all = Vec::with_capacity(rows.iter().map(Vec::len).sum());
        start.push(0);
        for row in &rows {
            all.extend_from_slice(row);
            start.push(all.len() as u32);
        }
        Bias {
            column,
            start,
            masked: all,
        }
    }

    /// Row `r`'s masked columns.
    fn masked_of(&self, r: usize) -> &[u32] {
        &self.masked[self.start[r] as usize..self.start[r + 1] as usize]
    }

    /// Row `r`'s bias into `out` (`C` values).
    fn row(&self, r: usize, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(&self.column);
        for &j in self.masked_of(r) {
            out[j as usize] = MASKED;
        }
    }
}

/// Each row's weighted `−log softmax(logits + bias)[r, labels[r]]`, as one op (its sum is the
/// weighted mean loss): the forward is a log-sum-exp pass per row and the backward
/// ([`XentGrad`]) is `(softmax − one-hot) · w_r`, so a `(B × C)` logit matrix costs two passes
/// instead of a chain of element-wise tensors (bias add, max, exp, sum, log, gather and each of
/// their gradients). A row's label column is never masked.
struct SoftmaxXent {
    bias: Bias,
    labels: Vec<u32>,
    /// Per row weight, normalised to sum 1.
    weights: Vec<f32>,
}

impl SoftmaxXent {
    /// Checks the labels and mask lists against the `C` columns once, here, so the forward and
    /// the backward only check the logits' shape.
    fn new(bias: Bias, labels: Vec<u32>, weights: Option<&[f32]>) -> Result<Self> {
        let (b, c) = (labels.len(), bias.column.len());
        if bias.start.len() != b + 1 {
            candle_core::bail!(
                "{} rows of masks for {b} labels",
                bias.start.len().saturating_sub(1)
            );
        }
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= c) {
            candle_core::bail!("label {l} out of {c} columns");
        }
        if let Some(&j) = bias.masked.iter().find(|&&j| j as usize >= c) {
            candle_core::bail!("masked column {j} out of {c}");
        }
        let masks_label = |r: usize| bias.masked_of(r).binary_search(&labels[r]).is_ok();
        if let Some(r) = (0..b).find(|&r| masks_label(r)) {
            candle_core::bail!("row {r}'s label column is masked");
        }
        let weights = match weights {
            None => vec![1.0 / b.max(1) as f32; b],
            Some(w) => {
                let total: f32 = w.iter().sum::<f32>().max(1e-12);
                w.iter().map(|x| x / total).collect()
            }
        };
        Ok(SoftmaxXent {
            bias,
            labels,
            weights,
        })
    }

    fn check(&self, layout: &Layout) -> Result<(usize, usize)> {
        let (b, c) = layout.shape().dims2()?;
        if b != self.labels.len() || c != self.bias.column.len() {
            candle_core::bail!(
                "softmax loss over {b}×{c} logits with {} labels and {} column biases",
                self.labels.len(),
                self.bias.column.len()
            );
        }
        Ok((b, c))
    }

    /// The CUDA forward: per-row losses, or (given each row's upstream gradient `g`) the
    /// gradient with respect to the logits.
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
        g: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, c) = self.check(layout)?;
        if let Some((_, g)) = g {
            check_upstream(b, g)?;
        }
        let (bias, labels, w) = (&self.bias, &self.labels, &self.weights);
        let out = crate::cuda::xent(storage, layout, b, c, bias, labels, w, g)?;
        let shape = if g.is_some() {
            Shape::from((b, c))
        } else {
            Shape::from(b)
        };
        Ok((out, shape))
    }

    /// Row `r`'s log-sum-exp of `x + bias`.
    fn lse(x: &[f32], bias: &[f32]) -> f32 {
        let max = x
            .iter()
            .zip(bias)
            .map(|(x, b)| x + b)
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = x.iter().zip(bias).map(|(x, b)| (x + b - max).exp()).sum();
        max + sum.ln()
    }
}

impl CustomOp1 for SoftmaxXent {
    fn name(&self) -> &'static str {
        "softmax-xent"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c) = self.check(layout)?;
        let x = cpu_f32(storage, layout, self.name())?;
        let mut loss = vec![0f32; b];
        loss.par_iter_mut()
            .enumerate()
            .for_each_init(Vec::new, |br, (r, out)| {
                self.bias.row(r, br);
                let xr = &x[r * c..][..c];
                let l = self.labels[r] as usize;
                *out = self.weights[r] * (Self::lse(xr, br) - (xr[l] + br[l]));
            });
        Ok((CpuStorage::F32(loss), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(storage, layout, None)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The upstream gradient stays where it is: reading it back to the host here would make
        // the host wait for the GPU's forward in every step.
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &XentGrad { xent: self })?;
        Ok(Some(grad))
    }
}

/// The gradient of [`SoftmaxXent`] with respect to its logits (first input), given each row's
/// upstream gradient (second input, `b` values).
struct XentGrad<'a> {
    xent: &'a SoftmaxXent,
}

/// Refuses an upstream gradient of other than one value per row.
fn check_upstream(b: usize, g: &Layout) -> Result<()> {
    if g.shape().elem_count() != b {
        candle_core::bail!("{} upstream gradients for {b} rows", g.shape().elem_count());
    }
    Ok(())
}

impl CustomOp2 for XentGrad<'_> {
    fn name(&self) -> &'static str {
        "softmax-xent-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.xent;
        let (b, c) = s.check(layout)?;
        check_upstream(b, g_layout)?;
        let x = cpu_f32(storage, layout, self.name())?;
        let g = cpu_f32(g_storage, g_layout, self.name())?;
        let mut grad = vec![0f32; b * c];
        grad.par_chunks_mut(c.max(1))
            .enumerate()
            .for_each_init(Vec::new, |br, (r, out)| {
                let scale = g[r] * s.weights[r];
                s.bias.row(r, br);
                let xr = &x[r * c..][..c];
                let lse = SoftmaxXent::lse(xr, br);
                for ((o, x), bias) in out.iter_mut().zip(xr).zip(br.iter()) {
                    *o = scale * (x + bias - lse).exp();
                }
                out[s.labels[r] as usize] -= scale;
            });
        Ok((CpuStorage::F32(grad), Shape::from((b, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
        g_storage: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.xent.cuda(storage, layout, Some((g_storage, g_layout)))
    }
}

/// The weighted softmax cross-entropy of `users · candsᵀ / τ + bias` (label of row `r`:
/// `labels[r]`). `1/τ` scales the users rather than the `(B × C)` logits: the same product,
/// and the temperature's gradient flows through `B × d` values.
fn scaled_xent(
    users: &Tensor,
    cands: &Tensor,
    inv_tau: &Tensor,
    bias: Bias,
    labels: Vec<u32>,
    weights: Option<&[f32]>,
) -> Result<Tensor> {
    let logits = users.broadcast_mul(inv_tau)?.matmul(&cands.t()?)?;
    logits
        .contiguous()?
        .apply_op1(SoftmaxXent::new(bias, labels, weights)?)?
        .sum_all()
}

/// Weighted mean cross-entropy of the corrected logits.
///
/// - `users`: `(B, d)`; `cands`: `(C, d)` with `C ≥ B`; `inv_tau`: a scalar tensor (1/τ);
/// - `log_q`: `C` corrections; `targets`: the `B` positive item ids; `cand_ids`: the `C` item ids;
/// - `weights`: optional per-row example weights;
/// - `seen`: optional per-row sorted item ids the row's user engaged with before the example,
///   left out of that row's negatives.
#[allow(clippy::too_many_arguments)]
pub fn sampled_softmax_loss(
    users: &Tensor,
    cands: &Tensor,
    inv_tau: &Tensor,
    log_q: &[f32],
    targets: &[u32],
    cand_ids: &[u32],
    weights: Option<&[f32]>,
    seen: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let bias = sampled_bias(log_q, targets, cand_ids, seen);
    sampled_softmax_loss_biased(users, cands, inv_tau, bias, weights)
}

/// [`sampled_softmax_loss`] with its biases and masks built ahead ([`sampled_bias`]): they
/// depend only on ids, so training builds them with the batch, off the step's path.
pub(crate) fn sampled_softmax_loss_biased(
    users: &Tensor,
    cands: &Tensor,
    inv_tau: &Tensor,
    bias: Bias,
    weights: Option<&[f32]>,
) -> Result<Tensor> {
    let b = bias.start.len().saturating_sub(1);
    scaled_xent(
        users,
        cands,
        inv_tau,
        bias,
        (0..b as u32).collect(),
        weights,
    )
}

/// The column biases (`−logQ`) and per-row masks of [`sampled_softmax_loss`]: in row `r`, every
/// column holding its target (other than column `r`, its own positive) or an item it saw.
pub(crate) fn sampled_bias(
    log_q: &[f32],
    targets: &[u32],
    cand_ids: &[u32],
    seen: Option<&[Vec<u32>]>,
) -> Bias {
    // Columns of each candidate item (an item can be both a positive and a uniform sample).
    let mut order: Vec<(u32, u32)> = cand_ids.iter().zip(0..).map(|(&i, j)| (i, j)).collect();
    order.sort_unstable();
    // A bit per item id up to the largest candidate: most seen items are not candidates, and
    // one bit test turns them away before any search.
    let mut is_cand = vec![0u64; (order.last().map_or(0, |&(i, _)| i as usize) + 1).div_ceil(64)];
    for &(i, _) in &order {
        is_cand[i as usize >> 6] |= 1 << (i & 63);
    }
    let columns = |item: u32| {
        let hit = is_cand
            .get(item as usize >> 6)
            .is_some_and(|w| w & (1 << (item & 63)) != 0);
        let from = if hit {
            order.partition_point(|&(i, _)| i < item)
        } else {
            order.len()
        };
        order[from..]
            .iter()
            .take_while(move |&&(i, _)| i == item)
            .map(|&(_, j)| j)
    };
    Bias::new(targets.len(), log_q.iter().map(|q| -q).collect(), |r| {
        let row_seen: &[u32] = seen.map_or(&[], |s| &s[r]);
        std::iter::once(targets[r])
            .chain(row_seen.iter().copied())
            .flat_map(&columns)
            .filter(move |&j| j as usize != r)
    })
}

/// The exact softmax over the whole catalogue: `items` is `(N, d)` with row `i` the embedding of
/// item id `i`; row 0 (the out-of-vocabulary item) is never a candidate. No sampling, so no
/// correction. `seen` as in [`sampled_softmax_loss`] (a row's own target is never masked).
pub fn full_softmax_loss(
    users: &Tensor,
    items: &Tensor,
    inv_tau: &Tensor,
    targets: &[u32],
    weights: Option<&[f32]>,
    seen: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let b = targets.len();
    let n = items.dim(0)?;
    let mut column = vec![0f32; n];
    if let Some(oov) = column.first_mut() {
        *oov = MASKED;
    }
    let bias = Bias::new(b, column, |r| {
        let row_seen: &[u32] = seen.map_or(&[], |s| &s[r]);
        let target = targets[r];
        row_seen
            .iter()
            .copied()
            .filter(move |&i| i != target && (i as usize) < n)
    });
    scaled_xent(users, items, inv_tau, bias, targets.to_vec(), weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn mask_lists_are_sorted_and_distinct_and_a_masked_label_is_refused() {
        let bias = Bias::new(3, vec![0.5; 4], |r| match r {
            0 => vec![3, 1, 3],
            1 => vec![],
            _ => vec![2],
        });
        assert_eq!(
            (bias.start.clone(), bias.masked.clone()),
            (vec![0, 2, 2, 3], vec![1, 3, 2])
        );
        let mut row = Vec::new();
        bias.row(0, &mut row);
        assert_eq!(row, [0.5, MASKED, 0.5, MASKED]);

        let logits = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let ok = logits.apply_op1(SoftmaxXent::new(bias, vec![0, 1, 3], None).unwrap());
        assert!(ok.is_ok(), "{ok:?}");
        let bias = Bias::new(3, vec![0.5; 4], |r| if r == 2 { vec![2] } else { vec![] });
        let e = SoftmaxXent::new(bias, vec![0, 1, 2], None)
            .err()
            .expect("a masked label is refused");
        assert!(
            e.to_string().contains("row 2's label column is masked"),
            "{e}"
        );
    }

    /// The loss and its gradient computed by hand in f64 (softmax − one-hot, chain rule).
    fn by_hand(
        u: &[[f64; 2]; 3],
        c: &[[f64; 2]; 3],
        tau: f64,
        log_q: &[f64; 3],
        mask: &[[bool; 3]; 3],
    ) -> (f64, [[f64; 2]; 3]) {
        let mut loss = 0.0;
        let mut grad = [[0.0; 2]; 3];
        for r in 0..3 {
            let logits: Vec<f64> = (0..3)
                .map(|j| {
                    if mask[r][j] {
                        f64::NEG_INFINITY
                    } else {
                        (u[r][0] * c[j][0] + u[r][1] * c[j][1]) / tau - log_q[j]
                    }
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            loss += -(logits[r] - max - z.ln());
            for j in 0..3 {
                let p = (logits[j] - max).exp() / z;
                let coeff = (p - if j == r { 1.0 } else { 0.0 }) / tau / 3.0;
                grad[r][0] += coeff * c[j][0];
                grad[r][1] += coeff * c[j][1];
            }
        }
        (loss / 3.0, grad)
    }

    #[test]
    fn the_corrected_loss_and_gradient_match_a_hand_worked_three_by_three_example() {
        let dev = Device::Cpu;
        let u = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]];
        let c = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]];
        let tau = 0.5;
        // Q = B·p with p = (0.5, 0.3, 0.2).
        let log_q = [(1.5f64).ln(), (0.9f64).ln(), (0.6f64).ln()];
        let (want_loss, want_grad) = by_hand(&u, &c, tau, &log_q, &[[false; 3]; 3]);

        // Worked on paper for row 0: logits (1.6−ln1.5, 0−ln0.9, 2−ln0.6)
        // = (1.194535, 0.105361, 2.510826); Σ exp = 16.72823; −log softmax at column 0
        // = ln 16.72823 − 1.194535 = 1.622563.
        let row0 = {
            let l = [1.6 - 1.5f64.ln(), -(0.9f64.ln()), 2.0 - 0.6f64.ln()];
            let z: f64 = l.iter().map(|x| x.exp()).sum();
            -(l[0] - z.ln())
        };
        assert!((row0 - 1.622563).abs() < 1e-5, "{row0}");

        let uv =
            Var::from_tensor(&Tensor::new(&[[1f32, 0.0], [0.6, 0.8], [0.0, 1.0]], &dev).unwrap())
                .unwrap();
        let ct = Tensor::new(&[[0.8f32, 0.6], [0.0, 1.0], [1.0, 0.0]], &dev).unwrap();
        let inv_tau = Tensor::new(1.0f32 / tau as f32, &dev).unwrap();
        let lq: Vec<f32> = log_q.iter().map(|&x| x as f32).collect();
        let loss = sampled_softmax_loss(
            &uv,
            &ct,
            &inv_tau,
            &lq,
            &[10, 11, 12],
            &[10, 11, 12],
            None,
            None,
        )
        .unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want_loss).abs() < 1e-5, "loss {got} vs {want_loss}");
        let grads = loss.backward().unwrap();
        let g = grads.get(&uv).unwrap().to_vec2::<f32>().unwrap();
        for r in 0..3 {
            for d in 0..2 {
                assert!(
                    (g[r][d] as f64 - want_grad[r][d]).abs() < 1e-5,
                    "grad[{r}][{d}]"
                );
            }
        }
    }

    #[test]
    fn an_accidental_hit_is_not_its_own_negative() {
        let dev = Device::Cpu;
        let u = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]];
        let c = [[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]];
        // Rows 0 and 2 share item 7: each masks the other's column.
        let mut mask = [[false; 3]; 3];
        mask[0][2] = true;
        mask[2][0] = true;
        let (want, _) = by_hand(&u, &c, 1.0, &[0.0; 3], &mask);
        let ut = Tensor::new(&[[1f32, 0.0], [0.6, 0.8], [0.0, 1.0]], &dev).unwrap();
        let ct = Tensor::new(&[[0.8f32, 0.6], [0.0, 1.0], [0.8, 0.6]], &dev).unwrap();
        let one = Tensor::new(1f32, &dev).unwrap();
        let got = sampled_softmax_loss(
            &ut,
            &ct,
            &one,
            &[0.0; 3],
            &[7, 8, 7],
            &[7, 8, 7],
            None,
            None,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let (unmasked, _) = by_hand(&u, &c, 1.0, &[0.0; 3], &[[false; 3]; 3]);
        assert!((got - unmasked).abs() > 1e-3);
    }

    #[test]
    fn the_gradient_agrees_with_finite_differences() {
        let dev = Device::Cpu;
        let base = [0.3f32, -0.2, 0.5, 0.1, -0.4, 0.7, 0.2, 0.2];
        let ct = Tensor::new(&[[0.5f32, 0.1], [-0.3, 0.9], [0.7, -0.2], [0.1, 0.1]], &dev).unwrap();
        let inv_tau = Tensor::new(3.0f32, &dev).unwrap();
        let log_q = [0.2, -0.1, 0.4, 0.0];
        let loss_at = |x: &[f32]| -> f64 {
            let t = Tensor::from_slice(x, (4, 2), &dev).unwrap();
            sampled_softmax_loss(
                &t,
                &ct,
                &inv_tau,
                &log_q,
                &[1, 2, 3, 4],
                &[1, 2, 3, 4],
                Some(&[1.0, 2.0, 1.0, 0.5]),
                None,
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
        };
        let v = Var::from_tensor(&Tensor::from_slice(&base, (4, 2), &dev).unwrap()).unwrap();
        let loss = sampled_softmax_loss(
            &v,
            &ct,
            &inv_tau,
            &log_q,
            &[1, 2, 3, 4],
            &[1, 2, 3, 4],
            Some(&[1.0, 2.0, 1.0, 0.5]),
            None,
        )
        .unwrap();
        let g = loss
            .backward()
            .unwrap()
            .get(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for k in 0..base.len() {
            let (mut plus, mut minus) = (base, base);
            plus[k] += 1e-2;
            minus[k] -= 1e-2;
            let fd = (loss_at(&plus) - loss_at(&minus)) / 2e-2;
            assert!(
                (fd - g[k] as f64).abs() < 2e-3,
                "component {k}: fd {fd} vs autograd {}",
                g[k]
            );
        }
    }

    #[test]
    fn the_full_softmax_loss_and_gradient_match_a_hand_worked_example() {
        // Items 0 (OOV, never a candidate), 1, 2, 3; two users; user 1 has seen item 3.
        let dev = Device::Cpu;
        let items = [[9.0f64, 9.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]];
        let users = [[0.6f64, 0.8], [1.0, 0.0]];
        let targets = [2u32, 1];
        let inv_tau = 2.0f64;
        let mut want_loss = 0.0;
        let mut want_grad = [[0.0f64; 2]; 2];
        for r in 0..2 {
            let cands: Vec<usize> = if r == 1 { vec![1, 2] } else { vec![1, 2, 3] };
            let logit =
                |j: usize| inv_tau * (users[r][0] * items[j][0] + users[r][1] * items[j][1]);
            let z: f64 = cands.iter().map(|&j| logit(j).exp()).sum();
            want_loss += -(logit(targets[r] as usize) - z.ln()) / 2.0;
            for &j in &cands {
                let p = logit(j).exp() / z;
                let coeff = (p - (j == targets[r] as usize) as u8 as f64) * inv_tau / 2.0;
                want_grad[r][0] += coeff * items[j][0];
                want_grad[r][1] += coeff * items[j][1];
            }
        }
        // Row 0 worked on paper: logits (1.2, 1.6, 2.0) for items 1..3, target item 2:
        // ln(3.3201 + 4.9530 + 7.3891) − 1.6 = 2.7513 − 1.6 = 1.1513.
        let row0 = (1.2f64.exp() + 1.6f64.exp() + 2.0f64.exp()).ln() - 1.6;
        assert!((row0 - 1.1513).abs() < 1e-4, "{row0}");

        let u =
            Var::from_tensor(&Tensor::new(&[[0.6f32, 0.8], [1.0, 0.0]], &dev).unwrap()).unwrap();
        let it = Tensor::new(&[[9f32, 9.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
        let seen = vec![vec![], vec![3u32]];
        let loss = full_softmax_loss(
            &u,
            &it,
            &Tensor::new(inv_tau as f32, &dev).unwrap(),
            &targets,
            None,
            Some(&seen),
        )
        .unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want_loss).abs() < 1e-5, "loss {got} vs {want_loss}");
        let g = loss
            .backward()
            .unwrap()
            .get(&u)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..2 {
            for d in 0..2 {
                assert!(
                    (g[r][d] as f64 - want_grad[r][d]).abs() < 1e-5,
                    "grad[{r}][{d}]"
                );
            }
        }
    }

    #[test]
    fn seen_items_leave_the_sampled_softmax_but_a_row_keeps_its_own_positive() {
        let dev = Device::Cpu;
        let u = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]];
        let c = [[0.8, 0.6], [0.0, 1.0], [0.6, 0.8]];
        // Row 1's user has seen items 7 and 9 (the other rows' positives).
        let mut mask = [[false; 3]; 3];
        mask[1][0] = true;
        mask[1][2] = true;
        let (want, _) = by_hand(&u, &c, 1.0, &[0.0; 3], &mask);
        let ut = Tensor::new(&[[1f32, 0.0], [0.6, 0.8], [0.0, 1.0]], &dev).unwrap();
        let ct = Tensor::new(&[[0.8f32, 0.6], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
        let one = Tensor::new(1f32, &dev).unwrap();
        let seen = vec![vec![], vec![7u32, 8, 9], vec![]];
        let got = sampled_softmax_loss(
            &ut,
            &ct,
            &one,
            &[0.0; 3],
            &[7, 8, 9],
            &[7, 8, 9],
            None,
            Some(&seen),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
