//! `gguf-peft merge`: merged model in llama.cpp against base + adapter in
//! llama.cpp; types kept; untouched tensors byte for byte; bad input.

mod common;
use common::*;
use gguf_peft::export::merge::{merge, MergeType};
use gguf_peft::export::quantize::quantize;
use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::{Backend, GgmlType};
use gguf_peft::gguf::GgufFile;
use gguf_peft::model::Model;
use gguf_peft::peft::lora::{Lora, LoraConfig};
use gguf_peft::rng::Rng;
use std::path::{Path, PathBuf};

/// Writes an adapter with random B for the model at `path`.
fn adapter_for(path: &Path, b_scale: f32, with_output: bool) -> PathBuf {
    let model = Model::load(path, Backend::cpu(threads())).unwrap();
    let mut cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    if with_output {
        cfg.targets.push("output".into());
        cfg.targets.push("token_embd".into());
    }
    let lora = Lora::new(&model, cfg, 3).unwrap();
    let mut rng = Rng::new(4);
    for s in lora.sites() {
        let (a, b) = s.shapes();
        lora.tensor_b(&s.weight)
            .write_f32(&(0..b[0] * b[1]).map(|_| b_scale * rng.normal()).collect::<Vec<_>>());
        if s.is_embedding() {
            lora.tensor_a(&s.weight)
                .write_f32(&(0..a[0] * a[1]).map(|_| 0.5 * rng.normal()).collect::<Vec<_>>());
        }
    }
    let out = path.with_extension("adapter.gguf");
    gguf_peft::export::llama_lora::write(&lora, &model, &out).unwrap();
    out
}

/// llama.cpp's logits for the merged model and for base + adapter.
fn merged_vs_adapter(base: &Path, adapter: &Path, merged: &Path, scale: f32) -> (f32, f32) {
    let tokens = some_tokens(32, 320, 8);
    let lm = LlamaModel::load(base, false).unwrap();
    let ad = lm.load_adapter(adapter).unwrap();
    let mut ctx = lm.context(64, threads()).unwrap();
    ctx.set_adapters(&[(&ad, scale)]).unwrap();
    let with_adapter = ctx.decode(&tokens, 0).unwrap();
    let merged = llama_logits(merged, &tokens);
    let (d, m) = compare(&merged, &with_adapter);
    (d, d / m)
}

