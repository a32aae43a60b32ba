//! GGUF files: a reader over an mmap'd file and a streaming writer.
//!
//! Written in Rust rather than through ggml's `gguf_*` C API so that every
//! error can name the file, the key or the tensor, and so that writers can
//! stream tensors one at a time (merged models never hold the whole file in
//! memory). Files written here are checked against ggml's own reader in tests.

mod reader;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::{Value, ValueType};
pub use writer::{tmp_path, GgufWriter, TensorSpec};

use std::path::PathBuf;

/// The GGUF magic, "GGUF" in little-endian bytes.
pub const MAGIC: u32 = 0x4655_4747;
/// The version this crate writes.
pub const VERSION: u32 = 3;
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Errors of the GGUF layer; each names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (bad magic {magic:#010x}); is this really a .gguf model?")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    BadVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what} (the download may be incomplete)")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    KeyType {
        path: PathBuf,
        key: String,
        found: String,
        expected: &'static str,
    },
    #[error("{path}: missing tensor '{name}' (maybe wrong base model or architecture?)")]
    MissingTensor { path: PathBuf, name: String },
}

/// Result alias of the GGUF layer.
pub type Result<T> = std::result::Result<T, GgufError>;
