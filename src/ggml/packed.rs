//! A frozen weight's products on x86-64 with AVX2 and FMA: a packed GEMM
//! whose A panels are filled straight from the weight's rows, dequantized
//! block by block of the sum, instead of a band of the weight dequantized
//! into F32 and then packed again by matrixmultiply.
//!
//! matrixmultiply's kernel (8 × 8, three shuffles per term of the sum)
//! shares the shuffle port with its multiply-adds. This kernel keeps a
//! 16 × 6 tile of the result in twelve registers and broadcasts B's values:
//! two loads, six broadcasts and twelve multiply-adds per term, no
//! shuffles. On one Zen 3 core (92 GFLOP/s peak) it runs ~90 GFLOP/s with
//! its panels in L1. Through whole products over Q4_1 and Q8_0 weights on
//! a training step's shapes it ran 67–81 GFLOP/s against 58–68 for the
//! bands and matrixmultiply, and 115–139 against 94–120 on two threads
//! (+10–25 %, interleaved in one process).
//!
//! Blocking: a pass over at most [`KC`] terms of the sum packs B (the
//! activations or their gradient, `kc × n`) once, then each band of at most
//! [`MC`] result rows is dequantized into A panels (`mc × kc`, in L2) and
//! run against every B panel (`kc × 6`, in L1). Each entry's sum runs in
//! order with fused multiply-adds within a pass; passes add to the result.

use super::dequant::Dequantizer;
use super::gemm::with_scratch;
use super::gemm_small::Strided;
use std::arch::x86_64::*;

/// Result rows per register tile (two AVX vectors).
const MR: usize = 16;
/// Result columns per register tile.
const NR: usize = 6;
/// Most terms of the sum per pass: a B panel (`KC × NR`, 9 KiB) stays in
/// L1 while the A block runs past it. (256 and 512 measured no different.)
const KC: usize = 384;
/// Result rows per A block (`MC × KC`, 144 KiB, in L2; 144 and 192
/// measured no different).
const MC: usize = 96;

/// A frozen 2-D weight in its file layout: row `r` at `data + r·row_bytes`,
/// of a type `deq` turns into F32 in blocks of `blck` values (`blck_bytes`
/// bytes each).
#[derive(Clone, Copy)]
pub(super) struct Weight {
    pub data: *const u8,
    pub row_bytes: usize,
    pub deq: Dequantizer,
    pub blck: usize,
    pub blck_bytes: usize,
}

impl Weight {
    /// `n` values of row `r` from value `v` on (`v` and `n` whole blocks)
    /// into `dst`.
    ///
    /// # Safety
    /// The values lie within the weight; `dst` has room for `n` floats.
    #[inline]
    unsafe fn dequant(&self, r: usize, v: usize, n: usize, dst: *mut f32) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let src = self.data.add(r * self.row_bytes + v / self.blck * self.blck_bytes);
            self.deq.row(src, dst, n);
        }
    }
}

/// How the weight gives the product's A.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Orient {
    /// `A[i, p] = W[i][p]`: the weight's rows are the result's rows (the
    /// forward `W·x`).
    Rows,
    /// `A[i, p] = W[p][i]`: the weight's rows are the sum's terms (the
    /// input gradient `Wᵀ·dy`).
    Columns,
}

/// `C[i, j] = Σ_p A[i, p]·B[p, j]` over result rows `i0..i1`, columns
/// `j < n` and terms `p < k`, A given by `w` as `orient` says, `C[i, j]` at
/// `c + i + j·ldc`. Calls `done(r0, r1)` as each band of rows becomes
/// final (e.g. to add an epilogue while the band is in cache). Returns
/// false, having done nothing, where the CPU lacks AVX2 or FMA.
///
/// # Safety
/// Every `A[i, p]` and `B[p, j]` addressed lies within its tensor; for
/// `Orient::Columns`, `i0` and `i1` are whole blocks of the weight's rows
/// (or `i1` its end); C's rows `i0..i1` of every column are writable by
/// this thread alone and overlap neither input.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    w: &Weight,
    orient: Orient,
    (i0, i1): (usize, usize),
    k: usize,
    n: usize,
    b: Strided,
    c: *mut f32,
    ldc: usize,
    done: &mut dyn FnMut(usize, usize),
) -> bool {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return false;
    }
    if i1 > i0 && k > 0 && n > 0 {
        // SAFETY: forwarded from the caller; the CPU has AVX2 and FMA.
        unsafe { run(w, orient, (i0, i1), k, n, b, c, ldc, done) };
    }
    true
}

