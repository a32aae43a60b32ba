//! Backends, buffers, tensor stores and the scheduler.

use super::{Context, Graph, Tensor};
use llama_cpp_sys_2 as sys;
use std::collections::HashMap;
use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

/// Owns a `ggml_backend_t` (a device stream: CPU, CUDA, Metal, Vulkan).
pub struct Backend {
    ptr: NonNull<sys::ggml_backend>,
    /// For a device other than the CPU: the CPU backend that runs the ops
    /// the device cannot (every scheduler over this backend gets it last).
    fallback: Option<Arc<Backend>>,
}

/// What kind of compute device a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A discrete GPU.
    Gpu,
    /// A GPU sharing the host's memory.
    IntegratedGpu,
    /// An accelerator used next to the CPU (e.g. BLAS); not a compute device of its own.
    Accelerator,
}

/// A compute device that ggml's backend registry knows in this build.
#[derive(Debug, Clone)]
pub struct Device {
    /// Registry name: "CPU", "CUDA0", "Vulkan0", "Metal", ...
    pub name: String,
    /// What the driver calls it (e.g. "NVIDIA H200", "AMD EPYC").
    pub description: String,
    /// CPU, GPU, integrated GPU or accelerator.
    pub kind: DeviceKind,
    /// Device memory in bytes (total, free).
    pub memory: (usize, usize),
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no compute device named '{name}' in this build (available: {available}; GPUs need a build with --features cuda, vulkan or metal)")]
    Unknown { name: String, available: String },
    #[error("device '{0}' failed to initialise (driver problem or out of memory?)")]
    Init(String),
}

/// The compute devices of this build, in registry order.
pub fn devices() -> Vec<Device> {
    super::init_logging();
    // SAFETY: registry queries; the registry outlives the program.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n)
        .filter_map(|i| {
            // SAFETY: i < count; the device handle is owned by the registry.
            let d = unsafe { sys::ggml_backend_dev_get(i) };
            (!d.is_null()).then(|| device_info(d))
        })
        .collect()
}

fn device_info(d: sys::ggml_backend_dev_t) -> Device {
    let cstr = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: ggml returns NUL-terminated strings owned by the device.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: d is a valid registry device; the out-pointers are live locals.
    let (name, description, ty) = unsafe {
        sys::ggml_backend_dev_memory(d, &mut free, &mut total);
        (
            cstr(sys::ggml_backend_dev_name(d)),
            cstr(sys::ggml_backend_dev_description(d)),
            sys::ggml_backend_dev_type(d),
        )
    };
    let kind = match ty {
        sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
        sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
        sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
        _ => DeviceKind::Accelerator,
    };
    Device {
        name,
        description,
        kind,
        memory: (total, free),
    }
}

/// The device `auto` picks: the first discrete GPU, else the first
/// integrated one, else none (the CPU).
pub fn default_gpu() -> Option<Device> {
    let all = devices();
    let first = |k| all.iter().find(|d| d.kind == k).cloned();
    first(DeviceKind::Gpu).or_else(|| first(DeviceKind::IntegratedGpu))
}

// SAFETY: a backend handle may be used from any one thread at a time; Backend
// is not Sync, so no two threads use it concurrently.
unsafe impl Send for Backend {}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: freed exactly once; schedulers hold an Arc to it, so none is
        // alive here. Buffers do not reference the backend object.
        unsafe { sys::ggml_backend_free(self.ptr.as_ptr()) }
    }
}

impl Backend {
    /// The CPU backend with `n_threads` threads. Shared (weights, schedulers)
    /// through an `Arc` for ownership, not for use from several threads:
    /// `Backend` is deliberately not `Sync`.
    #[allow(clippy::arc_with_non_send_sync)]
    pub fn cpu(n_threads: usize) -> Arc<Self> {
        super::init_logging();
        // SAFETY: plain constructor; null only on allocation failure.
        let ptr = unsafe { sys::ggml_backend_cpu_init() };
        let b = Backend {
            ptr: NonNull::new(ptr).expect("ggml_backend_cpu_init failed"),
            fallback: None,
        };
        // SAFETY: b is a CPU backend.
        unsafe { sys::ggml_backend_cpu_set_n_threads(b.raw(), n_threads.max(1) as i32) };
        Arc::new(b)
    }

