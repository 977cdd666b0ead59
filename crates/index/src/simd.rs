//! Inner product with runtime CPU dispatch: AVX-512F or AVX2+FMA where the processor has them,
//! portable code elsewhere. This module holds the crate's only `unsafe`: calling a
//! `#[target_feature]` function, which is sound exactly when the feature was detected first —
//! [`select`] checks before handing out the function.

#![allow(unsafe_code)]

use std::sync::OnceLock;

pub type DotFn = fn(&[f32], &[f32]) -> f32;

/// Portable version (eight independent accumulators, vectorised by the compiler).
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    tandem_types::vector::dot(a, b)
}

/// Inner products of a query with many rows of a row-major array: `out[i] = q · row(ids[i])`,
/// where row `r` is `vectors[r·dim .. (r+1)·dim]` (`out` and `ids` have the same length).
pub type DotRowsFn = fn(&[f32], &[f32], usize, &[u32], &mut [f32]);

/// Portable version of [`DotRowsFn`].
pub fn dot_rows_portable(q: &[f32], vectors: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
    for (o, &id) in out.iter_mut().zip(ids) {
        let s = id as usize * dim;
        *o = dot_portable(q, &vectors[s..s + dim]);
    }
}

pub type DotU8Fn = fn(&[u8], &[i8], &[i8]) -> (i32, i32);

/// Exact integer dot products of unsigned codes with two rows of signed query weights (the
/// high and low halves of a 15-bit query), portable.
pub fn dot_u8_portable(c: &[u8], hi: &[i8], lo: &[i8]) -> (i32, i32) {
    let dot = |w: &[i8]| c.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum();
    (dot(hi), dot(lo))
}

/// Asks the CPU to start loading the cache line at `p` (a hint: no effect on results).
#[inline(always)]
pub fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch never faults and reads nothing the program observes; SSE is part
        // of the x86_64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch(
                (p as *const T).cast::<i8>(),
                std::arch::x86_64::_MM_HINT_T0,
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// All slices are a whole number of 64-byte blocks (the quantiser pads rows and queries).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_u8_vnni_impl(c: &[u8], hi: &[i8], lo: &[i8]) -> (i32, i32) {
        let n = c.len().min(hi.len()).min(lo.len());
        let (pc, ph, pl) = (c.as_ptr(), hi.as_ptr(), lo.as_ptr());
        let (mut ah, mut al) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut i = 0;
        // SAFETY (pointer reads): every load reads 64 bytes at i < i + 64 ≤ n ≤ len of all.
        while i + 64 <= n {
            let code = _mm512_loadu_si512(pc.add(i).cast());
            ah = _mm512_dpbusd_epi32(ah, code, _mm512_loadu_si512(ph.add(i).cast()));
            al = _mm512_dpbusd_epi32(al, code, _mm512_loadu_si512(pl.add(i).cast()));
            i += 64;
        }
        let (mut th, mut tl) = (_mm512_reduce_add_epi32(ah), _mm512_reduce_add_epi32(al));
        while i < n {
            th += c[i] as i32 * hi[i] as i32;
            tl += c[i] as i32 * lo[i] as i32;
            i += 1;
        }
        (th, tl)
    }

    /// AVX2 has no exact u8×i8 dot (vpmaddubsw saturates at 16 bits): widen both to 16 bits
    /// and use vpmaddwd, exact in 32 bits.
    #[target_feature(enable = "avx2")]
    unsafe fn dot_u8_avx2_impl(c: &[u8], hi: &[i8], lo: &[i8]) -> (i32, i32) {
        let n = c.len().min(hi.len()).min(lo.len());
        let (pc, ph, pl) = (c.as_ptr(), hi.as_ptr(), lo.as_ptr());
        let (mut ah, mut al) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut i = 0;
        // SAFETY (pointer reads): every load reads 16 bytes at i < i + 16 ≤ n ≤ len of all.
        while i + 16 <= n {
            let code = _mm256_cvtepu8_epi16(_mm_loadu_si128(pc.add(i).cast()));
            let h = _mm256_cvtepi8_epi16(_mm_loadu_si128(ph.add(i).cast()));
            let l = _mm256_cvtepi8_epi16(_mm_loadu_si128(pl.add(i).cast()));
            ah = _mm256_add_epi32(ah, _mm256_madd_epi16(code, h));
            al = _mm256_add_epi32(al, _mm256_madd_epi16(code, l));
            i += 16;
        }
        let sum = |s: __m256i| {
            let q = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b01_00_11_10));
            let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b10_11_00_01));
            _mm_cvtsi128_si32(q)
        };
        let (mut th, mut tl) = (sum(ah), sum(al));
        while i < n {
            th += c[i] as i32 * hi[i] as i32;
            tl += c[i] as i32 * lo[i] as i32;
            i += 1;
        }
        (th, tl)
    }

    pub fn dot_u8_vnni(c: &[u8], hi: &[i8], lo: &[i8]) -> (i32, i32) {
        // SAFETY: `select_u8` hands this out only after detecting avx512f, bw and vnni.
        unsafe { dot_u8_vnni_impl(c, hi, lo) }
    }

    pub fn dot_u8_avx2(c: &[u8], hi: &[i8], lo: &[i8]) -> (i32, i32) {
        // SAFETY: `select_u8` hands this out only after detecting avx2.
        unsafe { dot_u8_avx2_impl(c, hi, lo) }
    }

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

    /// A batch kernel: one call per batch of rows, with the row kernel `$row` (same target
    /// features) inlined into its loop, so there is no call per row.
    macro_rules! dot_rows_with {
        ($name:ident, $features:literal, $row:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(q: &[f32], vectors: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
                for (o, &id) in out.iter_mut().zip(ids) {
                    let s = id as usize * dim;
                    *o = $row(q, &vectors[s..s + dim]);
                }
            }
        };
    }

    dot_rows_with!(dot_rows_avx2_impl, "avx2,fma", dot_avx2_impl);
    dot_rows_with!(dot_rows_avx512_impl, "avx512f", dot_avx512_impl);

    pub fn dot_rows_avx2(q: &[f32], vectors: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
        // SAFETY: `select_rows` hands this out only after detecting avx2 and fma.
        unsafe { dot_rows_avx2_impl(q, vectors, dim, ids, out) }
    }

    pub fn dot_rows_avx512(q: &[f32], vectors: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
        // SAFETY: `select_rows` hands this out only after detecting avx512f.
        unsafe { dot_rows_avx512_impl(q, vectors, dim, ids, out) }
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

/// The batch kernel matching [`select`]'s choice.
pub fn select_rows() -> DotRowsFn {
    #[cfg(target_arch = "x86_64")]
    match chosen().1 {
        "avx512f" => return x86::dot_rows_avx512 as DotRowsFn,
        "avx2+fma" => return x86::dot_rows_avx2 as DotRowsFn,
        _ => {}
    }
    dot_rows_portable as DotRowsFn
}

/// Name of the selected implementation, for benchmark reports.
pub fn selected_name() -> &'static str {
    chosen().1
}

