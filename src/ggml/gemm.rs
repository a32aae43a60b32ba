//! A training step's products on the CPU, run as a strided GEMM in a ggml
//! custom op wherever ggml's own kernels are slow: F32 OUT_PRODs, F32
//! MUL_MATs over enough tokens, and products with a frozen quantized
//! weight. On CPUs with AVX2 and FMA the larger ones run on
//! [`super::packed`]'s register-tiled GEMM, which dequantizes a weight
//! straight into its panels; the rest (and other CPUs) on matrixmultiply's
//! packed, register-blocked kernels, a quantized weight dequantized in
//! bands of rows into F32 scratch first.
//!
//! ggml's CPU OUT_PROD is a loop of axpys over the result's rows: every
//! multiply-add loads and stores the result, and when the result's rows are
//! short (a LoRA gradient `[r, n_out]` has rows of r = 8 values) the loop
//! overhead dominates — 2–25 GFLOP/s on a training step's shapes, against
//! ~100 for the forward's matmuls. The backward's attention products, LoRA
//! gradients and LoRA input gradients are all OUT_PRODs, a quarter of a step.
//! A GEMM reads both inputs through their strides, so transposed views (as
//! ggml's backward feeds them) need no copies either, and a weight's input
//! gradient `Wᵀ·dy` needs no transposed copy of W.

use super::dequant::Dequantizer;
use llama_cpp_sys_2 as sys;
use std::ffi::{c_int, c_void};

/// The layout of ggml's `ggml_custom_op_params` (ggml-impl.h), which
/// `GGML_OP_CUSTOM` nodes keep in their `op_params`.
#[repr(C)]
struct CustomOpParams {
    fun: sys::ggml_custom_op_t,
    n_tasks: c_int,
    userdata: *mut c_void,
}

const _: () = assert!(std::mem::size_of::<CustomOpParams>() <= 16 * std::mem::size_of::<i32>());

/// Which product a rewritten node computes (kept in its `userdata`).
#[derive(Clone, Copy, PartialEq)]
#[repr(usize)]
enum Product {
    /// `dst[i0,i1] = Σ_k a[i0,k] · b[i1,k]` (OUT_PROD).
    Outer,
    /// `dst[i0,i1] = Σ_k a[k,i0] · b[k,i1]` (MUL_MAT).
    Inner,
    /// OUT_PROD with a quantized (or F16, BF16) 2-D `a` (a frozen weight's
    /// input gradient `Wᵀ·dy`): `a` dequantized in bands of rows into F32
    /// scratch, so the backward needs no transposed copy of W.
    DequantOuter,
    /// MUL_MAT with such an `a` over enough tokens, for the types whose
    /// ggml kernels are slow (see [`DEQUANT_FORWARD`]): bands of W's rows
    /// dequantized, then the GEMM.
    DequantInner,
}

/// Weight types whose forward MUL_MAT runs on the GEMM, dequantized: ggml
/// quantizes the activations to 8 bits and runs integer dot products, which
/// for these types on AVX2 is slower (Q4_1: 2×, IQ4_NL 1.5×, BF16) or no
/// faster (Q4_K, Q5_K) than dequantizing W exactly (`bench
/// --matmul-types`, 256 tokens, 2 threads). Q6_K, F16 and Q2_K/Q3_K keep
/// ggml's kernels, faster on those measurements.
const DEQUANT_FORWARD: [sys::ggml_type; 9] = [
    sys::GGML_TYPE_Q4_0,
    sys::GGML_TYPE_Q4_1,
    sys::GGML_TYPE_Q5_0,
    sys::GGML_TYPE_Q5_1,
    sys::GGML_TYPE_Q8_0,
    sys::GGML_TYPE_Q4_K,
    sys::GGML_TYPE_Q5_K,
    sys::GGML_TYPE_IQ4_NL,
    sys::GGML_TYPE_BF16,
];

/// Below this many result columns (tokens) a MUL_MAT stays ggml's: its
/// matrix-vector kernels read the weight once, where the GEMM would pack it.
const MIN_COLUMNS: i64 = 32;

/// Which product the GEMM computes for `node`: every F32 OUT_PROD, F32
/// MUL_MATs over enough tokens, OUT_PRODs of a plain-layout quantized (or
/// F16, BF16) 2-D weight, and MUL_MATs of one of [`DEQUANT_FORWARD`]'s types
/// over enough tokens. Measured on SmolLM2's training step (2
/// threads): ggml's F32 MUL_MAT runs 3–30 GFLOP/s where sums are short (a
/// LoRA B product sums r = 8 terms, attention scores a head's 64) or inputs
/// strided, and its llamafile sgemm ~75 GFLOP/s on the weight products,
/// against ~95 for the GEMM on the same shapes.
///
/// # Safety
/// `node` must be a valid tensor whose sources are valid or null.
unsafe fn product(node: *const sys::ggml_tensor) -> Option<Product> {
    // SAFETY: the caller guarantees node and its non-null sources are valid.
    unsafe {
        let (a, b) = ((*node).src[0], (*node).src[1]);
        // F32 input b and result with contiguous rows, whatever a is.
        let f32_out = !a.is_null()
            && !b.is_null()
            && (*node).type_ == sys::GGML_TYPE_F32
            && (*b).type_ == sys::GGML_TYPE_F32
            && (*node).nb[0] == 4;
        let f32s = f32_out && (*a).type_ == sys::GGML_TYPE_F32;
        // A quantized (or F16, BF16) 2-D weight the CPU reads in its plain
        // layout (not moved to the repacking buffer, whose tensors carry
        // `extra`).
        let plain_quantized = f32_out
            && (*a).type_ != sys::GGML_TYPE_F32
            && (*a).extra.is_null()
            && (*a).ne[2] == 1
            && (*a).ne[3] == 1
            && (*node).ne[2] == 1
            && (*node).ne[3] == 1
            && (*(sys::ggml_get_type_traits((*a).type_))).to_float.is_some();
        match (*node).op {
            sys::GGML_OP_OUT_PROD if f32s => Some(Product::Outer),
            sys::GGML_OP_OUT_PROD if plain_quantized => Some(Product::DequantOuter),
            sys::GGML_OP_MUL_MAT if f32s && (*node).ne[1] >= MIN_COLUMNS => Some(Product::Inner),
            sys::GGML_OP_MUL_MAT
                if plain_quantized && (*node).ne[1] >= MIN_COLUMNS && DEQUANT_FORWARD.contains(&(*a).type_) =>
            {
                Some(Product::DequantInner)
            }
            _ => None,
        }
    }
}

/// Turns `node`, if it is a product the GEMM runs faster (see
/// [`product`]), into a custom op that computes the same product with
/// [`run`]; sources, shape and type stay. Returns whether it did.
///
/// # Safety
/// `node` must be a valid node (sources valid or null) of a graph that is
/// not yet allocated.
pub(super) unsafe fn rewrite(node: *mut sys::ggml_tensor) -> bool {
    // SAFETY: forwarded from the caller.
    let Some(p) = (unsafe { product(node) }) else {
        return false;
    };
    // Not a pointer: the product kind, read back by `run`.
    // SAFETY: forwarded from the caller.
    unsafe { make_custom(node, run, -1, p as usize as *mut c_void) };
    true
}

/// Set in a GEMM node's userdata when the product is scaled: the scale's
/// bits are then in its upper 32 bits (64-bit targets only).
const SCALED: usize = 1 << 8;

/// Set in a GEMM node's userdata when its result is `src[2]` plus the
/// (scaled) product: a folded ADD (see [`fold_add`]).
const PLUS: usize = 1 << 9;

/// Set in a GEMM node's userdata when it is one of an attention's products
/// under a causal mask (see [`mark_causal`]): its [`Causal`] pattern in
/// bits 11–12; the mask's offset and the number of queries in the upper 32
/// bits (16 each, in place of a scale).
const CAUSAL: usize = 1 << 10;

/// Set in a GEMM node's userdata when the node adds a short product to its
/// own result, each part as soon as it is computed and still in cache
/// (LoRA's `s·B·(A·x)` on a frozen weight's `W·x`, `A·d` on its input
/// gradient: see [`fold_add`]; the packed GEMM runs it as one more pass on
/// each final tile). The short product's operands are `src[2]`
/// and `src[3]`, its scale's bits the upper 32 bits of the userdata, and
/// [`EPILOGUE_INNER`] says whether it is an inner (MUL_MAT) or an outer
/// (OUT_PROD) product.
const EPILOGUE: usize = 1 << 13;

/// See [`EPILOGUE`].
const EPILOGUE_INNER: usize = 1 << 14;

/// Set in a frozen weight's GEMM node's userdata when its result is its
/// product (and epilogue) plus `src[4]`, laid out as the result: a folded
/// `ADD(d, W·x)` (a residual sum in the forward, a sum of input gradients
/// in the backward). See [`fold_addend`].
const ADDEND: usize = 1 << 15;

/// Set in an attention product's userdata (one marked [`CAUSAL`]) in a
/// graph whose frozen weights run their products in bf16 (see
/// [`set_bf16`]): its operands are rounded to bf16 too, as torch's bf16
/// autocast rounds attention's.
const BF16_OPERANDS: usize = 1 << 16;

/// Set in the userdata of a product marked [`Causal::Entries`] whose every
/// reader reads it causally (see [`band_zeroing`]): it zeroes only the
/// [`BAND_ROWS`] hidden rows after each block's visible ones.
const BAND: usize = 1 << 17;

/// Hidden rows past a block's last visible key that a causal reader of the
/// block's columns may read: its own blocks span at most
/// [`CAUSAL_BLOCK`] rows or columns, and a fused softmax (or its backward)
/// reads on to a multiple of 8.
const BAND_ROWS: usize = CAUSAL_BLOCK + 8;

/// The tensor a node marked [`ADDEND`] adds to its result, if it is one.
///
/// # Safety
/// `d` must be a node made by [`rewrite`] (and maybe [`fold_addend`]).
unsafe fn addend_of(d: &sys::ggml_tensor, userdata: usize) -> Option<&sys::ggml_tensor> {
    // SAFETY: fold_addend set src[4] with the flag.
    (userdata & ADDEND != 0).then(|| unsafe { &*d.src[4] })
}

/// What an attention product under a causal mask may skip. Queries are the
/// columns of the softmax's rows modulo `n_queries` (grouped-query
/// attention stacks a KV head's query heads as columns); key `j` is hidden
/// from query `i` where `j > i + off`, and there the softmax (and so its
/// gradient) is exactly zero.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Causal {
    /// The result's rows are keys, its columns queries (the scores, the
    /// softmax's input gradient): hidden entries are written as zeros, not
    /// computed.
    Entries = 0,
    /// The sum runs over keys for query columns (`P·V`, the queries'
    /// gradient): it stops after the last key the column's query sees.
    KeysByColumn = 1,
    /// The sum runs over query columns for key rows (the values' gradient):
    /// it skips each query group's queries that do not see the row's key.
    ColumnsByRow = 2,
    /// As [`Causal::ColumnsByRow`], for key columns (the keys' gradient).
    ColumnsByColumn = 3,
}

