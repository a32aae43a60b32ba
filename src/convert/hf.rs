//! HF checkpoints (config.json, safetensors in f32 / f16 / bf16 or
//! bitsandbytes NF4, tokenizer.json with a BPE model) of the llama family to
//! GGUF that llama.cpp loads. Q and K rows of `llama` models are permuted for
//! RoPE as llama.cpp's converter does; NF4 weights are dequantized
//! bit-exactly and requantized to the chosen type, with the error reported.

use crate::export::peft::permute_rows;
use crate::ggml::GgmlType;
use crate::gguf::{GgufWriter, TensorSpec, Value, ValueType};
use crate::{Error, Result};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// What a conversion did.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub arch: String,
    pub n_tensors: usize,
    /// Tensors that came from NF4: name and max |Δ| of the written type
    /// against the exact dequantized values.
    pub nf4: Vec<(String, f32)>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: invalid JSON: {e}", path.display())))
}

fn values(st: &SafeTensors<'_>, name: &str, file: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::Msg(format!("{file}: missing tensor '{name}'")))?;
    Ok((super::f32_values(&t, &format!("{file}: '{name}'"))?, t.shape().to_vec()))
}

/// HF tensor name (`<module>.weight|bias`) → GGUF name for the llama family.
fn gguf_name(hf: &str) -> Option<String> {
    let (module, suffix) = hf.rsplit_once('.')?;
    Some(format!("{}.{suffix}", super::gguf_stem(module)?))
}

/// Converts the HF checkpoint in `dir` to GGUF at `out`; 2-D weights are
/// written as `ty` (1-D ones as F32).
pub fn convert(dir: &Path, out: &Path, ty: GgmlType) -> Result<ConvertReport> {
    let cfg_path = dir.join("config.json");
    let cfg = read_json(&cfg_path)?;
    let cp = cfg_path.display().to_string();
    let bad = |m: String| Error::Msg(format!("{cp}: {m}"));
    let hf_arch = cfg["architectures"][0].as_str().unwrap_or("");
    let arch = match hf_arch {
        "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        other => {
            return Err(bad(format!(
                "architecture '{other}' is not supported (Llama, Mistral, Qwen2, Qwen3)"
            )))
        }
    };
    let u = |k: &str| -> Result<usize> {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("missing or non-integer '{k}'")))
    };
    let n_embd = u("hidden_size")?;
    let n_layer = u("num_hidden_layers")?;
    let n_ff = u("intermediate_size")?;
    let n_head = u("num_attention_heads")?;
    let n_head_kv = cfg["num_key_value_heads"].as_u64().map_or(n_head, |v| v as usize);
    let head_dim = cfg["head_dim"].as_u64().map_or(n_embd / n_head, |v| v as usize);
    let eps = cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32;
    let theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32;
    let ctx_len = cfg["max_position_embeddings"].as_u64().unwrap_or(2048) as u32;
    let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false);

    // Weights: one file or shards listed in the index.
    let files: Vec<std::path::PathBuf> = if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        let idx_path = dir.join("model.safetensors.index.json");
        let idx = read_json(&idx_path)?;
        let mut f: Vec<String> = idx["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Msg(format!("{}: no weight_map", idx_path.display())))?
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    };
    let blobs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.display().to_string(), b))
                .map_err(|e| Error::io(p, e))
        })
        .collect::<Result<_>>()?;
    let sts: Vec<(String, SafeTensors<'_>)> = blobs
        .iter()
        .map(|(n, b)| {
            SafeTensors::deserialize(b)
                .map(|s| (n.clone(), s))
                .map_err(|e| Error::Msg(format!("{n}: not a valid safetensors file ({e}); truncated?")))
        })
        .collect::<Result<_>>()?;

    // Every GGUF tensor with its values.
    let mut report = ConvertReport {
        arch: arch.into(),
        ..Default::default()
    };
    let mut tensors: BTreeMap<String, (Vec<f32>, Vec<usize>, bool)> = BTreeMap::new();
    for (file, st) in &sts {
        for name in st.names() {
            if name.contains(".weight.") || name.ends_with("rotary_emb.inv_freq") {
                continue; // NF4 side tensors (absmax, quant_map, ...), unused buffers
            }
            let module = name.strip_suffix(".weight");
            let (vals, shape, from_nf4) = match module {
                Some(m) if super::nf4::is_nf4(st, m) => {
                    let (v, s) = super::nf4::dequantize(st, m, file)?;
                    (v, s, true)
                }
                _ => {
                    let (v, s) = values(st, name, file)?;
                    (v, s, false)
                }
            };
            if tied && name == "lm_head.weight" {
                continue;
            }
            let g = gguf_name(name).ok_or_else(|| Error::Msg(format!("{file}: no GGUF name for tensor '{name}'")))?;
            tensors.insert(g, (vals, shape, from_nf4));
        }
    }
    // RoPE row permutation of Q and K (weights and biases) for llama.
    if arch == "llama" {
        for (name, (vals, shape, _)) in tensors.iter_mut() {
            let heads = if name.contains(".attn_q.") {
                n_head
            } else if name.contains(".attn_k.") {
                n_head_kv
            } else {
                continue;
            };
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            *vals = permute_rows(vals, cols, heads, true);
        }
    }
    if !tensors.contains_key("token_embd.weight") {
        return Err(Error::Msg(format!("{}: no model.embed_tokens.weight", dir.display())));
    }
    let n_vocab = tensors["token_embd.weight"].1[0];

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    w.set("general.name", Value::String(name));
    let a = |k: &str| format!("{arch}.{k}");
    w.set(a("context_length"), Value::U32(ctx_len));
    w.set(a("embedding_length"), Value::U32(n_embd as u32));
    w.set(a("block_count"), Value::U32(n_layer as u32));
    w.set(a("feed_forward_length"), Value::U32(n_ff as u32));
    w.set(a("attention.head_count"), Value::U32(n_head as u32));
    w.set(a("attention.head_count_kv"), Value::U32(n_head_kv as u32));
    w.set(a("attention.key_length"), Value::U32(head_dim as u32));
    w.set(a("attention.value_length"), Value::U32(head_dim as u32));
    w.set(a("rope.dimension_count"), Value::U32(head_dim as u32));
    w.set(a("rope.freq_base"), Value::F32(theta));
    w.set(a("attention.layer_norm_rms_epsilon"), Value::F32(eps));
    add_tokenizer(&mut w, dir, &cfg, n_vocab)?;

    let mut order: Vec<(String, GgmlType, Vec<u64>)> = Vec::new();
    for (name, (_, shape, _)) in &tensors {
        let ne: Vec<u64> = shape.iter().rev().map(|&n| n as u64).collect();
        let t = if ne.len() == 2 && ty.row_bytes(ne[0]).is_some() {
            ty
        } else {
            GgmlType::F32
        };
        w.add_tensor(TensorSpec {
            name: name.clone(),
            ty: t,
            ne: ne.clone(),
        });
        order.push((name.clone(), t, ne));
    }
    report.n_tensors = order.len();
    let mut nf4 = Vec::new();
    w.write(out, |i| {
        let (name, t, ne) = &order[i];
        let (vals, _, from_nf4) = &tensors[name];
        let bytes = t.from_f32(vals, ne[0] as usize);
        if *from_nf4 {
            let back = t.to_f32(&bytes, vals.len());
            let e = vals.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            nf4.push((name.clone(), e));
        }
        Ok(Cow::Owned(bytes))
    })?;
    report.nf4 = nf4;
    Ok(report)
}

