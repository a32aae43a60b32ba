//! HF PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`)
//! to and from llama.cpp's GGUF LoRA format.
//!
//! Names: `blk.N.attn_q` ↔ `model.layers.N.self_attn.q_proj` (k, v, o
//! likewise), `blk.N.ffn_gate|up|down` ↔ `model.layers.N.mlp.*_proj`,
//! `token_embd` ↔ `model.embed_tokens`, `output` ↔ `lm_head`; keys are
//! prefixed `base_model.model.` and end in `.lora_A.weight` [r, in] /
//! `.lora_B.weight` [out, r] (`.lora_embedding_A` [r, vocab] /
//! `.lora_embedding_B` [embd, r] for the embedding). For the `llama`
//! architecture, HF→GGUF conversion permutes the rows of Q and K for RoPE,
//! so `lora_B` of q_proj / k_proj is permuted the same way across the two.
//! GGUF holds one alpha: per-module scales (rank_pattern, alpha_pattern,
//! rsLoRA) are folded into B on import.

use super::llama_lora::{read_host, write_host, HostLora, HostPair};
use crate::ggml::f32_bytes;
use crate::gguf::GgufFile;
use crate::peft::lora::{LoraConfig, LoraSite};
use crate::train::metrics::write_atomic;
use crate::{Error, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const PREFIX: &str = "base_model.model.";

/// GGUF weight name → HF module path (without the `base_model.model.` prefix).
fn hf_module(base: &str) -> Option<String> {
    crate::convert::hf_module(base.strip_suffix(".weight")?)
}

/// HF module path → GGUF weight name.
fn gguf_name(module: &str) -> Option<String> {
    crate::convert::gguf_stem(module).map(|s| s + ".weight")
}

/// Heads whose rows of `lora_B` are permuted between HF and GGUF (Q and K of
/// the llama architecture), from the base's metadata.
fn rope_heads(base: &GgufFile, name: &str) -> Result<Option<usize>> {
    if base.get_str("general.architecture")? != "llama" {
        return Ok(None);
    }
    let n_head = base.get_u64("llama.attention.head_count")? as usize;
    let n_head_kv = base
        .get_u64_opt("llama.attention.head_count_kv")?
        .map_or(n_head, |v| v as usize);
    Ok(if name.ends_with(".attn_q.weight") {
        Some(n_head)
    } else if name.ends_with(".attn_k.weight") {
        Some(n_head_kv)
    } else {
        None
    })
}

/// Reorders rows (of `cols` values) between the HF and GGUF layouts of a
/// rotary projection with `heads` heads: GGUF row `h·d + 2k + j` is HF row
/// `h·d + j·d/2 + k`. `to_gguf` picks the direction.
pub(crate) fn permute_rows(v: &[f32], cols: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let rows = v.len() / cols;
    let d = rows / heads;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for j in 0..2 {
            for k in 0..d / 2 {
                let hf = h * d + j * (d / 2) + k;
                let gg = h * d + 2 * k + j;
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// PEFT's `adapter_config.json`, the fields this converter reads and writes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f32,
    #[serde(default)]
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f32>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

fn none_bias() -> String {
    "none".into()
}

/// Writes `adapter` (llama.cpp GGUF LoRA for the model `base`) as a PEFT
/// adapter directory.
pub fn export(adapter: &Path, base: &Path, out_dir: &Path) -> Result<()> {
    let base = GgufFile::open(base)?;
    let lora = read_host(adapter, &base)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut targets: Vec<String> = Vec::new();
    for p in &lora.pairs {
        let module = hf_module(&p.base)
            .ok_or_else(|| Error::Msg(format!("{}: no PEFT name for '{}'", adapter.display(), p.base)))?;
        let s = &p.site;
        *ranks.entry(s.rank).or_default() += 1;
        let leaf = module.rsplit('.').next().expect("non-empty").to_string();
        if !targets.contains(&leaf) {
            targets.push(leaf);
        }
        if s.is_embedding() {
            // Ours: a = n_vocab rows of r, b = n_embd rows of r.
            let a = transpose(&p.a, s.n_in, s.rank);
            tensors.push((
                format!("{PREFIX}{module}.lora_embedding_A"),
                vec![s.rank, s.n_in],
                f32_bytes(&a),
            ));
            tensors.push((
                format!("{PREFIX}{module}.lora_embedding_B"),
                vec![s.n_out, s.rank],
                f32_bytes(&p.b),
            ));
        } else {
            let b = match rope_heads(&base, &p.base)? {
                Some(h) => permute_rows(&p.b, s.rank, h, false),
                None => p.b.clone(),
            };
            tensors.push((
                format!("{PREFIX}{module}.lora_A.weight"),
                vec![s.rank, s.n_in],
                f32_bytes(&p.a),
            ));
            tensors.push((
                format!("{PREFIX}{module}.lora_B.weight"),
                vec![s.n_out, s.rank],
                f32_bytes(&b),
            ));
        }
    }
    // The most common rank is `r`; the others go to rank_pattern. With one
    // alpha for all, each module's scale alpha / r_module is llama.cpp's.
    let r = ranks.iter().max_by_key(|(_, &n)| n).map(|(&r, _)| r).unwrap_or(8);
    let rank_pattern: BTreeMap<String, usize> = lora
        .pairs
        .iter()
        .filter(|p| p.site.rank != r)
        .filter_map(|p| hf_module(&p.base).map(|m| (m, p.site.rank)))
        .collect();
    let alpha = if lora.alpha == 0.0 { r as f32 } else { lora.alpha };
    let cfg = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r,
        lora_alpha: alpha,
        target_modules: serde_json::json!(targets),
        lora_dropout: lora.config.dropout,
        use_rslora: false,
        use_dora: false,
        fan_in_fan_out: false,
        bias: "none".into(),
        rank_pattern,
        alpha_pattern: BTreeMap::new(),
        modules_to_save: None,
        base_model_name_or_path: base.get("general.name").and_then(|v| v.as_str()).map(str::to_owned),
        inference_mode: true,
        init_lora_weights: serde_json::json!(true),
        layers_to_transform: None,
    };
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let v = TensorView::new(Dtype::F32, shape.clone(), data).expect("shape matches data");
            (n.clone(), v)
        })
        .collect();
    write_adapter_dir(out_dir, views, &serde_json::to_value(&cfg).expect("serialisable"))
}

/// Writes a PEFT adapter directory: `adapter_model.safetensors` (as torch
/// saves it, `format: pt`) and `adapter_config.json`, each atomically.
pub(crate) fn write_adapter_dir(
    out_dir: &Path,
    views: Vec<(String, TensorView<'_>)>,
    cfg: &serde_json::Value,
) -> Result<()> {
    let mut info = HashMap::new();
    info.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| Error::Msg(format!("{}: cannot serialise safetensors: {e}", out_dir.display())))?;
    write_atomic(&out_dir.join("adapter_model.safetensors"), &bytes)?;
    let json = serde_json::to_string_pretty(cfg).expect("serialisable");
    write_atomic(&out_dir.join("adapter_config.json"), json.as_bytes())
}

/// A safetensors file's tensors, or an error naming `path`.
pub(crate) fn parse_safetensors<'b>(bytes: &'b [u8], path: &Path) -> Result<SafeTensors<'b>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::Msg(format!(
            "{}: not a valid safetensors file ({e}); truncated?",
            path.display()
        ))
    })
}

