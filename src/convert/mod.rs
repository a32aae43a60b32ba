//! Weights coming in from other formats, one file each.

pub mod nf4;
