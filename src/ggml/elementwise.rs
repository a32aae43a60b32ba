//! Element-wise ops of a training step that ggml's CPU backend runs in
//! scalar code, vectorized with AVX2/FMA in ggml custom ops (the nodes are
//! rewritten after the backward graph is built, so they need no backward).
//!
//! SILU_BACK (the gradient through the SwiGLU gate) calls `expf` once per
//! element: on SmolLM2 its 30 nodes of 1536 × 256 took 0.047 s of a 1.9 s
//! step (ggml's forward SILU, vectorized, 0.006 s). RMS_NORM_BACK and the
//! sums of RMS_NORM are scalar too; [`fuse_chains`] also folds the MULs
//! around these into them.

use super::gemm::make_custom;
use llama_cpp_sys_2 as sys;
use std::arch::x86_64::*;
use std::ffi::{c_int, c_void};

/// Turns an F32 SILU_BACK, CROSS_ENTROPY_LOSS or SOFT_MAX node with
/// contiguous rows into its vectorized custom op, where the CPU has AVX2,
/// FMA and F16C. Returns whether it did.
///
/// # Safety
/// `node` must be a valid node (sources valid or null) of a graph that is
/// not yet allocated.
pub(super) unsafe fn rewrite(node: *mut sys::ggml_tensor) -> bool {
    // SAFETY: the caller guarantees node and its non-null sources are valid.
    unsafe {
        let (a, b) = ((*node).src[0], (*node).src[1]);
        let f32_rows = |t: *const sys::ggml_tensor| {
            !t.is_null() && (*t).type_ == sys::GGML_TYPE_F32 && (*t).nb[0] == 4 && sys::ggml_is_contiguous_1(t)
        };
        let simd = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if !(simd && f32_rows(node) && f32_rows(a)) {
            return false;
        }
        match (*node).op {
            sys::GGML_OP_SILU_BACK if f32_rows(b) => make_custom(node, silu_back, -1, std::ptr::null_mut()),
            sys::GGML_OP_CROSS_ENTROPY_LOSS if f32_rows(b) && sys::ggml_are_same_shape(a, b) => {
                make_custom(node, cross_entropy_loss, -1, std::ptr::null_mut())
            }
            sys::GGML_OP_SOFT_MAX if plain_soft_max(node) && sys::ggml_are_same_shape(a, node) => {
                // The scale rides in userdata (a custom op's params replace
                // the node's op_params): its bits, not a pointer.
                let scale = (*node).op_params[0] as u32 as usize;
                make_custom(node, soft_max, -1, scale as *mut c_void)
            }
            _ => return false,
        }
        true
    }
}

