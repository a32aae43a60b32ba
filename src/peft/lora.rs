//! LoRA: `y = W x + s · B (A dropout(x))` on chosen weight matmuls, with
//! `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). A is initialised as
//! PEFT does (Kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(n_in))), B at
//! zero, so a fresh adapter leaves the model unchanged.
//!
//! Tensors are kept in llama.cpp's layout: `<weight>.lora_a` ne = [n_in, r],
//! `<weight>.lora_b` ne = [r, n_out], and the scale is stored as llama.cpp's
//! `alpha` (runtime scale = alpha / r), so export is a plain write.

use super::Trainable;
use crate::ggml::{Context, GgmlType, Graph, Tensor, TensorStore};
use crate::model::{Hooks, Model, Site, TensorKind};
use crate::rng::Rng;
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;

/// LoRA hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// GGUF kinds to adapt (`attn_q`, ..., `output`).
    pub targets: Vec<String>,
    /// Blocks to adapt (`None`: all).
    pub layers: Option<Vec<usize>>,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ]
            .map(String::from)
            .to_vec(),
            layers: None,
            rslora: false,
        }
    }
}

impl LoraConfig {
    /// The multiplier of `B A x`.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One adapted weight.
#[derive(Debug, Clone)]
pub struct LoraSite {
    /// The base weight's GGUF name (`blk.3.attn_q.weight`).
    pub weight: String,
    /// Input width (for the token embedding: the vocabulary size).
    pub n_in: usize,
    pub n_out: usize,
    pub rank: usize,
}

impl LoraSite {
    /// Whether this is the token embedding, whose tensors llama.cpp keeps in
    /// a flipped layout: `lora_a` ne = [r, n_vocab], `lora_b` ne = [r, n_embd].
    pub fn is_embedding(&self) -> bool {
        self.weight == "token_embd.weight"
    }

