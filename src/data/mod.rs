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
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Chat(Vec<Message>),
    /// A text with a class label (sequence classification, `{"text","label"}`).
    Labeled {
        text: String,
        label: String,
    },
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
        let label = match v.get("label") {
            None | Some(serde_json::Value::Null) => return Ok(Record::Text(t.to_owned())),
            Some(serde_json::Value::String(l)) => l.clone(),
            Some(l @ serde_json::Value::Number(_)) | Some(l @ serde_json::Value::Bool(_)) => l.to_string(),
            Some(_) => return Err("'label' must be a string or a number".into()),
        };
        return Ok(Record::Labeled {
            text: t.to_owned(),
            label,
        });
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
            Record::Labeled { text, .. } => text.clone(),
        })
    }
}

/// A tokenized example: tokens and, per token, whether predicting it is
/// trained on (completion / assistant tokens by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub tokens: Vec<i32>,
    pub loss: Vec<bool>,
    /// Class index of a labeled example: its only target, predicted from
    /// the last token (the `loss` flags are then all false).
    #[serde(default)]
    pub label: Option<u32>,
}

impl Example {
    /// Number of targets: tokens that carry loss, or the label.
    pub fn n_loss(&self) -> usize {
        if self.label.is_some() {
            return 1;
        }
        self.loss.iter().skip(1).filter(|&&l| l).count()
    }
}

/// The class labels of a dataset's labeled records, sorted (numerically
/// when all are numbers); empty when no record is labeled.
pub fn label_set(records: &[Record]) -> Vec<String> {
    let mut labels: Vec<String> = records
        .iter()
        .filter_map(|r| match r {
            Record::Labeled { label, .. } => Some(label.clone()),
            _ => None,
        })
        .collect();
    let numeric = labels.iter().all(|l| l.parse::<f64>().is_ok());
    labels.sort_by(|a, b| {
        if numeric {
            a.parse::<f64>().unwrap().total_cmp(&b.parse::<f64>().unwrap())
        } else {
            a.cmp(b)
        }
    });
    labels.dedup();
    labels
}

/// How records become examples.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Train on every token, prompts included.
    pub train_on_prompt: bool,
    /// Truncate longer examples to this many tokens.
    pub max_seq_len: usize,
    /// Class labels of labeled records (their index is the target).
    pub labels: Vec<String>,
}

/// What tokenization did to a dataset.
#[derive(Debug, Clone, Default)]
pub struct TokenizeStats {
    pub n_examples: usize,
    pub n_truncated: usize,
    pub n_tokens: usize,
    pub n_loss_tokens: usize,
    /// Examples left with no loss token (after truncation) and dropped.
    pub n_dropped: usize,
}

/// Tokenizes records: prompt parts (user/system turns, the prompt of a
/// prompt/completion pair) carry no loss unless `train_on_prompt`.
pub fn tokenize(
    records: &[Record],
    tok: &crate::tokenizer::Tokenizer,
    o: &TokenizeOptions,
) -> crate::Result<(Vec<Example>, TokenizeStats)> {
    let mut out = Vec::new();
    let mut st = TokenizeStats::default();
    for (ri, r) in records.iter().enumerate() {
        if let Record::Labeled { text, label } = r {
            let Some(k) = o.labels.iter().position(|l| l == label) else {
                return Err(crate::Error::Msg(format!(
                    "record {}: label '{label}' is not one of the training labels {:?}",
                    ri + 1,
                    o.labels
                )));
            };
            let mut tokens = tok.encode(text, true);
            if tokens.len() > o.max_seq_len {
                // Keep the end: the label is read from the last token.
                tokens.drain(..tokens.len() - o.max_seq_len);
                st.n_truncated += 1;
            }
            if tokens.is_empty() {
                st.n_dropped += 1;
                continue;
            }
            st.n_tokens += tokens.len();
            st.n_loss_tokens += 1;
            out.push(Example {
                loss: vec![false; tokens.len()],
                tokens,
                label: Some(k as u32),
            });
            continue;
        }
        // Segments (text, carries loss); tokenized as a whole and split by
        // prefix lengths so token boundaries match the full rendering.
        let segs: Vec<(String, bool)> = match r {
            Record::Text(t) => vec![(t.clone(), true)],
            Record::PromptCompletion { prompt, completion } => {
                vec![(prompt.clone(), false), (completion.clone(), true)]
            }
            Record::Labeled { .. } => unreachable!("handled above"),
            Record::Chat(msgs) => {
                let mut segs = Vec::new();
                let mut prev = String::new();
                for i in 0..msgs.len() {
                    let is_asst = msgs[i].role == "assistant";
                    // The text up to the start of this turn's content, then through it.
                    let upto = if is_asst {
                        tok.apply_chat_template(&msgs[..i], true)?
                    } else {
                        tok.apply_chat_template(&msgs[..=i], false)?
                    };
                    if upto.len() > prev.len() && upto.starts_with(&prev) {
                        segs.push((upto[prev.len()..].to_string(), false));
                        prev = upto;
                    }
                    if is_asst {
                        let through = tok.apply_chat_template(&msgs[..=i], false)?;
                        if through.starts_with(&prev) {
                            segs.push((through[prev.len()..].to_string(), true));
                            prev = through;
                        }
                    }
                }
                segs
            }
        };
        let mut tokens = Vec::new();
        let mut loss = Vec::new();
        let mut text = String::new();
        let mut n_prev = 0;
        for (s, l) in &segs {
            text.push_str(s);
            let t = tok.encode(&text, true);
            // Tokens of this segment are those beyond the previous prefix's.
            let n_new = t.len().saturating_sub(n_prev);
            loss.extend(std::iter::repeat_n(*l || o.train_on_prompt, n_new));
            tokens = t;
            n_prev = tokens.len();
            loss.truncate(n_prev);
        }
        if matches!(r, Record::Text(_) | Record::PromptCompletion { .. }) {
            if let Some(eos) = tok.eos() {
                tokens.push(eos);
                loss.push(true);
            }
        }
        if tokens.len() > o.max_seq_len {
            tokens.truncate(o.max_seq_len);
            loss.truncate(o.max_seq_len);
            st.n_truncated += 1;
        }
        let ex = Example {
            tokens,
            loss,
            label: None,
        };
        if ex.n_loss() == 0 {
            st.n_dropped += 1;
            continue;
        }
        st.n_tokens += ex.tokens.len();
        st.n_loss_tokens += ex.n_loss();
        out.push(ex);
    }
    st.n_examples = out.len();
    Ok((out, st))
}

/// Packs examples of these lengths together (greedily, in order) into
/// groups of at most `max_len` tokens; returns the groups' indices. Each
/// packed example keeps its own attention span (sequence id) in a batch.
pub fn pack(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut len = 0;
    for (i, &n) in lengths.iter().enumerate() {
        if out.is_empty() || len + n > max_len {
            out.push(Vec::new());
            len = 0;
        }
        len += n;
        out.last_mut().expect("just pushed").push(i);
    }
    out
}
