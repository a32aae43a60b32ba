//! ggml contexts, tensors and graphs.
//!
//! A [`Context`] owns the tensor metadata arena; a [`Tensor`] is a copyable
//! handle that borrows its context, so it cannot outlive it. Contexts are
//! always created with `no_alloc`: tensor data lives in backend buffers.

use super::GgmlType;
use llama_cpp_sys_2 as sys;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Owns a `ggml_context` (tensor and graph metadata only; data lives in backend buffers).
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
}

// SAFETY: a ggml context is a plain arena with no thread affinity; all
// mutation goes through &self methods that the borrow checker serialises per
// thread, and Context is not Sync.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: ptr came from ggml_init and is freed exactly once.
        unsafe { sys::ggml_free(self.ptr.as_ptr()) }
    }
}

/// A handle to a tensor whose metadata lives in a context borrowed for `'a`.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'a Context>,
}

/// A computation graph allocated in a context borrowed for `'a`.
pub struct Graph<'a> {
    ptr: NonNull<sys::ggml_cgraph>,
    /// When a rewrite inserted nodes: the same computation laid out again
    /// (new nodes before their consumers) for the scheduler, while `ptr`
    /// keeps ggml's gradient bookkeeping.
    exec: Option<NonNull<sys::ggml_cgraph>>,
    _ctx: PhantomData<&'a Context>,
}

impl Context {
    /// A metadata-only context with room for `n_tensors` tensors and one
    /// graph of `graph_size` nodes (with gradients if `grads`).
    pub fn new(n_tensors: usize, graph_size: usize, grads: bool) -> Self {
        // A training graph (grads) gets room for one re-laid-out copy and
        // the nodes a rewrite inserts ([`Graph::contiguous_out_prod_inputs`]).
        let extra = if grads { graph_size / 4 } else { 0 };
        // SAFETY: pure size queries.
        let mem = unsafe {
            sys::ggml_tensor_overhead() * (n_tensors + extra)
                + if graph_size > 0 {
                    sys::ggml_graph_overhead_custom(graph_size, grads)
                        + if grads {
                            sys::ggml_graph_overhead_custom(graph_size, false)
                        } else {
                            0
                        }
                } else {
                    0
                }
        } + 1024;
        let params = sys::ggml_init_params {
            mem_size: mem,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml allocates its own arena (mem_buffer null); no_alloc means
        // tensors get no data here.
        let ptr = unsafe { sys::ggml_init(params) };
        Context {
            ptr: NonNull::new(ptr).expect("ggml_init failed (out of memory)"),
        }
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    fn wrap<'a>(&'a self, p: *mut sys::ggml_tensor) -> Tensor<'a> {
        Tensor {
            ptr: NonNull::new(p).expect("ggml returned a null tensor (context full)"),
            _ctx: PhantomData,
        }
    }

    /// A new tensor of shape `ne` (1 to 4 dims, ggml order).
    pub fn new_tensor(&self, ty: GgmlType, ne: &[i64]) -> Tensor<'_> {
        assert!((1..=4).contains(&ne.len()));
        // SAFETY: ctx is valid; ne has ne.len() entries.
        self.wrap(unsafe { sys::ggml_new_tensor(self.raw(), ty.raw(), ne.len() as i32, ne.as_ptr()) })
    }

    /// A new graph with room for `size` nodes.
    pub fn new_graph(&self, size: usize, grads: bool) -> Graph<'_> {
        // SAFETY: the context was sized for a graph of this size by the caller;
        // ggml asserts (aborts) otherwise.
        let p = unsafe { sys::ggml_new_graph_custom(self.raw(), size, grads) };
        Graph {
            ptr: NonNull::new(p).expect("graph allocation failed"),
            exec: None,
            _ctx: PhantomData,
        }
    }

    /// Iterates over every tensor created in this context.
    pub fn tensors(&self) -> Vec<Tensor<'_>> {
        let mut out = Vec::new();
        // SAFETY: walking the context's own tensor list.
        let mut t = unsafe { sys::ggml_get_first_tensor(self.raw()) };
        while !t.is_null() {
            out.push(self.wrap(t));
            // SAFETY: t is a tensor of this context.
            t = unsafe { sys::ggml_get_next_tensor(self.raw(), t) };
        }
        out
    }
}

