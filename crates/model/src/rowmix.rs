//! Sparse row mixing as a differentiable candle op: `out[r] = Σ w · x[i]` over a short list of
//! `(i, w)` per output row.
//!
//! Embedding lookups (one entry of weight 1 per row) and mean pooling of histories (one entry of
//! weight `1/n` per valid item) are both this op on the rows a training step gathered. Written
//! as a dense `(rows_out × rows_in)` matrix product, as before, a batch of 1024 users with 50
//! history items each over 40k distinct rows costs a 160 MB matrix and two 3-GFLOP products per
//! step; here the forward and the backward are `O(entries · d)` work. The backward is the
//! transposed mix: on a CPU built with a counting sort when the backward runs, so it too is a
//! gather (rows written by one thread each, both directions split across the rayon pool); on a
//! GPU applied without building it, each forward entry scattering its row with atomic adds (no
//! host work and no second upload).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Below this many output values a mix runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// A sparse `(rows_out × rows_in)` matrix in compressed-row form.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMix {
    pub(crate) rows_in: usize,
    /// Entries of output row `r`: `start[r]..start[r + 1]`.
    pub(crate) start: Vec<u32>,
    pub(crate) col: Vec<u32>,
    pub(crate) weight: Vec<f32>,
}

impl RowMix {
    /// A mix over `rows_in` input rows, built row by row with [`RowMix::push`] and
    /// [`RowMix::end_row`].
    pub fn new(rows_in: usize) -> RowMix {
        RowMix {
            rows_in,
            start: vec![0],
            col: Vec::new(),
            weight: Vec::new(),
        }
    }

    /// A mix of `rows_out` rows over `rows_in`, output row `r` holding the entries `fill(r, _)`
    /// pushes; rows are built in parallel chunks (a batch's history pooling has hundreds of
    /// thousands of entries).
    pub fn build(
        rows_in: usize,
        rows_out: usize,
        fill: impl Fn(usize, &mut Vec<(u32, f32)>) + Sync,
    ) -> RowMix {
        const CHUNK: usize = 512;
        let parts: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = (0..rows_out.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let (mut lens, mut col, mut weight, mut row) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for r in c * CHUNK..((c + 1) * CHUNK).min(rows_out) {
                    row.clear();
                    fill(r, &mut row);
                    lens.push(row.len() as u32);
                    for &(j, w) in &row {
                        col.push(j);
                        weight.push(w);
                    }
                }
                (lens, col, weight)
            })
            .collect();
        let entries = parts.iter().map(|p| p.1.len()).sum();
        let mut m = RowMix {
            rows_in,
            start: Vec::with_capacity(rows_out + 1),
            col: Vec::with_capacity(entries),
            weight: Vec::with_capacity(entries),
        };
        m.start.push(0);
        for (lens, col, weight) in parts {
            for n in lens {
                m.start.push(m.start[m.start.len() - 1] + n);
            }
            m.col.extend_from_slice(&col);
            m.weight.extend_from_slice(&weight);
        }
        m
    }

    /// Adds `weight · x[col]` to the row being built.
    pub fn push(&mut self, col: u32, weight: f32) {
        self.col.push(col);
        self.weight.push(weight);
    }

    pub fn end_row(&mut self) {
        self.start.push(self.col.len() as u32);
    }

    pub fn rows_out(&self) -> usize {
        self.start.len() - 1
    }

    /// The transposed mix (the backward of this one); each row's entries come in increasing
    /// column order.
    pub fn transpose(&self) -> RowMix {
        let mut start = vec![0u32; self.rows_in + 1];
        for &c in &self.col {
            start[c as usize + 1] += 1;
        }
        for i in 0..self.rows_in {
            start[i + 1] += start[i];
        }
        let mut next = start.clone();
        let mut col = vec![0u32; self.col.len()];
        let mut weight = vec![0f32; self.col.len()];
        for r in 0..self.rows_out() {
            for k in self.start[r] as usize..self.start[r + 1] as usize {
                let slot = &mut next[self.col[k] as usize];
                col[*slot as usize] = r as u32;
                weight[*slot as usize] = self.weight[k];
                *slot += 1;
            }
        }
        RowMix {
            rows_in: self.rows_out(),
            start,
            col,
            weight,
        }
    }

    /// Applies the mix to `x` (`rows_in × d`, row-major) into `out` (`rows_out × d`).
    fn mix_into(&self, x: &[f32], d: usize, out: &mut [f32]) {
        let row = |(r, o): (usize, &mut [f32])| {
            for k in self.start[r] as usize..self.start[r + 1] as usize {
                let w = self.weight[k];
                let src = &x[self.col[k] as usize * d..][..d];
                for (o, s) in o.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        };
        if out.len() >= PARALLEL_MIN && d > 0 {
            out.par_chunks_mut(d).enumerate().for_each(row);
        } else if d > 0 {
            out.chunks_mut(d).enumerate().for_each(row);
        }
    }
}

/// The candle op: a mix, or its transpose (the other's backward). Both directions share the
/// mix; the transpose is applied without building it on a GPU (each forward entry scatters
/// its row with atomic adds) and built when the backward runs on a CPU.
struct MixOp {
    m: Arc<RowMix>,
    transposed: bool,
}

impl MixOp {
    /// Rows (in, out) of this direction.
    fn rows(&self) -> (usize, usize) {
        let (i, o) = (self.m.rows_in, self.m.rows_out());
        if self.transposed {
            (o, i)
        } else {
            (i, o)
        }
    }

    /// The row width `d` of an input `(rows_in × d)`, refusing any other row count.
    fn width(&self, layout: &Layout) -> Result<usize> {
        let (rows, d) = layout.shape().dims2()?;
        let (rows_in, _) = self.rows();
        if rows != rows_in {
            candle_core::bail!("row-mix over {rows_in} rows applied to {rows} rows");
        }
        Ok(d)
    }
}

