//! Inner product with runtime CPU dispatch: AVX-512F or AVX2+FMA where the processor has them,
//! portable code elsewhere. This module holds the crate's only `unsafe`: calling a
//! `#[target_feature]` function, which is sound exactly when the feature was detected first —
//! [`select`] checks before handing out the function.

#![allow(unsafe_code)]

use std::sync::OnceLock;

pub type DotFn = fn(&[f32], &[f32]) -> f32;

/// Portable version: eight independent accumulators so the compiler vectorises it.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2_impl(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (pointer reads): every load reads 8 floats at i < i + 8 ≤ n ≤ len of both.
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let hi = _mm256_extractf128_ps(s, 1);
        let lo = _mm256_castps256_ps128(s);
        let q = _mm_add_ps(hi, lo);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut total = _mm_cvtss_f32(q);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot_avx512_impl(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY (pointer reads): every load reads 16 floats at i < i + 16 ≤ n ≤ len of both.
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            s1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                s1,
            );
            i += 32;
        }
        if i + 16 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            i += 16;
        }
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }

    pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `select` hands this out only after detecting avx2 and fma.
        unsafe { dot_avx2_impl(a, b) }
    }

    pub fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `select` hands this out only after detecting avx512f.
        unsafe { dot_avx512_impl(a, b) }
    }
}

fn chosen() -> (DotFn, &'static str) {
    static CHOSEN: OnceLock<(DotFn, &'static str)> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TANDEM_NO_SIMD").is_none() {
                if is_x86_feature_detected!("avx512f") {
                    return (x86::dot_avx512 as DotFn, "avx512f");
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return (x86::dot_avx2 as DotFn, "avx2+fma");
                }
            }
        }
        (dot_portable as DotFn, "portable")
    })
}

/// The fastest implementation this CPU supports (decided once per process; `TANDEM_NO_SIMD`
/// forces the portable one).
pub fn select() -> DotFn {
    chosen().0
}

/// Name of the selected implementation, for benchmark reports.
pub fn selected_name() -> &'static str {
    chosen().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_available_implementation_agrees_with_the_portable_one() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = dot_portable(&a, &b);
            let got = select()(&a, &b);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n {n}: {got} vs {want} ({})",
                selected_name()
            );
        }
    }
}
