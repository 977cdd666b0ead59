//! CUDA kernels for the training ops of [`crate::rowmix`] and [`crate::loss`] (feature `cuda`).
//!
//! The kernels are CUDA C compiled once per device at run time by NVRTC (the GPU machine's
//! toolkit), so the build needs no kernel compiler of its own beyond what candle's CUDA backend
//! needs. Launches go through cudarc, which is `unsafe` by nature: each launch states what it
//! relies on.
#![allow(unsafe_code)]

use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp2, Layout, Result, Tensor};

use crate::params::RowStep;
use crate::rowmix::RowMix;

const SOURCE: &str = r#"
// NVRTC has no standard headers: its own index type and the float infinity by bit pattern.
typedef unsigned long long idx_t;
#define NEG_INF __int_as_float(0xff800000)

extern "C" __global__ void row_mix(const float* x, const unsigned* start, const unsigned* col,
                                   const float* w, float* out, unsigned rows_out, unsigned d) {
    unsigned r = blockIdx.x;
    if (r >= rows_out) return;
    unsigned a = start[r], b = start[r + 1];
    for (unsigned t = threadIdx.x; t < d; t += blockDim.x) {
        float acc = 0.0f;
        for (unsigned k = a; k < b; ++k) acc += w[k] * x[(idx_t)col[k] * d + t];
        out[(idx_t)r * d + t] = acc;
    }
}

// The transposed mix, without building it: forward row r's entries scatter `w · g[r]` into the
// rows they read (`out` zeroed, rows_in × d).
extern "C" __global__ void row_mix_t(const float* g, const unsigned* start, const unsigned* col,
                                     const float* w, float* out, unsigned rows, unsigned d) {
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    unsigned a = start[r], b = start[r + 1];
    for (unsigned t = threadIdx.x; t < d; t += blockDim.x) {
        float gr = g[(idx_t)r * d + t];
        for (unsigned k = a; k < b; ++k) atomicAdd(&out[(idx_t)col[k] * d + t], w[k] * gr);
    }
}

// One block of XENT_THREADS threads per row. A row's bias is the column's own (`cb`) or, for its
// sorted masked columns `mask[0..n]`, MASKED; a thread visits increasing columns, so it walks the
// list once (`p`).
#define XENT_THREADS 256
#define MASKED -1e9f
__device__ __forceinline__ float bias_at(const float* cb, const unsigned* mask, unsigned n,
                                         unsigned* p, unsigned j) {
    while (*p < n && mask[*p] < j) ++*p;
    return (*p < n && mask[*p] == j) ? MASKED : cb[j];
}

