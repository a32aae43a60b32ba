//! Models: hyperparameters, frozen weights in their original GGUF types on a
//! ggml backend, and the forward graph (one file per architecture).

pub mod arch;
pub mod graph;
pub mod hooks;
mod hparams;
pub mod synthetic;

pub use graph::{Batch, Forward, KvCache};
pub use hooks::{Hooks, NoHooks, Site, TensorKind};
pub use hparams::Hparams;

use crate::ggml::{Backend, ComputeError, Context, GgmlType, Graph, Sched, Tensor, TensorStore};
use crate::gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of the model layer; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: tensor '{name}' has shape {found}, expected {expected} (maybe wrong base model?)")]
    Shape {
        path: PathBuf,
        name: String,
        found: String,
        expected: String,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// How frozen weights are held for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightLayout {
    /// The file's own types and bytes (what llama.cpp runs).
    Native,
    /// Every matrix dequantized once to F32 at load: exact values, faster
    /// forward and backward on CPU, 4 bytes per weight.
    F32,
    /// As `Native`, with the CPU's training products over the weights
    /// taking bf16 operands (the weight's values and the activations or
    /// their gradients rounded to 8 bits of mantissa, sums in F32, as
    /// torch's bf16 autocast or QLoRA's `bnb_4bit_compute_dtype`), and
    /// attention's products in training graphs likewise: twice the
    /// products' speed on CPUs with AVX512-BF16, the same as `Native`
    /// elsewhere.
    Bf16,
}

/// A loaded model: GGUF metadata, hyperparameters and the frozen weights on
/// a backend, each tensor in the type the file stores it in (or F32).
pub struct Model {
    pub file: GgufFile,
    pub hparams: Hparams,
    pub arch: &'static dyn Architecture,
    weights: TensorStore,
    /// Transposed copies `<name>.T` of the matrices, for the backward pass.
    transposed: Option<TensorStore>,
    /// Whether the transposed copies sit in the CPU's repacking buffer.
    transposed_repacked: bool,
    /// Let [`Model::prepare_transposed`] and [`Model::repack_weights`] use
    /// the CPU's repacking buffer (default on).
    pub repack: bool,
    /// On the CPU, run the F32 products of training graphs and their
    /// products with quantized weights (dequantized in bands), and the F32
    /// products of forward graphs over unquantized weights, as strided
    /// GEMMs (default on; off leaves ggml's kernels, e.g. to compare).
    pub gemm_products: bool,
    /// Matrices [`Model::repack_weights`] moved into the repacking buffer.
    weights_repacked: usize,
    /// Answers of [`Model::cpu_repacks`] per (type, row length, rows).
    repack_probes: std::sync::Mutex<std::collections::HashMap<(GgmlType, i64, i64), bool>>,
    /// Last, so that the buffers above are freed before the device.
    backend: Arc<Backend>,
}

pub use arch::Architecture;

/// Maximum graph size; a transformer block takes well under 100 nodes.
fn graph_size(hp: &Hparams) -> usize {
    (hp.n_layer * 120 + 256).max(2048)
}

impl Model {
    /// Opens a GGUF model and loads its weights onto `backend` in their own types.
    pub fn load(path: impl AsRef<Path>, backend: Arc<Backend>) -> Result<Self, ModelError> {
        Self::load_with(path, backend, WeightLayout::Native)
    }

