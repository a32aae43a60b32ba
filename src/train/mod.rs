//! The trainer: batches → graph → masked cross-entropy → ggml backward →
//! AdamW on the host → checkpoints. Deterministic for a seed: the data order
//! of every step is a function of (seed, step), so a resumed run repeats an
//! uninterrupted one step for step.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod recompute;

use crate::data::Example;
use crate::ggml::{Context, Sched};
use crate::model::{Batch, Model};
use crate::peft::Trainable;
use crate::rng::Rng;
use crate::{Error, Result};
pub use checkpoint::TrainState;
pub use metrics::StepMetrics;
pub use optim::{AdamW, OptimConfig, Schedule};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Training settings (the method's own live with the method).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub optim: OptimConfig,
    /// Sequences (examples, or packs of examples) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub epochs: usize,
    /// Stop after this many steps (overrides epochs).
    pub max_steps: Option<usize>,
    pub seed: u64,
    /// Pack short examples into sequences of up to `max_seq_len` tokens.
    pub pack: bool,
    pub max_seq_len: usize,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end or on interrupt).
    pub save_every: usize,
    /// Gradient checkpointing: recompute each block in the backward pass
    /// instead of keeping every activation.
    #[serde(default)]
    pub recompute: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optim: OptimConfig::default(),
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            seed: 0,
            pack: false,
            max_seq_len: 512,
            eval_every: 0,
            save_every: 0,
            recompute: false,
        }
    }
}

/// A flat packed batch of examples with next-token targets at loss
/// positions (or, for a labeled example, its class at its last token).
pub fn make_batch(examples: &[&Example]) -> (Batch, Vec<i32>) {
    let mut b = Batch {
        outputs: Some(Vec::new()),
        ..Default::default()
    };
    let mut targets = Vec::new();
    for (si, e) in examples.iter().enumerate() {
        let base = b.tokens.len() as i32;
        for i in 0..e.tokens.len() {
            b.tokens.push(e.tokens[i]);
            b.pos.push(i as i32);
            b.seq.push(si as u32);
            if let Some(label) = e.label {
                if i + 1 == e.tokens.len() {
                    b.outputs.as_mut().unwrap().push(base + i as i32);
                    targets.push(label as i32);
                }
            } else if i + 1 < e.tokens.len() && e.loss[i + 1] {
                b.outputs.as_mut().unwrap().push(base + i as i32);
                targets.push(e.tokens[i + 1]);
            }
        }
    }
    (b, targets)
}

/// Targets must index the logits: labeled examples go with a
/// classification head, text with the LM head.
pub(crate) fn check_targets(targets: &[i32], width: usize, method: &dyn Trainable) -> Result<()> {
    if targets.iter().all(|&t| (t as usize) < width) {
        return Ok(());
    }
    Err(Error::Msg(match method.class_labels() {
        Some(c) => format!(
            "this adapter classifies into {} labels; its data must be {{\"text\",\"label\"}} records",
            c.len()
        ),
        None => "a target is outside the vocabulary (labeled data needs a classification head: --method ptuning-v2)"
            .to_string(),
    }))
}

/// Adds the backward pass and routes input gradients through the model's
/// transposed weight copies, where it has them; on the CPU the products
/// ggml is slow at run as GEMMs, and with `remat` values the backward reads
/// are recomputed there ([`crate::ggml::Graph::rematerialize`]; not worth
/// its time in a graph of one block, as gradient checkpointing runs).
pub(crate) fn build_backward<'a>(model: &'a Model, ctx: &'a Context, g: &mut crate::ggml::Graph<'a>, remat: bool) {
    g.build_backward(ctx);
    g.replace_weight_out_prods(|w| model.transposed_of(w));
    let dev = model.backend();
    if dev.is_cpu() {
        if remat {
            g.rematerialize(ctx);
        }
    } else {
        g.contiguous_out_prod_inputs(ctx, |t| dev.supports(t));
    }
    model.gemm_products_in(g, ctx);
}

/// Loss, loss rows and gradients of one micro-batch, with or without
/// per-block recomputation.
pub fn micro_batch_grads(
    model: &Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    examples: &[&Example],
    recompute: bool,
) -> Result<(f32, usize, Vec<Vec<f32>>)> {
    if recompute {
        recompute::loss_and_grads_recompute(model, method, sched, examples)
    } else {
        loss_and_grads(model, method, sched, examples)
    }
}

/// Mean cross-entropy over the loss positions of `examples` and its gradient
/// for every trainable tensor (in `param_names` order).
pub fn loss_and_grads(
    model: &Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    examples: &[&Example],
) -> Result<(f32, usize, Vec<Vec<f32>>)> {
    loss_and_grads_observed(model, method, sched, examples, None)
}

