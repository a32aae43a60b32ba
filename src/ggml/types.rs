//! ggml tensor types: sizes, names, quantize and dequantize.

use llama_cpp_sys_2 as sys;
use rayon::prelude::*;
use std::ffi::CStr;

/// A ggml tensor type (`enum ggml_type`), validated against this build of ggml.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u32);

impl std::fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl GgmlType {
    pub const F32: GgmlType = GgmlType(sys::GGML_TYPE_F32);
    pub const F16: GgmlType = GgmlType(sys::GGML_TYPE_F16);
    pub const BF16: GgmlType = GgmlType(sys::GGML_TYPE_BF16);
    pub const Q4_0: GgmlType = GgmlType(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: GgmlType = GgmlType(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: GgmlType = GgmlType(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: GgmlType = GgmlType(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: GgmlType = GgmlType(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: GgmlType = GgmlType(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: GgmlType = GgmlType(sys::GGML_TYPE_Q3_K);
    pub const Q4_K: GgmlType = GgmlType(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: GgmlType = GgmlType(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: GgmlType = GgmlType(sys::GGML_TYPE_Q6_K);
    pub const IQ4_NL: GgmlType = GgmlType(sys::GGML_TYPE_IQ4_NL);
    pub const I32: GgmlType = GgmlType(sys::GGML_TYPE_I32);

    /// A type from its numeric code, if this ggml knows it (removed types,
    /// whose block size is 0, are refused).
    pub fn from_code(code: u32) -> Option<Self> {
        if code >= sys::GGML_TYPE_COUNT {
            return None;
        }
        let t = GgmlType(code);
        (t.block_size() > 0 && t.type_size() > 0).then_some(t)
    }

    /// A type from its ggml name, case-insensitive (`q4_k`, `F16`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        (0..sys::GGML_TYPE_COUNT)
            .filter_map(Self::from_code)
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The numeric code written in GGUF files.
    pub fn code(self) -> u32 {
        self.0
    }

    pub(crate) fn raw(self) -> sys::ggml_type {
        self.0
    }

    fn traits(self) -> &'static sys::ggml_type_traits {
        // SAFETY: the code is < GGML_TYPE_COUNT (checked at construction), for
        // which ggml returns a pointer into its static traits table.
        unsafe { &*sys::ggml_get_type_traits(self.0) }
    }

    /// ggml's name of the type (`q4_K`, `f32`, ...).
    pub fn name(self) -> &'static str {
        let p = self.traits().type_name;
        if p.is_null() {
            return "unknown";
        }
        // SAFETY: type names are static NUL-terminated strings in ggml.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("unknown")
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.traits().blck_size.max(0) as u64
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().type_size as u64
    }

    /// Whether this is a block-quantized type.
    pub fn is_quantized(self) -> bool {
        self.traits().is_quantized
    }

    /// Bytes of one row of `n` elements, if `n` is a whole number of blocks.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size();
        (bs > 0 && n.is_multiple_of(bs)).then(|| n / bs * self.type_size())
    }

    /// Bytes of a tensor of shape `ne` (ggml order).
    pub fn tensor_bytes(self, ne: &[u64]) -> Option<u64> {
        let row = self.row_bytes(*ne.first()?)?;
        Some(ne[1..].iter().product::<u64>() * row)
    }

    /// Whether ggml can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        self == Self::F32 || self.traits().to_float.is_some()
    }

    /// Whether ggml can produce this type from f32 without an importance matrix.
    pub fn can_quantize(self) -> bool {
        // SAFETY: pure query on a valid type code.
        !unsafe { sys::ggml_quantize_requires_imatrix(self.0) }
            && (self == Self::F32 || self.traits().from_float_ref.is_some())
    }

    /// Converts `data` (whole rows of this type) to f32.
    pub fn to_f32(self, data: &[u8], n_elements: usize) -> Vec<f32> {
        let mut out = vec![0f32; n_elements];
        self.to_f32_into(data, &mut out);
        out
    }

    /// Converts `data` into `out`; panics if the sizes disagree (a caller bug).
    pub fn to_f32_into(self, data: &[u8], out: &mut [f32]) {
        let expect = self.row_bytes(out.len() as u64).expect("whole blocks");
        assert_eq!(data.len() as u64, expect, "byte count for {} elements", out.len());
        if self == Self::F32 {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
            return;
        }
        let f = super::dequant::Dequantizer::new(self.0).expect("type without to_float");
        // Chunks of whole blocks on rayon's threads (the commands' --threads).
        let blck = self.block_size() as usize;
        let per = CHUNK_ELEMENTS.div_ceil(blck) * blck;
        let bytes = self.row_bytes(per as u64).expect("whole blocks") as usize;
        out.par_chunks_mut(per).zip(data.par_chunks(bytes)).for_each(|(o, d)| {
            // SAFETY: `d` holds exactly o.len() elements of this type (whole
            // blocks: the sizes were asserted above, chunks split at block
            // boundaries) and `o` has room for them.
            unsafe { f.row(d.as_ptr(), o.as_mut_ptr(), o.len()) }
        });
    }

    /// Converts whole rows of f32 to this type (`src.len()` a multiple of
    /// `n_per_row`); F32 is a plain little-endian copy.
    pub fn from_f32(self, src: &[f32], n_per_row: usize) -> Vec<u8> {
        if self == Self::F32 {
            return f32_bytes(src);
        }
        assert!(n_per_row > 0 && src.len().is_multiple_of(n_per_row));
        let nrows = src.len() / n_per_row;
        let row = self.row_bytes(n_per_row as u64).expect("whole blocks") as usize;
        let mut out = vec![0u8; row * nrows];
        // Chunks of whole rows on rayon's threads (the commands' --threads);
        // rows quantize independently, so the bytes do not depend on them.
        let rows_per = CHUNK_ELEMENTS.div_ceil(n_per_row);
        out.par_chunks_mut(row * rows_per)
            .zip(src.par_chunks(n_per_row * rows_per))
            .for_each(|(o, x)| {
                let n = (x.len() / n_per_row) as i64;
                // SAFETY: `o` has room for the n rows of `x` in this type; no
                // importance matrix is passed (types that need one are refused
                // by can_quantize, and ggml asserts on them).
                let written = unsafe {
                    sys::ggml_quantize_chunk(
                        self.0,
                        x.as_ptr(),
                        o.as_mut_ptr() as *mut _,
                        0,
                        n,
                        n_per_row as i64,
                        std::ptr::null(),
                    )
                };
                assert_eq!(written, o.len());
            });
        out
    }
}

/// Elements converted per task by [`GgmlType::to_f32_into`] and
/// [`GgmlType::from_f32`] (whole blocks / rows of at least this many).
const CHUNK_ELEMENTS: usize = 1 << 16;

/// f32 values as little-endian bytes (the layout of F32 tensors).
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
