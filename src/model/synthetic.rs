//! Tiny random models of any supported architecture, written as GGUF with a
//! small SentencePiece-style vocabulary that llama.cpp loads. They are the
//! main vehicle of architecture coverage in tests: fast, and loadable by both
//! our graph and llama.cpp.

use super::{arch, Hparams};
use crate::ggml::GgmlType;
use crate::gguf::{GgufWriter, TensorSpec, Value, ValueType};
use crate::rng::Rng;
use std::borrow::Cow;
use std::path::Path;

/// Shape and type of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub arch: String,
    /// Type of every 2-D weight (norms and biases stay F32).
    pub ty: GgmlType,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Extra normal tokens after the 3 specials and 256 byte tokens.
    pub n_words: usize,
    /// Share the LM head with the token embedding.
    pub tied: bool,
    /// Sliding window for architectures that have one (0: none).
    pub sliding_window: usize,
    pub seed: u64,
}

impl SynthSpec {
    /// A tiny model whose widths are multiples of 256, so every ggml type
    /// (K-quants included) can store its weights.
    pub fn tiny(arch: &str, ty: GgmlType) -> Self {
        SynthSpec {
            arch: arch.to_owned(),
            ty,
            n_embd: 256,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 512,
            n_words: 61,
            tied: arch != "qwen2",
            sliding_window: 8,
            seed: 1234,
        }
    }

    /// Vocabulary size: `<unk>`, `<s>`, `</s>`, 256 bytes, then words.
    pub fn n_vocab(&self) -> usize {
        3 + 256 + self.n_words
    }

    fn hparams(&self) -> Hparams {
        Hparams {
            arch: self.arch.clone(),
            n_vocab: self.n_vocab(),
            n_ctx_train: 512,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_ff: self.n_ff,
            n_head: self.n_head,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            head_dim_v: self.head_dim,
            rms_eps: 1e-6,
            rope_freq_base: 10000.0,
            rope_freq_scale: 1.0,
            n_rot: self.head_dim,
            sliding_window: self.sliding_window,
            swa_layers: (0..self.n_layer).map(|il| il % 2 == 0).collect(),
            rope_freq_base_swa: 10000.0,
            final_logit_softcap: 0.0,
        }
    }
}

/// Writes a random model of `spec` to `path`.
pub fn write_synthetic(path: &Path, spec: &SynthSpec) -> crate::Result<()> {
    let a = arch::find(&spec.arch).ok_or_else(|| crate::Error::Msg(format!("unknown architecture {}", spec.arch)))?;
    let hp = spec.hparams();
    let mut w = GgufWriter::new();
    let ar = &spec.arch;
    w.set("general.architecture", Value::String(ar.clone()));
    w.set("general.name", Value::String(format!("synthetic-{ar}-{}", spec.ty)));
    w.set("general.file_type", Value::U32(1));
    let u = |v: usize| Value::U32(v as u32);
    w.set(format!("{ar}.context_length"), u(hp.n_ctx_train));
    w.set(format!("{ar}.embedding_length"), u(hp.n_embd));
    w.set(format!("{ar}.block_count"), u(hp.n_layer));
    w.set(format!("{ar}.feed_forward_length"), u(hp.n_ff));
    w.set(format!("{ar}.attention.head_count"), u(hp.n_head));
    w.set(format!("{ar}.attention.head_count_kv"), u(hp.n_head_kv));
    w.set(format!("{ar}.attention.key_length"), u(hp.head_dim));
    w.set(format!("{ar}.attention.value_length"), u(hp.head_dim_v));
    w.set(format!("{ar}.rope.dimension_count"), u(hp.n_rot));
    w.set(format!("{ar}.rope.freq_base"), Value::F32(hp.rope_freq_base));
    w.set(format!("{ar}.attention.layer_norm_rms_epsilon"), Value::F32(hp.rms_eps));
    if ar == "gemma3" && spec.sliding_window > 0 {
        w.set(format!("{ar}.attention.sliding_window"), u(spec.sliding_window));
        w.set(format!("{ar}.attention.sliding_window_pattern"), u(2));
    }
    // Vocabulary: SentencePiece layout that llama.cpp's "llama" tokenizer loads.
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    const SYL: [&str; 12] = ["a", "e", "i", "o", "u", "ka", "lo", "mi", "ne", "ru", "sa", "to"];
    for i in 0..spec.n_words {
        let word = format!("\u{2581}{}{}", SYL[i % 12], SYL[(i / 12) % 12]);
        tokens.push(if tokens.contains(&word) {
            format!("{word}{i}")
        } else {
            word
        });
        types.push(1);
    }
    let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(ValueType::String, tokens.into_iter().map(Value::String).collect()),
    );
    w.set("tokenizer.ggml.scores", Value::Array(ValueType::F32, scores));
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    w.set("tokenizer.ggml.unknown_token_id", u(0));
    w.set("tokenizer.ggml.bos_token_id", u(1));
    w.set("tokenizer.ggml.eos_token_id", u(2));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));

    let mut rng = Rng::new(spec.seed);
    let mut data: Vec<Vec<u8>> = Vec::new();
    for d in a.tensors(&hp) {
        let untied_head = d.name == "output.weight" && !spec.tied;
        if !d.required && !untied_head {
            continue;
        }
        let n: usize = d.ne.iter().product::<u64>() as usize;
        let is_norm = d.name.contains("norm");
        let is_bias = d.name.ends_with(".bias");
        let vals: Vec<f32> = if is_norm {
            (0..n).map(|_| 1.0 + 0.2 * rng.normal()).collect()
        } else if is_bias {
            (0..n).map(|_| 0.2 * rng.normal()).collect()
        } else {
            // Unit-variance outputs: uniform with variance 1/fan_in.
            let lim = (3.0 / d.ne[0] as f32).sqrt();
            (0..n).map(|_| rng.uniform(-lim, lim)).collect()
        };
        let ty = if d.ne.len() == 1 { GgmlType::F32 } else { spec.ty };
        let bytes = ty.from_f32(&vals, d.ne[0] as usize);
        w.add_tensor(TensorSpec {
            name: d.name.clone(),
            ty,
            ne: d.ne.clone(),
        });
        data.push(bytes);
    }
    w.write(path, |i| Ok(Cow::Borrowed(&data[i][..])))?;
    Ok(())
}