macro_rules! unary_ops {
    ($($(#[$m:meta])* $name:ident => $f:ident;)*) => {
        impl Context {
            $($(#[$m])* pub fn $name<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
                // SAFETY: valid context and tensor; ggml checks shapes.
                self.wrap(unsafe { sys::$f(self.raw(), a.raw()) })
            })*
        }
    };
}

macro_rules! binary_ops {
    ($($(#[$m:meta])* $name:ident => $f:ident;)*) => {
        impl Context {
            $($(#[$m])* pub fn $name<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
                // SAFETY: valid context and tensors; ggml checks shapes.
                self.wrap(unsafe { sys::$f(self.raw(), a.raw(), b.raw()) })
            })*
        }
    };
}

unary_ops! {
    /// Makes a tensor contiguous.
    cont => ggml_cont;
    /// Swaps the first two dimensions (a view).
    transpose => ggml_transpose;
    /// x * sigmoid(x).
    silu => ggml_silu;
    /// x².
    sqr => ggml_sqr;
    /// log(1 + exp(x)).
    softplus => ggml_softplus;
    /// exp(x).
    exp => ggml_exp;
    /// max(x, 0).
    relu => ggml_relu;
    /// tanh(x) (no backward in ggml: inference only).
    tanh => ggml_tanh;
    /// Sums each row.
    sum_rows => ggml_sum_rows;
    /// Sums all elements to a scalar.
    sum => ggml_sum;
}

binary_ops! {
    /// `a.ne=[K,M], b.ne=[K,N]` → `[M,N]`: rows of a dotted with rows of b.
    mul_mat => ggml_mul_mat;
    /// `a.ne=[M,K], b.ne=[N,K]` → `[M,N]`: sum over k of column k of a
    /// times column k of b (ggml's backward of mul_mat).
    out_prod => ggml_out_prod;
    /// Element-wise sum with broadcasting of b.
    add => ggml_add;
    /// Element-wise product with broadcasting of b.
    mul => ggml_mul;
    /// Element-wise difference with broadcasting of b.
    sub => ggml_sub;
    /// Rows of a selected by the I32 indices in b.
    get_rows => ggml_get_rows;
    /// Copies a into b's layout (and type); returns the view of b.
    cpy => ggml_cpy;
    /// silu(a) * b.
    swiglu_split => ggml_swiglu_split;
    /// gelu(a) * b (tanh approximation; no backward in ggml).
    geglu_split => ggml_geglu_split;
    /// Cross-entropy of softmax(a) against probabilities b, summed to a scalar.
    cross_entropy_loss => ggml_cross_entropy_loss;
    /// Repeats a to b's shape.
    repeat => ggml_repeat;
}

impl Context {
    /// The cross-entropy of softmax(`logits`) (`[classes, rows]`) against
    /// one target class per row, and the targets' tensor, to be written with
    /// [`Tensor::write_targets`] once allocated. The logits stop being a
    /// graph output (mark them again to read them after the compute). Built as ggml's
    /// CROSS_ENTROPY_LOSS over one-hot rows; on AVX2 CPUs
    /// [`Graph::gemm_products`] keeps the class ids alone instead (the
    /// one-hot rows of 256 tokens over a 49152-word vocabulary are 50 MB).
    pub fn cross_entropy_loss_targets<'a>(&'a self, logits: Tensor<'a>) -> (Tensor<'a>, Tensor<'a>) {
        let [classes, rows, ..] = logits.ne();
        let targets = self
            .new_tensor(GgmlType::F32, &[classes, rows])
            .set_name("targets")
            .set_input();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a valid leaf just made.
        unsafe {
            super::elementwise::tag_one_hot(targets.raw())
        };
        // The loss reads the logits: a graph that reads its loss needs them
        // no longer, and their memory may then serve the loss's gradient.
        // SAFETY: a flag update on a valid tensor.
        unsafe { (*logits.raw()).flags &= !(sys::GGML_TENSOR_FLAG_OUTPUT as i32) };
        (self.cross_entropy_loss(logits, targets), targets)
    }

    /// a * s.
    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_scale(self.raw(), a.raw(), s) })
    }

    /// Concatenates along dimension `dim` (no backward in ggml: inference only).
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        // SAFETY: valid context and tensors; ggml checks the other dimensions.
        self.wrap(unsafe { sys::ggml_concat(self.raw(), a.raw(), b.raw(), dim) })
    }

    /// `a` with `b` added into the region of a at byte `offset` laid out
    /// with a's strides `nb` (a new tensor; has a backward for both).
    pub fn acc<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, nb: [usize; 4], offset: usize) -> Tensor<'a> {
        // SAFETY: valid context and tensors; ggml asserts b fits inside a.
        self.wrap(unsafe { sys::ggml_acc(self.raw(), a.raw(), b.raw(), nb[1], nb[2], nb[3], offset) })
    }

    /// 1 / (1 + exp(-x)) from ops that have a backward: exp(-softplus(-x)).
    pub fn sigmoid_differentiable<'a>(&'a self, x: Tensor<'a>) -> Tensor<'a> {
        self.exp(self.scale(self.softplus(self.scale(x, -1.0)), -1.0))
    }

    /// tanh(x) = 2 sigmoid(2x) - 1, from ops that have a backward.
    pub fn tanh_differentiable<'a>(&'a self, x: Tensor<'a>) -> Tensor<'a> {
        let s = self.sigmoid_differentiable(self.scale(x, 2.0));
        self.scale_bias(s, 2.0, -1.0)
    }

    /// a * s + b (element-wise, scalars).
    pub fn scale_bias<'a>(&'a self, a: Tensor<'a>, s: f32, b: f32) -> Tensor<'a> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_scale_bias(self.raw(), a.raw(), s, b) })
    }

    /// RMS-normalises each row: x / sqrt(mean(x²) + eps).
    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_rms_norm(self.raw(), a.raw(), eps) })
    }

    /// Softmax over rows of `a * scale + mask`.
    pub fn soft_max_ext<'a>(&'a self, a: Tensor<'a>, mask: Option<Tensor<'a>>, scale: f32) -> Tensor<'a> {
        let m = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        // SAFETY: valid context and tensors; ggml checks the mask shape.
        self.wrap(unsafe { sys::ggml_soft_max_ext(self.raw(), a.raw(), m, scale, 0.0) })
    }

    /// Rotary embedding of `a` ([head_dim, heads, tokens]) at positions `pos` (I32).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_ext<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        n_dims: i32,
        mode: i32,
        n_ctx_orig: i32,
        freq_base: f32,
        freq_scale: f32,
    ) -> Tensor<'a> {
        // SAFETY: valid context and tensors. ext_factor 0 (no YaRN), attn_factor
        // 1, beta_fast 32, beta_slow 1 match llama.cpp's defaults without YaRN.
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.raw(),
                a.raw(),
                pos.raw(),
                std::ptr::null_mut(),
                n_dims,
                mode,
                n_ctx_orig,
                freq_base,
                freq_scale,
                0.0,
                1.0,
                32.0,
                1.0,
            )
        })
    }

    /// Reinterprets a contiguous tensor with a new shape.
    pub fn reshape<'a>(&'a self, a: Tensor<'a>, ne: &[i64]) -> Tensor<'a> {
        // SAFETY: valid context and tensor; ggml asserts element counts match
        // and that `a` is contiguous.
        let p = unsafe {
            match *ne {
                [a0] => sys::ggml_reshape_1d(self.raw(), a.raw(), a0),
                [a0, a1] => sys::ggml_reshape_2d(self.raw(), a.raw(), a0, a1),
                [a0, a1, a2] => sys::ggml_reshape_3d(self.raw(), a.raw(), a0, a1, a2),
                [a0, a1, a2, a3] => sys::ggml_reshape_4d(self.raw(), a.raw(), a0, a1, a2, a3),
                _ => panic!("reshape to {} dims", ne.len()),
            }
        };
        self.wrap(p)
    }

    /// Permutes dimensions: axis i of `a` becomes axis `axes[i]`.
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        // SAFETY: valid context and tensor; ggml asserts a valid permutation.
        self.wrap(unsafe { sys::ggml_permute(self.raw(), a.raw(), axes[0], axes[1], axes[2], axes[3]) })
    }

    /// A strided view: shape `ne`, byte strides `nb` (for dims 1..), byte offset.
    pub fn view<'a>(&'a self, a: Tensor<'a>, ne: &[i64], nb: &[usize], offset: usize) -> Tensor<'a> {
        // SAFETY: valid context and tensor; ggml asserts the view stays inside a.
        let p = unsafe {
            match (ne, nb) {
                ([a0], []) => sys::ggml_view_1d(self.raw(), a.raw(), *a0, offset),
                ([a0, a1], [b1]) => sys::ggml_view_2d(self.raw(), a.raw(), *a0, *a1, *b1, offset),
                ([a0, a1, a2], [b1, b2]) => sys::ggml_view_3d(self.raw(), a.raw(), *a0, *a1, *a2, *b1, *b2, offset),
                ([a0, a1, a2, a3], [b1, b2, b3]) => {
                    sys::ggml_view_4d(self.raw(), a.raw(), *a0, *a1, *a2, *a3, *b1, *b2, *b3, offset)
                }
                _ => panic!("view with {} dims and {} strides", ne.len(), nb.len()),
            }
        };
        self.wrap(p)
    }
}

