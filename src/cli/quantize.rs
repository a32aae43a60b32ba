//! `gguf-peft quantize`: requantize a GGUF model to another ggml type.

use crate::ggml::GgmlType;
use crate::{Error, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF model.
    input: PathBuf,
    /// Output GGUF model (written atomically).
    output: PathBuf,
    /// Target type of every matrix (f32, f16, bf16, q8_0, q4_0, q4_1, q5_k,
    /// q4_k, q6_k, iq4_nl, ...; types that need an importance matrix are refused).
    #[arg(long = "type")]
    ty: String,
    #[command(flatten)]
    threads: super::ThreadsArgs,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    a.threads.apply();
    let ty = GgmlType::from_name(&a.ty).ok_or_else(|| Error::Msg(format!("--type: unknown ggml type '{}'", a.ty)))?;
    let rep = super::with_progress("quantize", |p| {
        crate::export::quantize::quantize(&a.input, &a.output, ty, p)
    })?;
    eprintln!(
        "converted {} matrices to {ty} (max |Δ| {:.3e}){}",
        rep.n_converted,
        rep.max_error,
        if rep.kept.is_empty() {
            String::new()
        } else {
            format!(
                "; kept {} whose rows do not fit {ty}'s blocks: {}",
                rep.kept.len(),
                rep.kept.join(", ")
            )
        }
    );
    println!("{}", a.output.display());
    Ok(())
}