// The row's log-sum-exp of x + bias.
__device__ float row_lse(const float* x, const float* cb, const unsigned* mask, unsigned n,
                         unsigned c, float* red) {
    float m = NEG_INF;
    unsigned p = 0;
    for (unsigned j = threadIdx.x; j < c; j += blockDim.x)
        m = fmaxf(m, x[j] + bias_at(cb, mask, n, &p, j));
    red[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    m = red[0];
    __syncthreads();
    float sum = 0.0f;
    p = 0;
    for (unsigned j = threadIdx.x; j < c; j += blockDim.x)
        sum += __expf(x[j] + bias_at(cb, mask, n, &p, j) - m);
    red[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    float lse = m + logf(red[0]);
    __syncthreads();
    return lse;
}

// A row's label column is never masked.
extern "C" __global__ void xent_rows(const float* x, const float* cb, const unsigned* mstart,
                                     const unsigned* mcol, const unsigned* labels, const float* w,
                                     float* loss, unsigned b, unsigned c) {
    __shared__ float red[XENT_THREADS];
    unsigned r = blockIdx.x;
    if (r >= b) return;
    const float* xr = x + (idx_t)r * c;
    const unsigned* mask = mcol + mstart[r];
    unsigned n = mstart[r + 1] - mstart[r];
    float lse = row_lse(xr, cb, mask, n, c, red);
    if (threadIdx.x == 0) {
        unsigned l = labels[r];
        loss[r] = w[r] * (lse - (xr[l] + cb[l]));
    }
}

extern "C" __global__ void xent_grad(const float* x, const float* cb, const unsigned* mstart,
                                     const unsigned* mcol, const unsigned* labels, const float* w,
                                     const float* g, float* out, unsigned b, unsigned c) {
    __shared__ float red[XENT_THREADS];
    unsigned r = blockIdx.x;
    if (r >= b) return;
    const float* xr = x + (idx_t)r * c;
    const unsigned* mask = mcol + mstart[r];
    unsigned n = mstart[r + 1] - mstart[r];
    float lse = row_lse(xr, cb, mask, n, c, red);
    float s = g[r] * w[r];
    unsigned l = labels[r];
    unsigned p = 0;
    for (unsigned j = threadIdx.x; j < c; j += blockDim.x) {
        float q = __expf(xr[j] + bias_at(cb, mask, n, &p, j) - lse);
        out[(idx_t)r * c + j] = s * (q - (j == l ? 1.0f : 0.0f));
    }
}

// Lazy AdamW on distinct rows: thread i updates element i % d of gathered row i / d. `mom` holds
// each table row's first moment then its second (2·d values per row).
extern "C" __global__ void adam_rows(float* w, float* mom, const unsigned* rows, const float* g,
                                     unsigned n, unsigned d, float b1, float b2, float lr_c,
                                     float v_c, float eps, float decay) {
    idx_t i = (idx_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (idx_t)n * d) return;
    idx_t k = i / d, t = i % d;
    idx_t row = rows[k];
    float gi = g[i];
    float* m = mom + row * 2 * d;
    float* v = m + d;
    float mj = b1 * m[t] + (1.0f - b1) * gi;
    float vj = b2 * v[t] + (1.0f - b2) * gi * gi;
    m[t] = mj;
    v[t] = vj;
    float* wr = w + row * d;
    wr[t] = wr[t] * decay - lr_c * mj / (sqrtf(vj) * v_c + eps);
}

// AdamW on a dense variable of n values: `mom` holds the first moments, then the second.
extern "C" __global__ void adam_dense(float* w, float* mom, const float* g, idx_t n, float b1,
                                      float b2, float lr_c, float v_c, float eps, float decay) {
    idx_t i = (idx_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mj = b1 * mom[i] + (1.0f - b1) * gi;
    float vj = b2 * mom[n + i] + (1.0f - b2) * gi * gi;
    mom[i] = mj;
    mom[n + i] = vj;
    w[i] = w[i] * decay - lr_c * mj / (sqrtf(vj) * v_c + eps);
}
"#;

const MODULE: &str = "tandem_train";
const XENT_THREADS: u32 = 256;

/// The kernels' PTX, compiled by NVRTC on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling the training kernels with NVRTC: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The f32 values of a contiguous CUDA tensor.
fn input<'a>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous input was expected");
    };
    Ok(storage.as_cuda_slice::<f32>()?.slice(a..b))
}

fn launch_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out[r] = Σ w · x[col]` over the mix's CSR rows (`x` is `rows_in × d`), or with
/// `transposed` its transpose (`x` is `rows_out × d`, `out` is `rows_in × d`).
pub fn row_mix(
    storage: &CudaStorage,
    layout: &Layout,
    d: usize,
    m: &RowMix,
    transposed: bool,
) -> Result<CudaStorage> {
    let dev = storage.device().clone();
    let rows = m.start.len() - 1;
    let x = input(storage, layout)?;
    let out_rows = if transposed { m.rows_in } else { rows };
    let out = dev.alloc_zeros::<f32>(out_rows * d)?;
    if rows > 0 && d > 0 && !m.col.is_empty() {
        let name = if transposed { "row_mix_t" } else { "row_mix" };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let (start, col, w) = (
            dev.clone_htod(&m.start)?,
            dev.clone_htod(&m.col)?,
            dev.clone_htod(&m.weight)?,
        );
        let (rows_u, d_u) = (rows as u32, d as u32);
        let mut b = func.builder();
        b.arg(&x).arg(&start).arg(&col).arg(&w).arg(&out);
        b.arg(&rows_u).arg(&d_u);
        let threads = (d as u32).next_multiple_of(32).min(256);
        // SAFETY: the kernel reads `start[0..=rows]` and the `col`/`w` entries they delimit
        // (every col below rows_in: `rowmix::mix` refuses any other mix), and
        // reads `x` / writes `out` at rows below rows_in (forward: x; transposed: out) and
        // below `rows` (forward: out; transposed: x), each `d` wide; the caller checked `x`'s
        // rows against the mix and `out` was allocated with its rows above.
        unsafe { b.launch(launch_rows(rows, threads)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// The softmax cross-entropy kernels over `(b × c)` logits: without `g`, `xent_rows` gives each
/// row's `w[r] · (logsumexp(x_r + bias_r) − x[r, label] − bias[r, label])`; with `g` (each row's
/// upstream gradient), `xent_grad` gives the gradient with respect to `x`. `bias` is checked
/// against `b`, `c` and the labels when the loss op is built.
#[allow(clippy::too_many_arguments)]
pub fn xent(
    storage: &CudaStorage,
    layout: &Layout,
    b: usize,
    c: usize,
    bias: &crate::loss::Bias,
    labels: &[u32],
    w: &[f32],
    g: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = storage.device().clone();
    let x = input(storage, layout)?;
    let out = dev.alloc_zeros::<f32>(if g.is_some() { b * c } else { b })?;
    if b > 0 {
        let kernel = if g.is_some() {
            "xent_grad"
        } else {
            "xent_rows"
        };
        let func = dev.get_or_load_custom_func(kernel, MODULE, ptx()?)?;
        // An empty mask list still needs a valid device pointer.
        let masked: &[u32] = if bias.masked.is_empty() {
            &[0]
        } else {
            &bias.masked
        };
        let (column, start, masked) = (
            dev.clone_htod(&bias.column)?,
            dev.clone_htod(&bias.start)?,
            dev.clone_htod(masked)?,
        );
        let (labels, w) = (dev.clone_htod(labels)?, dev.clone_htod(w)?);
        let g = g.map(|(s, l)| input(s, l)).transpose()?;
        let (b_u, c_u) = (b as u32, c as u32);
        let mut l = func.builder();
        l.arg(&x)
            .arg(&column)
            .arg(&start)
            .arg(&masked)
            .arg(&labels)
            .arg(&w);
        if let Some(g) = &g {
            l.arg(g);
        }
        l.arg(&out).arg(&b_u).arg(&c_u);
        // SAFETY: `x` holds b·c values, `column` c; `start` b + 1 offsets into `masked`, whose
        // columns and the `labels` are < c (checked by the caller); `w` and `g` hold b; `out`
        // b (losses) or b·c (gradient); one block per row of XENT_THREADS threads, the size of
        // the kernels' shared array.
        unsafe { l.launch(launch_rows(b, XENT_THREADS)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// An embedding table trained on the GPU: the weights as a device tensor (gathered with
/// `index_select`) and the Adam moments beside them, updated in place by `adam_rows`.
pub struct DeviceTable {
    pub weights: Tensor,
    /// Per row: the first moment, then the second (`rows × 2·dim`).
    moments: CudaSlice<f32>,
    dim: usize,
}

impl DeviceTable {
    pub fn new(data: Vec<f32>, rows: usize, dim: usize, dev: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = dev else {
            candle_core::bail!("a device table needs a CUDA device");
        };
        Ok(DeviceTable {
            weights: Tensor::from_vec(data, (rows, dim), dev)?,
            moments: cuda.alloc_zeros::<f32>(rows * 2 * dim)?,
            dim,
        })
    }

    /// The rows `rows` of the table, as a new tensor.
    pub fn gather(&self, rows: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(rows, rows.len(), self.weights.device())?;
        self.weights.index_select(&idx, 0)
    }

    /// One lazy AdamW step on `rows` (sorted, distinct) given their gradient.
    pub fn apply(&mut self, rows: &[u32], grad: &Tensor, step: &RowStep) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let grad = grad.contiguous()?;
        let op = AdamOp {
            rows: Some(rows),
            moments: Mutex::new(&mut self.moments),
            dim: self.dim,
            step,
        };
        self.weights.inplace_op2(&grad, &op)
    }
}

/// An in-place AdamW update of a weight tensor (and, through the op, its moments): the rows
/// `rows` of a [`DeviceTable`] (`adam_rows`), or with no rows a whole dense variable of `dim`
/// values (`adam_dense`).
struct AdamOp<'a> {
    rows: Option<&'a [u32]>,
    moments: Mutex<&'a mut CudaSlice<f32>>,
    dim: usize,
    step: &'a RowStep,
}

impl InplaceOp2 for AdamOp<'_> {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("the AdamW kernels run on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        w: &mut CudaStorage,
        w_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
    ) -> Result<()> {
        let d = self.dim;
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        // Values updated: n rows of d, or (dense) all d of the variable.
        let n = self.rows.map_or(1, <[u32]>::len);
        let fits = g_layout.shape().elem_count() == n * d
            && w_layout.start_offset() == 0
            && w_layout.is_contiguous()
            && (self.rows.is_some()
                || (w_layout.shape().elem_count() == d && moments.len() == 2 * d));
        if !fits {
            candle_core::bail!(
                "adam: gradient of {:?} for {n} rows of {d} in a tensor of {:?}",
                g_layout.shape(),
                w_layout.shape()
            );
        }
        if n * d == 0 {
            return Ok(());
        }
        let dev = w.device().clone();
        let g = input(g, g_layout)?;
        let weights = w.as_cuda_slice_mut::<f32>()?;
        let rows = self.rows.map(|r| dev.clone_htod(r)).transpose()?;
        let name = if rows.is_some() {
            "adam_rows"
        } else {
            "adam_dense"
        };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let (n_u, d_u, d_64) = (n as u32, d as u32, d as u64);
        let mut l = func.builder();
        l.arg(weights).arg(&mut **moments);
        match &rows {
            Some(rows) => l.arg(rows).arg(&g).arg(&n_u).arg(&d_u),
            None => l.arg(&g).arg(&d_64),
        };
        let s = self.step;
        l.arg(&s.b1)
            .arg(&s.b2)
            .arg(&s.lr_c)
            .arg(&s.v_c)
            .arg(&s.eps)
            .arg(&s.decay);
        let cfg = LaunchConfig::for_num_elems((n * d) as u32);
        // SAFETY: thread i < n·d reads `g[i]` (n·d values, checked above). With rows: they
        // are distinct table rows (planned: sorted and deduplicated), so each thread writes its
        // own element of `weights` (a contiguous table of rows·d values) and of `moments`
        // (rows·2·d), and `rows` holds n. Dense: thread i reads and writes `weights[i]` (a
        // contiguous variable of d values from offset 0) and `moments[i]`, `moments[d + i]`
        // (2·d values); all checked above.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}

/// AdamW for the dense layers on a GPU: one fused kernel per variable per step, where candle's
/// optimiser launches a dozen element-wise kernels (and allocates as many temporaries) per
/// variable. The same update as [`RowStep`]'s, bias corrections folded in.
pub struct FusedAdamW {
    vars: Vec<(candle_core::Var, CudaSlice<f32>)>,
    opt: crate::params::AdamW,
}

impl FusedAdamW {
    pub fn new(vars: Vec<candle_core::Var>, opt: crate::params::AdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .map(|v| {
                let Device::Cuda(cuda) = v.device() else {
                    candle_core::bail!("the fused AdamW needs CUDA variables");
                };
                if v.dtype() != candle_core::DType::F32 {
                    candle_core::bail!("the fused AdamW updates f32 variables");
                }
                let moments = cuda.alloc_zeros::<f32>(2 * v.elem_count())?;
                Ok((v, moments))
            })
            .collect::<Result<_>>()?;
        Ok(FusedAdamW { vars, opt })
    }

    /// One step (`step` counts from 1) on every variable `grads` holds a gradient for.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, step: u64) -> Result<()> {
        let s = RowStep::new(&self.opt, step);
        for (var, moments) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            let g = g.contiguous()?;
            let op = AdamOp {
                rows: None,
                moments: Mutex::new(moments),
                dim: var.elem_count(),
                step: &s,
            };
            var.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }
}

/// The kernels against the CPU ops they stand in for. Built only with the `cuda` feature (CI
/// never builds it) and run where a GPU is: `cargo test --release -p tandem-model --features
/// cuda --no-run` here, the test binary carried to the GPU machine. No GPU is a failure.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::sampled_softmax_loss;
    use crate::params::{normal_vec, AdamW, RowPlanner, SparseTable};
    use crate::rowmix::{mix, RowMix};
    use candle_core::Var;
    use candle_nn::Optimizer;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("these tests need a CUDA device")
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} on the GPU, {y} on the CPU"
            );
        }
    }

    #[test]
    fn row_mix_and_its_scatter_backward_match_the_cpu() {
        let (cpu, gpu) = (Device::Cpu, gpu());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows_in, rows_out, d) = (300, 1000, 24);
        // Many entries per input row, so the atomic adds collide.
        let m = RowMix::build(rows_in, rows_out, |r, out| {
            let mut g = ChaCha8Rng::seed_from_u64(r as u64);
            for _ in 0..r % 7 {
                out.push((g.random_range(0..rows_in as u32), g.random::<f32>() - 0.5));
            }
        });
        let x = normal_vec(&mut rng, rows_in * d, 1.0);
        let up = normal_vec(&mut rng, rows_out * d, 1.0);
        let run = |dev: &Device| {
            let x = Var::from_vec(x.clone(), (rows_in, d), dev).unwrap();
            let up = Tensor::from_vec(up.clone(), (rows_out, d), dev).unwrap();
            let y = mix(x.as_tensor(), m.clone()).unwrap();
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(&x).unwrap().clone())
        };
        let (y_c, g_c) = run(&cpu);
        let (y_g, g_g) = run(&gpu);
        close(&y_g, &y_c, 1e-5, "forward");
        close(&g_g, &g_c, 1e-4, "backward");
    }

    #[test]
    fn the_softmax_loss_kernels_match_the_cpu() {
        let (cpu, gpu) = (Device::Cpu, gpu());
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (b, extra, d) = (64, 64, 16);
        let c = b + extra;
        let targets: Vec<u32> = (0..b).map(|_| rng.random_range(1..40)).collect();
        let mut cand_ids = targets.clone();
        cand_ids.extend((0..extra).map(|_| rng.random_range(1..200u32)));
        let log_q: Vec<f32> = (0..c).map(|_| -rng.random::<f32>() * 5.0).collect();
        let seen: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                let mut s: Vec<u32> = (0..10).map(|_| rng.random_range(1..200)).collect();
                s.retain(|&i| i != targets[r]);
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let weights: Vec<f32> = (0..b).map(|_| 0.5 + rng.random::<f32>()).collect();
        let u = normal_vec(&mut rng, b * d, 1.0);
        let v = normal_vec(&mut rng, c * d, 1.0);
        let run = |dev: &Device| {
            let u = Var::from_vec(u.clone(), (b, d), dev).unwrap();
            let v = Var::from_vec(v.clone(), (c, d), dev).unwrap();
            let inv_tau = Tensor::new(5f32, dev).unwrap();
            let loss = sampled_softmax_loss(
                u.as_tensor(),
                v.as_tensor(),
                &inv_tau,
                &log_q,
                &targets,
                &cand_ids,
                Some(&weights),
                Some(&seen),
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            (
                loss,
                grads.get(&u).unwrap().clone(),
                grads.get(&v).unwrap().clone(),
            )
        };
        let (l_c, gu_c, gv_c) = run(&cpu);
        let (l_g, gu_g, gv_g) = run(&gpu);
        close(&l_g, &l_c, 1e-4, "loss");
        close(&gu_g, &gu_c, 1e-4, "user gradient");
        close(&gv_g, &gv_c, 1e-4, "candidate gradient");
    }

    #[test]
    fn the_sparse_and_dense_adamw_kernels_match_the_cpu() {
        let (cpu, gpu) = (Device::Cpu, gpu());
        let opt = AdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        // Sparse: the same table on both devices, three steps over different row sets.
        let (rows, dim) = (500, 8);
        let mut on_cpu = SparseTable::new(rows, dim, 0.1, &mut ChaCha8Rng::seed_from_u64(3));
        let mut on_gpu = SparseTable::new(rows, dim, 0.1, &mut ChaCha8Rng::seed_from_u64(3));
        on_gpu.place(&gpu).unwrap();
        let mut planner = RowPlanner::new(rows);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for step in 1..=3 {
            let mut ids: Vec<u32> = (0..60).map(|_| rng.random_range(0..rows as u32)).collect();
            let picked = planner.plan(&mut [&mut ids]).unwrap();
            let grad = normal_vec(&mut rng, picked.len() * dim, 1.0);
            for (t, dev) in [(&mut on_cpu, &cpu), (&mut on_gpu, &gpu)] {
                let g = t.gather(picked.clone(), dev).unwrap();
                let grad = Tensor::from_vec(grad.clone(), (picked.len(), dim), dev).unwrap();
                t.apply(&g, &grad, &opt, step).unwrap();
            }
        }
        close(
            &on_gpu.to_tensor(&cpu).unwrap(),
            &on_cpu.to_tensor(&cpu).unwrap(),
            1e-5,
            "sparse table",
        );
        // Dense: the fused kernel against candle's AdamW.
        let w0 = normal_vec(&mut rng, 37 * 5, 1.0);
        let w_cpu = Var::from_vec(w0.clone(), (37, 5), &cpu).unwrap();
        let w_gpu = Var::from_vec(w0, (37, 5), &gpu).unwrap();
        let mut candle_opt = candle_nn::AdamW::new(vec![w_cpu.clone()], opt.into()).unwrap();
        let mut fused = FusedAdamW::new(vec![w_gpu.clone()], opt).unwrap();
        for step in 1..=3 {
            let target =
                Tensor::from_vec(normal_vec(&mut rng, 37 * 5, 1.0), (37, 5), &cpu).unwrap();
            let loss = |w: &Var| {
                let t = target.to_device(w.device()).unwrap();
                (w.as_tensor() - t)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            candle_opt.step(&loss(&w_cpu).backward().unwrap()).unwrap();
            fused.step(&loss(&w_gpu).backward().unwrap(), step).unwrap();
        }
        close(w_gpu.as_tensor(), w_cpu.as_tensor(), 1e-5, "dense variable");
    }
}
