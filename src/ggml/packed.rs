//! A training step's larger products on x86-64 with AVX2 and FMA: a packed
//! GEMM of our own. Its A panels are filled straight from a frozen weight's
//! rows, dequantized block by block of the sum (instead of a band of the
//! weight dequantized into F32 and then packed again by matrixmultiply), or
//! from F32 values at any strides (F32 weights, attention).
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
//! On CPUs with AVX512-BF16 a frozen weight marked for it
//! ([`Weight::bf16`]) runs the same tiles over panels of bf16 pairs: both
//! operands rounded to bf16 as they are packed, each pair of products
//! summed into the F32 accumulators by one `vdpbf16ps` (on a Zen 4 core
//! 212 GFLOP/s with the panels in L1, against 113 for the F32 kernel).
//!
//! Blocking: a pass over at most [`KC`] terms of the sum packs B (the
//! activations or their gradient, `kc × n`) once, then each band of at most
//! [`MC`] result rows is dequantized into A panels (`mc × kc`, in L2) and
//! run against every B panel (`kc × 6`, in L1). Each entry's sum runs in
//! order with fused multiply-adds within a pass; passes add to the result.

use super::dequant::Dequantizer;
use super::gemm::with_scratch;
use super::gemm_small::Strided;
use super::share::Schedule;
pub(super) use super::share::Team;
use std::arch::x86_64::*;

/// Result rows per register tile (two AVX vectors).
const MR: usize = 16;
/// Result columns per register tile.
const NR: usize = 6;
/// Most terms of the sum per pass (a multiple of 256-value quant blocks
/// more where a weight's rows run along the sum): a B panel (`KC × NR`,
/// 9 KiB) stays in L1 while the A block runs past it. (256 and 512
/// measured no different.)
const KC: usize = 384;
/// [`KC`] for panels of bf16 pairs: the same bytes. Ran ~1 % faster than
/// 384 terms (medians of 20 interleaved steps each, two orders); 1536 ran
/// 1.5 % slower than 384.
const KC_BF16: usize = 2 * KC;
/// Result rows per band, at most: an A block (`MC × KC`, 72 KiB) in L2.
/// Rounded up to whole quant blocks where those run along the result's
/// rows (256 for K-quants). 48 ran 1–4 % faster than 96 (and than 32)
/// through a step's products, interleaved in one process, with the bands
/// shared out among threads ([`super::share`]).
const MC: usize = 48;

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
    /// Run the products with bf16 operands (f32 sums) where the CPU can
    /// ([`bf16_supported`]).
    pub bf16: bool,
}

/// The bytes of a weight one band of a pass reads: `len` bytes from
/// `offset` into each of `count` rows from `row`.
struct Span {
    row: usize,
    count: usize,
    offset: usize,
    len: usize,
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

    /// What the band of result rows `r0..r0+mc`, terms `p0..p0+kc` reads
    /// where the weight's rows are the sum's terms (`Orient::Columns`).
    fn column_span(&self, (r0, mc): (usize, usize), (p0, kc): (usize, usize)) -> Span {
        let bytes = |v: usize| v / self.blck * self.blck_bytes;
        Span {
            row: p0,
            count: kc,
            offset: bytes(r0),
            len: bytes(mc.next_multiple_of(self.blck)),
        }
    }

