//! `gguf-peft export` and `gguf-peft import-adapter`: adapters between our
//! GGUF formats (llama.cpp LoRA, soft prompts) and HF PEFT.

use crate::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Adapter from `finetune`: a LoRA in llama.cpp's GGUF format or a soft
    /// prompt / prefix GGUF.
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
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors):
    /// LORA, or PROMPT_TUNING / P_TUNING / PREFIX_TUNING.
    dir: PathBuf,
    /// The GGUF base model the adapter is for.
    #[arg(short, long)]
    model: PathBuf,
    /// Output GGUF adapter (llama.cpp LoRA or soft prompt, written atomically).
    #[arg(short, long)]
    out: PathBuf,
}

/// The base model's hyperparameters and metadata (weights mapped, not read).
fn base(path: &std::path::Path) -> Result<crate::model::Model> {
    Ok(crate::model::Model::load(path, crate::ggml::Backend::cpu(1))?)
}

pub fn export(a: ExportArgs) -> Result<()> {
    if a.adapter.exists() && crate::export::soft_prompt::is_soft_prompt(&crate::gguf::GgufFile::open(&a.adapter)?) {
        crate::export::peft_prompt::export(&a.adapter, &base(&a.model)?, &a.out)?;
    } else {
        crate::export::peft::export(&a.adapter, &a.model, &a.out)?;
    }
    println!("{}", a.out.display());
    Ok(())
}

pub fn import(a: ImportArgs) -> Result<()> {
    if crate::export::peft_prompt::is_prompt_learning(&a.dir) {
        crate::export::peft_prompt::import(&a.dir, &base(&a.model)?, &a.out)?;
    } else {
        crate::export::peft::import(&a.dir, &a.model, &a.out)?;
    }
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
    #[command(flatten)]
    threads: super::ThreadsArgs,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    a.threads.apply();
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
