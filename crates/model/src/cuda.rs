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

/// `out[r] = Σ w · x[col]` over CSR rows `start`/`col`/`w`: `x` is `(rows_in × d)`.
pub fn row_mix(
    storage: &CudaStorage,
    layout: &Layout,
    d: usize,
    start: &[u32],
    col: &[u32],
    w: &[f32],
) -> Result<CudaStorage> {
    let dev = storage.device().clone();
    let rows_out = start.len() - 1;
    let x = input(storage, layout)?;
    let out = dev.alloc_zeros::<f32>(rows_out * d)?;
    if rows_out > 0 && d > 0 && !col.is_empty() {
        let func = dev.get_or_load_custom_func("row_mix", MODULE, ptx()?)?;
        let (start, col, w) = (
            dev.clone_htod(start)?,
            dev.clone_htod(col)?,
            dev.clone_htod(w)?,
        );
        let (rows_u, d_u) = (rows_out as u32, d as u32);
        let mut b = func.builder();
        b.arg(&x).arg(&start).arg(&col).arg(&w).arg(&out);
        b.arg(&rows_u).arg(&d_u);
        let threads = (d as u32).next_multiple_of(32).min(256);
        // SAFETY: the kernel reads `start[0..=rows_out]`, the `col`/`w` entries they delimit
        // (all < rows_in, checked when the mix was built) and `x` rows below rows_in, and writes
        // `out[0..rows_out·d]`; every buffer was allocated with those lengths above.
        unsafe { b.launch(launch_rows(rows_out, threads)) }.w()?;
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
        let op = AdamRows {
            rows,
            moments: Mutex::new(&mut self.moments),
            dim: self.dim,
            step,
        };
        self.weights.inplace_op2(&grad, &op)
    }
}

/// The in-place update of a [`DeviceTable`]'s weights (and, through the op, its moments).
struct AdamRows<'a> {
    rows: &'a [u32],
    moments: Mutex<&'a mut CudaSlice<f32>>,
    dim: usize,
    step: &'a RowStep,
}

impl InplaceOp2 for AdamRows<'_> {
    fn name(&self) -> &'static str {
        "adam-rows"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("adam-rows runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        w: &mut CudaStorage,
        w_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
    ) -> Result<()> {
        let n = self.rows.len();
        let d = self.dim;
        if g_layout.shape().elem_count() != n * d || w_layout.start_offset() != 0 {
            candle_core::bail!("adam-rows: gradient of {:?} for {n} rows", g_layout.shape());
        }
        let dev = w.device().clone();
        let g = input(g, g_layout)?;
        let rows = dev.clone_htod(self.rows)?;
        let func = dev.get_or_load_custom_func("adam_rows", MODULE, ptx()?)?;
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let weights = w.as_cuda_slice_mut::<f32>()?;
        let s = self.step;
        let (n_u, d_u) = (n as u32, d as u32);
        let mut l = func.builder();
        l.arg(weights).arg(&mut **moments).arg(&rows).arg(&g);
        l.arg(&n_u).arg(&d_u);
        l.arg(&s.b1)
            .arg(&s.b2)
            .arg(&s.lr_c)
            .arg(&s.v_c)
            .arg(&s.eps)
            .arg(&s.decay);
        let cfg = LaunchConfig::for_num_elems((n * d) as u32);
        // SAFETY: the rows are distinct table rows (gathered, sorted and deduplicated), so each
        // thread writes its own element of `weights` (rows·dim values) and `moments`
        // (rows·2·dim); `g` holds n·d values and `rows` n.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}
