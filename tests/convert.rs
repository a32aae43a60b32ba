//! HF checkpoint → GGUF: a checkpoint written by these helpers from a
//! synthetic GGUF converts back to a GGUF that llama.cpp loads and that
//! gives the same logits as the original; NF4 weights included.

mod common;
use common::*;
use gguf_peft::convert::hf::convert;
use gguf_peft::ggml::GgmlType;
use gguf_peft::gguf::GgufFile;
use safetensors::{tensor::TensorView, Dtype};
use std::path::Path;

/// GGUF name → HF name (written independently of the converter's table).
fn hf_name(g: &str) -> String {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, h)) = fixed.iter().find(|(k, _)| *k == g) {
        return h.to_string();
    }
    let rest = g.strip_prefix("blk.").unwrap();
    let (n, m) = rest.split_once('.').unwrap();
    let (stem, suffix) = m.rsplit_once('.').unwrap();
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("no HF name for {other}"),
    };
    format!("model.layers.{n}.{hf}.{suffix}")
}

/// Undoes llama.cpp's converter permutation: GGUF row h·d + 2k + j is HF
/// row h·d + j·d/2 + k.
fn unpermute(v: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    let d = v.len() / cols / heads;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for k in 0..d / 2 {
            for j in 0..2 {
                let (g, f) = (h * d + 2 * k + j, h * d + j * (d / 2) + k);
                out[f * cols..(f + 1) * cols].copy_from_slice(&v[g * cols..(g + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's converter permutation (the inverse of [`unpermute`]).
fn permute(v: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    let d = v.len() / cols / heads;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for k in 0..d / 2 {
            for j in 0..2 {
                let (g, f) = (h * d + 2 * k + j, h * d + j * (d / 2) + k);
                out[g * cols..(g + 1) * cols].copy_from_slice(&v[f * cols..(f + 1) * cols]);
            }
        }
    }
    out
}

/// The 16 NF4 values (bitsandbytes' table, also saved as `quant_map`).
const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// NF4 encoding (absmax per 64 values, nearest code), transformers' layout.
fn nf4_encode(v: &[f32]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let absmax: Vec<f32> = v
        .chunks(64)
        .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
        .collect();
    let nib: Vec<u8> = v
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let y = x / absmax[i / 64].max(1e-12);
            (0..16)
                .min_by(|&a, &b| (NF4_CODE[a] - y).abs().total_cmp(&(NF4_CODE[b] - y).abs()))
                .unwrap() as u8
        })
        .collect();
    let packed = nib
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect();
    let deq = v
        .iter()
        .enumerate()
        .map(|(i, _)| NF4_CODE[nib[i] as usize] * absmax[i / 64])
        .collect();
    (packed, absmax, deq)
}

/// Writes an HF checkpoint of the synthetic model at `gguf`; with `nf4`,
/// the attention and FFN matrices are stored as NF4 and the returned GGUF
/// holds the values those decode to.
fn write_hf(gguf: &Path, dir: &Path, arch: &str, dtype: Dtype, nf4: bool) -> std::path::PathBuf {
    let f = GgufFile::open(gguf).unwrap();
    let u = |k: &str| f.get_u64(&format!("{arch}.{k}")).unwrap() as usize;
    let (n_head, n_head_kv) = (u("attention.head_count"), u("attention.head_count_kv"));
    std::fs::create_dir_all(dir).unwrap();
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut reference: Vec<(String, Vec<f32>)> = Vec::new();
    for t in f.tensors() {
        let v = t.ty.to_f32(f.tensor_data(t), t.n_elements() as usize);
        let shape: Vec<usize> = t.ne.iter().rev().map(|&n| n as usize).collect();
        let name = hf_name(&t.name);
        let matrix = shape.len() == 2 && t.name.starts_with("blk.");
        // HF row order (llama's Q and K are permuted in GGUF).
        let rope = (arch == "llama" && (t.name.contains(".attn_q.") || t.name.contains(".attn_k."))).then(|| {
            if t.name.contains(".attn_q.") {
                n_head
            } else {
                n_head_kv
            }
        });
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let v_hf = match rope {
            Some(h) => unpermute(&v, cols, h),
            None => v.clone(),
        };
        if nf4 && matrix {
            let (packed, absmax, deq_hf) = nf4_encode(&v_hf);
            let deq = match rope {
                Some(h) => permute(&deq_hf, cols, h),
                None => deq_hf,
            };
            reference.push((t.name.clone(), deq));
            let qs = format!(r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": {shape:?}}}"#);
            let n = packed.len();
            data.push((name.clone(), Dtype::U8, vec![n, 1], packed));
            data.push((
                format!("{name}.absmax"),
                Dtype::F32,
                vec![absmax.len()],
                absmax.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            data.push((
                format!("{name}.quant_map"),
                Dtype::F32,
                vec![16],
                NF4_CODE.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            data.push((
                format!("{name}.quant_state.bitsandbytes__nf4"),
                Dtype::U8,
                vec![qs.len()],
                qs.into_bytes(),
            ));
            continue;
        }
        reference.push((t.name.clone(), v));
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => v_hf.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::BF16 => v_hf
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        };
        data.push((name, dtype, shape, bytes));
    }
    let views: Vec<_> = data
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let hf_arch = match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "Qwen3ForCausalLM",
    };
    let cfg = serde_json::json!({
        "architectures": [hf_arch], "hidden_size": u("embedding_length"), "num_hidden_layers": u("block_count"),
        "intermediate_size": u("feed_forward_length"), "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "head_dim": u("attention.key_length"), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": f.tensor("output.weight").is_none(),
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let n_vocab = f.tensor("token_embd.weight").unwrap().ne[1] as usize;
    let vocab: serde_json::Map<String, serde_json::Value> =
        (3..n_vocab).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let added: Vec<_> = ["<unk>", "<s>", "</s>"]
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"id": i, "content": c, "special": true}))
        .collect();
    let tok = serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
    )
    .unwrap();
    // The GGUF the checkpoint should convert to (values as decoded).
    let expect = dir.join("expected.gguf");
    let mut w = gguf_peft::gguf::GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k.clone(), v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(gguf_peft::gguf::TensorSpec {
            name: t.name.clone(),
            ty: GgmlType::F32,
            ne: t.ne.clone(),
        });
    }
    let bytes: Vec<Vec<u8>> = f
        .tensors()
        .iter()
        .map(|t| {
            let v = &reference.iter().find(|(n, _)| *n == t.name).unwrap().1;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect();
    w.write(&expect, |i| Ok(std::borrow::Cow::Borrowed(&bytes[i][..])))
        .unwrap();
    expect
}

#[test]
fn hf_checkpoint_converts_to_the_same_model() {
    let root = tmpdir("convert");
    for (arch, dtype, nf4) in [
        ("llama", Dtype::F32, false),
        ("qwen2", Dtype::F32, false),
        ("qwen3", Dtype::F32, false),
        ("llama", Dtype::F32, true),
    ] {
        let dir = root.join(format!("{arch}-{nf4}"));
        std::fs::create_dir_all(&dir).unwrap();
        let gguf = synth(&dir, arch, GgmlType::F32);
        let expect = write_hf(&gguf, &dir.join("hf"), arch, dtype, nf4);
        let out = dir.join("converted.gguf");
        let rep = convert(&dir.join("hf"), &out, GgmlType::F32).unwrap();
        assert_eq!(rep.nf4.len(), if nf4 { 14 } else { 0 });
        let tokens = some_tokens(24, 320, 5);
        let (d, m) = compare(&llama_logits(&out, &tokens), &llama_logits(&expect, &tokens));
        println!("{arch} (nf4: {nf4}): converted vs direct GGUF in llama.cpp: max|Δ| {d:.3e} (max|logit| {m:.2})");
        assert!(d <= 1e-5 * m, "{arch}: {d}");
    }
    let _ = std::fs::remove_dir_all(root);
}
