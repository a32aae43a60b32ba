//! llama.cpp's GGUF LoRA format (what `llama-cli --lora` loads):
//! `general.type = "adapter"`, `general.architecture` of the base,
//! `adapter.type = "lora"`, `adapter.lora.alpha` (runtime scale = alpha / r,
//! r read per tensor from `lora_b.ne[0]`), tensors `<base>.lora_a`
//! ne = [n_in, r] and `<base>.lora_b` ne = [r, n_out], F32. Our own
//! configuration rides along under `gguf_peft.*` keys so a run can be resumed
//! or re-exported from the file alone.

use crate::ggml::{f32_bytes, GgmlType};
use crate::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use crate::model::Model;
use crate::peft::lora::{Lora, LoraConfig, LoraSite};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `lora` (trained on `model`) atomically to `path`.
pub fn write(lora: &Lora, model: &Model, path: &Path) -> Result<()> {
    let host = HostLora {
        alpha: lora.alpha_file,
        config: lora.config.clone(),
        pairs: lora
            .sites()
            .iter()
            .map(|s| HostPair {
                base: s.weight.clone(),
                site: s.clone(),
                a: lora.tensor_a(&s.weight).read_f32(),
                b: lora.tensor_b(&s.weight).read_f32(),
            })
            .collect(),
    };
    write_host(&host, &model.file, path)
}

/// Writes a host-side adapter for the base model `base` atomically to `path`.
pub fn write_host(lora: &HostLora, base: &GgufFile, path: &Path) -> Result<()> {
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("adapter".into()));
    w.set(
        "general.architecture",
        Value::String(base.get_str("general.architecture")?.to_owned()),
    );
    if let Some(n) = base.get("general.name").and_then(|v| v.as_str()) {
        w.set("general.base_model.name", Value::String(n.to_owned()));
    }
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(lora.alpha));
    let cfg = serde_json::to_string(&lora.config).expect("serialisable");
    w.set("gguf_peft.lora.config", Value::String(cfg));
    let mut datas = Vec::new();
    for p in &lora.pairs {
        let (sa, sb) = p.site.shapes();
        for (suffix, v, ne) in [("lora_a", &p.a, sa), ("lora_b", &p.b, sb)] {
            w.add_tensor(TensorSpec {
                name: format!("{}.{suffix}", p.base),
                ty: GgmlType::F32,
                ne: ne.iter().map(|&n| n as u64).collect(),
            });
            datas.push(f32_bytes(v));
        }
    }
    w.write(path, |i| Ok(Cow::Borrowed(&datas[i][..])))?;
    Ok(())
}

/// One adapted weight of an adapter file, on the host.
pub struct HostPair {
    /// The base weight's name.
    pub base: String,
    pub site: LoraSite,
    /// `lora_a` values in its file layout (see [`LoraSite::shapes`]).
    pub a: Vec<f32>,
    /// `lora_b` values, `n_out` rows of `rank`.
    pub b: Vec<f32>,
}

/// A LoRA adapter file read on the host and checked against a base model's
/// tensors (architecture, names, shapes).
pub struct HostLora {
    pub alpha: f32,
    pub config: LoraConfig,
    pub pairs: Vec<HostPair>,
}

impl HostLora {
    /// The multiplier of `B A` for a pair at user scale `scale` (as llama.cpp:
    /// `scale * alpha / rank`, or `scale` when alpha is 0).
    pub fn pair_scale(&self, p: &HostPair, scale: f32) -> f32 {
        if self.alpha == 0.0 {
            scale
        } else {
            scale * self.alpha / p.site.rank as f32
        }
    }
}

/// Reads a llama.cpp LoRA adapter and checks it against `base` (the base
/// model's GGUF), whose architecture and tensor shapes it must fit.
pub fn read_host(path: &Path, base: &GgufFile) -> Result<HostLora> {
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
    let base_arch = base.get_str("general.architecture")?;
    if arch != base_arch {
        return Err(bad(format!(
            "adapter is for architecture '{arch}' but the model '{}' is '{base_arch}' (wrong base model?)",
            base.path().display(),
        )));
    }
    let alpha = f.get_f64_opt("adapter.lora.alpha")?.unwrap_or(0.0) as f32;
    let config: LoraConfig = f
        .get("gguf_peft.lora.config")
        .and_then(|v| v.as_str())
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    type Pair<'f> = (Option<&'f crate::gguf::TensorInfo>, Option<&'f crate::gguf::TensorInfo>);
    let mut found: BTreeMap<String, Pair<'_>> = BTreeMap::new();
    for t in f.tensors() {
        if let Some(b) = t.name.strip_suffix(".lora_a") {
            found.entry(b.to_owned()).or_default().0 = Some(t);
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            found.entry(b.to_owned()).or_default().1 = Some(t);
        } else {
            return Err(bad(format!("unexpected tensor '{}' in a LoRA adapter", t.name)));
        }
    }
    if found.is_empty() {
        return Err(bad("adapter has no LoRA tensors".into()));
    }
    let mut pairs = Vec::new();
    for (name, (a, b)) in &found {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!("LoRA pair for '{name}' is missing lora_a or lora_b")));
        };
        let w = base.tensor(name).ok_or_else(|| {
            bad(format!(
                "tensor '{name}' does not exist in {} (maybe wrong base model?)",
                base.path().display()
            ))
        })?;
        if w.ne.len() != 2 {
            return Err(bad(format!("base tensor '{name}' is not a matrix")));
        }
        let embedding = name == "token_embd.weight";
        // The token embedding's pair is flipped: a = [r, n_vocab], b = [r, n_embd].
        let (n_in, n_out, rank) = if embedding {
            (w.ne[1], w.ne[0], a.ne[0])
        } else {
            (w.ne[0], w.ne[1], a.ne.get(1).copied().unwrap_or(0))
        };
        let expect_a = if embedding { vec![rank, n_in] } else { vec![n_in, rank] };
        if rank == 0 || a.ne != expect_a || b.ne != vec![rank, n_out] {
            return Err(bad(format!(
                "LoRA for '{name}' has shapes {} and {} that do not fit the base weight {} (wrong base model?)",
                a.shape_str(),
                b.shape_str(),
                w.shape_str()
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
        let read = |t: &crate::gguf::TensorInfo| t.ty.to_f32(f.tensor_data(t), t.n_elements() as usize);
        pairs.push(HostPair {
            base: name.clone(),
            site: LoraSite {
                weight: name.clone(),
                n_in: n_in as usize,
                n_out: n_out as usize,
                rank: rank as usize,
            },
            a: read(a),
            b: read(b),
        });
    }
    Ok(HostLora { alpha, config, pairs })
}

/// Reads a llama.cpp LoRA adapter for `model`, checking that it belongs to
/// this base (architecture, tensor names and shapes).
pub fn read(path: &Path, model: &Model) -> Result<Lora> {
    let h = read_host(path, &model.file)?;
    let sites = h.pairs.iter().map(|p| p.site.clone()).collect();
    let lora = Lora::alloc(model, h.config, h.alpha, sites)?;
    for p in &h.pairs {
        lora.tensor_a(&p.base).write_f32(&p.a);
        lora.tensor_b(&p.base).write_f32(&p.b);
    }
    Ok(lora)
}