    /// Asks for rows `rows` of `span` to be brought into L2 (while the
    /// kernel runs on the band before: the weights are read from memory
    /// once per step, and the dequantization would wait on them).
    ///
    /// # Safety
    /// The span lies within the weight.
    #[inline(always)]
    unsafe fn prefetch(&self, span: &Span, rows: std::ops::Range<usize>) {
        for r in rows {
            // SAFETY: forwarded from the caller; prefetches do not fault.
            let base = unsafe { self.data.add((span.row + r) * self.row_bytes + span.offset) } as usize;
            for line in (base & !63..base + span.len).step_by(64) {
                // SAFETY: a prefetch hint only.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line as *const i8) };
            }
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

/// Where a product's A comes from.
#[derive(Clone, Copy)]
pub(super) enum Source<'w> {
    /// A frozen weight, as [`Orient`] says.
    Weight(&'w Weight, Orient),
    /// F32 values: `A[i, t]` at `p + i·rs + t·cs` (elements).
    F32(Strided),
    /// F32 values, as `F32`, rounded to bf16 as they are packed (with B's)
    /// where the CPU [`bf16_supported`] (attention's products in a graph
    /// whose weights run in bf16); else as `F32`.
    F32Bf16(Strided),
}

/// Where a product goes: `C[i, j]` at `c + i + j·ldc`, set to `alpha` times
/// the sum, or that added to it where `accumulate`; then `addend` (laid
/// out as C) added to each tile once it is final (a folded ADD: C's final
/// values plus D's, bit for bit the ADD's).
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: f32,
    pub accumulate: bool,
    pub addend: Option<*const f32>,
}

/// A short product added to the result after the sum (LoRA's `s·B·(A·x)`
/// next to `W·x`): `C[i, j] += alpha·Σ_p A[i, p]·B[p, j]` over `k` terms,
/// A's rows those of the result. Run as one more pass of the kernel on each
/// tile as soon as the tile is final, it gives the values of a separate
/// product, scale and add, bit for bit (each sum in order from zero, then
/// scaled, then added), at a fraction of the cost of a second pass over
/// the result.
#[derive(Clone, Copy)]
pub(super) struct Extra {
    pub a: Strided,
    pub b: Strided,
    pub k: usize,
    pub alpha: f32,
}

/// `C[i, j] (+)= alpha·Σ_p A[i, p]·B[p, j]` (see [`Out`]) over result rows
/// `i0..i1`, columns `j < n` and terms `p < k`, then `extra` and `out`'s
/// addend added to each tile once it is final. Returns false, having done
/// nothing, where the CPU lacks AVX2 or FMA. `team` names this call's
/// thread among those running the same product (each calling this with the
/// same arguments), which share its bands of rows out among them
/// ([`super::share`]).
///
/// # Safety
/// Every `A[i, p]` and `B[p, j]` addressed lies within its tensor; for a
/// weight under `Orient::Columns`, `i0` and `i1` are whole blocks of the
/// weight's rows (or `i1` its end); C's rows `i0..i1` of every column are
/// writable by the team alone and overlap neither input; every thread of
/// the team calls this (a thread may wait on another's band).
pub(super) unsafe fn product(
    a: Source<'_>,
    (i0, i1): (usize, usize),
    (k, n): (usize, usize),
    b: Strided,
    out: Out,
    team: Team,
    extra: Option<Extra>,
) -> bool {
    // An empty sum (C zeroed, or left as it is) is the callers' other path.
    if k == 0 || !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return false;
    }
    if i1 > i0 && n > 0 {
        let bf16 = match a {
            Source::Weight(w, _) => w.bf16,
            Source::F32Bf16(_) => true,
            Source::F32(_) => false,
        };
        if bf16 && bf16_supported() {
            // SAFETY: forwarded from the caller; the CPU has the features.
            unsafe { run::<true>(a, (i0, i1), (k, n), b, out, team, extra) };
        } else {
            // SAFETY: forwarded from the caller; the CPU has AVX2 and FMA.
            unsafe { run::<false>(a, (i0, i1), (k, n), b, out, team, extra) };
        }
    }
    true
}

/// Whether this CPU runs a [`Weight::bf16`] product in bf16: AVX512-BF16's
/// dot products of pairs (twice the multiply-adds of F32's per
/// instruction), with AVX512BW and VL for the packing.
pub(crate) fn bf16_supported() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16")
}

/// Pass and band sizes: `kc` (terms per pass, at most `kc_cap`) starts
/// passes at whole blocks of a row where a weight's rows run along the sum;
/// `mc` (rows per band) starts bands at whole blocks where they run along
/// the result's rows.
/// Bands are at most [`MC`] rows, and fewer where that leaves a thread of
/// `nth` under eight bands of the `m` rows to share: taken one at a time,
/// they even out threads running at different speeds to within an eighth
/// of a share (three bands each ran 5 % slower).
fn blocking(a: Source<'_>, m: usize, k: usize, nth: usize, kc_cap: usize) -> (usize, usize) {
    let passes = k.div_ceil(kc_cap);
    let even = k.div_ceil(passes);
    let shared = if nth > 1 { m.div_ceil(8 * nth) } else { m }.min(MC);
    let (kc, mc) = match a {
        Source::Weight(w, Orient::Rows) => (even.next_multiple_of(w.blck.max(8)), shared.next_multiple_of(MR)),
        Source::Weight(w, Orient::Columns) => (even.next_multiple_of(8), shared.next_multiple_of(w.blck)),
        Source::F32(_) | Source::F32Bf16(_) => (even.next_multiple_of(8), shared.next_multiple_of(MR)),
    };
    (kc.min(k), mc)
}

