//! Weights coming in from other formats, one file each.

pub mod hf;
pub mod nf4;

use crate::{Error, Result};
use safetensors::{tensor::TensorView, Dtype};

/// The values of a safetensors tensor stored as F32, F16 or BF16, as f32;
/// `what` names it in the error for other dtypes.
pub(crate) fn f32_values(t: &TensorView<'_>, what: &str) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        other => {
            return Err(Error::Msg(format!(
                "{what}: dtype {other:?} is not supported (F32, F16, BF16)"
            )))
        }
    })
}

/// Whole-model tensors: GGUF stem and HF module path.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Per-block tensors: GGUF kind (`blk.N.<kind>`) and HF module under
/// `model.layers.N.`, for the llama family.
const BLOCK_NAMES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// GGUF stem (`blk.3.attn_q`, `token_embd`) → HF module path
/// (`model.layers.3.self_attn.q_proj`, `model.embed_tokens`).
pub(crate) fn hf_module(stem: &str) -> Option<String> {
    if let Some((_, h)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == stem) {
        return Some(h.to_string());
    }
    let (n, kind) = stem.strip_prefix("blk.")?.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (_, h) = BLOCK_NAMES.iter().find(|(g, _)| *g == kind)?;
    Some(format!("model.layers.{n}.{h}"))
}

/// HF module path → GGUF stem (the inverse of [`hf_module`]).
pub(crate) fn gguf_stem(module: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == module) {
        return Some(g.to_string());
    }
    let (n, m) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (g, _) = BLOCK_NAMES.iter().find(|(_, h)| *h == m)?;
    Some(format!("blk.{n}.{g}"))
}
