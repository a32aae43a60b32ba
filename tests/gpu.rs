//! The GPU path. Runs whenever this build has a GPU device (built with
//! `--features cuda`, `vulkan` or `metal`) and skips with a message
//! otherwise: frozen weights and their backward stay on the device (checked
//! with the scheduler's node-to-backend assignment), and a training step
//! there gives the CPU's loss and gradients.

mod common;
use common::*;
use gguf_peft::ggml::{default_gpu, Backend, Device, GgmlType};
use gguf_peft::model::{Model, WeightLayout};
use gguf_peft::peft::lora::{Lora, LoraConfig};
use gguf_peft::rng::Rng;
use gguf_peft::train::{loss_and_grads_observed, Observe};

fn gpu() -> Option<Device> {
    let d = default_gpu();
    if d.is_none() {
        eprintln!(
            "SKIPPED: no GPU backend in this build (build with --features cuda, vulkan or metal; \
             a Vulkan device of CPU type, e.g. lavapipe, needs GGML_VK_VISIBLE_DEVICES=0)"
        );
    }
    d
}

fn lora_on(model: &Model) -> Lora {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let lora = Lora::new(model, cfg, 1).unwrap();
    // Non-zero B, so that every gradient is non-zero.
    let mut rng = Rng::new(2);
    for s in lora.sites() {
        let v: Vec<f32> = (0..s.rank * s.n_out).map(|_| 0.05 * rng.normal()).collect();
        lora.tensor_b(&s.weight).write_f32(&v);
    }
    lora
}

/// One LoRA training step on `backend`: loss, gradients and placement.
fn step(
    path: &std::path::Path,
    backend: std::sync::Arc<Backend>,
    layout: WeightLayout,
    copy: Option<GgmlType>,
) -> (f32, Vec<Vec<f32>>, Observe) {
    let mut model = Model::load_with(path, backend, layout).unwrap();
    model.prepare_transposed(copy).unwrap();
    let lora = lora_on(&model);
    let ex = example_all_loss(24, model.hparams.n_vocab, 9);
    let mut sched = model.sched();
    let mut obs = Observe::default();
    let (l, _, g) = loss_and_grads_observed(&model, &lora, &mut sched, &[&ex], Some(&mut obs)).unwrap();
    (l, g, obs)
}

