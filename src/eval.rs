//! Mean token negative log-likelihood and perplexity over a text.

use crate::ggml::Sched;
use crate::model::{Batch, Hooks, Model};

/// The result of an evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Tokens whose likelihood was scored.
    pub n_scored: usize,
    /// Windows the text was cut into.
    pub n_windows: usize,
    pub ctx_size: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Log-probability of `target` under one row of logits (stable log-softmax).
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    logits[target] as f64 - lse
}

/// Cuts each sequence into non-overlapping windows of at most `ctx_size`
/// tokens; every token after the first of a window is scored.
pub fn windows(seqs: &[Vec<i32>], ctx_size: usize) -> Vec<Vec<i32>> {
    seqs.iter()
        .flat_map(|s| s.chunks(ctx_size.max(2)).filter(|w| w.len() >= 2).map(|w| w.to_vec()))
        .collect()
}

/// Scores `seqs` (already tokenized) with the model and hooks.
pub fn evaluate(
    model: &Model,
    sched: &mut Sched,
    hooks: &dyn Hooks,
    seqs: &[Vec<i32>],
    ctx_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> crate::Result<EvalReport> {
    let wins = windows(seqs, ctx_size);
    let mut nll = 0f64;
    let mut n = 0usize;
    for (i, w) in wins.iter().enumerate() {
        let mut batch = Batch::single(w);
        batch.outputs = Some((0..w.len() as i32 - 1).collect());
        let logits = model.logits(sched, &batch, hooks)?;
        for (row, &t) in logits.iter().zip(&w[1..]) {
            nll -= log_prob(row, t as usize);
            n += 1;
        }
        progress(i + 1, wins.len());
    }
    if n == 0 {
        return Err(crate::Error::Msg(
            "nothing to evaluate: every text is shorter than two tokens".into(),
        ));
    }
    let mean = nll / n as f64;
    Ok(EvalReport {
        n_scored: n,
        n_windows: wins.len(),
        ctx_size,
        mean_nll: mean,
        perplexity: mean.exp(),
    })
}

/// Class probabilities of each sequence (softmax of the classification
/// head's scores at its last token), in `hooks.class_labels()` order.
pub fn classify(
    model: &Model,
    sched: &mut Sched,
    hooks: &dyn Hooks,
    seqs: &[Vec<i32>],
    mut progress: impl FnMut(usize, usize),
) -> crate::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            return Err(crate::Error::Msg(format!("text {} has no tokens to classify", i + 1)));
        }
        let mut batch = Batch::single(s);
        batch.outputs = Some(vec![s.len() as i32 - 1]);
        let scores = &model.logits(sched, &batch, hooks)?[0];
        out.push((0..scores.len()).map(|k| log_prob(scores, k).exp() as f32).collect());
        progress(i + 1, seqs.len());
    }
    Ok(out)
}

/// Accuracy and mean negative log-likelihood of labeled sequences.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassReport {
    pub n_examples: usize,
    pub accuracy: f64,
    pub mean_nll: f64,
}

/// Scores class probabilities `probs` against the true class indices.
pub fn class_report(probs: &[Vec<f32>], labels: &[usize]) -> ClassReport {
    let n = probs.len().max(1) as f64;
    let correct = probs
        .iter()
        .zip(labels)
        .filter(|(p, &l)| crate::generate::argmax(p) == l)
        .count();
    let nll: f64 = probs
        .iter()
        .zip(labels)
        .map(|(p, &l)| -(p[l].max(1e-30) as f64).ln())
        .sum();
    ClassReport {
        n_examples: probs.len(),
        accuracy: correct as f64 / n,
        mean_nll: nll / n,
    }
}
