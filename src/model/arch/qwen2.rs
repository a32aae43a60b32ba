//! `qwen2`: Qwen 2 / 2.5. Llama blocks with required Q/K/V biases and NeoX
//! rotary mode.

use super::{decoder_tensors, llama::Llama, Architecture, Layout, TensorDecl};
use crate::ggml::Tensor;
use crate::model::graph::Forward;
use crate::model::Hparams;

pub struct Qwen2;

impl Architecture for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn rope_mode(&self) -> i32 {
        2
    }

    fn tensors(&self, hp: &Hparams) -> Vec<TensorDecl> {
        decoder_tensors(
            hp,
            Layout {
                qkv_bias: true,
                ..Layout::default()
            },
        )
    }

    fn block<'a>(&self, f: &mut Forward<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        // Same blocks as llama: the biases are added by `Forward::linear`
        // whenever the file has them, and the rope mode comes from this file.
        Llama.block(f, il, x)
    }
}
