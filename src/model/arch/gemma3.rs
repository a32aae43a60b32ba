//! `gemma3`: Gemma 3 text. Embeddings scaled by sqrt(n_embd); RMS norms
//! before and after both attention and FFN; per-head Q/K norms; GELU-tanh
//! gated FFN (composed from ops that have a backward); sliding-window
//! attention on all but every `swa_pattern`-th layer, with its own RoPE base.
//! GGUF norm weights already include Gemma's `1 +` offset.

use super::{decoder_tensors, Architecture, Layout, TensorDecl};
use crate::ggml::Tensor;
use crate::model::graph::Forward;
use crate::model::hooks::TensorKind::*;
use crate::model::Hparams;

pub struct Gemma3;

impl Architecture for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn rope_mode(&self) -> i32 {
        2
    }

    fn tensors(&self, hp: &Hparams) -> Vec<TensorDecl> {
        decoder_tensors(
            hp,
            Layout {
                qk_norm: true,
                post_norms: true,
                ..Layout::default()
            },
        )
    }

    fn embed<'a>(&self, f: &mut Forward<'a>) -> Tensor<'a> {
        f.embeddings((f.hp.n_embd as f32).sqrt())
    }

    fn block<'a>(&self, f: &mut Forward<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        let hp = f.hp;
        let c = f.ctx;
        // The 27B model (62 layers) scales queries by the full width per head.
        let scale = if hp.n_layer == 62 {
            1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
        } else {
            1.0 / (hp.head_dim as f32).sqrt()
        };
        let swa = hp.is_swa(il);
        let (base, fscale) = if swa {
            (hp.rope_freq_base_swa, 1.0)
        } else {
            (hp.rope_freq_base, hp.rope_freq_scale)
        };
        let h = f.rms_norm(x, &format!("blk.{il}.attn_norm.weight"));
        let q = f.heads(f.linear(Some(il), AttnQ, h), hp.head_dim, hp.n_head);
        let k = f.heads(f.linear(Some(il), AttnK, h), hp.head_dim, hp.n_head_kv);
        let v = f.heads(f.linear(Some(il), AttnV, h), hp.head_dim_v, hp.n_head_kv);
        let q = f.rms_norm(q, &format!("blk.{il}.attn_q_norm.weight"));
        let k = f.rms_norm(k, &format!("blk.{il}.attn_k_norm.weight"));
        let q = f.rope(q, base, fscale);
        let k = f.rope(k, base, fscale);
        let a = f.attention(il, q, k, v, scale, swa);
        let a = f.linear(Some(il), AttnOut, a);
        let a = f.rms_norm(a, &format!("blk.{il}.post_attention_norm.weight"));
        let x = c.add(x, f.hooks.after_attn(c, il, a));

        let h = f.rms_norm(x, &format!("blk.{il}.ffn_norm.weight"));
        let g = f.linear(Some(il), FfnGate, h);
        let u = f.linear(Some(il), FfnUp, h);
        let d = f.linear(Some(il), FfnDown, f.geglu(g, u));
        let d = f.rms_norm(d, &format!("blk.{il}.post_ffw_norm.weight"));
        c.add(x, f.hooks.after_ffn(c, il, d))
    }
}
