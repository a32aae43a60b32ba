//! `gguf-peft merge`: fold LoRA adapters into the base model's weights.

use crate::export::merge::{merge, MergeType};
use crate::ggml::GgmlType;
use crate::{Error, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model (GGUF).
    #[arg(short, long)]
    model: PathBuf,
    /// LoRA adapter in llama.cpp's GGUF format; repeat for several.
    #[arg(short, long, required = true)]
    adapter: Vec<PathBuf>,
    /// Scale of each adapter, in the order given (one value applies to all).
    #[arg(short, long)]
    scale: Vec<f32>,
    /// Output GGUF (written atomically).
    #[arg(short, long)]
    out: PathBuf,
    /// Type of the merged tensors: `keep` (each tensor's own type) or a ggml
    /// type (f32, f16, bf16, q8_0, q4_k, ...). Untouched tensors are always
    /// copied byte for byte.
    #[arg(long = "type", default_value = "keep")]
    ty: String,
    #[command(flatten)]
    threads: super::ThreadsArgs,
}

pub fn run(a: MergeArgs) -> Result<()> {
    a.threads.apply();
    let ty = match a.ty.as_str() {
        "keep" => MergeType::Keep,
        t => {
            MergeType::To(GgmlType::from_name(t).ok_or_else(|| Error::Msg(format!("--type: unknown ggml type '{t}'")))?)
        }
    };
    let scales: Vec<f32> = match a.scale.len() {
        0 => vec![1.0; a.adapter.len()],
        1 => vec![a.scale[0]; a.adapter.len()],
        n if n == a.adapter.len() => a.scale.clone(),
        n => {
            return Err(Error::Msg(format!(
                "{n} --scale values for {} adapters (give one, or one per adapter)",
                a.adapter.len()
            )))
        }
    };
    let adapters: Vec<(&std::path::Path, f32)> = a.adapter.iter().map(|p| p.as_path()).zip(scales).collect();
    let rep = super::with_progress("merge", |p| merge(&a.model, &adapters, &a.out, ty, p))?;
    let mut types: Vec<String> = rep.merged.iter().map(|m| m.ty.name().to_string()).collect();
    types.sort();
    types.dedup();
    let kept = rep.merged.iter().map(|m| m.kept as f64).sum::<f64>() / rep.merged.len().max(1) as f64;
    eprintln!(
        "merged {} of {} tensors (written as {}), copied the rest byte for byte; {:.0}% of the adapters' change survives the written types",
        rep.merged.len(),
        rep.n_tensors,
        types.join(", "),
        100.0 * kept
    );
    if kept < 0.5 {
        eprintln!(
            "warning: most of the change is below the resolution of {}; the merged model will behave mostly like the base. \
             Use --type q8_0 (or f16), or keep the adapter separate (llama.cpp --lora)",
            types.join(", ")
        );
    }
    println!("{}", a.out.display());
    Ok(())
}