    /// Whether this backend can run node `t` as it is.
    pub fn supports(&self, t: Tensor<'_>) -> bool {
        // SAFETY: valid backend and tensor.
        unsafe { sys::ggml_backend_supports_op(self.raw(), t.raw()) }
    }

    /// Opens a compute device by registry name (case-insensitive: "cuda0",
    /// "Vulkan0", "cpu"), or "auto": the first GPU, else the CPU. A GPU gets
    /// a CPU backend with `n_threads` threads for the ops it cannot run.
    #[allow(clippy::arc_with_non_send_sync)]
    pub fn open(name: &str, n_threads: usize) -> Result<Arc<Self>, DeviceError> {
        let dev = if name.eq_ignore_ascii_case("auto") {
            match default_gpu() {
                Some(d) => d,
                None => return Ok(Self::cpu(n_threads)),
            }
        } else {
            let all = devices();
            match all.iter().find(|d| d.name.eq_ignore_ascii_case(name)) {
                Some(d) => d.clone(),
                None => {
                    return Err(DeviceError::Unknown {
                        name: name.to_owned(),
                        available: all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
                    })
                }
            }
        };
        if dev.kind == DeviceKind::Cpu {
            return Ok(Self::cpu(n_threads));
        }
        let cname = std::ffi::CString::new(dev.name.clone()).map_err(|_| DeviceError::Init(dev.name.clone()))?;
        // SAFETY: valid C string; the registry owns the device handle.
        let d = unsafe { sys::ggml_backend_dev_by_name(cname.as_ptr()) };
        if d.is_null() {
            return Err(DeviceError::Init(dev.name));
        }
        // SAFETY: d is a registry device; null params select its defaults.
        let ptr = unsafe { sys::ggml_backend_dev_init(d, std::ptr::null()) };
        Ok(Arc::new(Backend {
            ptr: NonNull::new(ptr).ok_or(DeviceError::Init(dev.name))?,
            fallback: Some(Self::cpu(n_threads)),
        }))
    }

    pub(crate) fn raw(&self) -> sys::ggml_backend_t {
        self.ptr.as_ptr()
    }

