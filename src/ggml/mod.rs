//! The only place with `unsafe`: a safe layer over ggml, gguf and the parts
//! of llama.cpp we call (tokenizer, reference logits).
//!
//! One Rust type per C handle, freed in `Drop`; tensors and graphs borrow the
//! context that owns them, buffers and schedulers borrow their backend.

mod backend;
mod context;
mod dequant;
#[cfg(target_arch = "x86_64")]
mod elementwise;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_small;
#[cfg(target_arch = "x86_64")]
mod held_bf16;
pub mod llama;
#[cfg(target_arch = "x86_64")]
mod packed;
#[cfg(target_arch = "x86_64")]
mod share;
mod types;

pub use backend::{
    default_gpu, devices, Backend, Buffer, ComputeError, Device, DeviceError, DeviceKind, NodeAssignment, Sched,
    TensorStore,
};
pub use context::{Context, Graph, Tensor};
pub use types::{f32_bytes, GgmlType};

use llama_cpp_sys_2 as sys;

/// Whether this CPU runs the training products over weights marked
/// [`Tensor::set_bf16_products`] in bf16 (it has AVX512-BF16); elsewhere
/// they stay F32.
pub fn bf16_products_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return packed::bf16_supported();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Maps a file privately (copy-on-write: nothing is ever written back, and
/// pages are only read unless someone writes), so that CPU weights can point
/// straight into it.
pub fn map_file(file: &std::fs::File) -> std::io::Result<std::sync::Arc<memmap2::MmapMut>> {
    // SAFETY: a private mapping never changes the file; model files are not
    // modified while open (a concurrent writer could only change the numbers
    // we read), and every offset is bounds-checked against the length.
    unsafe { memmap2::MmapOptions::new().map_copy(file) }.map(std::sync::Arc::new)
}

/// Lets the kernel drop the resident pages of `len` bytes at `offset` of a
/// mapping made by [`map_file`] (after their contents were copied
/// elsewhere); a later read faults them in from the file again.
pub fn drop_pages(map: &memmap2::MmapMut, offset: usize, len: usize) {
    // Whole 4 KiB pages inside the range only (where pages are larger,
    // madvise refuses the range and the pages simply stay).
    let page = 4096;
    let start = offset.div_ceil(page) * page;
    let end = ((offset + len) / page) * page;
    if end <= start || end > map.len() {
        return;
    }
    // SAFETY: the mapping is private and nothing ever writes to it, so its
    // pages are clean copies of the file: MADV_DONTNEED discards them and
    // later accesses read the same bytes from the file again.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
}

/// Silences ggml's and llama.cpp's log output unless `GGUF_PEFT_LOG` is set.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("GGUF_PEFT_LOG").is_none() {
            // SAFETY: installs a static callback that ignores its arguments.
            unsafe {
                sys::ggml_log_set(Some(quiet_log), std::ptr::null_mut());
                sys::llama_log_set(Some(quiet_log), std::ptr::null_mut());
            }
        }
        // SAFETY: one-time global initialisation of llama.cpp's backends.
        unsafe { sys::llama_backend_init() };
    });
}

unsafe extern "C" fn quiet_log(
    level: sys::ggml_log_level,
    text: *const std::os::raw::c_char,
    _user: *mut std::os::raw::c_void,
) {
    if level == sys::GGML_LOG_LEVEL_ERROR && !text.is_null() {
        // SAFETY: ggml passes a NUL-terminated message.
        let s = unsafe { std::ffi::CStr::from_ptr(text) };
        eprint!("ggml: {}", s.to_string_lossy());
    }
}

/// Whether ggml's own GGUF reader accepts the file (an independent check of
/// files this crate writes).
pub fn ggml_accepts_gguf(path: &std::path::Path) -> Result<(i64, i64), String> {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: valid C string; no_alloc with no ggml context requested.
    let g = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
    if g.is_null() {
        return Err(format!("{}: gguf_init_from_file refused the file", path.display()));
    }
    // SAFETY: g is a valid gguf context, freed right after the queries.
    let r = unsafe { (sys::gguf_get_n_kv(g), sys::gguf_get_n_tensors(g)) };
    // SAFETY: freed exactly once.
    unsafe { sys::gguf_free(g) };
    Ok(r)
}