/// Fuses chains of element-wise ops into single vectorized passes (custom
/// ops), where the CPU has AVX2, FMA and F16C:
/// - `MUL(RMS_NORM(x), w)` (ggml's CPU backend fuses the pair too, but sums
///   each row's squares in a scalar f64 loop: 0.01 s of SmolLM2's forward);
/// - `RMS_NORM_BACK(MUL(dy, w), x)` (the gradient through `rms_norm(x)·w`,
///   `w` one row broadcast) reads `dy`, `w` and `x` at once; an unfused
///   RMS_NORM_BACK runs vectorized alone (ggml's kernel is scalar, with
///   f64 sums);
/// - `SILU_BACK(MUL(dy, u), g)` (SwiGLU's gate gradient) takes the product
///   as it goes;
/// - `MUL(SILU(g), dy)` (SwiGLU's up gradient) computes the SiLU as it goes.
///
/// The fused MUL, SILU or RMS_NORM becomes a view that nothing computes,
/// kept as an unread source (`src[3]`) of the node that fused it. Only where
/// it is read by the fused node alone and from nowhere outside the graph,
/// and no node writes in place into a tensor the fused node now reads
/// later than before. On SmolLM2's step: four passes over each layer's
/// 1536 × 256 SwiGLU gradients instead of seven, 180 fewer nodes.
/// Returns the number of nodes fused or rewritten.
///
/// # Safety
/// `nodes` must be the valid nodes of a graph that is not yet allocated
/// (sources valid or null), before [`rewrite`] runs on them.
pub(super) unsafe fn fuse_chains(nodes: &[*mut sys::ggml_tensor]) -> usize {
    type T = *mut sys::ggml_tensor;
    // SAFETY: forwarded from the caller; every pointer read is a node or a
    // node's non-null source.
    unsafe {
        let simd = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if !simd {
            return 0;
        }
        let readers = super::gemm::readers(nodes);
        let f32_rows =
            |t: T| !t.is_null() && (*t).type_ == sys::GGML_TYPE_F32 && (*t).nb[0] == 4 && sys::ggml_is_contiguous_1(t);
        let is_silu = |t: T| (*t).op == sys::GGML_OP_UNARY && sys::ggml_get_unary_op(t) == sys::GGML_UNARY_OP_SILU;
        // Read by `by` alone, from nowhere else, and made by `op`.
        let only_for = |t: T, by: T, op: sys::ggml_op| {
            !t.is_null()
                && (*t).op == op
                && readers.get(&(t as *const _)).is_some_and(|r| r.as_slice() == [by])
                && !super::gemm::external(t)
        };
        // No node writes into t in place (a node other than a plain view
        // whose memory is t's).
        let never_written = |t: T| {
            readers.get(&(t as *const _)).is_none_or(|r| {
                r.iter().all(|&n| {
                    (*n).view_src != t
                        || matches!(
                            (*n).op,
                            sys::GGML_OP_VIEW | sys::GGML_OP_RESHAPE | sys::GGML_OP_PERMUTE | sys::GGML_OP_TRANSPOSE
                        )
                })
            })
        };
        let same = |a: T, b: T| f32_rows(a) && f32_rows(b) && sys::ggml_are_same_shape(a, b);
        // One row of `of`'s width (a norm's weight, broadcast).
        let row = |w: T, of: T| f32_rows(w) && (*w).ne[0] == (*of).ne[0] && sys::ggml_nrows(w) == 1;
        // The fused node `m` turned into a view of its source `of`, which
        // has its layout; `by`, which fused it, keeps it as a source it
        // does not read, so that ggml's allocator, once `by` has run, counts
        // the view done and frees `of` after its last reader (a view that
        // nothing reads would hold `of` to the graph's end: +135 MiB on a
        // 1024-token forward).
        let retire = |m: T, of: T, by: T| {
            super::gemm::make_view_of(m, of);
            (*by).src[3] = m;
        };
        let layout = |m: T, of: T| (*m).nb == (*of).nb;
        let mut fused = 0;
        for &node in nodes {
            let (a, b) = ((*node).src[0], (*node).src[1]);
            if !(f32_rows(node) && f32_rows(a) && same(a, node)) {
                continue;
            }
            match (*node).op {
                sys::GGML_OP_RMS_NORM_BACK if same(b, node) => {
                    let eps = (*node).op_params[0] as u32 as usize;
                    if only_for(a, node, sys::GGML_OP_MUL) {
                        let (p, q) = ((*a).src[0], (*a).src[1]);
                        let (dy, w) = if row(q, node) { (p, q) } else { (q, p) };
                        if same(dy, node) && layout(a, dy) && row(w, node) && never_written(dy) && never_written(w) {
                            retire(a, dy, node);
                            (*node).src[0] = dy;
                            (*node).src[2] = w;
                        }
                    }
                    make_custom(node, rms_norm_back, -1, eps as *mut c_void);
                }
                sys::GGML_OP_SILU_BACK if same(b, node) && only_for(a, node, sys::GGML_OP_MUL) => {
                    let (dy, u) = ((*a).src[0], (*a).src[1]);
                    if !(same(dy, node) && same(u, node) && layout(a, dy) && never_written(dy) && never_written(u)) {
                        continue;
                    }
                    retire(a, dy, node);
                    (*node).src[0] = dy;
                    (*node).src[2] = u;
                    make_custom(node, silu_back, -1, std::ptr::null_mut());
                }
                sys::GGML_OP_MUL => {
                    // MUL(SILU(g), dy), or MUL(RMS_NORM(x), w).
                    let (s, dy) = if is_silu(a) { (a, b) } else { (b, a) };
                    let x = (*a).src[0];
                    if same(b, node) && only_for(s, node, sys::GGML_OP_UNARY) && is_silu(s) {
                        let g = (*s).src[0];
                        if !(same(g, node) && layout(s, g) && never_written(g)) {
                            continue;
                        }
                        retire(s, g, node);
                        (*node).src[0] = g;
                        (*node).src[1] = dy;
                        make_custom(node, silu_mul, -1, std::ptr::null_mut());
                    } else if row(b, node)
                        && only_for(a, node, sys::GGML_OP_RMS_NORM)
                        && same(x, node)
                        && layout(a, x)
                        && never_written(x)
                        && never_written(b)
                    {
                        let eps = (*a).op_params[0] as u32 as usize;
                        retire(a, x, node);
                        (*node).src[0] = x;
                        make_custom(node, rms_norm_mul, -1, eps as *mut c_void);
                    } else {
                        continue;
                    }
                }
                _ => continue,
            }
            fused += 1;
        }
        fused
    }
}

/// A SOFT_MAX the vectorized op computes: no ALiBi (`max_bias` 0), no
/// attention sinks, and an F32 or F16 mask (if any) with contiguous rows.
///
/// # Safety
/// As for [`rewrite`]; `node` is an F32 node with contiguous rows.
unsafe fn plain_soft_max(node: *const sys::ggml_tensor) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe {
        let max_bias = f32::from_bits((*node).op_params[1] as u32);
        let mask = (*node).src[1];
        let mask_ok = mask.is_null()
            || (((*mask).type_ == sys::GGML_TYPE_F32 && (*mask).nb[0] == 4)
                || ((*mask).type_ == sys::GGML_TYPE_F16 && (*mask).nb[0] == 2));
        max_bias == 0.0 && (*node).src[2].is_null() && mask_ok
    }
}

/// The scale of `node` if it is a softmax made by [`rewrite`].
///
/// # Safety
/// `node` must be a valid node.
pub(super) unsafe fn soft_max_scale(node: *const sys::ggml_tensor) -> Option<f32> {
    // SAFETY: forwarded from the caller; a CUSTOM node's op_params hold its
    // custom-op params (written by make_custom).
    unsafe {
        let (fun, userdata) = super::gemm::custom_op(node)?;
        (fun == soft_max as super::gemm::CustomOp as usize).then(|| f32::from_bits(userdata as u32))
    }
}

