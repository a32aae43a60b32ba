//! Helpers shared by the integration tests.
#![allow(dead_code)]

use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::{Backend, GgmlType};
use gguf_peft::model::synthetic::{write_synthetic, SynthSpec};
use gguf_peft::model::{Batch, Model, NoHooks};
use std::path::{Path, PathBuf};

/// A fresh temporary directory for one test.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gguf-peft-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Threads for tests (CI has 2 cores).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(4)
}

/// The demo model, fetched by tools/fetch-model.sh (see README).
pub fn smollm2() -> PathBuf {
    let p = std::env::var_os("GGUF_PEFT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            std::env::var_os("GGUF_PEFT_MODELS")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/gguf-peft/models"))
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "{}: demo model missing; run tools/fetch-model.sh (or set GGUF_PEFT_MODEL)",
        p.display()
    );
    p
}

/// Writes a tiny synthetic model and returns its path.
pub fn synth(dir: &Path, arch: &str, ty: GgmlType) -> PathBuf {
    let p = dir.join(format!("{arch}-{}.gguf", ty.name()));
    write_synthetic(&p, &SynthSpec::tiny(arch, ty)).unwrap();
    p
}

/// Our logits for one sequence.
pub fn our_logits(path: &Path, tokens: &[i32]) -> Vec<Vec<f32>> {
    let model = Model::load(path, Backend::cpu(threads())).unwrap();
    logits_like_llama_cpp(&model, &NoHooks, tokens)
}

/// Our logits for one sequence computed as llama.cpp computes them: over a
/// KV cache padded to 256 cells. Without the padding the attention runs on
/// other shapes, so float rounding differs slightly, and on a 4-bit model a
/// near-tie in the activations' 8-bit quantization can turn that into a
/// visible difference (seen: 0.5 on one row of SmolLM2 logits).
pub fn logits_like_llama_cpp(model: &Model, hooks: &dyn gguf_peft::model::Hooks, tokens: &[i32]) -> Vec<Vec<f32>> {
    let mut sched = model.sched();
    let cache = gguf_peft::model::KvCache::default();
    model
        .logits_cached(&mut sched, &Batch::single(tokens), hooks, &cache)
        .unwrap()
        .0
}

/// llama.cpp's logits for one sequence (fresh context, F32 KV cache).
pub fn llama_logits(path: &Path, tokens: &[i32]) -> Vec<Vec<f32>> {
    let m = LlamaModel::load(path, false).unwrap();
    let mut ctx = m.context(tokens.len().max(64) as u32, threads()).unwrap();
    ctx.decode(tokens, 0).unwrap()
}

/// (max |a-b|, max |b|) over all rows.
pub fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut d = 0f32;
    let mut m = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite(), "non-finite logit");
            d = d.max((x - y).abs());
            m = m.max(y.abs());
        }
    }
    (d, m)
}

/// The larger of a running worst difference `m` and `d`, a NaN counting as
/// infinite (`f64::max` passes over NaN, which would hide a NaN result).
pub fn worse(m: f64, d: f64) -> f64 {
    if d.is_nan() {
        f64::INFINITY
    } else {
        m.max(d)
    }
}

/// The largest difference of `got` from `want`, relative to `want`'s
/// largest magnitude (a NaN counting as infinite).
pub fn worst_relative(got: &[f32], want: &[f64]) -> f64 {
    let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, b)| worse(m, (a as f64 - b).abs()))
        / top
}

/// [`worse`] in f32.
pub fn worse32(m: f32, d: f32) -> f32 {
    if d.is_nan() {
        f32::INFINITY
    } else {
        m.max(d)
    }
}

/// Deterministic pseudo-random tokens in [3, n_vocab).
pub fn some_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<i32> {
    let mut r = gguf_peft::rng::Rng::new(seed);
    let mut t = vec![1];
    t.extend((1..n).map(|_| 3 + r.below(n_vocab - 3) as i32));
    t
}

/// Runs the `gguf-peft` binary: (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gguf-peft"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One example of `n` pseudo-random tokens, every position carrying loss.
pub fn example_all_loss(n: usize, n_vocab: usize, seed: u64) -> gguf_peft::data::Example {
    let tokens = some_tokens(n, n_vocab, seed);
    gguf_peft::data::Example {
        loss: vec![true; tokens.len()],
        tokens,
        ..Default::default()
    }
}

/// ‖a − b‖ / ‖b‖ over all values of two gradient sets (‖b‖ must not be 0).
pub fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        diff += ((x - y) as f64).powi(2);
        norm += (*y as f64).powi(2);
    }
    assert!(norm > 0.0, "reference gradients are all zero");
    (diff / norm).sqrt()
}

/// One case of every method family (and two checkpointed ones): name,
/// config, whether the step recomputes blocks.
pub fn method_cases() -> Vec<(&'static str, gguf_peft::peft::MethodConfig, bool)> {
    use gguf_peft::peft::lora::LoraConfig;
    use gguf_peft::peft::p_tuning::{Encoder, PTuningConfig};
    use gguf_peft::peft::prefix::PrefixConfig;
    use gguf_peft::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
    use gguf_peft::peft::MethodConfig;
    let prefix = |ptuning_v2| {
        MethodConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 4,
            projection: None,
            init: PromptInit::Random,
            ptuning_v2,
            keep_positions: false,
            classes: Vec::new(),
        })
    };
    vec![
        ("lora, checkpointed", MethodConfig::Lora(LoraConfig::default()), true),
        (
            "prompt",
            MethodConfig::Prompt(PromptTuningConfig {
                num_virtual_tokens: 4,
                init: PromptInit::Vocab,
            }),
            false,
        ),
        (
            "ptuning-lstm",
            MethodConfig::Ptuning(PTuningConfig {
                num_virtual_tokens: 4,
                encoder: Encoder::Lstm,
                encoder_hidden_size: 16,
                encoder_num_layers: 2,
            }),
            false,
        ),
        ("prefix", prefix(false), false),
        ("ptuning-v2, checkpointed", prefix(true), true),
    ]
}

/// Loss and gradients of one step of `cfg` (seed 3) on a packed batch of
/// two sequences.
pub fn method_step(model: &Model, cfg: &gguf_peft::peft::MethodConfig, recompute: bool) -> (f32, Vec<Vec<f32>>) {
    let method = cfg.build(model, None, 3).unwrap();
    let exs: Vec<gguf_peft::data::Example> = [(9, 5), (6, 6)]
        .iter()
        .map(|&(len, seed)| example_all_loss(len, model.hparams.n_vocab, seed))
        .collect();
    let refs: Vec<&gguf_peft::data::Example> = exs.iter().collect();
    let mut sched = model.sched();
    let (l, _, g) = gguf_peft::train::micro_batch_grads(model, method.as_ref(), &mut sched, &refs, recompute).unwrap();
    (l, g)
}
