//! llama.cpp in-process: the tokenizer (vocab-only load) and the reference
//! forward pass used as the oracle in tests and checks.

use llama_cpp_sys_2 as sys;
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;

/// Owns a `llama_model` (full weights, or vocabulary only).
pub struct LlamaModel {
    ptr: NonNull<sys::llama_model>,
}

// SAFETY: a loaded llama_model is immutable and llama.cpp allows sharing it
// between contexts on different threads.
unsafe impl Send for LlamaModel {}
// SAFETY: as above, all &self methods only read the model.
unsafe impl Sync for LlamaModel {}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: freed once, after every context and adapter that borrows it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.to_string_lossy().as_bytes()).map_err(|_| format!("{}: path contains a NUL byte", path.display()))
}

impl LlamaModel {
    /// Loads a GGUF model with llama.cpp on the CPU; `vocab_only` skips weights.
    /// CPU "extra" buffer types (the Q4_0 repack) are off: their kernels round
    /// activations differently (measured: up to 1e-2 relative on Q4_0 logits),
    /// and the plain kernels are the ones our graph uses.
    pub fn load(path: &Path, vocab_only: bool) -> Result<Self, String> {
        super::init_logging();
        let c = c_path(path)?;
        // SAFETY: default params are plain data.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.vocab_only = vocab_only;
        params.n_gpu_layers = 0;
        params.use_extra_bufts = false;
        // SAFETY: valid path string and params; null on failure.
        let p = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        NonNull::new(p)
            .map(|ptr| LlamaModel { ptr })
            .ok_or_else(|| format!("{}: llama.cpp could not load this model", path.display()))
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: valid model; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    /// Tokenizes `text`; `add_special` adds BOS/EOS as the model asks,
    /// `parse_special` turns special-token text into special tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        let mut out = vec![0i32; text.len() + 8];
        loop {
            // SAFETY: text pointer/length describe a valid buffer; out has
            // out.len() slots; a negative result is the needed size.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const _,
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return out;
            }
            out.resize((-n) as usize, 0);
        }
    }

    /// The text piece of one token (special tokens rendered when `special`).
    pub fn token_to_piece(&self, token: i32, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf has buf.len() bytes; a negative result is the needed size.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut _,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// The token's text as stored in the vocabulary.
    pub fn token_text(&self, token: i32) -> String {
        // SAFETY: valid vocab; token range is checked by the caller's use of
        // n_vocab, and llama.cpp returns a NUL-terminated string it owns.
        let p = unsafe { sys::llama_vocab_get_text(self.vocab(), token) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null NUL-terminated string owned by the vocab.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// BOS token, if any.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: valid vocab.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    /// EOS token, if any.
    pub fn eos(&self) -> Option<i32> {
        // SAFETY: valid vocab.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    /// Whether the model wants BOS added when tokenizing.
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    /// Whether generation should stop at this token (EOS, EOT, ...).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// A context for decoding with this model (F32 KV cache, no flash
    /// attention, so its logits are a tight reference for ours).
    pub fn context(&self, n_ctx: u32, n_threads: usize) -> Result<LlamaContext<'_>, String> {
        // SAFETY: default params are plain data.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = n_ctx;
        p.n_batch = n_ctx;
        p.n_ubatch = n_ctx;
        p.n_seq_max = 1;
        p.n_threads = n_threads as i32;
        p.n_threads_batch = n_threads as i32;
        p.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        p.type_k = sys::GGML_TYPE_F32;
        p.type_v = sys::GGML_TYPE_F32;
        p.no_perf = true;
        // SAFETY: valid model and params; null on failure.
        let c = unsafe { sys::llama_init_from_model(self.ptr.as_ptr(), p) };
        NonNull::new(c)
            .map(|ptr| LlamaContext {
                ptr,
                n_vocab: self.n_vocab(),
                _m: PhantomData,
            })
            .ok_or_else(|| "llama.cpp could not create a context".to_string())
    }

    /// Loads a llama.cpp LoRA adapter for this model.
    pub fn load_adapter(&self, path: &Path) -> Result<LlamaAdapter<'_>, String> {
        let c = c_path(path)?;
        // SAFETY: valid model and path; null on failure.
        let p = unsafe { sys::llama_adapter_lora_init(self.ptr.as_ptr(), c.as_ptr()) };
        NonNull::new(p)
            .map(|ptr| LlamaAdapter { ptr, _m: PhantomData })
            .ok_or_else(|| format!("{}: llama.cpp refused this LoRA adapter", path.display()))
    }
}

/// Owns a `llama_adapter_lora`; it cannot outlive its model.
pub struct LlamaAdapter<'m> {
    ptr: NonNull<sys::llama_adapter_lora>,
    _m: PhantomData<&'m LlamaModel>,
}