/// The op of `t` as ggml describes it (`MUL_MAT`, `VIEW`, `CUSTOM`…).
///
/// # Safety
/// `t` must be a valid tensor.
pub(super) unsafe fn op_desc(t: *const sys::ggml_tensor) -> String {
    // SAFETY: forwarded from the caller; ggml returns a static
    // NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(sys::ggml_op_desc(t)) }
        .to_string_lossy()
        .into_owned()
}

impl<'a> Tensor<'a> {
    /// A handle to a tensor of a context that `'a` keeps alive (the caller
    /// guarantees it, e.g. a store that owns the context).
    pub(crate) fn from_raw(ptr: NonNull<sys::ggml_tensor>) -> Self {
        Tensor { ptr, _ctx: PhantomData }
    }

    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    fn get(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives as long as its context, which 'a borrows.
        unsafe { self.ptr.as_ref() }
    }

    /// Shape, ggml order, always 4 entries.
    pub fn ne(self) -> [i64; 4] {
        self.get().ne
    }

    /// Whether the elements are stored densely in order.
    pub fn is_contiguous(self) -> bool {
        // SAFETY: a valid tensor.
        unsafe { sys::ggml_is_contiguous(self.raw()) }
    }

    /// Byte strides.
    pub fn nb(self) -> [usize; 4] {
        self.get().nb
    }

    /// Element type.
    pub fn ty(self) -> GgmlType {
        GgmlType::from_code(self.get().type_).expect("known type")
    }

    /// Number of elements.
    pub fn n_elements(self) -> usize {
        self.ne().iter().product::<i64>() as usize
    }

