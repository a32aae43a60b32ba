//! Datasets: JSONL records in the common shapes, and plain text.
//!
//! Record shapes: `{"text"}`, `{"prompt","completion"}`,
//! `{"messages":[{"role","content"}...]}` and alpaca
//! `{"instruction","input","output"}`. A malformed line is an error naming
//! the file and line.

use crate::tokenizer::Message;
use std::path::{Path, PathBuf};

/// Errors of the data layer; each names the file (and line).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Chat(Vec<Message>),
}

fn field<'v>(v: &'v serde_json::Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(|x| x.as_str())
}

/// Parses one JSON object into a record.
pub fn parse_record(v: &serde_json::Value) -> Result<Record, String> {
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    if let Some(t) = field(v, "text") {
        return Ok(Record::Text(t.to_owned()));
    }
    if let (Some(p), Some(c)) = (field(v, "prompt"), field(v, "completion")) {
        return Ok(Record::PromptCompletion {
            prompt: p.to_owned(),
            completion: c.to_owned(),
        });
    }
    if let Some(msgs) = v.get("messages") {
        let msgs: Vec<Message> = serde_json::from_value(msgs.clone())
            .map_err(|e| format!("'messages' must be a list of {{\"role\", \"content\"}} objects: {e}"))?;
        if msgs.is_empty() {
            return Err("'messages' is empty".into());
        }
        return Ok(Record::Chat(msgs));
    }
    if let (Some(ins), Some(out)) = (field(v, "instruction"), field(v, "output")) {
        let input = field(v, "input").unwrap_or("");
        let prompt = if input.is_empty() {
            ins.to_owned()
        } else {
            format!("{ins}\n\n{input}")
        };
        return Ok(Record::Chat(vec![
            Message {
                role: "user".into(),
                content: prompt,
            },
            Message {
                role: "assistant".into(),
                content: out.to_owned(),
            },
        ]));
    }
    Err("record has none of \"text\", \"prompt\"+\"completion\", \"messages\", \"instruction\"+\"output\"".into())
}

/// Reads a dataset: `.jsonl`/`.json` files as JSON lines, anything else as
/// one plain-text record.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json") | Some("ndjson")
    );
    let records = if is_jsonl {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |msg: String| DataError::Line {
                path: path.to_owned(),
                line: i + 1,
                msg,
            };
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
            out.push(parse_record(&v).map_err(err)?);
        }
        out
    } else if text.trim().is_empty() {
        Vec::new()
    } else {
        vec![Record::Text(text)]
    };
    if records.is_empty() {
        return Err(DataError::File {
            path: path.to_owned(),
            msg: "dataset is empty".into(),
        });
    }
    Ok(records)
}

impl Record {
    /// The record's full text, chat records rendered with the model's template.
    pub fn render(&self, tok: &crate::tokenizer::Tokenizer) -> crate::Result<String> {
        Ok(match self {
            Record::Text(t) => t.clone(),
            Record::PromptCompletion { prompt, completion } => format!("{prompt}{completion}"),
            Record::Chat(m) => tok.apply_chat_template(m, false)?,
        })
    }
}