    /// Opens a GGUF model and loads its weights onto `backend` in `layout`.
    pub fn load_with(path: impl AsRef<Path>, backend: Arc<Backend>, layout: WeightLayout) -> Result<Self, ModelError> {
        let file = GgufFile::open(path.as_ref())?;
        let path = file.path().to_owned();
        let arch_name = file.get_str("general.architecture")?.to_owned();
        let arch = arch::find(&arch_name).ok_or_else(|| ModelError::UnsupportedArch {
            path: path.clone(),
            arch: arch_name.clone(),
            supported: arch::names().join(", "),
        })?;
        let hparams = Hparams::from_gguf(&file, &arch_name)?;
        let decls = arch.tensors(&hparams);
        let mut present = Vec::new();
        for d in &decls {
            match file.tensor(&d.name) {
                Some(t) => {
                    if t.ne != d.ne {
                        return Err(ModelError::Shape {
                            path,
                            name: d.name.clone(),
                            found: t.shape_str(),
                            expected: format!("{:?}", d.ne),
                        });
                    }
                    if !t.ty.can_dequantize() {
                        return Err(ModelError::Invalid {
                            path,
                            msg: format!(
                                "tensor '{}' has type {} that ggml cannot compute with here",
                                t.name, t.ty
                            ),
                        });
                    }
                    present.push(t.clone());
                }
                None if d.required => {
                    return Err(ModelError::Invalid {
                        path,
                        msg: format!(
                            "missing tensor '{}' for architecture '{}' (incomplete or wrong file?)",
                            d.name, arch_name
                        ),
                    })
                }
                None => {}
            }
        }
        let ctx = Context::new(present.len() + 1, 0, false);
        let ty_of = |t: &crate::gguf::TensorInfo| match layout {
            WeightLayout::Native | WeightLayout::Bf16 => t.ty,
            WeightLayout::F32 => GgmlType::F32,
        };
        for t in &present {
            let ne: Vec<i64> = t.ne.iter().map(|&n| n as i64).collect();
            ctx.new_tensor(ty_of(t), &ne).set_name(&t.name);
        }
        let weights = if layout != WeightLayout::F32 && backend.is_cpu() {
            // Zero-copy: the CPU weights are the mapped file's pages.
            let offsets: Vec<usize> = present.iter().map(|t| file.mapping(t).1).collect();
            let host = file.mapping(&present[0]).0;
            // Only fails on a malformed layout, which open() already refused.
            backend
                .store_over_host(ctx, host, &offsets)
                .expect("tensor offsets were validated at open")
        } else {
            let weights = backend.alloc_store(ctx).map_err(|e| ModelError::Invalid {
                path: path.clone(),
                msg: format!("loading the weights: {e}"),
            })?;
            for t in &present {
                let dst = weights.get(&t.name).expect("just created");
                if ty_of(t) == t.ty {
                    dst.write_bytes(file.tensor_data(t));
                } else {
                    dst.write_f32(&t.ty.to_f32(file.tensor_data(t), t.n_elements() as usize));
                }
            }
            weights
        };
        if layout == WeightLayout::Bf16 {
            for t in weights.tensors() {
                t.set_bf16_products();
            }
        }
        Ok(Model {
            file,
            hparams,
            arch,
            backend,
            weights,
            transposed: None,
            transposed_repacked: false,
            repack: true,
            gemm_products: true,
            repack_probes: Default::default(),
            weights_repacked: 0,
        })
    }

    /// The file this model was loaded from.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The backend the weights live on.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The frozen weights (crate-internal: they may point into the mapped
    /// file, so nothing outside may write them).
    pub(crate) fn weights(&self) -> &TensorStore {
        &self.weights
    }

    /// Bytes the frozen weights take on the backend (for the CPU with the
    /// native layout: the mapped file's pages).
    pub fn weights_bytes(&self) -> usize {
        self.weights.size()
    }

