//! SwiGLU's inputs held in bf16 through a training step whose products
//! take bf16 operands (as torch's autocast holds linear outputs): the gate
//! and up projections' outputs, which the backward reads, are nearly half
//! of what SmolLM2's step holds when its backward starts (348 of 742 MiB
//! at 1024 tokens). Each is rounded once, right after its product, and the
//! F32 result is freed there; SwiGLU, forward and backward, reads the
//! rounded values. Forward-only graphs round them alike, so that every
//! graph of a step (gradient checkpointing's too) computes the same values.

use super::elementwise::{row, share, silu_back, silu_mul, silu_mul_row, Bf16};
use super::gemm::{custom_op, external, make_custom, readers, CustomOp};
use llama_cpp_sys_2 as sys;
use std::arch::x86_64::*;
use std::ffi::{c_int, c_void};

type T = *mut sys::ggml_tensor;

/// Rounds the gate and up inputs of each split SwiGLU (`silu(g) · u`, F32)
/// among `nodes` (a graph's, in order, after [`super::elementwise::fuse_chains`]
/// and the folds) to bf16 in two new nodes made in `ctx`, and points every
/// reader at them: the SwiGLUs (the forward's, a recomputed one), which
/// become custom ops, and the fused SiLU gradients. Only in a graph of
/// bf16 products (see [`super::gemm::bf16_graph`]) and where nothing else
/// reads g or u (nor from outside the graph), for at most `room` new
/// nodes, as long as `ctx` has room for them. Returns each new node with
/// the node it must run right before.
///
/// # Safety
/// `ctx` must be the valid context of the unallocated graph of `nodes`
/// (sources valid or null).
pub(super) unsafe fn swiglu_inputs(ctx: *mut sys::ggml_context, nodes: &[T], room: usize) -> Vec<(T, T)> {
    // SAFETY: forwarded from the caller; every pointer read is a node or a
    // node's non-null source.
    unsafe {
        let mut made = vec![];
        if !(super::packed::bf16_supported() && super::gemm::bf16_graph(nodes)) {
            return made;
        }
        let readers = readers(nodes);
        let readers_of = |t: T| readers.get(&(t as *const _)).map_or(&[][..], |v| &v[..]);
        let pos: std::collections::HashMap<T, usize> = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let is = |t: T, f: CustomOp| custom_op(t).is_some_and(|(fun, _)| fun == f as usize);
        let f32_rows = |t: T| (*t).type_ == sys::GGML_TYPE_F32 && (*t).nb[0] == 4 && sys::ggml_is_contiguous_1(t);
        let swiglu_of = |t: T, g: T, u: T| {
            (*t).op == sys::GGML_OP_GLU
                && sys::ggml_get_glu_op(t) == sys::GGML_GLU_OP_SWIGLU
                && (*t).op_params[1] == 0
                && (*t).src[0] == g
                && (*t).src[1] == u
                && f32_rows(t)
        };
        // A view of g that fuse_chains left unread: a fused SiLU gradient's
        // src[3] (showing the GEMM result where g has become a view of it).
        let retired = |v: T, g: T| {
            (*v).op == sys::GGML_OP_VIEW
                && ((*v).view_src == g
                    || !(*g).view_src.is_null() && (*v).view_src == (*g).view_src && (*g).view_offs == 0)
                && (*v).view_offs == 0
                && (*v).src[0] == g
                && readers_of(v)
                    .iter()
                    .all(|&r| (*r).src[3] == v && (is(r, silu_back) || is(r, silu_mul)))
        };
        let mut done = std::collections::HashSet::new();
        for &glu in nodes {
            let (g, u) = ((*glu).src[0], (*glu).src[1]);
            if !swiglu_of(glu, g, u) || g == u || !done.insert(g) {
                continue;
            }
            let inputs = f32_rows(g) && f32_rows(u) && sys::ggml_are_same_shape(g, u) && (*g).ne == (*glu).ne;
            if !inputs || external(g) || external(u) {
                continue;
            }
            // How many of r's sources are t.
            let reads = |r: T, t: T| (*r).src.iter().filter(|&&s| s == t).count();
            let g_ok = readers_of(g).iter().all(|&r| {
                let once = reads(r, g) == 1;
                swiglu_of(r, g, u) && once
                    || is(r, silu_back) && (*r).src[1] == g && once
                    || is(r, silu_mul) && (*r).src[0] == g && once && (*r).src[1] != u
                    || retired(r, g)
            });
            let u_ok = readers_of(u).iter().all(|&r| {
                reads(r, u) == 1 && (swiglu_of(r, g, u) || is(r, silu_back) && (*r).src[2] == u && (*r).src[1] == g)
            });
            let free = sys::ggml_get_mem_size(ctx) - sys::ggml_used_mem(ctx);
            if !(g_ok && u_ok) || made.len() + 2 > room || free < 4 * sys::ggml_tensor_overhead() {
                continue;
            }
            let first = readers_of(g)
                .iter()
                .chain(readers_of(u))
                .filter(|&&r| (*r).op != sys::GGML_OP_VIEW)
                .min_by_key(|&&r| pos.get(&r).copied().unwrap_or(usize::MAX))
                .copied()
                .expect("the SwiGLU reads both");
            let cast = |t: T| {
                let c = sys::ggml_new_tensor(ctx, sys::GGML_TYPE_BF16, 4, (*t).ne.as_ptr());
                (*c).src[0] = t;
                // ggml's CPU backend skips nodes without this flag (which
                // laying out a graph sets).
                (*c).flags |= sys::GGML_TENSOR_FLAG_COMPUTE as i32;
                make_custom(c, to_bf16, -1, std::ptr::null_mut());
                c
            };
            let (gb, ub) = (cast(g), cast(u));
            for &r in readers_of(g) {
                if (*r).op == sys::GGML_OP_VIEW {
                    // Unread, but it keeps what it shows alive until the
                    // fused node has run: now the bf16 copy, not g.
                    (*r).type_ = sys::GGML_TYPE_BF16;
                    (*r).nb = (*gb).nb;
                    (*r).view_src = gb;
                    (*r).src[0] = gb;
                    continue;
                }
                for s in (*r).src.iter_mut().filter(|s| **s == g) {
                    *s = gb;
                }
            }
            for &r in readers_of(u) {
                for s in (*r).src.iter_mut().filter(|s| **s == u) {
                    *s = ub;
                }
            }
            for &r in readers_of(g) {
                if (*r).op == sys::GGML_OP_GLU {
                    make_custom(r, swiglu, -1, std::ptr::null_mut());
                }
            }
            made.push((gb, first));
            made.push((ub, first));
        }
        made
    }
}

