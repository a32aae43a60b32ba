//! Export formats, one file each.

pub mod llama_lora;
pub mod merge;
pub mod peft;
pub mod peft_prompt;
pub mod quantize;
pub mod soft_prompt;