/// ggml's SOFT_MAX (`src[0]` = x, `src[1]` = optional mask broadcast over
/// dims 2 and 3; the scale's bits in `userdata`): `softmax(x · scale +
/// mask)` per row, this thread's rows. ggml's CPU kernel makes five passes per row with
/// the mask added in a scalar loop: 0.045 s of a SmolLM2 step (attention
/// scores, 30 × 9 × 256 rows of 256).
unsafe extern "C" fn soft_max(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `rewrite` (checked by
    // `plain_soft_max`), allocated; rows of x and dst are contiguous and of
    // the same shape, mask rows hold at least ne[0] values; each thread
    // writes its own rows.
    unsafe {
        let (d, x, mask) = (&*dst, &*(*dst).src[0], (*dst).src[1]);
        let scale = f32::from_bits(userdata as usize as u32);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        // A causal mask (see `gemm::set_causal_offset`) hides key j from its
        // row i where j > i + off: those entries are exactly zero, so the
        // row runs over the visible keys rounded up to 8 and the rest is
        // zeroed, the same values (as the scores' product's fused softmax
        // does). Half the exps of a long sequence's recomputed softmax.
        let off = super::gemm::causal_offset(mask);
        let mut w = vec![0f32; n];
        for r in share(rows, ith, nth) {
            let (i1, i2, i3) = row_index(d, r);
            let (xr, dr) = (row(x, r), row(d, r));
            let m = (!mask.is_null()).then(|| {
                let m = &*mask;
                let (j2, j3) = (i2 % m.ne[2] as usize, i3 % m.ne[3] as usize);
                let p = (m.data as *const u8).add(i1 * m.nb[1] + j2 * m.nb[2] + j3 * m.nb[3]);
                (p, m.type_ == sys::GGML_TYPE_F16)
            });
            let len = off.map_or(n, |off| (i1 + off + 1).next_multiple_of(8).min(n));
            soft_max_row(len, xr, scale, m, w.as_mut_ptr(), dr);
            std::ptr::write_bytes(dr.add(len), 0, n - len);
        }
    }
}

/// One row of [`soft_max`]: `w = x · scale + mask` (into scratch `w`), then
/// `y = exp(w − max w) / Σ`.
///
/// # Safety
/// `x`, `w` and `y` address `n` floats (`y` may be `x`: in place), the
/// mask (F16 if its flag is set) `n` values; the CPU has AVX2, FMA and
/// F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn soft_max_row(
    n: usize,
    x: *const f32,
    scale: f32,
    mask: Option<(*const u8, bool)>,
    w: *mut f32,
    y: *mut f32,
) {
    // SAFETY: every access lies within the n values of each row.
    unsafe {
        let mask_at = |i: usize| match mask {
            None => 0.0,
            Some((p, true)) => half::f16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
            Some((p, false)) => *(p as *const f32).add(i),
        };
        let (sv, mut mv) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut i = 0;
        while i + 8 <= n {
            let mut v = _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), sv);
            match mask {
                None => {}
                Some((p, true)) => {
                    v = _mm256_add_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)))
                }
                Some((p, false)) => v = _mm256_add_ps(v, _mm256_loadu_ps((p as *const f32).add(i))),
            }
            _mm256_storeu_ps(w.add(i), v);
            mv = _mm256_max_ps(mv, v);
            i += 8;
        }
        let mut max = hmax(mv);
        for j in i..n {
            *w.add(j) = *x.add(j) * scale + mask_at(j);
            max = max.max(*w.add(j));
        }
        let total = exp_into(n, w, max, y);
        scale_row(n, y, (1.0 / total) as f32, y);
    }
}

/// `y = exp(x − max)` over a row, exactly 0 where that underflows (masked
/// positions: −∞), and its sum, in f64 lanes. `y` may be `x`.
///
/// # Safety
/// `x` and `y` address `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_into(n: usize, x: *const f32, max: f32, y: *mut f32) -> f64 {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let (m, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(-87.336_54));
        let mut sum = _mm256_setzero_pd();
        let mut i = 0;
        while i + 8 <= n {
            let t = _mm256_sub_ps(_mm256_loadu_ps(x.add(i)), m);
            let e = _mm256_and_ps(exp(t), _mm256_cmp_ps::<_CMP_GE_OQ>(t, floor));
            _mm256_storeu_ps(y.add(i), e);
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
            i += 8;
        }
        let mut s4 = [0f64; 4];
        _mm256_storeu_pd(s4.as_mut_ptr(), sum);
        let mut total: f64 = s4.iter().sum();
        for j in i..n {
            let e = (*x.add(j) - max).exp();
            *y.add(j) = e;
            total += e as f64;
        }
        total
    }
}

/// ggml's SOFT_MAX_BACK over one row: `dy = (dy − Σ y·dy) · y · scale`, in
/// place (`dy` the output's gradient, `y` the softmax's output).
///
/// # Safety
/// `dy` and `y` address `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn soft_max_back_row(n: usize, dy: *mut f32, y: *const f32, scale: f32) {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(y.add(i)), _mm256_loadu_ps(dy.add(i)), acc);
            i += 8;
        }
        let dot = (i..n).fold(hsum(acc), |s, j| (*y.add(j)).mul_add(*dy.add(j), s));
        let (dv, sv) = (_mm256_set1_ps(dot), _mm256_set1_ps(scale));
        let mut i = 0;
        while i + 8 <= n {
            let t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(dy.add(i)), dv), _mm256_loadu_ps(y.add(i)));
            _mm256_storeu_ps(dy.add(i), _mm256_mul_ps(t, sv));
            i += 8;
        }
        for j in i..n {
            *dy.add(j) = (*dy.add(j) - dot) * *y.add(j) * scale;
        }
    }
}