/// Panel depth (in 4-byte slots) of `kc` terms: one float per term, or one
/// pair of bf16 values per two terms (the last padded with a zero).
#[inline(always)]
fn depth<const BF16: bool>(kc: usize) -> usize {
    if BF16 {
        kc.div_ceil(2)
    } else {
        kc
    }
}

/// [`product`] on a CPU with AVX2 and FMA; where `BF16` (the CPU then
/// [`bf16_supported`]), A's and B's panels hold pairs of bf16 values and
/// the kernel sums their products in F32 (the extra product stays F32).
#[target_feature(enable = "avx2,fma")]
unsafe fn run<const BF16: bool>(
    a: Source<'_>,
    (i0, i1): (usize, usize),
    (k, n): (usize, usize),
    b: Strided,
    out: Out,
    team: Team,
    extra: Option<Extra>,
) {
    let (kc_max, mc_max) = blocking(a, i1 - i0, k, team.nth, if BF16 { KC_BF16 } else { KC });
    let (bands, passes) = ((i1 - i0).div_ceil(mc_max), k.div_ceil(kc_max));
    let panels = n.div_ceil(NR);
    let mc_pad = mc_max.next_multiple_of(MR);
    // B's panels (+ NR floats: the packing's last 8-wide store overshoots),
    // A's block, and a staging area for the dequantized rows.
    let (b_len, a_len) = (panels * NR * depth::<BF16>(kc_max) + 8, mc_pad * depth::<BF16>(kc_max));
    let stage_len = match a {
        Source::Weight(_, Orient::Rows) => MR * kc_max,
        // Two of the weight's rows at a time in bf16 (a pair of terms).
        Source::Weight(_, Orient::Columns) => mc_pad * if BF16 { 2 } else { 1 },
        Source::F32(_) | Source::F32Bf16(_) => 0,
    };
    // The extra product's B panels and A block.
    let ke = extra.map_or(0, |e| e.k);
    let (be_len, ae_len) = if ke > 0 {
        (panels * NR * ke + 8, mc_pad * ke)
    } else {
        (0, 0)
    };
    let Out { c, ldc, alpha, .. } = out;
    let band = |i: usize| (i0 + i * mc_max, mc_max.min(i1 - i0 - i * mc_max));
    let pass = |p: usize| (p * kc_max, kc_max.min(k - p * kc_max));
    let mut schedule = Schedule::new(team, bands, passes);
    with_scratch(b_len + a_len + stage_len + be_len + ae_len, |s| {
        let (bp, rest) = s.split_at_mut(b_len);
        let (ap, rest) = rest.split_at_mut(a_len);
        let (stage, rest) = rest.split_at_mut(stage_len);
        let (bpe, ape) = rest.split_at_mut(be_len);
        let (bp, ap, stage) = (bp.as_mut_ptr(), ap.as_mut_ptr(), stage.as_mut_ptr());
        let (bpe, ape) = (bpe.as_mut_ptr(), ape.as_mut_ptr());
        let mut be_packed = false;
        for q in 0..passes {
            let (p0, kc) = pass(q);
            let kd = depth::<BF16>(kc);
            let (last, accumulate) = (q + 1 == passes, q > 0 || out.accumulate);
            let mut b_packed = false;
            while let Some(taken) = schedule.take(q) {
                let (r0, mc) = band(taken.band);
                // SAFETY (this block): every pointer below addresses the
                // scratch split above (sized for kc_max, mc_max), B's columns
                // j < n and terms p0..p0+kc, A's values named by the caller,
                // or C's rows of a band this thread took (its earlier passes
                // done).
                unsafe {
                    if !b_packed {
                        if BF16 {
                            pack_b_bf16(b, p0, kc, n, bp);
                        } else {
                            pack_b(b, p0, kc, n, bp);
                        }
                        b_packed = true;
                    }
                    let extra = extra.filter(|_| last && ke > 0);
                    if let Some(e) = extra {
                        if !be_packed {
                            pack_b(e.b, 0, ke, n, bpe);
                            be_packed = true;
                        }
                        pack_f32(e.a, r0, mc, 0, ke, ape);
                    }
                    match a {
                        Source::Weight(w, Orient::Rows) if BF16 => pack_rows_bf16(w, r0, mc, p0, kc, ap, stage),
                        Source::Weight(w, Orient::Columns) if BF16 => pack_columns_bf16(w, r0, mc, p0, kc, ap, stage),
                        Source::Weight(w, Orient::Rows) => pack_rows(w, r0, mc, p0, kc, ap, stage),
                        Source::Weight(w, Orient::Columns) => pack_columns(w, r0, mc, p0, kc, ap, stage),
                        Source::F32Bf16(x) if BF16 => pack_f32_bf16(x, r0, mc, p0, kc, ap),
                        Source::F32(x) | Source::F32Bf16(x) => pack_f32(x, r0, mc, p0, kc, ap),
                    }
                    // Where the weight's rows run along the sum, a band reads
                    // a short run of each of kc rows, which the hardware
                    // prefetcher does not foresee: the next band's bytes are
                    // asked for in shares, one per B panel, while this band
                    // runs (+7–8 % on such products over weights in memory,
                    // interleaved; no gain where a band reads along rows).
                    let ahead = match (a, schedule.after(taken, q)) {
                        (Source::Weight(w, Orient::Columns), Some((i, q))) => {
                            Some((w, w.column_span(band(i), pass(q))))
                        }
                        _ => None,
                    };
                    for jp in 0..panels {
                        if let Some((w, span)) = &ahead {
                            let per = span.count.div_ceil(panels);
                            w.prefetch(span, (jp * per).min(span.count)..((jp + 1) * per).min(span.count));
                        }
                        let nn = NR.min(n - jp * NR);
                        let bpanel = bp.add(jp * NR * kd);
                        for ip in 0..mc.div_ceil(MR) {
                            let mm = MR.min(mc - ip * MR);
                            let apanel = ap.add(ip * MR * kd);
                            let cp = c.add(r0 + ip * MR + jp * NR * ldc);
                            // One run of the kernel on this tile: `add`s to C,
                            // or sets it (a tile at the result's edges goes
                            // through a whole one).
                            macro_rules! tile {
                                ($kernel:ident, $k:expr, $pa:expr, $pb:expr, $alpha:expr, $add:expr) => {
                                    if mm == MR && nn == NR {
                                        $kernel($k, $pa, $pb, (cp, ldc), $alpha, $add);
                                    } else {
                                        let mut tile = [0f32; MR * NR];
                                        $kernel($k, $pa, $pb, (tile.as_mut_ptr(), MR), $alpha, false);
                                        for j in 0..nn {
                                            for i in 0..mm {
                                                let d = cp.add(j * ldc + i);
                                                let v = tile[j * MR + i];
                                                *d = if $add { *d + v } else { v };
                                            }
                                        }
                                    }
                                };
                            }
                            if BF16 {
                                tile!(kernel_bf16, kd, apanel, bpanel, alpha, accumulate);
                            } else {
                                tile!(kernel, kd, apanel, bpanel, alpha, accumulate);
                            }
                            // The extra product, on the tile now final.
                            if let Some(e) = extra {
                                tile!(kernel, ke, ape.add(ip * MR * ke), bpe.add(jp * NR * ke), e.alpha, true);
                            }
                            if let Some(d) = out.addend.filter(|_| last) {
                                let dp = d.add(r0 + ip * MR + jp * NR * ldc);
                                add_tile((cp, dp), ldc, (mm, nn));
                            }
                        }
                    }
                }
                schedule.done(taken.band, q);
            }
        }
    });
    schedule.finish();
}

