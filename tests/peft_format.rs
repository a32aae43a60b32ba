//! GGUF LoRA ↔ HF PEFT: round trip bit for bit, the structure PEFT expects,
//! and clear refusals.

mod common;
use common::*;
use gguf_peft::export::peft::{export, import};
use gguf_peft::ggml::{Backend, GgmlType};
use gguf_peft::gguf::GgufFile;
use gguf_peft::model::Model;
use gguf_peft::peft::lora::{Lora, LoraConfig};
use gguf_peft::rng::Rng;
use std::path::{Path, PathBuf};

fn adapter(path: &Path, cfg: LoraConfig) -> PathBuf {
    let model = Model::load(path, Backend::cpu(threads())).unwrap();
    let lora = Lora::new(&model, cfg, 3).unwrap();
    let mut rng = Rng::new(4);
    for s in lora.sites() {
        let (a, b) = s.shapes();
        lora.tensor_a(&s.weight)
            .write_f32(&(0..a[0] * a[1]).map(|_| rng.normal()).collect::<Vec<_>>());
        lora.tensor_b(&s.weight)
            .write_f32(&(0..b[0] * b[1]).map(|_| rng.normal()).collect::<Vec<_>>());
    }
    let out = path.with_extension("lora.gguf");
    gguf_peft::export::llama_lora::write(&lora, &model, &out).unwrap();
    out
}

/// An F32 `arch` base in `dir`, a LoRA adapter for it, and its PEFT export
/// in `dir/peft`: (base, adapter, PEFT directory).
fn exported(dir: &Path, arch: &str, cfg: LoraConfig) -> (PathBuf, PathBuf, PathBuf) {
    let base = synth(dir, arch, GgmlType::F32);
    let a = adapter(&base, cfg);
    let peft_dir = dir.join("peft");
    export(&a, &base, &peft_dir).unwrap();
    (base, a, peft_dir)
}

