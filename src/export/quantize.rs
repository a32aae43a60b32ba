//! Requantizing a GGUF model: every matrix to one ggml type (through f32),
//! 1-D tensors (norms, biases) kept as they are, metadata kept with
//! `general.file_type` updated. Streams one tensor at a time.

use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::Path;

/// llama.cpp's `general.file_type` for a file that is "mostly" `ty`.
fn file_type(ty: GgmlType) -> Option<u32> {
    Some(match ty.name() {
        "f32" => 0,
        "f16" => 1,
        "q4_0" => 2,
        "q4_1" => 3,
        "q8_0" => 7,
        "q5_0" => 8,
        "q5_1" => 9,
        "q2_K" => 10,
        "q3_K" => 12,
        "q4_K" => 15,
        "q5_K" => 17,
        "q6_K" => 18,
        "iq4_nl" => 25,
        "bf16" => 32,
        _ => return None,
    })
}

/// What a requantization did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub n_converted: usize,
    /// Matrices whose rows do not fit the type's blocks, kept as they were.
    pub kept: Vec<String>,
    /// Largest |w' − w| over all converted values.
    pub max_error: f32,
}

/// Writes `input` with every matrix in type `ty` to `out` (atomically).
pub fn quantize(
    input: &Path,
    out: &Path,
    ty: GgmlType,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    if !ty.can_quantize() {
        return Err(Error::Msg(format!(
            "{ty} needs an importance matrix; pick another --type"
        )));
    }
    if !input.exists() {
        return Err(Error::Msg(format!("{}: no such file", input.display())));
    }
    let f = GgufFile::open(input)?;
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k.clone(), v.clone());
    }
    match file_type(ty) {
        Some(ft) => w.set("general.file_type", Value::U32(ft)),
        None => w.remove("general.file_type"),
    }
    let mut plan = Vec::new();
    let mut report = QuantizeReport {
        n_converted: 0,
        kept: Vec::new(),
        max_error: 0.0,
    };
    for t in f.tensors() {
        let convert = t.ne.len() >= 2 && t.ty != ty && ty.row_bytes(t.ne[0]).is_some() && t.ty.can_dequantize();
        if t.ne.len() >= 2 && !convert && t.ty != ty {
            report.kept.push(t.name.clone());
        }
        w.add_tensor(TensorSpec {
            name: t.name.clone(),
            ty: if convert { ty } else { t.ty },
            ne: t.ne.clone(),
        });
        plan.push((t.clone(), convert));
    }
    let n = plan.len();
    w.write(out, |i| {
        let (t, convert) = &plan[i];
        let data = f.tensor_data(t);
        let bytes = if *convert {
            let vals = t.ty.to_f32(data, t.n_elements() as usize);
            let q = ty.from_f32(&vals, t.ne[0] as usize);
            let back = ty.to_f32(&q, vals.len());
            let e = vals.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            report.max_error = report.max_error.max(e);
            report.n_converted += 1;
            Cow::Owned(q)
        } else {
            Cow::Borrowed(data)
        };
        progress(i + 1, n);
        Ok(bytes)
    })?;
    Ok(report)
}
