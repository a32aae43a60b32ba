//! `qwen3`: Qwen 3 dense. Llama blocks with per-head RMS norms on Q and K
//! (before RoPE), NeoX rotary mode, no biases.

use super::{decoder_tensors, Architecture, Layout, TensorDecl};
use crate::ggml::Tensor;
use crate::model::graph::Forward;
use crate::model::hooks::TensorKind::*;
use crate::model::Hparams;

pub struct Qwen3;

impl Architecture for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn rope_mode(&self) -> i32 {
        2
    }

    fn tensors(&self, hp: &Hparams) -> Vec<TensorDecl> {
        decoder_tensors(
            hp,
            Layout {
                qk_norm: true,
                ..Layout::default()
            },
        )
    }

    fn block<'a>(&self, f: &mut Forward<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        let hp = f.hp;
        let c = f.ctx;
        let scale = 1.0 / (hp.head_dim as f32).sqrt();
        let h = f.rms_norm(x, &format!("blk.{il}.attn_norm.weight"));
        let q = f.heads(f.linear(Some(il), AttnQ, h), hp.head_dim, hp.n_head);
        let k = f.heads(f.linear(Some(il), AttnK, h), hp.head_dim, hp.n_head_kv);
        let v = f.heads(f.linear(Some(il), AttnV, h), hp.head_dim_v, hp.n_head_kv);
        let q = f.rms_norm(q, &format!("blk.{il}.attn_q_norm.weight"));
        let k = f.rms_norm(k, &format!("blk.{il}.attn_k_norm.weight"));
        let q = f.rope(q, hp.rope_freq_base, hp.rope_freq_scale);
        let k = f.rope(k, hp.rope_freq_base, hp.rope_freq_scale);
        let a = f.attention(il, q, k, v, scale, false);
        let a = f.linear(Some(il), AttnOut, a);
        let x = c.add(x, f.hooks.after_attn(c, il, a));

        let h = f.rms_norm(x, &format!("blk.{il}.ffn_norm.weight"));
        let g = f.linear(Some(il), FfnGate, h);
        let u = f.linear(Some(il), FfnUp, h);
        let d = f.linear(Some(il), FfnDown, c.swiglu_split(g, u));
        c.add(x, f.hooks.after_ffn(c, il, d))
    }
}
