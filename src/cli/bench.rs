//! `gguf-peft bench`: forward and training throughput of a method on a
//! model, with warm-up, several measured steps (median and spread) and peak
//! memory, in the same shape as the PEFT reference script in tools/.

use super::ComputeArgs;
use crate::data::Example;
use crate::ggml::GgmlType;
use crate::model::Batch;
use crate::peft::lora::LoraConfig;
use crate::peft::prefix::PrefixConfig;
use crate::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
use crate::peft::MethodConfig;
use crate::rng::Rng;
use crate::train::{micro_batch_grads, OptimConfig, TrainState};
use crate::{Error, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF model.
    #[arg(short, long, required_unless_present = "matmul_types")]
    model: Option<PathBuf>,
    /// Instead of a model: time one frozen [N, N] weight matmul per type
    /// (comma-separated, e.g. q4_0,q4_1,q4_K,q6_K,q8_0,f16,f32): forward
    /// (ggml's and as a training step runs it), and the input gradient three
    /// ways: ggml's stock OUT_PROD, over a transposed F16 copy, and the GEMM
    /// over W dequantized as it goes, each timed in a graph of its own
    /// (speed-up: stock over the faster of the two).
    #[arg(long)]
    matmul_types: Option<String>,
    /// N for --matmul-types.
    #[arg(long, default_value_t = 2048)]
    matmul_n: usize,
    /// Tokens per step (one sequence).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Measured steps (after warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Warm-up steps, not measured.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Method: `lora`, or `prompt` / `prefix` (with --num-virtual-tokens).
    #[arg(long, default_value = "lora", value_parser = ["lora", "prompt", "prefix"])]
    method: String,
    /// Virtual tokens of `prompt` / `prefix` (counted in neither tokens/s).
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// LoRA rank.
    #[arg(short = 'r', long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Comma-separated LoRA targets.
    #[arg(long, default_value = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down")]
    targets: String,
    /// How the frozen base is held: native (file types), f32, bf16 (native,
    /// the CPU's products over it with bf16 operands and F32 sums, SwiGLU's
    /// inputs held in bf16) or auto
    /// (bf16 where the CPU has AVX512-BF16, else native), as in finetune.
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "f32", "bf16"])]
    base_compute: String,
    /// Input gradients through frozen weights: `transposed` (on the CPU the
    /// GEMM reads Wᵀ from the weights, kept in their plain layout, no
    /// copies; F16 copies on a GPU), `transposed-q8` (Q8_0 copies),
    /// `transposed-q4` (Q4_0 copies) or ggml's `stock` backward.
    #[arg(long, default_value = "transposed", value_parser = ["transposed", "transposed-q8", "transposed-q4", "stock"])]
    backward: String,
    /// Gradient checkpointing per block in the training step.
    #[arg(long)]
    grad_checkpointing: bool,
    /// Keep weights and transposed copies out of the CPU's repacking buffer
    /// (to measure what repacking gains; only `--no-gemm` and
    /// `--backward transposed-q8/-q4` repack on the CPU).
    #[arg(long)]
    no_repack: bool,
    /// Keep ggml's own kernels (and transposed copies) for the training
    /// graph's products instead of the strided GEMM: F32 products (F32
    /// weights, attention, LoRA, their backward) and the products with
    /// quantized weights.
    #[arg(long)]
    no_gemm: bool,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also time one training step op by op (where the time goes).
    #[arg(long)]
    profile: bool,
    /// With --profile: split the times by input shapes too.
    #[arg(long)]
    profile_shapes: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Median, min and max of a sample.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (med, s[0], s[s.len() - 1])
}

