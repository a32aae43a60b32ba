//! Export formats, one file each.

pub mod llama_lora;