/// `C += D` over an `mm × nn` tile (at most 16 × 6) of two results laid
/// out alike, columns `ld` floats apart.
///
/// # Safety
/// The tile lies within both; the CPU has AVX.
#[inline(always)]
unsafe fn add_tile((c, d): (*mut f32, *const f32), ld: usize, (mm, nn): (usize, usize)) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for j in 0..nn {
            let (cj, dj) = (c.add(j * ld), d.add(j * ld));
            if mm == MR {
                for h in 0..2 {
                    let v = _mm256_add_ps(_mm256_loadu_ps(cj.add(8 * h)), _mm256_loadu_ps(dj.add(8 * h)));
                    _mm256_storeu_ps(cj.add(8 * h), v);
                }
            } else {
                for i in 0..mm {
                    *cj.add(i) += *dj.add(i);
                }
            }
        }
    }
}

/// Runs `$step!(a, b)` over `$k` terms (or pairs) of the panels `$a`
/// (16 slots a term) and `$b` (6 a term), four at a time.
macro_rules! over_terms {
    ($k:expr, $a:expr, $b:expr, $step:ident) => {{
        let (mut a, mut b) = ($a, $b);
        let mut p = 0;
        while p + 4 <= $k {
            for u in 0..4 {
                $step!(a.add(u * MR), b.add(u * NR));
            }
            (a, b, p) = (a.add(4 * MR), b.add(4 * NR), p + 4);
        }
        while p < $k {
            $step!(a, b);
            (a, b, p) = (a.add(MR), b.add(NR), p + 1);
        }
    }};
}