/// Peak resident set size of this process in bytes (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn run_matmul(a: &BenchArgs, types: &str, threads: usize) -> Result<()> {
    println!(
        "frozen weight [{n}, {n}], x [{n}, {t}], {threads} threads, median of {r} (ms)",
        n = a.matmul_n,
        t = a.tokens,
        r = a.steps
    );
    println!(
        "{:>8} {:>8} {:>9} {:>15} {:>15} {:>9} {:>9}",
        "type", "forward", "fwd GEMM", "stock backward", "transposed bwd", "GEMM bwd", "speed-up"
    );
    for name in types.split(',').map(str::trim) {
        let ty = GgmlType::from_name(name).ok_or_else(|| Error::Msg(format!("unknown ggml type '{name}'")))?;
        let m = super::bench_matmul::measure(ty, a.matmul_n, a.tokens, threads, a.steps)?;
        let best = m.backward_transposed.min(m.backward_gemm);
        let (stock, gain) = match m.backward_stock {
            Some(s) => (format!("{:.2}", s * 1e3), format!("{:.1}×", s / best)),
            None => ("unsupported".into(), "-".into()),
        };
        println!(
            "{:>8} {:>8.2} {:>9.2} {:>15} {:>15.2} {:>9.2} {:>9}",
            ty.name(),
            m.forward * 1e3,
            m.forward_gemm * 1e3,
            stock,
            m.backward_transposed * 1e3,
            m.backward_gemm * 1e3,
            gain
        );
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.compute.threads();
    if let Some(types) = &a.matmul_types {
        return run_matmul(&a, types, threads);
    }
    let model_path = a.model.clone().expect("required by clap");
    let backend = a.compute.backend()?;
    let layout = super::base_layout(&a.base_compute, &backend);
    if a.steps == 0 || a.tokens < 2 {
        return Err(Error::Msg("--steps must be ≥ 1 and --tokens ≥ 2".into()));
    }
    let (mut model, _tok) = super::load_with(&model_path, backend, layout)?;
    model.repack = !a.no_repack;
    model.gemm_products = !a.no_gemm;
    let t_bytes = super::prepare_backward(&mut model, &a.backward)? as u64;
    let n = a.num_virtual_tokens;
    let (cfg, what) = match a.method.as_str() {
        "prompt" => (
            MethodConfig::Prompt(PromptTuningConfig {
                num_virtual_tokens: n,
                init: PromptInit::Vocab,
            }),
            format!("prompt tuning, {n} virtual tokens"),
        ),
        "prefix" => (
            MethodConfig::Prefix(PrefixConfig {
                num_virtual_tokens: n,
                projection: None,
                init: PromptInit::Vocab,
                ptuning_v2: false,
                keep_positions: false,
                classes: Vec::new(),
            }),
            format!("prefix tuning, {n} virtual tokens"),
        ),
        _ => (
            MethodConfig::Lora(LoraConfig {
                rank: a.rank,
                alpha: a.alpha,
                targets: a.targets.split(',').map(|s| s.trim().to_owned()).collect(),
                ..Default::default()
            }),
            format!("LoRA r={} on {}", a.rank, a.targets),
        ),
    };
    let method = cfg.build(&model, None, 0)?;
    let method = &*method;
    let mut rng = Rng::new(1);
    let n_vocab = model.hparams.n_vocab;
    let tokens: Vec<i32> = (0..a.tokens).map(|_| rng.below(n_vocab) as i32).collect();
    let ex = Example {
        loss: vec![true; tokens.len()],
        tokens: tokens.clone(),
        ..Default::default()
    };
    let mut sched = model.sched();
    let batch = Batch::single(&tokens);

    let mut fwd = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        model.logits(&mut sched, &batch, method)?;
        if i >= a.warmup {
            fwd.push(t0.elapsed().as_secs_f64());
        }
    }
    // Inference over quantized weights keeps ggml's kernels, while the
    // training step's forward runs on the GEMM: time that forward too, so
    // that the train / forward ratio compares the same products. The two
    // alternate, so that both see the machine alike (on a shared machine
    // either phase may run 10 % faster or slower than the other for
    // seconds at a time).
    let mut fwd_trained = Vec::new();
    let as_trained = model.gemm_products && model.backend().is_cpu() && model.has_quantized_weights();
    let ocfg = OptimConfig::default();
    let mut st = TrainState::fresh(method, 0);
    let mut train = Vec::new();
    for i in 0..a.warmup + a.steps {
        if as_trained {
            let t0 = Instant::now();
            forward_as_trained(&model, method, &mut sched, &batch)?;
            if i >= a.warmup {
                fwd_trained.push(t0.elapsed().as_secs_f64());
            }
        }
        let t0 = Instant::now();
        let (_, _, grads) = micro_batch_grads(&model, method, &mut sched, &[&ex], a.grad_checkpointing)?;
        st.update(&ocfg, ocfg.lr, grads, method);
        if i >= a.warmup {
            train.push(t0.elapsed().as_secs_f64());
        }
    }
    // Peak RSS of the measured steps: the observed step below runs without
    // gradient checkpointing.
    let rss = peak_rss();
    let mut obs = crate::train::Observe {
        profile: a.profile,
        shapes: a.profile_shapes,
        ..Default::default()
    };
    if a.profile || !model.backend().is_cpu() {
        crate::train::loss_and_grads_observed(&model, method, &mut sched, &[&ex], Some(&mut obs))?;
    }
    let profile = obs.times;
    // Views cost nothing wherever they sit; count the nodes that compute.
    let view = |op: &str| matches!(op, "VIEW" | "RESHAPE" | "PERMUTE" | "TRANSPOSE" | "NONE");
    let device = model.backend().name();
    let mut on_cpu: std::collections::BTreeMap<String, usize> = Default::default();
    let mut n_nodes = 0;
    for n in obs.placement.iter().filter(|n| !view(&n.op)) {
        n_nodes += 1;
        if n.backend != device {
            *on_cpu.entry(n.op.clone()).or_default() += 1;
        }
    }
    let n_cpu: usize = on_cpu.values().sum();
    let (fm, fmin, fmax) = stats(&fwd);
    // The forward the ratio compares with (see `fwd_trained`).
    let ratio_fwd = if fwd_trained.is_empty() {
        fm
    } else {
        stats(&fwd_trained).0
    };
    let (tm, tmin, tmax) = stats(&train);
    let n = a.tokens as f64;
    let weights = model.weights_bytes() as u64 + t_bytes;
    if a.json {
        let j = serde_json::json!({
            "model": model_path, "base_compute": super::layout_name(layout), "backward": a.backward, "threads": threads, "tokens": a.tokens,
            "steps": a.steps, "warmup": a.warmup, "method": what, "trainable_params": method.n_trainable(),
            "forward_tokens_per_s": n / fm, "forward_s": {"median": fm, "min": fmin, "max": fmax},
            "train_tokens_per_s": n / tm, "train_step_s": {"median": tm, "min": tmin, "max": tmax},
            "train_over_forward": tm / ratio_fwd, "train_over_inference_forward": tm / fm,
            "forward_training_kernels_tokens_per_s": (!fwd_trained.is_empty()).then(|| n / ratio_fwd), "grad_checkpointing": a.grad_checkpointing, "peak_rss_bytes": rss, "weights_bytes": weights, "transposed_bytes": t_bytes,
            "device": device, "transposed_repacked": model.transposed_repacked(), "weights_repacked": model.weights_repacked(), "train_nodes": n_nodes, "train_nodes_on_cpu_fallback": n_cpu,
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("serialisable"));
        return Ok(());
    }
    let h = super::inspect::human_bytes;
    println!(
        "model {} ({} base{}, {} backward{}{}, {} of weights), {}, {} trainable, {} threads",
        model_path.display(),
        super::layout_name(layout),
        match model.weights_repacked() {
            0 => String::new(),
            n => format!(" with {n} matrices repacked"),
        },
        a.backward,
        if model.transposed_repacked() { " (repacked)" } else { "" },
        if a.grad_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        },
        h(weights),
        what,
        method.n_trainable(),
        threads
    );
    println!(
        "forward    {:8.1} tokens/s   step {:.3} s (min {:.3}, max {:.3}) over {} steps of {} tokens",
        n / fm,
        fm,
        fmin,
        fmax,
        a.steps,
        a.tokens
    );
    println!(
        "train      {:8.1} tokens/s   step {:.3} s (min {:.3}, max {:.3})",
        n / tm,
        tm,
        tmin,
        tmax
    );
    if fwd_trained.is_empty() {
        println!("train step / forward pass: {:.2}", tm / fm);
    } else {
        println!(
            "forward as in training (GEMM kernels) {:.1} tokens/s\ntrain step / forward pass: {:.2} ({:.2} against the inference forward, whose products over quantized weights keep ggml's kernels)",
            n / ratio_fwd,
            tm / ratio_fwd,
            tm / fm
        );
    }
    if !model.backend().is_cpu() {
        let ops: Vec<String> = on_cpu.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
        println!(
            "device {device}: {} of {n_nodes} training-graph nodes fell back to the CPU{}{}",
            n_cpu,
            if ops.is_empty() { "" } else { ": " },
            ops.join(", ")
        );
    }
    println!("peak RSS: {}", rss.map_or("unknown".to_string(), h));
    if a.profile {
        let total: f64 = profile.iter().map(|p| p.1).sum();
        println!("\none training step by op ({total:.3} s):");
        for (op, t, n) in profile.iter().take(if a.profile_shapes { 60 } else { 15 }) {
            println!("  {op:24} {t:8.3} s {:5.1}%  ({n} nodes)", 100.0 * t / total);
        }
    }
    Ok(())
}

/// One forward pass over `batch` as a training step runs it (the
/// differentiable graph, the CPU's GEMM products), without the backward.
fn forward_as_trained(
    model: &crate::model::Model,
    method: &dyn crate::peft::Trainable,
    sched: &mut crate::ggml::Sched,
    batch: &Batch,
) -> Result<()> {
    let gs = model.graph_size() * 2;
    let ctx = crate::ggml::Context::new(gs, gs, false);
    let (logits, f) = model.build_logits(&ctx, batch, method, true);
    let mut g = ctx.new_graph(gs, false);
    g.build_forward(logits);
    model.gemm_products_in(&mut g, &ctx);
    sched.alloc(&g)?;
    f.fill_inputs();
    method.fill_inputs(&g);
    sched.compute(&g)?;
    Ok(())
}