    /// Shapes (ggml order) of `lora_a` and `lora_b`.
    pub fn shapes(&self) -> ([usize; 2], [usize; 2]) {
        if self.is_embedding() {
            ([self.rank, self.n_in], [self.rank, self.n_out])
        } else {
            ([self.n_in, self.rank], [self.rank, self.n_out])
        }
    }
}

struct Dropout {
    rng: Rng,
    /// This batch's mask per site: drawn on first use, reused when the same
    /// batch is rebuilt (recomputation with gradient checkpointing).
    masks: HashMap<String, Vec<f32>>,
}

/// A LoRA adapter on one model: its tensors live on the model's backend.
pub struct Lora {
    pub config: LoraConfig,
    /// llama.cpp's `adapter.lora.alpha`: each site's scale is `alpha_file / rank`.
    pub alpha_file: f32,
    /// Multiplier applied at inference (`--adapter-scale`).
    pub user_scale: f32,
    sites: Vec<LoraSite>,
    index: HashMap<String, usize>,
    store: TensorStore,
    dropout: RefCell<Option<Dropout>>,
    /// The loss rows the graphs being built hold (`Trainable::set_row_window`).
    window: std::cell::Cell<Option<(usize, usize)>>,
}

fn check_target(model: &Model, kind: TensorKind) -> Result<()> {
    let tied = model.weights().get("output.weight").is_none();
    match kind {
        TensorKind::TokenEmbd if tied => Err(Error::Msg(format!(
            "{}: the LM head is tied to token_embd, so 'token_embd' cannot be a LoRA target (it would change the head too)",
            model.path().display()
        ))),
        TensorKind::Output if tied => Err(Error::Msg(format!(
            "{}: the LM head is tied to token_embd, so 'output' cannot be a LoRA target (llama.cpp could not apply it)",
            model.path().display()
        ))),
        _ => Ok(()),
    }
}

impl Lora {
    /// A fresh adapter for `model`: A random (PEFT's init), B zero.
    pub fn new(model: &Model, config: LoraConfig, seed: u64) -> Result<Self> {
        if config.rank == 0 {
            return Err(Error::Msg("LoRA rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Msg(format!(
                "LoRA dropout must be in [0, 1), got {}",
                config.dropout
            )));
        }
        let mut kinds = Vec::new();
        for t in &config.targets {
            let k = TensorKind::from_gguf_name(t).ok_or_else(|| {
                Error::Msg(format!(
                    "unknown LoRA target '{t}' (use GGUF names: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, output)"
                ))
            })?;
            check_target(model, k)?;
            kinds.push(k);
        }
        let n_layer = model.hparams.n_layer;
        let layers: Vec<usize> = match &config.layers {
            Some(l) => {
                if let Some(bad) = l.iter().find(|&&i| i >= n_layer) {
                    return Err(Error::Msg(format!(
                        "layer {bad} does not exist (the model has {n_layer})"
                    )));
                }
                l.clone()
            }
            None => (0..n_layer).collect(),
        };
        let mut names = Vec::new();
        for &il in &layers {
            for &k in kinds
                .iter()
                .filter(|&&k| k != TensorKind::Output && k != TensorKind::TokenEmbd)
            {
                names.push(format!("blk.{il}.{}.weight", k.gguf_name()));
            }
        }
        if kinds.contains(&TensorKind::Output) {
            names.push("output.weight".into());
        }
        if kinds.contains(&TensorKind::TokenEmbd) {
            names.push("token_embd.weight".into());
        }
        let mut sites = Vec::new();
        for w in names {
            let t = model
                .weights()
                .get(&w)
                .ok_or_else(|| Error::Msg(format!("{}: no tensor '{w}' to adapt", model.path().display())))?;
            let ne = t.ne();
            // The embedding maps token ids (n_vocab) to rows of n_embd.
            let (n_in, n_out) = if w == "token_embd.weight" {
                (ne[1], ne[0])
            } else {
                (ne[0], ne[1])
            };
            sites.push(LoraSite {
                weight: w,
                n_in: n_in as usize,
                n_out: n_out as usize,
                rank: config.rank,
            });
        }
        if sites.is_empty() {
            return Err(Error::Msg("no LoRA targets selected".into()));
        }
        let alpha_file = config.scale() * config.rank as f32;
        let lora = Self::alloc(model, config, alpha_file, sites)?;
        let mut rng = Rng::new(seed);
        for s in &lora.sites {
            if s.is_embedding() {
                // PEFT's embedding init: A zero, B standard normal.
                let b: Vec<f32> = (0..s.n_out * s.rank).map(|_| rng.normal()).collect();
                lora.tensor_a(&s.weight).write_f32(&vec![0.0; s.rank * s.n_in]);
                lora.tensor_b(&s.weight).write_f32(&b);
            } else {
                let bound = 1.0 / (s.n_in as f32).sqrt();
                let a: Vec<f32> = (0..s.n_in * s.rank).map(|_| rng.uniform(-bound, bound)).collect();
                lora.tensor_a(&s.weight).write_f32(&a);
                lora.tensor_b(&s.weight).write_f32(&vec![0.0; s.rank * s.n_out]);
            }
        }
        Ok(lora)
    }

    /// An adapter with these sites, tensors allocated but not initialised.
    pub fn alloc(model: &Model, config: LoraConfig, alpha_file: f32, sites: Vec<LoraSite>) -> Result<Self> {
        let ctx = Context::new(sites.len() * 2 + 1, 0, false);
        let mut index = HashMap::new();
        for (i, s) in sites.iter().enumerate() {
            let (a, b) = s.shapes();
            ctx.new_tensor(GgmlType::F32, &[a[0] as i64, a[1] as i64])
                .set_name(&format!("{}.lora_a", s.weight));
            ctx.new_tensor(GgmlType::F32, &[b[0] as i64, b[1] as i64])
                .set_name(&format!("{}.lora_b", s.weight));
            index.insert(s.weight.clone(), i);
        }
        let store = model.backend().alloc_store(ctx)?;
        Ok(Lora {
            config,
            alpha_file,
            user_scale: 1.0,
            sites,
            index,
            store,
            dropout: RefCell::new(None),
            window: std::cell::Cell::new(None),
        })
    }

    /// The adapted weights.
    pub fn sites(&self) -> &[LoraSite] {
        &self.sites
    }

