//! llama.cpp's GGUF LoRA format (what `llama-cli --lora` loads):
//! `general.type = "adapter"`, `general.architecture` of the base,
//! `adapter.type = "lora"`, `adapter.lora.alpha` (runtime scale = alpha / r,
//! r read per tensor from `lora_b.ne[0]`), tensors `<base>.lora_a`
//! ne = [n_in, r] and `<base>.lora_b` ne = [r, n_out], F32. Our own
//! configuration rides along under `gguf_peft.*` keys so a run can be resumed
//! or re-exported from the file alone.

use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use crate::model::Model;
use crate::peft::lora::{Lora, LoraConfig, LoraSite};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `lora` (trained on `model`) atomically to `path`.
pub fn write(lora: &Lora, model: &Model, path: &Path) -> Result<()> {
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("adapter".into()));
    w.set("general.architecture", Value::String(model.hparams.arch.clone()));
    if let Some(n) = model.file.get("general.name").and_then(|v| v.as_str()) {
        w.set("general.base_model.name", Value::String(n.to_owned()));
    }
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(lora.alpha_file));
    let cfg = serde_json::to_string(&lora.config).expect("serialisable");
    w.set("gguf_peft.lora.config", Value::String(cfg));
    let mut datas = Vec::new();
    for s in lora.sites() {
        let (sa, sb) = s.shapes();
        for (suffix, t, ne) in [
            ("lora_a", lora.tensor_a(&s.weight), sa),
            ("lora_b", lora.tensor_b(&s.weight), sb),
        ] {
            w.add_tensor(TensorSpec {
                name: format!("{}.{suffix}", s.weight),
                ty: GgmlType::F32,
                ne: ne.iter().map(|&n| n as u64).collect(),
            });
            datas.push(f32_bytes(&t.read_f32()));
        }
    }
    w.write(path, |i| Ok(Cow::Borrowed(&datas[i][..])))?;
    Ok(())
}

/// Reads a llama.cpp LoRA adapter for `model`, checking that it belongs to
/// this base (architecture, tensor names and shapes).
pub fn read(path: &Path, model: &Model) -> Result<Lora> {
    if !path.exists() {
        return Err(Error::Msg(format!("{}: no such file", path.display())));
    }
    let f = GgufFile::open(path)?;
    let p = path.display();
    let bad = |msg: String| Error::Msg(format!("{p}: {msg}"));
    if f.get("general.type").and_then(|v| v.as_str()) != Some("adapter")
        || f.get("adapter.type").and_then(|v| v.as_str()) != Some("lora")
    {
        return Err(bad(
            "not a LoRA adapter (general.type must be 'adapter', adapter.type 'lora')".into(),
        ));
    }
    let arch = f.get_str("general.architecture")?;
    if arch != model.hparams.arch {
        return Err(bad(format!(
            "adapter is for architecture '{arch}' but the model '{}' is '{}' (wrong base model?)",
            model.path().display(),
            model.hparams.arch
        )));
    }
    let alpha = f.get_f64_opt("adapter.lora.alpha")?.unwrap_or(0.0) as f32;
    let config: LoraConfig = f
        .get("gguf_peft.lora.config")
        .and_then(|v| v.as_str())
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let mut pairs: BTreeMap<String, (Option<&crate::gguf::TensorInfo>, Option<&crate::gguf::TensorInfo>)> =
        BTreeMap::new();
    for t in f.tensors() {
        if let Some(base) = t.name.strip_suffix(".lora_a") {
            pairs.entry(base.to_owned()).or_default().0 = Some(t);
        } else if let Some(base) = t.name.strip_suffix(".lora_b") {
            pairs.entry(base.to_owned()).or_default().1 = Some(t);
        } else {
            return Err(bad(format!("unexpected tensor '{}' in a LoRA adapter", t.name)));
        }
    }
    if pairs.is_empty() {
        return Err(bad("adapter has no LoRA tensors".into()));
    }
    let mut sites = Vec::new();
    let mut order: Vec<String> = Vec::new();
    for (base, (a, b)) in &pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!("LoRA pair for '{base}' is missing lora_a or lora_b")));
        };
        let w = model.weights().get(base).ok_or_else(|| {
            bad(format!(
                "tensor '{base}' does not exist in {} (maybe wrong base model?)",
                model.path().display()
            ))
        })?;
        let [n_in, n_out, _, _] = w.ne();
        let embedding = base == "token_embd.weight";
        // The token embedding's pair is flipped: a = [r, n_vocab], b = [r, n_embd].
        let (n_in, n_out, rank_a) = if embedding {
            (n_out, n_in, a.ne[0])
        } else {
            (n_in, n_out, a.ne.get(1).copied().unwrap_or(0))
        };
        let expect_a: Vec<u64> = if embedding {
            vec![rank_a, n_in as u64]
        } else {
            vec![n_in as u64, rank_a]
        };
        if a.ne != expect_a || b.ne != vec![rank_a, n_out as u64] {
            return Err(bad(format!(
                "LoRA for '{base}' has shapes {} and {} that do not fit the base weight {:?} (wrong base model?)",
                a.shape_str(),
                b.shape_str(),
                w.ne()
            )));
        }
        for t in [a, b] {
            if t.ty != GgmlType::F32 && t.ty != GgmlType::F16 {
                return Err(bad(format!(
                    "tensor '{}' has type {}; only F32 and F16 are supported",
                    t.name, t.ty
                )));
            }
        }
        sites.push(LoraSite {
            weight: base.clone(),
            n_in: n_in as usize,
            n_out: n_out as usize,
            rank: rank_a as usize,
        });
        order.push(base.clone());
    }
    let lora = Lora::alloc(model, config, alpha, sites);
    for base in &order {
        let (a, b) = pairs[base];
        for (info, t) in [(a.unwrap(), lora.tensor_a(base)), (b.unwrap(), lora.tensor_b(base))] {
            let vals = info.ty.to_f32(f.tensor_data(info), info.n_elements() as usize);
            t.write_f32(&vals);
        }
    }
    Ok(lora)
}
