//! The contract between architectures and PEFT methods.
//!
//! Architectures call these hooks at fixed points of the graph; methods
//! implement them. An architecture never names a method and a method never
//! names an architecture.

use super::graph::Forward;
use crate::ggml::{Context, Graph, Tensor};

/// What a weight matmul computes, independent of the architecture's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorKind {
    TokenEmbd,
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    FfnGate,
    FfnUp,
    FfnDown,
    Output,
}

impl TensorKind {
    /// The GGUF tensor name stem (`attn_q`, `ffn_down`, ...).
    pub fn gguf_name(self) -> &'static str {
        match self {
            TensorKind::TokenEmbd => "token_embd",
            TensorKind::AttnQ => "attn_q",
            TensorKind::AttnK => "attn_k",
            TensorKind::AttnV => "attn_v",
            TensorKind::AttnOut => "attn_output",
            TensorKind::FfnGate => "ffn_gate",
            TensorKind::FfnUp => "ffn_up",
            TensorKind::FfnDown => "ffn_down",
            TensorKind::Output => "output",
        }
    }

    /// Every kind, in a fixed order.
    pub const ALL: [TensorKind; 9] = [
        TensorKind::TokenEmbd,
        TensorKind::AttnQ,
        TensorKind::AttnK,
        TensorKind::AttnV,
        TensorKind::AttnOut,
        TensorKind::FfnGate,
        TensorKind::FfnUp,
        TensorKind::FfnDown,
        TensorKind::Output,
    ];

    /// Parses a GGUF stem.
    pub fn from_gguf_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.gguf_name() == s)
    }
}

/// Where a weight matmul happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Block index, `None` for token embedding and output.
    pub layer: Option<usize>,
    pub kind: TensorKind,
    /// The GGUF name of the weight tensor, e.g. `blk.3.attn_q.weight`.
    pub weight: String,
}

/// Hook points an adapter can answer. Every default is the identity, so the
/// base model is `NoHooks`.
pub trait Hooks {
    /// Every weight matmul: `y = W x` by default (ggml `mul_mat(w, x)`).
    fn linear<'a>(&'a self, ctx: &'a Context, site: &Site, w: Tensor<'a>, x: Tensor<'a>) -> Tensor<'a> {
        let _ = site;
        ctx.mul_mat(w, x)
    }

    /// The token-embedding lookup: rows `ids` (I32) of `w` by default.
    fn embed<'a>(&'a self, ctx: &'a Context, site: &Site, w: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        let _ = site;
        ctx.get_rows(w, ids)
    }

    /// Rows of virtual tokens prepended to every sequence that starts in a
    /// batch (prompt tuning, P-tuning); [`Hooks::virtual_tokens`] gives them.
    fn n_virtual_tokens(&self) -> usize {
        0
    }

    /// Positions taken before a sequence's real tokens (by virtual tokens or
    /// by prefix key/value entries): real tokens run at `pos + this`.
    fn n_virtual_positions(&self) -> usize {
        self.n_virtual_tokens()
    }

    /// The virtual tokens, `[n_embd, n_virtual_tokens]`, in the space of the
    /// input embeddings after the architecture's scaling.
    /// `f` offers graph helpers (e.g. a concatenation with a backward).
    fn virtual_tokens<'a>(&'a self, f: &Forward<'a>) -> Option<Tensor<'a>> {
        let _ = f;
        None
    }

    /// Key and value entries prepended to layer `layer`'s attention (prefix
    /// tuning), each `[head_dim, n_head_kv, n_prefix]`, visible to every
    /// query and not rotated (they stand for keys already past RoPE).
    fn attn_kv_prefix<'a>(&'a self, f: &Forward<'a>, layer: usize) -> Option<(Tensor<'a>, Tensor<'a>)> {
        let _ = (f, layer);
        None
    }

    /// A head that replaces the LM head (sequence classification): scores
    /// `[n_classes, n_outputs]` from the final normalised hidden states of
    /// the output rows `[n_embd, n_outputs]`.
    fn output_head<'a>(&'a self, f: &Forward<'a>, h: Tensor<'a>) -> Option<Tensor<'a>> {
        let _ = (f, h);
        None
    }

    /// The class names of [`Hooks::output_head`], in score order.
    fn class_labels(&self) -> Option<&[String]> {
        None
    }

    /// The attention block's output before the residual add.
    fn after_attn<'a>(&'a self, ctx: &'a Context, layer: usize, h: Tensor<'a>) -> Tensor<'a> {
        let _ = (ctx, layer);
        h
    }

    /// The feed-forward block's output before the residual add.
    fn after_ffn<'a>(&'a self, ctx: &'a Context, layer: usize, h: Tensor<'a>) -> Tensor<'a> {
        let _ = (ctx, layer);
        h
    }

    /// Writes the inputs the hooks added to an allocated graph (dropout
    /// masks, constants); called after the builder's own inputs.
    fn fill_inputs(&self, g: &Graph<'_>) {
        let _ = g;
    }

    /// The output of a matmul after its (optional) model bias.
    fn bias<'a>(&'a self, ctx: &'a Context, site: &Site, y: Tensor<'a>) -> Tensor<'a> {
        let _ = (ctx, site);
        y
    }
}

/// The base model: every hook is the identity.
pub struct NoHooks;

impl Hooks for NoHooks {}