    /// `<weight>.lora_a`.
    pub fn tensor_a(&self, weight: &str) -> Tensor<'_> {
        self.store.get(&format!("{weight}.lora_a")).expect("site exists")
    }

    /// `<weight>.lora_b`.
    pub fn tensor_b(&self, weight: &str) -> Tensor<'_> {
        self.store.get(&format!("{weight}.lora_b")).expect("site exists")
    }

    /// The multiplier of `B A x` at one site.
    pub fn site_scale(&self, s: &LoraSite) -> f32 {
        // llama.cpp treats a zero alpha as "no alpha/r factor".
        if self.alpha_file == 0.0 {
            self.user_scale
        } else {
            self.user_scale * self.alpha_file / s.rank as f32
        }
    }
}

impl Hooks for Lora {
    fn fill_inputs(&self, g: &Graph<'_>) {
        if let Some(d) = self.dropout.borrow().as_ref() {
            for (name, mask) in &d.masks {
                if let Some(t) = g.get_tensor(name) {
                    t.write_f32(mask);
                }
            }
        }
    }

    fn embed<'a>(&'a self, ctx: &'a Context, site: &Site, w: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        let x = ctx.get_rows(w, ids);
        let Some(&i) = self.index.get(&site.weight) else {
            return x;
        };
        let s = &self.sites[i];
        // As llama.cpp: B · rows(A)ᵀ with A ne = [r, n_vocab], B ne = [r, n_embd].
        let a_rows = ctx.get_rows(self.tensor_a(&s.weight), ids);
        let delta = ctx.mul_mat(self.tensor_b(&s.weight), a_rows);
        ctx.add(x, ctx.scale(delta, self.site_scale(s)))
    }

    fn linear<'a>(&'a self, ctx: &'a Context, site: &Site, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let y = ctx.mul_mat(w, x);
        let Some(&i) = self.index.get(&site.weight) else {
            return y;
        };
        let s = &self.sites[i];
        let mut xin = x;
        if let Some(d) = self.dropout.borrow_mut().as_mut() {
            if self.config.dropout > 0.0 {
                let p = self.config.dropout;
                let keep = 1.0 / (1.0 - p);
                let ne = x.ne();
                let (cols, rows) = (ne[0] as usize, ne[1] as usize);
                let mut name = format!("drop.{}", s.weight);
                // Over a window of the loss rows: a slice of the mask over
                // all of them, under a name of its own.
                let (start, total) = self.window.get().map_or((None, rows), |(s, t)| (Some(s), t));
                let rng = &mut d.rng;
                let whole = d.masks.entry(name.clone()).or_insert_with(|| {
                    (0..cols * total)
                        .map(|_| if rng.f32() < p { 0.0 } else { keep })
                        .collect()
                });
                if let Some(start) = start {
                    let slice = whole[start * cols..(start + rows) * cols].to_vec();
                    name = format!("{name}@{start}");
                    d.masks.insert(name.clone(), slice);
                }
                let m = ctx.new_tensor(GgmlType::F32, &ne[..2]).set_name(&name).set_input();
                xin = ctx.mul(x, m);
            }
        }
        let ax = ctx.mul_mat(self.tensor_a(&s.weight), xin);
        let bax = ctx.mul_mat(self.tensor_b(&s.weight), ax);
        ctx.add(y, ctx.scale(bax, self.site_scale(s)))
    }
}

impl Trainable for Lora {
    fn store(&self) -> &TensorStore {
        &self.store
    }

    fn param_names(&self) -> Vec<String> {
        self.sites
            .iter()
            .flat_map(|s| [format!("{}.lora_a", s.weight), format!("{}.lora_b", s.weight)])
            .collect()
    }

    fn set_training(&self, rng: Option<Rng>) {
        *self.dropout.borrow_mut() = rng.map(|rng| Dropout {
            rng,
            masks: HashMap::new(),
        });
    }

    fn training_rng(&self) -> Option<Rng> {
        self.dropout.borrow().as_ref().map(|d| d.rng.clone())
    }

    fn new_batch(&self) {
        if let Some(d) = self.dropout.borrow_mut().as_mut() {
            d.masks.clear();
        }
    }

    fn set_row_window(&self, window: Option<(usize, usize)>) {
        self.window.set(window);
    }

    fn write_adapter(&self, model: &Model, path: &std::path::Path) -> Result<()> {
        crate::export::llama_lora::write(self, model, path)
    }
}