    /// The backend's name (e.g. "CPU").
    pub fn name(&self) -> String {
        // SAFETY: valid backend; the name is a static NUL-terminated string.
        unsafe { CStr::from_ptr(sys::ggml_backend_name(self.raw())) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether this is the CPU backend.
    pub fn is_cpu(&self) -> bool {
        // SAFETY: valid backend.
        unsafe { sys::ggml_backend_is_cpu(self.raw()) }
    }

    /// Makes every tensor of `ctx` point into `host` at the given byte
    /// offsets (one per tensor, in creation order) without copying: CPU
    /// weights straight from the mapped file, as llama.cpp does. `None` on
    /// other backends or when a tensor would not fit.
    pub fn store_over_host(&self, ctx: Context, host: Arc<memmap2::MmapMut>, offsets: &[usize]) -> Option<TensorStore> {
        let tensors = ctx.tensors();
        if !self.is_cpu() || tensors.len() != offsets.len() {
            return None;
        }
        if tensors.iter().zip(offsets).any(|(t, &o)| o + t.n_bytes() > host.len()) {
            return None;
        }
        let base = host.as_ptr() as *mut std::os::raw::c_void;
        // SAFETY: the buffer wraps the mapping, which the store keeps alive
        // (Arc) for as long as the buffer exists; it does not own the memory.
        let p = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(base, host.len()) };
        let buf = Buffer { ptr: NonNull::new(p)? };
        for (t, &o) in tensors.iter().zip(offsets) {
            // SAFETY: o + n_bytes <= len (checked above), so the tensor lies
            // inside the buffer; the tensor has no data yet.
            let st = unsafe {
                sys::ggml_backend_tensor_alloc(buf.ptr.as_ptr(), t.raw(), (base as *mut u8).add(o) as *mut _)
            };
            if st != sys::GGML_STATUS_SUCCESS {
                return None;
            }
        }
        drop(tensors);
        Some(TensorStore::indexed(ctx, Some(buf), Some(host)))
    }

    /// On the CPU: allocates `ctx`'s tensors (2-D weights) in ggml's
    /// repacking buffer type (CPU_REPACK), which stores them interleaved for
    /// faster matmul kernels (on x86 with AVX2: Q4_0, Q4_K, IQ4_NL). Such
    /// tensors may only be the weight of a MUL_MAT and cannot be read back.
    /// `None` unless this CPU repacks every one of them (ggml would crash
    /// writing one it does not).
    pub fn alloc_store_repacked(&self, ctx: Context) -> Option<TensorStore> {
        if !self.is_cpu() {
            return None;
        }
        let name = std::ffi::CString::new("ggml_backend_dev_get_extra_bufts").expect("no NUL");
        // SAFETY: registry queries with a valid C string; the function
        // pointer, when present, has the documented signature.
        let buft = unsafe {
            let reg = sys::ggml_backend_cpu_reg();
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if f.is_null() {
                return None;
            }
            let f: unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t =
                std::mem::transmute(f);
            let list = f(sys::ggml_backend_get_device(self.raw()));
            if list.is_null() {
                return None;
            }
            // The list is NULL-terminated; CPU_REPACK is the one we want.
            let mut i = 0;
            loop {
                let b = *list.add(i);
                if b.is_null() {
                    break None;
                }
                if CStr::from_ptr(sys::ggml_backend_buft_name(b)).to_bytes() == b"CPU_REPACK" {
                    break Some(b);
                }
                i += 1;
            }
        }?;
        // SAFETY: ctx is a no_alloc context whose tensors have no data yet.
        let p = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.raw(), buft) };
        let buf = Buffer { ptr: NonNull::new(p)? };
        // Ask the CPU backend whether it would run `mul_mat(t, x)` with each
        // tensor where it now lies (it checks that a repacked layout exists).
        let tensors = ctx.tensors();
        let probe = Context::new(tensors.len() * 2 + 1, 0, false);
        for t in tensors {
            let x = probe.new_tensor(super::GgmlType::F32, &[t.ne()[0], 1]);
            if t.ne()[2] != 1 || t.ne()[3] != 1 || !self.supports(probe.mul_mat(t, x)) {
                return None;
            }
        }
        Some(TensorStore::indexed(ctx, Some(buf), None))
    }

    /// Allocates every tensor of `ctx` in one buffer of this backend and
    /// returns both as a store whose tensors can be looked up by name.
    /// Fails when the device is out of memory.
    pub fn alloc_store(&self, ctx: Context) -> Result<TensorStore, ComputeError> {
        let tensors = ctx.tensors();
        // SAFETY: ctx is a no_alloc context whose tensors have no data yet;
        // returns null when the context has no tensors or allocation fails.
        let p = unsafe { sys::ggml_backend_alloc_ctx_tensors(ctx.raw(), self.raw()) };
        let buf = NonNull::new(p).map(|ptr| Buffer { ptr });
        if buf.is_none() && !tensors.is_empty() {
            return Err(ComputeError::OutOfMemory {
                bytes: tensors.iter().map(|t| t.n_bytes()).sum(),
                device: self.name(),
            });
        }
        drop(tensors);
        Ok(TensorStore::indexed(ctx, buf, None))
    }
}

/// Owns a backend buffer. Buffers reference their buffer type, not the
/// backend object, so they need no lifetime.
pub struct Buffer {
    ptr: NonNull<sys::ggml_backend_buffer>,
}