/// About how many multiply-adds column `j` of a causal product over
/// `m × k` takes — row `j` for [`Causal::ColumnsByRow`], which is split by
/// rows — plus one, so that none is free: the keys its query sees, or the
/// queries that see its key.
fn causal_work((pattern, off, nq): (Causal, usize, usize), j: usize, (m, k): (usize, usize)) -> usize {
    1 + match pattern {
        Causal::Entries => m.min(j % nq + off + 1),
        Causal::KeysByColumn => k.min(j % nq + off + 1),
        Causal::ColumnsByRow | Causal::ColumnsByColumn => nq - nq.min(j.saturating_sub(off)),
    }
}

/// Thread `ith` of `nth`'s share of `units` when the shares are of equal
/// `work` rather than equal counts: with 2 threads an even split of a
/// 1024-key step's keys' gradient gave one thread 1.75 triangles of work
/// and the other 1.25. One walk over the units finds both ends.
fn weighted_share(units: usize, ith: usize, nth: usize, work: impl Fn(usize) -> usize) -> std::ops::Range<usize> {
    let total: usize = (0..units).map(&work).sum();
    // Each end: the first unit at which the work before it reaches
    // ith/nth (ith+1/nth) of the total.
    let (mut done, mut start) = (0, None);
    for u in 0..units {
        if start.is_none() && done * nth >= total * ith {
            start = Some(u);
        }
        if ith + 1 < nth && done * nth >= total * (ith + 1) {
            return start.unwrap_or(u)..u;
        }
        done += work(u);
    }
    start.unwrap_or(units)..units
}

/// The causal pattern, offset and query count of a GEMM node's userdata.
fn causal_of(userdata: usize) -> Option<(Causal, usize, usize)> {
    if !cfg!(target_pointer_width = "64") || userdata & CAUSAL == 0 {
        return None;
    }
    let pattern = match (userdata >> 11) & 3 {
        0 => Causal::Entries,
        1 => Causal::KeysByColumn,
        2 => Causal::ColumnsByRow,
        _ => Causal::ColumnsByColumn,
    };
    let hi = (userdata as u64 >> 32) as usize;
    Some((pattern, hi & 0xFFFF, hi >> 16))
}

/// Marks a leaf (an input) with `tag` and a value in its `op_params`,
/// which ggml does not read for a leaf: what a rewrite should know of an
/// input (a mask's causal offset, one-hot targets).
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn tag_leaf(t: *mut sys::ggml_tensor, tag: i32, value: i32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if (*t).op == sys::GGML_OP_NONE {
            (*t).op_params[0] = tag;
            (*t).op_params[1] = value;
        }
    }
}

/// The value [`tag_leaf`] put on `t` with `tag`, if it did.
///
/// # Safety
/// `t` must be a valid tensor or null.
pub(super) unsafe fn leaf_tag(t: *const sys::ggml_tensor, tag: i32) -> Option<i32> {
    // SAFETY: forwarded from the caller.
    unsafe {
        let tagged = !t.is_null() && (*t).op == sys::GGML_OP_NONE && (*t).op_params[0] == tag;
        tagged.then(|| (*t).op_params[1])
    }
}

/// The tag of a mask's causal offset (see [`set_causal_offset`]).
const CAUSAL_TAG: i32 = 0x6361_7573;

/// Records on a mask leaf that it hides key `j` from query `i` wherever
/// `j > i + off` (see [`Tensor::set_causal_offset`](super::Tensor::set_causal_offset)).
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn set_causal_offset(t: *mut sys::ggml_tensor, off: usize) {
    if off < 0xFFFF {
        // SAFETY: forwarded from the caller.
        unsafe { tag_leaf(t, CAUSAL_TAG, off as i32) };
    }
}

/// The tag of a frozen weight whose products take bf16 operands (see
/// [`set_bf16`]).
const BF16_TAG: i32 = 0x6266_3136;

/// Records on a weight leaf that the packed GEMM may round its values and
/// the other operand to bf16 (F32 sums) in its products.
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn set_bf16(t: *mut sys::ggml_tensor) {
    // SAFETY: forwarded from the caller.
    unsafe { tag_leaf(t, BF16_TAG, 1) };
}

/// Whether `nodes` (a graph's) read weights marked [`set_bf16`], on a CPU
/// that runs their products in bf16.
///
/// # Safety
/// `nodes` must be valid nodes, their sources valid or null.
pub(super) unsafe fn bf16_graph(nodes: &[*mut sys::ggml_tensor]) -> bool {
    // SAFETY: forwarded from the caller.
    super::bf16_products_supported()
        && nodes
            .iter()
            .any(|&n| unsafe { (*n).src.iter().any(|&s| leaf_tag(s, BF16_TAG).is_some()) })
}

/// The causal offset recorded on `t` by [`set_causal_offset`].
///
/// # Safety
/// `t` must be a valid tensor or null.
pub(super) unsafe fn causal_offset(t: *const sys::ggml_tensor) -> Option<usize> {
    // SAFETY: forwarded from the caller.
    unsafe { leaf_tag(t, CAUSAL_TAG).map(|off| off as usize) }
}

/// The product kind, scale and whether `src[2]` is added, from a GEMM
/// node's userdata.
fn unpack(userdata: *mut c_void) -> (usize, f32, bool) {
    let u = userdata as usize;
    let alpha = if cfg!(target_pointer_width = "64") && u & SCALED != 0 {
        f32::from_bits((u as u64 >> 32) as u32)
    } else {
        1.0
    };
    (u & 0xFF, alpha, u & PLUS != 0)
}

/// Whether a GEMM node's userdata is a plain F32 product (Inner or Outer)
/// that no fold has made an ADD, given an epilogue or marked causal (it
/// may be scaled).
fn plain_product(u: usize) -> bool {
    let kind = u & 0xFF;
    (kind == Product::Inner as usize || kind == Product::Outer as usize) && u & (PLUS | CAUSAL | EPILOGUE) == 0
}

/// A SCALE node's (scale, bias).
///
/// # Safety
/// `node` must be a valid SCALE node.
unsafe fn scale_params(node: *const sys::ggml_tensor) -> (f32, f32) {
    // SAFETY: forwarded from the caller; SCALE keeps both in op_params.
    unsafe {
        (
            f32::from_bits((*node).op_params[0] as u32),
            f32::from_bits((*node).op_params[1] as u32),
        )
    }
}

/// The function (as an address) and userdata of `t` if it is a custom op.
///
/// # Safety
/// `t` must be a valid node or null.
pub(super) unsafe fn custom_op(t: *const sys::ggml_tensor) -> Option<(usize, usize)> {
    // SAFETY: forwarded from the caller; op_params of a CUSTOM node hold
    // its CustomOpParams (written by make_custom or ggml).
    unsafe {
        if t.is_null() || (*t).op != sys::GGML_OP_CUSTOM {
            return None;
        }
        let params = std::ptr::read_unaligned((*t).op_params.as_ptr() as *const CustomOpParams);
        Some((params.fun? as usize, params.userdata as usize))
    }
}

/// The userdata of `t` if it is one of our GEMM nodes.
///
/// # Safety
/// `t` must be a valid node or null.
#[cfg(target_pointer_width = "64")]
unsafe fn gemm_userdata(t: *const sys::ggml_tensor) -> Option<usize> {
    // SAFETY: forwarded from the caller.
    let (fun, userdata) = unsafe { custom_op(t) }?;
    (fun == run as CustomOp as usize).then_some(userdata)
}

/// The GEMM node behind `t` (itself, or the node a view made by
/// [`fold_scale`] shows) with its userdata.
///
/// # Safety
/// `t` must be a valid node or null.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn gemm_behind(t: *mut sys::ggml_tensor) -> Option<(*mut sys::ggml_tensor, usize)> {
    // SAFETY: forwarded from the caller.
    unsafe {
        let t = if !t.is_null() && (*t).op == sys::GGML_OP_VIEW {
            (*t).view_src
        } else {
            t
        };
        gemm_userdata(t).map(|u| (t, u))
    }
}

/// Turns `node` into a view of all of `of` (same shape and strides, offset
/// 0), which ggml does not compute; `src` becomes its only source (what it
/// must come after).
///
/// # Safety
/// `node` and `of` must be valid nodes of a graph that is not yet
/// allocated, with the same type, shape and strides.
#[cfg(target_pointer_width = "64")]
unsafe fn make_view(node: *mut sys::ggml_tensor, src: *mut sys::ggml_tensor, of: *mut sys::ggml_tensor) {
    // SAFETY: forwarded from the caller.
    unsafe {
        (*node).op = sys::GGML_OP_VIEW;
        (*node).op_params = [0; 16];
        (*node).src.iter_mut().for_each(|s| *s = std::ptr::null_mut());
        (*node).src[0] = src;
        (*node).view_src = of;
        (*node).view_offs = 0;
    }
}

/// Turns `node` into a view of `of` (a tensor of its type, shape and
/// strides) that nothing computes, read from `of`.
///
/// # Safety
/// As for [`make_view`].
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
pub(super) unsafe fn make_view_of(node: *mut sys::ggml_tensor, of: *mut sys::ggml_tensor) {
    // SAFETY: forwarded from the caller.
    unsafe { make_view(node, of, of) }
}

/// Whether a fold must leave `t` alone: read or written from outside the
/// graph.
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn external(t: *const sys::ggml_tensor) -> bool {
    let flags = sys::GGML_TENSOR_FLAG_INPUT
        | sys::GGML_TENSOR_FLAG_OUTPUT
        | sys::GGML_TENSOR_FLAG_PARAM
        | sys::GGML_TENSOR_FLAG_LOSS;
    // SAFETY: forwarded from the caller.
    unsafe { (*t).flags as u32 & flags != 0 }
}

