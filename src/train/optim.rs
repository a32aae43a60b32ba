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

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, c: &OptimConfig, lr: f32, params: &mut [Vec<f32>], grads: &[Vec<f32>]) {
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            for i in 0..p.len() {
                p[i] -= lr * c.weight_decay * p[i];
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let mh = m[i] / bc1;
                let vh = v[i] / bc2;
                p[i] -= lr * mh / (vh.sqrt() + c.eps);
            }
        }
    }
}

/// Global L2 norm of all gradients.
pub fn global_norm(grads: &[Vec<f32>]) -> f32 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales gradients so their global norm is at most `max` (0: no clipping);
/// returns the norm before clipping.
pub fn clip(grads: &mut [Vec<f32>], max: f32) -> f32 {
    let n = global_norm(grads);
    if max > 0.0 && n > max {
        let s = max / (n + 1e-6);
        grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= s);
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

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
    }
}
