//! Prefix Tuning (Li & Liang; PEFT's `PrefixTuningConfig`) and P-Tuning v2
//! (Liu et al.: deep prompts at every layer, no reparameterisation):
//! trainable key and value entries prepended to every attention layer.
//!
//! The entries are keys as attention sees them (no RoPE is applied to
//! them); every query attends to them, and real tokens run at positions
//! `n_virtual..` — as in PEFT, where they stand in the KV cache ahead of the
//! sequence. GQA models get kv-head-sized entries.
//!
//! With `projection`, the entries are produced during training by PEFT's
//! reparameterisation: an embedding of width `n_head_kv · head_dim` through
//! `Linear → tanh → Linear` to all layers' keys and values; what is
//! exported is that output.

use super::prompt_tuning::PromptInit;
use super::{alloc_params, linear_init, Trainable};
use crate::export::soft_prompt::SoftPrompt;
use crate::ggml::{Tensor, TensorStore};
use crate::model::{Forward, Hooks, Model};
use crate::rng::Rng;
use crate::{Error, Result};

/// Prefix-tuning hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// Hidden width of the reparameterisation MLP (`None`: train the
    /// entries directly).
    pub projection: Option<usize>,
    /// How the entries start: keys and values of vocabulary or text tokens
    /// (as if that text preceded every sequence), standard normal values,
    /// or zeros. With a projection, `zero` zeroes the MLP's last layer and
    /// the others use PyTorch's default init.
    pub init: PromptInit,
    /// Recorded as P-tuning v2 (deep prompts without reparameterisation).
    #[serde(default)]
    pub ptuning_v2: bool,
    /// Real tokens keep positions 0.. instead of following the prefix
    /// (n_virtual..). PEFT shifts them (its prefix sits in the KV cache), so
    /// only the default matches PEFT and a prefix made from a text.
    #[serde(default)]
    pub keep_positions: bool,
    /// Class labels: with any, a linear classification head (`score`, as
    /// HF's `*ForSequenceClassification`, no bias) on the last token's
    /// final hidden state replaces the LM head, and is trained too.
    #[serde(default)]
    pub classes: Vec<String>,
}

/// The classification head's weight, ne = [n_embd, n_classes].
pub const HEAD: &str = "score.weight";

/// Trainable per-layer prefixes on one model.
pub struct PrefixTuning {
    pub config: PrefixConfig,
    n_layer: usize,
    head_dim: usize,
    n_head_kv: usize,
    store: TensorStore,
}

const EMB: &str = "prefix.embedding";
const W0: &str = "prefix.transform.0.weight";
const B0: &str = "prefix.transform.0.bias";
const W2: &str = "prefix.transform.2.weight";
const B2: &str = "prefix.transform.2.bias";

fn key_name(il: usize) -> String {
    format!("blk.{il}.prefix_k")
}

fn value_name(il: usize) -> String {
    format!("blk.{il}.prefix_v")
}

/// The keys and values `tokens` leave in every layer's cache (run from
/// position 0 on the base model): a prefix made of them acts exactly as if
/// the tokens preceded every sequence.
pub fn kv_of_tokens(model: &Model, tokens: &[i32]) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let mut sched = model.sched();
    let batch = crate::model::Batch::single(tokens);
    let cache = crate::model::KvCache::default();
    let (_, c) = model
        .logits_cached(&mut sched, &batch, &crate::model::NoHooks, &cache)
        .map_err(|e| Error::Msg(e.to_string()))?;
    Ok(c.k.into_iter().zip(c.v).collect())
}