/// The 16 × 6 tile `C (+)= alpha·A·B` over `k` terms: `a` a packed panel
/// (16 values per term), `b` a packed panel (6 per term); C's columns `ldc`
/// floats apart, added to where `accumulate`, else written.
#[inline(always)]
unsafe fn kernel(k: usize, a: *const f32, b: *const f32, (c, ldc): (*mut f32, usize), alpha: f32, accumulate: bool) {
    // SAFETY: the caller passes panels of k terms and a 16 × 6 tile of C.
    unsafe {
        prefetch_tile(c, ldc);
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
        over_terms!(k, a, b, step);
        store_tile(&acc, (c, ldc), alpha, accumulate);
    }
}

/// Asks for a 16 × 6 tile of C (columns `ldc` floats apart, far apart)
/// while the kernel sums.
///
/// # Safety
/// The CPU has SSE (prefetches do not fault).
#[inline(always)]
unsafe fn prefetch_tile(c: *mut f32, ldc: usize) {
    for j in 0..NR {
        // SAFETY: address arithmetic for a hint only.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(j * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(j * ldc + MR - 1) as *const i8);
        }
    }
}

/// Writes `alpha·acc` into the 16 × 6 tile at `c` (columns `ldc` floats
/// apart), added to it where `accumulate`. Scaling by 1 is exact: no case
/// of its own.
///
/// # Safety
/// The tile lies within C; the CPU has AVX.
#[inline(always)]
unsafe fn store_tile(acc: &[[__m256; 2]; NR], (c, ldc): (*mut f32, usize), alpha: f32, accumulate: bool) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let alpha = _mm256_set1_ps(alpha);
        for (j, acc) in acc.iter().enumerate() {
            let cj = c.add(j * ldc);
            for (h, &v) in acc.iter().enumerate() {
                let v = _mm256_mul_ps(v, alpha);
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
///
/// # Safety
/// The CPU has AVX (register shuffles only).
#[inline(always)]
pub(super) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: forwarded from the caller.
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

/// Writes 16 rows of terms (row `i`'s at `row(i)`, contiguous) into a
/// panel (`dst[p·16 + i]`), 8 × 8 blocks at a time; returns how many terms
/// it wrote (`kc` rounded down to 8), the rest left to the caller.
///
/// # Safety
/// Each row holds `kc` readable floats; `dst` has room for `16·kc`.
#[inline(always)]
unsafe fn transpose16(row: impl Fn(usize) -> *const f32, kc: usize, dst: *mut f32) -> usize {
    let mut p = 0;
    while p + 8 <= kc {
        for h in 0..2 {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, r) in r.iter_mut().enumerate() {
                // SAFETY: p + 8 ≤ kc terms of row 8h + i < 16.
                *r = unsafe { _mm256_loadu_ps(row(8 * h + i).add(p)) };
            }
            // SAFETY: the CPU has AVX (the caller's promise).
            for (q, v) in unsafe { transpose8(r) }.into_iter().enumerate() {
                // SAFETY: term p + q < kc of the panel's 16.
                unsafe { _mm256_storeu_ps(dst.add((p + q) * MR + 8 * h), v) };
            }
        }
        p += 8;
    }
    p
}

/// Packs terms `p0..p0+kc` of B's `n` columns into panels of 6 columns
/// (`out[jp·6·kc + p·6 + j]`), the last padded with zeros: 8 × 8 blocks
/// transposed where B's columns are contiguous, runs of 6 copied where its
/// rows are, else one value at a time.
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
            // The last panel's missing columns read as zeros here too (see
            // pack_b_bf16).
            if b.rs == 1 {
                // Six columns' runs of 8 terms, transposed; each store of 8
                // overshoots by 2, which the next store (or panel) rewrites.
                while p + 8 <= kc {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (j, r) in r.iter_mut().enumerate().take(nn) {
                        *r = _mm256_loadu_ps(col(j).add(p));
                    }
                    for (q, v) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + q) * NR), v);
                    }
                    p += 8;
                }
            } else if b.cs == 1 {
                // Each term's six columns are contiguous already.
                let row = col(0);
                while p < kc {
                    std::ptr::copy_nonoverlapping(row.offset(p as isize * b.rs), dst.add(p * NR), nn);
                    std::ptr::write_bytes(dst.add(p * NR + nn), 0, NR - nn);
                    p += 1;
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
            let p = transpose16(|i| stage.add(i * kc), kc, dst);
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

/// A's block for result rows `r0..r0+mc`, terms `p0..p0+kc`, from F32
/// values: runs of 16 rows copied where A's columns are contiguous,
/// 8 × 8 blocks transposed where its rows are, else one value at a time;
/// the last panel padded with zero rows.
///
/// # Safety
/// The rows and terms lie within A; `out` holds `⌈mc/16⌉·16·kc` floats.
#[inline(always)]
unsafe fn pack_f32(a: Strided, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for ip in 0..mc.div_ceil(MR) {
            let (rows, first) = (MR.min(mc - ip * MR), r0 + ip * MR);
            let dst = out.add(ip * MR * kc);
            let at = |i: usize, p: usize| a.p.offset((first + i) as isize * a.rs + (p0 + p) as isize * a.cs);
            let mut p = 0;
            if rows == MR && a.rs == 1 {
                while p < kc {
                    let src = at(0, p);
                    _mm256_storeu_ps(dst.add(p * MR), _mm256_loadu_ps(src));
                    _mm256_storeu_ps(dst.add(p * MR + 8), _mm256_loadu_ps(src.add(8)));
                    p += 1;
                }
            } else if rows == MR && a.cs == 1 {
                p = transpose16(|i| at(i, 0), kc, dst);
            }
            for p in p..kc {
                for i in 0..MR {
                    *dst.add(p * MR + i) = if i < rows { *at(i, p) } else { 0.0 };
                }
            }
        }
    }
}

/// The 16 × 6 tile `C (+)= alpha·A·B` over `kp` pairs of terms, as
/// [`kernel`] with panels of bf16 pairs ([`pack_b_bf16`] and the `_bf16`
/// packings of A): each pair's two products summed into the F32
/// accumulator by one dot-product instruction.
///
/// # Safety
/// As for [`kernel`]; the CPU has AVX512-BF16 and VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel_bf16(
    kp: usize,
    a: *const f32,
    b: *const f32,
    (c, ldc): (*mut f32, usize),
    alpha: f32,
    accumulate: bool,
) {
    // Pairs of bf16 values travel as 32-bit slots of the F32 panels.
    #[inline(always)]
    fn bh(v: __m256) -> __m256bh {
        // SAFETY: both are 256 bits of plain data.
        unsafe { std::mem::transmute::<__m256, __m256bh>(v) }
    }
    // SAFETY: the caller passes panels of kp pairs and a 16 × 6 tile of C.
    unsafe {
        prefetch_tile(c, ldc);
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        macro_rules! step {
            ($a:expr, $b:expr) => {{
                let (a, b) = ($a, $b);
                let (a0, a1) = (bh(_mm256_loadu_ps(a)), bh(_mm256_loadu_ps(a.add(8))));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let bj = bh(_mm256_broadcast_ss(&*b.add(j)));
                    acc[0] = _mm256_dpbf16_ps(acc[0], a0, bj);
                    acc[1] = _mm256_dpbf16_ps(acc[1], a1, bj);
                }
            }};
        }
        over_terms!(kp, a, b, step);
        store_tile(&acc, (c, ldc), alpha, accumulate);
    }
}

