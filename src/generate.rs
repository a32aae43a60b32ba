//! Text generation over our own graph: greedy at temperature 0, otherwise
//! temperature / top-k / top-p sampling with a seeded generator.

use crate::ggml::Sched;
use crate::model::{Batch, Hooks, KvCache, Model};
use crate::rng::Rng;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            max_tokens: 128,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        }
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], o: &SamplingOptions, rng: &mut Rng) -> i32 {
    if o.temperature <= 0.0 {
        return argmax(logits) as i32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if o.top_k > 0 {
        idx.truncate(o.top_k);
    }
    let max = logits[idx[0]];
    let mut p: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / o.temperature).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = p
            .iter()
            .position(|&x| {
                acc += x;
                acc >= o.top_p
            })
            .map_or(p.len(), |k| k + 1);
        p.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = p.iter().sum();
    let mut r = rng.f32() * total;
    for (k, &pk) in p.iter().enumerate() {
        if r < pk {
            return idx[k] as i32;
        }
        r -= pk;
    }
    idx[p.len() - 1] as i32
}

/// Generates up to `o.max_tokens` tokens after `prompt`, calling `on_token`
/// with each; stops early at a token for which `stop` is true (not emitted).
/// The prompt runs as one batch, then one token per step over a KV cache, as
/// llama.cpp does (so greedy output matches it token for token).
pub fn generate(
    model: &Model,
    sched: &mut Sched,
    hooks: &dyn Hooks,
    prompt: &[i32],
    o: &SamplingOptions,
    stop: impl Fn(i32) -> bool,
    mut on_token: impl FnMut(i32),
) -> crate::Result<Vec<i32>> {
    let mut rng = Rng::new(o.seed);
    let mut out = Vec::new();
    let mut cache = KvCache::default();
    let mut next: Vec<i32> = prompt.to_vec();
    for _ in 0..o.max_tokens {
        // Batch positions count real tokens; the cache also holds virtual ones.
        let start = (cache.n_past - cache.n_virtual) as i32;
        let batch = Batch {
            pos: (start..start + next.len() as i32).collect(),
            seq: vec![0; next.len()],
            outputs: Some(vec![next.len() as i32 - 1]),
            tokens: std::mem::take(&mut next),
        };
        let (logits, c) = model.logits_cached(sched, &batch, hooks, &cache)?;
        cache = c;
        let t = sample(&logits[0], o, &mut rng);
        if stop(t) {
            break;
        }
        on_token(t);
        out.push(t);
        next = vec![t];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        let o = SamplingOptions::default();
        assert_eq!(sample(&[0.0, 3.0, 1.0], &o, &mut Rng::new(0)), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_follows_probabilities() {
        let logits = [0.0f32, 1.0, 2.0];
        let o = SamplingOptions {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &o, &mut Rng::new(3)), 2);
        let o = SamplingOptions { top_k: 0, ..o };
        let mut rng = Rng::new(4);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[sample(&logits, &o, &mut rng) as usize] += 1;
        }
        // softmax([0,1,2]) = [0.090, 0.245, 0.665]
        let p2 = counts[2] as f64 / 20000.0;
        assert!((p2 - 0.665).abs() < 0.02, "{counts:?}");
    }
}
