//! Writing GGUF files atomically (temp file, then rename) and streaming.

use super::{GgufError, Result, Value, DEFAULT_ALIGNMENT, MAGIC, VERSION};
use crate::ggml::GgmlType;
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Header entry of a tensor to be written.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `ne[0]` is the row length.
    pub ne: Vec<u64>,
}

/// Collects metadata and tensor headers, then streams tensor data.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorSpec>,
    alignment: u64,
}

impl GgufWriter {
    /// A writer with the default alignment.
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Sets (or replaces) a metadata key, keeping first-insertion order.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if key == "general.alignment" {
            if let Some(a) = value.as_u64().filter(|a| a.is_power_of_two()) {
                self.alignment = a;
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// Removes a metadata key if present.
    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    /// Adds a tensor header; its data comes later, in the same order.
    pub fn add_tensor(&mut self, spec: TensorSpec) {
        self.tensors.push(spec);
    }

    /// Writes the file: `data(i)` yields tensor i's bytes, in order. The
    /// output appears at `path` only when everything was written.
    pub fn write<'d>(
        &self,
        path: impl AsRef<Path>,
        mut data: impl FnMut(usize) -> std::result::Result<Cow<'d, [u8]>, String>,
    ) -> Result<()> {
        let path = path.as_ref();
        let tmp = tmp_path(path);
        let io = |e| GgufError::Io {
            path: path.to_owned(),
            source: e,
        };
        if let Some((k, _)) = self
            .metadata
            .iter()
            .find(|(_, v)| matches!(v, Value::Array(t, _) if *t == crate::gguf::ValueType::Array))
        {
            return Err(GgufError::Invalid {
                path: path.to_owned(),
                msg: format!("metadata key '{k}' is a nested array, which ggml cannot read"),
            });
        }
        let result = (|| {
            let sizes = self.tensor_sizes(path)?;
            let mut w = Counting {
                w: BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?),
                pos: 0,
            };
            let put = |w: &mut Counting, b: &[u8]| -> Result<()> {
                w.pos += b.len() as u64;
                w.w.write_all(b).map_err(io)
            };
            put(&mut w, &MAGIC.to_le_bytes())?;
            put(&mut w, &VERSION.to_le_bytes())?;
            put(&mut w, &(self.tensors.len() as u64).to_le_bytes())?;
            put(&mut w, &(self.metadata.len() as u64).to_le_bytes())?;
            let mut buf = Vec::new();
            for (k, v) in &self.metadata {
                buf.clear();
                encode_str(&mut buf, k);
                buf.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
                encode_value(&mut buf, v);
                put(&mut w, &buf)?;
            }
            let mut offset = 0u64;
            for (t, &size) in self.tensors.iter().zip(&sizes) {
                buf.clear();
                encode_str(&mut buf, &t.name);
                buf.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
                for n in &t.ne {
                    buf.extend_from_slice(&n.to_le_bytes());
                }
                buf.extend_from_slice(&t.ty.code().to_le_bytes());
                buf.extend_from_slice(&offset.to_le_bytes());
                put(&mut w, &buf)?;
                offset = (offset + size).div_ceil(self.alignment) * self.alignment;
            }
            let pad = |pos: u64| (pos.div_ceil(self.alignment) * self.alignment - pos) as usize;
            let zeros = vec![0u8; self.alignment as usize];
            let p = pad(w.pos);
            put(&mut w, &zeros[..p])?;
            for (i, (t, &size)) in self.tensors.iter().zip(&sizes).enumerate() {
                let bytes = data(i).map_err(|msg| GgufError::Invalid {
                    path: path.to_owned(),
                    msg: format!("tensor '{}': {msg}", t.name),
                })?;
                if bytes.len() as u64 != size {
                    return Err(GgufError::Invalid {
                        path: path.to_owned(),
                        msg: format!(
                            "tensor '{}' has {} bytes of data, expected {size} for {} {:?}",
                            t.name,
                            bytes.len(),
                            t.ty.name(),
                            t.ne
                        ),
                    });
                }
                put(&mut w, &bytes)?;
                put(&mut w, &zeros[..pad(size)])?;
            }
            let f = w.w.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            Ok(())
        })();
        match result {
            Ok(()) => std::fs::rename(&tmp, path).map_err(io),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn tensor_sizes(&self, path: &Path) -> Result<Vec<u64>> {
        self.tensors
            .iter()
            .map(|t| {
                t.ty.tensor_bytes(&t.ne).ok_or_else(|| GgufError::Invalid {
                    path: path.to_owned(),
                    msg: format!(
                        "tensor '{}': row length {} is not a multiple of {}'s block size {}",
                        t.name,
                        t.ne.first().copied().unwrap_or(0),
                        t.ty.name(),
                        t.ty.block_size()
                    ),
                })
            })
            .collect()
    }
}

struct Counting {
    w: BufWriter<File>,
    pos: u64,
}

/// The temporary sibling a file is written to before it is renamed.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn encode_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn encode_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => encode_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(et, items) => {
            buf.extend_from_slice(&(*et as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                encode_value(buf, it);
            }
        }
    }
}