/// PEFT's pattern match: the key equals the module path or ends it after a dot.
fn pattern<T: Copy>(map: &BTreeMap<String, T>, module: &str) -> Option<T> {
    map.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, &v)| v)
}

/// Converts a PEFT LoRA directory to a llama.cpp GGUF LoRA for `base`.
pub fn import(dir: &Path, base_path: &Path, out: &Path) -> Result<()> {
    let base = GgufFile::open(base_path)?;
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: PeftConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: not a PEFT LoRA config: {e}", cfg_path.display())))?;
    let bad = |m: String| Error::Msg(format!("{}: {m}", dir.display()));
    if cfg.peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type is {}, only LORA adapters convert to GGUF LoRA",
            cfg.peft_type
        )));
    }
    if cfg.use_dora {
        return Err(bad(
            "DoRA adapters (use_dora) have magnitude vectors that a GGUF LoRA cannot hold; merge them with PEFT first"
                .into(),
        ));
    }
    if cfg.fan_in_fan_out {
        return Err(bad(
            "fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported".into()
        ));
    }
    if cfg.bias != "none" {
        return Err(bad(format!(
            "bias = '{}': trained biases cannot be held by a GGUF LoRA",
            cfg.bias
        )));
    }
    let st_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let st = parse_safetensors(&bytes, &st_path)?;
    // Group A and B by module.
    let mut found: BTreeMap<String, (Option<TensorView<'_>>, Option<TensorView<'_>>, bool)> = BTreeMap::new();
    for (name, t) in st.tensors() {
        let rest = name.strip_prefix(PREFIX).unwrap_or(&name);
        let (module, which, emb) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0, false)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1, false)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_A") {
            (m, 0, true)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_B") {
            (m, 1, true)
        } else {
            return Err(Error::Msg(format!(
                "{}: tensor '{name}' is not a LoRA A/B weight (DoRA magnitudes, modules_to_save and biases cannot be held by a GGUF LoRA)",
                st_path.display()
            )));
        };
        let e = found.entry(module.to_string()).or_insert((None, None, emb));
        if which == 0 {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    if found.is_empty() {
        return Err(bad("adapter_model.safetensors holds no LoRA tensors".into()));
    }
    // One GGUF alpha: the default scale times the default rank; other
    // modules get their scale folded into B.
    let scale_of = |alpha: f32, r: usize| {
        if cfg.use_rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        }
    };
    let alpha_file = if cfg.use_rslora {
        scale_of(cfg.lora_alpha, cfg.r) * cfg.r as f32
    } else {
        cfg.lora_alpha
    };
    let tied = base.tensor("output.weight").is_none();
    let mut pairs = Vec::new();
    for (module, (a, b, emb)) in found {
        let what = format!("{} '{module}'", st_path.display());
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::Msg(format!("{what}: lora_A or lora_B is missing")));
        };
        let name = gguf_name(&module).ok_or_else(|| Error::Msg(format!("{what}: no GGUF tensor for this module")))?;
        if tied && name == "output.weight" {
            return Err(Error::Msg(format!(
                "{what}: the base's LM head is tied to the embedding; a GGUF LoRA cannot adapt lm_head separately"
            )));
        }
        let w = base.tensor(&name).ok_or_else(|| {
            Error::Msg(format!(
                "{what}: '{name}' does not exist in {} (wrong base model?)",
                base_path.display()
            ))
        })?;
        let (ash, bsh) = (a.shape().to_vec(), b.shape().to_vec());
        let r = ash.first().copied().unwrap_or(0);
        let (n_in, n_out) = if emb {
            (w.ne[1] as usize, w.ne[0] as usize)
        } else {
            (w.ne[0] as usize, w.ne[1] as usize)
        };
        if ash != vec![r, n_in] || bsh != vec![n_out, r] || r == 0 {
            return Err(Error::Msg(format!(
                "{what}: shapes {ash:?} and {bsh:?} do not fit the base weight {} (wrong base model?)",
                w.shape_str()
            )));
        }
        let mut av = crate::convert::f32_values(&a, &what)?;
        let mut bv = crate::convert::f32_values(&b, &what)?;
        let r_m = pattern(&cfg.rank_pattern, &module).unwrap_or(cfg.r);
        if r_m != r {
            return Err(Error::Msg(format!(
                "{what}: rank {r} in the file but {r_m} in the config"
            )));
        }
        let alpha_m = pattern(&cfg.alpha_pattern, &module).unwrap_or(cfg.lora_alpha);
        let factor = scale_of(alpha_m, r) * r as f32 / alpha_file;
        if factor != 1.0 {
            bv.iter_mut().for_each(|x| *x *= factor);
        }
        if emb {
            av = transpose(&av, r, n_in);
        } else if let Some(h) = rope_heads(&base, &name)? {
            bv = permute_rows(&bv, r, h, true);
        }
        pairs.push(HostPair {
            base: name.clone(),
            site: LoraSite {
                weight: name,
                n_in,
                n_out,
                rank: r,
            },
            a: av,
            b: bv,
        });
    }
    let config = LoraConfig {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        targets: pairs
            .iter()
            .filter_map(|p| p.base.strip_suffix(".weight"))
            .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
            .fold(Vec::new(), |mut v, t| {
                if !v.contains(&t) {
                    v.push(t)
                }
                v
            }),
        layers: None,
        rslora: cfg.use_rslora,
    };
    write_host(
        &HostLora {
            alpha: alpha_file,
            config,
            pairs,
        },
        &base,
        out,
    )
}