#[test]
fn merged_model_matches_base_plus_adapter_in_llama_cpp() {
    let dir = tmpdir("merge-llamacpp");
    // The merged weights are requantized to the base's type, so they carry
    // its rounding: the bound is 1.5× the type's own noise (the same model
    // stored in that type vs in F32, through llama.cpp), float rounding for F32.
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q4_0,
    ] {
        let arch = if ty == GgmlType::F16 { "qwen2" } else { "llama" };
        let base = synth(&dir, arch, ty);
        let adapter = adapter_for(&base, 0.05, arch == "qwen2");
        let merged = dir.join(format!("merged-{}.gguf", ty.name()));
        let rep = merge(&base, &[(&adapter, 0.8)], &merged, MergeType::Keep, |_, _| {}).unwrap();
        let kept = rep.merged.iter().map(|m| m.kept).sum::<f32>() / rep.merged.len() as f32;
        let (d, rel) = merged_vs_adapter(&base, &adapter, &merged, 0.8);
        let tokens = some_tokens(32, 320, 8);
        std::fs::create_dir_all(dir.join("f32")).unwrap();
        let f32_twin = synth(&dir.join("f32"), arch, GgmlType::F32);
        let (_, noise) = {
            let (d, m) = compare(&llama_logits(&base, &tokens), &llama_logits(&f32_twin, &tokens));
            (d, d / m)
        };
        println!(
            "{arch} {:5} keep: max|Δ| {d:.3e}, ratio {rel:.2e} (the type's own noise {noise:.2e}); change kept {:.0}%",
            ty.name(),
            100.0 * kept
        );
        let bound = if ty == GgmlType::F32 { 1e-5 } else { 1.5 * noise };
        assert!(rel <= bound, "{ty}: {rel:.2e} > {bound:.2e}");

        // Merging to F32 matches to float rounding whatever the base type,
        // against the same base dequantized to F32 plus the adapter (with
        // the quantized base itself, llama.cpp rounds the activations too).
        let merged32 = dir.join(format!("merged32-{}.gguf", ty.name()));
        merge(
            &base,
            &[(&adapter, 0.8)],
            &merged32,
            MergeType::To(GgmlType::F32),
            |_, _| {},
        )
        .unwrap();
        // Unadapted tensors keep their type in both; make everything F32 so
        // that no matmul rounds its activations.
        let base32 = dir.join(format!("base32-{}.gguf", ty.name()));
        quantize(&base, &base32, GgmlType::F32, |_, _| {}).unwrap();
        let all32 = dir.join(format!("all32-{}.gguf", ty.name()));
        quantize(&merged32, &all32, GgmlType::F32, |_, _| {}).unwrap();
        let (d, rel) = merged_vs_adapter(&base32, &adapter, &all32, 0.8);
        println!("{arch} {:5} → f32: max|Δ| {d:.3e}, ratio {rel:.2e}", ty.name());
        assert!(rel <= 2e-5, "{ty} → f32: {rel:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn merge_keeps_types_metadata_and_untouched_bytes() {
    let dir = tmpdir("merge-types");
    let base = synth(&dir, "gemma3", GgmlType::Q4_K);
    let adapter = adapter_for(&base, 0.05, false);
    let other = adapter_for(&synth(&dir, "gemma3", GgmlType::Q4_K), 0.02, false);
    let merged = dir.join("merged.gguf");
    let rep = merge(
        &base,
        &[(&adapter, 1.0), (&other, -0.5)],
        &merged,
        MergeType::Keep,
        |_, _| {},
    )
    .unwrap();
    let (b, m) = (GgufFile::open(&base).unwrap(), GgufFile::open(&merged).unwrap());
    assert_eq!(b.metadata(), m.metadata());
    assert_eq!(b.tensors().len(), m.tensors().len());
    let adapted: Vec<&str> = rep.merged.iter().map(|t| t.name.as_str()).collect();
    for (tb, tm) in b.tensors().iter().zip(m.tensors()) {
        assert_eq!((&tb.name, tb.ty, &tb.ne), (&tm.name, tm.ty, &tm.ne));
        let same = b.tensor_data(tb) == m.tensor_data(tm);
        assert_eq!(same, !adapted.contains(&tb.name.as_str()), "{}", tb.name);
    }
    assert_eq!(adapted.len(), 2 * 7);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn merge_refuses_an_adapter_for_another_base() {
    let dir = tmpdir("merge-bad");
    let base = synth(&dir, "qwen3", GgmlType::F32);
    let adapter = adapter_for(&synth(&dir, "llama", GgmlType::F32), 0.05, false);
    let out = dir.join("merged.gguf");
    let e = merge(&base, &[(&adapter, 1.0)], &out, MergeType::Keep, |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("adapter is for architecture 'llama'"), "{e}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// Requantizing the F32 synthetic model to a type gives, byte for byte, the
/// model written in that type from the same values; 1-D tensors stay F32.
#[test]
fn quantize_matches_direct_quantization() {
    let dir = tmpdir("quantize");
    let f32m = synth(&dir, "qwen3", GgmlType::F32);
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16] {
        std::fs::create_dir_all(dir.join(ty.name())).unwrap();
        let direct = synth(&dir.join(ty.name()), "qwen3", ty);
        let out = dir.join(format!("requant-{}.gguf", ty.name()));
        let rep = quantize(&f32m, &out, ty, |_, _| {}).unwrap();
        assert!(rep.kept.is_empty());
        let (a, b) = (GgufFile::open(&out).unwrap(), GgufFile::open(&direct).unwrap());
        for (ta, tb) in a.tensors().iter().zip(b.tensors()) {
            assert_eq!((&ta.name, ta.ty), (&tb.name, tb.ty));
            assert_eq!(a.tensor_data(ta), b.tensor_data(tb), "{} as {ty}", ta.name);
        }
        assert!(gguf_peft::ggml::ggml_accepts_gguf(&out).is_ok());
        println!(
            "{ty}: {} matrices converted, max |Δ| {:.3e}",
            rep.n_converted, rep.max_error
        );
    }
    let bad = quantize(
        &f32m,
        &dir.join("x.gguf"),
        GgmlType::from_name("iq2_xxs").unwrap(),
        |_, _| {},
    );
    assert!(bad.err().unwrap().to_string().contains("importance matrix"));
    let _ = std::fs::remove_dir_all(dir);
}