/// The first `n` (≤ 16) of 16 floats at `p` rounded to bf16 (to nearest,
/// ties to even), as 8 slots of two values each (the first in the low
/// half); the rest read as zeros.
///
/// # Safety
/// `n` floats are readable at `p`; the CPU has AVX512-BF16.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_pairs(p: *const f32, n: usize) -> __m256 {
    // SAFETY: forwarded from the caller; masked lanes are not read.
    unsafe {
        let v = _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p);
        std::mem::transmute::<__m256bh, __m256>(_mm512_cvtneps_pbh(v))
    }
}

/// Rounds `n` floats at `p` to bf16 in place: slot `i` (4 bytes from `p`)
/// becomes the pair of values `2i` and `2i + 1` (a zero after an odd last).
///
/// # Safety
/// `p` holds `n` floats; the CPU has AVX512-BF16.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn to_bf16_in_place(p: *mut f32, n: usize) {
    let mut i = 0;
    while i < n {
        // SAFETY: forwarded from the caller. The 8 slots written end at
        // float i/2 + 8 ≤ i for i ≥ 16, and for i = 0 after their 16 floats
        // were read: nothing unread is overwritten.
        unsafe { _mm256_storeu_ps(p.add(i / 2), bf16_pairs(p.add(i), 16.min(n - i))) };
        i += 16;
    }
}