/// Folds `ADD(p, q)` where q is a product with a sum of at most 16 terms
/// (LoRA's rank) — `W·x + s·B·(A·x)` in the forward, `Wᵀ·dy + A·d` in the
/// input gradient — into one node: the ADD computes `p + q` itself, from
/// q's operands, by loops that take each sum in the packed GEMM's order
/// and round scale and add separately (bit for bit the separate nodes'
/// values), while q's node (and a scale's view of it) become views of p
/// that nothing computes. Two passes over the result instead of four, and
/// no memory for q. Where p is itself a GEMM node, p adds q to each part of
/// its result as soon as it has computed it, still in cache ([`EPILOGUE`]),
/// and the ADD becomes a view of p too: no pass of its own. p must then run
/// after q's operands, and q (now a view of p) after p: `moves` gets p, to
/// run right before q, or q and its view, to run right before the ADD
/// (each is read only by the next, the ADD last). Only where p and q (and
/// the view) are read by the ADD alone; p may be a sum folded before (a
/// view of a whole GEMM result); `order` gives each node's position.
///
/// # Safety
/// As for [`fold_scale`], after it ran on the graph's nodes.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn fold_add(
    node: *mut sys::ggml_tensor,
    consumers: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
    order: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
    moves: &mut Vec<Move>,
) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe {
        let simd = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        if !simd || (*node).op != sys::GGML_OP_ADD || !(*node).view_src.is_null() || external(node) {
            return false;
        }
        let (x, y) = ((*node).src[0], (*node).src[1]);
        // p: any node before q; q: a short product, possibly behind a view.
        let short = |t: *mut sys::ggml_tensor| {
            let (g, u) = gemm_behind(t)?;
            let kind = u & 0xFF;
            let a = (*g).src[0];
            let k = if kind == Product::Outer as usize {
                (*a).ne[1]
            } else {
                (*a).ne[0]
            };
            (plain_product(u) && k <= 16 && (*g).ne[2] * (*g).ne[3] == 1).then_some((g, u))
        };
        let ((q_src, q, uq), p) = match (short(y), short(x)) {
            (Some((g, u)), _) => ((y, g, u), x),
            (None, Some((g, u))) => ((x, g, u), y),
            _ => return false,
        };
        let only = |t: *mut sys::ggml_tensor| consumers.get(&(t as *const _)) == Some(&1) && !external(t);
        let same = |t: *mut sys::ggml_tensor| {
            (*t).type_ == sys::GGML_TYPE_F32 && (*t).ne == (*node).ne && (*t).nb == (*node).nb
        };
        let before = matches!((order.get(&(p as *const _)), order.get(&(q as *const _))), (Some(a), Some(b)) if a < b);
        let fits = only(p)
            && only(q)
            && (q_src == q || only(q_src))
            && ((*p).view_src.is_null() || ((*p).view_offs == 0 && same((*p).view_src)))
            && (*q).view_src.is_null()
            && same(p)
            && same(q)
            && same(node);
        if !fits {
            return false;
        }
        let (a, b) = ((*q).src[0], (*q).src[1]);
        // Where p is a GEMM of its own, it adds q itself as it finishes
        // each part of its result (still in cache), after q's operands: it
        // runs right before q, or q and its view run right after it (before
        // the ADD). The ADD, q and q's view become views of p.
        if let Some(up) = gemm_userdata(p).filter(|&up| up & (PLUS | CAUSAL | SCALED | EPILOGUE) == 0) {
            let alpha = if uq & SCALED != 0 {
                uq >> 32
            } else {
                1f32.to_bits() as usize
            };
            let inner = if uq & 0xFF == Product::Inner as usize {
                EPILOGUE_INNER
            } else {
                0
            };
            make_custom(p, run, -1, (up | EPILOGUE | inner | alpha << 32) as *mut c_void);
            (*p).src[2] = a;
            (*p).src[3] = b;
            // The ADD keeps q's view as a source, for its bookkeeping in
            // ggml's allocator.
            make_view(node, p, p);
            (*node).src[1] = q_src;
            make_view(q, p, p);
            if q_src != q {
                make_view(q_src, q, p);
            }
            if before {
                moves.push((p, q));
            } else {
                moves.push((q, node));
                if q_src != q {
                    moves.push((q_src, node));
                }
            }
            return true;
        }
        if !before {
            return false;
        }
        // Otherwise the ADD computes p + q from q's operands; q's view (if
        // any) stays a source only to keep its bookkeeping in ggml's
        // allocator.
        make_custom(node, run, -1, (uq | PLUS) as *mut c_void);
        (*node).src.iter_mut().for_each(|s| *s = std::ptr::null_mut());
        for (i, t) in [a, b, p, q_src].into_iter().enumerate() {
            (*node).src[i] = t;
        }
        // q and its view: views of p (allocated before them) that ggml
        // skips; their memory is p's, nothing writes it.
        make_view(q, p, p);
        if q_src != q {
            make_view(q_src, q, p);
        }
        true
    }
}

/// Folds `ADD(d, g)` (either order), where g is a frozen weight's product
/// (with LoRA's epilogue or not) read by nothing else, into g, which then
/// adds d to each tile of its result once the tile is final ([`ADDEND`]):
/// the residual sums after the attention's output and the FFN's down
/// projection in the forward, the sums of input gradients in the backward.
/// Bit for bit the ADD's values, one pass over the result and one buffer
/// fewer. Only where d (F32, laid out as the ADD) is computed before g runs
/// (`pos`: each node's place once the earlier folds' moves are made), so g
/// can read it; the ADD becomes a view of g.
///
/// # Safety
/// As for [`fold_add`], after the other folds ran.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn fold_addend(
    node: *mut sys::ggml_tensor,
    readers: &std::collections::HashMap<*const sys::ggml_tensor, Vec<*mut sys::ggml_tensor>>,
    pos: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe {
        let simd = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        if !simd || (*node).op != sys::GGML_OP_ADD || !(*node).view_src.is_null() || external(node) {
            return false;
        }
        let same = |t: *mut sys::ggml_tensor| {
            (*t).type_ == sys::GGML_TYPE_F32 && (*t).ne == (*node).ne && (*t).nb == (*node).nb
        };
        // g: a frozen weight's product, maybe behind a view of all of it.
        let frozen = |t: *mut sys::ggml_tensor| {
            let (g, u) = gemm_behind(t)?;
            let kind = u & 0xFF;
            let dequant = kind == Product::DequantOuter as usize || kind == Product::DequantInner as usize;
            (dequant && u & (PLUS | CAUSAL | ADDEND) == 0 && same(g)).then_some((g, u))
        };
        let (x, y) = ((*node).src[0], (*node).src[1]);
        let (src, (g, u), d) = match (frozen(y), frozen(x)) {
            (Some(f), _) => (y, f, x),
            (None, Some(f)) => (x, f, y),
            _ => return false,
        };
        // Nothing but the ADD reads g's values: every reader of g, or of a
        // view of g, is such a view or the ADD.
        let shows_g = |t: *mut sys::ggml_tensor| t == g || (*t).view_src == g;
        let only_add = [g]
            .into_iter()
            .chain(
                readers
                    .get(&(g as *const _))
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&r| shows_g(r)),
            )
            .all(|t| {
                !external(t)
                    && readers
                        .get(&(t as *const _))
                        .into_iter()
                        .flatten()
                        .all(|&r| r == node || shows_g(r))
            });
        // d's values exist once d (or what it is a view of) has run; a
        // tensor that is no node (a leaf) exists from the start.
        let ready = |t: *mut sys::ggml_tensor| {
            let t = if (*t).view_src.is_null() { t } else { (*t).view_src };
            pos.get(&(t as *const _)).copied()
        };
        let before = match (ready(d), pos.get(&(g as *const _))) {
            (Some(a), Some(&b)) => a < b,
            (None, Some(_)) => true,
            _ => false,
        };
        if !only_add || !before || !same(d) || d == g || (*d).view_src == g || !(*g).src[4].is_null() {
            return false;
        }
        make_custom(g, run, -1, (u | ADDEND) as *mut c_void);
        (*g).src[4] = d;
        make_view(node, src, g);
        true
    }
}

/// Folds a SCALE of a GEMM node's result (LoRA's `s · B·(A·x)`) into the
/// GEMM, which then computes `s · (a·b)`, and turns the SCALE into a view
/// of it (no memory, no pass). Bit for bit the same values where the GEMM
/// takes its sums in one pass (it rounds them, then multiplies once, as
/// SCALE does: LoRA's sums of r terms); longer sums are scaled pass by pass
/// (passes of 384 terms, 256 in matrixmultiply), within float rounding of
/// the SCALE's values. One pass over the result fewer. Only where the SCALE
/// is the GEMM's only consumer (`consumers`: how many nodes read each
/// tensor).
///
/// # Safety
/// `node` must be a valid node (sources valid or null) of a graph that is
/// not yet allocated, after [`rewrite`] ran on its nodes.
#[cfg(target_pointer_width = "64")]
unsafe fn fold_scale(
    node: *mut sys::ggml_tensor,
    consumers: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
) -> bool {
    // SAFETY: forwarded from the caller; op_params of a CUSTOM node hold
    // its CustomOpParams (written by make_custom).
    unsafe {
        let gemm = (*node).src[0];
        if (*node).op != sys::GGML_OP_SCALE {
            return false;
        }
        let Some(userdata) = gemm_userdata(gemm) else {
            return false;
        };
        let kind = userdata & 0xFF;
        let (scale, bias) = scale_params(node);
        let fits = plain_product(userdata)
            && userdata & SCALED == 0
            && bias == 0.0
            && consumers.get(&(gemm as *const _)) == Some(&1)
            && !external(gemm)
            && (*node).view_src.is_null()
            && (*node).type_ == (*gemm).type_
            && (*node).ne == (*gemm).ne
            && (*node).nb == (*gemm).nb;
        if !fits {
            return false;
        }
        let userdata = kind | SCALED | ((scale.to_bits() as usize) << 32);
        make_custom(gemm, run, -1, userdata as *mut c_void);
        // Its readers read the GEMM's result.
        make_view(node, gemm, gemm);
        true
    }
}

/// Folds a SCALE of a gradient that only GEMMs read (LoRA's backward:
/// `dz = s·dy`, read by the products for B's gradient and, through a
/// transpose, for the rank-r intermediate's) into those products, which then
/// compute `s·(a·b)` from `dy` itself: the SCALE becomes a view of `dy`.
/// One pass and one buffer fewer per adapted weight; the product rounds its
/// sum, then scales (within a rounding of the SCALE's order, which a
/// gradient does not need bit for bit). `readers`: each tensor's consumer
/// nodes.
///
/// # Safety
/// As for [`fold_scale`].
#[cfg(target_pointer_width = "64")]
unsafe fn fold_gradient_scale(
    node: *mut sys::ggml_tensor,
    readers: &std::collections::HashMap<*const sys::ggml_tensor, Vec<*mut sys::ggml_tensor>>,
) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe {
        if (*node).op != sys::GGML_OP_SCALE || !(*node).view_src.is_null() || external(node) {
            return false;
        }
        let (dy, (scale, bias)) = ((*node).src[0], scale_params(node));
        let same = (*dy).type_ == sys::GGML_TYPE_F32 && (*dy).ne == (*node).ne && (*dy).nb == (*node).nb;
        if bias != 0.0 || !same || !sys::ggml_is_contiguous(dy) {
            return false;
        }
        let of = |t: *mut sys::ggml_tensor| readers.get(&(t as *const _)).map_or(&[][..], |v| &v[..]);
        // An unscaled plain GEMM that reads `t` once.
        let plain_gemm = |g: *mut sys::ggml_tensor, t: *mut sys::ggml_tensor| {
            gemm_userdata(g)
                .is_some_and(|u| plain_product(u) && u & SCALED == 0 && ((*g).src[0] == t) != ((*g).src[1] == t))
        };
        // Readers: GEMMs, or views of the SCALE (views of views not) read
        // by GEMMs alone.
        let (mut gemms, mut views) = (Vec::new(), Vec::new());
        for &r in of(node) {
            if plain_gemm(r, node) {
                gemms.push(r);
            } else if (*r).view_src == node && !external(r) && of(r).iter().all(|&g| plain_gemm(g, r)) {
                views.push(r);
                gemms.extend_from_slice(of(r));
            } else {
                return false;
            }
        }
        // A GEMM reading the SCALE twice (directly and through a view)
        // would need s².
        let mut unique = gemms.clone();
        unique.sort();
        unique.dedup();
        if gemms.is_empty() || unique.len() != gemms.len() {
            return false;
        }
        let alpha = (scale.to_bits() as usize) << 32;
        for &g in &gemms {
            let kind = gemm_userdata(g).unwrap_or(0) & 0xFF;
            make_custom(g, run, -1, (kind | SCALED | alpha) as *mut c_void);
        }
        // The SCALE becomes a view of dy (which has its layout) that its
        // readers keep reading, so ggml's allocator still sees dy's last
        // reader; views keep the root tensor as their memory's source.
        let (root, offs) = if (*dy).view_src.is_null() {
            (dy, 0)
        } else {
            ((*dy).view_src, (*dy).view_offs)
        };
        for &v in &views {
            (*v).view_src = root;
            (*v).view_offs += offs;
        }
        make_view(node, dy, root);
        (*node).view_offs = offs;
        true
    }
}