/// Seconds and node counts per op kind, largest first.
pub type Profile = Vec<(String, f64, usize)>;

/// What one training step can record besides its results (for benchmarks
/// and tests).
#[derive(Debug, Default)]
pub struct Observe {
    /// Time every op kind (slower than a plain step).
    pub profile: bool,
    /// With `profile`: per op and input shapes.
    pub shapes: bool,
    /// Seconds and node counts per op kind, largest first (with `profile`).
    pub times: Profile,
    /// Where the scheduler placed each node of the step's graph.
    pub placement: Vec<crate::ggml::NodeAssignment>,
    /// Keep the LM head and loss in the step's graph (on the CPU they run
    /// in graphs of their own, over chunks of the loss rows).
    pub whole_graph: bool,
}

/// [`loss_and_grads`], recording what `obs` asks for.
pub fn loss_and_grads_observed(
    model: &Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    examples: &[&Example],
    obs: Option<&mut Observe>,
) -> Result<(f32, usize, Vec<Vec<f32>>)> {
    let (batch, targets) = make_batch(examples);
    let n_out = targets.len();
    if n_out == 0 {
        return Err(Error::Msg("batch has no loss tokens".into()));
    }
    let gs = model.graph_size() * 4;
    let ctx = Context::new(gs, gs, true);
    method.new_batch();
    let params = method.params();
    for p in &params {
        p.set_param();
    }
    let whole = obs.as_ref().is_some_and(|o| o.whole_graph) || !model.backend().is_cpu();
    if !whole {
        return chunked_head_step(model, method, sched, &ctx, (&batch, &targets), &params, obs);
    }
    let (logits, f) = model.build_logits(&ctx, &batch, method, true);
    // The vocabulary, or the classes of a classification head.
    let n_vocab = logits.ne()[0] as usize;
    check_targets(&targets, n_vocab, method)?;
    let (loss, labels) = ctx.cross_entropy_loss_targets(logits);
    let loss = loss.set_loss().set_output();
    let mut g = ctx.new_graph(gs, true);
    g.build_forward(loss);
    build_backward(model, &ctx, &mut g, true);
    sched.alloc(&g)?;
    f.fill_inputs();
    method.fill_inputs(&g);
    labels.write_targets(&targets);
    g.reset();
    match obs {
        Some(o) => {
            o.placement = sched.assignments(&g);
            if o.profile {
                o.times = sched.compute_profiled(&g, o.shapes)?;
            } else {
                sched.compute(&g)?;
            }
        }
        None => sched.compute(&g)?,
    }
    let l = loss.read_f32()[0];
    let grads = params
        .iter()
        .map(|p| {
            g.grad(*p)
                .map(|t| t.read_f32())
                .unwrap_or_else(|| vec![0.0; p.n_elements()])
        })
        .collect();
    Ok((l, n_out, grads))
}

/// A step whose LM head and loss run outside its graph: the graph computes
/// the last residual stream `h`, pauses while [`recompute::head_backward`]
/// runs the head over chunks of the loss rows in graphs of its own (so the
/// n_vocab-wide logits of one chunk at a time are alive, not all of them
/// next to every activation the backward holds), then goes on with the
/// backward of `Σ h ⊙ G`, G the head's gradient written into the graph.
fn chunked_head_step<'a>(
    model: &'a Model,
    method: &'a dyn Trainable,
    sched: &mut Sched,
    ctx: &'a Context,
    (batch, targets): (&'a Batch, &[i32]),
    params: &[crate::ggml::Tensor<'a>],
    obs: Option<&mut Observe>,
) -> Result<(f32, usize, Vec<Vec<f32>>)> {
    let hp = &model.hparams;
    let mut f = crate::model::Forward::new(ctx, hp, model.weights(), method, model.arch.rope_mode(), batch, true);
    let h = model.arch.hidden(&mut f);
    let dh = ctx.new_tensor(crate::ggml::GgmlType::F32, &h.ne()).set_input();
    let surrogate = ctx.sum(ctx.mul(h, dh)).set_loss().set_output();
    let mut g = ctx.new_graph(model.graph_size() * 4, true);
    g.build_forward(surrogate);
    build_backward(model, ctx, &mut g, true);
    if !g.computes_before_reading(h, dh) {
        return Err(Error::Msg(
            "internal: the step's graph reads the head's gradient before computing the hidden states".into(),
        ));
    }
    sched.alloc(&g)?;
    f.fill_inputs();
    method.fill_inputs(&g);
    g.reset();
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.n_elements()]).collect();
    let mut loss = 0f32;
    let profile = obs.as_ref().and_then(|o| o.profile.then_some(o.shapes));
    let times = sched.compute_paused(&g, h, profile, "LM head and loss (graphs of their own)", |side| {
        let hidden = h.read_f32();
        let chunk = recompute::HEAD_CHUNK_HELD;
        let (l, up) =
            recompute::head_backward(model, method, side, &hidden, batch, targets, params, &mut grads, chunk)?;
        dh.write_f32(&up);
        loss = l;
        Ok::<(), Error>(())
    })?;
    if let Some(o) = obs {
        o.placement = sched.assignments(&g);
        o.times = times;
    }
    recompute::accumulate(&g, params, &mut grads);
    Ok((loss, targets.len(), grads))
}