/// [`pack_rows`] with the terms rounded to bf16 pairs: panel `ip` holds
/// slot `q·16 + i` = terms `2q`, `2q + 1` of its row `i`.
///
/// # Safety
/// As for [`pack_rows`]; the CPU has AVX512-BF16, BW and VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_rows_bf16(w: &Weight, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32, stage: *mut f32) {
    let kp = kc.div_ceil(2);
    // SAFETY: forwarded from the caller; each row's kp slots lie within its
    // kc floats of the stage.
    unsafe {
        for ip in 0..mc.div_ceil(MR) {
            let rows = MR.min(mc - ip * MR);
            for i in 0..MR {
                let s = stage.add(i * kc);
                if i < rows {
                    w.dequant(r0 + ip * MR + i, p0, kc, s);
                    to_bf16_in_place(s, kc);
                } else {
                    std::ptr::write_bytes(s, 0, kp);
                }
            }
            let dst = out.add(ip * MR * kp);
            let q = transpose16(|i| stage.add(i * kc), kp, dst);
            let (dst, stage) = (dst as *mut u32, stage as *const u32);
            for q in q..kp {
                for i in 0..MR {
                    *dst.add(q * MR + i) = *stage.add(i * kc + q);
                }
            }
        }
    }
}

/// Rounds 16 rows' values of two terms (`lo` the first term's, `hi` the
/// second's) to bf16 and stores them as 16 slots at `dst`, slot `i` the
/// pair of row `i`: one panel step of bf16 pairs.
///
/// # Safety
/// `dst` has room for 16 slots; the CPU has AVX512-BF16 and BW.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store_pairs(lo: __m512, hi: __m512, dst: *mut f32) {
    // Slot i: value i of the first term, then of the second.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    // SAFETY: forwarded from the caller.
    unsafe {
        let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut __m512i, _mm512_permutexvar_epi16(interleave, both));
    }
}

/// [`pack_columns`] with the terms rounded to bf16 pairs: two of the
/// weight's rows (terms `2q`, `2q + 1`) dequantized at a time and
/// interleaved into the panels' slots `q·16 + i`.
///
/// # Safety
/// As for [`pack_columns`], with `stage` holding `2·⌈mc/16⌉·16` floats;
/// the CPU has AVX512-BF16, BW and VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_columns_bf16(w: &Weight, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32, stage: *mut f32) {
    let (kp, padded) = (kc.div_ceil(2), mc.next_multiple_of(MR));
    // SAFETY: forwarded from the caller: rows p0..p0+kc of the weight,
    // values r0..r0+mc of each, into a stage of two padded rows.
    unsafe {
        let (first, second) = (stage, stage.add(padded));
        std::ptr::write_bytes(first.add(mc), 0, padded - mc);
        std::ptr::write_bytes(second.add(mc), 0, padded - mc);
        for q in 0..kp {
            w.dequant(p0 + 2 * q, r0, mc, first);
            if 2 * q + 1 < kc {
                w.dequant(p0 + 2 * q + 1, r0, mc, second);
            } else {
                std::ptr::write_bytes(second, 0, mc);
            }
            for ip in 0..padded / MR {
                let (lo, hi) = (
                    _mm512_loadu_ps(first.add(ip * MR)),
                    _mm512_loadu_ps(second.add(ip * MR)),
                );
                store_pairs(lo, hi, out.add(ip * MR * kp + q * MR));
            }
        }
    }
}

/// [`pack_f32`] with the terms rounded to bf16 pairs (slot `q·16 + i` of
/// a panel: terms `2q`, `2q + 1` of its row `i`): two terms' 16 rows
/// interleaved where A's columns are contiguous, runs of 16 terms of 8 rows
/// transposed where its rows are, else one pair at a time; the last panel
/// padded with zero rows.
///
/// # Safety
/// As for [`pack_f32`]; the CPU has AVX512-BF16, BW and VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_f32_bf16(a: Strided, r0: usize, mc: usize, p0: usize, kc: usize, out: *mut f32) {
    let kp = kc.div_ceil(2);
    // SAFETY: forwarded from the caller: rows r0..r0+mc, terms p0..p0+kc.
    unsafe {
        for ip in 0..mc.div_ceil(MR) {
            let (rows, first) = (MR.min(mc - ip * MR), r0 + ip * MR);
            let dst = out.add(ip * MR * kp);
            let at = |i: usize, p: usize| a.p.offset((first + i) as isize * a.rs + (p0 + p) as isize * a.cs);
            let mut q = 0;
            if rows == MR && a.rs == 1 {
                while q < kp {
                    let lo = _mm512_loadu_ps(at(0, 2 * q));
                    let hi = if 2 * q + 1 < kc {
                        _mm512_loadu_ps(at(0, 2 * q + 1))
                    } else {
                        _mm512_setzero_ps()
                    };
                    store_pairs(lo, hi, dst.add(q * MR));
                    q += 1;
                }
            } else if rows == MR && a.cs == 1 {
                while 2 * q + 16 <= kc {
                    for h in 0..2 {
                        let r: [__m256; 8] = std::array::from_fn(|i| bf16_pairs(at(8 * h + i, 2 * q), 16));
                        for (u, v) in transpose8(r).into_iter().enumerate() {
                            _mm256_storeu_ps(dst.add((q + u) * MR + 8 * h), v);
                        }
                    }
                    q += 8;
                }
            }
            let dst = dst as *mut u32;
            for q in q..kp {
                for i in 0..MR {
                    let x = |p: usize| if i < rows && p < kc { *at(i, p) } else { 0.0 };
                    *dst.add(q * MR + i) = bf16_pair(x(2 * q), x(2 * q + 1));
                }
            }
        }
    }
}