/// Pass and band sizes: `kc` (terms per pass) starts passes at whole blocks
/// of a row where the weight's rows run along the sum; `mc` (rows per band)
/// starts bands at whole blocks where they run along the result's rows.
fn blocking(w: &Weight, orient: Orient, k: usize) -> (usize, usize) {
    let passes = k.div_ceil(KC);
    let even = k.div_ceil(passes);
    match orient {
        Orient::Rows => (even.next_multiple_of(w.blck.max(8)).min(k), MC),
        Orient::Columns => (even.next_multiple_of(8).min(k), MC.next_multiple_of(w.blck)),
    }
}

/// [`product`] on a CPU with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    w: &Weight,
    orient: Orient,
    (i0, i1): (usize, usize),
    k: usize,
    n: usize,
    b: Strided,
    c: *mut f32,
    ldc: usize,
    done: &mut dyn FnMut(usize, usize),
) {
    let (kc_max, mc_max) = blocking(w, orient, k);
    let panels = n.div_ceil(NR);
    let mc_pad = mc_max.next_multiple_of(MR);
    // B's panels (+ NR floats: the packing's last 8-wide store overshoots),
    // A's block, and a staging area for the dequantized rows.
    let (b_len, a_len) = (panels * NR * kc_max + 8, mc_pad * kc_max);
    let stage_len = match orient {
        Orient::Rows => MR * kc_max,
        Orient::Columns => mc_pad,
    };
    with_scratch(b_len + a_len + stage_len, |s| {
        let (bp, rest) = s.split_at_mut(b_len);
        let (ap, stage) = rest.split_at_mut(a_len);
        let mut p0 = 0;
        while p0 < k {
            let kc = kc_max.min(k - p0);
            let last = p0 + kc == k;
            // SAFETY (this block): every pointer below addresses the scratch
            // split above (sized for kc_max, mc_max), B's columns j < n and
            // terms p0..p0+kc, the weight's values named by the caller, or
            // C's rows i0..i1.
            unsafe {
                pack_b(b, p0, kc, n, bp.as_mut_ptr());
                let mut r0 = i0;
                while r0 < i1 {
                    let mc = mc_max.min(i1 - r0);
                    match orient {
                        Orient::Rows => pack_rows(w, r0, mc, p0, kc, ap.as_mut_ptr(), stage.as_mut_ptr()),
                        Orient::Columns => pack_columns(w, r0, mc, p0, kc, ap.as_mut_ptr(), stage.as_mut_ptr()),
                    }
                    for jp in 0..panels {
                        let nn = NR.min(n - jp * NR);
                        let bpanel = bp.as_ptr().add(jp * NR * kc);
                        for ip in 0..mc.div_ceil(MR) {
                            let mm = MR.min(mc - ip * MR);
                            let apanel = ap.as_ptr().add(ip * MR * kc);
                            let cp = c.add(r0 + ip * MR + jp * NR * ldc);
                            if mm == MR && nn == NR {
                                kernel(kc, apanel, bpanel, cp, ldc, p0 > 0);
                            } else {
                                let mut tile = [0f32; MR * NR];
                                kernel(kc, apanel, bpanel, tile.as_mut_ptr(), MR, false);
                                for j in 0..nn {
                                    for i in 0..mm {
                                        let d = cp.add(j * ldc + i);
                                        let v = tile[j * MR + i];
                                        *d = if p0 > 0 { *d + v } else { v };
                                    }
                                }
                            }
                        }
                    }
                    if last {
                        done(r0, r0 + mc);
                    }
                    r0 += mc;
                }
            }
            p0 += kc;
        }
    })
}

/// The 16 × 6 tile `C (+)= A·B` over `k` terms: `a` a packed panel (16
/// values per term), `b` a packed panel (6 per term); C's columns `ldc`
/// floats apart, added to where `accumulate`, else written.
#[inline(always)]
unsafe fn kernel(k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    // SAFETY: the caller passes panels of k terms and a 16 × 6 tile of C.
    unsafe {
        for j in 0..NR {
            // The tile's columns are far apart; fetch them while summing.
            _mm_prefetch::<_MM_HINT_T0>(c.add(j * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(j * ldc + MR - 1) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        // One term: a macro, not a closure, so that it is compiled with
        // the caller's AVX2 and FMA.
        macro_rules! step {
            ($a:expr, $b:expr) => {{
                let (a, b) = ($a, $b);
                let (a0, a1) = (_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8)));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let bj = _mm256_broadcast_ss(&*b.add(j));
                    acc[0] = _mm256_fmadd_ps(a0, bj, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a1, bj, acc[1]);
                }
            }};
        }
        let (mut a, mut b) = (a, b);
        let mut p = 0;
        while p + 4 <= k {
            for u in 0..4 {
                step!(a.add(u * MR), b.add(u * NR));
            }
            (a, b, p) = (a.add(4 * MR), b.add(4 * NR), p + 4);
        }
        while p < k {
            step!(a, b);
            (a, b, p) = (a.add(MR), b.add(NR), p + 1);
        }
        for (j, acc) in acc.iter().enumerate() {
            let cj = c.add(j * ldc);
            for (h, &v) in acc.iter().enumerate() {
                let v = if accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(cj.add(8 * h)), v)
                } else {
                    v
                };
                _mm256_storeu_ps(cj.add(8 * h), v);
            }
        }
    }
}

