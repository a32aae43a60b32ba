//! Weights coming in from other formats, one file each.

pub mod hf;
pub mod nf4;

use crate::{Error, Result};
use safetensors::{tensor::TensorView, Dtype};

/// The values of a safetensors tensor stored as F32, F16 or BF16, as f32;
/// `what` names it in the error for other dtypes.
pub(crate) fn f32_values(t: &TensorView<'_>, what: &str) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        other => {
            return Err(Error::Msg(format!(
                "{what}: dtype {other:?} is not supported (F32, F16, BF16)"
            )))
        }
    })
}