    /// Makes a transposed copy `Wᵀ` (ne = [n_out, n_in]) of every matrix,
    /// so that training computes input gradients `Wᵀ dy` with the matmul
    /// kernels ([`crate::ggml::Graph::replace_weight_out_prods`]) instead of
    /// ggml's OUT_PROD, which walks W row by row (dequantizing it for every
    /// token when W is quantized). Copies are F16 (2 bytes per weight; the
    /// fastest CPU path measured, and gradients within 1e-3 of the exact
    /// ones) unless `ty` names another type whose block size fits the row
    /// length. Returns the bytes they take; fails when the device has no
    /// room for them.
    ///
    /// With the default type on the CPU, when [`Model::gemm_products`] is
    /// on, no copies are made: the GEMM reads `Wᵀ` through W's strides (F32
    /// W: faster than a matmul over an F16 copy, SmolLM2 train 106–124 →
    /// 138–141 tokens/s) or dequantizes W in bands of rows (quantized, F16,
    /// BF16 W). The weights then stay out of the repacking buffer
    /// ([`Model::repack`] turns off), whose layout the GEMM cannot read:
    /// repacked weights would need F16 copies and measured no faster
    /// (SmolLM2 Q4_0, 2 threads: 118–140 tokens/s at 838 MiB repacked,
    /// 128–132 at 633 MiB plain). Matrices repacked before this call still
    /// get their copies.
    pub fn prepare_transposed(&mut self, ty: Option<GgmlType>) -> Result<usize, ComputeError> {
        if let Some(t) = &self.transposed {
            return Ok(t.size());
        }
        let strided_gemm = ty.is_none() && self.gemm_products && self.backend.is_cpu();
        if strided_gemm && self.weights_repacked == 0 {
            self.repack = false;
        }
        let mats: Vec<(String, [i64; 4])> = self
            .weights
            .tensors()
            .iter()
            .filter(|t| t.ne()[1] > 1 && t.ne()[2] == 1 && t.ne()[3] == 1)
            .filter(|t| !strided_gemm || self.will_repack(&t.name(), t.ty(), t.ne()))
            .map(|t| (t.name(), t.ne()))
            .collect();
        if mats.is_empty() {
            return Ok(0);
        }
        let ty_t = |n_out: i64| match ty {
            Some(t) if n_out % t.block_size() as i64 == 0 => t,
            _ => GgmlType::F16,
        };
        let new_ctx = || {
            let ctx = Context::new(mats.len() + 1, 0, false);
            for (name, ne) in &mats {
                ctx.new_tensor(ty_t(ne[1]), &[ne[1], ne[0]])
                    .set_name(&format!("{name}.T"));
            }
            ctx
        };
        // On the CPU, types it repacks (Q4_0 on AVX2 or NEON) go to its
        // repacking buffer: measured 2.2x faster matmuls than plain Q4_0 and
        // 1.4x faster than F32 (bench_matmul, 1536², 256 tokens, 2 threads).
        let repacked = self
            .repack
            .then(|| self.backend.alloc_store_repacked(new_ctx()))
            .flatten();
        self.transposed_repacked = repacked.is_some();
        let store = match repacked {
            Some(s) => s,
            None => self.backend.alloc_store(new_ctx())?,
        };
        // One matrix at a time, so that the host copies of only one are alive.
        for (name, ne) in &mats {
            // From the file's own bytes (the loaded copy may be F32 already).
            let info = self.file.tensor(name).expect("weight from file");
            let (n_in, n_out) = (ne[0] as usize, ne[1] as usize);
            let bytes = transpose_rows(info.ty, self.file.tensor_data(info), n_in, n_out, ty_t(ne[1]));
            store.get(&format!("{name}.T")).expect("created").write_bytes(&bytes);
        }
        let size = store.size();
        self.transposed = Some(store);
        Ok(size)
    }