/// The tensor whose memory `t` shows: itself if it is not a view, else the
/// end of its chain of view sources.
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn view_root(mut t: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
    // SAFETY: forwarded from the caller; view sources are valid tensors.
    unsafe {
        while !(*t).view_src.is_null() {
            t = (*t).view_src;
        }
    }
    t
}

/// The tensor `t` shows whole from its start (itself if it is not a view;
/// an offset would move the columns' queries): null for other views.
///
/// # Safety
/// `t` must be a valid tensor or null.
unsafe fn whole_view_source(t: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
    // SAFETY: forwarded from the caller.
    unsafe {
        if t.is_null() || (*t).view_src.is_null() {
            t
        } else if (*t).view_offs == 0 {
            (*t).view_src
        } else {
            std::ptr::null_mut()
        }
    }
}

/// Marks the attention products around each softmax whose mask carries a
/// causal offset (see [`Causal`]), so that [`run`] skips what the mask
/// hides; returns how many it marked. P is the node that reads the mask
/// (the softmax) and dS the SOFT_MAX_BACK that reads P: their masked
/// entries are exactly zero, so a sum may skip them. The products whose
/// results only P or dS read (the scores, P's gradient) may leave their
/// masked entries zero.
///
/// # Safety
/// As for [`fold_scale`].
#[cfg(target_pointer_width = "64")]
unsafe fn mark_causal(
    nodes: &[*mut sys::ggml_tensor],
    consumers: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
) -> usize {
    // SAFETY: forwarded from the caller; every pointer read is a node, a
    // node's source or a view's source.
    unsafe {
        let only = |t: *mut sys::ggml_tensor| consumers.get(&(t as *const _)) == Some(&1) && !external(t);
        // (off, queries, keys) of each P and dS.
        let mut probs = std::collections::HashMap::new();
        // Products whose results only a P or dS reads.
        let mut entries = std::collections::HashMap::new();
        for &node in nodes {
            let mask = (*node).src[1];
            let info = if let Some(off) = causal_offset(mask) {
                let fits = (*node).type_ == sys::GGML_TYPE_F32
                    && (*node).ne[0] == (*mask).ne[0]
                    && (*node).ne[1] == (*mask).ne[1]
                    && sys::ggml_is_contiguous(node);
                if !fits {
                    continue;
                }
                (off, (*node).ne[1] as usize, (*node).ne[0] as usize)
            } else if let (sys::GGML_OP_SOFT_MAX_BACK, Some(&info)) = ((*node).op, probs.get(&(mask as *const _))) {
                info
            } else {
                continue;
            };
            probs.insert(node as *const sys::ggml_tensor, info);
            let (x, s) = ((*node).src[0], whole_view_source((*node).src[0]));
            if gemm_userdata(s).is_some() && only(s) && (x == s || only(x)) {
                entries.insert(s as *const sys::ggml_tensor, info);
            }
        }
        // A graph over weights marked for bf16 products, on a CPU that
        // runs them.
        let bf16 = bf16_graph(nodes);
        let mut marked = 0;
        for &node in nodes {
            let Some(u) = gemm_userdata(node) else {
                continue;
            };
            let kind = u & 0xFF;
            let outer = kind == Product::Outer as usize;
            if !plain_product(u) || u & SCALED != 0 {
                continue;
            }
            let (a, b) = ((*node).src[0], (*node).src[1]);
            // (extent, byte stride) of A's (i0, k) and B's (k, i1).
            let dims = |t: *mut sys::ggml_tensor, swap: bool| {
                let d = [((*t).ne[0] as usize, (*t).nb[0]), ((*t).ne[1] as usize, (*t).nb[1])];
                if swap {
                    (d[1], d[0])
                } else {
                    (d[0], d[1])
                }
            };
            let ((i0, ak), (bk, i1)) = (dims(a, !outer), dims(b, outer));
            // Key dimension x and query-column dimension y of a P or dS.
            let keys = |x: (usize, usize), y: (usize, usize), (_, nq, n_kv): (usize, usize, usize)| {
                x == (n_kv, 4) && y.1 == 4 * n_kv && y.0.is_multiple_of(nq)
            };
            let found = if let Some(&info) = entries.get(&(node as *const _)) {
                let d = ((*node).ne[0] as usize, (*node).nb[0]);
                let c = ((*node).ne[1] as usize, (*node).nb[1]);
                keys(d, c, info).then_some((Causal::Entries, info))
            } else {
                match (
                    probs.get(&(whole_view_source(a) as *const _)),
                    probs.get(&(whole_view_source(b) as *const _)),
                ) {
                    (Some(&info), None) if keys(i0, ak, info) => Some((Causal::ColumnsByRow, info)),
                    (None, Some(&info)) if keys(bk, i1, info) => Some((Causal::KeysByColumn, info)),
                    (None, Some(&info)) if keys(i1, bk, info) => Some((Causal::ColumnsByColumn, info)),
                    _ => None,
                }
            };
            let Some((pattern, (off, nq, _))) = found else {
                continue;
            };
            if off > 0xFFFF || nq > 0xFFFF {
                continue;
            }
            let hi = (off | nq << 16) << 32;
            make_custom(
                node,
                run,
                -1,
                (kind | CAUSAL | (pattern as usize) << 11 | if bf16 { BF16_OPERANDS } else { 0 } | hi) as *mut c_void,
            );
            marked += 1;
        }
        marked
    }
}

/// The `op_params` slot (after the custom op's own) that marks a scores
/// product computing its softmax too (see [`fuse_soft_max`]); the next
/// slot holds the softmax's scale.
const SOFT_MAX_SLOT: usize = 6;

/// The mark in [`SOFT_MAX_SLOT`].
const SOFT_MAX_TAG: i32 = 0x736d_6178;

const _: () = assert!(std::mem::size_of::<CustomOpParams>() <= SOFT_MAX_SLOT * std::mem::size_of::<i32>());

/// Fuses a softmax (made by `elementwise::rewrite`) over the attention
/// scores of a product marked [`Causal::Entries`] into that product: it
/// applies the softmax (scale, mask in its `src[2]`) to each block of query
/// columns as soon as it has computed it, still in cache, and the softmax
/// becomes a view of it. The scores no longer go to memory and back
/// (37.7 MB a node for 1024 tokens on SmolLM2). Only where the softmax
/// alone reads the scores and its mask is the same for every head; [`fold`]
/// offers it every softmax (the backward recomputes the forward's).
///
/// # Safety
/// As for [`fold_scale`], after [`mark_causal`] ran on the graph's nodes.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn fuse_soft_max(
    node: *mut sys::ggml_tensor,
    consumers: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
) -> bool {
    // SAFETY: forwarded from the caller; every pointer read is a node, a
    // node's source or a view's source.
    unsafe {
        let Some(scale) = super::elementwise::soft_max_scale(node) else {
            return false;
        };
        let (x, mask) = ((*node).src[0], (*node).src[1]);
        let s = whole_view_source(x);
        let Some(u) = gemm_userdata(s) else {
            return false;
        };
        let only = |t: *mut sys::ggml_tensor| consumers.get(&(t as *const _)) == Some(&1) && !external(t);
        let fits = matches!(causal_of(u), Some((Causal::Entries, _, _)))
            && !mask.is_null()
            && (*mask).ne[2] == 1
            && (*mask).ne[3] == 1
            && only(s)
            && (x == s || only(x))
            && !external(node)
            && sys::ggml_is_contiguous(x)
            && sys::ggml_is_contiguous(s)
            && sys::ggml_is_contiguous(node)
            && (*s).ne[0] == (*node).ne[0]
            && sys::ggml_nbytes(s) == sys::ggml_nbytes(node);
        if !fits {
            return false;
        }
        fuse_columns(s, (SOFT_MAX_TAG, scale, mask), node, x);
        true
    }
}

/// Has product `s` apply to its columns the op marked `tag` (with `scale`,
/// reading `with` as its `src[2]`: see [`SoftMax`]), and turns `node`, the
/// op's node, which read `x` (s or a whole view of it), into a view of s.
///
/// # Safety
/// As for [`make_view`]; `s`'s `src[2]` and the slots from
/// [`SOFT_MAX_SLOT`] on are free.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn fuse_columns(
    s: *mut sys::ggml_tensor,
    (tag, scale, with): (i32, f32, *mut sys::ggml_tensor),
    node: *mut sys::ggml_tensor,
    x: *mut sys::ggml_tensor,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        (*s).src[2] = with;
        (*s).op_params[SOFT_MAX_SLOT] = tag;
        (*s).op_params[SOFT_MAX_SLOT + 1] = scale.to_bits() as i32;
        make_view(node, x, s);
    }
}

/// The mark in [`SOFT_MAX_SLOT`] of a product computing the softmax's
/// backward too (see [`fuse_soft_max_back`]).
const SOFT_MAX_BACK_TAG: i32 = 0x736d_6262;

/// Fuses a SOFT_MAX_BACK `scale · y ⊙ (dy − Σ y·dy)` over a product marked
/// [`Causal::Entries`] (dy, the probabilities' gradient `dO·Vᵀ`) into that
/// product: it applies the backward to each block of query columns as soon
/// as it has computed it, still in cache, reading the probabilities y (its
/// `src[2]`), and the SOFT_MAX_BACK becomes a view of it. dy no longer goes
/// to memory and back, nor takes a buffer of its own beside dS (37.7 MB a
/// node for 1024 tokens on SmolLM2), and ggml's own pass over both goes.
/// Only where the product alone is read by the SOFT_MAX_BACK, which has no
/// ALiBi, the three are laid out alike, and y is computed before the
/// product (`order` gives each node's position).
///
/// # Safety
/// As for [`fuse_soft_max`].
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn fuse_soft_max_back(
    node: *mut sys::ggml_tensor,
    consumers: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
    order: &std::collections::HashMap<*const sys::ggml_tensor, usize>,
) -> bool {
    // SAFETY: forwarded from the caller; every pointer read is a node, a
    // node's source or a view's source.
    unsafe {
        if (*node).op != sys::GGML_OP_SOFT_MAX_BACK {
            return false;
        }
        let (scale, max_bias) = (
            f32::from_bits((*node).op_params[0] as u32),
            f32::from_bits((*node).op_params[1] as u32),
        );
        let (x, y) = ((*node).src[0], (*node).src[1]);
        let s = whole_view_source(x);
        let Some(u) = gemm_userdata(s) else {
            return false;
        };
        let only = |t: *mut sys::ggml_tensor| consumers.get(&(t as *const _)) == Some(&1) && !external(t);
        // Contiguous F32 of the node's columns and size (the product's
        // result may be the grouped-query shape of it): the same offset in
        // each is the same entry.
        let like = |t: *mut sys::ggml_tensor| {
            (*t).type_ == sys::GGML_TYPE_F32
                && sys::ggml_is_contiguous(t)
                && (*t).ne[0] == (*node).ne[0]
                && sys::ggml_nbytes(t) == sys::ggml_nbytes(node)
        };
        // A leaf, or a node that runs before the product (a view stands
        // after what it shows).
        let before = |t: *mut sys::ggml_tensor| {
            let at = |t: *mut sys::ggml_tensor| order.get(&(t as *const _)).copied();
            at(t).is_none_or(|i| at(s).is_some_and(|j| i < j))
        };
        let fits = matches!(causal_of(u), Some((Causal::Entries, _, _)))
            && (*s).op_params[SOFT_MAX_SLOT] == 0
            && max_bias == 0.0
            && before(y)
            && only(s)
            && (x == s || only(x))
            && !external(node)
            && sys::ggml_is_contiguous(x)
            && like(s)
            && like(y)
            && like(node);
        if !fits {
            return false;
        }
        fuse_columns(s, (SOFT_MAX_BACK_TAG, scale, y), node, x);
        true
    }
}