/// Loss rows per evaluation graph: its logits (n_vocab floats per row, on
/// the backend and then on the host) are the largest thing it holds, about
/// 100 MB for a 49k vocabulary (an example with more rows runs alone).
const EVAL_ROWS: usize = 512;

/// Examples per evaluation graph, at most.
const EVAL_EXAMPLES: usize = 8;

/// Consecutive groups of `examples` holding at most [`EVAL_ROWS`] loss rows
/// and [`EVAL_EXAMPLES`] examples each (or one example).
fn eval_groups(examples: &[Example]) -> Vec<Vec<&Example>> {
    let mut groups: Vec<Vec<&Example>> = Vec::new();
    let mut rows = 0;
    for e in examples {
        let r = e.n_loss();
        match groups.last_mut() {
            Some(g) if g.len() < EVAL_EXAMPLES && rows + r <= EVAL_ROWS => {
                g.push(e);
                rows += r;
            }
            _ => {
                groups.push(vec![e]);
                rows = r;
            }
        }
    }
    groups
}

/// Mean token NLL over the loss positions of `examples` (forward only, with
/// the training step's kernels: [`Model::logits_as_trained`]).
pub fn eval_loss(model: &Model, method: &dyn Trainable, sched: &mut Sched, examples: &[Example]) -> Result<f32> {
    method.set_training(None);
    let (mut nll, mut n) = (0f64, 0usize);
    for refs in eval_groups(examples) {
        let (batch, targets) = make_batch(&refs);
        if targets.is_empty() {
            continue;
        }
        let rows = model.logits_as_trained(sched, &batch, method)?;
        check_targets(&targets, rows.first().map_or(0, |r| r.len()), method)?;
        for (row, &t) in rows.iter().zip(&targets) {
            nll -= crate::eval::log_prob(row, t as usize);
            n += 1;
        }
    }
    Ok(if n == 0 { f32::NAN } else { (nll / n as f64) as f32 })
}

/// What [`train`] did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps_done: usize,
    pub total_steps: usize,
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    pub first_eval: Option<f32>,
    pub last_eval: Option<f32>,
}

/// Where the data comes from and where the run writes.
pub struct Run<'a> {
    pub train: &'a [Example],
    pub eval: &'a [Example],
    pub out_dir: &'a Path,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
    /// Stop (with a checkpoint) once this step is done, as if interrupted.
    pub stop_after: Option<usize>,
}

/// Units of training data: packs of examples, or one example each.
fn units(train: &[Example], cfg: &TrainConfig) -> Vec<Vec<usize>> {
    if cfg.pack {
        let lengths: Vec<usize> = train.iter().map(|e| e.tokens.len()).collect();
        crate::data::pack(&lengths, cfg.max_seq_len)
    } else {
        (0..train.len()).map(|i| vec![i]).collect()
    }
}

/// Steps per epoch and in total.
pub fn plan(n_units: usize, cfg: &TrainConfig) -> (usize, usize) {
    let per_step = cfg.batch_size.max(1) * cfg.grad_accum.max(1);
    let per_epoch = n_units.div_ceil(per_step).max(1);
    (per_epoch, cfg.max_steps.unwrap_or(per_epoch * cfg.epochs.max(1)))
}

