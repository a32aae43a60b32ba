//! Weights coming in from other formats, one file each.

pub mod hf;
pub mod nf4;