/// What a product marked [`Causal::Entries`] applies to its columns: the
/// scores' softmax (see [`fuse_soft_max`]), or the softmax's backward over
/// the probabilities' gradient (see [`fuse_soft_max_back`]).
#[derive(Clone, Copy)]
enum SoftMax<'t> {
    Forward {
        scale: f32,
        mask: &'t sys::ggml_tensor,
    },
    /// `y` the probabilities, laid out as the product's result `d` (the
    /// same offset in each is the same entry).
    Backward {
        scale: f32,
        y: &'t sys::ggml_tensor,
        d: &'t sys::ggml_tensor,
    },
}

impl<'t> SoftMax<'t> {
    /// The softmax (or its backward) of node `d`, if it computes one.
    ///
    /// # Safety
    /// `d` must be an allocated node made by [`rewrite`].
    unsafe fn of(d: &'t sys::ggml_tensor) -> Option<Self> {
        let scale = f32::from_bits(d.op_params[SOFT_MAX_SLOT + 1] as u32);
        // SAFETY: fuse_soft_max and fuse_soft_max_back set src[2] (the
        // mask, the probabilities) with their tags.
        match d.op_params[SOFT_MAX_SLOT] {
            SOFT_MAX_TAG => Some(SoftMax::Forward {
                scale,
                mask: unsafe { &*d.src[2] },
            }),
            SOFT_MAX_BACK_TAG => Some(SoftMax::Backward {
                scale,
                y: unsafe { &*d.src[2] },
                d,
            }),
            _ => None,
        }
    }

    /// The softmax (or its backward) of column `j` (`n` keys at `col`,
    /// those from `seen` on already zero and hidden), in place. It runs
    /// over the visible keys rounded up to 8 — the rest stay zero, as the
    /// whole column's leaves them — so each value is that column's, bit for
    /// bit.
    ///
    /// # Safety
    /// `col` addresses the column's `n` floats (in `d`'s data, for the
    /// backward), which no other thread touches; `j % nq` is a row of the
    /// mask.
    #[cfg(target_arch = "x86_64")]
    unsafe fn column(&self, j: usize, nq: usize, col: *mut f32, n: usize, seen: usize, w: &mut [f32]) {
        let len = seen.min(n).next_multiple_of(8).min(n);
        // SAFETY: forwarded from the caller; the mask row holds at least n
        // values (mark_causal checked its shape); y has d's layout
        // (fuse_soft_max_back checked it), so the column's offset in d is
        // its offset in y.
        unsafe {
            match *self {
                SoftMax::Forward { scale, mask: m } => {
                    let row = (m.data as *const u8).add(j % nq * m.nb[1]);
                    let mask = Some((row, m.type_ == sys::GGML_TYPE_F16));
                    super::elementwise::soft_max_row(len, col, scale, mask, w.as_mut_ptr(), col);
                }
                SoftMax::Backward { scale, y, d } => {
                    let at = (col as *const u8).offset_from(d.data as *const u8);
                    let yc = (y.data as *const u8).offset(at) as *const f32;
                    super::elementwise::soft_max_back_row(len, col, yc, scale);
                }
            }
        }
    }
}

/// Rows or columns per GEMM call of a causal product: the triangle's
/// ragged edge costs about half a block of the queries' product, each call
/// a packing of its own (on SmolLM2's step, 256 queries: 32 and 128
/// measured slower than 64).
const CAUSAL_BLOCK: usize = 64;

