//! P-Tuning (Liu et al., "GPT Understands, Too"; PEFT's
//! `PromptEncoderConfig`): virtual tokens produced by a prompt encoder from
//! a trainable embedding. The encoder (an MLP, or a bidirectional LSTM with
//! an MLP head) is trained with the embedding; what is exported is its
//! output, used at inference exactly like prompt tuning's virtual tokens.
//! Tensor names follow PEFT's modules (`mlp_head.0.weight`, ...).

use super::{alloc_params, linear_init, Trainable};
use crate::ggml::{Tensor, TensorStore};
use crate::model::{Forward, Hooks, Model};
use crate::rng::Rng;
use crate::{Error, Result};

/// The prompt encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encoder {
    /// Linear → ReLU → Linear → ReLU → Linear.
    Mlp,
    /// Bidirectional LSTM, then Linear → ReLU → Linear.
    Lstm,
}

/// P-tuning hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PTuningConfig {
    pub num_virtual_tokens: usize,
    pub encoder: Encoder,
    pub encoder_hidden_size: usize,
    /// LSTM layers (the MLP always has three linears, as in PEFT).
    pub encoder_num_layers: usize,
}

/// A trainable prompt encoder on one model.
pub struct PTuning {
    pub config: PTuningConfig,
    store: TensorStore,
    names: Vec<String>,
}

const EMB: &str = "embedding.weight";

fn lstm_names(l: usize, reverse: bool) -> [String; 4] {
    let s = if reverse { "_reverse" } else { "" };
    [
        format!("lstm_head.weight_ih_l{l}{s}"),
        format!("lstm_head.weight_hh_l{l}{s}"),
        format!("lstm_head.bias_ih_l{l}{s}"),
        format!("lstm_head.bias_hh_l{l}{s}"),
    ]
}

impl PTuning {
    /// A fresh encoder for `model`, initialised as PyTorch initialises
    /// PEFT's modules (embedding N(0,1), linears and LSTM uniform).
    pub fn new(model: &Model, config: PTuningConfig, seed: u64) -> Result<Self> {
        let e = model.hparams.n_embd;
        let n = config.num_virtual_tokens;
        let h = config.encoder_hidden_size;
        if h == 0 {
            return Err(Error::Msg("--encoder-hidden-size must be at least 1".into()));
        }
        if config.encoder == Encoder::Lstm && config.encoder_num_layers == 0 {
            return Err(Error::Msg("--encoder-num-layers must be at least 1".into()));
        }
        let mut rng = Rng::new(seed);
        // (name, shape, values)
        let mut params: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        if n > 0 {
            params.push((EMB.into(), vec![e, n], (0..e * n).map(|_| rng.normal()).collect()));
            let linear = |params: &mut Vec<_>, rng: &mut Rng, idx: usize, n_in: usize, n_out: usize| {
                let (w, b) = linear_init(rng, n_in, n_out);
                params.push((format!("mlp_head.{idx}.weight"), vec![n_in, n_out], w));
                params.push((format!("mlp_head.{idx}.bias"), vec![n_out], b));
            };
            match config.encoder {
                Encoder::Mlp => {
                    linear(&mut params, &mut rng, 0, e, h);
                    linear(&mut params, &mut rng, 2, h, h);
                    linear(&mut params, &mut rng, 4, h, e);
                }
                Encoder::Lstm => {
                    let bound = 1.0 / (h as f32).sqrt();
                    let mut uni = |len: usize| (0..len).map(|_| rng.uniform(-bound, bound)).collect::<Vec<f32>>();
                    let mut lstm = Vec::new();
                    for l in 0..config.encoder_num_layers {
                        let n_in = if l == 0 { e } else { 2 * h };
                        for rev in [false, true] {
                            let [wi, wh, bi, bh] = lstm_names(l, rev);
                            lstm.push((wi, vec![n_in, 4 * h], uni(n_in * 4 * h)));
                            lstm.push((wh, vec![h, 4 * h], uni(h * 4 * h)));
                            lstm.push((bi, vec![4 * h], uni(4 * h)));
                            lstm.push((bh, vec![4 * h], uni(4 * h)));
                        }
                    }
                    params.extend(lstm);
                    linear(&mut params, &mut rng, 0, 2 * h, 2 * h);
                    linear(&mut params, &mut rng, 2, 2 * h, e);
                }
            }
        }
        let shapes: Vec<(String, Vec<usize>)> = params.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
        let store = alloc_params(model, &shapes)?;
        for (name, _, v) in &params {
            store.get(name).expect("allocated").write_f32(v);
        }
        Ok(PTuning {
            config,
            store,
            names: shapes.into_iter().map(|(n, _)| n).collect(),
        })
    }