/// The sum of 8 lanes.
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: lanes holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.into_iter().sum()
}

/// Thread `ith` of `nth`'s share of `rows` rows.
pub(super) fn share(rows: usize, ith: c_int, nth: c_int) -> std::ops::Range<usize> {
    let (ith, nth) = (ith as usize, nth as usize);
    rows * ith / nth..rows * (ith + 1) / nth
}

/// The largest of 8 lanes.
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: lanes holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// The (i1, i2, i3) of row `r` of `t` (rows counted over dims 1–3).
fn row_index(t: &sys::ggml_tensor, r: usize) -> (usize, usize, usize) {
    let (n1, n2) = (t.ne[1] as usize, t.ne[2] as usize);
    (r % n1, r / n1 % n2, r / (n1 * n2))
}

/// The first value of row `r` of `t`.
///
/// # Safety
/// `t` must be allocated and `r` one of its rows.
pub(super) unsafe fn row(t: &sys::ggml_tensor, r: usize) -> *mut f32 {
    let (i1, i2, i3) = row_index(t, r);
    // SAFETY: the row lies within t's data, as the caller guarantees.
    unsafe { (t.data as *mut u8).add(i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3]) as *mut f32 }
}

/// A one-hot targets leaf (see [`tag_one_hot`]) carries this in its
/// `op_params`, which a leaf does not use.
const ONE_HOT_TAG: i32 = 0x6f6e_6568;

/// Marks `t` (an F32 `[classes, rows]` input, one-hot rows) as targets the
/// training step may keep as class ids instead (see [`compact_targets`]).
///
/// # Safety
/// `t` must be a valid leaf tensor.
pub(super) unsafe fn tag_one_hot(t: *mut sys::ggml_tensor) {
    // SAFETY: forwarded from the caller.
    unsafe { super::gemm::tag_leaf(t, ONE_HOT_TAG, 0) };
}

/// Where every reader of a tagged one-hot targets leaf is a
/// CROSS_ENTROPY_LOSS (or its backward) over 2-D F32 logits of its shape,
/// turns those into custom ops that read one class id per row, and turns
/// the leaf into those ids (I32 `[rows]`): 50 MB less for 256 tokens of a
/// 49152-word vocabulary, and no pass over it. Returns the number of nodes
/// rewritten.
///
/// # Safety
/// `nodes` must be the valid nodes of a graph that is not yet allocated
/// (sources valid or null), before [`rewrite`] runs on them.
pub(super) unsafe fn compact_targets(nodes: &[*mut sys::ggml_tensor]) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe {
        let simd = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let tagged = |t: *mut sys::ggml_tensor| {
            super::gemm::leaf_tag(t, ONE_HOT_TAG).is_some()
                && (*t).type_ == sys::GGML_TYPE_F32
                && (*t).ne[2] * (*t).ne[3] == 1
                && (*t).data.is_null()
        };
        let logits_of = |t: *mut sys::ggml_tensor, node: *mut sys::ggml_tensor| {
            let x = match (*node).op {
                sys::GGML_OP_CROSS_ENTROPY_LOSS if (*node).src[1] == t => (*node).src[0],
                sys::GGML_OP_CROSS_ENTROPY_LOSS_BACK if (*node).src[2] == t => (*node).src[1],
                _ => return false,
            };
            (*x).type_ == sys::GGML_TYPE_F32 && sys::ggml_is_contiguous(x) && (*x).ne == (*t).ne
        };
        let readers = super::gemm::readers(nodes);
        let n_readers = |t: *mut sys::ggml_tensor| readers.get(&(t as *const _)).map_or(0, Vec::len);
        let external = |t| super::gemm::external(t);
        let mut rewritten = 0;
        for (&t, nodes) in readers.iter().filter(|(&t, _)| tagged(t as *mut _)) {
            let t = t as *mut sys::ggml_tensor;
            if !simd || !nodes.iter().all(|&n| logits_of(t, n)) {
                continue;
            }
            // Logits the loss and its backward alone read, in memory of
            // their own (a SCALE may yet become a view: gemm::fold_scale).
            let theirs = |x: *mut sys::ggml_tensor| {
                n_readers(x) == 2 && (*x).op != sys::GGML_OP_SCALE && (*x).view_src.is_null() && !external(x)
            };
            // The loss then leaves its softmax there for its backward (one
            // exp per logit instead of three); the loss runs first.
            let probs = match nodes.as_slice() {
                &[ce, back] if (*ce).op == sys::GGML_OP_CROSS_ENTROPY_LOSS => {
                    (*back).src[1] == (*ce).src[0] && theirs((*ce).src[0])
                }
                _ => false,
            };
            for &n in nodes {
                let flag = probs as usize as *mut c_void;
                if (*n).op == sys::GGML_OP_CROSS_ENTROPY_LOSS {
                    make_custom(n, cross_entropy_ids, -1, flag);
                } else {
                    make_custom(n, cross_entropy_back_ids, -1, flag);
                    // The gradient may take the logits' memory (each row is
                    // read whole before it is written) where the loss and
                    // its backward are the logits' only readers: one 50 MB
                    // buffer instead of two at the backward's start.
                    let x = (*n).src[1];
                    let loss_reads = nodes.iter().any(|&m| m != n && (*m).src[0] == x);
                    let in_place = theirs(x) && loss_reads && !external(n) && (*n).nb == (*x).nb;
                    if in_place {
                        (*n).view_src = x;
                        (*n).view_offs = 0;
                    }
                }
                rewritten += 1;
            }
            let rows = (*t).ne[1];
            (*t).type_ = sys::GGML_TYPE_I32;
            (*t).ne = [rows, 1, 1, 1];
            (*t).nb = [4, 4 * rows as usize, 4 * rows as usize, 4 * rows as usize];
        }
        rewritten
    }
}