fn chosen_u8() -> (DotU8Fn, &'static str) {
    static CHOSEN: OnceLock<(DotU8Fn, &'static str)> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TANDEM_NO_SIMD").is_none() {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return (x86::dot_u8_vnni as DotU8Fn, "avx512vnni");
                }
                if is_x86_feature_detected!("avx2") {
                    return (x86::dot_u8_avx2 as DotU8Fn, "avx2");
                }
            }
        }
        (dot_u8_portable as DotU8Fn, "portable")
    })
}

/// The code-distance kernel for this CPU (integer, so every kernel gives the same answer).
pub fn select_u8() -> DotU8Fn {
    chosen_u8().0
}

/// Name of the selected code kernel, for benchmark reports.
pub fn selected_u8_name() -> &'static str {
    chosen_u8().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_kernels_are_exact() {
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 128, 192] {
            let c: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let hi: Vec<i8> = (0..n)
                .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
                .collect();
            let lo: Vec<i8> = (0..n).map(|i| ((i * 13 % 129) as i32 - 64) as i8).collect();
            let want = dot_u8_portable(&c, &hi, &lo);
            let plain =
                |w: &[i8]| -> i32 { c.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum() };
            assert_eq!(want, (plain(&hi), plain(&lo)));
            assert_eq!(
                select_u8()(&c, &hi, &lo),
                want,
                "n {n} ({})",
                selected_u8_name()
            );
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                assert_eq!(x86::dot_u8_avx2(&c, &hi, &lo), want, "avx2, n {n}");
            }
        }
        // Extremes: 255 × -128 over 64 lanes would saturate 16-bit pair sums.
        let c = vec![255u8; 64];
        let w = vec![-128i8; 64];
        assert_eq!(select_u8()(&c, &w, &w), (255 * -128 * 64, 255 * -128 * 64));
    }

    #[test]
    fn every_available_implementation_agrees_with_the_portable_one() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = dot_portable(&a, &b);
            let got = select()(&a, &b);
            // Three rows, the middle one `b`: the batch kernel gives the same products.
            let rows: Vec<f32> = a.iter().chain(&b).chain(&a).copied().collect();
            let mut out = [0f32; 4];
            select_rows()(&a, &rows, n, &[1, 0, 2, 1], &mut out);
            for (o, w) in out
                .iter()
                .zip([want, dot_portable(&a, &a), dot_portable(&a, &a), want])
            {
                assert!((o - w).abs() <= 1e-4 * (1.0 + w.abs()), "n {n}: {o} vs {w}");
            }
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n {n}: {got} vs {want} ({})",
                selected_name()
            );
        }
    }
}