    fn p(&self, name: &str) -> Tensor<'_> {
        self.store.get(name).expect("encoder tensor")
    }

    fn linear<'a>(&'a self, f: &Forward<'a>, idx: usize, x: Tensor<'a>) -> Tensor<'a> {
        let c = f.ctx;
        c.add(
            c.mul_mat(self.p(&format!("mlp_head.{idx}.weight")), x),
            self.p(&format!("mlp_head.{idx}.bias")),
        )
    }

    /// One direction of one LSTM layer over `x` `[n_in, n]`: `[h, n]`, in
    /// time order. Gates in PyTorch's order i, f, g, o.
    fn lstm_direction<'a>(&'a self, f: &Forward<'a>, l: usize, reverse: bool, x: Tensor<'a>) -> Tensor<'a> {
        let c = f.ctx;
        let h = self.config.encoder_hidden_size as i64;
        let n = x.ne()[1] as usize;
        let [wi, wh, bi, bh] = lstm_names(l, reverse);
        let pre = c.add(c.add(c.mul_mat(self.p(&wi), x), self.p(&bi)), self.p(&bh)); // [4h, n]
        let gate = |g: Tensor<'a>, k: i64| c.view(g, &[h, 1], &[g.nb()[1]], (k * h) as usize * 4);
        let mut state: Option<(Tensor<'a>, Tensor<'a>)> = None;
        let mut outs: Vec<Option<Tensor<'a>>> = vec![None; n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let mut g = c.view(pre, &[4 * h, 1], &[pre.nb()[1]], t * pre.nb()[1]);
            if let Some((hp, _)) = state {
                g = c.add(g, c.mul_mat(self.p(&wh), hp));
            }
            let g = c.cont(g);
            let i = c.sigmoid_differentiable(gate(g, 0));
            let fg = c.sigmoid_differentiable(gate(g, 1));
            let gg = c.tanh_differentiable(gate(g, 2));
            let o = c.sigmoid_differentiable(gate(g, 3));
            let cell = match state {
                Some((_, cp)) => c.add(c.mul(fg, cp), c.mul(i, gg)),
                None => c.mul(i, gg),
            };
            let hn = c.mul(o, c.tanh_differentiable(cell));
            outs[t] = Some(hn);
            state = Some((hn, cell));
        }
        let mut it = outs.into_iter().map(|o| o.expect("every step ran"));
        let first = it.next().expect("at least one virtual token");
        it.fold(first, |acc, x| f.concat(acc, x, 1))
    }

    /// The encoder's output, `[n_embd, n_virtual]`, in graph `f`.
    fn encode<'a>(&'a self, f: &Forward<'a>) -> Tensor<'a> {
        let c = f.ctx;
        let emb = self.p(EMB);
        match self.config.encoder {
            Encoder::Mlp => {
                let x = c.relu(self.linear(f, 0, emb));
                let x = c.relu(self.linear(f, 2, x));
                self.linear(f, 4, x)
            }
            Encoder::Lstm => {
                let mut x = emb;
                for l in 0..self.config.encoder_num_layers {
                    let fw = self.lstm_direction(f, l, false, x);
                    let bw = self.lstm_direction(f, l, true, x);
                    x = f.concat(fw, bw, 0);
                }
                let x = c.relu(self.linear(f, 0, x));
                self.linear(f, 2, x)
            }
        }
    }

    /// The virtual tokens the encoder produces now, `n_embd` values each.
    pub fn virtual_token_values(&self, model: &Model) -> Result<Vec<f32>> {
        if self.config.num_virtual_tokens == 0 {
            return Ok(Vec::new());
        }
        let gs = 64 * self.config.num_virtual_tokens * self.config.encoder_num_layers.max(1) + 256;
        let out = super::evaluate(model, self, gs, |p, f| vec![p.encode(f)])?;
        Ok(out.into_iter().next().expect("one output"))
    }
}

impl Hooks for PTuning {
    fn n_virtual_tokens(&self) -> usize {
        self.config.num_virtual_tokens
    }

    fn virtual_tokens<'a>(&'a self, f: &Forward<'a>) -> Option<Tensor<'a>> {
        (self.config.num_virtual_tokens > 0).then(|| self.encode(f))
    }
}

impl Trainable for PTuning {
    fn store(&self) -> &TensorStore {
        &self.store
    }

    fn param_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn set_training(&self, _rng: Option<Rng>) {}

    fn training_rng(&self) -> Option<Rng> {
        None
    }

    fn write_adapter(&self, model: &Model, path: &std::path::Path) -> Result<()> {
        let sp = crate::export::soft_prompt::SoftPrompt {
            method: "p_tuning".into(),
            n_virtual: self.config.num_virtual_tokens,
            tokens: Some(self.virtual_token_values(model)?),
            prefix: Vec::new(),
            keep_positions: false,
            head: None,
            config: serde_json::to_string(&self.config).expect("serialisable"),
        };
        crate::export::soft_prompt::write(&sp, model, path)
    }
}
