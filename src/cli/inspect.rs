//! `gguf-peft inspect`: architecture, hyperparameters and the tensor table.

use crate::gguf::GgufFile;
use crate::model::{arch, Hparams};
use crate::{Error, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

/// `writeln!` into a String, which cannot fail.
macro_rules! w {
    ($($t:tt)*) => {{
        let _ = writeln!($($t)*);
    }};
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file (model or adapter).
    model: PathBuf,
    /// Also list every metadata key.
    #[arg(long)]
    metadata: bool,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Leave out the per-tensor table.
    #[arg(long)]
    summary: bool,
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i < U.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", U[i])
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    let mut out = String::new();
    report(&a, &mut out)?;
    super::print_stdout(&out);
    Ok(())
}

fn report(a: &InspectArgs, out: &mut String) -> Result<()> {
    if !a.model.exists() {
        return Err(Error::Msg(format!("{}: no such file", a.model.display())));
    }
    let f = GgufFile::open(&a.model)?;
    let arch_name = f.get_str("general.architecture")?.to_owned();
    let kind = f
        .get("general.type")
        .and_then(|v| v.as_str())
        .unwrap_or("model")
        .to_owned();
    // Adapters and checkpoints carry the architecture but not its hyperparameters.
    let hp = match arch::find(&arch_name) {
        Some(_) if kind == "model" => Some(Hparams::from_gguf(&f, &arch_name).map_err(Error::from)?),
        _ => None,
    };
    let total = f.tensor_bytes_total();
    let n_params: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in f.tensors() {
        let e = by_type.entry(t.ty.name().to_owned()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    if a.json {
        let tensors: Vec<_> = f
            .tensors()
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "type": t.ty.name(), "shape": t.ne, "bytes": t.size}))
            .collect();
        let mut j = serde_json::json!({
            "file": &a.model,
            "gguf_version": f.version,
            "architecture": arch_name,
            "type": kind,
            "supported": hp.is_some(),
            "n_tensors": f.tensors().len(),
            "n_params": n_params,
            "tensor_bytes": total,
            "tensors": tensors,
        });
        if let Some(hp) = &hp {
            j["hparams"] = hparams_json(hp);
        }
        if a.metadata {
            let m: serde_json::Map<String, serde_json::Value> = f
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.display_short())))
                .collect();
            j["metadata"] = serde_json::Value::Object(m);
        }
        w!(out, "{}", serde_json::to_string_pretty(&j).expect("serialisable"));
        return Ok(());
    }
    w!(out, "file:          {} (GGUF v{})", a.model.display(), f.version);
    if let Some(n) = f.get("general.name").and_then(|v| v.as_str()) {
        w!(out, "name:          {n}");
    }
    let support = if hp.is_some() || kind != "model" {
        String::new()
    } else {
        format!(" (not supported for training; supported: {})", arch::names().join(", "))
    };
    w!(out, "architecture:  {arch_name}{support}");
    if kind != "model" {
        w!(out, "type:          {kind}");
        for key in [
            "adapter.type",
            "adapter.lora.alpha",
            "adapter.peft_method",
            "adapter.num_virtual_tokens",
            "adapter.classes",
            "general.base_model.name",
            "gguf_peft.lora.config",
            "gguf_peft.config",
        ] {
            if let Some(v) = f.get(key) {
                w!(out, "  {key} = {}", v.display_short());
            }
        }
    }
    if let Some(hp) = &hp {
        w!(
            out,
            "hparams:       n_vocab {} · n_ctx_train {} · n_embd {} · n_layer {} · n_ff {}",
            hp.n_vocab,
            hp.n_ctx_train,
            hp.n_embd,
            hp.n_layer,
            hp.n_ff
        );
        w!(
            out,
            "attention:     n_head {} · n_head_kv {} · head_dim {} · rope base {} · rms eps {:e}{}",
            hp.n_head,
            hp.n_head_kv,
            hp.head_dim,
            hp.rope_freq_base,
            hp.rms_eps,
            if hp.sliding_window > 0 {
                format!(" · sliding window {}", hp.sliding_window)
            } else {
                String::new()
            }
        );
        let tied = f.tensor("output.weight").is_none();
        w!(
            out,
            "lm head:       {}",
            if tied { "tied to token_embd" } else { "output.weight" }
        );
    }
    w!(
        out,
        "parameters:    {} ({:.1} M) in {} tensors, {}",
        n_params,
        n_params as f64 / 1e6,
        f.tensors().len(),
        human_bytes(total)
    );
    let types: Vec<String> = by_type
        .iter()
        .map(|(t, (n, b))| format!("{t} ×{n} ({})", human_bytes(*b)))
        .collect();
    w!(out, "types:         {}", types.join(", "));
    if a.metadata {
        w!(out, "\nmetadata:");
        for (k, v) in f.metadata() {
            w!(out, "  {k:48} {}", v.display_short());
        }
    }
    if a.summary {
        return Ok(());
    }
    w!(out, "\n{:<40} {:>7} {:>20} {:>12}", "tensor", "type", "shape", "size");
    for t in f.tensors() {
        w!(
            out,
            "{:<40} {:>7} {:>20} {:>12}",
            t.name,
            t.ty.name(),
            t.shape_str(),
            human_bytes(t.size)
        );
    }
    Ok(())
}

fn hparams_json(hp: &Hparams) -> serde_json::Value {
    serde_json::json!({
        "n_vocab": hp.n_vocab, "n_ctx_train": hp.n_ctx_train, "n_embd": hp.n_embd,
        "n_layer": hp.n_layer, "n_ff": hp.n_ff, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
        "head_dim": hp.head_dim, "rope_freq_base": hp.rope_freq_base, "rms_eps": hp.rms_eps,
        "sliding_window": hp.sliding_window,
    })
}
