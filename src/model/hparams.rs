//! Hyperparameters read from GGUF metadata (`<arch>.*` keys).

use super::ModelError;
use crate::gguf::GgufFile;

/// The hyperparameters every supported architecture is described by.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: String,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head size of Q and K.
    pub head_dim: usize,
    /// Per-head size of V.
    pub head_dim_v: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    /// 1 / linear rope scaling factor (1.0 when unscaled).
    pub rope_freq_scale: f32,
    pub n_rot: usize,
    /// Sliding-window size of local attention layers (0: none).
    pub sliding_window: usize,
    /// Which layers use the sliding window (from the pattern key: either an
    /// array of per-layer flags, or n meaning the last of every n is global).
    pub swa_layers: Vec<bool>,
    pub rope_freq_base_swa: f32,
    pub final_logit_softcap: f32,
}

impl Hparams {
    /// Reads the hyperparameters of `arch` from `file`.
    pub fn from_gguf(file: &GgufFile, arch: &str) -> Result<Self, ModelError> {
        let k = |s: &str| format!("{arch}.{s}");
        let path = file.path().to_owned();
        let need = |key: String| -> Result<usize, ModelError> { Ok(file.get_u64(&key)? as usize) };
        let opt_u =
            |key: String| -> Result<Option<usize>, ModelError> { Ok(file.get_u64_opt(&key)?.map(|v| v as usize)) };
        let opt_f = |key: String| -> Result<Option<f32>, ModelError> { Ok(file.get_f64_opt(&key)?.map(|v| v as f32)) };
        let n_embd = need(k("embedding_length"))?;
        let n_layer = need(k("block_count"))?;
        let n_head = need(k("attention.head_count"))?;
        let n_ff = need(k("feed_forward_length"))?;
        let n_head_kv = opt_u(k("attention.head_count_kv"))?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Invalid {
                path,
                msg: format!("{n_head} attention heads cannot be grouped over {n_head_kv} KV heads"),
            });
        }
        let head_dim = opt_u(k("attention.key_length"))?.unwrap_or(n_embd / n_head);
        let head_dim_v = opt_u(k("attention.value_length"))?.unwrap_or(head_dim);
        let n_rot = opt_u(k("rope.dimension_count"))?.unwrap_or(head_dim);
        let rope_freq_scale = match file.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let f = opt_f(k("rope.scaling.factor"))?.unwrap_or(1.0);
                if f > 0.0 {
                    1.0 / f
                } else {
                    1.0
                }
            }
            Some(other) => {
                return Err(ModelError::Invalid {
                    path,
                    msg: format!("rope scaling '{other}' is not supported yet (supported: none, linear)"),
                })
            }
        };
        let n_vocab = match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(toks) => toks.len(),
            None => file.require_tensor("token_embd.weight")?.ne[1] as usize,
        };
        Ok(Hparams {
            arch: arch.to_owned(),
            n_vocab,
            n_ctx_train: opt_u(k("context_length"))?.unwrap_or(2048),
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            rms_eps: opt_f(k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_freq_base: opt_f(k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_freq_scale,
            n_rot,
            sliding_window: opt_u(k("attention.sliding_window"))?.unwrap_or(0),
            swa_layers: swa_layers(file, &k("attention.sliding_window_pattern"), n_layer)?,
            rope_freq_base_swa: opt_f(k("rope.freq_base_swa"))?.unwrap_or(10000.0),
            final_logit_softcap: opt_f(k("final_logit_softcapping"))?.unwrap_or(0.0),
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.head_dim * self.n_head
    }

    /// Width of all key heads together.
    pub fn k_dim(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Width of all value heads together.
    pub fn v_dim(&self) -> usize {
        self.head_dim_v * self.n_head_kv
    }

    /// Whether layer `il` uses sliding-window attention.
    pub fn is_swa(&self, il: usize) -> bool {
        self.sliding_window > 0 && self.swa_layers.get(il).copied().unwrap_or(false)
    }
}

/// Per-layer sliding-window flags: an array key gives them directly; a number
/// n (default 6, as llama.cpp) makes all but the last layer of every n local.
fn swa_layers(file: &GgufFile, key: &str, n_layer: usize) -> Result<Vec<bool>, ModelError> {
    if let Some(arr) = file.get(key).and_then(|v| v.as_array()) {
        let flags: Option<Vec<bool>> = arr
            .iter()
            .map(|v| match v {
                crate::gguf::Value::Bool(b) => Some(*b),
                other => other.as_u64().map(|u| u != 0),
            })
            .collect();
        return match flags {
            Some(f) if f.len() >= n_layer => Ok(f),
            _ => Err(ModelError::Invalid {
                path: file.path().to_owned(),
                msg: format!("'{key}' must hold one flag per layer ({n_layer})"),
            }),
        };
    }
    let n = file.get_u64_opt(key)?.unwrap_or(6) as usize;
    Ok((0..n_layer).map(|il| n == 0 || il % n < n - 1).collect())
}
