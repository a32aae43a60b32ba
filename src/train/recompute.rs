//! Gradient checkpointing per transformer block: the forward pass keeps only
//! each block's input; the backward pass runs the LM head, then every block
//! from the last to the first, recomputing the block from its saved input
//! and pulling the upstream gradient through it. Activations of one block
//! at a time are alive instead of all of them, for one more forward pass.

use super::make_batch;
use crate::data::Example;
use crate::ggml::{Context, GgmlType, Graph, Sched, Tensor};
use crate::model::{Forward, Model};
use crate::peft::Trainable;
use crate::{Error, Result};

/// Loss rows per LM-head graph under gradient checkpointing: bounds the
/// n_vocab-wide logits in memory (25 MB on SmolLM2).
pub(super) const HEAD_CHUNK: usize = 128;

/// Loss rows per LM-head graph in a step that holds its activations: half
/// as many graphs (each dequantizes a quantized output weight once):
/// 0.3–1.9 % less time on SmolLM2, for 20–23 MiB more.
pub(super) const HEAD_CHUNK_HELD: usize = 2 * HEAD_CHUNK;

/// Runs one backward stage whose loss is `loss`: builds the backward pass,
/// allocates, writes the builder's and the method's inputs and then the
/// stage's own (`write`), computes, and adds the parameter gradients to
/// `acc`. Returns the graph, for the gradients of the stage's inputs.
#[allow(clippy::too_many_arguments)]
fn run_stage<'a>(
    model: &'a Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    ctx: &'a Context,
    f: &Forward<'a>,
    loss: Tensor<'a>,
    params: &[Tensor<'_>],
    acc: &mut [Vec<f32>],
    write: impl FnOnce(),
) -> Result<Graph<'a>> {
    let mut g = ctx.new_graph(model.graph_size() * 4, true);
    g.build_forward(loss);
    super::build_backward(model, ctx, &mut g, false);
    sched.alloc(&g)?;
    f.fill_inputs();
    method.fill_inputs(&g);
    write();
    g.reset();
    sched.compute(&g)?;
    accumulate(&g, params, acc);
    Ok(g)
}

/// Adds `grad(p)` of every parameter the graph reached to `acc`.
pub(super) fn accumulate(g: &Graph<'_>, params: &[Tensor<'_>], acc: &mut [Vec<f32>]) {
    for (p, a) in params.iter().zip(acc.iter_mut()) {
        if let Some(t) = g.grad(*p) {
            a.iter_mut().zip(t.read_f32()).for_each(|(x, y)| *x += y);
        }
    }
}

/// Lengths of the head's chunks of `n` loss rows: as few as hold at most
/// `most` rows each, differing by at most one row (a short chunk could fall
/// below the GEMM's fewest columns and onto ggml's kernels, which round the
/// activations of a quantized weight's product to 8 bits).
fn chunk_lengths(n: usize, most: usize) -> Vec<usize> {
    let k = n.div_ceil(most).max(1);
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

/// The final norm, LM head and loss over the last residual stream
/// `hidden` (`[n_embd, n_rows]` of `batch`), in graphs of at most `chunk`
/// loss rows each, so that the logits (n_vocab per row) of only one chunk
/// are alive at a time. Adds the gradients of the parameters acting there
/// (e.g. a classification head) to `acc`; returns the loss (the mean over
/// all loss rows) and its gradient with respect to `hidden`.
#[allow(clippy::too_many_arguments)]
pub(super) fn head_backward(
    model: &Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    hidden: &[f32],
    batch: &crate::model::Batch,
    targets: &[i32],
    params: &[Tensor<'_>],
    acc: &mut [Vec<f32>],
    chunk: usize,
) -> Result<(f32, Vec<f32>)> {
    let hp = &model.hparams;
    let n_embd = hp.n_embd;
    let n_rows = hidden.len() / n_embd;
    let (gs, mode) = (model.graph_size() * 4, model.arch.rope_mode());
    let sctx = Context::new(1, 0, false);
    sctx.new_tensor(GgmlType::F32, &[n_embd as i64, n_rows as i64])
        .set_name("head.h");
    let store = model.backend().alloc_store(sctx)?;
    let h_in = store.get("head.h").expect("created").set_param();
    let rows = batch.outputs.clone().expect("training batches select their loss rows");
    let mut loss = 0f32;
    let mut upstream = vec![0f32; n_embd * n_rows];
    // Graphs over a window of the loss rows; the method's random inputs
    // over those rows are slices of one draw over all of them.
    struct Window<'m>(&'m dyn Trainable);
    impl Drop for Window<'_> {
        fn drop(&mut self) {
            self.0.set_row_window(None);
        }
    }
    let _window = Window(method);
    let mut start = 0;
    for len in chunk_lengths(rows.len(), chunk) {
        let chunk = &rows[start..start + len];
        method.set_row_window(Some((start, rows.len())));
        let cb = crate::model::Batch {
            outputs: Some(chunk.to_vec()),
            ..batch.clone()
        };
        let ctx = Context::new(gs, gs, true);
        let mut f = Forward::new(&ctx, hp, model.weights(), method, mode, &cb, true);
        let hn = model.arch.output_norm(&mut f, h_in);
        let logits = model.logits_from_normed(&ctx, &mut f, hn);
        if start == 0 {
            // Every target against the vocabulary, or the classes of a
            // classification head (the same width in every chunk).
            super::check_targets(targets, logits.ne()[0] as usize, method)?;
        }
        let (ce, labels) = ctx.cross_entropy_loss_targets(logits);
        // The mean over all loss rows is the chunk means weighted by size.
        let w = len as f32 / rows.len() as f32;
        let l = ctx.scale(ce, w).set_loss().set_output();
        let g = run_stage(model, method, sched, &ctx, &f, l, params, acc, || {
            h_in.write_f32(hidden);
            labels.write_targets(&targets[start..start + len]);
        })?;
        let up = g.grad(h_in).expect("hidden state gradient").read_f32();
        upstream.iter_mut().zip(up).for_each(|(a, b)| *a += b);
        loss += l.read_f32()[0];
        start += len;
    }
    Ok((loss, upstream))
}

