//! Export formats, one file each.

pub mod llama_lora;
pub mod merge;
pub mod peft;
pub mod quantize;
pub mod soft_prompt;
