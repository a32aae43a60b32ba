//! Products with few result rows (LoRA's rank) and long sums: dot products
//! of the small operand's rows, packed, with the other operand's columns
//! read in place.
//!
//! A packed GEMM copies both operands into panels first; for LoRA A's
//! forward (`A·x`, 8 × 576 by 576 × 256 tokens) and B's part of the input
//! gradient (`Bᵀ·dy`) that copy of the large operand costs as much as the
//! arithmetic: on SmolLM2's training step these products took 0.066 s
//! through matrixmultiply, 0.045 s here. LoRA's weight gradients (rank-wide
//! results over the tokens) are sums of outer products instead
//! ([`try_narrow`]): dot products of the same kind measured no faster than
//! the GEMM there, outer products ~1.4× faster per node (`--profile`).
//!
//! A product is `C[i,j] = Σ_p A[i,p]·B[p,j]` with C's rows contiguous
//! (`C[i,j]` at `c + i + j·csc`), A and B given by element strides.

use super::gemm::{with_scratch, with_small_scratch};
use std::arch::x86_64::*;

/// The most result rows handled here.
const SMALL: usize = 16;

/// A strided matrix: `x[r, c]` at `p + r·rs + c·cs` (elements).
#[derive(Clone, Copy)]
pub(super) struct Strided {
    pub p: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    /// SAFETY: (r, c) must lie within the matrix.
    #[inline(always)]
    unsafe fn at(self, r: usize, c: usize) -> f32 {
        // SAFETY: forwarded from the caller.
        unsafe { *self.p.offset(r as isize * self.rs + c as isize * self.cs) }
    }
}

/// Computes `C = alpha·(A·B)` (`A` m×k, `B` k×n; the sums rounded, then
/// scaled) if m is at most [`SMALL`], k longer and B's columns contiguous;
/// returns whether it did.
///
/// # Safety
/// Every element the strides address must be valid, C (`m × n`, column `j`
/// at `c + j·csc`) writable and not overlapping A or B.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn try_product(
    alpha: f32,
    m: usize,
    k: usize,
    n: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    csc: isize,
) -> bool {
    let fits = m <= SMALL && k > SMALL && b.rs == 1;
    if !(fits && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return false;
    }
    // SAFETY: forwarded from the caller; the CPU has AVX2 and FMA.
    unsafe { small_m_dots(alpha, m, k, n, a, b, c, csc) };
    true
}

/// The most entries on the narrow side of a product [`try_narrow`] runs:
/// LoRA ranks up to 8.
const NARROW: usize = 8;

/// Computes `C = alpha·(A·B)` (`A` m×k, `B` k×n; the sums rounded, then
/// scaled) where one side of C is narrow (at most [`NARROW`]: a LoRA
/// gradient's rank) and the other runs along contiguous values of its
/// operand: C's tall side 8 entries at a time, as sums of outer products
/// over the `k` terms (one vector of the tall operand times each of the
/// narrow one's values, broadcast), with neither operand copied. Returns
/// whether it ran (a CPU with AVX2 and FMA; `k` at least 16; the tall side
/// at least 8 and contiguous).
///
/// LoRA's weight gradients (`x·dᵀ`, `d·dyᵀ`: 576 or 1536 by 8 over 256
/// tokens) ran 15–25 GFLOP/s through the packed GEMM or matrixmultiply,
/// whose packing of the tall operand costs as much as the arithmetic.
///
/// # Safety
/// As for [`try_product`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn try_narrow(
    alpha: f32,
    m: usize,
    k: usize,
    n: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    csc: isize,
) -> bool {
    if k < 16 || !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return false;
    }
    macro_rules! by_width {
        ($f:ident, $w:expr) => {
            // SAFETY: forwarded from the caller; the CPU has AVX2 and FMA.
            unsafe {
                match $w {
                    1 => $f::<1>(alpha, (m, k, n), a, b, c, csc),
                    2 => $f::<2>(alpha, (m, k, n), a, b, c, csc),
                    3 => $f::<3>(alpha, (m, k, n), a, b, c, csc),
                    4 => $f::<4>(alpha, (m, k, n), a, b, c, csc),
                    5 => $f::<5>(alpha, (m, k, n), a, b, c, csc),
                    6 => $f::<6>(alpha, (m, k, n), a, b, c, csc),
                    7 => $f::<7>(alpha, (m, k, n), a, b, c, csc),
                    _ => $f::<8>(alpha, (m, k, n), a, b, c, csc),
                }
            }
        };
    }
    if (1..=NARROW).contains(&n) && a.rs == 1 && m >= 8 {
        by_width!(tall_rows, n);
    } else if (1..=NARROW).contains(&m) && b.cs == 1 && n >= 8 {
        by_width!(tall_columns, m);
    } else {
        return false;
    }
    true
}

