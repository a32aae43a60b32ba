//! Checkpoints: every trainable tensor, the AdamW moments, the step and the
//! dropout generator, in one GGUF file per checkpoint directory
//! (`<out>/checkpoints/step-000123/state.gguf`), written atomically.

use super::{AdamW, TrainConfig};
use crate::ggml::{f32_bytes, GgmlType};
use crate::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use crate::peft::Trainable;
use crate::rng::Rng;
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Everything that changes during training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Host copies of the trainable tensors, in `param_names` order.
    pub params: Vec<Vec<f32>>,
    pub opt: AdamW,
    /// Dropout generator (None when the method draws no masks yet).
    pub rng: Option<Rng>,
}

impl TrainState {
    /// The state of a fresh run: the method's initial tensors, zero moments.
    pub fn fresh(method: &dyn Trainable, seed: u64) -> Self {
        let params: Vec<Vec<f32>> = method.params().iter().map(|t| t.read_f32()).collect();
        let sizes: Vec<usize> = params.iter().map(|p| p.len()).collect();
        TrainState {
            step: 0,
            params,
            opt: AdamW::new(&sizes),
            rng: Some(Rng::new(seed ^ 0xD40_F00D)),
        }
    }

    /// One optimizer update: clips `grads` to the configured global norm,
    /// takes an AdamW step at `lr` and copies the result to the method's
    /// tensors. Returns the norm before clipping.
    pub fn update(
        &mut self,
        cfg: &super::OptimConfig,
        lr: f32,
        mut grads: Vec<Vec<f32>>,
        method: &dyn Trainable,
    ) -> f32 {
        let norm = super::optim::clip(&mut grads, cfg.max_grad_norm);
        self.opt.step(cfg, lr, &mut self.params, &grads);
        self.write_params(method);
        norm
    }

    /// Copies the host tensors to the method's (device) tensors.
    pub fn write_params(&self, method: &dyn Trainable) {
        for (t, p) in method.params().iter().zip(&self.params) {
            t.write_f32(p);
        }
    }
}

/// Writes a checkpoint and returns its directory.
pub fn save(out_dir: &Path, st: &TrainState, method: &dyn Trainable, cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = out_dir.join("checkpoints").join(format!("step-{:06}", st.step));
    let tmp = out_dir.join("checkpoints").join(format!(".step-{:06}.tmp", st.step));
    let io = |p: &Path, e| Error::io(p, e);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String("gguf_peft.checkpoint".into()));
    w.set("gguf_peft.step", Value::U64(st.step as u64));
    w.set("gguf_peft.adam_t", Value::U64(st.opt.t));
    let rng = st.rng.as_ref().map(|r| serde_json::to_string(r).expect("serialisable"));
    w.set("gguf_peft.rng", Value::String(rng.unwrap_or_default()));
    w.set(
        "gguf_peft.train_config",
        Value::String(serde_json::to_string(cfg).expect("serialisable")),
    );
    let names = method.param_names();
    let mut datas: Vec<&[f32]> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        for (prefix, v) in [
            ("param", &st.params[i]),
            ("adam_m", &st.opt.m[i]),
            ("adam_v", &st.opt.v[i]),
        ] {
            w.add_tensor(TensorSpec {
                name: format!("{prefix}.{n}"),
                ty: GgmlType::F32,
                ne: vec![v.len() as u64],
            });
            datas.push(v);
        }
    }
    w.write(tmp.join("state.gguf"), |i| Ok(Cow::Owned(f32_bytes(datas[i]))))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

/// The newest checkpoint under an output directory, or `dir` itself if it is one.
pub fn find(dir: &Path) -> Result<PathBuf> {
    if dir.join("state.gguf").exists() {
        return Ok(dir.to_owned());
    }
    let cdir = dir.join("checkpoints");
    let mut best: Option<PathBuf> = None;
    if let Ok(rd) = std::fs::read_dir(&cdir) {
        for e in rd.flatten() {
            let p = e.path();
            let is_ckpt = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"));
            if is_ckpt && p.join("state.gguf").exists() && best.as_ref().is_none_or(|b| p > *b) {
                best = Some(p);
            }
        }
    }
    best.ok_or_else(|| Error::Msg(format!("{}: no checkpoint found to resume from", dir.display())))
}

/// Loads a checkpoint for `method`; its tensors must match by name and size.
pub fn load(dir: &Path, method: &dyn Trainable) -> Result<TrainState> {
    let path = dir.join("state.gguf");
    let f = GgufFile::open(&path)?;
    let bad = |m: String| Error::Msg(format!("{}: {m}", path.display()));
    if f.get("general.type").and_then(|v| v.as_str()) != Some("gguf_peft.checkpoint") {
        return Err(bad("not a gguf-peft checkpoint".into()));
    }
    let step = f.get_u64("gguf_peft.step")? as usize;
    let t = f.get_u64("gguf_peft.adam_t")?;
    let rng = match f.get("gguf_peft.rng").and_then(|v| v.as_str()) {
        Some(s) if !s.is_empty() => Some(serde_json::from_str(s).map_err(|e| bad(format!("bad rng state: {e}")))?),
        _ => None,
    };
    let names = method.param_names();
    let sizes: Vec<usize> = method.params().iter().map(|t| t.n_elements()).collect();
    let read = |prefix: &str, n: &str, size: usize| -> Result<Vec<f32>> {
        let name = format!("{prefix}.{n}");
        let info = f.tensor(&name).ok_or_else(|| {
            bad(format!(
                "missing '{name}': the checkpoint is from another adapter configuration"
            ))
        })?;
        if info.n_elements() as usize != size || info.ty != GgmlType::F32 {
            return Err(bad(format!(
                "'{name}' has {} values, this adapter needs {size}: the checkpoint is from another adapter configuration",
                info.n_elements()
            )));
        }
        Ok(info.ty.to_f32(f.tensor_data(info), size))
    };
    let mut params = Vec::new();
    let mut opt = AdamW::new(&sizes);
    opt.t = t;
    for (i, n) in names.iter().enumerate() {
        params.push(read("param", n, sizes[i])?);
        opt.m[i] = read("adam_m", n, sizes[i])?;
        opt.v[i] = read("adam_v", n, sizes[i])?;
    }
    Ok(TrainState { step, params, opt, rng })
}
