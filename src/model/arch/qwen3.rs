//! `qwen3`: Qwen 3 dense. Llama blocks with per-head RMS norms on Q and K
//! (before RoPE), NeoX rotary mode, no biases.

use super::{decoder_tensors, swiglu_block, Architecture, Layout, TensorDecl};
use crate::ggml::Tensor;
use crate::model::graph::Forward;
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
        swiglu_block(f, il, x, true)
    }
}
