//! Tokenization with llama.cpp's own vocabulary (a vocab-only load of the
//! same GGUF, so tokens match the runtime exactly) and chat templates
//! rendered with minijinja.

use crate::ggml::llama::LlamaModel;
use crate::gguf::GgufFile;
use crate::{Error, Result};
use std::path::Path;

/// A tokenizer backed by llama.cpp's vocabulary of a GGUF file.
pub struct Tokenizer {
    vocab: LlamaModel,
    chat_template: Option<String>,
    bos_text: String,
    eos_text: String,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Tokenizer {
    /// Loads the vocabulary (and chat template) of a GGUF model.
    pub fn load(path: &Path, file: &GgufFile) -> Result<Self> {
        let vocab = LlamaModel::load(path, true).map_err(Error::Msg)?;
        let chat_template = file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let text = |t: Option<i32>| t.map(|t| vocab.token_text(t)).unwrap_or_default();
        let bos_text = text(vocab.bos());
        let eos_text = text(vocab.eos());
        Ok(Tokenizer {
            vocab,
            chat_template,
            bos_text,
            eos_text,
        })
    }

    /// Tokens of `text`, with BOS when the model asks for it (`add_special`)
    /// and special-token text parsed (`<|im_start|>` becomes one token).
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<i32> {
        self.vocab.tokenize(text, add_special, true)
    }

    /// The text of `tokens` (special tokens shown).
    pub fn decode(&self, tokens: &[i32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(tokens)).into_owned()
    }

    /// The raw bytes of `tokens` (a character may be split across tokens).
    pub fn decode_bytes(&self, tokens: &[i32]) -> Vec<u8> {
        tokens
            .iter()
            .flat_map(|&t| self.vocab.token_to_piece(t, true))
            .collect()
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos(&self) -> Option<i32> {
        self.vocab.eos()
    }

    /// Whether generation ends at this token.
    pub fn is_eog(&self, token: i32) -> bool {
        self.vocab.is_eog(token)
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.vocab.n_vocab()
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template (minijinja with
    /// Python-compatible string methods), optionally opening the assistant turn.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            Error::Msg("this model has no tokenizer.chat_template; use a prompt without --chat".into())
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| Error::Msg(format!("chat template does not parse: {e}")))?;
        let t = env.get_template("chat").expect("just added");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_text,
            eos_token => self.eos_text,
        })
        .map_err(|e| Error::Msg(format!("chat template failed to render: {e}")))
    }
}
