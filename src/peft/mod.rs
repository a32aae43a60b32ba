//! PEFT methods, one file each. A method implements [`crate::model::Hooks`]
//! (where it enters the graph) and [`Trainable`] (what the trainer updates).

pub mod lora;
pub mod p_tuning;
pub mod prefix;
pub mod prompt_tuning;

use crate::ggml::{Context, GgmlType, Tensor, TensorStore};
use crate::model::Model;
use crate::rng::Rng;
use crate::Result;
use std::path::Path;

/// What the trainer needs from a method: its trainable tensors (F32, on the
/// model's backend) and the per-step random inputs it adds to the graph.
pub trait Trainable: crate::model::Hooks {
    /// The store holding every trainable tensor.
    fn store(&self) -> &TensorStore;

    /// Names of the trainable tensors, in a fixed order.
    fn param_names(&self) -> Vec<String>;

    /// The trainable tensors, in `param_names` order.
    fn params(&self) -> Vec<Tensor<'_>> {
        self.param_names()
            .iter()
            .map(|n| self.store().get(n).expect("param exists"))
            .collect()
    }

    /// Total number of trainable values.
    fn n_trainable(&self) -> usize {
        self.params().iter().map(|t| t.n_elements()).sum()
    }

    /// Switches training-only behaviour (dropout) on or off; `rng` draws the
    /// masks of the graphs built while on.
    fn set_training(&self, rng: Option<Rng>);

    /// The generator state after the masks drawn so far (for checkpoints).
    fn training_rng(&self) -> Option<Rng>;

    /// Starts a new batch: random inputs are drawn afresh (graphs rebuilt
    /// for the same batch reuse them).
    fn new_batch(&self) {}

    /// Graphs built from now on hold loss rows `[start, start + its rows)`
    /// of `total` (the LM head run over chunks of the loss rows), or every
    /// row (`None`): random inputs over the loss rows are drawn once for
    /// all `total` rows and sliced, as one graph over every row draws them.
    fn set_row_window(&self, _window: Option<(usize, usize)>) {}

    /// Writes the trained adapter in the form runtimes load (llama.cpp's
    /// LoRA GGUF, or our soft-prompt GGUF), atomically.
    fn write_adapter(&self, model: &Model, path: &Path) -> Result<()>;
}

/// F32 tensors with these names and shapes (ggml order) on the model's
/// backend, uninitialised.
pub(crate) fn alloc_params(model: &Model, shapes: &[(String, Vec<usize>)]) -> Result<TensorStore> {
    let ctx = Context::new(shapes.len() + 1, 0, false);
    for (name, ne) in shapes {
        let ne: Vec<i64> = ne.iter().map(|&n| n as i64).collect();
        ctx.new_tensor(GgmlType::F32, &ne).set_name(name);
    }
    Ok(model.backend().alloc_store(ctx)?)
}

/// Evaluates tensors a method builds from its own parameters (no tokens):
/// `build(method, f)` adds them to a graph of up to `graph_size` nodes
/// through a builder over an empty batch; returns their values, in order.
pub(crate) fn evaluate<H: crate::model::Hooks>(
    model: &Model,
    hooks: &H,
    graph_size: usize,
    build: impl for<'a> FnOnce(&'a H, &crate::model::Forward<'a>) -> Vec<Tensor<'a>>,
) -> Result<Vec<Vec<f32>>> {
    let ctx = Context::new(graph_size * 2, graph_size, false);
    let batch = crate::model::Batch::default();
    let f = crate::model::Forward::new(&ctx, &model.hparams, model.weights(), hooks, 0, &batch, false);
    let outs: Vec<Tensor<'_>> = build(hooks, &f).into_iter().map(|t| ctx.cont(t).set_output()).collect();
    let mut g = ctx.new_graph(graph_size, false);
    for t in &outs {
        g.build_forward(*t);
    }
    let err = |e: crate::ggml::ComputeError| crate::Error::Msg(e.to_string());
    let mut sched = crate::ggml::Sched::new(std::slice::from_ref(model.backend()), graph_size);
    sched.alloc(&g).map_err(err)?;
    f.fill_inputs();
    sched.compute(&g).map_err(err)?;
    Ok(outs.iter().map(|t| t.read_f32()).collect())
}

