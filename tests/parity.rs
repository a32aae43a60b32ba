//! Our forward graph against llama.cpp in-process on the same file.

mod common;
use common::*;
use gguf_peft::ggml::GgmlType;

/// Bound from the foundation issue: max |Δ| ≤ 1e-3 × max |logit|.
const REL_BOUND: f32 = 1e-3;

fn check_arch(arch: &str) {
    let dir = tmpdir(&format!("parity-{arch}"));
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
    ];
    let mut worst = 0f32;
    for ty in types {
        let path = synth(&dir, arch, ty);
        let tokens = some_tokens(40, 320, 7);
        let ours = our_logits(&path, &tokens);
        let theirs = llama_logits(&path, &tokens);
        let (d, m) = compare(&ours, &theirs);
        let rel = d / m;
        println!(
            "{arch:7} {:5}: max|Δ| = {d:.3e}, max|logit| = {m:.3}, ratio = {rel:.2e}",
            ty.name()
        );
        assert!(rel <= REL_BOUND, "{arch} {ty}: ratio {rel:.2e} > {REL_BOUND:e}");
        worst = worst.max(rel);
    }
    println!("{arch}: worst ratio {worst:.2e} (bound {REL_BOUND:e})");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn llama_matches_llama_cpp() {
    check_arch("llama");
}

#[test]
fn qwen2_matches_llama_cpp() {
    check_arch("qwen2");
}

#[test]
fn qwen3_matches_llama_cpp() {
    check_arch("qwen3");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_arch("gemma3");
}