    /// Bytes of data.
    pub fn n_bytes(self) -> usize {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_nbytes(self.raw()) }
    }

    /// Sets the tensor's name (truncated to ggml's 63 bytes).
    pub fn set_name(self, name: &str) -> Self {
        let c = CString::new(name.replace('\0', "")).unwrap();
        // SAFETY: valid tensor; ggml copies and truncates the name.
        unsafe { sys::ggml_set_name(self.raw(), c.as_ptr()) };
        self
    }

    /// Whether both handles point at the same tensor.
    pub fn same(self, other: Tensor<'_>) -> bool {
        self.ptr == other.ptr.cast()
    }

    /// The tensor's name.
    pub fn name(self) -> String {
        let n = &self.get().name;
        let bytes: Vec<u8> = n.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The tensor's op as ggml describes it (`MUL_MAT`, `VIEW`, `CUSTOM`…):
    /// what a rewrite made of a node.
    pub fn op_desc(self) -> String {
        // SAFETY: a valid tensor.
        unsafe { op_desc(self.raw()) }
    }

    /// Marks the tensor as a graph input (allocated before compute, not reused).
    pub fn set_input(self) -> Self {
        // SAFETY: flag update on a valid tensor.
        unsafe { sys::ggml_set_input(self.raw()) };
        self
    }

    /// Declares this attention mask (`[n_kv, n_queries]`, -inf where hidden)
    /// causal up to `off`: it hides key `j` from query `i` wherever
    /// `j > i + off`. The CPU GEMM of a training step then skips the
    /// attention products' terms and entries that only hidden keys reach
    /// (about half of them). The values must keep that promise.
    pub fn set_causal_offset(self, off: usize) -> Self {
        // SAFETY: a valid tensor; see `gemm::set_causal_offset`.
        unsafe { super::gemm::set_causal_offset(self.raw(), off) };
        self
    }

    /// Lets the CPU's training products over this frozen weight run with
    /// bf16 operands: its values and the other operand's rounded to bf16
    /// (8 bits of mantissa), their products summed in F32, twice as fast
    /// where the CPU has AVX512-BF16 (elsewhere the mark changes nothing).
    /// A training graph that reads such a weight runs its attention's
    /// causal products with bf16 operands too.
    pub fn set_bf16_products(self) -> Self {
        // SAFETY: a valid tensor; see `gemm::set_bf16`.
        unsafe { super::gemm::set_bf16(self.raw()) };
        self
    }

    /// Marks the tensor as a graph output (never overwritten during compute).
    pub fn set_output(self) -> Self {
        // SAFETY: flag update on a valid tensor.
        unsafe { sys::ggml_set_output(self.raw()) };
        self
    }

    /// Marks the tensor as a trainable parameter (gets a gradient).
    pub fn set_param(self) -> Self {
        // SAFETY: flag update on a valid tensor.
        unsafe { sys::ggml_set_param(self.raw()) };
        self
    }

    /// Marks the tensor as the loss (a scalar the backward pass starts from).
    pub fn set_loss(self) -> Self {
        // SAFETY: flag update on a valid tensor.
        unsafe { sys::ggml_set_loss(self.raw()) };
        self
    }

    /// Whether the tensor has data in a backend buffer.
    pub fn is_allocated(self) -> bool {
        !self.get().data.is_null()
    }

    /// Copies host bytes into the tensor (which must be allocated and contiguous).
    pub fn write_bytes(self, data: &[u8]) {
        assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
        assert_eq!(data.len(), self.n_bytes(), "byte count for tensor '{}'", self.name());
        // SAFETY: the tensor is allocated in a backend buffer and data has exactly
        // its byte size.
        unsafe { sys::ggml_backend_tensor_set(self.raw(), data.as_ptr() as *const _, 0, data.len()) }
    }

    /// Sets every byte of the tensor (allocated, contiguous) to zero.
    pub fn write_zeros(self) {
        assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
        // SAFETY: the tensor is allocated in a backend buffer; the range is
        // its whole data.
        unsafe { sys::ggml_backend_tensor_memset(self.raw(), 0, 0, self.n_bytes()) }
    }

    /// Copies f32 values into an F32 tensor (allocated, contiguous) from
    /// element `at` on.
    pub fn write_f32_at(self, at: usize, data: &[f32]) {
        assert_eq!(self.ty(), GgmlType::F32);
        assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
        assert!(
            at + data.len() <= self.n_elements(),
            "range of tensor '{}'",
            self.name()
        );
        let bytes: &[u8] = bytemuck_f32(data);
        // SAFETY: allocated, and the byte range lies within the tensor's data.
        unsafe { sys::ggml_backend_tensor_set(self.raw(), bytes.as_ptr() as *const _, at * 4, bytes.len()) }
    }

    /// Copies f32 values into an F32 tensor.
    pub fn write_f32(self, data: &[f32]) {
        assert_eq!(self.ty(), GgmlType::F32);
        let bytes: &[u8] = bytemuck_f32(data);
        self.write_bytes(bytes)
    }

    /// Copies i32 values into an I32 tensor.
    pub fn write_i32(self, data: &[i32]) {
        assert_eq!(self.ty(), GgmlType::I32);
        // SAFETY: i32 has no padding and alignment ≥ u8's; the slice covers
        // exactly len*4 initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        self.write_bytes(bytes)
    }

    /// Writes one class per row into targets made by
    /// [`Context::cross_entropy_loss_targets`]: the ids where the graph keeps
    /// ids, else one-hot rows (zeroed in place and the ones set one by one:
    /// a host copy of 50 MB of one-hot rows cost 20 ms a step, its fresh
    /// pages faulting in).
    pub fn write_targets(self, targets: &[i32]) {
        let classes = self.ne()[0] as usize;
        if self.ty() == GgmlType::I32 {
            // The ids' tensor no longer knows the class count; the graph's
            // kernels skip ids out of range, so the caller must check them.
            assert!(targets.iter().all(|&t| t >= 0), "negative class id in targets");
            return self.write_i32(targets);
        }
        self.write_zeros();
        for (r, &t) in targets.iter().enumerate() {
            self.write_f32_at(r * classes + t as usize, &[1.0]);
        }
    }

    /// Reads the tensor's data (allocated, contiguous) as bytes.
    pub fn read_bytes(self) -> Vec<u8> {
        assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
        let mut out = vec![0u8; self.n_bytes()];
        // SAFETY: the tensor is allocated and out has exactly its byte size.
        unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr() as *mut _, 0, out.len()) };
        out
    }

    /// Reads a contiguous F32 matrix as rows of `ne[0]` values, one host
    /// copy per row (no intermediate copy of the whole tensor).
    pub fn read_f32_rows(self) -> Vec<Vec<f32>> {
        assert_eq!(self.ty(), GgmlType::F32);
        assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
        let n = self.ne()[0] as usize;
        let rows = self.n_elements() / n.max(1);
        (0..rows)
            .map(|r| {
                let mut out = vec![0f32; n];
                // SAFETY: the tensor is allocated and contiguous (F32 rows of n
                // values); row r lies within its n_bytes; out has n floats.
                unsafe {
                    sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr() as *mut _, r * n * 4, n * 4);
                }
                out
            })
            .collect()
    }

    /// Reads an F32 tensor's values in logical order, also when it is a
    /// strided view (e.g. a gradient that ggml left as a permuted view).
    pub fn read_f32(self) -> Vec<f32> {
        assert_eq!(self.ty(), GgmlType::F32);
        if self.is_contiguous() {
            assert!(self.is_allocated(), "tensor '{}' is not allocated", self.name());
            let mut out = vec![0f32; self.n_elements()];
            // SAFETY: the tensor is allocated and contiguous, so its bytes
            // are exactly out's n_elements floats.
            unsafe { sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr() as *mut _, 0, out.len() * 4) };
            return out;
        }
        // For a view, n_bytes spans from its first to its last element.
        let bytes = self.read_bytes();
        let at = |off: usize| f32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        let (ne, nb) = (self.ne(), self.nb());
        let mut out = Vec::with_capacity(self.n_elements());
        for i3 in 0..ne[3] as usize {
            for i2 in 0..ne[2] as usize {
                for i1 in 0..ne[1] as usize {
                    for i0 in 0..ne[0] as usize {
                        out.push(at(i0 * nb[0] + i1 * nb[1] + i2 * nb[2] + i3 * nb[3]));
                    }
                }
            }
        }
        out
    }
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; the byte slice covers exactly the floats.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

