//! One file per architecture, and the registry that maps
//! `general.architecture` to its builder.

mod gemma3;
mod llama;
mod qwen2;
mod qwen3;

use super::graph::Forward;
use super::Hparams;
use crate::ggml::Tensor;

/// A tensor the architecture expects in the file: name and shape (ggml order).
#[derive(Debug, Clone)]
pub struct TensorDecl {
    pub name: String,
    pub ne: Vec<u64>,
    pub required: bool,
}

/// How an architecture builds its graph. Every weight matmul goes through
/// [`Forward::linear`], so adapters never touch architecture code.
pub trait Architecture: Sync {
    /// The `general.architecture` value.
    fn name(&self) -> &'static str;
    /// RoPE mode passed to ggml (0 normal, 2 NeoX).
    fn rope_mode(&self) -> i32;
    /// Tensors the file must (or may) hold, with their shapes.
    fn tensors(&self, hp: &Hparams) -> Vec<TensorDecl>;
    /// The input embeddings `[n_embd, n_rows]` (token lookup, the
    /// architecture's scaling, the adapter's virtual tokens).
    fn embed<'a>(&self, f: &mut Forward<'a>) -> Tensor<'a> {
        f.embeddings(1.0)
    }
    /// Transformer block `il`: residual stream in, residual stream out.
    fn block<'a>(&self, f: &mut Forward<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a>;
    /// The final norm before the LM head.
    fn output_norm<'a>(&self, f: &mut Forward<'a>, x: Tensor<'a>) -> Tensor<'a> {
        f.rms_norm(x, "output_norm.weight")
    }
    /// Embeddings and every block: the last residual stream `[n_embd,
    /// n_rows]`, before the final norm.
    fn hidden<'a>(&self, f: &mut Forward<'a>) -> Tensor<'a> {
        let mut x = self.embed(f);
        for il in 0..f.hp.n_layer {
            x = self.block(f, il, x);
        }
        x
    }
    /// The whole stack: embeddings, every block, the final norm; returns the
    /// normalised hidden states `[n_embd, n_rows]`. Architectures override
    /// its parts, not this: a training step on the CPU runs [`hidden`] and
    /// [`output_norm`] in separate graphs.
    ///
    /// [`hidden`]: Architecture::hidden
    /// [`output_norm`]: Architecture::output_norm
    fn build<'a>(&self, f: &mut Forward<'a>) -> Tensor<'a> {
        let x = self.hidden(f);
        self.output_norm(f, x)
    }
}

/// Every supported architecture.
pub static REGISTRY: &[&dyn Architecture] = &[&llama::Llama, &qwen2::Qwen2, &qwen3::Qwen3, &gemma3::Gemma3];

/// Looks an architecture up by its GGUF name.
pub fn find(name: &str) -> Option<&'static dyn Architecture> {
    REGISTRY.iter().copied().find(|a| a.name() == name)
}

/// Names of all supported architectures, for messages.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|a| a.name()).collect()
}

fn decl(name: String, ne: &[usize], required: bool) -> TensorDecl {
    TensorDecl {
        name,
        ne: ne.iter().map(|&n| n as u64).collect(),
        required,
    }
}

/// Options of the common decoder layout (llama-like blocks).
#[derive(Default, Clone, Copy)]
struct Layout {
    /// Q/K/V biases are required (Qwen2).
    qkv_bias: bool,
    /// Per-head RMS norms on Q and K (Qwen3, Gemma 3).
    qk_norm: bool,
    /// Norms after attention and FFN outputs (Gemma 3).
    post_norms: bool,
}

/// Tensor declarations of a llama-like decoder.
fn decoder_tensors(hp: &Hparams, l: Layout) -> Vec<TensorDecl> {
    let (e, v, ff) = (hp.n_embd, hp.n_vocab, hp.n_ff);
    let mut out = vec![
        decl("token_embd.weight".into(), &[e, v], true),
        decl("output_norm.weight".into(), &[e], true),
        decl("output.weight".into(), &[e, v], false),
    ];
    for il in 0..hp.n_layer {
        let b = |s: &str| format!("blk.{il}.{s}");
        out.push(decl(b("attn_norm.weight"), &[e], true));
        out.push(decl(b("attn_q.weight"), &[e, hp.q_dim()], true));
        out.push(decl(b("attn_k.weight"), &[e, hp.k_dim()], true));
        out.push(decl(b("attn_v.weight"), &[e, hp.v_dim()], true));
        out.push(decl(b("attn_output.weight"), &[hp.head_dim_v * hp.n_head, e], true));
        out.push(decl(b("attn_q.bias"), &[hp.q_dim()], l.qkv_bias));
        out.push(decl(b("attn_k.bias"), &[hp.k_dim()], l.qkv_bias));
        out.push(decl(b("attn_v.bias"), &[hp.v_dim()], l.qkv_bias));
        out.push(decl(b("attn_output.bias"), &[e], false));
        if l.qk_norm {
            out.push(decl(b("attn_q_norm.weight"), &[hp.head_dim], true));
            out.push(decl(b("attn_k_norm.weight"), &[hp.head_dim], true));
        }
        if l.post_norms {
            out.push(decl(b("post_attention_norm.weight"), &[e], true));
            out.push(decl(b("post_ffw_norm.weight"), &[e], true));
        }
        out.push(decl(b("ffn_norm.weight"), &[e], true));
        out.push(decl(b("ffn_gate.weight"), &[e, ff], true));
        out.push(decl(b("ffn_up.weight"), &[e, ff], true));
        out.push(decl(b("ffn_down.weight"), &[ff, e], true));
    }
    out
}

/// The pre-norm decoder block shared by llama-like architectures: RMS norm,
/// rotary attention (with per-head Q/K norms when `qk_norm`), residual, RMS
/// norm, SwiGLU feed-forward, residual. Biases are added by
/// [`Forward::linear`] whenever the file has them.
fn swiglu_block<'a>(f: &mut Forward<'a>, il: usize, x: Tensor<'a>, qk_norm: bool) -> Tensor<'a> {
    use crate::model::hooks::TensorKind::*;
    let hp = f.hp;
    let c = f.ctx;
    let scale = 1.0 / (hp.head_dim as f32).sqrt();
    let h = f.rms_norm(x, &format!("blk.{il}.attn_norm.weight"));
    let mut q = f.heads(f.linear(Some(il), AttnQ, h), hp.head_dim, hp.n_head);
    let mut k = f.heads(f.linear(Some(il), AttnK, h), hp.head_dim, hp.n_head_kv);
    let v = f.heads(f.linear(Some(il), AttnV, h), hp.head_dim_v, hp.n_head_kv);
    if qk_norm {
        q = f.rms_norm(q, &format!("blk.{il}.attn_q_norm.weight"));
        k = f.rms_norm(k, &format!("blk.{il}.attn_k_norm.weight"));
    }
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