/// `dst = bf16(src[0])` (F32 rows, rounded to nearest, ties to even), this
/// thread's rows.
unsafe extern "C" fn to_bf16(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `swiglu_inputs`, allocated,
    // BF16 with the shape of its F32 source, both with contiguous rows, on
    // a CPU with AVX512-BF16; each thread writes its own rows.
    unsafe {
        let (d, x) = (&*dst, &*(*dst).src[0]);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        for r in share(rows, ith, nth) {
            to_bf16_row(n, row(x, r), row(d, r) as *mut u16);
        }
    }
}

/// One row of [`to_bf16`].
///
/// # Safety
/// `x` holds `n` floats, `y` room for `n` bf16 values; the CPU has
/// AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn to_bf16_row(n: usize, x: *const f32, y: *mut u16) {
    let mut i = 0;
    while i < n {
        let k = 16.min(n - i);
        let mask = ((1u32 << k) - 1) as u16;
        // SAFETY: the masked lanes lie within the n values.
        unsafe {
            let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x.add(i)));
            _mm256_mask_storeu_epi16(y.add(i) as *mut i16, mask, std::mem::transmute::<__m256bh, __m256i>(v));
        }
        i += 16;
    }
}

/// `dst = silu(g) · u` from the bf16 `src[0]` = g and `src[1]` = u, in
/// F32, this thread's rows.
unsafe extern "C" fn swiglu(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `swiglu_inputs`,
    // allocated, F32 with the shape of its two BF16 sources, all with
    // contiguous rows; each thread writes its own rows.
    unsafe {
        let (d, g, u) = (&*dst, &*(*dst).src[0], &*(*dst).src[1]);
        let n = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        for r in share(rows, ith, nth) {
            silu_mul_row(n, row(d, r), Bf16::of(g, r), Bf16::of(u, r));
        }
    }
}
