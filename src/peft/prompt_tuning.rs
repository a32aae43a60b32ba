//! Prompt Tuning (Lester et al.; PEFT's `PromptTuningConfig`): a few
//! trainable embeddings, the virtual tokens, prepended to every sequence.
//! They live in the space of the input embeddings after the architecture's
//! own scaling (what PEFT concatenates with `inputs_embeds`), and take
//! positions 0..n ahead of the real tokens.
//!
//! Also the inference form of P-Tuning, whose exported virtual tokens are
//! its encoder's output.

use super::{alloc_params, Trainable};
use crate::ggml::{Tensor, TensorStore};
use crate::model::{Forward, Hooks, Model};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Name of the trainable tensor, `[n_embd, n_virtual]`.
pub const TENSOR: &str = "virtual_tokens";

/// How virtual tokens (or prefix entries) start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptInit {
    /// Standard normal values (PEFT's `RANDOM`).
    Random,
    /// Zeros (PEFT's `init_weights="zero"` for prefix tuning).
    Zero,
    /// Tokens drawn uniformly from the vocabulary (PEFT's `SAMPLE_VOCAB`):
    /// their embeddings, or for prefixes their keys and values.
    Vocab,
    /// A text's tokens, repeated or cut to the length (PEFT's `TEXT`).
    Text(String),
}

impl PromptInit {
    /// The tokens a vocabulary or text init starts from (`None` for the
    /// value inits).
    pub fn tokens(&self, model: &Model, tok: Option<&Tokenizer>, n: usize, rng: &mut Rng) -> Result<Option<Vec<i32>>> {
        Ok(match self {
            PromptInit::Random | PromptInit::Zero => None,
            PromptInit::Vocab => Some((0..n).map(|_| rng.below(model.hparams.n_vocab) as i32).collect()),
            PromptInit::Text(text) => {
                let tok = tok.ok_or_else(|| Error::Msg("a text init needs the model's tokenizer".into()))?;
                let ids = tok.encode(text, true);
                if ids.is_empty() {
                    return Err(Error::Msg("--init-text is empty after tokenization".into()));
                }
                Some(init_ids(&ids, n))
            }
        })
    }
}

/// Prompt-tuning hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
}

/// Trainable virtual tokens on one model.
pub struct PromptTuning {
    pub config: PromptTuningConfig,
    store: TensorStore,
}

/// The token ids whose embeddings start the virtual tokens: `text`'s tokens
/// repeated and cut to `n` (as PEFT does).
pub fn init_ids(text_ids: &[i32], n: usize) -> Vec<i32> {
    text_ids.iter().copied().cycle().take(n).collect()
}

impl PromptTuning {
    /// A fresh prompt for `model`; `tok` is needed for a text init.
    pub fn new(model: &Model, config: PromptTuningConfig, tok: Option<&Tokenizer>, seed: u64) -> Result<Self> {
        let n = config.num_virtual_tokens;
        let n_embd = model.hparams.n_embd;
        let mut rng = Rng::new(seed);
        let values = match config.init.tokens(model, tok, n, &mut rng)? {
            Some(ids) => embed(model, &ids)?,
            None if config.init == PromptInit::Zero => vec![0.0; n * n_embd],
            None => (0..n * n_embd).map(|_| rng.normal()).collect(),
        };
        Self::from_values(model, config, &values)
    }

    /// Virtual tokens with these values (`n_embd` per token), e.g. read from
    /// an adapter file.
    pub fn from_values(model: &Model, config: PromptTuningConfig, values: &[f32]) -> Result<Self> {
        let n = config.num_virtual_tokens;
        let n_embd = model.hparams.n_embd;
        assert_eq!(values.len(), n * n_embd, "virtual token values");
        let shapes = if n == 0 {
            vec![]
        } else {
            vec![(TENSOR.to_string(), vec![n_embd, n])]
        };
        let store = alloc_params(model, &shapes)?;
        if n > 0 {
            store.get(TENSOR).expect("allocated").write_f32(values);
        }
        Ok(PromptTuning { config, store })
    }

    /// The current virtual tokens, `n_embd` values per token.
    pub fn values(&self) -> Vec<f32> {
        self.store.get(TENSOR).map_or(Vec::new(), |t| t.read_f32())
    }
}

fn embed(model: &Model, ids: &[i32]) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    model.embed_tokens(ids).map_err(|e| Error::Msg(e.to_string()))
}

impl Hooks for PromptTuning {
    fn n_virtual_tokens(&self) -> usize {
        self.config.num_virtual_tokens
    }

    fn virtual_tokens<'a>(&'a self, _f: &Forward<'a>) -> Option<Tensor<'a>> {
        self.store.get(TENSOR)
    }
}

impl Trainable for PromptTuning {
    fn store(&self) -> &TensorStore {
        &self.store
    }

    fn param_names(&self) -> Vec<String> {
        self.store.get(TENSOR).map_or(vec![], |_| vec![TENSOR.to_string()])
    }

    fn set_training(&self, _rng: Option<Rng>) {}

    fn training_rng(&self) -> Option<Rng> {
        None
    }

    fn write_adapter(&self, model: &Model, path: &std::path::Path) -> Result<()> {
        let sp = crate::export::soft_prompt::SoftPrompt {
            method: "prompt_tuning".into(),
            n_virtual: self.config.num_virtual_tokens,
            tokens: Some(self.values()),
            prefix: Vec::new(),
            keep_positions: false,
            head: None,
            config: serde_json::to_string(&self.config).expect("serialisable"),
        };
        crate::export::soft_prompt::write(&sp, model, path)
    }
}