/// Terms `2q`, `2q + 1` of a column rounded to bf16, as one slot (a zero
/// where the second is missing).
///
/// # Safety
/// The CPU has AVX512-BF16 and VL.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_pair(x0: f32, x1: f32) -> u32 {
    // SAFETY: register operations only.
    unsafe {
        let v = _mm_cvtneps_pbh(_mm_setr_ps(x0, x1, 0.0, 0.0));
        _mm_cvtsi128_si32(std::mem::transmute::<__m128bh, __m128i>(v)) as u32
    }
}

/// [`pack_b`] with the terms rounded to bf16 pairs: panel `jp` holds slot
/// `q·6 + j` = terms `2q`, `2q + 1` of its column `j` (zeros past the
/// last column or term).
///
/// # Safety
/// As for [`pack_b`], `out` holding `⌈n/6⌉·6·⌈kc/2⌉ + 8` slots; the CPU
/// has AVX512-BF16, BW and VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_b_bf16(b: Strided, p0: usize, kc: usize, n: usize, out: *mut f32) {
    let kp = kc.div_ceil(2);
    // Slot i: value i of the first row, then of the second (8 of each).
    let interleave = _mm256_set_epi16(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    // SAFETY: forwarded from the caller.
    unsafe {
        for jp in 0..n.div_ceil(NR) {
            let dst = out.add(jp * NR * kp);
            let nn = NR.min(n - jp * NR);
            let col = |j: usize| b.p.offset((p0 as isize) * b.rs + ((jp * NR + j) as isize) * b.cs);
            let mut q = 0;
            // The last panel's missing columns (a token count not a
            // multiple of 6) read as zeros in the vector paths too: one
            // value at a time, that panel cost as much as the ten before
            // it in the attention's 64-column products.
            if b.rs == 1 {
                // Runs of 16 terms of the six columns as 8 slots each,
                // transposed; each store of 8 overshoots by 2, which the
                // next store (or panel) rewrites.
                while 2 * q + 16 <= kc {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (j, r) in r.iter_mut().enumerate().take(nn) {
                        *r = bf16_pairs(col(j).add(2 * q), 16);
                    }
                    for (u, v) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((q + u) * NR), v);
                    }
                    q += 8;
                }
            } else if b.cs == 1 {
                // Each term's six columns are contiguous: two terms'
                // rounded and interleaved (8-wide stores, as above).
                let (row, mask) = (|p: usize| col(0).offset(p as isize * b.rs), (1u8 << nn) - 1);
                while q < kp {
                    let lo = _mm256_maskz_loadu_ps(mask, row(2 * q));
                    let hi = if 2 * q + 1 < kc {
                        _mm256_maskz_loadu_ps(mask, row(2 * q + 1))
                    } else {
                        _mm256_setzero_ps()
                    };
                    let both = std::mem::transmute::<__m256bh, __m256i>(_mm256_cvtne2ps_pbh(hi, lo));
                    let v = _mm256_permutexvar_epi16(interleave, both);
                    _mm256_storeu_si256(dst.add(q * NR) as *mut __m256i, v);
                    q += 1;
                }
            }
            let dst = dst as *mut u32;
            for j in 0..NR {
                let cj = if j < nn { Some(col(j)) } else { None };
                for q in q..kp {
                    *dst.add(q * NR + j) = cj.map_or(0, |cj| {
                        let x = |p: usize| if p < kc { *cj.offset(p as isize * b.rs) } else { 0.0 };
                        bf16_pair(x(2 * q), x(2 * q + 1))
                    });
                }
            }
        }
    }
}