/// [`try_narrow`] where C has `N` columns and A's rows are contiguous:
/// `C[i0..i0+8, j] = Σ_p A[i0..i0+8, p]·B[p, j]`, each entry's sum in
/// order with fused multiply-adds; rows past the last 8 one at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn tall_rows<const N: usize>(
    alpha: f32,
    (m, k, _): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: *mut f32,
    csc: isize,
) {
    let m8 = m / 8 * 8;
    let av = _mm256_set1_ps(alpha);
    // SAFETY (this block): rows i < m, terms p < k and columns j < N lie
    // within A, B and C (the caller's promise).
    unsafe {
        for i0 in (0..m8).step_by(8) {
            let acc = outer_sums::<N>(k, (a.p.add(i0), a.cs), (b.p, b.rs, b.cs));
            for (j, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(c.offset(i0 as isize + j as isize * csc), _mm256_mul_ps(*acc, av));
            }
        }
        for i in m8..m {
            for j in 0..N {
                *c.offset(i as isize + j as isize * csc) = dot(k, a, b, (i, j)) * alpha;
            }
        }
    }
}

/// [`try_narrow`] where C has `M` rows and B's columns are contiguous
/// across a term: `C[i, j0..j0+8] = Σ_p A[i, p]·B[p, j0..j0+8]`, each
/// entry's sum in order with fused multiply-adds, stored through a
/// transpose where `M` is 8; columns past the last 8 one at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn tall_columns<const M: usize>(
    alpha: f32,
    (_, k, n): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: *mut f32,
    csc: isize,
) {
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(alpha);
    // SAFETY (this block): rows i < M, terms p < k and columns j < n lie
    // within A, B and C (the caller's promise).
    unsafe {
        for j0 in (0..n8).step_by(8) {
            let mut rows = [_mm256_setzero_ps(); 8];
            let acc = outer_sums::<M>(k, (b.p.offset(j0 as isize * b.cs), b.rs), (a.p, a.cs, a.rs));
            for (r, acc) in rows.iter_mut().zip(acc) {
                *r = _mm256_mul_ps(acc, av);
            }
            if M == 8 {
                for (u, v) in super::packed::transpose8(rows).into_iter().enumerate() {
                    _mm256_storeu_ps(c.offset((j0 + u) as isize * csc), v);
                }
            } else {
                let mut t = [[0f32; 8]; 8];
                for (i, v) in rows.iter().enumerate().take(M) {
                    _mm256_storeu_ps(t[i].as_mut_ptr(), *v);
                }
                for u in 0..8 {
                    for (i, t) in t.iter().enumerate().take(M) {
                        *c.offset(i as isize + (j0 + u) as isize * csc) = t[u];
                    }
                }
            }
        }
        for j in n8..n {
            for i in 0..M {
                *c.offset(i as isize + j as isize * csc) = dot(k, a, b, (i, j)) * alpha;
            }
        }
    }
}

/// `W` sums over `k` terms of a vector of 8 contiguous values (from `v`,
/// `v_step` apart from one term to the next) times each of `W` values
/// (from `s`, `s_step` apart from one term to the next, `s_stride` apart
/// within a term), broadcast: term by term in order, with fused
/// multiply-adds.
///
/// # Safety
/// Every value addressed is readable; the CPU has AVX2 and FMA (the
/// caller's features: inlined, no closures).
#[inline(always)]
unsafe fn outer_sums<const W: usize>(
    k: usize,
    (v, v_step): (*const f32, isize),
    (s, s_step, s_stride): (*const f32, isize, isize),
) -> [__m256; W] {
    let mut acc = [_mm256_setzero_ps(); W];
    let (mut v, mut s) = (v, s);
    for _ in 0..k {
        // SAFETY: forwarded from the caller.
        unsafe {
            let x = _mm256_loadu_ps(v);
            for (w, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(x, _mm256_set1_ps(*s.offset(w as isize * s_stride)), *acc);
            }
            (v, s) = (v.offset(v_step), s.offset(s_step));
        }
    }
    acc
}