/// The largest of a row's `n` values.
///
/// # Safety
/// `x` addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_max(n: usize, x: *const f32) -> f32 {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(x.add(i)));
            i += 8;
        }
        (i..n).map(|i| *x.add(i)).fold(hmax(mv), f32::max)
    }
}

/// `Σ exp(x − max)` over a row, summed in f64 lanes.
///
/// # Safety
/// `x` addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum(n: usize, x: *const f32, max: f32) -> f64 {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let (m, mut sum) = (_mm256_set1_ps(max), _mm256_setzero_pd());
        let mut i = 0;
        while i + 8 <= n {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(x.add(i)), m));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            sum = _mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
            i += 8;
        }
        let mut s4 = [0f64; 4];
        _mm256_storeu_pd(s4.as_mut_ptr(), sum);
        (i..n).fold(s4.iter().sum(), |s, j| s + ((*x.add(j) - max).exp() as f64))
    }
}

/// The row's class id from compacted targets (see [`compact_targets`]).
///
/// # Safety
/// `ids` must be the compacted I32 targets and `r` one of its rows.
unsafe fn class_of(ids: &sys::ggml_tensor, r: usize) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe { *(ids.data as *const i32).add(r) as usize }
}

/// CROSS_ENTROPY_LOSS against class ids (`src[1]`, see
/// [`compact_targets`]): `−(1/rows) Σ_rows log softmax(x)[id]`, the dense
/// op's value for one-hot rows. Where `userdata` is non-null the softmax
/// replaces the logits, for the backward.
unsafe extern "C" fn cross_entropy_ids(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this on every thread for a node made by
    // `compact_targets`, allocated: 2-D contiguous F32 logits and one id per
    // row (checked against the classes below), which only this node and
    // its backward (after it) read; the result is written once.
    unsafe {
        let (x, ids) = (&*(*dst).src[0], &*(*dst).src[1]);
        let (n, rows) = (x.ne[0] as usize, x.ne[1] as usize);
        let part: f64 = share(rows, ith, nth)
            .map(|r| {
                let (xr, id) = (row(x, r), class_of(ids, r));
                let max = row_max(n, xr);
                let picked = if id < n { *xr.add(id) - max } else { f32::NAN };
                let sum = if userdata.is_null() {
                    exp_sum(n, xr, max)
                } else {
                    softmax_in_place(n, xr, max)
                };
                picked as f64 - sum.ln()
            })
            .sum();
        if let Some(sum) = combine(dst as usize, ith as usize, nth as usize, part) {
            *((*dst).data as *mut f32) = (-sum / rows as f64) as f32;
        }
    }
}

/// CROSS_ENTROPY_LOSS_BACK against class ids (`src[0]` = the loss's
/// gradient d, `src[1]` = logits, `src[2]` = ids): `(softmax(x) − onehot) ·
/// d / rows`, rounded in ggml's order, this thread's rows. Where `userdata`
/// is non-null the loss left the softmax in place of the logits.
unsafe extern "C" fn cross_entropy_back_ids(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `compact_targets`,
    // allocated: logits and dst 2-D contiguous F32 of one shape, one id per
    // row; each thread writes its own rows.
    unsafe {
        let (d, x, ids) = (&*dst, &*(*dst).src[1], &*(*dst).src[2]);
        let (n, rows) = (x.ne[0] as usize, x.ne[1] as usize);
        let scale = *((*(*dst).src[0]).data as *const f32) / rows as f32;
        for r in share(rows, ith, nth) {
            let (xr, dr, id) = (row(x, r), row(d, r), class_of(ids, r));
            // Read before the row is written: dst may be the logits' memory.
            let picked = (id < n).then(|| *xr.add(id));
            if !userdata.is_null() {
                scale_row(n, xr, scale, dr);
                if let Some(p) = picked {
                    *dr.add(id) = (p - 1.0) * scale;
                }
                continue;
            }
            let max = row_max(n, xr);
            let inv = (1.0 / exp_sum(n, xr, max)) as f32;
            softmax_scaled(n, xr, max, inv, scale, dr);
            if let Some(x) = picked {
                *dr.add(id) = ((x - max).exp() * inv - 1.0) * scale;
            }
        }
    }
}

/// A row's softmax in place, `x = exp(x − max) · inv` with `inv` the
/// reciprocal of the sum (summed in f64 lanes), which it returns; the same
/// values as [`softmax_scaled`]'s before its scale (exactly 0 where exp
/// underflows).
///
/// # Safety
/// `x` addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_in_place(n: usize, x: *mut f32, max: f32) -> f64 {
    // SAFETY: forwarded from the caller.
    unsafe {
        let total = exp_into(n, x, max, x);
        scale_row(n, x, (1.0 / total) as f32, x);
        total
    }
}

/// `y = x · s` over a row (`y` may be `x`).
///
/// # Safety
/// `x` and `y` address `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_row(n: usize, x: *const f32, s: f32, y: *mut f32) {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(y.add(i), _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), sv));
            i += 8;
        }
        for j in i..n {
            *y.add(j) = *x.add(j) * s;
        }
    }
}