/// The units of each micro-batch of step `step`.
fn step_units(step: usize, n_units: usize, per_epoch: usize, cfg: &TrainConfig) -> Vec<Vec<usize>> {
    let epoch = step / per_epoch;
    let j = step % per_epoch;
    let mut order: Vec<usize> = (0..n_units).collect();
    Rng::new(cfg.seed ^ (0x5EED_0000 + epoch as u64).wrapping_mul(0x9E37_79B9)).shuffle(&mut order);
    let bs = cfg.batch_size.max(1);
    let start = j * bs * cfg.grad_accum.max(1);
    (0..cfg.grad_accum.max(1))
        .map(|k| {
            let a = (start + k * bs).min(n_units);
            let b = (start + (k + 1) * bs).min(n_units);
            order[a..b].to_vec()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// Trains `method` on `model`. Starts from `state` (a fresh one, or one
/// loaded from a checkpoint) and reports every step to `on_step`.
pub fn train(
    model: &Model,
    method: &dyn Trainable,
    cfg: &TrainConfig,
    run: &Run<'_>,
    mut state: TrainState,
    mut on_step: impl FnMut(&StepMetrics, usize),
) -> Result<Outcome> {
    let units = units(run.train, cfg);
    if units.is_empty() {
        return Err(Error::Msg("no training examples".into()));
    }
    let (per_epoch, total) = plan(units.len(), cfg);
    let mut sched = model.sched();
    let metrics_path = run.out_dir.join("metrics.jsonl");
    metrics::truncate_after(&metrics_path, state.step)?;
    let mut out = Outcome {
        steps_done: state.step,
        total_steps: total,
        interrupted: false,
        last_checkpoint: None,
        first_eval: None,
        last_eval: None,
    };
    let do_eval = !run.eval.is_empty();
    if do_eval && state.step == 0 {
        let e = eval_loss(model, method, &mut sched, run.eval)?;
        out.first_eval = Some(e);
        metrics::append(&metrics_path, &StepMetrics::eval_only(0, e))?;
    }
    state.write_params(method);
    while state.step < total {
        let t0 = std::time::Instant::now();
        let step = state.step;
        let micro = step_units(step, units.len(), per_epoch, cfg);
        method.set_training(state.rng.take());
        let mut grads: Vec<Vec<f32>> = state.params.iter().map(|p| vec![0.0; p.len()]).collect();
        let (mut loss_sum, mut rows, mut n_tokens) = (0f64, 0usize, 0usize);
        let mut parts = Vec::new();
        for m in &micro {
            let exs: Vec<&Example> = m
                .iter()
                .flat_map(|&u| units[u].iter().map(|&i| &run.train[i]))
                .collect();
            n_tokens += exs.iter().map(|e| e.tokens.len()).sum::<usize>();
            let (l, n, g) = micro_batch_grads(model, method, &mut sched, &exs, cfg.recompute)?;
            parts.push((l, n, g));
            rows += n;
        }
        // Token-weighted mean over micro-batches.
        for (l, n, g) in parts {
            let w = n as f32 / rows as f32;
            loss_sum += l as f64 * n as f64;
            for (acc, gi) in grads.iter_mut().zip(g) {
                acc.iter_mut().zip(gi).for_each(|(a, x)| *a += w * x);
            }
        }
        state.rng = method.training_rng();
        method.set_training(None);
        let loss = (loss_sum / rows as f64) as f32;
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "loss became {loss} at step {}; stopping (last good checkpoint: {}); try a lower --lr",
                step + 1,
                out.last_checkpoint
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string())
            )));
        }
        let lr = cfg.optim.lr_at(step, total);
        let grad_norm = state.update(&cfg.optim, lr, grads, method);
        state.step += 1;
        out.steps_done = state.step;
        let secs = t0.elapsed().as_secs_f64();
        let mut m = StepMetrics {
            step: state.step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens: Some(n_tokens),
            tokens_per_s: Some(n_tokens as f64 / secs.max(1e-9)),
            eval_loss: None,
        };
        let last = state.step == total;
        if do_eval && (last || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every))) {
            let e = eval_loss(model, method, &mut sched, run.eval)?;
            m.eval_loss = Some(e);
            out.last_eval = Some(e);
        }
        metrics::append(&metrics_path, &m)?;
        on_step(&m, total);
        let interrupted = run.stop.load(Ordering::SeqCst) || run.stop_after == Some(state.step);
        if last || interrupted || (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every)) {
            out.last_checkpoint = Some(checkpoint::save(run.out_dir, &state, method, cfg)?);
        }
        if interrupted && !last {
            out.interrupted = true;
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evaluation groups keep the examples' order, hold at most
    /// `EVAL_ROWS` loss rows and `EVAL_EXAMPLES` examples unless one
    /// example alone has more rows, and agree with `make_batch`'s targets.
    #[test]
    fn eval_groups_bound_the_logits_rows() {
        let ex = |n: usize| Example {
            tokens: vec![1; n],
            loss: vec![true; n],
            label: None,
        };
        let lens = [100, 300, 200, 900, 10, 10, 10, 10, 10, 10, 10, 10, 10, 513, 2];
        let examples: Vec<Example> = lens.iter().map(|&n| ex(n)).collect();
        let groups = eval_groups(&examples);
        let sizes: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|e| e.tokens.len()).collect())
            .collect();
        assert_eq!(
            sizes,
            vec![
                vec![100, 300],
                vec![200],
                vec![900],
                vec![10; 8],
                vec![10],
                vec![513],
                vec![2]
            ]
        );
        for g in &groups {
            let rows = make_batch(g).1.len();
            assert_eq!(rows, g.iter().map(|e| e.n_loss()).sum::<usize>());
            assert!(g.len() == 1 || (rows <= EVAL_ROWS && g.len() <= EVAL_EXAMPLES));
        }
    }
}