    /// On the CPU, moves the matrices whose type this CPU repacks (Q4_0,
    /// Q4_K, IQ4_NL on AVX2) into ggml's repacking buffer, as llama.cpp
    /// does by default: faster forward matmuls, rounding that differs
    /// slightly from the plain kernels'. Afterwards those weights may only
    /// feed MUL_MAT, so ggml's stock OUT_PROD backward cannot run on them.
    /// The embedding table stays as it is (it is read with GET_ROWS).
    /// Returns how many matrices moved.
    pub fn repack_weights(&mut self) -> usize {
        if !self.repack || !self.backend.is_cpu() || self.weights_repacked > 0 {
            return self.weights_repacked;
        }
        let repackable: Vec<(String, GgmlType, [i64; 4])> = self
            .weights
            .tensors()
            .iter()
            .filter(|t| self.will_repack(&t.name(), t.ty(), t.ne()))
            .map(|t| (t.name(), t.ty(), t.ne()))
            .collect();
        if repackable.is_empty() {
            return 0;
        }
        let ctx = Context::new(repackable.len() + 1, 0, false);
        for (name, ty, ne) in &repackable {
            ctx.new_tensor(*ty, &[ne[0], ne[1]]).set_name(name);
        }
        let Some(store) = self.backend.alloc_store_repacked(ctx) else {
            return 0;
        };
        for (name, _, _) in &repackable {
            let info = self.file.tensor(name).expect("weight from file");
            let data = self.file.tensor_data(info);
            store.get(name).expect("created").write_bytes(data);
            // The mapped original is no longer read: give its pages back.
            let (map, offset) = self.file.mapping(info);
            crate::ggml::drop_pages(&map, offset, data.len());
        }
        self.weights.set_overlay(store);
        self.weights_repacked = repackable.len();
        self.weights_repacked
    }

    /// Whether this CPU's repacking buffer takes a matrix of this type and
    /// shape (a probe allocation; ggml exposes no cheaper query).
    fn cpu_repacks(&self, ty: GgmlType, ne: [i64; 4]) -> bool {
        let mut cache = self.repack_probes.lock().unwrap_or_else(|e| e.into_inner());
        *cache.entry((ty, ne[0], ne[1])).or_insert_with(|| {
            let ctx = Context::new(2, 0, false);
            ctx.new_tensor(ty, &[ne[0], ne[1]]);
            self.backend.alloc_store_repacked(ctx).is_some()
        })
    }

    /// Whether [`Model::repack_weights`] moves (or moved) this weight.
    fn will_repack(&self, name: &str, ty: GgmlType, ne: [i64; 4]) -> bool {
        self.repack
            && self.backend.is_cpu()
            && ty.is_quantized()
            && name != "token_embd.weight"
            && ne[1] > 1
            && ne[2] == 1
            && ne[3] == 1
            && self.cpu_repacks(ty, ne)
    }

    /// How many matrices [`Model::repack_weights`] moved.
    pub fn weights_repacked(&self) -> usize {
        self.weights_repacked
    }

    /// Whether [`Model::prepare_transposed`] put its copies in the CPU's
    /// repacking buffer (types this CPU repacks, e.g. Q4_0 on AVX2).
    pub fn transposed_repacked(&self) -> bool {
        self.transposed_repacked
    }

    /// The transposed copy of weight `w`, if [`Model::prepare_transposed`] made one.
    pub fn transposed_of<'a>(&'a self, w: Tensor<'_>) -> Option<Tensor<'a>> {
        let name = w.name();
        let own = self.weights.get(&name)?;
        if !own.same(w) {
            return None;
        }
        self.transposed.as_ref()?.get(&format!("{name}.T"))
    }

    /// A weight's ggml type.
    pub fn weight_type(&self, name: &str) -> Option<GgmlType> {
        self.weights.get(name).map(|t| t.ty())
    }

    /// Node budget of one forward graph of this model.
    pub fn graph_size(&self) -> usize {
        graph_size(&self.hparams)
    }

    /// A scheduler sized for this model's graphs (forward and backward).
    pub fn sched(&self) -> Sched {
        Sched::new(std::slice::from_ref(&self.backend), graph_size(&self.hparams) * 4)
    }