#[test]
fn export_import_round_trip_is_bit_exact() {
    let dir = tmpdir("peft-rt");
    for (arch, extra) in [
        ("llama", vec![]),
        ("qwen2", vec!["output", "token_embd"]),
        ("gemma3", vec![]),
    ] {
        let base = synth(&dir, arch, GgmlType::Q8_0);
        let mut cfg = LoraConfig {
            rank: 4,
            alpha: 5.5,
            ..Default::default()
        };
        cfg.targets.extend(extra.iter().map(|s| s.to_string()));
        let a = adapter(&base, cfg);
        let peft_dir = dir.join(format!("{arch}-peft"));
        export(&a, &base, &peft_dir).unwrap();
        let back = dir.join(format!("{arch}-back.gguf"));
        import(&peft_dir, &base, &back).unwrap();
        let (x, y) = (GgufFile::open(&a).unwrap(), GgufFile::open(&back).unwrap());
        assert_eq!(x.get("adapter.lora.alpha"), y.get("adapter.lora.alpha"));
        assert_eq!(x.tensors().len(), y.tensors().len());
        for t in x.tensors() {
            let u = y
                .tensor(&t.name)
                .unwrap_or_else(|| panic!("{arch}: {} missing", t.name));
            assert_eq!((t.ty, &t.ne), (u.ty, &u.ne), "{}", t.name);
            assert_eq!(x.tensor_data(t), y.tensor_data(u), "{arch}: {} differs", t.name);
        }
        println!("{arch}: {} tensors round-tripped bit for bit", x.tensors().len());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exported_files_have_peft_structure() {
    let dir = tmpdir("peft-structure");
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let (_, _, out) = exported(&dir, "llama", cfg);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["use_dora"], false);
    let mut targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    targets.sort();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * 7 * 2);
    let q_a = st
        .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(q_a.shape(), [4, 256]);
    let k_b = st
        .tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(k_b.shape(), [2 * 64, 4]);
    let d_b = st
        .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(d_b.shape(), [256, 4]);
    assert!(st
        .names()
        .iter()
        .all(|n| n.starts_with("base_model.model.model.layers.")
            && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_refuses_what_gguf_cannot_hold() {
    let dir = tmpdir("peft-bad");
    let cfg = LoraConfig {
        rank: 4,
        ..Default::default()
    };
    let (base, _, good) = exported(&dir, "llama", cfg);
    let out = dir.join("out.gguf");
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    // DoRA.
    let dora = copy("dora");
    let cfg = std::fs::read_to_string(dora.join("adapter_config.json")).unwrap();
    std::fs::write(
        dora.join("adapter_config.json"),
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = import(&dora, &base, &out).unwrap_err().to_string();
    assert!(e.contains("DoRA") && e.contains(&dora.display().to_string()), "{e}");
    // A truncated safetensors file.
    let trunc = copy("trunc");
    let st = std::fs::read(trunc.join("adapter_model.safetensors")).unwrap();
    std::fs::write(trunc.join("adapter_model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = import(&trunc, &base, &out).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // An unsupported tensor (a DoRA magnitude vector).
    let extra = copy("extra");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = std::fs::read(extra.join("adapter_model.safetensors")).unwrap();
    for (n, t) in safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors() {
        tensors.push((n, t.shape().to_vec(), t.data().to_vec()));
    }
    tensors.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
        vec![256],
        vec![0u8; 1024],
    ));
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        extra.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = import(&extra, &base, &out).unwrap_err().to_string();
    assert!(
        e.contains("lora_magnitude_vector") && e.contains("not a LoRA A/B weight"),
        "{e}"
    );
    // For another base (PEFT files carry no architecture: the shapes tell).
    let mut spec = gguf_peft::model::synthetic::SynthSpec::tiny("llama", GgmlType::F32);
    spec.n_ff = 768;
    let other = dir.join("wide.gguf");
    gguf_peft::model::synthetic::write_synthetic(&other, &spec).unwrap();
    let e = import(&good, &other, &out).unwrap_err().to_string();
    assert!(e.contains("wrong base model"), "{e}");
    assert!(!out.exists(), "nothing written");
    let _ = std::fs::remove_dir_all(dir);
}

/// rsLoRA, rank_pattern and alpha_pattern scales are folded into B: the
/// imported GGUF gives each module PEFT's scale through llama.cpp's single
/// alpha (scale = alpha / rank).
#[test]
fn import_folds_per_module_scales() {
    let dir = tmpdir("peft-fold");
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let (base, a, peft_dir) = exported(&dir, "qwen3", cfg);
    let cfg_path = peft_dir.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["use_rslora"] = serde_json::json!(true);
    cfg["alpha_pattern"] = serde_json::json!({"model.layers.1.mlp.down_proj": 2.0});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let back = dir.join("back.gguf");
    import(&peft_dir, &base, &back).unwrap();
    let (x, y) = (GgufFile::open(&a).unwrap(), GgufFile::open(&back).unwrap());
    // PEFT scales: default 8/sqrt(4) = 4, down_proj of layer 1: 2/sqrt(4) = 1.
    let alpha = y.get("adapter.lora.alpha").unwrap().as_f64().unwrap() as f32;
    assert_eq!(alpha, 4.0 * 4.0, "alpha / rank must equal the default scale");
    for (name, want) in [
        ("blk.0.attn_q.weight.lora_b", 1.0f32),
        ("blk.1.ffn_down.weight.lora_b", 0.25),
    ] {
        let (t0, t1) = (x.tensor(name).unwrap(), y.tensor(name).unwrap());
        let b0 = t0.ty.to_f32(x.tensor_data(t0), t0.n_elements() as usize);
        let b1 = t1.ty.to_f32(y.tensor_data(t1), t1.n_elements() as usize);
        for (p, q) in b0.iter().zip(&b1) {
            assert!(
                (q - want * p).abs() <= 1e-6 * p.abs().max(1.0),
                "{name}: {q} vs {want}·{p}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