/// One run of a product marked [`CAUSAL`] (see [`mark_causal`]): rows
/// `r0..r1` and columns `c0..c1` of one slice, `A` (`i0 × k`), `B`
/// (`k × i1`) and `C` given at the run's first row and column with element
/// strides as matrixmultiply takes them; skips the terms and entries the
/// mask hides, and applies the scores' softmax where one is fused in.
///
/// # Safety
/// As for [`run`]: the pointers and strides address one slice's operands.
#[allow(clippy::type_complexity)]
unsafe fn causal_run(
    ((pattern, off, nq), soft_max, (bf16, band)): ((Causal, usize, usize), Option<SoftMax<'_>>, (bool, bool)),
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    k: usize,
    (pa, a_i0, a_k): (*const f32, isize, isize),
    (pb, b_k, b_i1): (*const f32, isize, isize),
    (pc, c_i1): (*mut f32, isize),
) {
    // SAFETY (all three closures): the ranges lie within the run, as the
    // caller's pointers and strides address it.
    // C[i0, i1] = beta·C[i0, i1] + Σ_{ka ≤ p < kb} A[i0, p]·B[p, i1].
    let gemm = |(i0a, i0b): (usize, usize), (i1a, i1b): (usize, usize), (ka, kb): (usize, usize), beta: f32| unsafe {
        if i0a < i0b && i1a < i1b && ka < kb {
            f32_product(
                1.0,
                (i0b - i0a, kb - ka, i1b - i1a),
                (pa.offset((i0a - r0) as isize * a_i0 + ka as isize * a_k), a_i0, a_k),
                (pb.offset(ka as isize * b_k + (i1a - c0) as isize * b_i1), b_k, b_i1),
                (pc.offset((i0a - r0) as isize + (i1a - c0) as isize * c_i1), c_i1),
                (beta != 0.0, bf16),
            );
        }
    };
    // Each column's rows are contiguous: one memset a column (the masked
    // half of a 1024-token scores' result, element by element, took ~3 %
    // of the step).
    let zero = |(i0a, i0b): (usize, usize), (i1a, i1b): (usize, usize)| unsafe {
        if i0a < i0b {
            for i1 in i1a..i1b {
                let col = pc.offset((i0a - r0) as isize + (i1 - c0) as isize * c_i1);
                std::ptr::write_bytes(col, 0, i0b - i0a);
            }
        }
    };
    // The sum over query columns from each group's query `first` on (the
    // queries that see a key ≥ first + off).
    let from_query = |rows: (usize, usize), cols: (usize, usize), first: usize| {
        if first >= nq {
            return zero(rows, cols);
        }
        for g in 0..k / nq {
            gemm(
                rows,
                cols,
                (g * nq + first, (g + 1) * nq),
                if g == 0 { 0.0 } else { 1.0 },
            );
        }
    };
    // The grid of blocks (CAUSAL_BLOCK keys, or queries from each group's
    // start) that index `i` lies in: its start and end. Blocks follow the
    // grid, not the thread's share, and each sums the same terms as the
    // grid block around it, so every value is summed alike whatever the
    // threads' split (bf16 pairs its terms from the sum's first, and a
    // longer sum splits into passes at other points).
    let grid = |i: usize, queries: bool| {
        let (base, end) = if queries {
            (i / nq * nq, (i / nq + 1) * nq)
        } else {
            (0, usize::MAX)
        };
        let start = base + (i - base) / CAUSAL_BLOCK * CAUSAL_BLOCK;
        (start, (start + CAUSAL_BLOCK).min(end))
    };
    // [lo, hi) in pieces of the grid's blocks.
    let blocks = move |lo: usize, hi: usize, queries: bool| {
        let mut at = lo;
        std::iter::from_fn(move || {
            let end = grid(at, queries).1.min(hi);
            (at < hi).then(|| (std::mem::replace(&mut at, end), end))
        })
    };
    // The softmax's scratch row, for every block.
    #[cfg(target_arch = "x86_64")]
    let mut w = vec![0f32; if soft_max.is_some() { r1 - r0 } else { 0 }];
    match pattern {
        Causal::Entries | Causal::KeysByColumn => {
            for (j0, j1) in blocks(c0, c1, true) {
                // Keys the grid block's last (latest) query sees.
                let seen = (grid(j0, true).1 - 1) % nq + off + 1;
                if pattern == Causal::Entries {
                    gemm((r0, r1.min(seen)), (j0, j1), (0, k), 0.0);
                    let hidden_end = if band { r1.min(seen + BAND_ROWS) } else { r1 };
                    zero((r0.max(seen), hidden_end), (j0, j1));
                    // Whole columns (a softmax's rows), still in cache.
                    #[cfg(target_arch = "x86_64")]
                    if let Some(sm) = soft_max {
                        for j in j0..j1 {
                            let col = pc.offset((j - c0) as isize * c_i1);
                            sm.column(j, nq, col, r1 - r0, seen, &mut w);
                        }
                    }
                } else {
                    gemm((r0, r1), (j0, j1), (0, k.min(seen)), 0.0);
                }
            }
        }
        Causal::ColumnsByRow => {
            for (i0a, i0b) in blocks(r0, r1, false) {
                from_query((i0a, i0b), (c0, c1), grid(i0a, false).0.saturating_sub(off));
            }
        }
        Causal::ColumnsByColumn => {
            for (j0, j1) in blocks(c0, c1, false) {
                from_query((r0, r1), (j0, j1), grid(j0, false).0.saturating_sub(off));
            }
        }
    }
}

/// `C = alpha·(A·B)`, or that added to C where `accumulate`, for F32
/// operands at strides (`(pointer, row stride, column stride)` in
/// elements; C's rows contiguous): through [`super::packed`] where the CPU
/// has AVX2 and FMA and the product fills its register tiles (with the
/// operands rounded to bf16 where `bf16` and the CPU runs that), else
/// matrixmultiply.
///
/// # Safety
/// Every element the strides address is valid; C (`m × n`) is writable by
/// this thread alone and overlaps neither input.
unsafe fn f32_product(
    alpha: f32,
    (m, k, n): (usize, usize, usize),
    (pa, a_r, a_c): (*const f32, isize, isize),
    (pb, b_r, b_c): (*const f32, isize, isize),
    (pc, c_c): (*mut f32, isize),
    (accumulate, bf16): (bool, bool),
) {
    // Smaller products (a LoRA gradient's rank-wide side) leave most of a
    // 16 × 6 tile empty; matrixmultiply's 8 × 8 fits them better. Not in
    // bf16: its sums would differ from the packed kernel's (which adds
    // each pair's second term first), so a causal product's short pieces
    // (where the threads' shares end) would sum otherwise than the rest.
    #[cfg(target_arch = "x86_64")]
    if (m >= 32 && n >= 24 && k >= 16) || (bf16 && super::packed::bf16_supported()) {
        use super::gemm_small::Strided;
        use super::packed::{product, Out, Source, Team};
        let sa = Strided {
            p: pa,
            rs: a_r,
            cs: a_c,
        };
        let a = if bf16 { Source::F32Bf16(sa) } else { Source::F32(sa) };
        let b = Strided {
            p: pb,
            rs: b_r,
            cs: b_c,
        };
        let out = Out {
            c: pc,
            ldc: c_c as usize,
            alpha,
            accumulate,
            addend: None,
        };
        // SAFETY: forwarded from the caller.
        if unsafe { product(a, (0, m), (k, n), b, out, Team::alone(), None) } {
            return;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            pa,
            a_r,
            a_c,
            pb,
            b_r,
            b_c,
            if accumulate { 1.0 } else { 0.0 },
            pc,
            1,
            c_c,
        )
    }
}

/// A node that must run later than it stands: right before the second
/// (see [`fold_add`]).
pub(super) type Move = (*mut sys::ggml_tensor, *mut sys::ggml_tensor);

/// Moves each first node of `moves` right before its second in `order` (a
/// graph's nodes as they run), where it stands earlier.
pub(super) fn apply_moves(order: &mut [*mut sys::ggml_tensor], moves: &[Move]) {
    for &(node, before) in moves {
        let at = |t| order.iter().position(|&n| n == t).expect("a node of the graph");
        let (from, to) = (at(node), at(before));
        if from < to {
            order[from..to].rotate_left(1);
        }
    }
}

/// Folds LoRA's scales and adds, and the sums a frozen weight's product
/// ends in, into the GEMM nodes among `nodes` (a graph's, in order; see
/// [`fold_scale`], [`fold_add`] and [`fold_addend`]) and marks the
/// attention products under causal masks ([`mark_causal`]); returns how
/// many nodes it folded or marked. The caller must then move each node of
/// `moves` right before its second node in the graph's order.
///
/// # Safety
/// `nodes` must be the valid nodes of a graph that is not yet allocated,
/// after [`rewrite`] ran on them.
pub(super) unsafe fn fold(nodes: &[*mut sys::ggml_tensor], moves: &mut Vec<Move>) -> usize {
    #[cfg(target_pointer_width = "64")]
    {
        // SAFETY (all passes): forwarded from the caller. The marks and
        // scale folds change ops, or turn nodes into views of what they
        // already read, never which nodes read which: one count serves
        // every pass (fold_add, last, rewires only the ADDs it folds).
        let readers = readers(nodes);
        let consumers = readers.iter().map(|(&t, r)| (t, r.len())).collect();
        let causal = unsafe { mark_causal(nodes, &consumers) };
        // The forward's softmaxes and the backward's recomputed ones: for
        // the latter 2.7 % less time at 1024 tokens (12 alternating steps),
        // 2.6 % at 2048, ~1 % at 256, for at most 3 MiB more at the
        // allocator's peak (it was one probabilities' size more before the
        // SwiGLU inputs went to bf16: 748 → 784 MiB at 1024 tokens).
        #[cfg(target_arch = "x86_64")]
        let causal = causal + {
            let soft_max = nodes
                .iter()
                .filter(|&&n| unsafe { fuse_soft_max(n, &consumers) })
                .count();
            let order = nodes.iter().enumerate().map(|(i, &n)| (n as *const _, i)).collect();
            soft_max
                + nodes
                    .iter()
                    .filter(|&&n| unsafe { fuse_soft_max_back(n, &consumers, &order) })
                    .count()
        };
        let scales = nodes.iter().filter(|&&n| unsafe { fold_scale(n, &consumers) }).count();
        let gradient_scales = nodes
            .iter()
            .filter(|&&n| unsafe { fold_gradient_scale(n, &readers) })
            .count();
        #[cfg(target_arch = "x86_64")]
        let adds = {
            let order = nodes.iter().enumerate().map(|(i, &n)| (n as *const _, i)).collect();
            nodes
                .iter()
                .filter(|&&n| unsafe { fold_add(n, &consumers, &order, moves) })
                .count()
        };
        #[cfg(not(target_arch = "x86_64"))]
        let adds = 0;
        // SAFETY: forwarded from the caller.
        unsafe { collapse_views(nodes) };
        // After the folds above (which rewired readers and moved nodes):
        // the ADDs of a frozen weight's product to another tensor.
        #[cfg(target_arch = "x86_64")]
        let addends = {
            let readers = self::readers(nodes);
            let mut order = nodes.to_vec();
            apply_moves(&mut order, moves);
            let pos = order.iter().enumerate().map(|(i, &n)| (n as *const _, i)).collect();
            let n = nodes
                .iter()
                .filter(|&&n| unsafe { fold_addend(n, &readers, &pos) })
                .count();
            // SAFETY: forwarded from the caller.
            unsafe { collapse_views(nodes) };
            n
        };
        #[cfg(not(target_arch = "x86_64"))]
        let addends = 0;
        // Last: it reads the readers the folds left. (A mode, like the bf16
        // operands', not counted as a fold.)
        #[cfg(target_arch = "x86_64")]
        unsafe {
            band_zeroing(nodes)
        }
        causal + scales + gradient_scales + adds + addends
    }
    #[cfg(not(target_pointer_width = "64"))]
    0
}

/// Marks [`BAND`] each product marked [`Causal::Entries`] whose result
/// (through any views of it) is read only causally: by attention products
/// marked causal for the same mask, or as the probabilities a fused
/// softmax backward reads (see [`fuse_soft_max_back`]). None of those
/// reads a hidden entry more than [`BAND_ROWS`] rows past its column's
/// block's last visible key, so the rest of the hidden half (most of it
/// for long sequences: 25 MB a node for 2048 tokens on SmolLM2) need not
/// be zeroed.
///
/// # Safety
/// As for [`fold`], after its folds.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn band_zeroing(nodes: &[*mut sys::ggml_tensor]) {
    // SAFETY: forwarded from the caller; every pointer read is a node, a
    // node's source or a view's source.
    unsafe {
        let readers = readers(nodes);
        for &e in nodes {
            let Some(u) = gemm_userdata(e) else {
                continue;
            };
            let Some((Causal::Entries, off, nq)) = causal_of(u) else {
                continue;
            };
            // e and the views of it, each reader checked once.
            let mut shown = vec![e];
            let mut i = 0;
            let mut causal_only = !external(e);
            while causal_only && i < shown.len() {
                let t = shown[i];
                i += 1;
                for &r in readers.get(&(t as *const _)).map_or(&[][..], |v| &v[..]) {
                    let reads_as = |k: usize| (*r).src[k] == t;
                    let ok = if !(*r).view_src.is_null() && view_root(r) == e {
                        if !shown.contains(&r) {
                            shown.push(r);
                        }
                        !external(r)
                    } else if let Some(ru) = gemm_userdata(r) {
                        match causal_of(ru) {
                            // A fused softmax backward's probabilities.
                            Some((Causal::Entries, o, q)) => {
                                (o, q) == (off, nq)
                                    && (*r).op_params[SOFT_MAX_SLOT] == SOFT_MAX_BACK_TAG
                                    && reads_as(2)
                                    && !reads_as(0)
                                    && !reads_as(1)
                            }
                            // Reading it as the operand mark_causal found
                            // to be probabilities (or their gradient).
                            Some((pattern, o, q)) => {
                                let (at, other) = if pattern == Causal::ColumnsByRow {
                                    (0, 1)
                                } else {
                                    (1, 0)
                                };
                                (o, q) == (off, nq) && reads_as(at) && !reads_as(other) && !reads_as(2)
                            }
                            None => false,
                        }
                    } else {
                        false
                    };
                    if !ok {
                        causal_only = false;
                        break;
                    }
                }
            }
            if causal_only {
                set_userdata(e, u | BAND);
            }
        }
    }
}

/// Replaces a custom op's userdata, leaving the rest of its `op_params`.
///
/// # Safety
/// `node` must be a valid `GGML_OP_CUSTOM` node of a graph not yet
/// allocated.
#[cfg(all(target_pointer_width = "64", target_arch = "x86_64"))]
unsafe fn set_userdata(node: *mut sys::ggml_tensor, userdata: usize) {
    // SAFETY: forwarded from the caller; op_params hold the node's
    // CustomOpParams, unaligned.
    unsafe {
        let p = (*node).op_params.as_mut_ptr() as *mut CustomOpParams;
        let mut params = std::ptr::read_unaligned(p);
        params.userdata = userdata as *mut c_void;
        std::ptr::write_unaligned(p, params);
    }
}

/// Points every view among `nodes` at the memory it shows, as ggml does
/// when it makes a view of a view: the folds turn nodes that have views
/// into views themselves. ggml's allocator frees a tensor once the views
/// of it are done with, but a view of a view only counts against the view
/// in the middle, so the memory under it would stay taken to the graph's
/// end (+30 MiB on SmolLM2's step before this).
///
/// # Safety
/// `nodes` must be valid nodes of a graph that is not yet allocated.
#[cfg(target_pointer_width = "64")]
unsafe fn collapse_views(nodes: &[*mut sys::ggml_tensor]) {
    // SAFETY: forwarded from the caller; view sources are valid tensors.
    unsafe {
        for &n in nodes {
            while !(*n).view_src.is_null() && !(*(*n).view_src).view_src.is_null() {
                let middle = (*n).view_src;
                (*n).view_offs += (*middle).view_offs;
                (*n).view_src = (*middle).view_src;
            }
        }
    }
}

/// Which of `nodes` read each tensor (as a source).
pub(super) fn readers(
    nodes: &[*mut sys::ggml_tensor],
) -> std::collections::HashMap<*const sys::ggml_tensor, Vec<*mut sys::ggml_tensor>> {
    let mut readers: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
    for &node in nodes {
        // SAFETY: callers pass valid nodes, whose sources are valid or null.
        for &src in unsafe { &(*node).src } {
            if !src.is_null() {
                readers.entry(src as *const sys::ggml_tensor).or_default().push(node);
            }
        }
    }
    readers
}

/// Turns `node` into a `GGML_OP_CUSTOM` node running `fun` with `userdata`
/// on `n_tasks` threads (-1: every thread of the graph); sources, shape
/// and type stay.
///
/// # Safety
/// `node` must be a valid node of a graph that is not yet allocated.
pub(super) unsafe fn make_custom(node: *mut sys::ggml_tensor, fun: CustomOp, n_tasks: c_int, userdata: *mut c_void) {
    let params = CustomOpParams {
        fun: Some(fun),
        n_tasks,
        userdata,
    };
    // SAFETY: node is valid; op_params (64 bytes) holds the 24-byte params
    // (asserted above), written unaligned as ggml memcpy's them back.
    unsafe {
        (*node).op = sys::GGML_OP_CUSTOM;
        (*node).op_params = [0; 16];
        std::ptr::write_unaligned((*node).op_params.as_mut_ptr() as *mut CustomOpParams, params);
    }
}