impl Drop for LlamaAdapter<'_> {
    fn drop(&mut self) {
        // SAFETY: freed once; contexts that use it are dropped first (they
        // borrow the model, which the adapter outlives only within 'm).
        unsafe { sys::llama_adapter_lora_free(self.ptr.as_ptr()) }
    }
}

/// Owns a `llama_context`; it cannot outlive its model.
pub struct LlamaContext<'m> {
    ptr: NonNull<sys::llama_context>,
    n_vocab: usize,
    _m: PhantomData<&'m LlamaModel>,
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: freed exactly once.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

impl<'m> LlamaContext<'m> {
    /// Applies LoRA adapters with their scales (replacing earlier ones).
    pub fn set_adapters(&mut self, adapters: &[(&'m LlamaAdapter<'m>, f32)]) -> Result<(), String> {
        let mut ptrs: Vec<*mut sys::llama_adapter_lora> = adapters.iter().map(|(a, _)| a.ptr.as_ptr()).collect();
        let mut scales: Vec<f32> = adapters.iter().map(|(_, s)| *s).collect();
        // SAFETY: arrays of equal length with valid adapters of this context's model.
        let r = unsafe {
            sys::llama_set_adapters_lora(self.ptr.as_ptr(), ptrs.as_mut_ptr(), ptrs.len(), scales.as_mut_ptr())
        };
        if r == 0 {
            Ok(())
        } else {
            Err(format!("llama_set_adapters_lora failed ({r})"))
        }
    }

    /// Clears the KV cache.
    pub fn clear(&mut self) {
        // SAFETY: valid context; its memory handle lives as long as it does.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Decodes input embeddings (`n_embd` values per row, rows at positions
    /// `start..` of sequence 0) through `llama_batch.embd`, as a runtime
    /// feeds a soft prompt; no logits are kept.
    pub fn decode_embd(&mut self, embd: &[f32], n_embd: usize, start: i32) -> Result<(), String> {
        let n = embd.len() / n_embd;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: batch_init with embd > 0 allocates n * n_embd floats for
        // the embeddings and arrays for n rows with one seq id each; we fill
        // exactly that and free the batch below.
        let mut batch = unsafe { sys::llama_batch_init(n as i32, n_embd as i32, 1) };
        // SAFETY: all arrays have n entries, embd has n * n_embd floats.
        unsafe {
            std::ptr::copy_nonoverlapping(embd.as_ptr(), batch.embd, n * n_embd);
            for i in 0..n {
                *batch.pos.add(i) = start + i as i32;
                *batch.n_seq_id.add(i) = 1;
                **batch.seq_id.add(i) = 0;
                *batch.logits.add(i) = 0;
            }
        }
        batch.n_tokens = n as i32;
        // SAFETY: valid context and filled batch.
        let r = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch) };
        // SAFETY: batch from llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(batch) };
        if r != 0 {
            return Err(format!("llama_decode of embeddings failed ({r})"));
        }
        Ok(())
    }

    /// Decodes `tokens` at positions `start..` of sequence 0 and returns the
    /// logits of every position (`tokens.len()` rows of n_vocab).
    pub fn decode(&mut self, tokens: &[i32], start: i32) -> Result<Vec<Vec<f32>>, String> {
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: batch_init allocates arrays for n tokens with one seq id each;
        // we fill exactly n entries and free the batch below.
        let mut batch = unsafe { sys::llama_batch_init(n as i32, 0, 1) };
        // SAFETY: all arrays have n entries (see above).
        unsafe {
            for (i, &t) in tokens.iter().enumerate() {
                *batch.token.add(i) = t;
                *batch.pos.add(i) = start + i as i32;
                *batch.n_seq_id.add(i) = 1;
                **batch.seq_id.add(i) = 0;
                *batch.logits.add(i) = 1;
            }
        }
        batch.n_tokens = n as i32;
        // SAFETY: valid context and filled batch.
        let r = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch) };
        let out = if r != 0 {
            Err(format!("llama_decode failed ({r})"))
        } else {
            let mut rows = Vec::with_capacity(n);
            for i in 0..n {
                // SAFETY: logits were requested for every position; each row
                // has n_vocab floats owned by the context.
                let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
                if p.is_null() {
                    rows.clear();
                    break;
                }
                // SAFETY: as above.
                rows.push(unsafe { std::slice::from_raw_parts(p, self.n_vocab) }.to_vec());
            }
            if rows.len() == n {
                Ok(rows)
            } else {
                Err("llama.cpp returned no logits".to_string())
            }
        };
        // SAFETY: batch from llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(batch) };
        out
    }
}