impl PrefixTuning {
    /// A fresh prefix for `model`; `tok` is needed for a text init.
    pub fn new(
        model: &Model,
        config: PrefixConfig,
        tok: Option<&crate::tokenizer::Tokenizer>,
        seed: u64,
    ) -> Result<Self> {
        let hp = &model.hparams;
        let n = config.num_virtual_tokens;
        let kv = hp.head_dim * hp.n_head_kv;
        let mut rng = Rng::new(seed);
        if config.ptuning_v2 && config.projection.is_some() {
            return Err(Error::Msg(
                "P-tuning v2 trains the prompts directly; drop --prefix-projection (or use --method prefix)".into(),
            ));
        }
        let zero = config.init == PromptInit::Zero;
        let mut normal = |len: usize| -> Vec<f32> {
            if zero {
                vec![0.0; len]
            } else {
                (0..len).map(|_| rng.normal()).collect()
            }
        };
        let p = match config.projection {
            None => {
                let mut tok_rng = Rng::new(seed ^ 0x70C5);
                let values: Vec<(Vec<f32>, Vec<f32>)> = match config.init.tokens(model, tok, n, &mut tok_rng)? {
                    Some(ids) if n > 0 => kv_of_tokens(model, &ids)?,
                    _ => (0..hp.n_layer)
                        .map(|_| (normal(kv * n), normal(hp.head_dim_v * hp.n_head_kv * n)))
                        .collect(),
                };
                let p = Self::from_values(model, config, &values, None)?;
                p.init_head(&mut rng, None);
                return Ok(p);
            }
            Some(h) => {
                if hp.head_dim != hp.head_dim_v {
                    return Err(Error::Msg(format!(
                        "{}: keys and values differ in width ({} and {}); use prefix tuning without --prefix-projection",
                        model.path().display(),
                        hp.head_dim,
                        hp.head_dim_v
                    )));
                }
                let out = hp.n_layer * 2 * kv;
                let mut shapes = vec![
                    (EMB.to_string(), vec![kv, n]),
                    (W0.to_string(), vec![kv, h]),
                    (B0.to_string(), vec![h]),
                    (W2.to_string(), vec![h, out]),
                    (B2.to_string(), vec![out]),
                ];
                if n == 0 {
                    shapes.clear();
                }
                shapes.extend(head_shape(model, &config));
                let p = Self::with_store(model, config.clone(), alloc_params(model, &shapes)?);
                if n > 0 {
                    let emb = normal(kv * n);
                    let (w0, b0) = linear_init(&mut rng, kv, h);
                    let (mut w2, mut b2) = linear_init(&mut rng, h, out);
                    if zero {
                        w2.fill(0.0);
                        b2.fill(0.0);
                    }
                    for (name, v) in [(EMB, emb), (W0, w0), (B0, b0), (W2, w2), (B2, b2)] {
                        p.store.get(name).expect("allocated").write_f32(&v);
                    }
                }
                p.init_head(&mut rng, None);
                p
            }
        };
        Ok(p)
    }

    fn with_store(model: &Model, config: PrefixConfig, store: TensorStore) -> Self {
        let hp = &model.hparams;
        PrefixTuning {
            config,
            n_layer: hp.n_layer,
            head_dim: hp.head_dim,
            n_head_kv: hp.n_head_kv,
            store,
        }
    }

    /// Starts the classification head (if any) at `values`, or as HF does:
    /// normal with standard deviation 0.02.
    fn init_head(&self, rng: &mut Rng, values: Option<&[f32]>) {
        if let Some(t) = self.store.get(HEAD) {
            match values {
                Some(v) => t.write_f32(v),
                None => t.write_f32(&(0..t.n_elements()).map(|_| 0.02 * rng.normal()).collect::<Vec<_>>()),
            }
        }
    }

    /// The classification head's weights, if there is a head.
    pub fn head_values(&self) -> Option<Vec<f32>> {
        self.store.get(HEAD).map(|t| t.read_f32())
    }

    /// Prefixes with these per-layer keys and values (`[head_dim,
    /// n_head_kv, n_virtual]` each), trained directly (no projection), and
    /// the classification head's weights when the config names classes.
    pub fn from_values(
        model: &Model,
        config: PrefixConfig,
        values: &[(Vec<f32>, Vec<f32>)],
        head: Option<&[f32]>,
    ) -> Result<Self> {
        let hp = &model.hparams;
        let n = config.num_virtual_tokens;
        let config = PrefixConfig {
            projection: None,
            ..config
        };
        let mut shapes = Vec::new();
        if n > 0 {
            for il in 0..hp.n_layer {
                shapes.push((key_name(il), vec![hp.head_dim, hp.n_head_kv, n]));
                shapes.push((value_name(il), vec![hp.head_dim_v, hp.n_head_kv, n]));
            }
        }
        shapes.extend(head_shape(model, &config));
        let p = Self::with_store(model, config, alloc_params(model, &shapes)?);
        if let Some(h) = head {
            p.init_head(&mut Rng::new(0), Some(h));
        }
        if n > 0 {
            if values.len() != hp.n_layer {
                return Err(Error::Msg(format!(
                    "prefix has {} layers, the model {}",
                    values.len(),
                    hp.n_layer
                )));
            }
            for (il, (k, v)) in values.iter().enumerate() {
                p.store.get(&key_name(il)).expect("allocated").write_f32(k);
                p.store.get(&value_name(il)).expect("allocated").write_f32(v);
            }
        }
        Ok(p)
    }