/// `y = (exp(x − max) · inv) · scale` over a row.
///
/// # Safety
/// `x` and `y` address `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_scaled(n: usize, x: *const f32, max: f32, inv: f32, scale: f32, y: *mut f32) {
    // SAFETY: every access lies within the n floats.
    unsafe {
        let (m, iv, sv) = (_mm256_set1_ps(max), _mm256_set1_ps(inv), _mm256_set1_ps(scale));
        let mut i = 0;
        while i + 8 <= n {
            let p = _mm256_mul_ps(exp(_mm256_sub_ps(_mm256_loadu_ps(x.add(i)), m)), iv);
            _mm256_storeu_ps(y.add(i), _mm256_mul_ps(p, sv));
            i += 8;
        }
        for j in i..n {
            *y.add(j) = ((*x.add(j) - max).exp() * inv) * scale;
        }
    }
}

/// ggml's CROSS_ENTROPY_LOSS (`src[0]` = logits, `src[1]` = target
/// probabilities, one row per position): `−(1/rows) Σ_rows Σ_i t_i ·
/// log softmax(x)_i`. ggml's CPU kernel calls `expf` once per logit: 0.06 s
/// of a SmolLM2 step (49152 × 255 logits).
unsafe extern "C" fn cross_entropy_loss(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this on every thread for a node made by
    // `rewrite`, allocated, whose two F32 sources have the same shape and
    // contiguous rows; the result is one float, written once.
    unsafe {
        let (x, t) = (&*(*dst).src[0], &*(*dst).src[1]);
        let n = x.ne[0] as usize;
        let rows = (x.ne[1] * x.ne[2] * x.ne[3]) as usize;
        let part: f64 = share(rows, ith, nth)
            .map(|r| cross_entropy_row(n, row(x, r), row(t, r)))
            .sum();
        if let Some(sum) = combine(dst as usize, ith as usize, nth as usize, part) {
            *((*dst).data as *mut f32) = (-sum / rows as f64) as f32;
        }
    }
}

/// Per-thread partial sums of the nodes being computed, by node address: a
/// custom op has no barrier or scratch of its own, so the last thread of a
/// node to arrive adds the parts (in thread order, so the result does not
/// depend on which thread that is) and gets the total.
fn combine(node: usize, ith: usize, nth: usize, part: f64) -> Option<f64> {
    type Parts = std::collections::HashMap<usize, Vec<Option<f64>>>;
    static PARTS: std::sync::Mutex<Option<Parts>> = std::sync::Mutex::new(None);
    let mut guard = PARTS.lock().unwrap_or_else(|e| e.into_inner());
    let parts = guard.get_or_insert_with(Default::default);
    let v = parts.entry(node).or_insert_with(|| vec![None; nth]);
    v[ith] = Some(part);
    if v.iter().all(Option::is_some) {
        let total = v.iter().flatten().sum();
        parts.remove(&node);
        Some(total)
    } else {
        None
    }
}

/// `Σ_i t_i · log softmax(x)_i` over one row, summed in f64.
///
/// # Safety
/// Each pointer addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn cross_entropy_row(n: usize, x: *const f32, t: *const f32) -> f64 {
    // SAFETY: every access lies within the n floats of each row.
    unsafe {
        let max = row_max(n, x);
        let m = _mm256_set1_ps(max);
        // Σ exp(x − max), Σ t·(x − max) and Σ t, in f64 lanes.
        let (mut se, mut stx, mut st) = (_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd());
        let wide = |v: __m256| {
            (
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)),
            )
        };
        let mut i = 0;
        while i + 8 <= n {
            let d = _mm256_sub_ps(_mm256_loadu_ps(x.add(i)), m);
            let tv = _mm256_loadu_ps(t.add(i));
            for (acc, v) in [(&mut se, exp(d)), (&mut stx, _mm256_mul_ps(tv, d)), (&mut st, tv)] {
                let (lo, hi) = wide(v);
                *acc = _mm256_add_pd(*acc, _mm256_add_pd(lo, hi));
            }
            i += 8;
        }
        let lanes = |v: __m256d| {
            let mut a = [0f64; 4];
            _mm256_storeu_pd(a.as_mut_ptr(), v);
            a.iter().sum::<f64>()
        };
        let (mut se, mut stx, mut st) = (lanes(se), lanes(stx), lanes(st));
        for i in i..n {
            let (d, ti) = (*x.add(i) - max, *t.add(i));
            se += (d as f64).exp();
            stx += (ti * d) as f64;
            st += ti as f64;
        }
        stx - st * se.ln()
    }
}

/// `dst = dy · s · (1 + x · (1 − s))` with `s = σ(x)`, this thread's rows
/// (ggml's SILU_BACK: `src[0]` = dy, `src[1]` = x); where [`fuse_chains`]
/// set `src[2]` = u, `dy · u` (rounded) in place of dy. x and u may be
/// held in bf16 (both, see [`super::held_bf16`]).
pub(super) unsafe extern "C" fn silu_back(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `rewrite` or
    // `fuse_chains`, allocated, with F32 (x and u maybe BF16) sources of
    // its shape whose rows are contiguous; each thread writes its own rows.
    unsafe {
        let (d, dy, x, u) = (&*dst, &*(*dst).src[0], &*(*dst).src[1], (*dst).src[2]);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        let u = (!u.is_null()).then(|| &*u);
        for r in share(rows, ith, nth) {
            let (dx, dy) = (row(d, r), row(dy, r));
            if x.type_ == sys::GGML_TYPE_BF16 {
                silu_back_row(n, dx, Bf16::of(x, r), dy, u.map(|u| Bf16::of(u, r)));
            } else {
                silu_back_row(n, dx, row(x, r) as *const f32, dy, u.map(|u| row(u, r) as *const f32));
            }
        }
    }
}