// SAFETY: a buffer is plain device memory; access goes through &self methods
// that ggml synchronises per call.
unsafe impl Send for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: freed exactly once.
        unsafe { sys::ggml_backend_buffer_free(self.ptr.as_ptr()) }
    }
}

impl Buffer {
    /// Size in bytes.
    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr.as_ptr()) }
    }
}

/// A context together with the buffer holding its tensors' data; tensors
/// handed out borrow the store, so their data cannot be freed under them.
pub struct TensorStore {
    buf: Option<Buffer>,
    ctx: Context,
    names: HashMap<String, usize>,
    /// The context's tensors in creation order (looked up on every graph build).
    ptrs: Vec<NonNull<sys::ggml_tensor>>,
    /// Host memory the tensors point into, kept alive with them.
    _host: Option<Arc<memmap2::MmapMut>>,
    /// Tensors of the same names held elsewhere (e.g. repacked copies),
    /// which [`TensorStore::get`] hands out instead.
    overlay: Option<Box<TensorStore>>,
}

// SAFETY: the pointers point into `ctx`, which the store owns and moves with
// it; Context and Buffer are Send.
unsafe impl Send for TensorStore {}

impl TensorStore {
    /// A store over `ctx`, whose tensors `buf` (or `host`) now holds,
    /// indexed by name.
    fn indexed(ctx: Context, buf: Option<Buffer>, host: Option<Arc<memmap2::MmapMut>>) -> Self {
        let mut names = HashMap::new();
        let mut ptrs = Vec::new();
        for (i, t) in ctx.tensors().into_iter().enumerate() {
            names.insert(t.name(), i);
            ptrs.push(NonNull::new(t.raw()).expect("non-null tensor"));
        }
        TensorStore {
            buf,
            ctx,
            names,
            ptrs,
            _host: host,
            overlay: None,
        }
    }

    /// The tensor with this name (the overlay's, where it has one).
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        if let Some(t) = self.overlay.as_ref().and_then(|o| o.get(name)) {
            return Some(t);
        }
        let &i = self.names.get(name)?;
        Some(Tensor::from_raw(self.ptrs[i]))
    }

    /// Every tensor of the store itself, in creation order (names and
    /// shapes; an overlay's tensors have the same).
    pub fn tensors(&self) -> Vec<Tensor<'_>> {
        self.ctx.tensors()
    }

    /// Bytes of device memory held (overlay included).
    pub fn size(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.size()) + self.overlay.as_ref().map_or(0, |o| o.size())
    }

    /// Hands out `other`'s tensors instead of this store's of the same
    /// names from now on (this store's stay allocated and unused).
    pub fn set_overlay(&mut self, other: TensorStore) {
        self.overlay = Some(Box::new(other));
    }
}

/// The hook [`Sched::compute_paused`] calls (once).
type PauseHook<'h, E> = Option<Box<dyn FnOnce(&mut Sched) -> Result<(), E> + 'h>>;

/// Owns a `ggml_backend_sched`: allocates graphs and runs them over one or
/// more backends (the first preferred, the last the CPU).
pub struct Sched {
    ptr: NonNull<sys::ggml_backend_sched>,
    backends: Vec<Arc<Backend>>,
    graph_size: usize,
    /// A second scheduler over the same backends, for graphs run while
    /// this one's computation is paused ([`Sched::compute_paused`]); made
    /// on first use and kept, with its buffers, for the next step.
    side: Option<Box<Sched>>,
}

impl Drop for Sched {
    fn drop(&mut self) {
        // SAFETY: freed exactly once, before the backends it holds.
        unsafe { sys::ggml_backend_sched_free(self.ptr.as_ptr()) }
    }
}

/// Nodes of the graph the scheduler runs.
fn exec_nodes(g: &Graph<'_>) -> usize {
    // SAFETY: valid graph.
    unsafe { sys::ggml_graph_n_nodes(g.exec_raw()) as usize }
}

