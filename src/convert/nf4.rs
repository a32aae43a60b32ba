//! bitsandbytes NF4 weights as transformers saves them (DESIGN.md §6):
//! `<m>.weight` packed nibbles (even element = high nibble), one absmax per
//! `blocksize` elements — float32, or uint8 codes into `nested_quant_map`
//! scaled by `nested_absmax` per `nested_blocksize` codes plus
//! `nested_offset` (double quantization) — the 16-entry `quant_map`, and the
//! JSON `quant_state.bitsandbytes__nf4`. Dequantized in f32, then rounded to
//! the original dtype, as bitsandbytes does.

use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};

/// The JSON quant state saved next to each NF4 weight.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub nested_blocksize: Option<usize>,
    #[serde(default)]
    pub nested_offset: Option<f32>,
}

fn f32s(st: &SafeTensors<'_>, name: &str, file: &str) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::Msg(format!("{file}: missing tensor '{name}'")))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::Msg(format!("{file}: '{name}' is {:?}, expected F32", t.dtype())));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

fn bytes<'a>(st: &'a SafeTensors<'_>, name: &str, file: &str) -> Result<std::borrow::Cow<'a, [u8]>> {
    // The packed data may be stored as another dtype (bnb_4bit_quant_storage);
    // only its bytes matter.
    st.tensor(name)
        .map(|t| std::borrow::Cow::Owned(t.data().to_vec()))
        .map_err(|_| Error::Msg(format!("{file}: missing tensor '{name}'")))
}

/// Whether `<module>.weight` is stored as NF4 in this file.
pub fn is_nf4(st: &SafeTensors<'_>, module: &str) -> bool {
    st.tensor(&format!("{module}.weight.quant_state.bitsandbytes__nf4"))
        .is_ok()
}

/// Dequantizes `<module>.weight` to f32 values (after rounding to the
/// original dtype) and returns them with the original shape.
pub fn dequantize(st: &SafeTensors<'_>, module: &str, file: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let w = format!("{module}.weight");
    let qs_bytes = bytes(st, &format!("{w}.quant_state.bitsandbytes__nf4"), file)?;
    let qs: QuantState = serde_json::from_slice(&qs_bytes)
        .map_err(|e| Error::Msg(format!("{file}: '{w}' has a bad quant_state ({e})")))?;
    if qs.quant_type != "nf4" {
        return Err(Error::Msg(format!(
            "{file}: '{w}' is {}, only nf4 is supported",
            qs.quant_type
        )));
    }
    let n: usize = qs.shape.iter().product();
    let packed = bytes(st, &w, file)?;
    if packed.len() * 2 < n || qs.blocksize == 0 {
        return Err(Error::Msg(format!(
            "{file}: '{w}' has {} packed bytes for {n} values (truncated?)",
            packed.len()
        )));
    }
    let code = f32s(st, &format!("{w}.quant_map"), file)?;
    if code.len() != 16 {
        return Err(Error::Msg(format!("{file}: '{w}.quant_map' must have 16 entries")));
    }
    let n_blocks = n.div_ceil(qs.blocksize);
    let absmax: Vec<f32> = match qs.nested_blocksize {
        None => f32s(st, &format!("{w}.absmax"), file)?,
        Some(nb) => {
            let codes = bytes(st, &format!("{w}.absmax"), file)?;
            let nested_map = f32s(st, &format!("{w}.nested_quant_map"), file)?;
            let nested_absmax = f32s(st, &format!("{w}.nested_absmax"), file)?;
            let offset = qs.nested_offset.unwrap_or(0.0);
            if nested_map.len() != 256 || nb == 0 || nested_absmax.len() < codes.len().div_ceil(nb) {
                return Err(Error::Msg(format!(
                    "{file}: '{w}' has inconsistent double-quantization data"
                )));
            }
            codes
                .iter()
                .enumerate()
                .map(|(i, &c)| nested_map[c as usize] * nested_absmax[i / nb] + offset)
                .collect()
        }
    };
    if absmax.len() < n_blocks {
        return Err(Error::Msg(format!(
            "{file}: '{w}' has {} absmax values for {n_blocks} blocks",
            absmax.len()
        )));
    }
    let round: fn(f32) -> f32 = match qs.dtype.as_str() {
        "float32" => |x| x,
        "bfloat16" => |x| half::bf16::from_f32(x).to_f32(),
        "float16" => |x| half::f16::from_f32(x).to_f32(),
        other => {
            return Err(Error::Msg(format!(
                "{file}: '{w}' has dtype {other} (float32, bfloat16, float16)"
            )))
        }
    };
    let vals = (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let nib = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            round(code[nib as usize] * absmax[i / qs.blocksize])
        })
        .collect();
    Ok((vals, qs.shape))
}
