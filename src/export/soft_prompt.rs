//! Our GGUF format for the prompt family (prompt tuning, P-tuning, prefix
//! tuning, P-tuning v2). It stores what inference needs, whatever was
//! trained to produce it:
//!
//! - `general.type = "adapter"`, `general.architecture` of the base,
//!   `general.base_model.name` when the base has a name;
//! - `adapter.type`: `"prompt"` (virtual tokens in the residual stream) or
//!   `"prefix"` (key/value entries in every attention layer);
//! - `adapter.peft_method`: `prompt_tuning`, `p_tuning`, `prefix_tuning` or
//!   `p_tuning_v2`; `adapter.num_virtual_tokens` (u32);
//! - `gguf_peft.config`: the method's configuration as JSON;
//! - prompt: tensor `virtual_tokens`, F32, ne = [n_embd, n_virtual], the
//!   input embeddings after the architecture's scaling, at positions
//!   0..n_virtual (feed them through `llama_batch.embd` ahead of the tokens);
//! - prefix: tensors `blk.N.prefix_k` and `blk.N.prefix_v`, F32,
//!   ne = [head_dim, n_head_kv, n_virtual] (keys as attention sees them, no
//!   RoPE applied); real tokens then sit at positions n_virtual.. (as PEFT),
//!   or at 0.. when `adapter.prefix.keep_positions` is true;
//! - a classification head (P-tuning v2 on labeled data): tensor
//!   `score.weight`, F32, ne = [n_embd, n_classes], applied to the last
//!   token's final normalised hidden state instead of the LM head, and
//!   `adapter.classes`, the class names in score order.

use crate::ggml::{f32_bytes, GgmlType};
use crate::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use crate::model::Model;
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::Path;

/// A soft prompt on the host.
#[derive(Debug, Clone)]
pub struct SoftPrompt {
    /// `prompt_tuning`, `p_tuning`, `prefix_tuning` or `p_tuning_v2`.
    pub method: String,
    pub n_virtual: usize,
    /// Virtual tokens, `n_embd` values each (prompt kinds).
    pub tokens: Option<Vec<f32>>,
    /// Per layer: keys and values, `[head_dim, n_head_kv, n_virtual]` each
    /// (prefix kinds; empty otherwise).
    pub prefix: Vec<(Vec<f32>, Vec<f32>)>,
    /// Prefix kinds: real tokens keep positions 0.. (not PEFT's layout).
    pub keep_positions: bool,
    /// A classification head: class names and weights `[n_embd, n_classes]`.
    pub head: Option<(Vec<String>, Vec<f32>)>,
    /// The method's configuration (JSON).
    pub config: String,
}

impl SoftPrompt {
    /// `prompt` or `prefix`.
    pub fn kind(&self) -> &'static str {
        if self.tokens.is_some() {
            "prompt"
        } else {
            "prefix"
        }
    }
}

/// Writes `sp` (for `model`) atomically to `path`.
pub fn write(sp: &SoftPrompt, model: &Model, path: &Path) -> Result<()> {
    let hp = &model.hparams;
    let base = &model.file;
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("adapter".into()));
    w.set("general.architecture", Value::String(hp.arch.clone()));
    if let Some(n) = base.get("general.name").and_then(|v| v.as_str()) {
        w.set("general.base_model.name", Value::String(n.to_owned()));
    }
    w.set("adapter.type", Value::String(sp.kind().into()));
    w.set("adapter.peft_method", Value::String(sp.method.clone()));
    w.set("adapter.num_virtual_tokens", Value::U32(sp.n_virtual as u32));
    w.set("gguf_peft.config", Value::String(sp.config.clone()));
    if sp.keep_positions {
        w.set("adapter.prefix.keep_positions", Value::Bool(true));
    }
    if let Some((classes, _)) = &sp.head {
        let names = classes.iter().map(|c| Value::String(c.clone())).collect();
        w.set("adapter.classes", Value::Array(crate::gguf::ValueType::String, names));
    }
    let n = sp.n_virtual as u64;
    let mut datas = Vec::new();
    if n > 0 {
        let mut add = |name: String, ne: Vec<u64>, v: &[f32]| {
            w.add_tensor(TensorSpec {
                name,
                ty: GgmlType::F32,
                ne,
            });
            datas.push(f32_bytes(v));
        };
        if let Some(t) = &sp.tokens {
            add("virtual_tokens".into(), vec![hp.n_embd as u64, n], t);
        }
        for (il, (k, v)) in sp.prefix.iter().enumerate() {
            let (hd, nkv) = (hp.head_dim as u64, hp.n_head_kv as u64);
            add(format!("blk.{il}.prefix_k"), vec![hd, nkv, n], k);
            add(format!("blk.{il}.prefix_v"), vec![hp.head_dim_v as u64, nkv, n], v);
        }
    }
    if let Some((classes, wts)) = &sp.head {
        w.add_tensor(TensorSpec {
            name: crate::peft::prefix::HEAD.into(),
            ty: GgmlType::F32,
            ne: vec![hp.n_embd as u64, classes.len() as u64],
        });
        datas.push(f32_bytes(wts));
    }
    w.write(path, |i| Ok(Cow::Borrowed(&datas[i][..])))?;
    Ok(())
}

