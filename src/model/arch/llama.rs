//! `llama`: Llama 2/3, Mistral, SmolLM2 and friends. Pre-norm blocks with
//! RMS norm, rotary attention (normal mode), SwiGLU feed-forward. Optional
//! biases on any projection are added when the file has them.

use super::{decoder_tensors, swiglu_block, Architecture, Layout, TensorDecl};
use crate::ggml::Tensor;
use crate::model::graph::Forward;
use crate::model::Hparams;

pub struct Llama;

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn rope_mode(&self) -> i32 {
        0
    }

    fn tensors(&self, hp: &Hparams) -> Vec<TensorDecl> {
        decoder_tensors(hp, Layout::default())
    }

    fn block<'a>(&self, f: &mut Forward<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        swiglu_block(f, il, x, false)
    }
}