/// The f32 values of a contiguous CPU tensor, for the custom ops' forwards (`op` names the op
/// in the error).
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&storage.as_slice::<f32>()?[a..b])
}

impl CustomOp1 for MixOp {
    fn name(&self) -> &'static str {
        "row-mix"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.width(layout)?;
        let x = cpu_f32(storage, layout, self.name())?;
        let (_, rows_out) = self.rows();
        let mut out = vec![0f32; rows_out * d];
        if self.transposed {
            self.m.transpose().mix_into(x, d, &mut out);
        } else {
            self.m.mix_into(x, d, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows_out, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.width(layout)?;
        let (_, rows_out) = self.rows();
        let out = crate::cuda::row_mix(storage, layout, d, &self.m, self.transposed)?;
        Ok((out, Shape::from((rows_out, d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = MixOp {
            m: self.m.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(op)?))
    }
}

/// `mix · x` for a 2-D f32 tensor `x`, differentiable with respect to `x`. A mix reading a
/// row outside its `rows_in` is refused here (the GPU kernels index with its entries unchecked).
pub fn mix(x: &Tensor, m: RowMix) -> Result<Tensor> {
    if let Some(&c) = m.col.iter().find(|&&c| c as usize >= m.rows_in) {
        candle_core::bail!("row-mix entry reads row {c} of {}", m.rows_in);
    }
    x.contiguous()?.apply_op1(MixOp {
        m: Arc::new(m),
        transposed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn example() -> RowMix {
        // out0 = x2; out1 = (x0 + x2) / 2; out2 = nothing; out3 = 3·x1 − x0 (entries in
        // column order, so transposing twice gives the same entries back).
        let mut m = RowMix::new(3);
        m.push(2, 1.0);
        m.end_row();
        m.push(0, 0.5);
        m.push(2, 0.5);
        m.end_row();
        m.end_row();
        m.push(0, -1.0);
        m.push(1, 3.0);
        m.end_row();
        m
    }

    #[test]
    fn a_mix_built_in_parallel_chunks_equals_one_built_row_by_row() {
        // Enough rows for several chunks, some of them empty.
        let entries = |r: usize| -> Vec<(u32, f32)> {
            (0..r % 4)
                .map(|k| (((r * 7 + k * 3) % 11) as u32, 0.5 + k as f32))
                .collect()
        };
        let mut serial = RowMix::new(11);
        for r in 0..1300 {
            for (c, w) in entries(r) {
                serial.push(c, w);
            }
            serial.end_row();
        }
        let parallel = RowMix::build(11, 1300, |r, out| out.extend(entries(r)));
        assert_eq!(parallel, serial);
        assert_eq!(RowMix::build(11, 0, |_, _| {}), RowMix::new(11));
    }

    #[test]
    fn forward_matches_the_dense_product_and_transpose_is_an_involution() {
        let dev = Device::Cpu;
        let m = example();
        assert_eq!(m.transpose().transpose(), m);
        let x = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let out = mix(&x, m).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            out,
            vec![vec![5., 6.], vec![3., 4.], vec![0., 0.], vec![8., 10.]]
        );
        // An entry reading past the input rows is refused before any kernel sees it.
        let mut bad = example();
        bad.col[1] = 3;
        let err = mix(&x, bad).unwrap_err().to_string();
        assert!(err.contains("reads row 3 of 3"), "{err}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let x0: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let x = Var::from_vec(x0.clone(), (3, 4), &dev).unwrap();
        // A non-linear scalar of the mix, so each output row's gradient differs.
        let probe = Tensor::new(
            &[
                [1f32, -2., 0.5, 3.],
                [0.25, 1., -1., 2.],
                [4., 4., 4., 4.],
                [-0.5, 0., 1.5, 1.],
            ],
            &dev,
        )
        .unwrap();
        let f = |t: &Tensor| -> Tensor {
            let y = mix(t, example()).unwrap();
            (y.sqr().unwrap() * &probe).unwrap().sum_all().unwrap()
        };
        let grads = f(x.as_tensor()).backward().unwrap();
        let g = grads.get(&x).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in 0..12 {
            let at = |delta: f32| -> f32 {
                let mut v = x0.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, (3, 4), &dev).unwrap();
                f(&t).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (numeric - g[i]).abs() < 1e-2 * (1.0 + numeric.abs()),
                "x[{i}]: analytic {} vs numeric {numeric}",
                g[i]
            );
        }
    }

    #[test]
    fn large_mixes_split_across_threads_give_the_same_rows() {
        let dev = Device::Cpu;
        let (rows_in, d) = (500, 64);
        let x: Vec<f32> = (0..rows_in * d).map(|i| (i % 97) as f32 * 0.01).collect();
        let x = Tensor::from_vec(x, (rows_in, d), &dev).unwrap();
        let mut m = RowMix::new(rows_in);
        for r in 0..1000u32 {
            m.push(r * 7 % rows_in as u32, 0.5);
            m.push(r * 13 % rows_in as u32, 0.25);
            m.end_row();
        }
        assert!(m.rows_out() * d >= PARALLEL_MIN);
        let out = mix(&x, m.clone()).unwrap().to_vec2::<f32>().unwrap();
        let xs = x.to_vec2::<f32>().unwrap();
        for (r, row) in out.iter().enumerate() {
            let (a, b) = (r * 7 % rows_in, r * 13 % rows_in);
            for (k, v) in row.iter().enumerate() {
                assert_eq!(*v, 0.5 * xs[a][k] + 0.25 * xs[b][k]);
            }
        }
    }
}
