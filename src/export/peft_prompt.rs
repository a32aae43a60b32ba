//! HF PEFT's prompt-learning adapters (`PROMPT_TUNING`, `P_TUNING`,
//! `PREFIX_TUNING`) to and from our soft-prompt GGUF.
//!
//! PEFT saves one tensor, `prompt_embeddings`, and loads it into its prompt
//! encoder's embedding when `inference_mode` is true (so a P-tuning encoder
//! or a prefix projection is exported as its output):
//! - prompt tuning / P-tuning: [n_virtual, n_embd], the virtual tokens;
//! - prefix tuning: [n_virtual, n_layers · 2 · n_head_kv · head_dim]; row j
//!   holds, layer after layer, key then value of virtual token j, each
//!   [n_head_kv, head_dim] (PEFT's `get_prompt` view). For the `llama`
//!   architecture the GGUF keys are in the RoPE-permuted order of the GGUF
//!   Q/K rows, so each key head is permuted to HF's order and back.
//!
//! A classification head (P-tuning v2 on labeled data) goes out as PEFT's
//! `SEQ_CLS` task: `base_model.score.weight` [n_classes, n_embd] (the
//! saved `modules_to_save` copy of `*ForSequenceClassification.score`), and
//! the class names, which PEFT's files do not hold, in `labels.json`.

use super::peft::permute_rows;
use super::soft_prompt::{self, SoftPrompt};
use crate::ggml::f32_bytes;
use crate::model::{Hparams, Model};
use crate::train::metrics::write_atomic;
use crate::{Error, Result};
use safetensors::{tensor::TensorView, Dtype};
use std::path::Path;

const TENSOR: &str = "prompt_embeddings";
const HEAD: &str = "base_model.score.weight";

/// Whether keys cross the HF/GGUF Q/K row permutation.
fn permuted(hp: &Hparams) -> bool {
    hp.arch == "llama"
}

/// Our per-layer prefixes → PEFT's rows.
fn prefix_rows(hp: &Hparams, n: usize, prefix: &[(Vec<f32>, Vec<f32>)]) -> Vec<f32> {
    let kv = hp.head_dim * hp.n_head_kv;
    let mut out = Vec::with_capacity(n * hp.n_layer * 2 * kv);
    for j in 0..n {
        for (k, v) in prefix {
            let key = &k[j * kv..(j + 1) * kv];
            if permuted(hp) {
                out.extend(permute_rows(key, 1, hp.n_head_kv, false));
            } else {
                out.extend_from_slice(key);
            }
            out.extend_from_slice(&v[j * kv..(j + 1) * kv]);
        }
    }
    out
}

/// PEFT's rows → our per-layer prefixes.
fn prefix_layers(hp: &Hparams, n: usize, rows: &[f32]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let kv = hp.head_dim * hp.n_head_kv;
    let mut layers = vec![(Vec::with_capacity(n * kv), Vec::with_capacity(n * kv)); hp.n_layer];
    for j in 0..n {
        let row = &rows[j * hp.n_layer * 2 * kv..(j + 1) * hp.n_layer * 2 * kv];
        for (il, (k, v)) in layers.iter_mut().enumerate() {
            let key = &row[2 * il * kv..(2 * il + 1) * kv];
            if permuted(hp) {
                k.extend(permute_rows(key, 1, hp.n_head_kv, true));
            } else {
                k.extend_from_slice(key);
            }
            v.extend_from_slice(&row[(2 * il + 1) * kv..(2 * il + 2) * kv]);
        }
    }
    layers
}