#[test]
fn frozen_weights_forward_and_backward_run_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let dir = tmpdir("gpu-placement");
    for (ty, copy) in [
        (GgmlType::Q4_0, None),
        (GgmlType::Q8_0, Some(GgmlType::Q8_0)),
        (GgmlType::Q4_K, Some(GgmlType::Q4_0)),
    ] {
        let path = synth(&dir, "llama", ty);
        let backend = Backend::open(&dev.name, threads()).unwrap();
        let name = backend.name();
        let frozen: std::collections::HashSet<String> = {
            let m = Model::load(&path, Backend::cpu(1)).unwrap();
            m.file
                .tensors()
                .iter()
                .flat_map(|t| [t.name.clone(), format!("{}.T", t.name)])
                .collect()
        };
        let (_, _, obs) = step(&path, backend, WeightLayout::Native, copy);
        let on_weights: Vec<_> = obs
            .placement
            .iter()
            .filter(|n| n.sources.iter().any(|s| frozen.contains(s)))
            .collect();
        let backward = on_weights
            .iter()
            .filter(|n| n.op == "MUL_MAT" && n.sources[0].ends_with(".T"))
            .count();
        let off: Vec<String> = on_weights
            .iter()
            .filter(|n| n.backend != name)
            .map(|n| format!("{} {} on {:?} ran on {}", n.op, n.name, n.sources, n.backend))
            .collect();
        let mut fallback = std::collections::BTreeMap::<String, usize>::new();
        for n in obs.placement.iter().filter(|n| n.backend != name) {
            *fallback.entry(format!("{} ({})", n.op, n.backend)).or_default() += 1;
        }
        let all_off: usize = fallback.values().sum();
        println!(
            "{ty} base on {name}: {} nodes read frozen weights ({backward} of them input gradients through Wᵀ), \
             {} of those off the device; {all_off} of {} nodes on the CPU fallback in all: {fallback:?}",
            on_weights.len(),
            off.len(),
            obs.placement.len()
        );
        assert!(
            backward > 0,
            "{ty}: no input gradient went through the transposed copies"
        );
        assert!(
            off.is_empty(),
            "{ty}: frozen-weight nodes fell back:\n{}",
            off.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gpu_training_step_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let dir = tmpdir("gpu-vs-cpu");
    let rel = rel_diff;
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
        let path = synth(&dir, "qwen3", ty);
        // F32 copies everywhere, so that only the devices' kernels differ.
        let cpu = || Backend::cpu(threads());
        let (l_exact, g_exact, _) = step(&path, cpu(), WeightLayout::F32, Some(GgmlType::F32));
        let (l_cpu, g_cpu, _) = step(&path, cpu(), WeightLayout::Native, Some(GgmlType::F32));
        let gpu = Backend::open(&dev.name, threads()).unwrap();
        let (l_gpu, g_gpu, _) = step(&path, gpu, WeightLayout::Native, Some(GgmlType::F32));
        // On quantized weights both devices quantize activations for their
        // matmul kernels (each in its own way); the CPU's error against the
        // exact dequantized weights measures that noise, and the GPU's error
        // must stay within twice it (plus float rounding).
        let (e_cpu, e_gpu) = (rel(&g_cpu, &g_exact), rel(&g_gpu, &g_exact));
        let bound = 2.0 * e_cpu + 5e-3;
        println!(
            "{ty}: loss exact {l_exact:.6}, CPU {l_cpu:.6}, {} {l_gpu:.6}; LoRA gradients vs exact: CPU {e_cpu:.2e}, {} {e_gpu:.2e} (bound {bound:.2e}); {} vs CPU {:.2e}",
            dev.name, dev.name, dev.name, rel(&g_gpu, &g_cpu)
        );
        assert!(
            (l_exact - l_gpu).abs() <= 2.0 * (l_exact - l_cpu).abs() + 1e-4 * l_exact.abs(),
            "{ty}: loss {l_gpu} vs {l_exact}"
        );
        assert!(e_gpu <= bound, "{ty}: GPU gradients off by {e_gpu:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Naming a device this build does not have is a one-line error listing
/// the ones it has; `devices` lists them, marking what `auto` picks (runs
/// on every build).
#[test]
fn devices_are_listed_and_unknown_ones_refused() {
    let err = match Backend::open("NoSuchGpu7", 1) {
        Ok(_) => panic!("opened a device that does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("NoSuchGpu7") && err.contains("CPU"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    let (ok, out, _) = run_cli(&["devices"]);
    assert!(ok);
    let auto = default_gpu().map_or_else(|| "CPU".to_string(), |d| d.name);
    assert!(out.lines().any(|l| l.starts_with("CPU ")), "{out}");
    let marked: Vec<&str> = out.lines().filter(|l| l.ends_with("(auto)")).collect();
    assert_eq!(marked.len(), 1, "{out}");
    assert!(marked[0].starts_with(&auto), "{out}");
    let dir = tmpdir("gpu-bad-device");
    let path = synth(&dir, "llama", GgmlType::F32);
    let (ok, _, err) = run_cli(&[
        "generate",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "hi",
        "--device",
        "NoSuchGpu7",
    ]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("NoSuchGpu7"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Every method family, and LoRA with gradient checkpointing, on a packed
/// batch of two sequences: the device's loss and gradients are the CPU's
/// (F32 weights, so only float rounding differs).
#[test]
fn every_method_trains_on_the_gpu_as_on_the_cpu() {
    let Some(dev) = gpu() else { return };
    let dir = tmpdir("gpu-methods");
    let path = synth(&dir, "llama", GgmlType::F32);
    for (name, cfg, recompute) in method_cases() {
        // Mesa 22.3's lavapipe (a CPU Vulkan driver, what this was verified
        // on) crashes intermittently inside the driver (a shader writing out
        // of bounds into host memory) on the many small graphs of a
        // checkpointed step when ggml-vulkan records several nodes per
        // submission; node by node those steps run and match the CPU.
        // Unknown on GPU hardware, where these cases run.
        if recompute && dev.description.contains("llvmpipe") {
            println!(
                "{name}: not run on {} (lavapipe crash, see the comment)",
                dev.description
            );
            continue;
        }
        let run = |backend| {
            let model = Model::load(&path, backend).unwrap();
            method_step(&model, &cfg, recompute)
        };
        let (l_cpu, g_cpu) = run(Backend::cpu(threads()));
        let (l_gpu, g_gpu) = run(Backend::open(&dev.name, threads()).unwrap());
        let rel = rel_diff(&g_gpu, &g_cpu);
        println!(
            "{name}: loss CPU {l_cpu:.6} vs {} {l_gpu:.6}, gradients relative difference {rel:.2e}",
            dev.name
        );
        assert!(
            (l_cpu - l_gpu).abs() <= 5e-4 * l_cpu.abs(),
            "{name}: loss {l_cpu} vs {l_gpu}"
        );
        assert!(rel <= 5e-3, "{name}: gradients differ by {rel:.2e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A device without room for a store is an error naming the device and the
/// size, not an abort (shown on the CPU with an impossible 4 TiB).
#[test]
fn out_of_device_memory_is_an_error() {
    let ctx = gguf_peft::ggml::Context::new(2, 0, false);
    ctx.new_tensor(GgmlType::F32, &[1 << 20, 1 << 20]).set_name("huge");
    let err = match Backend::cpu(1).alloc_store(ctx) {
        Ok(_) => panic!("allocated 4 TiB"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("could not allocate 4194304 MiB on CPU"), "{err}");
}