/// One row of [`silu_back`].
///
/// # Safety
/// Each pointer addresses `n` values; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_back_row<V: Values>(n: usize, dx: *mut f32, x: V, dy: *const f32, u: Option<V>) {
    // SAFETY: every access lies within the n values of each row.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let dy_at = |i: usize| match u {
            Some(u) => _mm256_mul_ps(_mm256_loadu_ps(dy.add(i)), u.load8(i)),
            None => _mm256_loadu_ps(dy.add(i)),
        };
        let mut i = 0;
        while i + 8 <= n {
            let xv = x.load8(i);
            let s = _mm256_div_ps(one, _mm256_add_ps(one, exp(_mm256_sub_ps(_mm256_setzero_ps(), xv))));
            let t = _mm256_fmadd_ps(xv, _mm256_sub_ps(one, s), one);
            _mm256_storeu_ps(dx.add(i), _mm256_mul_ps(_mm256_mul_ps(dy_at(i), s), t));
            i += 8;
        }
        for i in i..n {
            let (xi, s) = (x.at(i), 1.0 / (1.0 + (-x.at(i)).exp()));
            let g = u.map_or(*dy.add(i), |u| *dy.add(i) * u.at(i));
            *dx.add(i) = g * s * (1.0 + xi * (1.0 - s));
        }
    }
}

/// `dst = silu(g) · dy` (`src[0]` = g, maybe held in bf16; `src[1]` = dy;
/// see [`fuse_chains`]), this thread's rows.
pub(super) unsafe extern "C" fn silu_mul(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `fuse_chains`, allocated,
    // with F32 (g maybe BF16) sources of its shape whose rows are
    // contiguous; each thread writes its own rows.
    unsafe {
        let (d, g, dy) = (&*dst, &*(*dst).src[0], &*(*dst).src[1]);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        for r in share(rows, ith, nth) {
            if g.type_ == sys::GGML_TYPE_BF16 {
                silu_mul_row(n, row(d, r), Bf16::of(g, r), row(dy, r) as *const f32);
            } else {
                silu_mul_row(n, row(d, r), row(g, r) as *const f32, row(dy, r) as *const f32);
            }
        }
    }
}

/// One row of [`silu_mul`]: `y = g · σ(g) · dy`, and of
/// [`super::held_bf16`]'s SwiGLU (`dy` = u).
///
/// # Safety
/// Each pointer addresses `n` values; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul_row<V: Values, W: Values>(n: usize, y: *mut f32, g: V, dy: W) {
    // SAFETY: every access lies within the n values of each row.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let gv = g.load8(i);
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, exp(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(y.add(i), _mm256_mul_ps(s, dy.load8(i)));
            i += 8;
        }
        for i in i..n {
            let gi = g.at(i);
            *y.add(i) = gi / (1.0 + (-gi).exp()) * dy.at(i);
        }
    }
}

/// A row of values read as F32: F32 itself, or [`Bf16`].
pub(super) trait Values: Copy {
    /// Values `i..i + 8`.
    ///
    /// # Safety
    /// They lie within the row; the CPU has AVX2.
    unsafe fn load8(self, i: usize) -> __m256;
    /// Value `i`.
    ///
    /// # Safety
    /// It lies within the row.
    unsafe fn at(self, i: usize) -> f32;
}

impl Values for *const f32 {
    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        // SAFETY: forwarded from the caller.
        unsafe { _mm256_loadu_ps(self.add(i)) }
    }
    #[inline(always)]
    unsafe fn at(self, i: usize) -> f32 {
        // SAFETY: forwarded from the caller.
        unsafe { *self.add(i) }
    }
}

/// A row of bf16 values (the high halves of F32s).
#[derive(Clone, Copy)]
pub(super) struct Bf16(pub(super) *const u16);

impl Bf16 {
    /// Row `r` of `t`, a BF16 tensor with contiguous rows.
    ///
    /// # Safety
    /// As for [`row`].
    pub(super) unsafe fn of(t: &sys::ggml_tensor, r: usize) -> Self {
        // SAFETY: forwarded from the caller.
        Bf16(unsafe { row(t, r) } as *const u16)
    }
}