/// [`super::loss_and_grads`] with per-block recomputation: same loss and
/// gradients (up to float rounding), far less activation memory.
pub fn loss_and_grads_recompute(
    model: &Model,
    method: &dyn Trainable,
    sched: &mut Sched,
    examples: &[&Example],
) -> Result<(f32, usize, Vec<Vec<f32>>)> {
    let (batch, targets) = make_batch(examples);
    let n_out = targets.len();
    if n_out == 0 {
        return Err(Error::Msg("batch has no loss tokens".into()));
    }
    let hp = &model.hparams;
    let (n_embd, n_layer) = (hp.n_embd, hp.n_layer);
    let gs = model.graph_size() * 4;
    let mode = model.arch.rope_mode();
    method.new_batch();
    let params = method.params();
    for p in &params {
        p.set_param();
    }
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.n_elements()]).collect();

    // 1. Forward, keeping the residual stream entering each block (and the last one).
    let hs: Vec<Vec<f32>> = {
        let ctx = Context::new(gs, gs, false);
        let mut f = Forward::new(&ctx, hp, model.weights(), method, mode, &batch, true);
        let mut x = model.arch.embed(&mut f).set_output();
        let mut outs = vec![x];
        for il in 0..n_layer {
            x = model.arch.block(&mut f, il, x).set_output();
            outs.push(x);
        }
        let mut g = ctx.new_graph(gs, false);
        g.build_forward(x);
        model.gemm_products_in(&mut g, &ctx);
        sched.alloc(&g)?;
        f.fill_inputs();
        method.fill_inputs(&g);
        sched.compute(&g)?;
        outs.iter().map(|t| t.read_f32()).collect()
    };
    let n_rows = hs[0].len() / n_embd;

    // 2. Final norm, LM head and loss.
    let (loss, mut upstream) = head_backward(
        model,
        method,
        sched,
        &hs[n_layer],
        &batch,
        &targets,
        &params,
        &mut grads,
        HEAD_CHUNK,
    )?;

    // Inputs of the block stages: a block input (a parameter, to get its
    // gradient) and the gradient arriving from above.
    let sctx = Context::new(2, 0, false);
    sctx.new_tensor(GgmlType::F32, &[n_embd as i64, n_rows as i64])
        .set_name("ckpt.h");
    sctx.new_tensor(GgmlType::F32, &[n_embd as i64, n_rows as i64])
        .set_name("ckpt.g");
    let store = model.backend().alloc_store(sctx)?;
    let h_in = store.get("ckpt.h").expect("created").set_param();
    let g_in = store.get("ckpt.g").expect("created");

    // 3. Blocks, last to first: recompute, pull the gradient through.
    for il in (0..n_layer).rev() {
        let ctx = Context::new(gs, gs, true);
        let mut f = Forward::new(&ctx, hp, model.weights(), method, mode, &batch, true);
        let y = model.arch.block(&mut f, il, h_in);
        let l = ctx.sum(ctx.mul(y, g_in)).set_loss().set_output();
        let g = run_stage(model, method, sched, &ctx, &f, l, &params, &mut grads, || {
            h_in.write_f32(&hs[il]);
            g_in.write_f32(&upstream);
        })?;
        upstream = g.grad(h_in).expect("block input gradient").read_f32();
    }

    // 4. The embeddings, when a parameter acts there (e.g. token_embd LoRA).
    {
        // Room for a probe graph and the stage's own.
        let ctx = Context::new(gs * 2, gs * 2, true);
        let mut f = Forward::new(&ctx, hp, model.weights(), method, mode, &batch, true);
        let x = model.arch.embed(&mut f);
        let l = ctx.sum(ctx.mul(x, g_in)).set_loss().set_output();
        let mut probe = ctx.new_graph(gs, false);
        probe.build_forward(l);
        if probe.has_param() {
            run_stage(model, method, sched, &ctx, &f, l, &params, &mut grads, || {
                g_in.write_f32(&upstream)
            })?;
        }
    }
    Ok((loss, n_out, grads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_chunks_are_even() {
        assert_eq!(chunk_lengths(0, 128), vec![0]);
        assert_eq!(chunk_lengths(128, 128), vec![128]);
        assert_eq!(chunk_lengths(129, 128), vec![65, 64]);
        assert_eq!(chunk_lengths(280, 128), vec![94, 93, 93]);
        assert_eq!(chunk_lengths(280, 256), vec![140, 140]);
        for n in [1, 127, 257, 1000, 16257] {
            let got = chunk_lengths(n, HEAD_CHUNK);
            let (lo, hi) = (got.iter().min().unwrap(), got.iter().max().unwrap());
            assert_eq!(got.iter().sum::<usize>(), n);
            assert!(*hi <= HEAD_CHUNK && hi - lo <= 1, "{n}: {got:?}");
            assert_eq!(got.len(), n.div_ceil(HEAD_CHUNK), "{n}");
        }
    }
}
