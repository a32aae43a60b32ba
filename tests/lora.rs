//! LoRA: gradients against finite differences, the zero-B identity, and our
//! exported adapter in llama.cpp against our graph with the same adapter.

mod common;
use common::*;
use gguf_peft::data::Example;
use gguf_peft::ggml::llama::LlamaModel;
use gguf_peft::ggml::{Backend, GgmlType};
use gguf_peft::model::{Batch, Model, NoHooks};
use gguf_peft::peft::lora::{Lora, LoraConfig};
use gguf_peft::peft::Trainable;
use gguf_peft::rng::Rng;

fn randomize_b(lora: &Lora, seed: u64, scale: f32) {
    let mut rng = Rng::new(seed);
    for s in lora.sites() {
        let v: Vec<f32> = (0..s.rank * s.n_out).map(|_| scale * rng.normal()).collect();
        lora.tensor_b(&s.weight).write_f32(&v);
    }
}

fn all_targets() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    }
}

#[test]
fn gradients_match_finite_differences() {
    check_finite_differences(None);
}

/// The same check with input gradients through transposed weight copies
/// (F32 copies, so the product is exact).
#[test]
fn transposed_backward_gradients_match_finite_differences() {
    check_finite_differences(Some(GgmlType::F32));
}

fn check_finite_differences(transposed: Option<GgmlType>) {
    let dir = tmpdir(&format!("lora-fd-{}", transposed.is_some()));
    let path = synth(&dir, "llama", GgmlType::F32);
    let mut model = Model::load(&path, Backend::cpu(threads())).unwrap();
    if let Some(t) = transposed {
        model.prepare_transposed(Some(t)).unwrap();
    }
    let lora = Lora::new(&model, all_targets(), 1).unwrap();
    randomize_b(&lora, 2, 0.05);
    let tokens = some_tokens(10, model.hparams.n_vocab, 4);
    let ex = Example {
        loss: vec![true; tokens.len()],
        tokens,
        ..Default::default()
    };
    let mut sched = model.sched();
    let (l0, _, grads) = gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &[&ex]).unwrap();
    let names = lora.param_names();
    let params = lora.params();
    let eps = 1e-2f32;
    // Per tensor kind (A and B of attn_q / ffn_down in layer 0 and 1), the
    // entries with the largest gradients.
    let mut checked = 0;
    for (i, name) in names.iter().enumerate() {
        if !(name.contains("attn_q") || name.contains("ffn_down")) {
            continue;
        }
        let g = &grads[i];
        let mut vals = params[i].read_f32();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let mut worst = 0f32;
        for &j in idx.iter().take(3) {
            let orig = vals[j];
            vals[j] = orig + eps;
            params[i].write_f32(&vals);
            let (lp, _, _) = gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &[&ex]).unwrap();
            vals[j] = orig - eps;
            params[i].write_f32(&vals);
            let (lm, _, _) = gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &[&ex]).unwrap();
            vals[j] = orig;
            params[i].write_f32(&vals);
            let fd = (lp - lm) / (2.0 * eps);
            worst = worst.max((fd - g[j]).abs() / g[j].abs().max(1e-6));
        }
        println!("{name}: worst relative error {worst:.2e} (loss {l0:.4})");
        assert!(worst <= 1e-2, "{name}: {worst:.2e}");
        checked += 1;
    }
    assert_eq!(checked, 8);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn zero_b_is_bit_identical_to_base() {
    let dir = tmpdir("lora-zero");
    for arch in ["llama", "gemma3"] {
        let path = synth(&dir, arch, GgmlType::Q4_K);
        let model = Model::load(&path, Backend::cpu(threads())).unwrap();
        let lora = Lora::new(&model, all_targets(), 3).unwrap();
        let tokens = some_tokens(24, model.hparams.n_vocab, 5);
        let mut sched = model.sched();
        let base = model.logits(&mut sched, &Batch::single(&tokens), &NoHooks).unwrap();
        let with = model.logits(&mut sched, &Batch::single(&tokens), &lora).unwrap();
        assert_eq!(base, with, "{arch}: zero-B adapter changed the logits");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Trains `lora` a few steps with the trainer (high learning rate, so the
/// adapter moves the logits visibly).
fn train_few_steps(model: &Model, lora: &Lora, dir: &std::path::Path) {
    use gguf_peft::train::{Run, TrainConfig, TrainState};
    let examples: Vec<Example> = (0..4)
        .map(|i| {
            let tokens = some_tokens(16, model.hparams.n_vocab, 100 + i);
            Example {
                loss: vec![true; tokens.len()],
                tokens,
                ..Default::default()
            }
        })
        .collect();
    let mut cfg = TrainConfig {
        max_steps: Some(3),
        batch_size: 2,
        ..Default::default()
    };
    cfg.optim.lr = 1e-2;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let out = dir.join("train-out");
    std::fs::create_dir_all(&out).unwrap();
    let run = Run {
        train: &examples,
        eval: &[],
        out_dir: &out,
        stop: &stop,
        stop_after: None,
    };
    let o = gguf_peft::train::train(model, lora, &cfg, &run, TrainState::fresh(lora, 1), |_, _| {}).unwrap();
    assert_eq!(o.steps_done, 3);
}

fn check_llama_cpp_adapter(path: &std::path::Path, cfg: LoraConfig, b_scale: f32, scale: f32) -> f32 {
    let model = Model::load(path, Backend::cpu(threads())).unwrap();
    let mut lora = Lora::new(&model, cfg, 7).unwrap();
    if b_scale > 0.0 {
        randomize_b(&lora, 8, b_scale);
    } else {
        train_few_steps(&model, &lora, path.parent().unwrap());
    }
    let adapter = path.with_extension("lora.gguf");
    gguf_peft::export::llama_lora::write(&lora, &model, &adapter).unwrap();
    lora.user_scale = scale;
    let tokens = some_tokens(40, model.hparams.n_vocab, 6);
    let mut sched = model.sched();
    let ours = logits_like_llama_cpp(&model, &lora, &tokens);
    let base = model.logits(&mut sched, &Batch::single(&tokens), &NoHooks).unwrap();

    let lm = LlamaModel::load(path, false).unwrap();
    let ad = lm.load_adapter(&adapter).unwrap();
    let mut ctx = lm.context(64, threads()).unwrap();
    ctx.set_adapters(&[(&ad, scale)]).unwrap();
    let theirs = ctx.decode(&tokens, 0).unwrap();
    let (d, m) = compare(&ours, &theirs);
    let (moved, _) = compare(&base, &theirs);
    println!(
        "{}: max|Δ| {d:.3e}, ratio {:.2e}; the adapter moves logits by up to {moved:.3}",
        path.file_name().unwrap().to_string_lossy(),
        d / m
    );
    assert!(moved > 1e-2, "the adapter should change the logits");
    // Reading our file back gives the same adapter.
    let back = gguf_peft::export::llama_lora::read(&adapter, &model).unwrap();
    for s in lora.sites() {
        assert_eq!(back.tensor_a(&s.weight).read_f32(), lora.tensor_a(&s.weight).read_f32());
        assert_eq!(back.tensor_b(&s.weight).read_f32(), lora.tensor_b(&s.weight).read_f32());
    }
    d / m
}

#[test]
fn exported_adapter_in_llama_cpp_matches_tiny_models() {
    let dir = tmpdir("lora-llamacpp");
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        for ty in [GgmlType::F32, GgmlType::Q4_K] {
            let path = synth(&dir, arch, ty);
            let mut cfg = all_targets();
            if arch == "qwen2" {
                // The synthetic qwen2 has an untied head: adapt it and the embedding too.
                cfg.targets.push("output".into());
                cfg.targets.push("token_embd".into());
            }
            // Trained by the test (b_scale 0), applied at a non-unit scale.
            let ratio = check_llama_cpp_adapter(&path, cfg, 0.0, 0.7);
            assert!(ratio <= 1e-3, "{arch} {ty}: ratio {ratio:.2e}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exported_adapter_in_llama_cpp_matches_smollm2() {
    let dir = tmpdir("lora-smollm2");
    let path = dir.join("smollm2.gguf");
    std::os::unix::fs::symlink(smollm2(), &path).unwrap();
    let cfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: true,
        ..Default::default()
    };
    let ratio = check_llama_cpp_adapter(&path, cfg, 0.01, 1.0);
    assert!(ratio <= 1e-3, "ratio {ratio:.2e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// On a quantized base, gradients through transposed copies (F16, Q8_0 or
/// Q4_0) match ggml's stock OUT_PROD path (which dequantizes W exactly)
/// within the rounding of the copies, and the default on the CPU (no
/// copies: the GEMM dequantizes W) up to summation order: F16 within
/// 5e-3, and an 8- or 4-bit copy within what storing the base itself in
/// that type does to the gradients (F32 base vs the same weights in Q8_0 /
/// Q4_0, measured here).
#[test]
fn transposed_backward_matches_stock_on_quantized_weights() {
    let dir = tmpdir("lora-transposed");
    let ex = example_all_loss(20, 320, 9);
    // ggml's kernels throughout unless `gemm` (the default: on the CPU the
    // GEMM dequantizes W in bands instead of reading a copy).
    let grads_gemm = |ty: GgmlType, transposed: Option<Option<GgmlType>>, repack: bool, gemm: bool| {
        let path = synth(&dir, "qwen3", ty);
        let mut model = Model::load(&path, Backend::cpu(threads())).unwrap();
        model.repack = repack;
        model.gemm_products = gemm;
        if let Some(t) = transposed {
            let bytes = model.prepare_transposed(t).unwrap();
            if gemm && !repack && t.is_none() {
                assert_eq!(bytes, 0, "no copies with the dequantizing GEMM");
            }
        }
        if model.transposed_repacked() {
            println!("{ty} base: transposed copies in the CPU's repacking buffer");
        }
        let lora = Lora::new(&model, all_targets(), 1).unwrap();
        randomize_b(&lora, 2, 0.05);
        let mut sched = model.sched();
        gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &[&ex]).unwrap()
    };
    let grads_with = |ty, transposed, repack| grads_gemm(ty, transposed, repack, false);
    let grads = |ty: GgmlType, transposed: Option<Option<GgmlType>>| grads_with(ty, transposed, true);
    let rel = rel_diff;
    let exact = grads(GgmlType::F32, None).2;
    let noise = |t: GgmlType| rel(&grads(t, None).2, &exact);
    let (noise8, noise4) = (noise(GgmlType::Q8_0), noise(GgmlType::Q4_0));
    println!("a base stored in Q8_0 moves the gradients by {noise8:.2e}, in Q4_0 by {noise4:.2e}");
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0] {
        let (l_stock, _, g_stock) = grads(ty, None);
        for (copy, name, bound) in [
            (None, "F16", 5e-3),
            (Some(GgmlType::Q8_0), "Q8_0", noise8),
            (Some(GgmlType::Q4_0), "Q4_0", noise4),
        ] {
            let (l_t, _, g_t) = grads(ty, Some(copy));
            assert_eq!(l_stock, l_t, "the forward pass is unchanged");
            let r = rel(&g_t, &g_stock);
            println!(
                "{ty} base, {name} transposed copies: relative difference of all LoRA gradients vs stock {r:.2e} (bound {bound:.2e})"
            );
            assert!(r > 0.0, "the rewrite must have happened");
            assert!(r <= bound, "{ty} {name}: {r:.2e}");
        }
    }
    // The default on the CPU for weights that stay in their plain layout
    // (here: repacking off): no copies, the GEMM dequantizes W in bands of
    // rows: ggml's stock values up to float summation order.
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0] {
        let (l_stock, _, g_stock) = grads(ty, None);
        let (l_g, _, g_g) = grads_gemm(ty, Some(None), false, true);
        let r = rel(&g_g, &g_stock);
        println!("{ty} base, dequantizing GEMM, no copies: loss {l_g} vs {l_stock}, gradients vs stock {r:.2e}");
        assert!((l_g - l_stock).abs() <= 1e-5 * l_stock.abs());
        assert!(r <= 1e-5, "{ty}: {r:.2e}");
    }
    // Q4_0 copies in the CPU's repacking buffer (where this CPU repacks
    // them) run other kernels on the same values: the same gradients up to
    // float summation order.
    let q4 = Some(Some(GgmlType::Q4_0));
    let (l_r, _, g_r) = grads_with(GgmlType::Q4_K, q4, true);
    let (l_p, _, g_p) = grads_with(GgmlType::Q4_K, q4, false);
    let r = rel(&g_r, &g_p);
    println!("Q4_0 copies repacked vs plain: relative difference {r:.2e}");
    assert_eq!(l_r, l_p);
    assert!(r <= 1e-3, "{r:.2e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A synthetic `arch` model (Q4_K) with transposed copies, and a LoRA on
/// every target with dropout 0.1 (and on the embedding and the untied LM
/// head for qwen2), B randomized.
fn dropout_lora(dir: &std::path::Path, arch: &str) -> (Model, Lora) {
    let path = synth(dir, arch, GgmlType::Q4_K);
    let mut model = Model::load(&path, Backend::cpu(threads())).unwrap();
    model.prepare_transposed(None).unwrap();
    let mut cfg = all_targets();
    cfg.dropout = 0.1;
    if arch == "qwen2" {
        cfg.targets.push("token_embd".into());
        cfg.targets.push("output".into());
    }
    let lora = Lora::new(&model, cfg, 1).unwrap();
    randomize_b(&lora, 2, 0.05);
    (model, lora)
}

/// Examples of the given lengths (synthetic vocabulary, seeds from `seed`)
/// with loss on every token after the fifth.
fn after_prompt(lens: &[usize], seed: u64) -> Vec<Example> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let tokens = some_tokens(n, 320, seed + i as u64);
            Example {
                loss: (0..tokens.len()).map(|j| j > 4).collect(),
                tokens,
                ..Default::default()
            }
        })
        .collect()
}

/// Gradient checkpointing (per-block recomputation) gives the loss and the
/// gradients of the plain backward pass, for every architecture, with
/// dropout on and an adapter on the embedding too.
#[test]
fn gradient_checkpointing_matches_plain_backward() {
    let dir = tmpdir("lora-recompute");
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let (model, lora) = dropout_lora(&dir, arch);
        let exs = after_prompt(&[18, 19], 20);
        let refs: Vec<&Example> = exs.iter().collect();
        let mut sched = model.sched();
        lora.set_training(Some(Rng::new(9)));
        let (l1, n1, g1) = gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &refs).unwrap();
        lora.set_training(Some(Rng::new(9)));
        let (l2, n2, g2) =
            gguf_peft::train::recompute::loss_and_grads_recompute(&model, &lora, &mut sched, &refs).unwrap();
        lora.set_training(None);
        let rel = rel_diff(&g2, &g1);
        println!("{arch}: loss {l1} / {l2}, gradients relative difference {rel:.2e}");
        assert_eq!(n1, n2);
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{arch}: loss {l1} vs {l2}");
        assert!(rel <= 1e-5, "{arch}: {rel:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// On the CPU the LM head and loss run in graphs of their own, over chunks
/// of the loss rows, while the step's graph pauses; the loss and every
/// gradient are the whole graph's, for every architecture (dropout on, an
/// adapter on the embedding too), with more loss rows than one chunk holds,
/// and for the other methods (the same products on the same values: no
/// difference was measured).
#[test]
fn chunked_head_matches_the_whole_graph() {
    use gguf_peft::train::{loss_and_grads_observed, Observe};
    let dir = tmpdir("lora-chunked-head");
    let step = |model: &Model, method: &dyn Trainable, exs: &[Example], whole: bool| {
        let refs: Vec<&Example> = exs.iter().collect();
        let mut sched = model.sched();
        let mut obs = Observe {
            profile: true,
            whole_graph: whole,
            ..Default::default()
        };
        method.set_training(Some(Rng::new(9)));
        let (l, n, g) = loss_and_grads_observed(model, method, &mut sched, &refs, Some(&mut obs)).unwrap();
        method.set_training(None);
        let apart = obs.times.iter().any(|t| t.0.starts_with("LM head"));
        assert_eq!(apart, !whole, "where the head ran");
        (l, n, g)
    };
    let check = |what: &str, (l1, n1, g1): (f32, usize, Vec<Vec<f32>>), (l2, n2, g2): (f32, usize, Vec<Vec<f32>>)| {
        let rel = rel_diff(&g2, &g1);
        println!("{what}: {n1} loss rows, loss {l1} / {l2}, gradients relative difference {rel:.2e}");
        assert_eq!(n1, n2);
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{what}: loss {l1} vs {l2}");
        assert!(rel <= 1e-6, "{what}: {rel:.2e}");
    };
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let (model, lora) = dropout_lora(&dir, arch);
        // 145 + 135 loss rows: three chunks of the head, of 94, 93 and 93
        // rows (a short last one would run on other kernels), each with its
        // slice of the LM head adapter's dropout mask (qwen2).
        let exs = after_prompt(&[150, 140], 30);
        check(arch, step(&model, &lora, &exs, true), step(&model, &lora, &exs, false));
    }
    let model = Model::load(synth(&dir, "llama", GgmlType::Q8_0), Backend::cpu(threads())).unwrap();
    let exs: Vec<Example> = [(9, 5), (6, 6)]
        .iter()
        .map(|&(len, seed)| example_all_loss(len, model.hparams.n_vocab, seed))
        .collect();
    for (name, cfg, _) in method_cases() {
        let method = cfg.build(&model, None, 3).unwrap();
        check(
            name,
            step(&model, method.as_ref(), &exs, true),
            step(&model, method.as_ref(), &exs, false),
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Matrices moved into the CPU's repacking buffer (`Model::repack_weights`,
/// what `finetune` and `bench` do unless the backward is ggml's stock one)
/// run other kernels on the same values: the loss and gradients of the
/// plain kernels up to float summation order.
#[test]
fn repacked_weights_give_the_plain_kernels_results() {
    let dir = tmpdir("lora-repacked-weights");
    let ex = example_all_loss(20, 320, 9);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
        let path = synth(&dir, "llama", ty);
        let step = |repack: bool| {
            let mut model = Model::load(&path, Backend::cpu(threads())).unwrap();
            let n = if repack { model.repack_weights() } else { 0 };
            model.prepare_transposed(Some(GgmlType::F32)).unwrap();
            let lora = Lora::new(&model, all_targets(), 1).unwrap();
            randomize_b(&lora, 2, 0.05);
            let mut sched = model.sched();
            let (l, _, g) = gguf_peft::train::loss_and_grads(&model, &lora, &mut sched, &[&ex]).unwrap();
            (n, l, g)
        };
        let (n, l_r, g_r) = step(true);
        let (_, l_p, g_p) = step(false);
        let r = rel_diff(&g_r, &g_p);
        println!("{ty}: {n} matrices repacked; loss {l_r:.6} vs {l_p:.6}; gradients relative difference {r:.2e}");
        #[cfg(target_arch = "x86_64")]
        if ty == GgmlType::Q4_0 && std::arch::is_x86_feature_detected!("avx2") {
            assert!(n > 0, "an AVX2 CPU repacks Q4_0");
        }
        assert!((l_r - l_p).abs() <= 1e-4 * l_p.abs(), "{ty}: loss {l_r} vs {l_p}");
        assert!(r <= 1e-3, "{ty}: {r:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The backward's remaining OUT_PRODs (attention, LoRA gradients, method
/// encoders) run as strided GEMMs on the CPU (`Model::gemm_products`, on by
/// default): the same loss and gradients as ggml's own OUT_PROD kernel, up
/// to float summation order, for LoRA (non-zero B, grouped-query attention,
/// transposed views as inputs) and every other method family.
#[test]
fn gemm_products_give_ggml_kernel_results() {
    use gguf_peft::train::{loss_and_grads_observed, Observe};
    let dir = tmpdir("lora-gemm-out-prod");
    let path = synth(&dir, "llama", GgmlType::F32);
    let load = |gemm: bool| {
        let mut model = Model::load(&path, Backend::cpu(threads())).unwrap();
        model.gemm_products = gemm;
        model
    };
    let check = |name: &str, (l_g, g_g): (f32, Vec<Vec<f32>>), (l_s, g_s): (f32, Vec<Vec<f32>>)| {
        let r = rel_diff(&g_g, &g_s);
        println!("{name}: loss {l_g:.6} vs ggml's {l_s:.6}; gradients relative difference {r:.2e}");
        assert!((l_g - l_s).abs() <= 1e-5 * l_s.abs(), "{name}: loss {l_g} vs {l_s}");
        assert!(r <= 1e-5, "{name}: gradients differ by {r:.2e}");
    };
    let lora_step = |gemm: bool| {
        let model = load(gemm);
        let lora = Lora::new(&model, all_targets(), 1).unwrap();
        randomize_b(&lora, 2, 0.05);
        let ex = example_all_loss(24, model.hparams.n_vocab, 9);
        let mut obs = Observe {
            profile: true,
            ..Default::default()
        };
        let mut sched = model.sched();
        let (l, _, g) = loss_and_grads_observed(&model, &lora, &mut sched, &[&ex], Some(&mut obs)).unwrap();
        let ops: Vec<String> = obs.times.iter().map(|t| t.0.clone()).collect();
        ((l, g), ops)
    };
    let (gemm, ops_gemm) = lora_step(true);
    let (stock, ops_stock) = lora_step(false);
    assert!(ops_stock.iter().any(|o| o == "OUT_PROD"), "{ops_stock:?}");
    assert!(!ops_gemm.iter().any(|o| o == "OUT_PROD"), "{ops_gemm:?}");
    assert!(ops_gemm.iter().any(|o| o == "CUSTOM"), "{ops_gemm:?}");
    check("lora", gemm, stock);
    // F32 matrices need no transposed copies when the GEMM reads Wᵀ
    // through W's strides (the finite-difference test covers that path).
    assert_eq!(load(true).prepare_transposed(None).unwrap(), 0);
    assert!(load(false).prepare_transposed(None).unwrap() > 0);
    for (name, cfg, recompute) in method_cases() {
        check(
            name,
            method_step(&load(true), &cfg, recompute),
            method_step(&load(false), &cfg, recompute),
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
