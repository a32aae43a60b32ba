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

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// HF checkpoint directory (config.json, *.safetensors, tokenizer.json).
    dir: PathBuf,
    /// Output GGUF (written atomically).
    #[arg(short, long)]
    out: PathBuf,
    /// Type of the 2-D weights (f32, f16, bf16, q8_0, q4_k, ...); 1-D tensors stay F32.
    #[arg(long = "type", default_value = "f16")]
    ty: String,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let ty = crate::ggml::GgmlType::from_name(&a.ty)
        .ok_or_else(|| crate::Error::Msg(format!("--type: unknown ggml type '{}'", a.ty)))?;
    let rep = crate::convert::hf::convert(&a.dir, &a.out, ty)?;
    eprintln!(
        "{}: {} tensors written ({} architecture, weights as {ty})",
        a.out.display(),
        rep.n_tensors,
        rep.arch
    );
    for (name, e) in &rep.nf4 {
        eprintln!("  {name}: from NF4, max |Δ| after {ty} {e:.3e}");
    }
    println!("{}", a.out.display());
    Ok(())
}