/// `C[i, j]`'s sum over `k` terms one at a time, in order with fused
/// multiply-adds (as [`outer_sums`] sums each lane).
///
/// # Safety
/// Row `i` of A and column `j` of B hold `k` readable values.
#[inline(always)]
unsafe fn dot(k: usize, a: Strided, b: Strided, (i, j): (usize, usize)) -> f32 {
    // SAFETY: forwarded from the caller.
    (0..k).fold(0f32, |s, p| unsafe { a.at(i, p).mul_add(b.at(p, j), s) })
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// C's entries as dot products of A's rows (packed,
/// padded to groups of 4 with zero rows) with B's columns read in place, 4
/// rows × 2 columns at a time.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_dots(alpha: f32, m: usize, k: usize, n: usize, a: Strided, b: Strided, c: *mut f32, csc: isize) {
    let m4 = m.div_ceil(4) * 4;
    with_scratch(m4 * k, |ap| {
        for i in 0..m4 {
            for p in 0..k {
                // SAFETY: (i, p) lies within A for i < m.
                ap[i * k + p] = if i < m { unsafe { a.at(i, p) } } else { 0.0 };
            }
        }
        let k8 = k / 8 * 8;
        let mut j = 0;
        while j < n {
            // Two columns (the last one twice where n is odd).
            let cols = [j, (j + 1).min(n - 1)];
            // SAFETY: columns j, j+1 of B hold k contiguous floats.
            let bc = cols.map(|jj| unsafe { b.p.offset(jj as isize * b.cs) });
            for i0 in (0..m4).step_by(4) {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                let mut p = 0;
                while p < k8 {
                    // SAFETY: p + 8 ≤ k within both columns and the rows.
                    let bv = bc.map(|x| unsafe { _mm256_loadu_ps(x.add(p)) });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: packed row i0 + r < m4 holds k floats.
                        let av = unsafe { _mm256_loadu_ps(ap.as_ptr().add((i0 + r) * k + p)) };
                        acc[0] = _mm256_fmadd_ps(av, bv[0], acc[0]);
                        acc[1] = _mm256_fmadd_ps(av, bv[1], acc[1]);
                    }
                    p += 8;
                }
                for (r, acc) in acc.iter().enumerate() {
                    let i = i0 + r;
                    if i >= m {
                        break;
                    }
                    for (q, &jj) in cols.iter().enumerate() {
                        let mut s = hsum(acc[q]);
                        for p in k8..k {
                            // SAFETY: p < k.
                            s = ap[i * k + p].mul_add(unsafe { *bc[q].add(p) }, s);
                        }
                        // SAFETY: (i, jj) lies within C.
                        unsafe { *c.offset(i as isize + jj as isize * csc) = s * alpha };
                    }
                }
            }
            j += 2;
        }
    })
}

/// `C = D + alpha·(A·B)` (D laid out as C) for a sum of `k` ≤ 16 terms,
/// each entry's sum taken in order with fused multiply-adds from zero (as
/// the packed GEMM's kernel does), then scaled and added to D's entry: the
/// values of a separate product, SCALE and ADD, bit for bit. A is packed
/// column by column (k × m); blocks of 256 rows (in L1) go against every
/// column of C.
///
/// # Safety
/// As for [`try_product`], with `k` ≤ 16 and a CPU with AVX2 and FMA; D
/// (`m × n`, column `j` at `d + j·csc`) readable.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn add_small_k(
    alpha: f32,
    m: usize,
    k: usize,
    n: usize,
    a: Strided,
    b: Strided,
    d: *const f32,
    c: *mut f32,
    csc: isize,
) {
    with_small_scratch(k * m, |ap| {
        for p in 0..k {
            for i in 0..m {
                // SAFETY: (i, p) lies within A.
                ap[p * m + i] = unsafe { a.at(i, p) };
            }
        }
        let av = _mm256_set1_ps(alpha);
        // One entry of C from its 8-row accumulator and D.
        let finish = |acc: __m256, cj: *mut f32, dj: *const f32| {
            // SAFETY: callers pass 8 rows within column j of D and C.
            unsafe { _mm256_storeu_ps(cj, _mm256_add_ps(_mm256_loadu_ps(dj), _mm256_mul_ps(av, acc))) }
        };
        for i0 in (0..m).step_by(256) {
            let i1 = (i0 + 256).min(m);
            for j in 0..n {
                let mut bj = [_mm256_setzero_ps(); SMALL];
                for (p, v) in bj.iter_mut().enumerate().take(k) {
                    // SAFETY: (p, j) lies within B.
                    *v = _mm256_set1_ps(unsafe { b.at(p, j) });
                }
                // SAFETY: column j of C and of D hold m floats.
                let (cj, dj) = unsafe { (c.offset(j as isize * csc), d.offset(j as isize * csc)) };
                let mut i = i0;
                // Four independent sums of 8 rows at a time (one would wait
                // on each multiply-add's latency); each entry's sum still
                // runs over p in order.
                while i + 32 <= i1 {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for (p, &w) in bj.iter().enumerate().take(k) {
                        // SAFETY: rows i..i+32 of packed column p.
                        let col = unsafe { ap.as_ptr().add(p * m + i) };
                        for (q, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(col.add(8 * q)) }, w, *acc);
                        }
                    }
                    for (q, &acc) in acc.iter().enumerate() {
                        // SAFETY: pointer arithmetic within column j.
                        finish(acc, unsafe { cj.add(i + 8 * q) }, unsafe { dj.add(i + 8 * q) });
                    }
                    i += 32;
                }
                while i + 8 <= i1 {
                    let mut acc = _mm256_setzero_ps();
                    for (p, &w) in bj.iter().enumerate().take(k) {
                        // SAFETY: rows i..i+8 of packed column p.
                        acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(ap.as_ptr().add(p * m + i)) }, w, acc);
                    }
                    // SAFETY: pointer arithmetic within column j.
                    finish(acc, unsafe { cj.add(i) }, unsafe { dj.add(i) });
                    i += 8;
                }
                for i in i..i1 {
                    // SAFETY: (p, j) lies within B.
                    let s = (0..k).fold(0f32, |s, p| ap[p * m + i].mul_add(unsafe { b.at(p, j) }, s));
                    // SAFETY: row i of column j of D and C.
                    unsafe { *cj.add(i) = *dj.add(i) + alpha * s };
                }
            }
        }
    })
}
