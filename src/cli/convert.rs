//! `gguf-peft export` and `gguf-peft import-adapter`: adapters between
//! llama.cpp's GGUF LoRA format and HF PEFT.

use crate::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// LoRA adapter in llama.cpp's GGUF format.
    #[arg(short, long)]
    adapter: PathBuf,
    /// The base model the adapter belongs to (names, shapes, head counts for
    /// the Q/K row permutation).
    #[arg(short, long)]
    model: PathBuf,
    /// Output format.
    #[arg(long, default_value = "peft", value_parser = ["peft"])]
    format: String,
    /// Output directory (adapter_config.json, adapter_model.safetensors).
    #[arg(short, long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    dir: PathBuf,
    /// The GGUF base model the adapter is for.
    #[arg(short, long)]
    model: PathBuf,
    /// Output llama.cpp LoRA adapter (GGUF, written atomically).
    #[arg(short, long)]
    out: PathBuf,
}

pub fn export(a: ExportArgs) -> Result<()> {
    crate::export::peft::export(&a.adapter, &a.model, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}

pub fn import(a: ImportArgs) -> Result<()> {
    crate::export::peft::import(&a.dir, &a.model, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}