/// Where the scheduler placed one graph node ([`Sched::assignments`]).
#[derive(Debug, Clone)]
pub struct NodeAssignment {
    /// Op, e.g. "MUL_MAT".
    pub op: String,
    /// The node's own name.
    pub name: String,
    /// Its sources' names (weights keep their GGUF names).
    pub sources: Vec<String>,
    /// Name of the backend that runs it ("CPU", "Vulkan0", ...).
    pub backend: String,
}

/// Why a graph could not run.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("could not allocate compute buffers for a graph of {0} nodes (out of memory?)")]
    Alloc(usize),
    #[error("graph computation failed with ggml status {0}")]
    Status(i32),
    #[error("no backend can run {0}")]
    Unsupported(String),
    #[error("the graph never computed {0}, where it was to pause")]
    NotPaused(String),
    #[error("could not allocate {} MiB on {device} (out of device memory? try --device cpu, or --backward transposed-q4 for smaller copies)", .bytes / (1 << 20))]
    OutOfMemory { bytes: usize, device: String },
}

impl Sched {
    /// A scheduler over `backends` for graphs of up to `graph_size` nodes.
    /// Devices' CPU fallbacks are appended (ggml wants the CPU last).
    pub fn new(backends: &[Arc<Backend>], graph_size: usize) -> Self {
        let mut backends = backends.to_vec();
        for f in backends.clone().iter().filter_map(|b| b.fallback.clone()) {
            if !backends.iter().any(|b| Arc::ptr_eq(b, &f)) {
                backends.push(f);
            }
        }
        let mut raw: Vec<sys::ggml_backend_t> = backends.iter().map(|b| b.raw()).collect();
        // SAFETY: raw holds valid backends kept alive by the Arcs stored in the
        // scheduler; null bufts selects each backend's default buffer type.
        let p = unsafe {
            sys::ggml_backend_sched_new(
                raw.as_mut_ptr(),
                std::ptr::null_mut(),
                raw.len() as i32,
                graph_size,
                false,
                false,
            )
        };
        Sched {
            ptr: NonNull::new(p).expect("ggml_backend_sched_new failed"),
            backends,
            graph_size,
            side: None,
        }
    }

    /// Allocates the graph's tensors (inputs can be written after this).
    /// Fails (instead of letting ggml abort) when some node can run on none
    /// of the scheduler's backends.
    pub fn alloc(&mut self, g: &Graph<'_>) -> Result<(), ComputeError> {
        for i in 0..exec_nodes(g) {
            // SAFETY: i < n_nodes; nodes are valid tensors of the graph.
            let node = unsafe { sys::ggml_graph_node(g.exec_raw(), i as i32) };
            // SAFETY: valid backends and node.
            let ok = self
                .backends
                .iter()
                .any(|b| unsafe { sys::ggml_backend_supports_op(b.raw(), node) });
            if !ok {
                // SAFETY: valid node; ggml returns static strings.
                let (op, ty) = unsafe {
                    let src = (*node).src[0];
                    let ty = if src.is_null() { (*node).type_ } else { (*src).type_ };
                    (
                        super::context::op_desc(node),
                        CStr::from_ptr(sys::ggml_type_name(ty)).to_string_lossy().into_owned(),
                    )
                };
                return Err(ComputeError::Unsupported(format!("{op} on {ty} tensors")));
            }
        }
        // SAFETY: valid scheduler and graph; reset frees the previous allocation.
        unsafe { sys::ggml_backend_sched_reset(self.ptr.as_ptr()) };
        // SAFETY: as above.
        if unsafe { sys::ggml_backend_sched_alloc_graph(self.ptr.as_ptr(), g.exec_raw()) } {
            Ok(())
        } else {
            Err(ComputeError::Alloc(g.n_nodes()))
        }
    }

    /// After [`Sched::alloc`]: the bytes of the compute buffers the graph's
    /// tensors were placed in, over all backends (what ggml's allocator
    /// needed at its peak).
    pub fn compute_buffer_bytes(&self) -> usize {
        self.backends
            .iter()
            // SAFETY: valid scheduler and backends of it.
            .map(|b| unsafe { sys::ggml_backend_sched_get_buffer_size(self.ptr.as_ptr(), b.raw()) })
            .sum()
    }