/// A custom op's kernel: (dst, thread index, thread count, userdata).
pub(super) type CustomOp = unsafe extern "C" fn(*mut sys::ggml_tensor, c_int, c_int, *mut c_void);

/// The sum's length and the byte strides of A (i0 × k) and B (k × i1) in
/// `C = A · B`, for an OUT_PROD (`outer`) or a MUL_MAT of `a` and `b`.
fn strides(outer: bool, a: &sys::ggml_tensor, b: &sys::ggml_tensor) -> (usize, usize, usize, usize, usize) {
    if outer {
        (a.ne[1] as usize, a.nb[0], a.nb[1], b.nb[1], b.nb[0])
    } else {
        (a.ne[0] as usize, a.nb[1], a.nb[0], b.nb[0], b.nb[1])
    }
}

/// The short product a node marked [`EPILOGUE`] adds to its own result.
struct Epilogue<'t> {
    a: &'t sys::ggml_tensor,
    b: &'t sys::ggml_tensor,
    outer: bool,
    alpha: f32,
}

impl<'t> Epilogue<'t> {
    /// The epilogue of node `d` with `userdata`, if it has one.
    ///
    /// # Safety
    /// `d` must be an allocated node made by [`rewrite`] and maybe
    /// [`fold_add`].
    unsafe fn of(d: &'t sys::ggml_tensor, userdata: usize) -> Option<Self> {
        if !cfg!(target_pointer_width = "64") || userdata & EPILOGUE == 0 {
            return None;
        }
        // SAFETY: fold_add set both sources with the flag.
        let (a, b) = unsafe { (&*d.src[2], &*d.src[3]) };
        Some(Epilogue {
            a,
            b,
            outer: userdata & EPILOGUE_INNER == 0,
            alpha: f32::from_bits((userdata as u64 >> 32) as u32),
        })
    }

    /// The epilogue as the packed GEMM's extra product (its A indexed by
    /// the result's rows, its B by the result's columns).
    #[cfg(target_arch = "x86_64")]
    fn extra(&self) -> super::packed::Extra {
        use super::gemm_small::Strided;
        let (k, a_i0, a_k, b_k, b_i1) = strides(self.outer, self.a, self.b);
        let s = |nb: usize| (nb / 4) as isize;
        super::packed::Extra {
            a: Strided {
                p: self.a.data as *const f32,
                rs: s(a_i0),
                cs: s(a_k),
            },
            b: Strided {
                p: self.b.data as *const f32,
                rs: s(b_k),
                cs: s(b_i1),
            },
            k,
            alpha: self.alpha,
        }
    }

    /// [`Epilogue::add`] over rows `r0..r1` of `d`'s result, every column.
    ///
    /// # Safety
    /// As for [`Epilogue::add`]; `d` is the node's allocated result.
    #[cfg(target_arch = "x86_64")]
    unsafe fn add_rows(&self, d: &sys::ggml_tensor, (r0, r1): (usize, usize)) {
        // SAFETY: forwarded from the caller; row r0 of a result with rows
        // of F32 entries lies 4·r0 bytes into it.
        unsafe {
            let pc = (d.data as *mut u8).add(r0 * 4) as *mut f32;
            self.add((r0, r1), (0, d.ne[1] as usize), pc, (d.nb[1] / 4) as isize);
        }
    }

    /// Adds `alpha · (a·b)` to rows `r0..r1`, columns `c0..c1` of the
    /// result, in place (`pc` at (r0, c0), columns `cs` floats apart): the
    /// folded ADD's values, bit for bit.
    ///
    /// # Safety
    /// The rows and columns lie within the result, and no other thread
    /// writes them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn add(&self, (r0, r1): (usize, usize), (c0, c1): (usize, usize), pc: *mut f32, cs: isize) {
        use super::gemm_small::{add_small_k, Strided};
        let (k, a_i0, a_k, b_k, b_i1) = strides(self.outer, self.a, self.b);
        let s = |nb: usize| (nb / 4) as isize;
        // SAFETY: forwarded from the caller; a has the result's rows, b its
        // columns (fold_add checked the shapes), and fold_add marks only
        // sums of at most 16 terms, on CPUs with AVX2 and FMA.
        unsafe {
            let sa = Strided {
                p: (self.a.data as *const u8).add(r0 * a_i0) as *const f32,
                rs: s(a_i0),
                cs: s(a_k),
            };
            let sb = Strided {
                p: (self.b.data as *const u8).add(c0 * b_i1) as *const f32,
                rs: s(b_k),
                cs: s(b_i1),
            };
            add_small_k(self.alpha, r1 - r0, k, c1 - c0, sa, sb, pc, pc, cs);
        }
    }
}