    /// Builds the forward graph for `batch` in `ctx` and returns the logits
    /// tensor `[n_vocab, n_outputs]` and the builder (which holds the inputs).
    /// `differentiable` selects ops that have a backward (for training).
    pub fn build_logits<'a>(
        &'a self,
        ctx: &'a Context,
        batch: &'a Batch,
        hooks: &'a dyn Hooks,
        differentiable: bool,
    ) -> (Tensor<'a>, Forward<'a>) {
        let mut f = Forward::new(
            ctx,
            &self.hparams,
            &self.weights,
            hooks,
            self.arch.rope_mode(),
            batch,
            differentiable,
        );
        let logits = self.head(ctx, &mut f);
        (logits, f)
    }

    /// The blocks, output selection, LM head and soft-capping.
    fn head<'a>(&'a self, ctx: &'a Context, f: &mut Forward<'a>) -> Tensor<'a> {
        let h = self.arch.build(f);
        self.logits_from_normed(ctx, f, h)
    }

    /// Output selection, LM head and soft-capping over the final normalised
    /// hidden states.
    pub fn logits_from_normed<'a>(&'a self, ctx: &'a Context, f: &mut Forward<'a>, h: Tensor<'a>) -> Tensor<'a> {
        let h = f.select_outputs(h);
        let hooks = f.hooks;
        if let Some(scores) = hooks.output_head(f, h) {
            return scores.set_name("logits").set_output();
        }
        let mut logits = f.lm_head(h);
        let cap = self.hparams.final_logit_softcap;
        if cap > 0.0 {
            logits = ctx.scale(ctx.tanh(ctx.scale(logits, 1.0 / cap)), cap);
        }
        logits.set_name("logits").set_output()
    }

    /// Runs the forward pass and returns the logits, one `n_vocab` row per
    /// output position of the batch.
    pub fn logits(&self, sched: &mut Sched, batch: &Batch, hooks: &dyn Hooks) -> Result<Vec<Vec<f32>>, ComputeError> {
        self.run(sched, batch, hooks, None, false).map(|(l, _)| l)
    }

    /// Like [`Model::logits`] with the products a training step runs: on
    /// the CPU the GEMM also over quantized weights (dequantized, exact F32
    /// products) where [`Model::logits`] keeps ggml's kernels, which round
    /// the activations to 8 bits as llama.cpp does. A training run's eval
    /// loss, comparable with its training loss (and on SmolLM2 Q4_1 about
    /// twice as fast).
    pub fn logits_as_trained(
        &self,
        sched: &mut Sched,
        batch: &Batch,
        hooks: &dyn Hooks,
    ) -> Result<Vec<Vec<f32>>, ComputeError> {
        self.run(sched, batch, hooks, None, true).map(|(l, _)| l)
    }

    /// Like [`Model::logits`] for a batch that continues the sequence in
    /// `cache`; returns the logits and the cache extended by the batch.
    pub fn logits_cached(
        &self,
        sched: &mut Sched,
        batch: &Batch,
        hooks: &dyn Hooks,
        cache: &KvCache,
    ) -> Result<(Vec<Vec<f32>>, KvCache), ComputeError> {
        self.run(sched, batch, hooks, Some(cache), false)
            .map(|(l, c)| (l, c.expect("cache requested")))
    }

    /// The input embeddings of `tokens` (the architecture's lookup and
    /// scaling, no adapter): `n_embd` values per token.
    pub fn embed_tokens(&self, tokens: &[i32]) -> Result<Vec<f32>, ComputeError> {
        let gs = graph_size(&self.hparams);
        let ctx = Context::new(gs, gs, false);
        let batch = Batch::single(tokens);
        let mut f = Forward::new(
            &ctx,
            &self.hparams,
            &self.weights,
            &NoHooks,
            self.arch.rope_mode(),
            &batch,
            false,
        );
        let x = self.arch.embed(&mut f).set_output();
        let mut g: Graph = ctx.new_graph(gs, false);
        g.build_forward(x);
        let mut sched = self.sched();
        sched.alloc(&g)?;
        f.fill_inputs();
        sched.compute(&g)?;
        Ok(x.read_f32())
    }

    /// Whether any weight is held quantized (then forward graphs keep
    /// ggml's kernels, see [`Model::logits`]'s graph).
    pub(crate) fn has_quantized_weights(&self) -> bool {
        self.weights.tensors().iter().any(|t| t.ty().is_quantized())
    }

    /// On the CPU (unless [`Model::gemm_products`] is off), runs the graph's
    /// slow products as GEMMs (`Graph::gemm_products`) and, where they take
    /// bf16 operands, holds SwiGLU's inputs in bf16
    /// (`Graph::hold_swiglu_inputs_bf16`). Every graph of a training step
    /// gets the same kernels, so recomputed blocks repeat the forward pass
    /// exactly.
    pub(crate) fn gemm_products_in<'a>(&self, g: &mut Graph<'a>, ctx: &'a Context) {
        if self.gemm_products && self.backend.is_cpu() {
            g.gemm_products();
            g.hold_swiglu_inputs_bf16(ctx);
        }
    }

    fn run(
        &self,
        sched: &mut Sched,
        batch: &Batch,
        hooks: &dyn Hooks,
        cache: Option<&KvCache>,
        as_trained: bool,
    ) -> Result<(Vec<Vec<f32>>, Option<KvCache>), ComputeError> {
        let gs = graph_size(&self.hparams);
        let ctx = Context::new(gs * 2, gs, false);
        let mut f = Forward::new(
            &ctx,
            &self.hparams,
            &self.weights,
            hooks,
            self.arch.rope_mode(),
            batch,
            false,
        );
        if let Some(c) = cache {
            f = f.with_cache(c);
        }
        let logits = self.head(&ctx, &mut f);
        let mut g: Graph = ctx.new_graph(gs, false);
        g.build_forward(logits);
        // Not where a weight is quantized: its matmul rounds the input per
        // block, and on real models (SmolLM2 Q4_1) the GEMM's other
        // summation order flips enough of those roundings to move logits by
        // up to 3 % from llama.cpp's, which ggml's own kernels reproduce
        // exactly. (F32 weights: 6e-5, float rounding.)
        if as_trained || !self.has_quantized_weights() {
            self.gemm_products_in(&mut g, &ctx);
        }
        sched.alloc(&g)?;
        f.fill_inputs();
        hooks.fill_inputs(&g);
        sched.compute(&g)?;
        let rows = logits.read_f32_rows();
        Ok((rows, cache.map(|_| f.read_cache())))
    }
}