    /// After [`Sched::alloc`]: where the scheduler put each node of `g`
    /// (to check that nothing expected on a device falls back to the CPU).
    pub fn assignments(&self, g: &Graph<'_>) -> Vec<NodeAssignment> {
        let name_of = |t: *const sys::ggml_tensor| {
            // SAFETY: t is a valid tensor of the graph; its name is a
            // NUL-terminated array inside the tensor.
            unsafe { CStr::from_ptr((*t).name.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        (0..exec_nodes(g))
            .map(|i| {
                // SAFETY: i < n_nodes; nodes are valid tensors of the graph.
                let node = unsafe { sys::ggml_graph_node(g.exec_raw(), i as i32) };
                // SAFETY: valid scheduler and node of a graph it allocated.
                let b = unsafe { sys::ggml_backend_sched_get_tensor_backend(self.ptr.as_ptr(), node) };
                let backend = self
                    .backends
                    .iter()
                    .find(|x| x.raw() == b)
                    .map_or_else(String::new, |x| x.name());
                // SAFETY: valid node; ggml returns a static op name; sources are valid or null.
                let (op, sources) = unsafe {
                    (
                        super::context::op_desc(node),
                        (*node)
                            .src
                            .iter()
                            .filter(|s| !s.is_null())
                            .map(|&s| name_of(s))
                            .collect(),
                    )
                };
                NodeAssignment {
                    op,
                    name: name_of(node),
                    sources,
                    backend,
                }
            })
            .collect()
    }

    /// Runs an allocated graph node by node and returns the time spent per
    /// op kind (`MUL_MAT`, `OUT_PROD`, ...; with `shapes`, per op and input
    /// shapes, `nc` marking non-contiguous inputs), largest first: a
    /// profiler for benchmarks (slower than [`Sched::compute`]).
    pub fn compute_profiled(&mut self, g: &Graph<'_>, shapes: bool) -> Result<Vec<(String, f64, usize)>, ComputeError> {
        self.watched::<ComputeError>(g, Some(shapes), None)
    }

    /// Runs an allocated graph, pausing once node `at` is computed to call
    /// `hook` with a second scheduler over the same backends (e.g. to run
    /// another graph whose results the rest of this one reads: `hook` may
    /// read `at` and write this graph's inputs). With `profile` (whether
    /// per shapes), returns the op profile of [`Sched::compute_profiled`],
    /// the hook's time under `label`.
    pub fn compute_paused<E: From<ComputeError>>(
        &mut self,
        g: &Graph<'_>,
        at: Tensor<'_>,
        profile: Option<bool>,
        label: &str,
        hook: impl FnOnce(&mut Sched) -> Result<(), E>,
    ) -> Result<Vec<(String, f64, usize)>, E> {
        let mut hook: PauseHook<'_, E> = Some(Box::new(hook));
        self.watched(g, profile, Some((at.raw(), label, &mut hook)))
    }

    /// Computes `g` under ggml's evaluation callback: timing every node
    /// (`profile`), and/or pausing after one node for a hook.
    #[allow(clippy::type_complexity)]
    fn watched<'h, E: From<ComputeError>>(
        &mut self,
        g: &Graph<'_>,
        profile: Option<bool>,
        pause: Option<(*mut sys::ggml_tensor, &str, &mut PauseHook<'h, E>)>,
    ) -> Result<Vec<(String, f64, usize)>, E> {
        struct Watch<'w, 'h, E> {
            last: std::time::Instant,
            profile: Option<bool>,
            by_op: HashMap<String, (f64, usize)>,
            pause: Option<(*mut sys::ggml_tensor, &'w str, &'w mut PauseHook<'h, E>)>,
            side: &'w mut Sched,
            failed: Option<E>,
            /// A panic of the hook, resumed once ggml has returned (it
            /// cannot unwind through ggml's C frames).
            panicked: Option<Box<dyn std::any::Any + Send>>,
        }
        impl<E> Watch<'_, '_, E> {
            /// Adds the time since the last lap to `name`'s.
            fn lap(&mut self, name: String) {
                let now = std::time::Instant::now();
                let e = self.by_op.entry(name).or_default();
                e.0 += (now - self.last).as_secs_f64();
                e.1 += 1;
                self.last = now;
            }
        }
        fn shape(x: *mut sys::ggml_tensor) -> String {
            if x.is_null() {
                return String::new();
            }
            // SAFETY: x is a valid source tensor of the node being profiled.
            let (ne, cont) = unsafe { ((*x).ne, sys::ggml_is_contiguous(x)) };
            format!(" {ne:?}{}", if cont { "" } else { "nc" })
        }
        unsafe extern "C" fn cb<E>(t: *mut sys::ggml_tensor, ask: bool, user: *mut std::os::raw::c_void) -> bool {
            // SAFETY: user is the &mut Watch passed below, alive for the
            // compute call; t is the node asked about or just computed.
            let w = unsafe { &mut *(user as *mut Watch<'_, '_, E>) };
            let paused_here = w.pause.as_ref().is_some_and(|p| p.0 == t);
            if ask {
                return w.profile.is_some() || paused_here;
            }
            if let Some(shapes) = w.profile {
                // SAFETY: t is the valid node being profiled.
                let mut name = unsafe { super::context::op_desc(t) };
                if shapes {
                    // SAFETY: t is a valid node; its sources are valid or null.
                    let (a, b) = unsafe { ((*t).src[0], (*t).src[1]) };
                    name = format!("{name}{}{}", shape(a), shape(b));
                }
                w.lap(name);
            }
            if paused_here {
                let (_, label, hook) = w.pause.take().expect("checked");
                let side = &mut *w.side;
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook.take().map_or(Ok(()), |h| h(side))));
                w.lap(label.to_string());
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        w.failed = Some(e);
                        return false;
                    }
                    Err(p) => {
                        w.panicked = Some(p);
                        return false;
                    }
                }
            }
            true
        }
        let (backends, size) = (self.backends.clone(), self.graph_size);
        let mut side = self
            .side
            .take()
            .unwrap_or_else(|| Box::new(Sched::new(&backends, size)));
        let mut watch = Watch {
            last: std::time::Instant::now(),
            profile,
            by_op: Default::default(),
            pause,
            side: &mut side,
            failed: None,
            panicked: None,
        };
        // SAFETY: the callback and its data live until the compute returns;
        // the callback is removed right after.
        unsafe {
            sys::ggml_backend_sched_set_eval_callback(
                self.ptr.as_ptr(),
                Some(cb::<E>),
                &mut watch as *mut Watch<'_, '_, E> as *mut _,
            )
        };
        let r = self.compute(g);
        // SAFETY: clears the callback set above.
        unsafe { sys::ggml_backend_sched_set_eval_callback(self.ptr.as_ptr(), None, std::ptr::null_mut()) };
        let (failed, missed, by_op) = (watch.failed, watch.pause.map(|p| p.0), watch.by_op);
        let panicked = watch.panicked;
        self.side = Some(side);
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        r?;
        if let Some(t) = missed {
            // SAFETY: t is a valid tensor; its name a NUL-terminated array.
            let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(ComputeError::NotPaused(name).into());
        }
        let mut v: Vec<(String, f64, usize)> = by_op.into_iter().map(|(k, (t, n))| (k, t, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// Runs an allocated graph to completion.
    pub fn compute(&mut self, g: &Graph<'_>) -> Result<(), ComputeError> {
        // SAFETY: the graph was allocated by this scheduler and its inputs set.
        let st = unsafe { sys::ggml_backend_sched_graph_compute(self.ptr.as_ptr(), g.exec_raw()) };
        if st == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(ComputeError::Status(st))
        }
    }
}