    /// Every layer's keys and values as inference uses them (after the
    /// projection, when there is one).
    pub fn entries(&self, model: &Model) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        if self.config.num_virtual_tokens == 0 {
            return Ok(Vec::new());
        }
        if self.config.projection.is_none() {
            return Ok((0..self.n_layer)
                .map(|il| {
                    (
                        self.store.get(&key_name(il)).expect("exists").read_f32(),
                        self.store.get(&value_name(il)).expect("exists").read_f32(),
                    )
                })
                .collect());
        }
        // Run the projection once per layer, in one graph.
        let mut vals = super::evaluate(model, self, 64 * self.n_layer + 64, |p, f| {
            (0..p.n_layer)
                .flat_map(|il| {
                    let (k, v) = p.attn_kv_prefix(f, il).expect("prefix entries");
                    [k, v]
                })
                .collect()
        })?
        .into_iter();
        Ok((0..self.n_layer)
            .map(|_| (vals.next().expect("key"), vals.next().expect("value")))
            .collect())
    }

    /// The method's name in adapter files.
    pub fn method_name(&self) -> &'static str {
        if self.config.ptuning_v2 {
            "p_tuning_v2"
        } else {
            "prefix_tuning"
        }
    }
}

fn head_shape(model: &Model, config: &PrefixConfig) -> Option<(String, Vec<usize>)> {
    (!config.classes.is_empty()).then(|| (HEAD.to_string(), vec![model.hparams.n_embd, config.classes.len()]))
}

impl Hooks for PrefixTuning {
    fn n_virtual_positions(&self) -> usize {
        if self.config.keep_positions {
            0
        } else {
            self.config.num_virtual_tokens
        }
    }

    fn output_head<'a>(&'a self, f: &Forward<'a>, h: Tensor<'a>) -> Option<Tensor<'a>> {
        self.store.get(HEAD).map(|w| f.ctx.mul_mat(w, h))
    }

    fn class_labels(&self) -> Option<&[String]> {
        (!self.config.classes.is_empty()).then_some(&self.config.classes[..])
    }

    fn attn_kv_prefix<'a>(&'a self, f: &Forward<'a>, layer: usize) -> Option<(Tensor<'a>, Tensor<'a>)> {
        let n = self.config.num_virtual_tokens;
        if n == 0 {
            return None;
        }
        let Some(h) = self.config.projection else {
            return Some((self.store.get(&key_name(layer))?, self.store.get(&value_name(layer))?));
        };
        let c = f.ctx;
        let p = |name: &str| self.store.get(name).expect("projection tensor");
        let kv = self.head_dim * self.n_head_kv;
        let hid = c.tanh_differentiable(c.add(c.mul_mat(p(W0), p(EMB)), p(B0))); // [h, n]
                                                                                 // This layer's rows of the last linear: keys, then values. Each is
                                                                                 // its own product and reshape (not a view of one product), so the
                                                                                 // gradients coming back from attention's permutes stay valid for
                                                                                 // ggml's VIEW backward, which needs them contiguous.
        let (w2, b2) = (p(W2), p(B2));
        let (hd, nkv) = (self.head_dim as i64, self.n_head_kv as i64);
        let part = |j: usize| {
            let first = (2 * layer + j) * kv;
            let w = c.view(w2, &[h as i64, kv as i64], &[w2.nb()[1]], first * w2.nb()[1]);
            let b = c.view(b2, &[kv as i64], &[], first * 4);
            c.reshape(c.add(c.mul_mat(w, hid), b), &[hd, nkv, n as i64])
        };
        let (k, v) = (part(0), part(1));
        Some((k, v))
    }
}

impl Trainable for PrefixTuning {
    fn store(&self) -> &TensorStore {
        &self.store
    }

    fn param_names(&self) -> Vec<String> {
        let mut names = match self.config.projection {
            _ if self.config.num_virtual_tokens == 0 => Vec::new(),
            Some(_) => [EMB, W0, B0, W2, B2].map(String::from).to_vec(),
            None => (0..self.n_layer)
                .flat_map(|il| [key_name(il), value_name(il)])
                .collect(),
        };
        if self.store.get(HEAD).is_some() {
            names.push(HEAD.to_string());
        }
        names
    }

    fn set_training(&self, _rng: Option<Rng>) {}

    fn training_rng(&self) -> Option<Rng> {
        None
    }

    fn write_adapter(&self, model: &Model, path: &std::path::Path) -> Result<()> {
        let sp = SoftPrompt {
            method: self.method_name().into(),
            n_virtual: self.config.num_virtual_tokens,
            tokens: None,
            prefix: self.entries(model)?,
            keep_positions: self.config.keep_positions,
            head: self.head_values().map(|v| (self.config.classes.clone(), v)),
            config: serde_json::to_string(&self.config).expect("serialisable"),
        };
        crate::export::soft_prompt::write(&sp, model, path)
    }
}
