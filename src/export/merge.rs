//! Merged models: `W' = W + Σ scale·B·A` for every adapted weight, written
//! back in that weight's own type (or one asked for); every other tensor is
//! copied byte for byte and the metadata is kept. Streams one tensor at a
//! time, so memory stays near the largest adapted tensor.

use super::llama_lora::{read_host, HostLora, HostPair};
use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, GgufWriter, TensorSpec};
use crate::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::path::Path;

/// The type of merged (adapted) tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeType {
    /// Each tensor's original type.
    Keep,
    /// This type for every adapted tensor.
    To(GgmlType),
}

/// One adapted tensor of a merge.
#[derive(Debug, Clone)]
pub struct MergedTensor {
    pub name: String,
    /// Type written.
    pub ty: GgmlType,
    /// Fraction of the adapters' change that survives in the written type:
    /// `<W'_written − W, Δ> / |Δ|²` (1 = all of it; small when the change is
    /// below the type's resolution).
    pub kept: f32,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub n_tensors: usize,
    /// Adapted tensors, in file order.
    pub merged: Vec<MergedTensor>,
}

/// Adds `scale · B·A` of one pair to `w` (row-major, `n_out` rows of `n_in`
/// in ggml's layout of the base tensor).
fn add_delta(w: &mut [f32], p: &HostPair, scale: f32) {
    let s = &p.site;
    let r = s.rank;
    if s.is_embedding() {
        // W rows are tokens (n_in = n_vocab of them) of n_out = n_embd values;
        // a holds n_vocab rows of r, b holds n_embd rows of r.
        w.par_chunks_mut(s.n_out).enumerate().for_each(|(v, row)| {
            let av = &p.a[v * r..(v + 1) * r];
            for (e, x) in row.iter_mut().enumerate() {
                let be = &p.b[e * r..(e + 1) * r];
                *x += scale * av.iter().zip(be).map(|(a, b)| a * b).sum::<f32>();
            }
        });
    } else {
        // W rows are outputs (n_out) of n_in; a holds r rows of n_in, b holds
        // n_out rows of r.
        w.par_chunks_mut(s.n_in).enumerate().for_each(|(o, row)| {
            let bo = &p.b[o * r..(o + 1) * r];
            for (k, &bk) in bo.iter().enumerate() {
                let ak = &p.a[k * s.n_in..(k + 1) * s.n_in];
                let c = scale * bk;
                row.iter_mut().zip(ak).for_each(|(x, a)| *x += c * a);
            }
        });
    }
}

/// Merges adapters (each with its user scale) into `base` and writes `out`
/// atomically; `progress(i, n)` is called after each tensor.
pub fn merge(
    base_path: &Path,
    adapters: &[(&Path, f32)],
    out: &Path,
    ty: MergeType,
    mut progress: impl FnMut(usize, usize),
) -> Result<MergeReport> {
    if !base_path.exists() {
        return Err(Error::Msg(format!("{}: no such file", base_path.display())));
    }
    let base = GgufFile::open(base_path)?;
    let loras: Vec<(HostLora, f32)> = adapters
        .iter()
        .map(|(p, s)| Ok((read_host(p, &base)?, *s)))
        .collect::<Result<_>>()?;
    let mut w = GgufWriter::new();
    for (k, v) in base.metadata() {
        w.set(k.clone(), v.clone());
    }
    let mut plan = Vec::new();
    for t in base.tensors() {
        let pairs: Vec<(&HostPair, f32)> = loras
            .iter()
            .flat_map(|(l, s)| {
                l.pairs
                    .iter()
                    .filter(|p| p.base == t.name)
                    .map(move |p| (p, l.pair_scale(p, *s)))
            })
            .collect();
        let out_ty = match (pairs.is_empty(), ty) {
            (true, _) | (false, MergeType::Keep) => t.ty,
            (false, MergeType::To(x)) => x,
        };
        if !pairs.is_empty() {
            if !out_ty.can_quantize() {
                return Err(Error::Msg(format!(
                    "{}: cannot write '{}' as {out_ty} (needs an importance matrix); pick another --type",
                    base_path.display(),
                    t.name
                )));
            }
            if out_ty.row_bytes(t.ne[0]).is_none() {
                return Err(Error::Msg(format!(
                    "{}: '{}' has rows of {} values, not a multiple of {out_ty}'s block size {}; pick another --type",
                    base_path.display(),
                    t.name,
                    t.ne[0],
                    out_ty.block_size()
                )));
            }
        }
        w.add_tensor(TensorSpec {
            name: t.name.clone(),
            ty: out_ty,
            ne: t.ne.clone(),
        });
        plan.push((t.clone(), out_ty, pairs));
    }
    let n = plan.len();
    let mut merged = Vec::new();
    w.write(out, |i| {
        let (t, out_ty, pairs) = &plan[i];
        let data = base.tensor_data(t);
        let bytes = if pairs.is_empty() {
            Cow::Borrowed(data)
        } else {
            let count = t.n_elements() as usize;
            let mut vals = t.ty.to_f32(data, count);
            let orig = vals.clone();
            for (p, s) in pairs {
                add_delta(&mut vals, p, *s);
            }
            let bytes = out_ty.from_f32(&vals, t.ne[0] as usize);
            let written = out_ty.to_f32(&bytes, count);
            let (mut dot, mut norm) = (0f64, 0f64);
            for ((w, v), o) in written.iter().zip(&vals).zip(&orig) {
                let d = (v - o) as f64;
                dot += (w - o) as f64 * d;
                norm += d * d;
            }
            merged.push(MergedTensor {
                name: t.name.clone(),
                ty: *out_ty,
                kept: if norm > 0.0 { (dot / norm) as f32 } else { 1.0 },
            });
            Cow::Owned(bytes)
        };
        progress(i + 1, n);
        Ok(bytes)
    })?;
    Ok(MergeReport { n_tensors: n, merged })
}
