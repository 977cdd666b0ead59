//! Small vector arithmetic shared by the index and the model's serving path.

/// Inner product over the common length of `a` and `b`, with eight independent accumulators so
/// the compiler vectorises it (portable; the index picks SIMD kernels at run time on top).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

#[cfg(test)]
mod tests {
    #[test]
    fn dot_covers_the_tail_and_the_common_length() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![2f32; 19];
        assert_eq!(super::dot(&a, &b), 2.0 * (0..19).sum::<i32>() as f32);
        assert_eq!(super::dot(&a, &b[..3]), 2.0 * 3.0);
    }
}