/// The node's product (`a` broadcast over dims 2 and 3, as ggml does for
/// grouped-query attention) for this thread's share of the result.
unsafe extern "C" fn run(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this for a node made by `rewrite`, allocated, with
    // its two F32 sources; every offset below stays within the tensors'
    // extents given by their ne/nb, and the threads write disjoint parts.
    unsafe {
        let (a, b) = (&*(*dst).src[0], &*(*dst).src[1]);
        let d = &*dst;
        let s = |nb: usize| (nb / 4) as isize;
        let (kind, alpha, plus) = unpack(userdata);
        let causal = causal_of(userdata as usize);
        let epilogue = Epilogue::of(d, userdata as usize);
        let addend = addend_of(d, userdata as usize);
        if kind == Product::DequantOuter as usize {
            return dequant_outer(a, b, d, (epilogue, addend), ith as usize, nth as usize);
        }
        if kind == Product::DequantInner as usize {
            return dequant_inner(a, b, d, (epilogue, addend), ith as usize, nth as usize);
        }
        let (k, a_i0, a_k, b_k, b_i1) = strides(kind == Product::Outer as usize, a, b);
        let (m, n) = (d.ne[0] as usize, d.ne[1] as usize);
        let slices = (d.ne[2] * d.ne[3]) as usize;
        let (r2, r3) = (d.ne[2] / a.ne[2], d.ne[3] / a.ne[3]);
        // Split the (slice, column) pairs between threads; a result with few
        // columns (a LoRA A gradient: r of them) is split by rows instead.
        let (ith, nth) = (ith as usize, nth as usize);
        // A softmax needs whole columns.
        let soft_max = SoftMax::of(d);
        // The values' gradient (key rows; 64 columns a head) is split by
        // rows as well: split by columns, one head's columns fell to both
        // threads, and both packed its probabilities.
        let key_rows = matches!(causal, Some((Causal::ColumnsByRow, ..)));
        let by_rows = (n * slices < 8 * nth || key_rows) && soft_max.is_none();
        let (units, per) = if by_rows { (m, m) } else { (slices * n, n) };
        let (u0, u1) = match causal {
            // A causal product's rows or columns differ in work: split by it.
            Some(c) if (!by_rows || key_rows) && nth > 1 => {
                let share = weighted_share(units, ith, nth, |u| causal_work(c, u % per, (m, k)));
                (share.start, share.end)
            }
            _ => (units * ith / nth, units * (ith + 1) / nth),
        };
        let mut u = u0;
        while u < u1 {
            // One run: rows [r0, r1) × columns [c0, c1) of slice `sl`.
            let (sl, r0, r1, c0, c1) = if by_rows {
                u = u1;
                (None, u0, u1, 0, n)
            } else {
                let (sl, c0) = (u / per, u % per);
                let c1 = per.min(c0 + (u1 - u));
                u += c1 - c0;
                (Some(sl), 0, m, c0, c1)
            };
            for slice in sl.map_or(0..slices, |x| x..x + 1) {
                let (i2, i3) = (slice as i64 % d.ne[2], slice as i64 / d.ne[2]);
                let pa = (a.data as *const u8)
                    .add(((i2 / r2) as usize) * a.nb[2] + ((i3 / r3) as usize) * a.nb[3] + r0 * a_i0)
                    as *const f32;
                let pb =
                    (b.data as *const u8).add(i2 as usize * b.nb[2] + i3 as usize * b.nb[3] + c0 * b_i1) as *const f32;
                let pc = (d.data as *mut u8).add(i2 as usize * d.nb[2] + i3 as usize * d.nb[3] + r0 * 4 + c0 * d.nb[1])
                    as *mut f32;
                if let Some(c) = causal {
                    let b_ops = (pb, s(b_k), s(b_i1));
                    causal_run(
                        (
                            c,
                            soft_max,
                            (userdata as usize & BF16_OPERANDS != 0, userdata as usize & BAND != 0),
                        ),
                        (r0, r1),
                        (c0, c1),
                        k,
                        (pa, s(a_i0), s(a_k)),
                        b_ops,
                        (pc, s(d.nb[1])),
                    );
                    continue;
                }
                let cs = s(d.nb[1]);
                let gemm = || {
                    let a = (pa, s(a_i0), s(a_k));
                    f32_product(
                        alpha,
                        (r1 - r0, k, c1 - c0),
                        a,
                        (pb, s(b_k), s(b_i1)),
                        (pc, cs),
                        (false, false),
                    )
                };
                #[cfg(target_arch = "x86_64")]
                {
                    use super::gemm_small::{try_narrow, try_product, Strided};
                    let (sa, sb) = (
                        Strided {
                            p: pa,
                            rs: s(a_i0),
                            cs: s(a_k),
                        },
                        Strided {
                            p: pb,
                            rs: s(b_k),
                            cs: s(b_i1),
                        },
                    );
                    if plus {
                        // src[2] is laid out as dst (checked by fold_add).
                        let pd = ((*(*dst).src[2]).data as *const u8)
                            .offset((pc as *const u8).offset_from(d.data as *const u8))
                            as *const f32;
                        // fold_add marks only sums of at most 16 terms, on
                        // CPUs with AVX2 and FMA.
                        super::gemm_small::add_small_k(alpha, r1 - r0, k, c1 - c0, sa, sb, pd, pc, cs);
                    } else if !try_product(alpha, r1 - r0, k, c1 - c0, sa, sb, pc, cs)
                        && !try_narrow(alpha, r1 - r0, k, c1 - c0, sa, sb, pc, cs)
                    {
                        gemm();
                    }
                    if let Some(e) = &epilogue {
                        e.add((r0, r1), (c0, c1), pc, cs);
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                gemm();
            }
        }
    }
}

/// Rows of a quantized `a` dequantized at a time where [`super::packed`]
/// does not run (scratch: this many rows of one thread's share of the
/// columns, ~300 KB for SmolLM2).
const DEQUANT_ROWS: usize = 256;

/// [`Product::DequantOuter`]: `dst[i0,i1] = Σ_k a[i0,k] · b[i1,k]` with a
/// quantized 2-D `a` (`a[:,k]` is row k of the weight). The threads share
/// out [`super::packed`]'s bands of the result's rows (whole quantization
/// blocks along `i0`), so no thread dequantizes what another does. Where
/// that does not run, each takes a fixed share of the blocks, accumulates
/// bands of [`DEQUANT_ROWS`] rows of `a` into it, then adds the node's
/// epilogue, if any.
///
/// # Safety
/// As for [`run`]: allocated tensors of a node made by [`rewrite`].
unsafe fn dequant_outer(
    a: &sys::ggml_tensor,
    b: &sys::ggml_tensor,
    d: &sys::ggml_tensor,
    (epilogue, addend): (Option<Epilogue<'_>>, Option<&sys::ggml_tensor>),
    ith: usize,
    nth: usize,
) {
    // SAFETY: the type was checked to have a to_float in `product`; every
    // row range read lies within `a`'s rows (whole blocks), every write
    // within this thread's rows of `dst`.
    unsafe {
        let blck = sys::ggml_blck_size(a.type_) as usize;
        let blck_bytes = sys::ggml_type_size(a.type_);
        let (k, n) = (a.ne[1] as usize, d.ne[1] as usize);
        // B[p, i1] = b[i1, p].
        #[cfg(target_arch = "x86_64")]
        if packed(
            a,
            (b, b.nb[1], b.nb[0]),
            d,
            (&epilogue, addend),
            super::packed::Orient::Columns,
            (ith, nth),
        ) {
            return;
        }
        let blocks = a.ne[0] as usize / blck;
        let (b0, b1) = (blocks * ith / nth, blocks * (ith + 1) / nth);
        let (r0, m) = (b0 * blck, (b1 - b0) * blck);
        if m == 0 {
            return;
        }
        let deq = Dequantizer::new(a.type_).expect("checked in product");
        with_scratch(m * DEQUANT_ROWS.min(k), |scratch| {
            for k0 in (0..k).step_by(DEQUANT_ROWS) {
                let kn = DEQUANT_ROWS.min(k - k0);
                for kk in 0..kn {
                    let row = (a.data as *const u8).add((k0 + kk) * a.nb[1] + b0 * blck_bytes);
                    deq.row(row, scratch.as_mut_ptr().add(kk * m), m);
                }
                // C (rows i0 of this thread × all i1) += A (i0 × kk) · B (kk × i1).
                matrixmultiply::sgemm(
                    m,
                    kn,
                    n,
                    1.0,
                    scratch.as_ptr(),
                    1,
                    m as isize,
                    (b.data as *const u8).add(k0 * b.nb[1]) as *const f32,
                    (b.nb[1] / 4) as isize,
                    (b.nb[0] / 4) as isize,
                    if k0 == 0 { 0.0 } else { 1.0 },
                    (d.data as *mut u8).add(r0 * 4) as *mut f32,
                    1,
                    (d.nb[1] / 4) as isize,
                );
            }
        });
        #[cfg(target_arch = "x86_64")]
        if let Some(e) = epilogue {
            e.add_rows(d, (r0, r0 + m));
        }
        add_rows(d, addend, (r0, r0 + m));
    }
}

/// Adds `addend` (laid out as `d`), if any, to rows `r0..r1` of `d`'s
/// result, every column: a folded ADD where the packed GEMM does not run.
///
/// # Safety
/// `d` and `addend` are allocated, with the same shape and strides; no
/// other thread writes those rows.
unsafe fn add_rows(d: &sys::ggml_tensor, addend: Option<&sys::ggml_tensor>, (r0, r1): (usize, usize)) {
    let Some(x) = addend else { return };
    for j in 0..d.ne[1] as usize {
        // SAFETY: forwarded from the caller: column j's rows r0..r1 of both.
        unsafe {
            let c = (d.data as *mut u8).add(j * d.nb[1]) as *mut f32;
            let s = (x.data as *const u8).add(j * x.nb[1]) as *const f32;
            for i in r0..r1 {
                *c.add(i) += *s.add(i);
            }
        }
    }
}

/// [`super::packed::product`] of `d`, the product of the 2-D weight `a`
/// (as `orient` says) and `b` (the sum's terms `b_k` bytes apart, its
/// columns `b_j`), as thread `ith` of the `nth` sharing it, adding `d`'s
/// epilogue and addend, if any, to each tile as soon as it is final.
/// Returns false where that does not run.
///
/// # Safety
/// As for [`run`], for a dequantized product, called by each of the `nth`
/// threads.
#[cfg(target_arch = "x86_64")]
unsafe fn packed(
    a: &sys::ggml_tensor,
    (b, b_k, b_j): (&sys::ggml_tensor, usize, usize),
    d: &sys::ggml_tensor,
    (epilogue, addend): (&Option<Epilogue<'_>>, Option<&sys::ggml_tensor>),
    orient: super::packed::Orient,
    (ith, nth): (usize, usize),
) -> bool {
    use super::packed::{product, Orient, Out, Source, Team, Weight};
    // SAFETY: forwarded from the caller: `a`'s type has a to_float
    // (checked in `product`), the strides are `b`'s, and `d` holds F32.
    unsafe {
        let w = Weight {
            data: a.data as *const u8,
            row_bytes: a.nb[1],
            deq: Dequantizer::new(a.type_).expect("checked in product"),
            blck: sys::ggml_blck_size(a.type_) as usize,
            blck_bytes: sys::ggml_type_size(a.type_),
            bf16: leaf_tag(a, BF16_TAG).is_some(),
        };
        let k = if orient == Orient::Rows { a.ne[0] } else { a.ne[1] } as usize;
        let b = super::gemm_small::Strided {
            p: b.data as *const f32,
            rs: (b_k / 4) as isize,
            cs: (b_j / 4) as isize,
        };
        let extra = epilogue.as_ref().map(Epilogue::extra);
        let out = Out {
            c: d.data as *mut f32,
            ldc: d.nb[1] / 4,
            alpha: 1.0,
            accumulate: false,
            addend: addend.map(|x| x.data as *const f32),
        };
        let team = Team {
            key: d as *const sys::ggml_tensor as usize,
            ith,
            nth,
        };
        let rows = d.ne[0] as usize;
        product(
            Source::Weight(&w, orient),
            (0, rows),
            (k, d.ne[1] as usize),
            b,
            out,
            team,
            extra,
        )
    }
}

/// [`Product::DequantInner`]: `dst[i0,i1] = Σ_k a[k,i0] · b[k,i1]` with a
/// quantized 2-D `a` (row i0 of the weight holds `a[:,i0]`). The threads
/// share out [`super::packed`]'s bands of the weight's rows (the result's
/// rows); where that does not run, each takes a fixed share in bands of
/// [`DEQUANT_ROWS`], adding the node's epilogue, if any, to each band as
/// soon as it is computed.
///
/// # Safety
/// As for [`run`]: allocated tensors of a node made by [`rewrite`].
unsafe fn dequant_inner(
    a: &sys::ggml_tensor,
    b: &sys::ggml_tensor,
    d: &sys::ggml_tensor,
    (epilogue, addend): (Option<Epilogue<'_>>, Option<&sys::ggml_tensor>),
    ith: usize,
    nth: usize,
) {
    // SAFETY: the type was checked to have a to_float in `product`; every
    // row read is a whole row of `a`, every write one of this thread's rows
    // of `dst`.
    unsafe {
        let (k, rows, n) = (a.ne[0] as usize, a.ne[1] as usize, d.ne[1] as usize);
        #[cfg(target_arch = "x86_64")]
        if packed(
            a,
            (b, b.nb[0], b.nb[1]),
            d,
            (&epilogue, addend),
            super::packed::Orient::Rows,
            (ith, nth),
        ) {
            return;
        }
        let (r0, r1) = (rows * ith / nth, rows * (ith + 1) / nth);
        let deq = Dequantizer::new(a.type_).expect("checked in product");
        with_scratch(k * DEQUANT_ROWS.min(r1 - r0), |scratch| {
            for q0 in (r0..r1).step_by(DEQUANT_ROWS) {
                let qn = DEQUANT_ROWS.min(r1 - q0);
                for q in 0..qn {
                    let row = (a.data as *const u8).add((q0 + q) * a.nb[1]);
                    deq.row(row, scratch.as_mut_ptr().add(q * k), k);
                }
                // C (rows q0.. × all i1) = A (rows × k, row-major) · B (k × i1).
                matrixmultiply::sgemm(
                    qn,
                    k,
                    n,
                    1.0,
                    scratch.as_ptr(),
                    k as isize,
                    1,
                    b.data as *const f32,
                    (b.nb[0] / 4) as isize,
                    (b.nb[1] / 4) as isize,
                    0.0,
                    (d.data as *mut u8).add(q0 * 4) as *mut f32,
                    1,
                    (d.nb[1] / 4) as isize,
                );
                // The band's result is still in cache.
                #[cfg(target_arch = "x86_64")]
                if let Some(e) = &epilogue {
                    e.add_rows(d, (q0, q0 + qn));
                }
                add_rows(d, addend, (q0, q0 + qn));
            }
        });
    }
}

type Scratch = std::cell::RefCell<Vec<f32>>;

thread_local! {
    /// Each thread's GEMM scratch (packed panels, dequantized bands), kept
    /// between products so that a graph does not allocate (and zero) one
    /// per product. ggml built without OpenMP starts its worker threads
    /// anew for each graph it computes, so theirs is made once per graph.
    static SCRATCH: Scratch = const { std::cell::RefCell::new(Vec::new()) };
    /// A second one, for the short product a GEMM adds to its result (see
    /// [`EPILOGUE`]) while its dequantized band still holds the first.
    static SMALL_SCRATCH: Scratch = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of at least `len` floats (not
/// re-entrant: `f` must not ask for scratch itself).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SCRATCH, len, f)
}

/// [`with_scratch`] on the second buffer (usable inside the first's `f`).
pub(super) fn with_small_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SMALL_SCRATCH, len, f)
}

fn scratch_in<R>(key: &'static std::thread::LocalKey<Scratch>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|s| {
        let mut v = s.borrow_mut();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shares cover every unit once, in order, and each holds its part
    /// of the work to within one unit's (the oracle: the work summed
    /// directly).
    #[test]
    fn causal_split_balances_work() {
        let (nq, per, slices) = (1024, 1024, 3);
        for pattern in [
            Causal::Entries,
            Causal::KeysByColumn,
            Causal::ColumnsByRow,
            Causal::ColumnsByColumn,
        ] {
            for nth in [2, 3, 4, 7] {
                let work = |u: usize| causal_work((pattern, 0, nq), u % per, (1024, 1024));
                let units = per * slices;
                let total: usize = (0..units).map(work).sum();
                let shares: Vec<_> = (0..nth).map(|t| weighted_share(units, t, nth, work)).collect();
                assert!(
                    shares.windows(2).all(|w| w[0].end == w[1].start),
                    "{pattern:?} {nth}: {shares:?}"
                );
                let points: Vec<usize> = shares.iter().map(|r| r.start).chain([shares[nth - 1].end]).collect();
                assert_eq!((points[0], points[nth]), (0, units));
                for t in 0..nth {
                    assert!(points[t] <= points[t + 1], "{pattern:?} {nth}: {points:?}");
                    let share: usize = (points[t]..points[t + 1]).map(work).sum();
                    let most = (0..units).map(work).max().unwrap();
                    assert!(
                        share.abs_diff(total / nth) <= most,
                        "{pattern:?} {nth}: share {share} of {total}"
                    );
                }
            }
        }
        // Keys' gradient: the first key is seen by every query, the last by one.
        let w = |j| causal_work((Causal::ColumnsByColumn, 0, nq), j, (64, 1024));
        assert_eq!((w(0), w(nq - 1)), (nq + 1, 2));
    }
}