impl Values for Bf16 {
    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        // SAFETY: forwarded from the caller; bf16 is the high half of an
        // F32's bits.
        unsafe {
            let h = _mm_loadu_si128(self.0.add(i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn at(self, i: usize) -> f32 {
        // SAFETY: forwarded from the caller.
        f32::from_bits((unsafe { *self.0.add(i) } as u32) << 16)
    }
}

/// `rms_norm(x) · w` (`src[0]` = x, `src[1]` = w, one row; eps's bits in
/// `userdata`; see [`fuse_chains`]): `x · (1/√(Σx²/n + eps)) · w` per row,
/// rounded as ggml's fused kernel rounds it, the sum in f64. This thread's
/// rows.
unsafe extern "C" fn rms_norm_mul(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `fuse_chains`, allocated:
    // x and dst F32 of one shape with contiguous rows, w one row of ne[0]
    // floats; each thread writes its own rows.
    unsafe {
        let (d, x, w) = (&*dst, &*(*dst).src[0], (*(*dst).src[1]).data as *const f32);
        let eps = f32::from_bits(userdata as usize as u32);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        for r in share(rows, ith, nth) {
            rms_norm_mul_row(n, eps, row(x, r), w, row(d, r));
        }
    }
}

/// One row of [`rms_norm_mul`].
///
/// # Safety
/// Each pointer addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_mul_row(n: usize, eps: f32, x: *const f32, w: *const f32, y: *mut f32) {
    // SAFETY: every access lies within the n floats of each row.
    unsafe {
        let mut sum = _mm256_setzero_pd();
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(x.add(i));
            sum = _mm256_add_pd(sum, widen(_mm256_mul_ps(xv, xv)));
            i += 8;
        }
        let sum = (i..n).fold(lanes(sum), |s, j| s + (*x.add(j) * *x.add(j)) as f64);
        let scale = 1.0 / ((sum / n as f64) as f32 + eps).sqrt();
        let sv = _mm256_set1_ps(scale);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), sv);
            _mm256_storeu_ps(y.add(i), _mm256_mul_ps(v, _mm256_loadu_ps(w.add(i))));
            i += 8;
        }
        for j in i..n {
            *y.add(j) = *x.add(j) * scale * *w.add(j);
        }
    }
}

/// The sum of a vector's two halves, widened to f64.
#[target_feature(enable = "avx2,fma")]
fn widen(v: __m256) -> __m256d {
    _mm256_add_pd(
        _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
        _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)),
    )
}

/// The sum of 4 f64 lanes.
#[target_feature(enable = "avx2,fma")]
fn lanes(v: __m256d) -> f64 {
    let mut a = [0f64; 4];
    // SAFETY: a holds 4 doubles.
    unsafe { _mm256_storeu_pd(a.as_mut_ptr(), v) };
    a.iter().sum()
}

/// ggml's RMS_NORM_BACK (`src[0]` = dz, `src[1]` = x, eps's bits in
/// `userdata`): `dx = (dz − x · Σx·dz / (Σx² + n·eps)) / √(Σx²/n + eps)`
/// per row, ggml's formula with its sums in f64; where [`fuse_chains`]
/// set `src[2]` = w (one row), `dz = dy · w` (rounded) from `src[0]` = dy.
/// This thread's rows.
unsafe extern "C" fn rms_norm_back(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `fuse_chains`, allocated:
    // dz, x and dst F32 of one shape with contiguous rows, w (if any) one
    // row of ne[0] floats; each thread writes its own rows.
    unsafe {
        let (d, dz, x, w) = (&*dst, &*(*dst).src[0], &*(*dst).src[1], (*dst).src[2]);
        let eps = f32::from_bits(userdata as usize as u32);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        let w = (!w.is_null()).then(|| (*w).data as *const f32);
        for r in share(rows, ith, nth) {
            rms_norm_back_row(n, eps, (row(dz, r), w), row(x, r), row(d, r));
        }
    }
}

/// One row of [`rms_norm_back`].
///
/// # Safety
/// Each pointer addresses `n` floats; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_back_row(
    n: usize,
    eps: f32,
    (dz, w): (*const f32, Option<*const f32>),
    x: *const f32,
    dx: *mut f32,
) {
    // SAFETY: every access lies within the n floats of each row.
    unsafe {
        let dz_at = |i: usize| match w {
            Some(w) => _mm256_mul_ps(_mm256_loadu_ps(dz.add(i)), _mm256_loadu_ps(w.add(i))),
            None => _mm256_loadu_ps(dz.add(i)),
        };
        let dz_one = |i: usize| w.map_or(*dz.add(i), |w| *dz.add(i) * *w.add(i));
        // Σ x² and Σ x·dz: the products rounded to f32, summed in f64 lanes.
        let (mut sxx, mut sxd) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(x.add(i));
            sxx = _mm256_add_pd(sxx, widen(_mm256_mul_ps(xv, xv)));
            sxd = _mm256_add_pd(sxd, widen(_mm256_mul_ps(xv, dz_at(i))));
            i += 8;
        }
        let (mut sum_xx, mut sum_xdz) = (lanes(sxx), lanes(sxd));
        for j in i..n {
            let xj = *x.add(j);
            sum_xx += (xj * xj) as f64;
            sum_xdz += (xj * dz_one(j)) as f64;
        }
        let mean_eps = sum_xx as f32 / n as f32 + eps;
        let sum_eps = sum_xx as f32 + eps * n as f32;
        let rrms = 1.0 / mean_eps.sqrt();
        let scale_x = (-sum_xdz) as f32 / sum_eps;
        let (sv, rv) = (_mm256_set1_ps(scale_x), _mm256_set1_ps(rrms));
        let mut i = 0;
        while i + 8 <= n {
            let t = _mm256_add_ps(dz_at(i), _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), sv));
            _mm256_storeu_ps(dx.add(i), _mm256_mul_ps(t, rv));
            i += 8;
        }
        for j in i..n {
            *dx.add(j) = (dz_one(j) + *x.add(j) * scale_x) * rrms;
        }
    }
}

/// `eˣ` per lane to within ~2 ulp: x = n·ln2 + r with |r| ≤ ln2/2, a
/// degree-7 Taylor polynomial for eʳ (truncation 5e-9), scaled by 2ⁿ;
/// inputs clamped to where 2ⁿ stays a normal float (e⁻⁸⁷·³ … e⁸⁸).
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_54)), _mm256_set1_ps(88.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln 2 split in two so that n · LN2_HI is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(p, scale)
}