/// Transposes an 8 × 8 block held as 8 row vectors.
#[inline(always)]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register shuffles only (the callers enable AVX).
    unsafe {
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ]
    }
}

/// Packs terms `p0..p0+kc` of B's `n` columns into panels of 6 columns
/// (`out[jp·6·kc + p·6 + j]`), the last padded with zeros.
///
/// # Safety
/// Those terms of B are readable; `out` holds `⌈n/6⌉·6·kc + 8` floats.
#[inline(always)]
unsafe fn pack_b(b: Strided, p0: usize, kc: usize, n: usize, out: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for jp in 0..n.div_ceil(NR) {
            let dst = out.add(jp * NR * kc);
            let nn = NR.min(n - jp * NR);
            let col = |j: usize| b.p.offset((p0 as isize) * b.rs + ((jp * NR + j) as isize) * b.cs);
            let mut p = 0;
            if nn == NR && b.rs == 1 {
                // Six columns' runs of 8 terms, transposed; each store of 8
                // overshoots by 2, which the next store (or panel) rewrites.
                let cols: [*const f32; NR] = std::array::from_fn(col);
                while p + 8 <= kc {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (r, cj) in r.iter_mut().zip(cols) {
                        *r = _mm256_loadu_ps(cj.add(p));
                    }
                    for (q, v) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + q) * NR), v);
                    }
                    p += 8;
                }
            }
            for j in 0..NR {
                let cj = if j < nn { Some(col(j)) } else { None };
                for p in p..kc {
                    *dst.add(p * NR + j) = cj.map_or(0.0, |cj| *cj.offset(p as isize * b.rs));
                }
            }
        }
    }
}

/// A's block for result rows `r0..r0+mc`, terms `p0..p0+kc`, where the
/// weight's rows are the result's rows: each group of 16 rows dequantized
/// into `stage` (16 × kc), then transposed into its panel (`kc × 16`),
/// the last group padded with zero rows.
///
/// # Safety
/// The rows and terms lie within the weight, `p0` and `kc` whole blocks;
/// `out` holds `⌈mc/16⌉·16·kc` floats, `stage` 16·kc.
#[inline(always)]
unsafe fn pack_rows(w: &Weight, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32, stage: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for ip in 0..mc.div_ceil(MR) {
            let rows = MR.min(mc - ip * MR);
            for i in 0..MR {
                let s = stage.add(i * kc);
                if i < rows {
                    w.dequant(r0 + ip * MR + i, p0, kc, s);
                } else {
                    std::ptr::write_bytes(s, 0, kc);
                }
            }
            let dst = out.add(ip * MR * kc);
            let mut p = 0;
            while p + 8 <= kc {
                for h in 0..2 {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, r) in r.iter_mut().enumerate() {
                        *r = _mm256_loadu_ps(stage.add((8 * h + i) * kc + p));
                    }
                    for (q, v) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + q) * MR + 8 * h), v);
                    }
                }
                p += 8;
            }
            for p in p..kc {
                for i in 0..MR {
                    *dst.add(p * MR + i) = *stage.add(i * kc + p);
                }
            }
        }
    }
}

/// A's block for result rows `r0..r0+mc`, terms `p0..p0+kc`, where the
/// weight's rows are the sum's terms: each term's row segment dequantized
/// into `stage`, then cut into the panels' runs of 16 (the last padded with
/// zeros).
///
/// # Safety
/// The rows and terms lie within the weight, `r0` and `mc` whole blocks
/// (or `mc` reaching the row's end); `out` holds `⌈mc/16⌉·16·kc` floats,
/// `stage` `⌈mc/16⌉·16`.
#[inline(always)]
unsafe fn pack_columns(w: &Weight, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32, stage: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let padded = mc.next_multiple_of(MR);
        std::ptr::write_bytes(stage.add(mc), 0, padded - mc);
        for p in 0..kc {
            w.dequant(p0 + p, r0, mc, stage);
            for ip in 0..padded / MR {
                let dst = out.add(ip * MR * kc + p * MR);
                let src = stage.add(ip * MR);
                _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
                _mm256_storeu_ps(dst.add(8), _mm256_loadu_ps(src.add(8)));
            }
        }
    }
}