/// PyTorch's default init of `nn.Linear(n_in, n_out)`: weight and bias
/// uniform in ±1/sqrt(n_in) (Kaiming-uniform with a = sqrt(5)).
pub(crate) fn linear_init(rng: &mut Rng, n_in: usize, n_out: usize) -> (Vec<f32>, Vec<f32>) {
    let b = 1.0 / (n_in as f32).sqrt();
    let w = (0..n_in * n_out).map(|_| rng.uniform(-b, b)).collect();
    let bias = (0..n_out).map(|_| rng.uniform(-b, b)).collect();
    (w, bias)
}

/// A method and its configuration: what `finetune --method` trains.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodConfig {
    Lora(lora::LoraConfig),
    Prompt(prompt_tuning::PromptTuningConfig),
    Ptuning(p_tuning::PTuningConfig),
    /// Prefix tuning, and P-tuning v2 (`ptuning_v2` set).
    Prefix(prefix::PrefixConfig),
}

impl MethodConfig {
    /// A fresh adapter on `model` (`tok` serves text inits).
    pub fn build(
        &self,
        model: &Model,
        tok: Option<&crate::tokenizer::Tokenizer>,
        seed: u64,
    ) -> Result<Box<dyn Trainable>> {
        Ok(match self {
            MethodConfig::Lora(c) => Box::new(lora::Lora::new(model, c.clone(), seed)?),
            MethodConfig::Prompt(c) => Box::new(prompt_tuning::PromptTuning::new(model, c.clone(), tok, seed)?),
            MethodConfig::Ptuning(c) => Box::new(p_tuning::PTuning::new(model, c.clone(), seed)?),
            MethodConfig::Prefix(c) => Box::new(prefix::PrefixTuning::new(model, c.clone(), tok, seed)?),
        })
    }
}

/// Loads a trained adapter for `model`: a llama.cpp LoRA GGUF (applied at
/// `scale`) or one of our soft-prompt GGUFs.
pub fn load_adapter(model: &Model, path: &Path, scale: f32) -> Result<Box<dyn Trainable>> {
    use crate::export::{llama_lora, soft_prompt};
    if !path.exists() {
        return Err(crate::Error::Msg(format!("{}: no such file", path.display())));
    }
    if !soft_prompt::is_soft_prompt(&crate::gguf::GgufFile::open(path)?) {
        let mut l = llama_lora::read(path, model)?;
        l.user_scale = scale;
        return Ok(Box::new(l));
    }
    if scale != 1.0 {
        return Err(crate::Error::Msg(format!(
            "{}: --adapter-scale applies to LoRA adapters only, this is a soft prompt",
            path.display()
        )));
    }
    let sp = soft_prompt::read(path, model)?;
    let n = sp.n_virtual;
    Ok(match sp.tokens {
        Some(t) => {
            let cfg = prompt_tuning::PromptTuningConfig {
                num_virtual_tokens: n,
                init: prompt_tuning::PromptInit::Random,
            };
            Box::new(prompt_tuning::PromptTuning::from_values(model, cfg, &t)?)
        }
        None => {
            let cfg = prefix::PrefixConfig {
                num_virtual_tokens: n,
                projection: None,
                init: prompt_tuning::PromptInit::Random,
                ptuning_v2: sp.method == "p_tuning_v2",
                keep_positions: sp.keep_positions,
                classes: sp.head.as_ref().map_or(Vec::new(), |(c, _)| c.clone()),
            };
            let head = sp.head.as_ref().map(|(_, w)| &w[..]);
            Box::new(prefix::PrefixTuning::from_values(model, cfg, &sp.prefix, head)?)
        }
    })
}

/// The line PEFT's `print_trainable_parameters` prints: trainable and all
/// parameters (the base's plus the adapter's) with thousands separators,
/// and the trainable share in percent to four decimals.
pub fn trainable_summary(n_trainable: u64, n_base: u64) -> String {
    fn grouped(n: u64) -> String {
        let s = n.to_string();
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        out
    }
    let all = n_base + n_trainable;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        grouped(n_trainable),
        grouped(all),
        100.0 * n_trainable as f64 / all as f64
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_reads_like_peft() {
        // Expected strings printed by PEFT 0.21.2's format (peft_model.py:976).
        assert_eq!(
            super::trainable_summary(2_359_296, 1_229_581_312 - 2_359_296),
            "trainable params: 2,359,296 || all params: 1,229,581,312 || trainable%: 0.1919"
        );
        assert_eq!(
            super::trainable_summary(0, 999),
            "trainable params: 0 || all params: 999 || trainable%: 0.0000"
        );
    }
}
