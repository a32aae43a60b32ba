//! gguf-peft: parameter-efficient fine-tuning directly on GGUF-quantized
//! models through ggml.
//!
//! Layers, bottom up: [`ggml`] (the only unsafe code: ggml, gguf and
//! llama.cpp handles), [`gguf`] (file reading and writing), [`model`]
//! (hyperparameters, frozen weights, one graph builder per architecture with
//! hook points for adapters), [`tokenizer`], and the CLI in the binary.

pub mod cli;
pub mod convert;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod ggml;
pub mod gguf;
pub mod model;
pub mod peft;
pub mod rng;
pub mod tokenizer;
pub mod train;

mod error;
pub use error::{Error, Result};