/// The BPE tokenizer of `tokenizer.json` (+ `tokenizer_config.json`) as
/// llama.cpp's "gpt2" tokenizer keys.
fn add_tokenizer(w: &mut GgufWriter, dir: &Path, cfg: &serde_json::Value, n_vocab: usize) -> Result<()> {
    let tp = dir.join("tokenizer.json");
    let tok = read_json(&tp)?;
    let tpd = tp.display();
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::Msg(format!(
            "{tpd}: tokenizer model '{}' is not supported yet (BPE only)",
            model["type"].as_str().unwrap_or("?")
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![1i32; n_vocab];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::Msg(format!("{tpd}: model.vocab missing")))?;
    for (t, id) in vocab {
        if let Some(id) = id.as_u64().map(|v| v as usize).filter(|&i| i < n_vocab) {
            tokens[id] = Some(t.clone());
        }
    }
    let mut by_content = std::collections::HashMap::new();
    for at in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(c)) = (at["id"].as_u64(), at["content"].as_str()) else {
            continue;
        };
        let id = id as usize;
        if id < n_vocab {
            tokens[id] = Some(c.to_string());
            types[id] = if at["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
        }
        by_content.insert(c.to_string(), id);
    }
    // Ids the tokenizer does not use (embedding rows padded past the vocab).
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_none() {
            *t = Some(format!("[PAD{i}]"));
            types[i] = 5;
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String("default".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            ValueType::String,
            tokens.into_iter().map(|t| Value::String(t.unwrap())).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    w.set("tokenizer.ggml.merges", Value::Array(ValueType::String, merges));
    let tc = read_json(&dir.join("tokenizer_config.json")).unwrap_or(serde_json::Value::Null);
    let special = |key: &str| -> Option<u32> {
        let content = match &tc[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        };
        content
            .and_then(|c| by_content.get(&c).map(|&i| i as u32))
            .or_else(|| cfg[format!("{key}_id")].as_u64().map(|v| v as u32))
    };
    if let Some(b) = special("bos_token") {
        w.set("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(e) = special("eos_token") {
        w.set("tokenizer.ggml.eos_token_id", Value::U32(e));
    }
    if let Some(add) = tc["add_bos_token"].as_bool() {
        w.set("tokenizer.ggml.add_bos_token", Value::Bool(add));
    }
    if let Some(t) = tc["chat_template"].as_str() {
        w.set("tokenizer.chat_template", Value::String(t.into()));
    }
    Ok(())
}