/// `Wᵀ` in type `to`: `w` holds `n_out` rows of `n_in` values of type `from`;
/// the result holds `n_in` rows of `n_out`. Built in bands of output rows
/// (in parallel), so no full f32 copy of W or Wᵀ is ever alive.
fn transpose_rows(from: GgmlType, w: &[u8], n_in: usize, n_out: usize, to: GgmlType) -> Vec<u8> {
    use rayon::prelude::*;
    const ROWS: usize = 64;
    let row_bytes = from.row_bytes(n_in as u64).expect("whole blocks") as usize;
    let band = n_in.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let bands: Vec<Vec<u8>> = (0..n_in.div_ceil(band))
        .into_par_iter()
        .map(|bi| {
            let i0 = bi * band;
            let rows_here = band.min(n_in - i0);
            let mut buf = vec![0f32; rows_here * n_out];
            for o0 in (0..n_out).step_by(ROWS) {
                let n = ROWS.min(n_out - o0);
                let vals = from.to_f32(&w[o0 * row_bytes..(o0 + n) * row_bytes], n * n_in);
                for r in 0..n {
                    for (k, &v) in vals[r * n_in + i0..r * n_in + i0 + rows_here].iter().enumerate() {
                        buf[k * n_out + o0 + r] = v;
                    }
                }
            }
            to.from_f32(&buf, n_out)
        })
        .collect();
    bands.concat()
}
