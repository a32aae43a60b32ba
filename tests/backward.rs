//! The differentiable graph of every architecture has a ggml backward, and
//! its gradients match central finite differences (a trainable offset on the
//! input embeddings stands in for an adapter).

mod common;
use common::*;
use gguf_peft::ggml::{Backend, Context, GgmlType, Tensor, TensorStore};
use gguf_peft::model::{Batch, Hooks, Model, Site};
use gguf_peft::rng::Rng;

struct InputOffset {
    store: TensorStore,
}

impl Hooks for InputOffset {
    fn embed<'a>(&'a self, ctx: &'a Context, _site: &Site, w: Tensor<'a>, ids: Tensor<'a>) -> Tensor<'a> {
        ctx.add(ctx.get_rows(w, ids), self.store.get("delta").unwrap())
    }
}

fn check_arch(arch: &str) {
    let dir = tmpdir(&format!("backward-{arch}"));
    let path = synth(&dir, arch, GgmlType::F32);
    let backend = Backend::cpu(threads());
    let model = Model::load(&path, backend.clone()).unwrap();
    let (n_embd, n_vocab) = (model.hparams.n_embd, model.hparams.n_vocab);
    let tokens = some_tokens(12, n_vocab, 3);
    let n = tokens.len();

    let pctx = Context::new(1, 0, false);
    pctx.new_tensor(GgmlType::F32, &[n_embd as i64, n as i64])
        .set_name("delta");
    let hook = InputOffset {
        store: backend.alloc_store(pctx).unwrap(),
    };
    let delta = hook.store.get("delta").unwrap().set_param();
    let mut rng = Rng::new(11);
    let mut d0: Vec<f32> = (0..n_embd * n).map(|_| 0.05 * rng.normal()).collect();

    // Next-token targets as one-hot rows.
    let mut labels = vec![0f32; n_vocab * n];
    for i in 0..n {
        let t = if i + 1 < n { tokens[i + 1] } else { 2 };
        labels[i * n_vocab + t as usize] = 1.0;
    }

    let batch = Batch::single(&tokens);
    let ctx = Context::new(16384, 8192, true);
    let (logits, f) = model.build_logits(&ctx, &batch, &hook, true);
    let lab = ctx.new_tensor(GgmlType::F32, &[n_vocab as i64, n as i64]).set_input();
    let loss = ctx.cross_entropy_loss(logits, lab).set_loss().set_output();
    let mut g = ctx.new_graph(8192, true);
    g.build_forward(loss);
    g.build_backward(&ctx);
    let grad = g.grad(delta).expect("delta has a gradient");
    let mut sched = gguf_peft::ggml::Sched::new(std::slice::from_ref(&backend), 8192);
    sched.alloc(&g).unwrap();

    let mut eval = |d: &[f32]| -> (f32, Vec<f32>) {
        f.fill_inputs();
        lab.write_f32(&labels);
        delta.write_f32(d);
        g.reset();
        sched.compute(&g).unwrap();
        (loss.read_f32()[0], grad.read_f32())
    };
    let (l0, g0) = eval(&d0);
    assert!(l0.is_finite() && g0.iter().all(|x| x.is_finite()));
    // The entries with the largest gradients, spread over positions.
    let mut idx: Vec<usize> = (0..g0.len()).collect();
    idx.sort_by(|&a, &b| g0[b].abs().total_cmp(&g0[a].abs()));
    let eps = 1e-2f32;
    let mut worst = 0f32;
    for &i in idx.iter().take(6) {
        let orig = d0[i];
        d0[i] = orig + eps;
        let (lp, _) = eval(&d0);
        d0[i] = orig - eps;
        let (lm, _) = eval(&d0);
        d0[i] = orig;
        let fd = (lp - lm) / (2.0 * eps);
        let rel = (fd - g0[i]).abs() / g0[i].abs().max(1e-6);
        worst = worst.max(rel);
        println!(
            "{arch}: d loss / d delta[{i}] = {:.5e}, central difference {:.5e}, relative error {rel:.2e}",
            g0[i], fd
        );
    }
    println!(
        "{arch}: loss {l0:.4}, {} graph nodes, worst relative error {worst:.2e}",
        g.n_nodes()
    );
    assert!(worst <= 1e-2, "{arch}: gradient relative error {worst:.2e} > 1e-2");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn llama_backward_matches_finite_differences() {
    check_arch("llama");
}

#[test]
fn qwen2_backward_matches_finite_differences() {
    check_arch("qwen2");
}

#[test]
fn qwen3_backward_matches_finite_differences() {
    check_arch("qwen3");
}

#[test]
fn gemma3_backward_matches_finite_differences() {
    check_arch("gemma3");
}
