//! Reading GGUF: metadata parsed eagerly, tensor data borrowed from an mmap.

use super::{GgufError, Result, Value, ValueType, DEFAULT_ALIGNMENT, MAGIC};
use crate::ggml::GgmlType;
use memmap2::MmapMut;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the row length (contiguous dimension).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
    /// Shape as `[a, b, ...]` for messages.
    pub fn shape_str(&self) -> String {
        let v: Vec<String> = self.ne.iter().map(|n| n.to_string()).collect();
        format!("[{}]", v.join(", "))
    }
}

/// An open GGUF file: metadata in memory, tensor bytes in an mmap.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<MmapMut>,
    pub version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: u64,
    pub alignment: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(GgufError::Truncated {
                path: self.path.to_owned(),
                what: format!("ends at byte {} while reading {}", self.buf.len(), what()),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, w: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap()))
    }
    fn u32(&mut self, w: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, w)?.try_into().unwrap()))
    }
    fn u64(&mut self, w: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, w)?.try_into().unwrap()))
    }
    fn string(&mut self, w: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(w)?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_owned(),
                what: format!("string of {n} bytes at byte {} in {}", self.pos, w()),
            });
        }
        let b = self.take(n as usize, w)?;
        String::from_utf8(b.to_vec()).map_err(|_| GgufError::Invalid {
            path: self.path.to_owned(),
            msg: format!("invalid UTF-8 in {}", w()),
        })
    }
    fn value(&mut self, ty: ValueType, w: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(w)?),
            ValueType::I8 => Value::I8(self.u8(w)? as i8),
            ValueType::U16 => Value::U16(self.u16(w)?),
            ValueType::I16 => Value::I16(self.u16(w)? as i16),
            ValueType::U32 => Value::U32(self.u32(w)?),
            ValueType::I32 => Value::I32(self.u32(w)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(w)?)),
            ValueType::Bool => Value::Bool(self.u8(w)? != 0),
            ValueType::String => Value::String(self.string(w)?),
            ValueType::U64 => Value::U64(self.u64(w)?),
            ValueType::I64 => Value::I64(self.u64(w)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(w)?)),
            ValueType::Array => {
                let code = self.u32(w)?;
                let et = ValueType::from_code(code).ok_or_else(|| GgufError::Invalid {
                    path: self.path.to_owned(),
                    msg: format!("unknown array element type {code} in {}", w()),
                })?;
                if et == ValueType::Array {
                    return Err(GgufError::Invalid {
                        path: self.path.to_owned(),
                        msg: format!("nested arrays (in {}) are not readable by ggml", w()),
                    });
                }
                let n = self.u64(w)?;
                // Every element takes at least one byte: a larger count is a corrupt file.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(GgufError::Truncated {
                        path: self.path.to_owned(),
                        what: format!("array of {n} elements in {}", w()),
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, w)?);
                }
                Value::Array(et, v)
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file; tensor data stays in the mmap.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let io = |e| GgufError::Io {
            path: path.clone(),
            source: e,
        };
        let file = File::open(&path).map_err(io)?;
        let mmap = crate::ggml::map_file(&file).map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Arc<MmapMut>) -> Result<Self> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
        };
        let hdr = || "the header".to_string();
        if buf.len() < 4 {
            return Err(GgufError::Truncated {
                path: path.clone(),
                what: format!("only {} bytes", buf.len()),
            });
        }
        let magic = c.u32(&hdr)?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = c.u32(&hdr)?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::BadVersion { path, version });
        }
        let n_tensors = c.u64(&hdr)?;
        let n_kv = c.u64(&hdr)?;
        let mut metadata = Vec::new();
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let w = || format!("metadata entry {i}");
            let key = c.string(&w)?;
            let wk = || format!("metadata key '{key}'");
            let code = c.u32(&wk)?;
            let ty = ValueType::from_code(code).ok_or_else(|| GgufError::Invalid {
                path: path.clone(),
                msg: format!("metadata key '{key}' has unknown type {code}"),
            })?;
            let v = c.value(ty, &wk)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Invalid {
                    path: path.clone(),
                    msg: format!("duplicate metadata key '{key}'"),
                });
            }
            metadata.push((key, v));
        }
        let alignment = match meta_index.get("general.alignment") {
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Invalid {
                        path,
                        msg: "general.alignment must be a power of two".into(),
                    })
                }
            },
            None => DEFAULT_ALIGNMENT,
        };
        let mut tensors = Vec::new();
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let w = || format!("tensor info {i}");
            let name = c.string(&w)?;
            let wn = || format!("tensor info of '{name}'");
            let n_dims = c.u32(&wn)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Invalid {
                    path,
                    msg: format!("tensor '{name}' has {n_dims} dimensions (1 to 4 allowed)"),
                });
            }
            let mut ne = Vec::new();
            for _ in 0..n_dims {
                ne.push(c.u64(&wn)?);
            }
            let code = c.u32(&wn)?;
            let ty = GgmlType::from_code(code).ok_or_else(|| GgufError::Invalid {
                path: path.clone(),
                msg: format!("tensor '{name}' has unknown ggml type {code} (file from a newer llama.cpp?)"),
            })?;
            let offset = c.u64(&wn)?;
            let size = ty.tensor_bytes(&ne).ok_or_else(|| GgufError::Invalid {
                path: path.clone(),
                msg: format!(
                    "tensor '{name}' of type {} has row length {} that is not a multiple of its block size {}",
                    ty.name(),
                    ne[0],
                    ty.block_size()
                ),
            })?;
            if offset % alignment != 0 {
                return Err(GgufError::Invalid {
                    path,
                    msg: format!("tensor '{name}' data offset {offset} is not aligned to {alignment}"),
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Invalid {
                    path,
                    msg: format!("duplicate tensor '{name}'"),
                });
            }
            tensors.push(TensorInfo {
                name,
                ne,
                ty,
                offset,
                size,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (buf.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            if t.offset + t.size > data_len {
                return Err(GgufError::Truncated {
                    path,
                    what: format!(
                        "tensor '{}' needs bytes {}..{} of the data section but the file has {}",
                        t.name,
                        t.offset,
                        t.offset + t.size,
                        data_len
                    ),
                });
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            data_offset,
            alignment,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    fn type_err(&self, key: &str, v: &Value, expected: &'static str) -> GgufError {
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_owned(),
            found: v.type_name(),
            expected,
        }
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.type_err(key, v, "string"))
    }

    /// A required integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.type_err(key, v, "unsigned integer"))
    }

    /// An optional integer value (present with the wrong type is an error).
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.type_err(key, v, "unsigned integer")),
        }
    }

    /// An optional float value (present with the wrong type is an error).
    pub fn get_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.type_err(key, v, "number")),
        }
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor's info.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// One tensor's info, or an error naming the file.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_owned(),
        })
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.size as usize]
    }

    /// The mapping and the absolute byte offset of a tensor's data in it
    /// (for zero-copy CPU weights).
    pub(crate) fn mapping(&self, t: &TensorInfo) -> (Arc<MmapMut>, usize) {
        (self.mmap.clone(), (self.data_offset + t.offset) as usize)
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes_total(&self) -> u64 {
        self.tensors.iter().map(|t| t.size).sum()
    }
}