/// Writes the soft prompt at `adapter` (for `model`) as a PEFT adapter
/// directory that `PeftModel.from_pretrained` loads.
pub fn export(adapter: &Path, model: &Model, out_dir: &Path) -> Result<()> {
    let sp = soft_prompt::read(adapter, model)?;
    let hp = &model.hparams;
    let n = sp.n_virtual;
    let kv = hp.head_dim * hp.n_head_kv;
    if sp.keep_positions {
        return Err(Error::Msg(format!(
            "{}: this prefix keeps real tokens at positions 0.. (--prefix-keep-positions); PEFT places them after the prefix, so it would not act the same there",
            adapter.display()
        )));
    }
    if sp.tokens.is_none() && hp.head_dim != hp.head_dim_v {
        return Err(Error::Msg(format!(
            "{}: PEFT's prefix layout needs keys and values of one width",
            adapter.display()
        )));
    }
    let (peft_type, values, token_dim, heads) = match &sp.tokens {
        Some(t) => {
            let ty = if sp.method == "p_tuning" {
                "P_TUNING"
            } else {
                "PROMPT_TUNING"
            };
            (ty, t.clone(), hp.n_embd, hp.n_head)
        }
        None => ("PREFIX_TUNING", prefix_rows(hp, n, &sp.prefix), kv, hp.n_head_kv),
    };
    let width = if sp.tokens.is_some() {
        hp.n_embd
    } else {
        hp.n_layer * 2 * kv
    };
    let ours: serde_json::Value = serde_json::from_str(&sp.config).unwrap_or(serde_json::Value::Null);
    let mut cfg = serde_json::json!({
        "peft_type": peft_type,
        "task_type": if sp.head.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" },
        "num_virtual_tokens": n,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": hp.n_layer,
        "inference_mode": true,
        "base_model_name_or_path": model.file.get("general.name").and_then(|v| v.as_str()),
        "revision": null,
        "modules_to_save": null,
    });
    let c = cfg.as_object_mut().expect("object");
    match peft_type {
        "PROMPT_TUNING" => {
            c.insert("prompt_tuning_init".into(), "RANDOM".into());
            c.insert("prompt_tuning_init_text".into(), serde_json::Value::Null);
            c.insert("tokenizer_name_or_path".into(), serde_json::Value::Null);
        }
        "P_TUNING" => {
            let enc = ours.get("encoder").and_then(|e| e.as_str()).unwrap_or("mlp");
            c.insert("encoder_reparameterization_type".into(), enc.to_uppercase().into());
            c.insert(
                "encoder_hidden_size".into(),
                ours.get("encoder_hidden_size").cloned().into(),
            );
            c.insert(
                "encoder_num_layers".into(),
                ours.get("encoder_num_layers").cloned().into(),
            );
            c.insert("encoder_dropout".into(), 0.0.into());
        }
        _ => {
            // The entries are exported as trained outputs: no projection.
            c.insert("prefix_projection".into(), false.into());
            c.insert("encoder_hidden_size".into(), token_dim.into());
        }
    }
    if sp.head.is_some() {
        c.insert("modules_to_save".into(), serde_json::json!(["classifier", "score"]));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let data = f32_bytes(&values);
    let mut views = vec![(
        TENSOR.to_string(),
        TensorView::new(Dtype::F32, vec![n, width], &data).expect("shape matches data"),
    )];
    let head_data = sp.head.as_ref().map(|(_, w)| f32_bytes(w));
    if let (Some((classes, _)), Some(d)) = (&sp.head, &head_data) {
        let shape = vec![classes.len(), hp.n_embd];
        views.push((HEAD.to_string(), TensorView::new(Dtype::F32, shape, d).expect("shape")));
        let labels = serde_json::to_string_pretty(classes).expect("serialisable");
        write_atomic(&out_dir.join("labels.json"), labels.as_bytes())?;
    }
    super::peft::write_adapter_dir(out_dir, views, &cfg)
}

/// Whether `dir` holds a PEFT prompt-learning adapter this module reads.
pub fn is_prompt_learning(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("peft_type")?.as_str().map(str::to_owned))
        .is_some_and(|t| matches!(t.as_str(), "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING"))
}

/// Converts a PEFT prompt-learning adapter directory into our soft-prompt
/// GGUF for `model`.
pub fn import(dir: &Path, model: &Model, out: &Path) -> Result<()> {
    let hp = &model.hparams;
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: not JSON: {e}", cfg_path.display())))?;
    let bad = |m: String| Error::Msg(format!("{}: {m}", cfg_path.display()));
    let peft_type = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if cfg
        .get("num_transformer_submodules")
        .and_then(|v| v.as_u64())
        .unwrap_or(1)
        != 1
    {
        return Err(bad("only decoder-only adapters (num_transformer_submodules = 1)".into()));
    }
    let st_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let st = super::peft::parse_safetensors(&bytes, &st_path)?;
    let t = st
        .tensor(TENSOR)
        .map_err(|_| Error::Msg(format!("{}: no '{TENSOR}' tensor", st_path.display())))?;
    let values = crate::convert::f32_values(&t, &format!("{}: '{TENSOR}'", st_path.display()))?;
    let shape = t.shape().to_vec();
    let n = shape.first().copied().unwrap_or(0);
    let kv = hp.head_dim * hp.n_head_kv;
    let (width, method) = match peft_type {
        "PROMPT_TUNING" => (hp.n_embd, "prompt_tuning"),
        "P_TUNING" => (hp.n_embd, "p_tuning"),
        "PREFIX_TUNING" => (hp.n_layer * 2 * kv, "prefix_tuning"),
        other => return Err(bad(format!("peft_type {other} is not a prompt-learning method"))),
    };
    if shape.len() != 2 || shape[1] != width {
        return Err(Error::Msg(format!(
            "{}: '{TENSOR}' has shape {shape:?}, the model '{}' needs [n, {width}] (wrong base model?)",
            st_path.display(),
            model.path().display()
        )));
    }
    let sp = SoftPrompt {
        method: method.into(),
        n_virtual: n,
        tokens: (peft_type != "PREFIX_TUNING").then(|| values.clone()),
        prefix: if peft_type == "PREFIX_TUNING" {
            prefix_layers(hp, n, &values)
        } else {
            Vec::new()
        },
        keep_positions: false,
        head: match st.tensor(HEAD) {
            Ok(h) => {
                let w = crate::convert::f32_values(&h, &format!("{}: '{HEAD}'", st_path.display()))?;
                let k = h.shape().first().copied().unwrap_or(0);
                if h.shape() != [k, hp.n_embd] || k == 0 {
                    return Err(Error::Msg(format!(
                        "{}: '{HEAD}' has shape {:?}, expected [n_classes, {}]",
                        st_path.display(),
                        h.shape(),
                        hp.n_embd
                    )));
                }
                let names: Vec<String> = std::fs::read_to_string(dir.join("labels.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .filter(|v: &Vec<String>| v.len() == k)
                    .unwrap_or_else(|| (0..k).map(|i| format!("LABEL_{i}")).collect());
                Some((names, w))
            }
            Err(_) => None,
        },
        config: serde_json::json!({ "imported_from": cfg }).to_string(),
    };
    soft_prompt::write(&sp, model, out)
}
