//! AdamW (PyTorch semantics, decoupled weight decay), learning-rate
//! schedules with linear warmup, and gradient clipping by global norm. Runs
//! on the host: adapters are small, and this keeps every step exact and
//! checkpointable.

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimConfig {
    /// Learning rate of step `step` (0-based) out of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f32;
        let t = ((step - self.warmup_steps) as f32 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - t),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f32::consts::PI * t).cos()),
        }
    }
}

/// AdamW state: first and second moments per parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Updates taken so far.
    pub t: u64,
}

impl AdamW {
    /// Zero state for parameters of these sizes.
    pub fn new(sizes: &[usize]) -> Self {
        AdamW {
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            t: 0,
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`: tensors
    /// in parallel on rayon's threads, each value by the same formula
    /// (so the result does not depend on the thread count).
    pub fn step(&mut self, c: &OptimConfig, lr: f32, params: &mut [Vec<f32>], grads: &[Vec<f32>]) {
        use rayon::prelude::*;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let decay = lr * c.weight_decay;
        let tensors = params.par_iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v);
        tensors.for_each(|(((p, g), m), v)| {
            assert!(
                g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
                "gradient and state sizes"
            );
            // Zipped slices, not indices: no bounds checks, so the loop
            // vectorizes.
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *p -= decay * *p;
                *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                let mh = *m / bc1;
                let vh = *v / bc2;
                *p -= lr * mh / (vh.sqrt() + c.eps);
            }
        });
    }
}

/// Global L2 norm of all gradients (each tensor's sum of squares in f64 on
/// rayon's threads, then added in tensor order: the same value whatever the
/// thread count).
pub fn global_norm(grads: &[Vec<f32>]) -> f32 {
    use rayon::prelude::*;
    let squares = |g: &Vec<f32>| {
        // Four running sums: one would wait on each add's latency.
        let mut acc = [0f64; 4];
        let chunks = g.chunks_exact(4);
        let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += (x as f64) * (x as f64);
            }
        }
        acc.iter().sum::<f64>() + tail
    };
    let per: Vec<f64> = grads.par_iter().map(squares).collect();
    per.iter().sum::<f64>().sqrt() as f32
}

/// Scales gradients so their global norm is at most `max` (0: no clipping);
/// returns the norm before clipping.
pub fn clip(grads: &mut [Vec<f32>], max: f32) -> f32 {
    use rayon::prelude::*;
    let n = global_norm(grads);
    if max > 0.0 && n > max {
        let s = max / (n + 1e-6);
        grads.par_iter_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= s));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 2,
            schedule: Schedule::Linear,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0, 10), 0.5);
        assert_eq!(c.lr_at(1, 10), 1.0);
        assert_eq!(c.lr_at(2, 10), 1.0);
        assert!((c.lr_at(6, 10) - 0.5).abs() < 1e-6);
        let c = OptimConfig {
            schedule: Schedule::Cosine,
            ..c
        };
        assert!((c.lr_at(6, 10) - 0.5).abs() < 1e-6);
        assert!(c.lr_at(9, 10) < 0.05);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // With bias correction, the first step is lr * sign(g) (up to eps).
        let c = OptimConfig::default();
        let mut p = vec![vec![1.0f32, -1.0]];
        let mut o = AdamW::new(&[2]);
        o.step(&c, 0.1, &mut p, &[vec![3.0, -0.5]]);
        assert!((p[0][0] - 0.9).abs() < 1e-6 && (p[0][1] + 0.9).abs() < 1e-6, "{p:?}");
    }

    /// Several steps over tensors of odd lengths (the vectorized loops'
    /// tails) against torch.optim.AdamW's documented update in f64.
    #[test]
    fn adamw_matches_torch_algorithm_in_f64() {
        let c = OptimConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let sizes = [1usize, 7, 33, 1000];
        let val = |i: usize, t: usize| ((i * 7919 + t * 104729) % 2001) as f32 / 1000.0 - 1.0;
        let mut p: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|i| val(i, 0)).collect()).collect();
        let mut p64: Vec<Vec<f64>> = p.iter().map(|v| v.iter().map(|&x| x as f64).collect()).collect();
        let (mut m64, mut v64) = (p64.clone(), p64.clone());
        m64.iter_mut().chain(v64.iter_mut()).flatten().for_each(|x| *x = 0.0);
        let mut o = AdamW::new(&sizes);
        let lr = 0.05;
        for t in 1..=5 {
            let g: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|i| val(i + 3, t)).collect()).collect();
            o.step(&c, lr, &mut p, &g);
            let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
            for (k, gk) in g.iter().enumerate() {
                for (i, &gi) in gk.iter().enumerate() {
                    let gi = gi as f64;
                    let x = &mut p64[k][i];
                    *x *= 1.0 - lr as f64 * c.weight_decay as f64;
                    m64[k][i] = b1 * m64[k][i] + (1.0 - b1) * gi;
                    v64[k][i] = b2 * v64[k][i] + (1.0 - b2) * gi * gi;
                    let mh = m64[k][i] / (1.0 - b1.powi(t as i32));
                    let vh = v64[k][i] / (1.0 - b2.powi(t as i32));
                    *x -= lr as f64 * mh / (vh.sqrt() + c.eps as f64);
                }
            }
        }
        for (a, b) in p.iter().flatten().zip(p64.iter().flatten()) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn global_norm_matches_f64_over_odd_lengths() {
        let g: Vec<Vec<f32>> = [0usize, 1, 5, 4099]
            .iter()
            .map(|&n| (0..n).map(|i| (i % 13) as f32 - 6.5).collect())
            .collect();
        let exact = g.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((global_norm(&g) as f64 - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
    }
}
