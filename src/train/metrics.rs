//! `metrics.jsonl` (one JSON object per step) and the loss-curve picture.

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f32>,
}

impl StepMetrics {
    /// A line with only an eval loss (before training starts).
    pub fn eval_only(step: usize, eval_loss: f32) -> Self {
        StepMetrics {
            step,
            loss: None,
            lr: None,
            grad_norm: None,
            tokens: None,
            tokens_per_s: None,
            eval_loss: Some(eval_loss),
        }
    }
}

/// Reads every line of a metrics file (missing file: none).
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::Msg(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

/// Appends one line.
pub fn append(path: &Path, m: &StepMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{}", serde_json::to_string(m).expect("serialisable")).map_err(|e| Error::io(path, e))
}

/// Drops the lines of steps after `step` (when resuming from a checkpoint).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let all = read(path)?;
    if all.iter().all(|m| m.step <= step) {
        return Ok(());
    }
    let keep: String = all
        .iter()
        .filter(|m| m.step <= step)
        .map(|m| serde_json::to_string(m).expect("serialisable") + "\n")
        .collect();
    write_atomic(path, keep.as_bytes())
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = crate::gguf::tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// An SVG line chart of training loss (and eval loss points) per step.
pub fn loss_svg(ms: &[StepMetrics]) -> String {
    let (w, h, pad) = (720.0f64, 360.0f64, 48.0f64);
    let train: Vec<(f64, f64)> = ms
        .iter()
        .filter_map(|m| m.loss.map(|l| (m.step as f64, l as f64)))
        .collect();
    let eval: Vec<(f64, f64)> = ms
        .iter()
        .filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l as f64)))
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-6);
    let ymin = all.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(ymax - 1e-6);
    let sx = |x: f64| pad + x / xmax * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - ymin) / (ymax - ymin) * (h - 2.0 * pad);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">step</text>\n\
         <text x=\"{pad}\" y=\"{ly}\" >loss ({ymin:.3} – {ymax:.3}), steps 0 – {xmax}</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ty = h - 12.0,
        ly = pad - 12.0,
    );
    if !train.is_empty() {
        let pts: Vec<String> = train
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            pts.join(" ")
        );
    }
    for &(x, y) in &eval {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d62728\"/>\n",
            sx(x),
            sy(y)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">train loss</text><text x=\"{}\" y=\"{}\" fill=\"#d62728\">eval loss</text>\n</svg>\n",
        w - 200.0,
        pad - 12.0,
        w - 110.0,
        pad - 12.0
    );
    s
}