impl<'a> Graph<'a> {
    pub(crate) fn raw(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }

    /// The graph the scheduler allocates and runs (see `exec`).
    pub(crate) fn exec_raw(&self) -> *mut sys::ggml_cgraph {
        self.exec.unwrap_or(self.ptr).as_ptr()
    }

    /// Copies the non-contiguous inputs of every OUT_PROD that `runs`
    /// refuses as it is into contiguous tensors (Vulkan's OUT_PROD only
    /// takes contiguous ones; ggml's backward feeds it transposed views), so
    /// that the product stays on the device instead of falling back to the
    /// CPU. Call after the backward pass is built and rewritten, before
    /// allocating; the graph's context must have been made with `grads`.
    /// Returns the number of copies inserted.
    pub fn contiguous_out_prod_inputs(&mut self, ctx: &'a Context, runs: impl Fn(Tensor<'a>) -> bool) -> usize {
        let nodes: Vec<*mut sys::ggml_tensor> = (0..self.n_nodes())
            // SAFETY: i < n_nodes; nodes are valid tensors of this graph.
            .map(|i| unsafe { sys::ggml_graph_node(self.raw(), i as i32) })
            .collect();
        let mut n = 0;
        for &node in &nodes {
            let t = Tensor {
                ptr: NonNull::new(node).expect("non-null node"),
                _ctx: PhantomData,
            };
            // SAFETY: node is valid.
            if unsafe { (*node).op } != sys::GGML_OP_OUT_PROD || runs(t) {
                continue;
            }
            for k in 0..2 {
                // SAFETY: node is valid; its sources are valid or null.
                let src = unsafe { (*node).src[k] };
                // SAFETY: src is a valid tensor (checked non-null).
                if src.is_null() || unsafe { sys::ggml_is_contiguous(src) } {
                    continue;
                }
                // SAFETY: ctx has room (sized with grads); the copy has the
                // source's shape, so the product's result is unchanged.
                unsafe { (*node).src[k] = sys::ggml_cont(ctx.raw(), src) };
                n += 1;
            }
        }
        if n > 0 {
            // Lay the nodes out again in their order: expanding each one
            // first adds its not yet visited sources, i.e. the new copies.
            // SAFETY: the context was sized for this second graph (grads).
            let exec =
                unsafe { sys::ggml_new_graph_custom(ctx.raw(), sys::ggml_graph_size(self.raw()) as usize, false) };
            for &node in &nodes {
                // SAFETY: valid graph and node of the same context.
                unsafe { sys::ggml_build_forward_expand(exec, node) };
            }
            self.exec = Some(NonNull::new(exec).expect("graph allocation failed"));
        }
        n
    }

    /// The nodes in the order the scheduler runs them (see `exec`).
    fn exec_nodes(&self) -> Vec<*mut sys::ggml_tensor> {
        let g = self.exec_raw();
        // SAFETY: valid graph; i < its node count.
        (0..unsafe { sys::ggml_graph_n_nodes(g) })
            .map(|i| unsafe { sys::ggml_graph_node(g, i) })
            .collect()
    }

    /// Recomputes, right before the backward first reads it, each forward
    /// value of at least 256 KB that the backward reads and whose inputs are
    /// still held then (or can be recomputed the same way), so that the
    /// forward's copy is freed after its last forward reader instead of
    /// living through the backward:
    /// - element-wise values (RMS_NORM, MUL, GLU): on a LoRA step the
    ///   normalised block inputs and the SwiGLU output that the adapters' A
    ///   gradients read;
    /// - attention probabilities (SOFT_MAX over a MUL_MAT of the queries
    ///   and keys, which the backward holds anyway): the scores' product
    ///   runs again, then the softmax; the backward's reshapes of the
    ///   probabilities are made again over the recomputed value.
    ///
    /// The same ops on the same inputs: the same values. Call after the
    /// backward pass is built, before [`Graph::gemm_products`] and
    /// allocating, on a graph with no re-laid-out copy yet; `ctx` must have
    /// been made with `grads`. Returns the number of values recomputed.
    pub fn rematerialize(&mut self, ctx: &'a Context) -> usize {
        if self.exec.is_some() {
            return 0;
        }
        let nodes = self.exec_nodes();
        type T = *mut sys::ggml_tensor;
        // SAFETY: nodes are valid tensors of this graph, whose sources and
        // view sources are valid or null; the graph is not allocated; ctx
        // (made with grads) has room for the clones and one re-laid-out copy
        // of the graph, which replaces none yet (checked above).
        unsafe {
            let Some(loss) = nodes
                .iter()
                .position(|&n| (*n).flags & sys::GGML_TENSOR_FLAG_LOSS as i32 != 0)
            else {
                return 0;
            };
            let pos: std::collections::HashMap<T, usize> = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
            let root_of = super::gemm::view_root;
            let readers = super::gemm::readers(&nodes);
            let readers_of = |t: T| readers.get(&(t as *const _)).map_or(&[][..], |v| &v[..]);
            // Views of each tensor, and the last node that reads each
            // tensor's memory (itself or through views).
            let mut views: std::collections::HashMap<T, Vec<T>> = Default::default();
            let mut last_read: std::collections::HashMap<T, usize> = Default::default();
            for (i, &n) in nodes.iter().enumerate() {
                for &src in (*n).src.iter().filter(|s| !s.is_null()) {
                    let r = last_read.entry(root_of(src)).or_default();
                    *r = (*r).max(i);
                }
                if !(*n).view_src.is_null() {
                    views.entry((*n).view_src).or_default().push(n);
                }
            }
            let forward = |t: T| pos.get(&t).is_some_and(|&p| p < loss);
            let only_reader = |t: T, r: T| readers_of(t) == [r];
            // An element-wise forward value no view shares and nobody
            // outside the graph reads.
            let cheap = |t: T| {
                matches!((*t).op, sys::GGML_OP_RMS_NORM | sys::GGML_OP_MUL | sys::GGML_OP_GLU)
                    && (*t).view_src.is_null()
                    && !super::gemm::external(t)
                    && !views.contains_key(&t)
                    && forward(t)
            };
            // Attention probabilities: a forward SOFT_MAX whose views (if
            // any) are reshapes.
            let probs = |t: T| {
                (*t).op == sys::GGML_OP_SOFT_MAX
                    && (*t).view_src.is_null()
                    && !super::gemm::external(t)
                    && views
                        .get(&t)
                        .is_none_or(|v| v.iter().all(|&w| (*w).op == sys::GGML_OP_RESHAPE))
                    && forward(t)
            };
            // Whether `t` is still held at node `at`: a leaf, or its memory
            // read there or later.
            let held = |t: T, at: usize| {
                let root = root_of(t);
                (*root).op == sys::GGML_OP_NONE || last_read.get(&root).is_some_and(|&i| i >= at)
            };
            let all_held = |t: T, at: usize| (*t).src.iter().filter(|x| !x.is_null()).all(|&x| held(x, at));
            // The same op, params and sources (a clone in place of its
            // original where `map` has one); a reshape is made again over
            // its source's clone.
            let clone = |t: T, map: &[(T, T)]| {
                let mapped = |x: T| map.iter().find(|(o, _)| *o == x).map_or(x, |&(_, n)| n);
                if (*t).op == sys::GGML_OP_RESHAPE {
                    let [a, b, c, d] = (*t).ne;
                    return sys::ggml_reshape_4d(ctx.raw(), mapped((*t).src[0]), a, b, c, d);
                }
                let c = sys::ggml_dup_tensor(ctx.raw(), t);
                (*c).op = (*t).op;
                (*c).op_params = (*t).op_params;
                for (k, &src) in (*t).src.iter().enumerate() {
                    (*c).src[k] = mapped(src);
                }
                c
            };
            let mut count = 0;
            for &f in &nodes {
                if !(cheap(f) || probs(f)) || sys::ggml_nbytes(f) < 256 << 10 {
                    continue;
                }
                // The backward's reads of f: (node, source slot, the view
                // of f it reads, if it reads one).
                let mut uses = vec![];
                for &v in std::iter::once(&f).chain(views.get(&f).into_iter().flatten()) {
                    for &reader in readers_of(v).iter().filter(|&r| pos[r] > loss) {
                        // A view of f shows f's memory whatever its source
                        // slot says: its own readers are redirected instead.
                        if (*reader).view_src == f {
                            continue;
                        }
                        for k in 0..(*reader).src.len() {
                            if (*reader).src[k] == v {
                                uses.push((reader, k, (v != f).then_some(v)));
                            }
                        }
                    }
                }
                let Some(first) = uses.iter().map(|&(r, _, _)| pos[&r]).min() else {
                    continue;
                };
                // Sources to recompute first, in order.
                let mut inner = vec![];
                let ok = (*f).src.iter().filter(|s| !s.is_null()).all(|&s| {
                    if held(s, first) {
                        return true;
                    }
                    if cheap(s) && all_held(s, first) {
                        inner.push(s);
                        return true;
                    }
                    // Probabilities' scores: a product of held operands that
                    // only f reads (maybe through one reshape).
                    let (x, p) = if (*s).op == sys::GGML_OP_RESHAPE && (*s).view_offs == 0 {
                        (s, (*s).view_src)
                    } else {
                        (s, s)
                    };
                    let scores = probs(f)
                        && (*p).op == sys::GGML_OP_MUL_MAT
                        && !super::gemm::external(p)
                        && forward(p)
                        && only_reader(x, f)
                        && (x == p || only_reader(p, x))
                        && all_held(p, first);
                    if scores {
                        inner.push(p);
                        if x != p {
                            inner.push(x);
                        }
                    }
                    scores
                });
                if !ok {
                    continue;
                }
                let mut map = vec![];
                for &s in &inner {
                    map.push((s, clone(s, &map)));
                }
                let fc = clone(f, &map);
                let mut remade: Vec<(T, T)> = vec![];
                for (reader, k, view) in uses {
                    (*reader).src[k] = match view {
                        None => fc,
                        Some(v) => match remade.iter().find(|(o, _)| *o == v) {
                            Some(&(_, c)) => c,
                            None => {
                                let c = clone(v, &[(f, fc)]);
                                remade.push((v, c));
                                c
                            }
                        },
                    };
                }
                count += 1;
            }
            if count > 0 {
                // Lay the nodes out again in their order: expanding each one
                // first adds its not yet visited sources, i.e. the clones,
                // right before their first reader.
                let exec = sys::ggml_new_graph_custom(ctx.raw(), sys::ggml_graph_size(self.raw()) as usize, false);
                for &node in &nodes {
                    sys::ggml_build_forward_expand(exec, node);
                }
                self.exec = Some(NonNull::new(exec).expect("graph allocation failed"));
            }
            count
        }
    }

    /// Whether the graph, as it runs, computes node `t` before any node that
    /// reads `input` (so that `input` can be written once `t` is known:
    /// [`super::Sched::compute_paused`]).
    pub fn computes_before_reading(&self, t: Tensor<'a>, input: Tensor<'a>) -> bool {
        let nodes = self.exec_nodes();
        let Some(at) = nodes.iter().position(|&n| n == t.raw()) else {
            return false;
        };
        // SAFETY: nodes are valid tensors of this graph; sources valid or null.
        let first_reader = nodes
            .iter()
            .position(|&n| unsafe { (*n).src.iter().any(|&s| s == input.raw()) });
        first_reader.is_none_or(|r| at < r)
    }

    /// Adds `t` and everything it depends on to the graph.
    pub fn build_forward(&mut self, t: Tensor<'a>) {
        // SAFETY: graph and tensor belong to contexts alive for 'a.
        unsafe { sys::ggml_build_forward_expand(self.raw(), t.raw()) }
    }

    /// Whether any node of the graph is a trainable parameter.
    pub fn has_param(&self) -> bool {
        (0..self.n_nodes()).any(|i| {
            // SAFETY: i < n_nodes; nodes are valid tensors of this graph.
            let node = unsafe { sys::ggml_graph_node(self.raw(), i as i32) };
            // SAFETY: node is valid.
            let flags = unsafe { (*node).flags };
            flags & sys::GGML_TENSOR_FLAG_PARAM as i32 != 0
        })
    }

    /// A tensor of the graph by name.
    pub fn get_tensor(&self, name: &str) -> Option<Tensor<'a>> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid graph; returns null when absent.
        let p = unsafe { sys::ggml_graph_get_tensor(self.raw(), c.as_ptr()) };
        NonNull::new(p).map(|ptr| Tensor { ptr, _ctx: PhantomData })
    }

    /// Number of nodes.
    pub fn n_nodes(&self) -> usize {
        // SAFETY: valid graph.
        unsafe { sys::ggml_graph_n_nodes(self.raw()) as usize }
    }

    /// The gradient tensor of `t`, if the backward graph made one.
    pub fn grad(&self, t: Tensor<'a>) -> Option<Tensor<'a>> {
        // SAFETY: valid graph and tensor.
        let p = unsafe { sys::ggml_graph_get_grad(self.raw(), t.raw()) };
        NonNull::new(p).map(|ptr| Tensor { ptr, _ctx: PhantomData })
    }

    /// Appends the backward pass (gradients of every param w.r.t. the loss).
    pub fn build_backward(&mut self, ctx: &'a Context) {
        // SAFETY: the graph was created with grads; ctx holds its new tensors.
        unsafe { sys::ggml_build_backward_expand(ctx.raw(), self.raw(), std::ptr::null_mut()) }
    }

    /// Replaces every `out_prod(W, transpose(dy))` — the input gradient ggml
    /// builds for `mul_mat(W, x)` — whose `W` has a pre-transposed copy
    /// `Wᵀ` (ne = [W.ne1, W.ne0], returned by `transposed`) with
    /// `mul_mat(Wᵀ, dy)`: the same product through the fast matmul kernels
    /// instead of ggml's row-by-row (and, for quantized W, dequantizing)
    /// OUT_PROD. Call after building the backward pass and before
    /// allocating. Returns the number of nodes rewritten.
    pub fn replace_weight_out_prods(&mut self, mut transposed: impl FnMut(Tensor<'a>) -> Option<Tensor<'a>>) -> usize {
        let mut n = 0;
        for i in 0..self.n_nodes() {
            // SAFETY: i < n_nodes; nodes are valid tensors of this graph.
            let node = unsafe { sys::ggml_graph_node(self.raw(), i as i32) };
            // SAFETY: node is valid; its srcs are valid or null.
            let (op, a, b) = unsafe { ((*node).op, (*node).src[0], (*node).src[1]) };
            if op != sys::GGML_OP_OUT_PROD || a.is_null() || b.is_null() {
                continue;
            }
            // SAFETY: b is a valid tensor (checked non-null).
            let (b_op, dy) = unsafe { ((*b).op, (*b).src[0]) };
            if b_op != sys::GGML_OP_TRANSPOSE || dy.is_null() {
                continue;
            }
            let w = Tensor {
                ptr: NonNull::new(a).expect("non-null"),
                _ctx: PhantomData,
            };
            let Some(wt) = transposed(w) else { continue };
            let (wne, tne) = (w.ne(), wt.ne());
            // SAFETY: dy is a valid tensor (checked non-null).
            let dyne = unsafe { (*dy).ne };
            let fits = tne[0] == wne[1] && tne[1] == wne[0] && wne[2] == 1 && wne[3] == 1 && dyne[0] == wne[1];
            if !fits {
                continue;
            }
            // SAFETY: rewriting a node of an unallocated graph; MUL_MAT takes
            // (Wᵀ, dy) and yields the same shape and type (F32) as the
            // OUT_PROD it replaces, so allocation sizes are unchanged.
            unsafe {
                (*node).op = sys::GGML_OP_MUL_MAT;
                (*node).op_params = [0; 16];
                (*node).src[0] = wt.raw();
                (*node).src[1] = dy;
            }
            n += 1;
        }
        n
    }

    /// Runs the products ggml's CPU kernels are slow at — every remaining
    /// F32 OUT_PROD, F32 MUL_MATs over 32 or more tokens, and products with
    /// a plain-layout quantized weight (dequantized in bands) — as strided
    /// GEMMs in a custom op (see `gemm.rs`), with LoRA's scales and adds
    /// folded into them; on AVX2 CPUs SILU_BACK, RMS_NORM_BACK, softmax and
    /// cross-entropy run vectorized, the MULs around SwiGLU's backward and
    /// the norms fused into them (`elementwise.rs`). CPU backends only (a custom op
    /// runs on the CPU); call after the backward pass is built and
    /// rewritten, before allocating. Returns the number of nodes rewritten.
    pub fn gemm_products(&mut self) -> usize {
        // The nodes as they run (with any recomputed ones).
        let nodes = self.exec_nodes();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, before the per-node rewrites.
        let compacted =
            unsafe { super::elementwise::compact_targets(&nodes) + super::elementwise::fuse_chains(&nodes) };
        #[cfg(not(target_arch = "x86_64"))]
        let compacted = 0;
        let rewritten = compacted
            + nodes
                .iter()
                .filter(|&&node| {
                    // SAFETY: as above.
                    unsafe {
                        #[cfg(target_arch = "x86_64")]
                        if super::elementwise::rewrite(node) {
                            return true;
                        }
                        super::gemm::rewrite(node)
                    }
                })
                .count();
        let mut moves = vec![];
        // SAFETY: as above, after the rewrites.
        let folded = unsafe { super::gemm::fold(&nodes, &mut moves) };
        let g = self.exec_raw();
        // SAFETY: the array holds the graph's n_nodes valid nodes (those of
        // `nodes`); moving a node later keeps every source before its
        // reader, as `fold` guarantees of its moves.
        let order = unsafe { std::slice::from_raw_parts_mut(sys::ggml_graph_nodes(g), nodes.len()) };
        super::gemm::apply_moves(order, &moves);
        rewritten + folded
    }

    /// In a graph of bf16 products on a CPU that runs them, holds each
    /// SwiGLU's two inputs in bf16 (`held_bf16.rs`): new nodes round them
    /// right before the SwiGLU, and the backward reads the rounded values,
    /// half the memory. Call after [`Graph::gemm_products`], before
    /// allocating, with the context of the graph's tensors. Returns the
    /// number of nodes inserted.
    pub fn hold_swiglu_inputs_bf16(&mut self, ctx: &'a Context) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            let nodes = self.exec_nodes();
            let g = self.exec_raw();
            // SAFETY: valid graph.
            let room = (unsafe { sys::ggml_graph_size(g) } as usize).saturating_sub(nodes.len());
            // SAFETY: nodes are the valid nodes of this unallocated graph,
            // whose tensors ctx holds.
            let made = unsafe { super::held_bf16::swiglu_inputs(ctx.raw(), &nodes, room) };
            for &(c, _) in &made {
                // SAFETY: room was checked; c is a valid node of ctx.
                unsafe { sys::ggml_graph_add_node(g, c) };
            }
            // SAFETY: the array holds the graph's nodes, the new ones last.
            let order = unsafe { std::slice::from_raw_parts_mut(sys::ggml_graph_nodes(g), nodes.len() + made.len()) };
            for &(c, before) in &made {
                let at = |t| order.iter().position(|&n| n == t).expect("a node of the graph");
                let (from, to) = (at(c), at(before));
                order[to..=from].rotate_right(1);
            }
            made.len()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = ctx;
            0
        }
    }

    /// After allocation, for tests: fills the memory of the tensors the
    /// graph computes with NaNs (`0xFF` bytes), so that a node reading
    /// memory no node wrote shows in the results instead of reading the
    /// zeros of fresh pages. Input leaves sharing that memory must be
    /// written afterwards.
    pub fn poison_compute_buffers(&self) {
        let mut cleared = std::collections::HashSet::new();
        for node in self.exec_nodes() {
            // SAFETY: an allocated node of this graph; a computed tensor that
            // is not a view lives in a compute buffer of the scheduler's
            // (never a weights' buffer), valid while the graph is.
            unsafe {
                let b = (*node).buffer;
                if (*node).view_src.is_null() && !b.is_null() && cleared.insert(b as usize) {
                    sys::ggml_backend_buffer_clear(b, 0xFF);
                }
            }
        }
    }

    /// Zeroes gradients and sets the loss gradient to 1 (after allocation).
    pub fn reset(&mut self) {
        // SAFETY: valid, allocated graph with grads.
        unsafe { sys::ggml_graph_reset(self.raw()) }
    }
}