/// Whether `path` is one of our soft-prompt files (`adapter.type` prompt
/// or prefix).
pub fn is_soft_prompt(f: &GgufFile) -> bool {
    matches!(
        f.get("adapter.type").and_then(|v| v.as_str()),
        Some("prompt") | Some("prefix")
    )
}

/// Reads a soft prompt and checks it against `model` (architecture and
/// shapes).
pub fn read(path: &Path, model: &Model) -> Result<SoftPrompt> {
    if !path.exists() {
        return Err(Error::Msg(format!("{}: no such file", path.display())));
    }
    let f = GgufFile::open(path)?;
    let p = path.display();
    let bad = |msg: String| Error::Msg(format!("{p}: {msg}"));
    if !is_soft_prompt(&f) {
        return Err(bad(
            "not a soft prompt (adapter.type must be 'prompt' or 'prefix')".into()
        ));
    }
    let hp = &model.hparams;
    let arch = f.get_str("general.architecture")?;
    if arch != hp.arch {
        return Err(bad(format!(
            "soft prompt is for architecture '{arch}' but the model '{}' is '{}' (wrong base model?)",
            model.path().display(),
            hp.arch
        )));
    }
    let kind = f.get_str("adapter.type")?.to_owned();
    let n = f.get_u64("adapter.num_virtual_tokens")? as usize;
    let method = f.get_str("adapter.peft_method")?.to_owned();
    let config = f
        .get("gguf_peft.config")
        .and_then(|v| v.as_str())
        .unwrap_or("{}")
        .to_owned();
    let tensor = |name: &str, ne: Vec<u64>| -> Result<Vec<f32>> {
        let t = f
            .tensor(name)
            .ok_or_else(|| bad(format!("tensor '{name}' is missing")))?;
        if t.ne != ne {
            return Err(bad(format!(
                "tensor '{name}' has shape {} but the model '{}' needs {:?} (wrong base model?)",
                t.shape_str(),
                model.path().display(),
                ne
            )));
        }
        if t.ty != GgmlType::F32 && t.ty != GgmlType::F16 {
            return Err(bad(format!("tensor '{name}' has type {}; only F32 and F16", t.ty)));
        }
        Ok(t.ty.to_f32(f.tensor_data(t), t.n_elements() as usize))
    };
    let classes: Vec<String> = match f.get("adapter.classes") {
        Some(Value::Array(_, v)) => v.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    let head = if classes.is_empty() {
        None
    } else {
        let ne = vec![hp.n_embd as u64, classes.len() as u64];
        Some((classes, tensor(crate::peft::prefix::HEAD, ne)?))
    };
    let mut sp = SoftPrompt {
        method,
        n_virtual: n,
        tokens: None,
        prefix: Vec::new(),
        keep_positions: matches!(f.get("adapter.prefix.keep_positions"), Some(Value::Bool(true))),
        head,
        config,
    };
    if kind == "prompt" {
        sp.tokens = Some(if n == 0 {
            Vec::new()
        } else {
            tensor("virtual_tokens", vec![hp.n_embd as u64, n as u64])?
        });
    } else if n > 0 {
        let (hd, hdv, nkv) = (hp.head_dim as u64, hp.head_dim_v as u64, hp.n_head_kv as u64);
        for il in 0..hp.n_layer {
            sp.prefix.push((
                tensor(&format!("blk.{il}.prefix_k"), vec![hd, nkv, n as u64])?,
                tensor(&format!("blk.{il}.prefix_v"), vec![hdv, nkv, n as u64])?,
            ));
        }
    }
    Ok(sp)
}
